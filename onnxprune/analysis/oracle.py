"""The correctness oracle for structured pruning (guide section 2).

``masked``: the original graph with every consumer weight slice that reads the chosen
channels set to zero, shapes untouched. ``removed``: the chosen channels physically removed
everywhere in their groups. Both must give the same outputs (float32 rel. error ~1e-5).

A *choice* maps a group id (as numbered by :func:`list_groups`) to the indices of the
channels to remove, each index a position in that group's prunable units (``prunable``).
"""

from __future__ import annotations

import numpy as np
import onnx

from .groups import Analysis, analyse, build_groups

Choice = dict[int, list[int]]


def prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` as the structured pass analyses it: static run-time size reads folded, exporter
    spellings simplified (:mod:`onnxprune.passes.canonical`)."""
    from ..passes.structured import prepare_for_analysis

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    prepare_for_analysis(copy)
    return copy


def list_groups(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> list[dict]:
    """Every group: id, channels, prunable units, ops, producers, frozen reasons (what a choice indexes)."""
    return [{"id": g.id, "channels": g.channels, "prunable": len(g.units), "ops": g.ops,
             "producers": [s.node.name for s in g.spaces], "frozen": sorted({r for _, r in g.frozen_units})}
            for g in build_groups(analyse(prepared(model), input_shapes))]


def random_choice(model: onnx.ModelProto, fraction: float, seed: int,
                  input_shapes: dict[str, list[int]] | None = None) -> Choice:
    """``fraction`` of each group's prunable units, drawn at random (at least one channel always stays)."""
    rng = np.random.default_rng(seed)
    choice: Choice = {}
    for g in list_groups(model, input_shapes):
        n = min(max(round(fraction * g["prunable"]), 1 if fraction > 0 else 0), g["channels"] - 1, g["prunable"])
        if n > 0:
            choice[g["id"]] = sorted(int(i) for i in rng.choice(g["prunable"], size=n, replace=False))
    return choice


def choice_to_keep(analysis: Analysis, choice: Choice) -> np.ndarray:
    """The keep-mask over channel ids for ``choice``; units whose loss would empty a tensor are kept."""
    from ..passes.structured import never_empty

    groups = {g.id: g for g in build_groups(analysis)}
    keep = np.ones(analysis.num_channels, dtype=bool)
    for gid, indices in choice.items():
        if gid not in groups:
            raise ValueError(f"no channel group {gid}")
        units = groups[gid].units
        for i in indices:
            if not 0 <= int(i) < len(units):
                raise ValueError(f"group {gid} has {len(units)} prunable channels; index {i} is out of range")
            keep[units[int(i)]] = False
    return never_empty(analysis, keep)


def _edited_copy(model: onnx.ModelProto, choice: Choice, input_shapes, apply) -> onnx.ModelProto:
    copy = prepared(model)
    analysis = analyse(copy, input_shapes)
    apply(analysis, choice_to_keep(analysis, choice))
    return copy


def mask_model(model: onnx.ModelProto, choice: Choice,
               input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with every consumer slice reading the chosen channels zeroed (shapes unchanged)."""
    from ..passes.structured import mask

    return _edited_copy(model, choice, input_shapes, mask)


def remove_model(model: onnx.ModelProto, choice: Choice,
                 input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the chosen channels physically removed everywhere in their groups."""
    from ..passes.structured import remove

    return _edited_copy(model, choice, input_shapes, remove)


def random_keep(model: onnx.ModelProto, fraction: float, seed: int,
                input_shapes: dict[str, list[int]] | None = None) -> np.ndarray:
    """A random choice of removable units (``fraction`` of each group's prunable units, one unit always kept)."""
    analysis = analyse(prepared(model), input_shapes)
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
    """The two oracle models for the channel choice ``keep`` (channel ids as :func:`random_keep` numbers them)."""
    from ..passes.structured import mask, remove

    masked, removed = prepared(model), prepared(model)
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
