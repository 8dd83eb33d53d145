"""Sensitivity analysis and automatic per-group ratios (``onnxprune sensitivity``, ``--target-macs``,
structured pruning with calibration data).

Each prunable channel group is pruned *alone* at several ratios and the model's outputs are
compared with the original's on the given inputs (and top-1 accuracy when labels exist).
From those measured curves, :func:`allocate_for_target` picks per-group ratios that reach a
MAC (or parameter) target while losing the least fidelity, greedily, then checks the target
on the actually pruned model. :func:`measure_masked` is the cheap form used by default with
calibration data: one analysis, each point a masked copy of the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import onnx

from .analysis.cost import node_key, node_macs, total_macs
from .analysis.groups import Analysis, analyse, build_groups
from .calibration import StageClock
from .config import PruneConfig
from .errors import UsageError
from .graph import count_params
from .heap import heap_bounded
from .passes.structured import allocate_safe, channel_roots, head_units, mask, never_empty, remove
from .plan_macs import plan_macs
from .probe import Probe, Refit, Savings, fed_consumers, run_model
from .scoring import unit_scores
from .stored_weights import StoredWeights

logger = logging.getLogger(__name__)

DEFAULT_RATIOS = (0.25, 0.5, 0.75)


_run = run_model


def _rel_error(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    num = den = 0.0
    for ref_outs, cand_outs in zip(reference, candidate):
        for a, b in zip(ref_outs, cand_outs):
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            num += float(np.sum((a64 - b64) ** 2))
            den += float(np.sum(a64 ** 2))
    return (num / den) ** 0.5 if den > 0 else 0.0


def _top1(outputs: list[list[np.ndarray]], labels: np.ndarray | None) -> float | None:
    if labels is None:
        return None
    logits = np.concatenate([outs[0].reshape(outs[0].shape[0], -1) for outs in outputs])
    return float(np.mean(logits.argmax(axis=1) == labels[:len(logits)]))


def prune_groups(model: onnx.ModelProto, ratios: dict[int, float], config: PruneConfig,
                 input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with each group in ``ratios`` losing that share of its lowest-scored units."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    analysis = analyse(copy, input_shapes, config.exclude, config.prune_layernorm)
    remove(analysis, _ratio_keep(analysis, ratios, config))
    return copy


def pruned_macs(model: onnx.ModelProto, ratios: dict[int, float], config: PruneConfig,
                input_shapes: dict[str, list[int]] | None = None) -> int:
    """``total_macs(prune_groups(model, ratios, config, input_shapes))``, counted by :func:`_macs_left`."""
    return _macs_left(model, input_shapes, (config.exclude, config.prune_layernorm),
                      lambda analysis: _ratio_keep(analysis, ratios, config))


def _macs_left(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None, settings: tuple,
               choose: Callable[[Analysis], np.ndarray]) -> int:
    """MACs of ``model`` once the channels ``choose(analysis)`` marks False are removed (``settings``: the analysis's
    exclude, prune_layernorm and overrides), counted without a pruned copy of the weights
    (:func:`~onnxprune.plan_macs.plan_macs`) where that is exact, else on a pruned copy."""
    analysis = analyse(model, input_shapes, *settings)  # reads the model only
    counted = plan_macs(model, analysis, choose(analysis), input_shapes, *settings)
    if counted is not None:
        return counted
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    analysis = analyse(copy, input_shapes, *settings)
    remove(analysis, choose(analysis))
    return total_macs(copy, input_shapes)


def _ratio_keep(analysis: Analysis, ratios: dict[int, float], config: PruneConfig) -> np.ndarray:
    """The channels kept when each group in ``ratios`` loses that share of its lowest-scored (data-free) units."""
    groups = {g.id: g for g in build_groups(analysis)}
    scores = unit_scores(analysis, list(groups.values()), _data_free(config), config.seed)
    keep = np.ones(analysis.num_channels, dtype=bool)
    for gid, ratio in ratios.items():
        group = groups[gid]
        n = min(int(np.floor(ratio * group.channels + 1e-9)), len(group.units), group.channels - 1)
        for i in np.argsort(scores[gid], kind="stable")[:max(n, 0)]:
            keep[group.units[i]] = False
    return never_empty(analysis, keep)


def _data_free(config: PruneConfig) -> str:
    """The criterion sensitivity points rank units by: the configured one when it needs no data, else L1."""
    return config.criterion if config.criterion in ("l1", "l2", "bn", "random") else "l1"


def uniform_macs(model: onnx.ModelProto, config: PruneConfig,
                 input_shapes: dict[str, list[int]] | None = None) -> int:
    """MACs left by the uniform plan of ``config`` (its sparsity in every group, heads at their own ratio);
    which units go does not change the count, so data-free scores stand in for the configured criterion. Counted
    without a pruned copy of the weights (:func:`~onnxprune.plan_macs.plan_macs`) where that is exact."""
    def choose(analysis: Analysis) -> np.ndarray:
        groups = build_groups(analysis)
        return allocate_safe(analysis, groups, unit_scores(analysis, groups, _data_free(config), config.seed), config)

    return _macs_left(model, input_shapes, (config.exclude, config.prune_layernorm, config.overrides), choose)


def around(sparsity: float) -> tuple[float, ...]:
    """The ratios measured for an allocation around a uniform ``sparsity``: half, once, 1.5x and twice it
    (capped at 0.875), so a fragile group can stay near zero and a robust one take twice its share."""
    return tuple(sorted({round(min(0.875, f * sparsity), 4) for f in (0.5, 1.0, 1.5, 2.0)}))


def measure_masked(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], config: PruneConfig,
                   ratios: tuple[float, ...], input_shapes: dict[str, list[int]] | None = None,
                   fit_feeds: list[dict[str, np.ndarray]] | None = None,
                   clock: StageClock | None = None, stored: StoredWeights | None = None
                   ) -> tuple[dict[str, Any], MacEstimate]:
    """:func:`measure` from a single analysis: each point zeroes the consumer weight slices that read the
    group's dropped units (the oracle's masked model, whose outputs equal the removed model's without
    compensation) and runs it; MACs and params saved are counted from the weight edits. Attention-head
    groups are left out (they follow ``head_sparsity``). Cost: one onnxruntime run per group and ratio.

    With ``config.reconstruct`` the consumers' input Gram matrices are captured once (on ``fit_feeds``, default
    ``feeds``: samples apart from those judged keep a refit on few samples from looking better than it is); each
    point then refits the group's consumers by least squares from them (exact for a group pruned alone: its
    consumers' inputs are the original's). Units go in data-free order (L1 unless the criterion is one): the
    greedy order of the ``reconstruction`` criterion would cost as much as the pass's own selection.
    Returns the measurements and a :class:`MacEstimate` over the same unit order. ``clock`` times the stages:
    reference (the original's outputs, which the downstream probe's capture run gives with the tensors entering
    each group's downstream part; else a run of their own), analysis, capture and gram (the refit's Grams), refit
    and probe (the points' refits and onnxruntime runs). ``stored``: where ``model``'s weights lie in its files
    (the probe's sessions read unchanged weights there, :mod:`~onnxprune.stored_weights`)."""
    clock = clock or StageClock()
    reference = None
    with clock.stage("analysis"):
        analysis = analyse(model, input_shapes, config.exclude, config.prune_layernorm, config.overrides)
    if not fed_consumers(analysis):  # points write the model's weights: they write a copy's (and no downstream
        with clock.stage("reference"):  # capture runs the original: its outputs come from a run of their own)
            reference = _run(model, feeds)
        with clock.stage("analysis"):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            analysis = analyse(copy, input_shapes, config.exclude, config.prune_layernorm, config.overrides)
    with clock.stage("analysis"):
        every = build_groups(analysis)
        heads = [g.id for g in every if g.units and head_units(analysis, g)]
        groups = [g for g in every if g.units and g.id not in heads]
        scores = unit_scores(analysis, groups, _data_free(config), config.seed)
    planned = _plan_points(analysis, groups, scores, ratios)
    refit, low = None, heap_bounded()
    if config.reconstruct and not low:  # the Grams first: the probe's capture run then reuses the heap they freed
        with clock.stage("gram"):
            refit = Refit(analysis, fit_feeds or feeds, clock=clock)
    with clock.stage("reference"):  # the tensors entering each group's downstream part, and the outputs, from one
        probe = Probe(analysis, feeds, [set().union(*(probe_touched(analysis, keep) for _, _, keep in points))
                                        for _, points in planned], clock, stored)  # run of the original
        if reference is None:
            reference = probe.reference()
        if reference is None:
            reference = _run(model, feeds)
    if config.reconstruct and low:  # with the heap bounded (``--low-memory``) the Grams come after the probe's
        with clock.stage("gram"):  # capture run (its peak before they are held), per window of groups, and read
            refit = Refit(analysis, fit_feeds or feeds, clock=clock,  # the probe's weight arrays
                          originals=getattr(probe, "weights", None), points=[[k for *_, k in p] for _, p in planned])
    last = _last_refits(refit, planned)
    macs = node_macs(analysis.model, shapes=analysis.shapes)
    savings = Savings(analysis, every, macs)
    rows, evaluations = [], 0
    for index, (group, points) in enumerate(planned):
        logger.info("group %d/%d: %s", index + 1, len(groups), ", ".join(s.node.name for s in group.spaces)[:60])
        measured = []
        if refit is not None:
            refit.enter(index)
            refit.plan([keep for _, _, keep in points])
        for ratio, n, keep in points:
            macs_saved, params_saved = savings(keep)
            outputs = probe.outputs(keep, partial(_change, analysis, refit, keep), index)
            evaluations += 1
            measured.append({"ratio": ratio, "channels_removed": n, "rel_l2": _rel_error(reference, outputs),
                             "top1": None, "macs_saved": macs_saved, "params_saved": params_saved})
        probe.done(index)
        if refit is not None:
            refit.forget(last.get(index, ()))
        if measured:
            rows.append({"id": group.id, "producers": [s.node.name for s in group.spaces],
                         "channels": group.channels, "prunable": len(group.units), "points": measured})
    return {"macs": total_macs(model, input_shapes), "params": count_params(model)[0], "ratios": list(ratios),
            "top1": None, "groups": rows, "head_groups": heads, "evaluations": evaluations}, \
        MacEstimate(analysis, groups, scores, macs)


def _plan_points(analysis: Analysis, groups: list, scores: dict[int, np.ndarray], ratios: tuple[float, ...]
                 ) -> list[tuple[Any, list[tuple[float, int, np.ndarray]]]]:
    """Per group, its points: (ratio, units removed, channels kept), the lowest-scored units first; a ratio that
    removes no unit, or the same units as the point before, is not measured."""
    planned, roots = [], channel_roots(analysis)
    for group in groups:
        order = np.argsort(scores[group.id], kind="stable")
        points: list[tuple[float, int, np.ndarray]] = []
        for ratio in ratios:
            n = max(0, min(int(np.floor(ratio * group.channels + 1e-9)), len(group.units), group.channels - 1))
            if n == (points[-1][1] if points else 0):
                continue
            keep = np.ones(analysis.num_channels, dtype=bool)
            for i in order[:n]:
                keep[group.units[i]] = False
            points.append((ratio, n, never_empty(analysis, keep, roots=roots)))
        planned.append((group, points))
    return planned


def _last_refits(refit: Refit | None, planned: list) -> dict[int, list[str]]:
    """Group index -> the refit's consumers whose last refitting point is one of that group's."""
    last: dict[str, int] = {}
    for index, (_, points) in enumerate(planned):
        for key, (*_, feature_ids) in (refit.consumers.items() if refit is not None else ()):
            if any(not keep[feature_ids].all() for _, _, keep in points):
                last[key] = index
    found: dict[int, list[str]] = {}
    for key, index in last.items():
        found.setdefault(index, []).append(key)
    return found


def probe_touched(analysis: Analysis, keep: np.ndarray) -> set[str]:
    """The consumer weights whose slices ``keep`` drops (those a point masks and refits)."""
    return {e.weight.name for e in analysis.edits if e.role == "consumer" and not keep[e.ids].all()}


def _change(analysis: Analysis, refit: Refit | None, keep: np.ndarray) -> None:
    """A point's weight change: the consumers' slices of the dropped channels zeroed, then refitted."""
    mask(analysis, keep)
    if refit is not None:
        refit.apply(keep)


def costliest(sensitivity: dict[str, Any], ratio: float) -> dict[str, Any] | None:
    """The group whose removal alone at the measured ratio nearest ``ratio`` loses most fidelity: the layer that
    limits how far the model can be pruned."""
    found = None
    for group in sensitivity["groups"]:
        point = min(group["points"], key=lambda p: abs(p["ratio"] - ratio))
        if found is None or point["rel_l2"] > found["rel_l2"]:
            found = {"id": group["id"], "producers": group["producers"], "ratio": point["ratio"],
                     "rel_l2": point["rel_l2"]}
    return found


class MacEstimate:
    """MACs left when groups lose their lowest-scored units, from one analysis: each layer's MACs times the kept
    share of every axis its weight edits cut (Conv, Gemm, MatMul against weights). Attention-head groups and
    MatMuls between activations are not modelled: the caller checks the result on a really pruned model."""

    def __init__(self, analysis: Analysis, groups: list, scores: dict[int, np.ndarray], macs: dict[str, int]):
        positions = {id(n): i for i, n in enumerate(analysis.model.graph.node)}
        axes: dict[str, dict[int, list[np.ndarray]]] = {}
        for edit in analysis.edits:
            key = node_key(edit.node, positions.get(id(edit.node), -1))
            if edit.role != "param" and key in macs:
                axes.setdefault(key, {}).setdefault(edit.axis, []).append(edit.ids)
        self.terms = [(macs[key], [np.unique(np.concatenate(ids)) for ids in cut.values()])
                      for key, cut in axes.items()]
        self.rest = sum(macs.values()) - sum(macs[key] for key in axes)
        self.groups = {g.id: g for g in groups}
        self.orders = {g.id: np.argsort(scores[g.id], kind="stable") for g in groups}
        self.channels = analysis.num_channels

    def __call__(self, ratios: dict[int, float]) -> float:
        keep = np.ones(self.channels, dtype=bool)
        for gid, ratio in ratios.items():
            group = self.groups.get(gid)
            if group is None:
                continue
            n = max(0, min(int(np.floor(ratio * group.channels + 1e-9)), len(group.units), group.channels - 1))
            for i in self.orders[gid][:n]:
                keep[group.units[i]] = False
        return self.rest + sum(m * float(np.prod([keep[ids].mean() for ids in cut])) for m, cut in self.terms)


def measure(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], config: PruneConfig,
            ratios: tuple[float, ...] = DEFAULT_RATIOS, labels: np.ndarray | None = None,
            input_shapes: dict[str, list[int]] | None = None,
            include_heads: bool = True) -> dict[str, Any]:
    """Prune each group alone at each ratio; fidelity, MACs and params of every point.

    ``include_heads=False`` leaves attention-head groups out (their ratio is ``--head-sparsity``);
    their ids are listed under ``head_groups`` either way."""
    reference = _run(model, feeds)
    base_macs, base_params = total_macs(model, input_shapes), count_params(model)[0]
    analysis = analyse(model, input_shapes, config.exclude, config.prune_layernorm)
    groups = [g for g in build_groups(analysis) if g.units]
    heads = [g.id for g in groups if head_units(analysis, g)]
    if heads and not include_heads:  # heads follow --head-sparsity, not the allocation
        groups = [g for g in groups if g.id not in heads]
    rows = []
    for number, group in enumerate(groups, 1):
        logger.info("group %d/%d: %s", number, len(groups), ", ".join(s.node.name for s in group.spaces)[:60])
        points = []
        for ratio in ratios:
            pruned = prune_groups(model, {group.id: ratio}, config, input_shapes)
            outputs = _run(pruned, feeds)
            points.append({
                "ratio": ratio,
                "channels_removed": min(int(np.floor(ratio * group.channels + 1e-9)), len(group.units)),
                "rel_l2": _rel_error(reference, outputs),
                "top1": _top1(outputs, labels),
                "macs_saved": base_macs - total_macs(pruned, input_shapes),
                "params_saved": base_params - count_params(pruned)[0],
            })
        rows.append({"id": group.id, "producers": [s.node.name for s in group.spaces], "channels": group.channels,
                     "prunable": len(group.units), "points": points})
    return {"macs": base_macs, "params": base_params, "ratios": list(ratios), "top1": _top1(reference, labels),
            "groups": rows, "head_groups": heads}


def allocate_for_target(model: onnx.ModelProto, sensitivity: dict[str, Any], config: PruneConfig, *,
                        target_macs: float | None = None, target_params: float | None = None,
                        input_shapes: dict[str, list[int]] | None = None,
                        macs_left: Callable[[dict[int, float]], float] | None = None) -> dict[int, float]:
    """Per-group ratios reaching ``target_*`` (fraction of the original kept) at the least measured loss.

    ``macs_left`` (ratios -> MACs left, e.g. a :class:`MacEstimate`) replaces pruning a copy for every check."""
    key, base = ("macs_saved", sensitivity["macs"]) if target_macs is not None else ("params_saved", sensitivity["params"])
    target = target_macs if target_macs is not None else target_params
    needed = (1.0 - target) * base
    chosen: dict[int, int] = {}  # group id -> index into its points (-1: untouched)
    groups = {g["id"]: g for g in sensitivity["groups"]}
    last: int | None = None

    pinned = {gid: config.head_sparsity for gid in sensitivity.get("head_groups", []) if gid not in groups}

    def measure_cost(candidate: dict[int, float]) -> float:
        if macs_left is not None:
            return macs_left({**pinned, **candidate})
        pruned = prune_groups(model, {**pinned, **candidate}, config, input_shapes)
        return total_macs(pruned, input_shapes) if target_macs is not None else count_params(pruned)[0]

    if any(pinned.values()):  # heads removed at --head-sparsity count toward the target
        needed -= base - measure_cost({})

    for _ in range(8):  # the savings of groups interact (a conv loses inputs and outputs): re-check and go on
        saved = sum(groups[g]["points"][i][key] for g, i in chosen.items())
        while saved < needed:
            best, best_cost = None, None
            for gid, group in groups.items():
                i = chosen.get(gid, -1) + 1
                if i >= len(group["points"]):
                    continue
                prev = group["points"][i - 1] if i > 0 else {"rel_l2": 0.0, key: 0, "top1": sensitivity.get("top1")}
                gain = group["points"][i][key] - prev[key]
                if gain <= 0:
                    continue
                cost = (_loss(group["points"][i], sensitivity) - _loss(prev, sensitivity)) / gain
                if best_cost is None or cost < best_cost:
                    best, best_cost = gid, cost
            if best is None:
                break
            chosen[best] = chosen.get(best, -1) + 1
            last = best
            saved = sum(groups[g]["points"][i][key] for g, i in chosen.items())
        ratios = {gid: groups[gid]["points"][i]["ratio"] for gid, i in chosen.items()}
        actual = measure_cost(ratios)
        if actual <= target * base * 1.02 or all(chosen.get(g, -1) + 1 >= len(groups[g]["points"]) for g in groups):
            return _refine(ratios, last, groups, chosen, measure_cost, target * base)
        needed += actual - target * base  # the estimate was optimistic: ask for the difference
    return ratios


def _loss(point: dict[str, Any], sensitivity: dict[str, Any]) -> float:
    """What a point costs: the fidelity it loses (relative L2 of the outputs); lost top-1, when labels
    were given, only breaks ties. Top-1 on a few hundred labels moves in steps of one sample and
    picked worse allocations than the smooth fidelity measure on the trained CNN (docs/benchmarks.md)."""
    if sensitivity.get("top1") is not None and point.get("top1") is not None:
        return point["rel_l2"] + 0.01 * (sensitivity["top1"] - point["top1"])
    return point["rel_l2"]


def _refine(ratios: dict[int, float], last: int | None, groups: dict[int, Any], chosen: dict[int, int],
            measure_cost: Callable[[dict[int, float]], float], budget: float) -> dict[int, float]:
    """Lower the last group's ratio (bisection on the measured cost) so the target is met, not overshot."""
    if last is None:
        return ratios
    i = chosen[last]
    low = groups[last]["points"][i - 1]["ratio"] if i > 0 else 0.0
    high = ratios[last]
    for _ in range(6):
        mid = (low + high) / 2
        if measure_cost({**ratios, last: mid}) <= budget:
            high = mid
        else:
            low = mid
    return _give_back({**ratios, last: high}, groups, measure_cost, budget)


def _give_back(ratios: dict[int, float], groups: dict[int, Any], measure_cost: Callable[[dict[int, float]], float],
               budget: float, tries: int = 24) -> dict[int, float]:
    """Channel counts move in whole units, so the refined allocation can undershoot the target: give single
    channels back (the most sensitive groups first) while the measured cost stays within the budget, then
    trade one channel of one group for one of another while that lands closer to the budget without raising
    the estimated fidelity loss."""
    order = sorted(ratios, key=lambda g: -max((p["rel_l2"] for p in groups[g]["points"]), default=0.0))
    changed = True
    while changed and tries > 0:
        changed = False
        for gid in order:
            step = 1.0 / max(1, groups[gid]["channels"])
            if ratios[gid] < step or tries <= 0:
                continue
            candidate = {**ratios, gid: max(0.0, ratios[gid] - step)}
            tries -= 1
            if measure_cost(candidate) <= budget:
                ratios, changed = candidate, True
    # then swaps: one channel back in one group, one more out of another, when that lands closer to the budget
    current = measure_cost(ratios)
    everyone = order + [g for g in groups if g not in ratios]
    pairs = [(back, out) for back in everyone for out in everyone if back != out]
    improved = True
    while improved and tries > 0:
        improved = False
        for back, out in pairs:
            if tries <= 0 or ratios.get(back, 0.0) <= 0:
                continue
            step_back, step_out = (1.0 / max(1, groups[g]["channels"]) for g in (back, out))
            if ratios.get(out, 0.0) + step_out >= 1.0:
                continue
            candidate = {**ratios, back: max(0.0, ratios[back] - step_back), out: ratios.get(out, 0.0) + step_out}
            if _estimated_loss(candidate, groups) > _estimated_loss(ratios, groups):
                continue  # closer to the target only at a fidelity cost: keep the allocation
            tries -= 1
            cost = measure_cost(candidate)
            if current < cost <= budget:
                ratios, current, improved = candidate, cost, True
    return ratios


def _estimated_loss(ratios: dict[int, float], groups: dict[int, Any]) -> float:
    """Summed relative L2 of the groups at these ratios, interpolated between their measured points."""
    total = 0.0
    for gid, ratio in ratios.items():
        points = groups[gid]["points"]
        total += float(np.interp(ratio, [0.0] + [p["ratio"] for p in points], [0.0] + [p["rel_l2"] for p in points]))
    return total


def render(sensitivity: dict[str, Any]) -> str:
    """A table: one row per group, rel. L2 error (and top-1) at each ratio."""
    ratios = sensitivity["ratios"]
    head = f"{'group':>5}  {'channels':>8}  " + "  ".join(f"{'r=' + str(r):>10}" for r in ratios) + "  producers"
    lines = [f"original: MACs {sensitivity['macs']:,}, params {sensitivity['params']:,}"
             + (f", top-1 {100 * sensitivity['top1']:.2f}%" if sensitivity.get("top1") is not None else ""),
             "relative L2 error of the outputs with one group pruned alone" +
             (" (top-1 in brackets)" if sensitivity.get("top1") is not None else ""), head]
    for g in sensitivity["groups"]:
        cells = []
        for p in g["points"]:
            cell = f"{p['rel_l2']:.4f}" + (f" ({100 * p['top1']:.0f}%)" if p["top1"] is not None else "")
            cells.append(f"{cell:>10}")
        lines.append(f"{g['id']:>5}  {g['channels']:>8}  " + "  ".join(cells) + "  " + ", ".join(g["producers"])[:60])
    return "\n".join(lines)


def plot(sensitivity: dict[str, Any], path: str) -> None:
    """PNG: error against ratio, one line per group (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for g in sensitivity["groups"]:
        ax.plot([p["ratio"] for p in g["points"]], [p["rel_l2"] for p in g["points"]], marker="o", linewidth=1,
                label=f"{g['id']}: {g['producers'][0][:24]}")
    ax.set_xlabel("share of the group's channels removed")
    ax.set_ylabel("relative L2 error of the outputs")
    ax.set_title("onnxprune sensitivity (each group pruned alone)")
    ax.grid(alpha=0.3)
    if len(sensitivity["groups"]) <= 16:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
