"""Structured pruning: physically remove channels/neurons over dependency groups.

analyse (rules + groups) -> score units -> allocate (per group or global, round-to) ->
remove (every weight, bias, BN parameter, attribute and shape constant that follows the
channels) -> refresh shapes. :func:`mask` builds the oracle's counterpart: the same
channels zeroed in every consumer weight, shapes untouched.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import onnx

from ..analysis.cost import node_key, node_macs
from ..analysis.groups import Analysis, ChannelGroup, analyse, build_groups, complete_shapes
from ..calibration import channel_energy
from ..compensation import StageClock, fold_removed_constants
from ..config import PruneConfig, ValidateConfig
from ..feeds import prepare_feeds
from ..graph import count_params, remove_dead_nodes
from ..recipe import find_override
from ..refit import detach_weights
from ..scoring import reconstruction_scores, unit_scores
from ..shapes import fold_static_shape_reads, refresh_value_info
from .canonical import merge_batched_transposes
from .manager import PassContext, PassResult, ReconstructionRequest
from .removal import apply_removal
from .subgraphs import WEIGHT_CRITERIA, Scope, scopes, write_back

logger = logging.getLogger(__name__)


def group_overrides(groups: list[ChannelGroup], config: PruneConfig) -> dict[int, float]:
    """Group id -> sparsity from the first recipe override matching one of its producers."""
    result: dict[int, float] = {}
    for g in groups:
        names = [name for s in g.spaces for name in (s.node.name, *s.node.input[1:2])]
        entry = find_override(config, names) if config.overrides else None
        if entry is not None and "sparsity" in entry:
            result[g.id] = float(entry["sparsity"])
    return result


def allocate(groups: list[ChannelGroup], scores: dict[int, np.ndarray], config: PruneConfig,
             num_channels: int, fixed: dict[int, float] | None = None,
             counts: dict[int, int] | None = None) -> np.ndarray:
    """Boolean keep-mask over channel ids for the configured sparsity, scope and rounding.

    ``fixed`` gives some groups their own ratio (attention heads: ``head_sparsity``), taken of
    ``counts[group]`` units where given (the heads, not the shared K/V channels beside them);
    recipe overrides win over it.
    """
    keep = np.ones(num_channels, dtype=bool)
    sparsity, round_to = config.sparsity or 0.0, config.round_to
    per_group = {**(fixed or {}), **group_overrides(groups, config)}
    removals: dict[int, int] = {}
    if config.scope == "global":
        pool = []
        for g in groups:
            if g.id in per_group:
                continue
            s = scores[g.id]
            if len(s):
                norm = s / (s.mean() if s.mean() > 0 else 1.0)
                pool.extend((float(v), g.id, i) for i, v in enumerate(norm))
        target = round(sparsity * sum(g.channels for g in groups if g.units and g.id not in per_group))
        caps = {g.id: _cap(g, config.max_layer_sparsity) for g in groups}
        chosen: dict[int, int] = {g.id: 0 for g in groups}
        for _, gid, _ in sorted(pool):
            if target <= 0:
                break
            if chosen[gid] < caps[gid]:
                chosen[gid] += 1
                target -= 1
        removals = chosen
    for g in groups:
        if config.scope != "global" or g.id in per_group:
            fraction = per_group.get(g.id, sparsity)
            base = (counts or {}).get(g.id, g.channels) if g.id in (fixed or {}) else g.channels
            removals[g.id] = min(math.floor(fraction * base + 1e-9), _cap(g, 1.0))
    for g in groups:
        n_remove = removals.get(g.id, 0)
        if round_to > 1 and n_remove:
            kept = g.channels - n_remove
            kept = min(g.channels, math.ceil(kept / round_to) * round_to)
            n_remove = max(0, g.channels - kept)
        n_remove = min(n_remove, len(g.units), g.channels - 1)
        if n_remove <= 0:
            continue
        order = np.argsort(scores[g.id], kind="stable")[:n_remove]
        for i in order:
            keep[g.units[i]] = False
    return keep


def head_units(analysis: Analysis, group: ChannelGroup) -> int:
    """How many of the group's removable units are attention heads (0: not a head group)."""
    return sum(1 for ids in group.units if any(int(i) in analysis.head_ids for i in ids)) if analysis.head_ids else 0


def allocate_safe(analysis: Analysis, groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                  config: PruneConfig) -> np.ndarray:
    """:func:`allocate`, then :func:`never_empty`, then restore units until ``round_to`` holds again."""
    per_channel = np.zeros(analysis.num_channels)
    for g in groups:
        for i, ids in enumerate(g.units):
            per_channel[ids] = scores[g.id][i]
    # the share is of the removable heads: not of a shared K/V head's channels beside them (multi-query)
    counts = {g.id: n for g in groups if (n := head_units(analysis, g))}
    heads = dict.fromkeys(counts, config.head_sparsity)
    keep = never_empty(analysis, allocate(groups, scores, config, analysis.num_channels, heads, counts), per_channel)
    if config.round_to > 1:
        for g in groups:
            removed = [i for i, ids in enumerate(g.units) if not keep[ids[0]]]
            removed.sort(key=lambda i: -scores[g.id][i])
            while removed and (g.channels - len(removed)) % config.round_to:
                keep[g.units[removed.pop(0)]] = True
    return keep


def never_empty(analysis: Analysis, keep: np.ndarray, channel_score: np.ndarray | None = None,
                roots: np.ndarray | None = None) -> np.ndarray:
    """Restore channels so that no tensor loses all of them (a Split part, a Concat input...).

    The unit restored is the best-scored one reaching the tensor (``channel_score`` per channel id), else the first.
    ``roots`` (:func:`channel_roots`) saves recomputing the ties when called many times on one analysis.
    """
    roots = channel_roots(analysis) if roots is None else roots
    arrays = [ann.ids for ann in analysis.ann.values()] + [edit.ids for edit in analysis.edits]
    changed = True
    while changed:
        changed = False
        for ids in arrays:
            if len(ids) and not keep[ids].any():
                best = ids[int(np.argmax(channel_score[ids]))] if channel_score is not None else ids[0]
                keep[roots == roots[best]] = True
                changed = True
    return keep


def channel_roots(analysis: Analysis) -> np.ndarray:
    """The tie root of every channel id."""
    return np.array([analysis.find(i) for i in range(analysis.num_channels)], dtype=np.int64)


def _cap(group: ChannelGroup, fraction: float) -> int:
    """Most units a group may lose: at least one channel stays."""
    return max(0, min(len(group.units), math.floor(fraction * group.channels), group.channels - 1))


def remove(analysis: Analysis, keep: np.ndarray) -> None:
    """Physically remove the channels ``keep`` marks False, everywhere they appear."""
    if keep.all():
        return
    apply_removal(analysis, keep)
    remove_dead_nodes(analysis.model)
    refresh_value_info(analysis.model)


def prepare_for_analysis(model: onnx.ModelProto) -> int:
    """In place: fold static run-time size reads and simplify exporter spellings (before any channel analysis).

    The structured pass, the oracle, sensitivity analysis and target allocation all analyse the
    prepared graph, so their group ids agree."""
    changed = fold_static_shape_reads(model) + merge_batched_transposes(model)
    if changed:
        remove_dead_nodes(model)
    return changed


def mask(analysis: Analysis, keep: np.ndarray) -> None:
    """Zero the consumer weight slices that read removed channels: the removal's effect without changing shapes
    (sensitivity measurement; the oracle's masked model)."""
    for edit in analysis.edits:
        if edit.role != "consumer":
            continue
        drop = ~keep[edit.ids]
        if drop.any():
            values = edit.weight.array()
            index = [slice(None)] * values.ndim
            index[edit.axis] = drop
            values[tuple(index)] = 0
            edit.weight.set_array(values)


def describe_groups(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Prunable and frozen groups, for ``onnxprune inspect`` (of the graph as the pass prepares it)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    prepare_for_analysis(copy)
    analysis = analyse(copy, input_shapes)
    groups = build_groups(analysis)
    sub_groups, sub_frozen = subgraph_entries(copy, input_shapes)
    return {
        "groups": [{"id": g.id, "channels": g.channels, "prunable": len(g.units), "ops": g.ops,
                    "producers": [s.node.name for s in g.spaces]} for g in groups if g.units] + sub_groups,
        "frozen": _frozen_entries(groups) + sub_frozen,
    }


def subgraph_entries(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
                     config: PruneConfig | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prunable groups and frozen entries of every If/Loop/Scan subgraph holding layers (each its own scope, see
    :mod:`subgraphs`), on a copy: what ``inspect`` shows and the structured pass would analyse."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    groups, frozen = [], []
    for scope in scopes(copy, input_shapes):
        analysis, scope_groups, why = _analyse_scope(scope, config or PruneConfig(structured=True))
        if analysis is None:
            frozen.append(_scope_frozen(scope, why))
            continue
        groups.extend({"id": f"{scope.where} #{g.id}", "channels": g.channels, "prunable": len(g.units),
                       "ops": g.ops, "producers": [s.node.name for s in g.spaces]} for g in scope_groups if g.units)
        if not any(g.units for g in scope_groups):
            frozen.append(_scope_frozen(scope, _why_nothing(scope_groups)))
        frozen.extend({**f, "id": f"{scope.where} #{f['id']}"} for f in _frozen_entries(scope_groups))
    return groups, frozen


def _analyse_scope(scope: Scope, cfg: PruneConfig) -> tuple[Analysis | None, list[ChannelGroup], str]:
    """Channel groups of one subgraph scope; outer weights that other graphs read too are frozen."""
    if scope.skipped:
        return None, [], scope.skipped
    prepare_for_analysis(scope.wrapper)
    analysis = analyse(scope.wrapper, scope.shapes or None, cfg.exclude, cfg.prune_layernorm, cfg.overrides)
    for edit in analysis.edits:
        if edit.weight.name in scope.shared:
            analysis.freeze(edit.ids, f"outer-scope weight {edit.weight.name!r} is also read outside {scope.where}")
    return analysis, build_groups(analysis), ""


def _why_nothing(groups: list[ChannelGroup]) -> str:
    """Why a scope has no removable unit: its frozen reasons, most frequent first."""
    reasons: dict[str, int] = {}
    for g in groups:
        for _, reason in g.frozen_units:
            reasons[reason] = reasons.get(reason, 0) + 1
    if not reasons:
        return "no layer with a constant weight produces channels here"
    ranked = sorted(reasons, key=lambda r: -reasons[r])
    return ranked[0] + (f" (and {len(ranked) - 1} more reasons)" if len(ranked) > 1 else "")


def _scope_frozen(scope: Scope, why: str) -> dict[str, Any]:
    return {"id": scope.where, "channels": 0, "ops": [], "producers": scope.layers,
            "reason": f"{len(scope.layers)} layer(s) inside the {scope.where} subgraph, none removed: {why}"}


def prune_subgraphs(model: onnx.ModelProto, cfg: PruneConfig, input_shapes: dict[str, list[int]] | None
                    ) -> dict[str, Any]:
    """Structured pruning in every If/Loop/Scan subgraph scope, innermost first. Returns the group stats, frozen
    entries and one line per scope (pruned, or why not)."""
    stats, frozen, lines, total = [], [], [], 0
    criterion = cfg.criterion if cfg.criterion in WEIGHT_CRITERIA else "l1"
    for scope in scopes(model, input_shapes):
        analysis, groups, why = _analyse_scope(scope, cfg)
        if analysis is None:
            frozen.append(_scope_frozen(scope, why))
            lines.append({"subgraph": scope.where, "removed": 0, "reason": why})
            continue
        total += sum(g.channels for g in groups)
        keep = allocate_safe(analysis, groups, unit_scores(analysis, groups, criterion, cfg.seed), cfg)
        scope_stats = StructuredPrunePass._group_stats(analysis, groups, keep,
                                                       node_macs(scope.wrapper, shapes=analysis.shapes))
        frozen.extend({**f, "id": f"{scope.where} #{f['id']}"} for f in _frozen_entries(groups))
        why = "" if not keep.all() else ("the requested share rounds to no unit of its groups"
                                          if any(g.units for g in groups) else _why_nothing(groups))
        if not keep.all():
            remove(analysis, keep)
            why = write_back(scope) or ""
        removed = 0 if why else sum(g["channels_before"] - g["channels_after"] for g in scope_stats)
        if why:
            frozen.append(_scope_frozen(scope, why))
        else:
            stats.extend({**g, "id": f"{scope.where} #{g['id']}", "subgraph": scope.where} for g in scope_stats)
            logger.info("%s: removed %d channels", scope.where, removed)
        lines.append({"subgraph": scope.where, "removed": removed, "reason": why,
                      **({"criterion": criterion} if criterion != cfg.criterion else {})})
    return {"groups": stats, "frozen": frozen, "subgraphs": lines, "channels_total": total}


def _frozen_entries(groups: list[ChannelGroup]) -> list[dict[str, Any]]:
    entries = []
    for g in groups:
        reasons: dict[str, int] = {}
        for _, reason in g.frozen_units:
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, count in reasons.items():
            entries.append({"id": g.id, "channels": count, "ops": g.ops,
                            "producers": [s.node.name for s in g.spaces], "reason": reason})
    return entries


def _reconstruction_layers(analysis: Analysis, keep: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Layers that lose input channels, in graph order, with the mask of their kept output channels."""
    out_masks = {id(e.node): keep[e.ids] for e in analysis.edits if e.role == "producer"}
    layers, seen = [], set()
    for edit in analysis.edits:
        node = edit.node
        if edit.role != "consumer" or id(node) in seen or keep[edit.ids].all():
            continue
        if node.op_type == "Conv" and edit.axis != 1:
            continue  # depthwise: its own output channel goes too
        if node.op_type in ("LSTM", "GRU", "RNN"):
            continue  # no least-squares refit of a recurrence
        seen.add(id(node))
        mask = out_masks.get(id(node))
        if mask is None:
            width = analysis.shape(node.output[0])
            mask = np.ones(int(width[1 if node.op_type != "MatMul" else -1] or 0), dtype=bool) if width else None
        if mask is not None and mask.any():
            layers.append((node.output[0], mask))
    order = {out: i for i, n in enumerate(analysis.model.graph.node) for out in n.output}
    return sorted(layers, key=lambda item: order.get(item[0], 0))


def _largest_share(cfg: PruneConfig) -> float | None:
    """The largest share of a group's channels this configuration can remove, when each group's count follows from
    its own ratio (None for the global scope, where every unit's score counts)."""
    if cfg.scope == "global":
        return None
    shares = [cfg.sparsity or 0.0, cfg.head_sparsity]
    shares.extend(float(entry["sparsity"]) for entry in cfg.overrides if "sparsity" in entry)
    return min(1.0, max(shares))


def _fold_feeds(ctx: PassContext, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Inputs to measure removed channels' values: calibration data, the run's data, else two synthetic batches."""
    if ctx.calibration:
        return list(ctx.calibration)[:8]
    if ctx.feeds:
        feeds = ctx.feeds
        return list(feeds) if isinstance(feeds, list) else [feeds]
    shapes = ctx.input_shapes or {}
    try:
        return [prepare_feeds(model, ValidateConfig(input_shapes=shapes, seed=seed))[0] for seed in (0, 1)]
    except Exception:  # noqa: BLE001 - inputs we cannot synthesise: no folding
        return []


class StructuredPrunePass:
    """Remove the least important channel units of every prunable dependency group."""

    name = "structured"

    def __init__(self, config: PruneConfig):
        self.config = config

    def run(self, ctx: PassContext) -> PassResult:
        cfg = self.config
        shapes = ctx.input_shapes or None
        model = ctx.model
        clock = StageClock()
        with clock.stage("analysis"):
            if not ctx.prepared:  # run alone, without the preparation pass before it
                prepare_for_analysis(model)
            logger.info("analysing channel groups")
            analysis = analyse(model, shapes, cfg.exclude, cfg.prune_layernorm, cfg.overrides)
            groups = build_groups(analysis)
        energy = None
        if cfg.criterion == "activation":
            cfg.require_calibration(bool(ctx.calibration), ("activation",))
            logger.info("measuring channel activations on calibration data")
            inputs = {e.node.input[0]: analysis.ann[e.node.input[0]].axis for e in analysis.edits
                      if e.role == "consumer" and e.node.input[0] in analysis.ann}
            energy = channel_energy(model, ctx.calibration, inputs)
        if cfg.criterion == "reconstruction":
            cfg.require_calibration(bool(ctx.calibration), ("reconstruction",))
            logger.info("choosing channels for least-squares repair on calibration data")
            scores = reconstruction_scores(analysis, groups, list(ctx.calibration)[:16],
                                           stop=_largest_share(cfg), clock=clock)
        else:
            scores = unit_scores(analysis, groups, cfg.criterion, cfg.seed, energy)
        keep = allocate_safe(analysis, groups, scores, cfg)
        macs_before = node_macs(model, shapes, shapes=analysis.shapes)
        params_before = count_params(model)[0]
        group_stats = self._group_stats(analysis, groups, keep, macs_before)
        folded = request = None
        cfg.require_calibration(bool(ctx.calibration), ("reconstruct",))
        if cfg.reconstruct and not keep.all():  # the choice, for the reconstruction pass that follows
            # the model before removal, its large weights held once as arrays (refit.detach_weights), not a proto copy
            original, weights = detach_weights(model)
            request = ReconstructionRequest("structured", original, _reconstruction_layers(analysis, keep), {}, clock,
                                            weights)
        elif cfg.fold_constants and not keep.all():
            logger.info("folding constants of removed channels into consumer biases")
            folded = fold_removed_constants(model, keep, _fold_feeds(ctx, model), shapes, cfg.prune_layernorm,
                                            analysis=analysis)
            if folded["consumers"]:
                analysis = analyse(model, shapes, cfg.exclude, cfg.prune_layernorm, cfg.overrides)
        logger.info("removing channels")
        with clock.stage("removal"):
            remove(analysis, keep)
        with clock.stage("subgraphs"):
            sub = prune_subgraphs(model, cfg, shapes)
        group_stats += sub["groups"]
        macs_after = node_macs(model, shapes, shapes=complete_shapes(model, shapes))
        params_after = count_params(model)[0]
        frozen = _frozen_entries(groups) + sub["frozen"]
        total = sum(g.channels for g in groups) + sub["channels_total"]
        modified = not keep.all() or any(line["removed"] for line in sub["subgraphs"])
        details = {
            "subgraphs": sub["subgraphs"],
            "criterion": cfg.criterion,
            "scope": cfg.scope,
            "target_sparsity": cfg.sparsity,
            "round_to": cfg.round_to,
            "groups": group_stats,
            "head_groups": sum(1 for g in groups if head_units(analysis, g)),
            "frozen": frozen,
            "channels_total": total,
            "channels_removed": int(sum(g["channels_before"] - g["channels_after"] for g in group_stats)),
            "channels_frozen": int(sum(f["channels"] for f in frozen)),
            "params_before": int(params_before),
            "params_after": int(params_after),
            "params_removed": int(params_before - params_after),
            "macs_before": int(sum(macs_before.values())),
            "macs_after": int(sum(macs_after.values())),
            "macs_removed": int(sum(macs_before.values()) - sum(macs_after.values())),
            "folded_constants": folded,
            "reconstruction": None,  # filled by the reconstruction pass
            "stages": clock.as_dict(),
            "approximate_layernorms": sorted(set(analysis.approximations)),
            "layers": [{"node": key, "macs_before": int(value), "macs_after": int(macs_after.get(key, 0))}
                       for key, value in macs_before.items()],
        }
        if request is not None:
            request.details = details
            ctx.reconstruction = request
        return PassResult(modified, details)

    @staticmethod
    def _group_stats(analysis: Analysis, groups: list[ChannelGroup], keep: np.ndarray,
                     macs: dict[str, int]) -> list[dict[str, Any]]:
        """Per group: channels before/after and first-order params/MACs removed."""
        positions = {id(n): i for i, n in enumerate(analysis.model.graph.node)}
        group_of = np.full(analysis.num_channels, -1, dtype=np.int64)
        for g in groups:
            for ids in g.units:
                group_of[ids] = g.id
            for ids, _ in g.frozen_units:
                group_of[ids] = g.id
        params = np.zeros(len(groups))
        macs_removed = np.zeros(len(groups))
        for edit in analysis.edits:
            dropped = ~keep[edit.ids]
            if not dropped.any():
                continue
            per_slice = edit.weight.size / len(edit.ids)
            node_mac = macs.get(node_key(edit.node, positions.get(id(edit.node), -1)), 0)
            for gid, count in zip(*np.unique(group_of[edit.ids[dropped]], return_counts=True)):
                params[gid] += per_slice * count
                if edit.role != "param":
                    macs_removed[gid] += node_mac * count / len(edit.ids)
        stats = []
        for g in groups:
            if not g.units:
                continue
            removed = sum(1 for ids in g.units if not keep[ids[0]])
            stats.append({
                "id": g.id,
                "channels_before": g.channels,
                "channels_after": g.channels - removed,
                "params_removed": int(params[g.id]),
                "macs_removed": int(macs_removed[g.id]),
                "ops": g.ops,
                "producers": [s.node.name for s in g.spaces],
                "frozen_channels": len(g.frozen_units),
                "heads": head_units(analysis, g),  # attention heads among its units (report: width vs heads)
                "removed_channels": _removed_channels(g, keep),
            })
        return stats


def _removed_channels(group: ChannelGroup, keep: np.ndarray) -> dict[str, list[int]]:
    """Producer name -> the output channels it lost (positions in the original producer's output)."""
    removed: dict[str, list[int]] = {}
    for space in group.spaces:
        lost = np.flatnonzero(~keep[space.start:space.start + space.size])
        if len(lost):
            removed[space.node.name or space.node.output[0]] = [int(i) for i in lost]
    return removed
