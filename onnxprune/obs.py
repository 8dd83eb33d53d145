"""SparseGPT-style pruning with repair (``--criterion obs``): masks chosen and the kept weights updated
with the inverse Hessian of each layer's inputs (Frantar & Alistarh 2023, optimal brain surgeon).

For each Conv (im2col, per group), Gemm and MatMul weight, H = XᵀX of the layer's inputs on the
calibration data is accumulated through onnxruntime, dampened by 1 % of its mean diagonal, and the
upper Cholesky factor U of H⁻¹ is computed (float64). Columns (inputs) are then swept in blocks of
128: the mask is chosen per block by w² / U_jj² (unstructured: the lowest scores of the block,
the block's share of the tensor's target; N:M: N of every M consecutive inputs, chosen when the
sweep reaches the group), each pruned weight's error is pushed onto the not-yet-processed columns
of its row (the OBS update), and at the end of a block onto the later blocks. Layers small
enough (outputs x inputs³ <= ``EXACT_WORK``) take exact greedy OBS per row instead (Optimal Brain
Compression): on the trained fixtures the sweep's frozen columns cost more accuracy than they save.

Layers are processed in graph order on the inputs of the already-pruned model, as in the paper.
Unlike the paper, a layer after a pruned one is first refitted densely to reproduce the original
model's output from its pruned-model inputs (drift correction, as the row-wise refit does); the
paper's objective collapses the residual digits CNN at 70 % (docs/benchmarks.md). Layers whose
inputs no pending layer can change any more are measured together in one onnxruntime pass (a
"stage"), with one Gram matrix per distinct input, so the passes grow with the model's depth in
layers, not with its number of layers.

Recurrent layers: the rows of each direction of an LSTM/GRU/RNN ``W`` ([directions, gates x hidden, inputs])
read x_t of every step (the node's input X, one Gram matrix for all directions); those of ``R`` read h_{t-1},
taken from the node's hidden sequence Y shifted by one step in the direction's order with the initial state
(zeros when absent) in front. Two approximations: ``R``'s inputs are measured once, before its own pruning feeds
back into later steps (and, when the pass reaches ``R`` before ``W``, before ``W``'s pruning); and every row of
a gate block is taken to read h_{t-1}, which for the GRU's hidden gate with ``linear_before_reset=0`` is really
r_t ⊙ h_{t-1}. Padded steps (``sequence_lens``) count as inputs. A Gemm/MatMul weight read by several layers of
one layout (the steps of an unrolled recurrence) has one Gram matrix summed over the inputs of all of them.

Under ``--reconstruct`` (and ``--criterion obs``) each layer then keeps the best of three candidates,
scored by its output error on the same Gram matrices: the OBS solution, the OBS mask with every row's
kept weights refitted by ridge least squares (undamped: the OBS update is the optimum of the dampened
problem), and the row-wise refit of the criterion's own mask. No layer thus ends worse than the
row-wise refit would leave it from the same inputs. A layer whose calibration data gives fewer input vectors
than it has inputs (a classifier head after a flatten, the shared input weights of an unrolled LSTM, on a few
samples) keeps the OBS solution: there the refits interpolate the calibration vectors, and their near-zero
calibration error would pick the candidate that generalises worst (a Keras captcha model's dense heads at 50 %:
held-out agreement 0.55 with the refits, 0.68 without). The refit candidates solve one ridge system per row:
stacked LU solves for rows keeping fewer than ``WIDE`` weights, Cholesky one row at a time for wider ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .analysis.weights import RECURRENT_GATES, PrunableWeight
from .compensation import _im2col
from .graph import build_indexes, get_attr
from .obs_solve import (  # noqa: F401  (re-exported: callers import the solvers from here)
    BLOCK,
    DAMP,
    EXACT_WORK,
    RIDGE,
    _gram,
    inverse_hessian_factor,
    obs_exact_rows,
    obs_prune_rows,
    output_error,
    refit_dense,
    refit_masked,
)
from .sessions import session_with_outputs

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Layers of an ONNX graph
# --------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One weight OBS can repair: its readers, the inputs they read and the weight's layout.

    ``op``: conv | gemm_t (Gemm, transB=1) | gemm | matmul (one reader, or several of the same layout sharing
    the weight, e.g. the time steps of an unrolled LSTM: their inputs are stacked as more samples) |
    recurrent_w (LSTM/GRU/RNN ``W``: reads x_t of every step) | recurrent_r (``R``: reads h_{t-1}).
    """

    item: PrunableWeight
    node: onnx.NodeProto
    op: str
    groups: int = 1
    nodes: tuple[onnx.NodeProto, ...] = ()

    @property
    def readers(self) -> tuple[onnx.NodeProto, ...]:
        return self.nodes or (self.node,)

    @property
    def inputs(self) -> list[str]:
        """The tensors whose values make this layer's input columns."""
        if self.op == "recurrent_r":
            state = self.node.input[5] if len(self.node.input) > 5 else ""
            return [self.node.output[0]] + ([state] if state else [])
        return sorted({node.input[0] for node in self.readers})

    @property
    def key(self) -> tuple:
        """Layers with the same key share one Hessian."""
        if self.op == "recurrent_r":
            return ("h_prev", *self.inputs, _direction(self.node), int(get_attr(self.node, "layout", 0)))
        if self.op != "conv":
            return tuple(self.inputs)
        node = self.node
        return (node.input[0], tuple(self.item.weight.shape[2:]), tuple(get_attr(node, "pads") or ()),
                tuple(get_attr(node, "strides") or ()), tuple(get_attr(node, "dilations") or ()), self.groups)

    def gram_group(self, index: int) -> int:
        """The Gram group that row matrix ``index`` of :meth:`rows` reads (every direction of W reads x_t)."""
        return 0 if self.op == "recurrent_w" else index

    def rows(self, values: np.ndarray, nm: bool) -> list[np.ndarray]:
        """The weight as [outputs, inputs] matrices (one per conv group or direction), columns in Hessian order."""
        if self.op == "conv":
            per_group = np.split(values.astype(np.float32), self.groups, axis=0)
            return [g.transpose(0, 2, 3, 1).reshape(len(g), -1) if nm else g.reshape(len(g), -1) for g in per_group]
        if self.op.startswith("recurrent"):
            return [direction.astype(np.float32) for direction in values]
        return [values.astype(np.float32) if self.op == "gemm_t" else values.T.astype(np.float32)]

    def write(self, values: np.ndarray, rows: list[np.ndarray], nm: bool) -> None:
        """Put rows from :meth:`rows` back into ``values`` (in place)."""
        if self.op == "conv":
            out, cin, kh, kw = values.shape
            shape = (out // self.groups, kh, kw, cin) if nm else (out // self.groups, cin, kh, kw)
            parts = [r.reshape(shape).transpose(0, 3, 1, 2) if nm else r.reshape(shape) for r in rows]
            values[...] = np.concatenate(parts, axis=0)
        elif self.op.startswith("recurrent"):
            values[...] = np.stack(rows)
        else:
            values[...] = rows[0] if self.op == "gemm_t" else rows[0].T

    def columns(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """One batch of inputs as [samples, groups, inputs per group], columns in im2col (channel-major) order."""
        if self.op == "recurrent_r":
            return _previous_states(self.node, *(tensors[name] for name in self.inputs))
        if self.op != "conv":
            return np.concatenate([tensors[name].reshape(-1, 1, tensors[name].shape[-1]).astype(np.float32, copy=False)
                                   for name in self.inputs])
        x = tensors[self.node.input[0]]
        patches = _im2col(x.astype(np.float32, copy=False), self.node, tuple(self.item.weight.shape[2:4]))
        return patches.reshape(len(patches), self.groups, -1)

    def in_row_order(self, gram: np.ndarray, nm: bool) -> np.ndarray:
        """A Gram matrix in :meth:`rows` column order: for N:M convs kernel-position-major, so that
        groups of M consecutive columns are M consecutive input channels."""
        if self.op != "conv" or not nm:
            return gram
        cin, taps = self.item.weight.shape[1], int(np.prod(self.item.weight.shape[2:]))
        order = np.arange(cin * taps).reshape(cin, taps).T.reshape(-1)
        return gram[np.ix_(order, order)]


def _direction(node: onnx.NodeProto) -> str:
    value = get_attr(node, "direction", b"forward")
    return value.decode() if isinstance(value, bytes) else value


def _previous_states(node: onnx.NodeProto, y: np.ndarray, initial: np.ndarray | None = None) -> np.ndarray:
    """h_{t-1} of every step of a recurrent node as [steps x batch, directions, hidden]: its hidden sequence Y
    shifted by one step in each direction's order, the initial state (zeros when absent) in front."""
    if int(get_attr(node, "layout", 0)):  # [batch, steps, directions, hidden] -> [steps, directions, batch, hidden]
        y = y.transpose(1, 2, 0, 3)
        initial = None if initial is None else initial.transpose(1, 0, 2)
    steps, directions, batch, hidden = y.shape
    initial = np.zeros((directions, batch, hidden), y.dtype) if initial is None else initial
    reverse = [_direction(node) == "reverse" or d == 1 for d in range(directions)]
    per_direction = [np.concatenate([y[1:, d], initial[d][None]]) if backward else
                     np.concatenate([initial[d][None], y[:-1, d]]) for d, backward in enumerate(reverse)]
    return np.stack(per_direction, axis=2).reshape(steps * batch, directions, hidden).astype(np.float32, copy=False)


@dataclass
class Grams:
    """Per group: H = XₚᵀXₚ of the pruned model's inputs; with drift, P = XₚᵀXₒ and G = XₒᵀXₒ with the
    original model's inputs Xₒ to the same layer (float64 sums of float32 products)."""

    h: np.ndarray
    p: np.ndarray | None = None
    g: np.ndarray | None = None
    rows: int = 0  # input vectors summed (samples x positions or steps)

    def add(self, pruned: np.ndarray, original: np.ndarray | None) -> None:
        self.rows += len(pruned)
        self.h += _gram(pruned, pruned)
        if original is not None:
            self.p += _gram(pruned, original)
            self.g += _gram(original, original)


def describe_layer(item: PrunableWeight, index) -> Layer | str:
    """The :class:`Layer` for ``item``, or why OBS cannot repair it (it keeps the magnitude mask)."""
    if item.in_subgraph:
        return "inside a control-flow subgraph"
    layers = [_describe_use(item, use, index) for use in item.uses]
    reason = next((layer for layer in layers if isinstance(layer, str)), None)
    if reason is not None:
        return reason
    if len(layers) == 1:
        return layers[0]
    if len({layer.op for layer in layers}) > 1 or layers[0].op in ("conv", "recurrent_w", "recurrent_r"):
        return "shared by several layers of different kinds"
    return Layer(item, layers[0].node, layers[0].op, nodes=tuple(layer.node for layer in layers))


def _describe_use(item: PrunableWeight, use, index) -> Layer | str:
    """The :class:`Layer` of one reader of ``item``, or why it cannot be repaired."""
    node = use.node
    if node.op_type in RECURRENT_GATES and use.slot in (1, 2):
        if use.slot == 2 and (not node.output or not node.output[0]):
            return "recurrent R whose hidden sequence Y is not an output of the node (its inputs cannot be measured)"
        return Layer(item, node, "recurrent_w" if use.slot == 1 else "recurrent_r")
    if node.op_type not in ("Conv", "Gemm", "MatMul"):
        return f"{node.op_type} weights are not repaired (OBS covers Conv, Gemm, MatMul, LSTM, GRU and RNN)"
    if use.slot != 1:
        return "read as the data input of the layer"
    weight, chain = index.resolve(node.input[1])
    if weight is None or any(step.op_type not in ("Identity", "Cast") for step in chain):
        return "weight reached through a layout change (Transpose)"
    shape = item.weight.shape
    if node.op_type == "Conv" and use.role == "conv":
        auto = get_attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if len(shape) != 4 or auto not in ("NOTSET", "VALID"):
            return "not a 2-D convolution with explicit pads"
        return Layer(item, node, "conv", int(get_attr(node, "group", 1)))
    if node.op_type == "Gemm" and not get_attr(node, "transA", 0):
        return Layer(item, node, "gemm_t" if get_attr(node, "transB", 0) else "gemm")
    if node.op_type == "MatMul" and len(shape) == 2:
        return Layer(item, node, "matmul")
    return f"{node.op_type} weights of this layout are not repaired"


# --------------------------------------------------------------------------------------
# The sequential pass over a model
# --------------------------------------------------------------------------------------


class ObsRepair:
    """SparseGPT over a model's layers in graph order, each on the inputs of the already-pruned model.

    With ``reference`` (the original model), each layer first gets the dense refit that maps its
    pruned-model inputs to the original output (undoing the drift of the layers pruned before it),
    then OBS prunes that; without it, OBS keeps the layer's own output on its current inputs (the
    paper's objective). The unstructured pass calls :meth:`prune` for every covered weight in its
    (topological) order; Gram matrices are measured lazily, one onnxruntime pass per stage.
    """

    def __init__(self, model: onnx.ModelProto, items: list[PrunableWeight], feeds: list[dict[str, np.ndarray]],
                 reference: onnx.ModelProto | None = None, exclude: dict[str, str] | None = None):
        self.model, self.reference, self.items, self.feeds = model, reference, items, feeds
        index = build_indexes(model)[0]
        self.layers: dict[str, Layer] = {}
        self.skipped: list[dict[str, Any]] = []
        for item in items:
            layer = (exclude or {}).get(item.name) or describe_layer(item, index)
            if isinstance(layer, Layer):
                self.layers[item.name] = layer
            else:
                self.skipped.append({"weight": item.name, "layers": item.node_names(), "reason": layer})
        self.upstream = _upstream_items(model, items)
        self.position = {item.name: i for i, item in enumerate(items)}
        self.grams: dict[tuple, Grams] = {}
        self.repaired: list[dict[str, Any]] = []
        self.stages = 0

    def covers(self, item: PrunableWeight) -> bool:
        return item.name in self.layers

    def prune(self, item: PrunableWeight, values: np.ndarray, count: int | None,
              nm: tuple[int, int] | None, baseline: np.ndarray | None = None) -> np.ndarray:
        """Choose the mask of ``item`` and update its kept weights in ``values`` (in place); returns the mask.

        Candidates, scored by the layer's output error on the same Gram matrices: the OBS solution, the
        OBS mask refitted by least squares, and (with ``baseline``, the criterion's own mask) the row-wise
        refit of that mask; the lowest error wins, so no layer ends worse than the row-wise refit.
        """
        layer = self.layers[item.name]
        if layer.key not in self.grams:
            self._measure(item)
        stats = self.grams[layer.key] if self._needed_later(layer.key, item) else self.grams.pop(layer.key)
        per_group = [[layer.in_row_order(m, nm is not None) for m in (stats.h[i], *(
            (stats.p[i], stats.g[i]) if stats.p is not None else (stats.h[i], stats.h[i])))]
            for i in range(len(stats.h))]
        rows = layer.rows(values, nm is not None)
        order = [per_group[layer.gram_group(i)] for i in range(len(rows))]
        counts = _split_count(count, [r.size for r in rows]) if nm is None else [None] * len(rows)
        targets = [refit_dense(r, h, p) if stats.p is not None else r for r, (h, p, _) in zip(rows, order)]
        exact = sum(r.shape[0] * r.shape[1] ** 3 for r in rows) <= EXACT_WORK
        prune_rows = obs_exact_rows if exact else obs_prune_rows
        results = [prune_rows(t, h, count=c, nm=nm) for t, (h, _, _), c in zip(targets, order, counts)]
        masks = {"obs": [m for _, m in results]}
        candidates = {"obs": [new for new, _ in results]}
        width = rows[0].shape[1]
        # with fewer input vectors than inputs the least-squares refits interpolate the calibration data: their
        # calibration error says nothing of other inputs, so only the dampened OBS solution is a candidate
        determined = stats.rows >= width
        if determined:
            candidates["obs mask, refit"] = [refit_masked(r, m, h, p)
                                             for r, m, (h, p, _) in zip(rows, masks["obs"], order)]
            masks["obs mask, refit"] = masks["obs"]
        if baseline is not None and determined:
            masks["row-wise refit"] = [m > 0.5 for m in layer.rows(baseline.astype(np.float32), nm is not None)]
            candidates["row-wise refit"] = [refit_masked(r, m, h, p)
                                            for r, m, (h, p, _) in zip(rows, masks["row-wise refit"], order)]
        errors = {name: output_error(rows, new, order) for name, new in candidates.items()}
        choice = min(errors, key=errors.get)  # the first listed wins ties
        before = output_error(rows, [np.where(m, 0.0, r) for r, m in zip(rows, masks["obs"])], order)
        if not determined:
            logger.warning("OBS: %s has %d inputs but the calibration data gave only %d input vectors: its "
                           "least-squares refits would fit the calibration data and generalise worse, so it keeps "
                           "the dampened OBS solution (give more samples)", item.name, width, stats.rows)
        self.repaired.append({"weight": item.name, "layer": layer.node.name or layer.node.output[0],
                              "input_vectors": stats.rows, "inputs": width,
                              "algorithm": "exact" if exact else "sparsegpt", "choice": choice,
                              "rel_error_masked": before, "rel_error_repaired": errors[choice],
                              "rel_error_candidates": errors})
        layer.write(values, candidates[choice], nm is not None)
        mask = np.zeros(values.shape, dtype=bool)
        layer.write(mask, masks[choice], nm is not None)
        return mask

    def report(self) -> dict[str, Any]:
        samples = int(sum(next(iter(f.values())).shape[0] for f in self.feeds)) if self.feeds else 0
        return {"method": "obs", "target": "original" if self.reference is not None else "pruned",
                "block": BLOCK, "damp": DAMP, "samples": samples, "stages": self.stages,
                "layers": self.repaired, "skipped": self.skipped}

    def _needed_later(self, key: tuple, item: PrunableWeight) -> bool:
        done = self.position[item.name]
        return any(layer.key == key for name, layer in self.layers.items() if self.position[name] > done)

    def _measure(self, item: PrunableWeight) -> None:
        """One onnxruntime pass for every pending layer whose inputs are final, and ``item``'s in any case."""
        done = {other.name for other in self.items[:self.position[item.name]]}
        ready = [name for name, layer in self.layers.items() if self.position[name] >= self.position[item.name]
                 and self.upstream[name] <= done and layer.key not in self.grams]
        if item.name not in ready:  # an upstream weight is pruned after it (a shared weight read again downstream)
            ready.append(item.name)
        wanted: dict[tuple, Layer] = {}
        drift: set[tuple] = set()  # keys whose inputs differ from the original model's
        for name in ready:
            key = self.layers[name].key
            wanted.setdefault(key, self.layers[name])
            if self.reference is not None and self.upstream[name]:
                drift.add(key)
        names = sorted({name for layer in wanted.values() for name in layer.inputs})
        logger.info("OBS: measuring the inputs of %d layer(s) on calibration data", len(ready))
        session = session_with_outputs(self.model, names)
        original = sorted({name for key in drift for name in wanted[key].inputs})
        reference = session_with_outputs(self.reference, original) if original else None
        for feed in self.feeds:
            tensors = dict(zip(names, session.run(names, feed)))
            before = dict(zip(original, reference.run(original, feed))) if reference is not None else {}
            for key, layer in wanted.items():
                x = layer.columns(tensors)
                if key not in self.grams:
                    groups, width = x.shape[1:]
                    count = 3 if key in drift else 1
                    self.grams[key] = Grams(*(np.zeros((groups, width, width)) for _ in range(count)))
                self.grams[key].add(x, layer.columns(before) if key in drift else None)
        self.stages += 1


def _split_count(count: int | None, sizes: list[int]) -> list[int]:
    """``count`` zeros shared among conv groups in proportion to their sizes (summing exactly)."""
    total, cumulative, shares = sum(sizes), 0, []
    for size in sizes:
        shares.append(round((count or 0) * (cumulative + size) / total) - round((count or 0) * cumulative / total))
        cumulative += size
    return shares


def _upstream_items(model: onnx.ModelProto, items: list[PrunableWeight]) -> dict[str, frozenset[str]]:
    """For each item, the other items whose layers' outputs reach its layer's inputs (main graph).

    A weight read again downstream of its own layer (the steps of an unrolled recurrence) is not its own
    upstream: it is measured before its pruning feeds back. A recurrent ``R`` reads h_{t-1}, which its
    node's ``W`` changes: ``W`` is upstream of ``R`` when it is pruned first.
    """
    readers: dict[int, list[PrunableWeight]] = {}
    for item in items:
        for use in item.uses:
            if not item.in_subgraph:
                readers.setdefault(id(use.node), []).append(item)
    position = {item.name: i for i, item in enumerate(items)}
    reach: dict[str, frozenset[str]] = {}
    seen: frozenset[str] = frozenset()
    result: dict[str, frozenset[str]] = {}
    for node in model.graph.node:
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            upstream = seen  # outer-scope reads of a subgraph are not traced: anything before may reach it
        else:
            upstream = frozenset().union(*(reach.get(name, frozenset()) for name in node.input))
        here = readers.get(id(node), [])
        for item in here:
            before = {other.name for other in here if other.uses[0].slot == 1 and item.uses[0].slot == 2
                      and node.op_type in RECURRENT_GATES and position[other.name] < position[item.name]}
            result[item.name] = result.get(item.name, frozenset()) | upstream | before
        upstream = upstream | {item.name for item in here}
        seen = seen | {item.name for item in here}
        for out in node.output:
            reach[out] = upstream
    return {item.name: result.get(item.name, seen) - {item.name} for item in items}
