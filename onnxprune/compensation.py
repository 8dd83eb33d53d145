"""Faithful removal: fold what removed channels still feed into their consumers' biases.

A removed channel is not always silent: with its producer weights zeroed it still outputs
its bias, BN shift or ``act(constant)``. onnxprune measures, in onnxruntime, the value each
removed channel carries into every consumer of the *zeroed* model (producer slices of the
removed channels set to zero, shapes unchanged), and adds ``W[:, c] * value`` to the
consumer's bias (adding a bias where there is none). When the value is constant over space
and the consumer reads no padding, the pruned model equals the zeroed model exactly;
otherwise the fold is the best constant (bias correction) and is reported as approximate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .analysis.groups import Analysis, WeightEdit, analyse
from .calibration import StageClock
from .gram import GramSum, RowSampler, _im2col, _patches, _reconstructable, auto_pad
from .graph import get_attr
from .model import PROTOBUF_LIMIT, tensor_bytes
from .refit import reconstruct, reconstruct_sparse
from .sessions import create_session, inference_session, session_options

#: the least-squares side lives in :mod:`onnxprune.refit` and :mod:`onnxprune.gram`; the passes import it from here
__all__ = ["GramSum", "RowSampler", "StageClock", "_im2col", "_patches", "_reconstructable", "fold_removed_constants",
           "reconstruct", "reconstruct_sparse", "zeroed_model"]


def zeroed_model(model: onnx.ModelProto, keep: np.ndarray, input_shapes=None,
                 approximate_layernorm: bool = False) -> onnx.ModelProto:
    """A copy with the producer weight slices of removed channels zeroed (channels zeroed in place)."""
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for edit in analyse(zeroed, input_shapes, approximate_layernorm=approximate_layernorm).edits:
        drop = ~keep[edit.ids]
        if edit.role == "producer" and drop.any():
            edit.weight.set_array(zero_slices(edit.weight.array(), edit.axis, drop))
    return zeroed


def zero_slices(values: np.ndarray, axis: int, drop: np.ndarray) -> np.ndarray:
    """``values`` with the slices ``drop`` (a mask along ``axis``) set to zero, in place; returns ``values``."""
    index = [slice(None)] * values.ndim
    index[axis] = drop
    values[tuple(index)] = 0
    return values


def _zeroed_producers(analysis, keep: np.ndarray) -> dict[str, np.ndarray] | None:
    """Producer weights with removed channels zeroed, by initializer name (None: some are not main-graph
    initializers, so the caller zeroes a copy of the model instead)."""
    zeros: dict[str, np.ndarray] = {}
    for edit in analysis.edits:
        drop = ~keep[edit.ids]
        if edit.role != "producer" or not drop.any():
            continue
        if edit.weight.kind != "initializer" or edit.weight.graph is not analysis.model.graph:
            return None
        values = zeros.get(edit.weight.name)
        if values is None:
            values = zeros[edit.weight.name] = edit.weight.array()
        zero_slices(values, edit.axis, drop)
    return zeros


_ZERO_TO_ZERO = {"Relu", "LeakyRelu", "PRelu", "Gelu", "Erf", "Tanh", "Neg", "Abs", "Sin", "Softsign", "HardSwish",
                 "Mish", "Identity", "Cast", "Dropout", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                 "Slice", "Split", "Expand", "Tile", "Resize", "MaxPool", "AveragePool", "GlobalAveragePool",
                 "GlobalMaxPool", "DepthToSpace", "SpaceToDepth"}


def _known_zero(analysis, name: str, memo: dict[str, bool]) -> bool:
    """Whether removed channels are exactly zero in ``name`` once their producers' weights are zeroed,
    decided from the graph alone: bias-free producers, then ops that map 0 to 0 (then nothing to fold).

    Walks producers with an explicit stack (a chain of thousands of element-wise ops must not hit
    Python's recursion limit); ``memo`` holds every answer, cycles and unknowns count as not zero."""
    stack, visiting = [name], set()
    while stack:
        current = stack[-1]
        if current in memo:
            stack.pop()
            continue
        needed = [i for i in _zero_inputs(analysis, current) if i not in memo]
        if needed and current not in visiting:
            visiting.add(current)
            stack.extend(needed)
            continue
        memo[current] = _zero_from_inputs(analysis, current, memo)
        stack.pop()
    return memo[name]


def _zero_inputs(analysis, name: str) -> list[str]:
    """The annotated inputs whose answers decide :func:`_known_zero` for ``name`` (none for producers)."""
    node = analysis.index.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx") or _weighted(analysis, node):
        return []
    annotated = [i for i in node.input if i in analysis.ann]
    if node.op_type in ("Mul", "MatMul"):
        return annotated
    if node.op_type in ("Add", "Sub", "Sum", "Concat", "Max", "Min"):  # zero only when every input is
        return annotated if len(annotated) == len([i for i in node.input if i]) else []
    if node.op_type == "Div" or node.op_type in _ZERO_TO_ZERO:
        return [node.input[0]] if node.input[0] in annotated else []
    return []


def _weighted(analysis, node: onnx.NodeProto) -> bool:
    return node.op_type in ("MatMul", "Conv", "ConvTranspose", "Gemm") and len(node.input) > 1 and \
        analysis.index.resolve(node.input[1])[0] is not None


def _zero_from_inputs(analysis, name: str, memo: dict[str, bool]) -> bool:
    """:func:`_known_zero` for ``name`` once its inputs are decided (missing answers: a cycle, not zero)."""
    node = analysis.index.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if _weighted(analysis, node):  # a producer: its output channels are zeroed rows/columns, unless a bias is added
        return len(node.input) < 3 or not node.input[2]
    annotated = [i for i in node.input if i in analysis.ann]
    if node.op_type in ("Mul", "MatMul"):  # anything times zero
        return any(memo.get(i, False) for i in annotated)
    if node.op_type in ("Add", "Sub", "Sum", "Concat", "Max", "Min"):
        return bool(annotated) and len(annotated) == len([i for i in node.input if i]) and all(
            memo.get(i, False) for i in annotated)
    if node.op_type == "Div" or node.op_type in _ZERO_TO_ZERO:
        return node.input[0] in annotated and memo.get(node.input[0], False)
    return False


def _foldable(edit: WeightEdit, analysis) -> bool:
    node = edit.node
    if edit.role != "consumer" or node.op_type not in ("Conv", "Gemm", "MatMul"):
        return False
    if node.op_type == "Conv" and int(get_attr(node, "group", 1)) != 1:
        return False  # depthwise: its own output channel goes too
    _, chain = analysis.index.resolve(node.input[1])
    return not any(step.op_type == "Transpose" for step in chain)


def _reads_padding(node: onnx.NodeProto) -> bool:
    if node.op_type != "Conv":
        return False
    pads = get_attr(node, "pads") or []
    return any(int(p) for p in pads) or auto_pad(node) not in ("NOTSET", "VALID")


def fold_removed_constants(model: onnx.ModelProto, keep: np.ndarray, feeds: list[dict[str, np.ndarray]],
                           input_shapes=None, approximate_layernorm: bool = False,
                           analysis: Analysis | None = None) -> dict[str, Any]:
    """Measure removed channels' values in the zeroed model and fold them into consumer biases (``analysis``: the
    one ``keep`` was chosen on, when the caller has it, so the graph is not analysed twice)."""
    if analysis is None:
        analysis = analyse(model, input_shapes, approximate_layernorm=approximate_layernorm)
    edits = [e for e in analysis.edits if _foldable(e, analysis) and not keep[e.ids].all()]
    summary = {"consumers": 0, "exact": 0, "approximate": 0, "skipped": []}
    if not edits or not feeds:
        return summary
    memo: dict[str, bool] = {}
    edits = [e for e in edits if not _known_zero(analysis, e.node.input[0], memo)]
    if not edits:  # removed channels are exactly zero where they are read (no biases on their path)
        return summary
    names = sorted({e.node.input[0] for e in edits})
    # log level 4: a failing run is reported in the summary; no prepacking: one run, no second copy of the weights
    options = session_options(log_level=4, prepacking=False)
    zeros = _zeroed_producers(analysis, keep)
    if zeros is not None:  # the zeroed model is the model with a few weights swapped: no copy of the rest
        session = inference_session(model, outputs=names, replaced=zeros, options=options)
    else:
        if tensor_bytes(model) >= PROTOBUF_LIMIT:
            summary["skipped"].append("model over 2 GB with weights in Constant nodes: constants not folded")
            return summary
        zeroed = zeroed_model(model, keep, input_shapes, approximate_layernorm)
        del zeroed.graph.output[:]
        zeroed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
        session = create_session(zeroed, options)
    try:
        runs = [dict(zip(names, session.run(names, feed))) for feed in feeds]
    except Exception as exc:  # noqa: BLE001 - e.g. synthetic inputs whose sizes the model does not accept
        summary["skipped"].append("the model did not run on the inputs used to measure removed channels "
                                  f"({str(exc).strip().splitlines()[0][:200]}): their constant outputs were not "
                                  "folded into the next layers' biases; give --data or --calibration-data")
        return summary
    finally:
        del session
    for edit in edits:
        name = edit.node.input[0]
        axis = analysis.ann[name].axis
        drop = np.flatnonzero(~keep[edit.ids])
        per_run = [np.moveaxis(r[name].astype(np.float64), axis, 0)[drop].reshape(len(drop), -1) for r in runs]
        stacked = np.concatenate(per_run, axis=1)
        values = stacked.mean(axis=1)
        constant = np.allclose(stacked, values[:, None], rtol=1e-5, atol=1e-6)
        if not np.any(values):
            continue
        _add_to_bias(model, analysis, edit, drop, values)
        summary["consumers"] += 1
        exact = constant and not (_reads_padding(edit.node) and np.any(values))
        summary["exact" if exact else "approximate"] += 1
    return summary


def _add_to_bias(model: onnx.ModelProto, analysis, edit: WeightEdit, drop: np.ndarray, values: np.ndarray) -> None:
    node, weight = edit.node, edit.weight.array().astype(np.float64)
    if node.op_type == "Conv":
        taken = np.take(weight, drop, axis=1).reshape(weight.shape[0], len(drop), -1).sum(axis=2)
        delta = taken @ values
    elif node.op_type == "Gemm" and get_attr(node, "transB", 0):
        delta = np.take(weight, drop, axis=1) @ values
    else:  # Gemm B [K, N] or MatMul B [K, N]
        delta = values @ np.take(weight, drop, axis=0)
    dtype = _read_dtype(edit.weight.dtype, analysis.index.resolve(node.input[1])[1])  # fp16 Cast to float
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        bias, chain = analysis.index.resolve(node.input[2])
        if bias is not None:
            shared = bool(chain) or len(analysis.index.consumers.get(bias.name, [])) != 1
            if not shared or any(step.op_type != "Identity" for step in chain):
                bias.set_array((bias.array().astype(np.float64) + delta).astype(bias.dtype))
                return
            delta, dtype = bias.array().astype(np.float64) + delta, bias.dtype  # shared: this node gets a copy
    if node.op_type == "MatMul" and _add_to_following_bias(analysis, node, delta):
        return
    name = f"{node.name or node.output[0]}.folded_bias"
    model.graph.initializer.append(numpy_helper.from_array(delta.astype(dtype), name))
    if node.op_type in ("Conv", "Gemm"):
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        return
    original = node.output[0]
    node.output[0] = f"{original}.before_folded_bias"
    position = list(model.graph.node).index(node)
    model.graph.node.insert(position + 1, onnx.helper.make_node(
        "Add", [node.output[0], name], [original], name=f"{node.name or original}.folded_bias_add"))


def _add_to_following_bias(analysis, node: onnx.NodeProto, delta: np.ndarray) -> bool:
    """MatMul followed only by ``Add(bias)`` with a constant bias of the output width: fold there."""
    consumers = analysis.index.consumers.get(node.output[0], [])
    if len(consumers) != 1 or consumers[0][0].op_type != "Add":
        return False
    add, slot = consumers[0]
    bias, chain = analysis.index.resolve(add.input[1 - slot])
    if bias is None or any(step.op_type == "Transpose" for step in chain):
        return False
    if bias.shape not in ((len(delta),), (1, len(delta))):
        return False
    shared = len(analysis.index.consumers.get(bias.name, [])) != 1 or chain
    if not shared:
        bias.set_array((bias.array().astype(np.float64) + delta.reshape(bias.shape)).astype(bias.dtype))
        return True
    # a bias shared by several layers (or reached through Identity/Cast): this Add gets its own copy
    dtype = _read_dtype(bias.dtype, chain)
    name = f"{add.name or add.output[0]}.folded_bias"
    values = (bias.array().astype(np.float64) + delta.reshape(bias.shape)).astype(dtype)
    analysis.model.graph.initializer.append(numpy_helper.from_array(values, name))
    add.input[1 - slot] = name
    return True


def _read_dtype(stored: np.dtype, chain: list[onnx.NodeProto]) -> np.dtype:
    """The dtype a weight stored as ``stored`` is read in after its chain of Identity/Cast/... steps."""
    dtype = stored
    for step in chain:
        if step.op_type == "Cast":
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(get_attr(step, "to"))))
    return dtype
