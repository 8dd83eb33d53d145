"""Per-group ratios for structured pruning: a MAC or parameter target met by measured sensitivity, or the uniform
plan's MACs spread over the groups by sensitivity when calibration data is given (``prune`` runs the result as
recipe overrides on a new config)."""

from __future__ import annotations

import glob
import logging
import time
from dataclasses import replace
from typing import Any

import onnx

from .accuracy import load_eval_data
from .analysis.cost import total_macs
from .calibration import StageClock
from .config import PruneConfig, ValidateConfig
from .feeds import batch_axes, input_specs, prepare_feeds, sample_count, take_samples
from .passes.structured import prepare_for_analysis
from .sensitivity import allocate_for_target, around, costliest, measure, measure_masked, pruned_macs, uniform_macs
from .stored_weights import StoredWeights

logger = logging.getLogger(__name__)


def _as_batches(feed) -> list[dict]:
    """Validation feeds as a list of feed dicts (``--data`` for a one-sample model is already split)."""
    return list(feed) if isinstance(feed, list) else [feed]


def allocate_to_target(model: onnx.ModelProto, config: PruneConfig, calibration, vcfg: ValidateConfig, feeds,
                         shapes: dict[str, list[int]]) -> tuple[PruneConfig, dict[str, Any]]:
    """Measure each group's sensitivity, pick per-group ratios for the target; a new config carries them as
    overrides (the given one is not changed)."""
    prepare_for_analysis(model)  # what the structured pass analyses, so group ids and heads agree

    samples = list(calibration or [])[:4] or (
        _as_batches(feeds[0]) if feeds else [prepare_feeds(model, replace(vcfg, input_shapes=shapes))[0]])
    labels = None
    if vcfg.eval_data:  # with labels, lost top-1 breaks ties between equally faithful allocations
        inputs, labels = load_eval_data(vcfg.eval_data, input_specs(model))
        samples = [{name: arr[:256] for name, arr in inputs.items()}]
        labels = labels[:256]
    logger.info("measuring each group's sensitivity for the target")
    sens = measure(model, samples, config, ratios=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875), labels=labels,
                   input_shapes=shapes, include_heads=False)
    ratios = allocate_for_target(model, sens, config, target_macs=config.target_macs,
                                 target_params=config.target_params, input_shapes=shapes)
    by_id = {g["id"]: g for g in sens["groups"]}
    planned = replace(config, overrides=_ratio_overrides(ratios, by_id) + list(config.overrides), sparsity=0.0)
    return planned, {"method": "sensitivity", "target_macs": config.target_macs,
                     "target_params": config.target_params,
                     "ratios": [{"producers": by_id[gid]["producers"], "ratio": ratio}
                                for gid, ratio in ratios.items()],
                     "sensitivity": sens}


def _ratio_overrides(ratios: dict[int, float], groups: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-group ratios as recipe overrides matching each group's first named producer (glob characters in
    the name escaped)."""
    overrides = []
    for gid, ratio in ratios.items():
        name = next((n for n in groups[gid]["producers"] if n), None)
        if name is not None:
            overrides.append({"match": glob.escape(name), "sparsity": ratio})
    return overrides


MEASURE_SAMPLES = 4  # calibration samples the default allocation measures fidelity on (taken from the front)
FIT_SAMPLES = 32  # the next ones: the Gram matrices its refit in the loop solves with (--reconstruct)


def _uniform_reason(config: PruneConfig, calibration) -> str | None:
    """Why ``--structured --sparsity`` keeps uniform ratios (None: allocate by measured sensitivity)."""
    if config.uniform:
        return "asked for"
    if not calibration:
        return "no calibration data"
    if config.overrides:
        return "per-layer overrides fix the ratios"
    if config.scope == "global":
        return "global scope ranks channels across groups"
    return None


def default_allocation(model: onnx.ModelProto, config: PruneConfig, calibration, shapes: dict[str, list[int]],
                       stored: StoredWeights | None = None) -> tuple[PruneConfig, dict[str, Any]]:
    """With calibration data: the MACs the uniform plan removes, spread over the groups by measured sensitivity.

    Each group is measured alone at four ratios around the sparsity (masked weights, one analysis, one onnxruntime
    run per point on at most ``MEASURE_SAMPLES`` calibration samples); the greedy target allocation then reaches
    the uniform plan's MACs. ``stored``: where the model's weights lie in its files (the probe's sessions read
    them there). Returns the config to run (a new one) and the report's ``allocation``."""
    reason = _uniform_reason(config, calibration)
    if reason is not None:
        return config, {"method": "uniform", "reason": reason}
    start = time.perf_counter()
    prepare_for_analysis(model)
    target = uniform_macs(model, config, shapes)
    base = total_macs(model, shapes)
    samples = _samples(model, list(calibration), 0, MEASURE_SAMPLES)
    # the refit in the loop learns from other samples than those it is judged on (else few samples overfit)
    fit = _samples(model, list(calibration), MEASURE_SAMPLES, MEASURE_SAMPLES + FIT_SAMPLES) or samples
    logger.info("measuring each group's sensitivity on calibration data")
    clock = StageClock()
    sens, estimate = measure_masked(model, samples, config, around(config.sparsity), input_shapes=shapes,
                                    fit_feeds=fit, clock=clock, stored=stored)
    if not sens["groups"] or base <= 0 or target >= base:
        return config, {"method": "uniform", "reason": "nothing to allocate: no prunable group loses MACs"}
    exact = bool(sens["head_groups"]) and config.head_sparsity > 0  # heads: the estimate does not model them
    ratios = allocate_for_target(model, sens, config, target_macs=target / base, input_shapes=shapes,
                                 macs_left=None if exact else estimate)
    if not exact:  # the estimate, checked once on a really pruned copy; an overshoot is asked back
        planned_macs = pruned_macs(model, ratios, config, shapes)
        if planned_macs > target + 0.002 * base:
            ratios = allocate_for_target(model, sens, config, target_macs=(2 * target - planned_macs) / base,
                                         input_shapes=shapes, macs_left=estimate)
    by_id = {g["id"]: g for g in sens["groups"]}
    every = {gid: ratios.get(gid, 0.0) for gid in by_id}  # groups left whole are pinned at 0, not at the sparsity
    planned = replace(config, overrides=_ratio_overrides(every, by_id))
    seconds = time.perf_counter() - start
    axes = batch_axes(input_specs(model))
    return planned, {"method": "sensitivity", "groups_measured": len(sens["groups"]),
                     "evaluations": sens["evaluations"], "samples": sum(sample_count(s, axes) for s in samples),
                     "seconds": round(seconds, 3), "stages": clock.as_dict(),
                     "target_macs": round(target / base, 6), "uniform_macs": int(target),
                     "costliest": costliest(sens, config.sparsity),
                     "ratios": [{"producers": by_id[gid]["producers"], "ratio": ratio} for gid, ratio in every.items()],
                     "sensitivity": sens}


def _samples(model: onnx.ModelProto, batches: list[dict], start: int, stop: int) -> list[dict]:
    """Samples ``start`` to ``stop`` of the calibration batches, cut along each input's sample axis: views of the
    batches (no second copy of the calibration data while the measurement runs)."""
    axes = batch_axes(input_specs(model))
    taken, first = [], 0
    for batch in batches:
        count = sample_count(batch, axes)
        lo, hi = max(start - first, 0), min(stop - first, count)
        first += count
        if hi <= lo:
            continue
        taken.append(take_samples(batch, axes, lo, hi))
    return taken
