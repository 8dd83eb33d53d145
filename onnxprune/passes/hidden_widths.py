"""Per-segment widths of the hidden-size rotation, measured: how much the model's outputs move on calibration data
when one segment alone is cut to a candidate width, then the widths of least summed output error at the promised
mean width (``--hidden-sparsity S``: the segments keep H - round(S*H) on average, exactly).

A probe is exact and cheap: cutting segment s to its first k principal directions P_k, every other segment at full
width, computes what the original computes with the segment's tensor replaced by x C P_k P_k^T (C: the centring of
LayerNorm streams), because only the segment's norms and shortcuts read it. One probe model carries a projection
input per segment; a probe is one run over the calibration feeds with one projection changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..analysis.stream_model import Stream
from ..sessions import create_session, session_options

#: candidate cuts probed per segment, as multiples of the share S of the hidden size the option removes
PROBE_MULTIPLES = (0.5, 1.0, 1.5, 2.0)
#: widths are chosen in steps of this share of the hidden size (the error between probes is interpolated)
STEP_SHARE = 1 / 64


@dataclass
class WidthProbe:
    """The measured output error of cutting each segment alone, per candidate width (the full width: 0)."""

    errors: dict[str, dict[int, float]]


def probe_model(model: onnx.ModelProto, stream: Stream) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` whose segment tensors are each multiplied by a [H, H] graph input before anything reads
    them; returns the copy and the input name per segment."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph, inputs = probe.graph, {}
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output}
    inserts = []
    for position, segment in enumerate(stream.segments):
        name, projected = f"hidden_probe.{position}", f"{segment.tensor}.probed"
        for node in graph.node:
            node.input[:] = [projected if i == segment.tensor else i for i in node.input]
        inserts.append((producers[segment.tensor], helper.make_node("MatMul", [segment.tensor, name], [projected],
                                                                    name=name + "/MatMul")))
        graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [stream.hidden, stream.hidden]))
        inputs[segment.tensor] = name
    for after, node in sorted(inserts, key=lambda item: -item[0]):  # each right after its segment's producer
        graph.node.insert(after + 1, node)
    return probe, inputs


def projections(stream: Stream, bases: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The full-width projection (C, or I for RMSNorm streams) and, per segment, its basis's x -> x C B B^T."""
    hidden = stream.hidden
    centering = np.eye(hidden) - np.full((hidden, hidden), 1.0 / hidden) if stream.centered else np.eye(hidden)
    return centering, {name: centering @ basis @ basis.T for name, basis in bases.items()}


def measure_cuts(model: onnx.ModelProto, stream: Stream, ordered: dict[str, np.ndarray],
                 feeds: list[dict[str, np.ndarray]], widths: list[int]) -> WidthProbe:
    """The relative squared output error on ``feeds`` (float outputs, padded positions left out) of each segment
    cut alone to each of ``widths``; ``ordered``: every segment's full PCA basis, columns by eigenvalue. The feeds
    should be other than the ones the bases came from: a basis fits the rows it was computed on, and only rows it
    has not seen show what a cut loses on new text."""
    probe, inputs = probe_model(model, stream)
    session = create_session(probe, session_options(log_level=3))
    full = projections(stream, {})[0].astype(np.float32)
    base = {name: full for name in inputs.values()}
    reference = [session.run(None, {**feed, **base}) for feed in feeds]
    errors: dict[str, dict[int, float]] = {}
    for segment in stream.segments:
        errors[segment.tensor] = {stream.hidden: 0.0}
        for width in widths:
            basis = ordered[segment.tensor][:, :width]
            matrix = projections(stream, {segment.tensor: basis})[1][segment.tensor].astype(np.float32)
            cut = {**base, inputs[segment.tensor]: matrix}
            errors[segment.tensor][width] = _relative_error(
                reference, [session.run(None, {**feed, **cut}) for feed in feeds], feeds)
    return WidthProbe(errors)


def candidate_widths(hidden: int, sparsity: float) -> list[int]:
    """The probed widths of a segment for the share ``sparsity`` removed on average, widest first."""
    cuts = {min(round(multiple * sparsity * hidden), hidden - 1) for multiple in PROBE_MULTIPLES}
    return sorted({hidden - cut for cut in cuts if cut > 0}, reverse=True)


def _relative_error(reference: list[list[np.ndarray]], got: list[list[np.ndarray]],
                    feeds: list[dict[str, np.ndarray]]) -> float:
    """sum ||y - y0||^2 / sum ||y0||^2 over the float outputs; rows of a padded position are left out where an
    output's leading shape is the attention mask's."""
    num = den = 0.0
    for ref, out, feed in zip(reference, got, feeds):
        mask = feed.get("attention_mask")
        for expected, value in zip(ref, out):
            if not np.issubdtype(expected.dtype, np.floating):
                continue
            diff = (value.astype(np.float64) - expected) ** 2
            energy = expected.astype(np.float64) ** 2
            if mask is not None and expected.ndim == mask.ndim + 1 and tuple(expected.shape[:-1]) == mask.shape:
                keep = mask != 0
                diff, energy = diff[keep], energy[keep]
            num, den = num + float(diff.sum()), den + float(energy.sum())
    return num / max(den, 1e-300)


def choose_widths(probe: WidthProbe, hidden: int, keep: int) -> dict[str, int]:
    """Widths of least summed (interpolated) error whose mean is exactly ``keep``: an exact knapsack over steps of
    ``STEP_SHARE`` of the hidden size (the remainder taken from the cheapest segment), no segment below the
    narrowest probe."""
    names = list(probe.errors)
    step = max(1, round(hidden * STEP_SHARE))
    remove = len(names) * (hidden - keep)
    steps, rest = divmod(remove, step)
    curves = [_curve(probe.errors[name], hidden, step) for name in names]
    chosen = _knapsack(curves, steps)
    widths = {name: hidden - count * step for name, count in zip(names, chosen)}
    if rest:
        slopes = [_slope(probe.errors[name], widths[name]) for name in names]
        order = sorted(range(len(names)), key=lambda i: slopes[i])
        target = next(i for i in order if widths[names[i]] - rest >= 1)
        widths[names[target]] -= rest
    return widths


def _interpolate(errors: dict[int, float], width: float) -> float:
    points = sorted(errors)
    return float(np.interp(width, points, [errors[p] for p in points]))


def _slope(errors: dict[int, float], width: int) -> float:
    return _interpolate(errors, width - 1) - _interpolate(errors, width)


def _curve(errors: dict[int, float], hidden: int, step: int) -> list[float]:
    """Error after removing 0, 1, 2... steps, down to the narrowest probed width."""
    narrowest = min(errors)
    return [_interpolate(errors, hidden - count * step) for count in range((hidden - narrowest) // step + 1)]


def _knapsack(curves: list[list[float]], total: int) -> list[int]:
    """Steps removed per segment, summing to ``total``, of least summed error (dynamic programming)."""
    best = np.full(total + 1, np.inf)
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for curve in curves:
        new = np.full(total + 1, np.inf)
        pick = np.zeros(total + 1, dtype=np.int64)
        for count, error in enumerate(curve):
            shifted = np.full(total + 1, np.inf)
            shifted[count:] = best[:total + 1 - count] + error
            better = shifted < new
            new[better], pick[better] = shifted[better], count
        best = new
        picks.append(pick)
    if not np.isfinite(best[total]):
        raise ValueError("the probed widths cannot reach the mean width")
    chosen, left = [], total
    for pick in reversed(picks):
        chosen.append(int(pick[left]))
        left -= chosen[-1]
    return chosen[::-1]
