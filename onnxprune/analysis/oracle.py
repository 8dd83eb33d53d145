"""The correctness oracle for structured pruning (guide section 2).

``masked``: the original graph with every consumer weight slice that reads the chosen
channels set to zero, shapes untouched. ``removed``: the chosen channels physically removed
everywhere in their groups. Both must give the same outputs (float32 rel. error ~1e-5).
"""

from __future__ import annotations

import numpy as np
import onnx

from .groups import analyse, build_groups


def random_keep(model: onnx.ModelProto, fraction: float, seed: int,
                input_shapes: dict[str, list[int]] | None = None) -> np.ndarray:
    """A random choice of removable units (``fraction`` of each group's prunable units, one unit always kept)."""
    analysis = analyse(model, input_shapes)
    rng = np.random.default_rng(seed)
    keep = np.ones(analysis.num_channels, dtype=bool)
    from ..passes.structured import never_empty

    for group in build_groups(analysis):
        n = min(round(fraction * len(group.units)), group.channels - 1, len(group.units))
        for i in rng.choice(len(group.units), size=max(n, 0), replace=False):
            keep[group.units[i]] = False
    return never_empty(analysis, keep)


def masked_and_removed(model: onnx.ModelProto, keep: np.ndarray,
                       input_shapes: dict[str, list[int]] | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The two oracle models for the channel choice ``keep`` (channel ids as numbered by ``analyse``)."""
    from ..passes.structured import mask, remove

    masked, removed = onnx.ModelProto(), onnx.ModelProto()
    masked.CopyFrom(model)
    removed.CopyFrom(model)
    mask(analyse(masked, input_shapes), keep)
    remove(analyse(removed, input_shapes), keep)
    return masked, removed


def relative_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Largest ||a - b|| / ||a|| over the outputs."""
    worst = 0.0
    for a, b in zip(reference, candidate):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        denom = max(float(np.linalg.norm(a64)), 1e-12)
        worst = max(worst, float(np.linalg.norm(a64 - b64)) / denom)
    return worst
