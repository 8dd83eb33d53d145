"""Least-squares repair of the residual stream's readers after the hidden-size rotation (``--hidden-sparsity S
--reconstruct``): every linear layer that reads a norm of the sliced stream (attention Q/K/V, the MLP's input, a
pooler or LM head) gets the weight and bias of least ridge-regularised squared error between its output on the
pruned model's calibration activations and the original model's output of the same layer (bias included).

Layers are refitted in graph order, one step per distinct input tensor (Q/K/V share theirs), each on the pruned
model with the earlier refits applied; both models are streamed (:class:`~onnxprune.activation_stream.ActivationStream`)
and the Gram sums are :class:`~onnxprune.gram.GramSum`. Under ``--low-memory`` (:func:`~onnxprune.heap.heap_bounded`)
the two streams share a :class:`~onnxprune.activation_stream.KeptBudget` derived from the data, as the structured
refit's do: what they keep between steps stays within about one layer's activations, the rest is recomputed (the
same values). Padded positions (an ``attention_mask`` of the rows'
leading shape) are left out, as in the PCA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..activation_stream import ActivationStream, KeptBudget
from ..gram import GramSum
from ..heap import heap_bounded


@dataclass
class ReaderTarget:
    """A stream reader to refit: its MatMul/Gemm node's name and the tensor (in both models) its output ends in
    (the bias Add's output, or the node's own)."""

    node: str
    output: str


@dataclass
class _Layer:
    name: str
    node: onnx.NodeProto
    weight: onnx.TensorProto
    bias: onnx.TensorProto | None
    output: str
    transposed: bool


def refit_readers(original: onnx.ModelProto, pruned: onnx.ModelProto, targets: list[ReaderTarget],
                  feeds: list[dict[str, np.ndarray]], ridge: float = 1e-3) -> dict[str, Any]:
    """Refit ``targets`` in ``pruned`` in place; returns per layer the calibration relative error before/after."""
    layers, skipped = _plan(pruned, targets)
    budget = KeptBudget() if heap_bounded() else 1 << 30
    reference, current = ActivationStream(original, feeds, budget), ActivationStream(pruned, feeds, budget)
    live = {layer.weight.name: numpy_helper.to_array(layer.weight) for layer in layers}
    live |= {layer.bias.name: numpy_helper.to_array(layer.bias) for layer in layers if layer.bias is not None}
    order = {out: i for i, n in enumerate(pruned.graph.node) for out in n.output}
    steps: dict[str, list[_Layer]] = {}
    for layer in layers:
        steps.setdefault(layer.node.input[0], []).append(layer)
    figures = []
    for source in sorted(steps, key=lambda name: order.get(name, -1)):
        wave = steps[source]
        sums = {layer.name: (GramSum(np.float64), [0.0]) for layer in wave}
        for feed, xs, ys in zip(feeds, current.run([source], live), reference.run([layer.output for layer in wave])):
            rows = _rows(xs[source], feed)
            rows = np.hstack([rows, np.ones((rows.shape[0], 1))])  # the bias column (dropped for no bias)
            for layer in wave:
                target = _rows(ys[layer.output], feed)
                sums[layer.name][0].add(rows, target)
                sums[layer.name][1][0] += float((target * target).sum())
        for layer in wave:
            gram, cross = sums[layer.name][0].result()
            figures.append(_solve(layer, gram, cross, sums[layer.name][1][0], live, ridge))
    return {"layers": figures, "skipped": skipped,
            "samples": int(sum(next(iter(f.values())).shape[0] for f in feeds))}


def _plan(model: onnx.ModelProto, targets: list[ReaderTarget]) -> tuple[list[_Layer], list[str]]:
    """The refittable readers: a MatMul/Gemm (no transA, alpha = beta = 1) on its own 2-D weight initializer whose
    output, or the output of the Add of its own [out] bias initializer, is the target."""
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers, skipped = [], []
    for target in targets:
        node = nodes.get(target.node)
        layer = _layer(node, inits, consumers, target) if node is not None else None
        (layers.append(layer) if layer is not None else skipped.append(target.node))
    return layers, skipped


def _layer(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], consumers: dict[str, list[onnx.NodeProto]],
           target: ReaderTarget) -> _Layer | None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type not in ("MatMul", "Gemm") or weight is None or len(weight.dims) != 2:
        return None
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    transposed = bool(attrs.get("transB", 0))
    width = weight.dims[0] if transposed else weight.dims[1]
    bias = inits.get(node.input[2]) if node.op_type == "Gemm" and len(node.input) > 2 else None
    output = node.output[0]
    if bias is None and node.op_type == "MatMul" and len(consumers.get(output, [])) == 1:
        add = consumers[output][0]
        other = add.input[1] if add.input[0] == output else add.input[0]
        if add.op_type == "Add" and other in inits and list(inits[other].dims) == [width]:
            bias, output = inits[other], add.output[0]
    if output != target.output or (bias is not None and list(bias.dims) != [width]):
        return None
    return _Layer(node.name, node, weight, bias, output, transposed)


def _rows(value: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
    rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
    mask = feed.get("attention_mask")
    if mask is not None and tuple(value.shape[:-1]) == tuple(mask.shape):
        rows = rows[mask.reshape(-1) != 0]
    return rows


def _solve(layer: _Layer, gram: np.ndarray, cross: np.ndarray, energy: float, live: dict[str, np.ndarray],
           ridge: float) -> dict[str, Any]:
    """Solve [W; b] on the Gram sums (last row/column: the ones column) and write it; the relative squared output
    errors of the rotated weights and of the solution on the calibration rows."""
    weight = live[layer.weight.name].astype(np.float64)
    weight = weight.T if layer.transposed else weight
    features = weight.shape[0]
    if layer.bias is None:
        gram, cross = gram[:features, :features], cross[:features]
        before = weight
    else:
        before = np.vstack([weight, live[layer.bias.name].astype(np.float64)[None]])
    lam = ridge * float(np.trace(gram[:features, :features])) / features + 1e-12
    regular = lam * np.eye(gram.shape[0])
    if layer.bias is not None:
        regular[-1, -1] = 0.0  # the bias is not shrunk
    solution = np.linalg.solve(gram + regular, cross)
    figures = {"layer": layer.name, "error_before": round(_error(gram, cross, energy, before), 6),
               "error_after": round(_error(gram, cross, energy, solution), 6)}
    coef = solution[:features]
    dtype = numpy_helper.to_array(layer.weight).dtype
    layer.weight.CopyFrom(numpy_helper.from_array((coef.T if layer.transposed else coef).astype(dtype),
                                                  layer.weight.name))
    live[layer.weight.name] = numpy_helper.to_array(layer.weight)
    if layer.bias is not None:
        dtype = numpy_helper.to_array(layer.bias).dtype
        layer.bias.CopyFrom(numpy_helper.from_array(solution[features].astype(dtype), layer.bias.name))
        live[layer.bias.name] = numpy_helper.to_array(layer.bias)
    return figures


def _error(gram: np.ndarray, cross: np.ndarray, energy: float, coef: np.ndarray) -> float:
    """||X A - Y||^2 / ||Y||^2 from the sums X^T X, X^T Y and ||Y||^2."""
    residual = float(np.sum(coef * (gram @ coef)) - 2.0 * np.sum(coef * cross) + energy)
    return max(residual, 0.0) / max(energy, 1e-300)
