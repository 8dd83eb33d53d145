"""``--target-macs`` with depth: removing whole residual blocks weighed against width ratios by measured cost per MAC
saved, then width for the rest of the target.

``--drop-blocks N`` / ``--depth-sparsity S`` give the most blocks that may go. Each removable block is removed alone
on a copy and measured on calibration data (relative L2 error of the outputs, MACs saved); each width group is
measured at several ratios (masked weights, as the default allocation does). One greedy pass over both kinds of
step, the cheapest loss per MAC saved first, decides which blocks go: a block taken replaces the width steps already
taken inside it. The chosen blocks are then removed from a copy and the existing width allocation reaches the rest of
the target on it, so the MACs kept are those of the pipeline (depth, then width) and stay within the target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import onnx

from .allocation import MEASURE_SAMPLES, allocate_to_target
from .analysis.blocks import ResidualBlock, find_blocks
from .analysis.cost import total_macs
from .config import PruneConfig, ValidateConfig
from .passes.depth import blocks_to_drop, remove_blocks
from .passes.structured import prepare_for_analysis
from .sensitivity import _rel_error, _run, measure_masked
from .shapes import refresh_value_info
from .stored_weights import StoredWeights

logger = logging.getLogger(__name__)

WIDTH_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


@dataclass
class Step:
    """One candidate of the greedy: a width group's next ratio or a whole block, with what it adds."""

    kind: str  # "width" or "block"
    key: int  # group id or block index
    loss: float  # added relative L2 error of the outputs
    macs: float  # added MACs saved

    @property
    def cost(self) -> float:
        return self.loss / self.macs


@dataclass
class Choice:
    """The greedy's state: the point taken in each width group, the blocks taken, the steps in order."""

    points: dict[int, int] = field(default_factory=dict)  # group id -> index of its point taken
    blocks: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)  # groups inside a block taken: no more width steps there


def allocate_with_depth(model: onnx.ModelProto, config: PruneConfig, calibration, vcfg: ValidateConfig, feeds,
                        shapes: dict[str, list[int]], stored: StoredWeights | None = None
                        ) -> tuple[PruneConfig, dict[str, Any]]:
    """Choose the blocks to remove by cost per MAC saved against width, then per-group ratios for the rest of
    ``config.target_macs``; returns the config to run (blocks named in ``blocks_chosen``, ratios as overrides) and
    the report's ``allocation``. ``stored``: where the model's weights lie in its files (for the width probe)."""
    prepare_for_analysis(model)  # what the depth and structured passes analyse
    base = total_macs(model, shapes)
    samples = list(calibration)[:MEASURE_SAMPLES]
    blocks = find_blocks(model, shapes).blocks
    limit = min(blocks_to_drop(config, len(blocks)), len(blocks))
    logger.info("measuring %d residual block(s) removed alone", len(blocks))
    measured = measure_blocks(model, blocks, samples, shapes)
    logger.info("measuring each group's sensitivity against the blocks")
    sens, _ = measure_masked(model, samples, config, WIDTH_RATIOS, input_shapes=shapes, stored=stored)
    inside = groups_inside(blocks, sens["groups"])
    choice = choose(measured, sens["groups"], inside, (1.0 - config.target_macs) * base, limit)
    chosen = sorted(choice.blocks)
    slim = onnx.ModelProto()
    slim.CopyFrom(model)
    if chosen:
        remove_blocks(slim, [blocks[i] for i in chosen])
        refresh_value_info(slim)
    after = total_macs(slim, shapes)
    planned = replace(config, blocks_chosen=[blocks[i].output for i in chosen], sparsity=0.0)
    width: dict[str, Any] = {"ratios": []}
    if after > config.target_macs * base:
        rest = replace(config, target_macs=config.target_macs * base / after, drop_blocks=0, depth_sparsity=0.0)
        rest_planned, width = allocate_to_target(slim, rest, calibration, vcfg, feeds, shapes)
        planned = replace(planned, overrides=rest_planned.overrides)
    report = {"method": "sensitivity", "target_macs": config.target_macs, "target_params": None,
              "ratios": width["ratios"], "sensitivity": width.get("sensitivity"),
              "depth": depth_report(blocks, measured, choice, limit, base, after)}
    return planned, report


def measure_blocks(model: onnx.ModelProto, blocks: list[ResidualBlock], samples: list[dict],
                   shapes: dict[str, list[int]]) -> list[dict[str, float]]:
    """Each block removed alone from a copy: the relative L2 error of the outputs on ``samples`` and the MACs
    saved (one onnxruntime session per block)."""
    reference = _run(model, samples)
    base = total_macs(model, shapes)
    rows = []
    for block in blocks:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        remove_blocks(copy, [block])
        refresh_value_info(copy)
        rows.append({"rel_l2": _rel_error(reference, _run(copy, samples)),
                     "macs_saved": float(base - total_macs(copy, shapes))})
    return rows


def groups_inside(blocks: list[ResidualBlock], groups: list[dict[str, Any]]) -> dict[int, set[int]]:
    """Block index -> ids of the width groups whose producers all lie in that block's ``f`` (they go with it)."""
    inside: dict[int, set[int]] = {}
    for i, block in enumerate(blocks):
        names = {n.name for n in block.nodes if n.name}
        inside[i] = {g["id"] for g in groups if g["producers"] and all(p in names for p in g["producers"])}
    return inside


def choose(blocks: list[dict[str, float]], groups: list[dict[str, Any]], inside: dict[int, set[int]],
           needed: float, limit: int) -> Choice:
    """Greedy over width steps and blocks, the least loss per MAC saved first, until ``needed`` MACs are saved;
    at most ``limit`` blocks. A block's step counts only what the width steps taken inside it did not already."""
    by_id = {g["id"]: g for g in groups}
    choice = Choice()

    def taken(gid: int) -> dict[str, float]:
        i = choice.points.get(gid, -1)
        return by_id[gid]["points"][i] if i >= 0 else {"rel_l2": 0.0, "macs_saved": 0.0}

    saved = 0.0
    while saved < needed:
        steps = _width_steps(by_id, choice, taken)
        if len(choice.blocks) < limit:
            steps += _block_steps(blocks, inside, choice, taken)
        steps = [s for s in steps if s.macs > 0]
        if not steps:
            break
        step = min(steps, key=lambda s: (s.cost, s.kind != "block", s.key))
        if step.kind == "block":
            choice.blocks.append(step.key)
            for gid in inside[step.key]:
                choice.points.pop(gid, None)
                choice.dead.add(gid)
        else:
            choice.points[step.key] = choice.points.get(step.key, -1) + 1
        choice.steps.append(step)
        saved += step.macs
    return choice


def _width_steps(groups: dict[int, dict[str, Any]], choice: Choice, taken) -> list[Step]:
    """Each live group's next measured point, as a step from the one taken."""
    steps = []
    for gid, group in groups.items():
        i = choice.points.get(gid, -1) + 1
        if gid in choice.dead or i >= len(group["points"]):
            continue
        point, prev = group["points"][i], taken(gid)
        steps.append(Step("width", gid, point["rel_l2"] - prev["rel_l2"], point["macs_saved"] - prev["macs_saved"]))
    return steps


def _block_steps(blocks: list[dict[str, float]], inside: dict[int, set[int]], choice: Choice, taken) -> list[Step]:
    """Each block not taken, net of the width steps taken inside it (they are replaced by the whole block)."""
    steps = []
    for i, row in enumerate(blocks):
        if i in choice.blocks:
            continue
        loss = row["rel_l2"] - sum(taken(g)["rel_l2"] for g in inside[i])
        macs = row["macs_saved"] - sum(taken(g)["macs_saved"] for g in inside[i])
        steps.append(Step("block", i, loss, macs))
    return steps


def depth_report(blocks: list[ResidualBlock], measured: list[dict[str, float]], choice: Choice, limit: int,
                 base: int, after: int) -> dict[str, Any]:
    """Every block with its measured loss, MACs, cost per MAC saved and why it was or was not chosen."""
    width = [s.cost for s in choice.steps if s.kind == "width"]
    marginal = max(width) if width else None
    rows = []
    for i, (block, row) in enumerate(zip(blocks, measured)):
        cost = row["rel_l2"] / row["macs_saved"] if row["macs_saved"] > 0 else None
        if i in choice.blocks:
            why = "cheaper per MAC saved than the width steps left"
        elif cost is None:
            why = "saves no MACs"
        elif len(choice.blocks) >= limit:
            why = f"the limit of {limit} block(s) was reached"
        else:
            why = "width reached the target at a lower cost per MAC saved"
        rows.append({"add": block.name, "output": block.output, "kind": block.kind, "rel_l2": round(row["rel_l2"], 8),
                     "macs_saved": int(row["macs_saved"]), "cost_per_mac": cost, "chosen": i in choice.blocks,
                     "why": why})
    return {"limit": limit, "removable": len(blocks), "chosen": len(choice.blocks), "width_cost_per_mac": marginal,
            "macs_after_depth": round(after / base, 6) if base else None, "blocks": rows,
            "order": [{"kind": s.kind, "key": s.key, "cost_per_mac": s.cost} for s in choice.steps]}
