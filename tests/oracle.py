"""The correctness oracle for structured pruning (guide section 2), used by the tests only.

``masked``: the original graph with every consumer weight slice that reads the chosen channels set to zero,
shapes untouched. ``removed``: the chosen channels physically removed everywhere in their groups. Both must
give the same outputs (float32 rel. error ~1e-5).

The one entry point is :func:`masked_and_removed` with a *choice*: a group id (as numbered by
:func:`list_groups`) mapped to the indices of the channels to remove, each a position in that group's prunable
units (``prunable``). :func:`random_choice` draws one.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis.groups import Analysis, analyse, build_groups
from onnxprune.passes.structured import mask, never_empty, prepare_for_analysis, remove

Choice = dict[int, list[int]]


def prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` as the structured pass analyses it: static run-time size reads folded, exporter
    spellings simplified (:mod:`onnxprune.passes.canonical`)."""
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


def masked_and_removed(model: onnx.ModelProto, choice: Choice, input_shapes: dict[str, list[int]] | None = None
                       ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The two oracle models for ``choice``: the chosen channels' consumer slices zeroed, and removed."""
    masked, removed = prepared(model), prepared(model)
    analysis = analyse(masked, input_shapes)
    mask(analysis, choice_to_keep(analysis, choice))
    analysis = analyse(removed, input_shapes)
    remove(analysis, choice_to_keep(analysis, choice))
    return masked, removed


def relative_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Largest ||a - b|| / ||a|| over the outputs."""
    worst = 0.0
    for a, b in zip(reference, candidate):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        denom = max(float(np.linalg.norm(a64)), 1e-12)
        worst = max(worst, float(np.linalg.norm(a64 - b64)) / denom)
    return worst
