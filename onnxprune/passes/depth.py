"""Depth pruning: remove whole residual blocks (``x + f(x)`` -> ``x``), the least influential first.

Block influence (ShortGPT) is ``1 - cos(x_in, x_out)`` between a block's stream input and its Add's output, the
cosine taken along the channel/hidden axis at every token or spatial position and averaged over positions and
calibration samples. All blocks are scored once, on the original model, in one onnxruntime pass per calibration
batch; the lowest scores go. Removal rewires the Add's readers to ``x`` (an Identity keeps a graph output's name);
the nodes and weights of ``f`` then have no reader and are dropped.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import onnx

from ..analysis.blocks import ResidualBlock, find_blocks
from ..analysis.cost import total_macs
from ..config import PruneConfig
from ..errors import UsageError
from ..graph import count_params, remove_dead_nodes
from ..sessions import inference_session, session_options
from ..shapes import refresh_value_info
from .manager import Feed, PassContext, PassResult

logger = logging.getLogger(__name__)

SCORE = "block influence: 1 - cos(x_in, x_out) along the channel axis, mean over positions and calibration samples"


class DepthPrunePass:
    """Remove ``--drop-blocks N`` (or the ``--depth-sparsity`` share of) removable residual blocks, lowest block
    influence on the calibration data first."""

    name = "depth"

    def __init__(self, config: PruneConfig):
        self.config = config

    def run(self, ctx: PassContext) -> PassResult:
        model, shapes = ctx.model, ctx.input_shapes
        if not ctx.calibration:
            raise UsageError("{drop_blocks}/{depth_sparsity} score blocks on {calibration_data}; give it")
        analysis = find_blocks(model, shapes)
        details: dict[str, Any] = {"kind": "depth", "score": SCORE, "macs_before": total_macs(model, shapes),
                                   "params_before": count_params(model)[0], "blocks_found": len(analysis.blocks),
                                   "not_removable": [b.to_dict() for b in analysis.rejected]}
        wanted = blocks_to_drop(self.config, len(analysis.blocks))
        details["asked"] = wanted
        scores = block_influence(model, analysis.blocks, ctx.calibration) if analysis.blocks else []
        if self.config.blocks_chosen is not None:
            chosen = named_blocks(analysis.blocks, self.config.blocks_chosen)
            details["chosen_by"] = "the --target-macs allocation (measured cost per MAC saved)"
        else:
            order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
            chosen = sorted(order[:wanted])
        details["blocks"] = [{**b.to_dict(), "influence": round(scores[i], 8), "removed": i in chosen}
                             for i, b in enumerate(analysis.blocks)]
        if wanted > len(analysis.blocks):
            details["reason"] = (f"asked for {wanted} block(s), only {len(analysis.blocks)} removable"
                                 if analysis.blocks else "no removable residual block (see not_removable)")
        if chosen:
            remove_blocks(model, [analysis.blocks[i] for i in chosen])
            refresh_value_info(model)
        details["removed"] = len(chosen)
        details["macs_after"] = total_macs(model, shapes)
        details["params_after"] = count_params(model)[0]
        return PassResult(bool(chosen), details)


def blocks_to_drop(config: PruneConfig, found: int) -> int:
    """How many blocks the options ask for: ``drop_blocks``, or ``depth_sparsity`` of the removable blocks rounded
    down."""
    if config.drop_blocks:
        return config.drop_blocks
    return math.floor(config.depth_sparsity * found + 1e-9)


def named_blocks(blocks: list[ResidualBlock], names: list[str]) -> list[int]:
    """Indices of the removable blocks whose Add outputs ``names`` lists; a name that is none of them is a usage
    error (a recipe written for another model)."""
    index = {b.output: i for i, b in enumerate(blocks)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise UsageError(f"{{blocks_chosen}}: {unknown[0]!r} is not the output of a removable residual block",
                         options=("blocks_chosen",), value=unknown[0])
    return sorted(index[n] for n in set(names))


def block_influence(model: onnx.ModelProto, blocks: list[ResidualBlock], feeds: list[Feed]) -> list[float]:
    """Each block's mean ``1 - cos(x_in, x_out)`` over the calibration feeds (one run per feed, the captured
    tensors of one feed at a time in memory)."""
    names = list(dict.fromkeys(n for b in blocks for n in (b.x, b.output)))
    session = inference_session(model, outputs=names, options=session_options(log_level=3, optimize=False))
    inputs = [i.name for i in session.get_inputs()]
    sums, counts = np.zeros(len(blocks)), np.zeros(len(blocks))
    for feed in feeds:
        values = dict(zip(names, session.run(names, {k: feed[k] for k in inputs})))
        for i, block in enumerate(blocks):
            cos = _cosines(values[block.x], values[block.output], block.channel_axis)
            sums[i] += float(np.sum(1.0 - cos))
            counts[i] += cos.size
    return [float(s / max(c, 1)) for s, c in zip(sums, counts)]


def _cosines(x_in: np.ndarray, x_out: np.ndarray, axis: int) -> np.ndarray:
    """Cosine similarity of two tensors along ``axis`` at every other position (rank < 2: the whole vector)."""
    if x_in.ndim < 2:
        axis = 0
    a = np.moveaxis(x_in.astype(np.float64), axis, -1).reshape(-1, x_in.shape[axis])
    b = np.moveaxis(x_out.astype(np.float64), axis, -1).reshape(-1, x_out.shape[axis])
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    return np.where(norms > 0, dots / np.maximum(norms, 1e-30), 1.0)


def remove_blocks(model: onnx.ModelProto, blocks: list[ResidualBlock]) -> int:
    """Rewire each block's Add output to its ``x`` (chains of removed blocks resolved), keep graph output names with
    an Identity, then drop what nothing reads. Returns the number of nodes and initializers dropped."""
    graph = model.graph
    rename = {b.output: b.x for b in blocks}

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    adds = {id(b.add) for b in blocks}
    for position in [i for i, node in enumerate(graph.node) if id(node) in adds][::-1]:
        del graph.node[position]
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in rename:
                node.input[slot] = resolve(name)
    outputs = {o.name for o in graph.output}
    graph.node.extend(onnx.helper.make_node("Identity", [resolve(b.output)], [b.output], name=f"{b.name}/depth_pruned")
                      for b in blocks if b.output in outputs)  # last: their sources are produced before them
    return remove_dead_nodes(model)

