"""Shapes without weights: the skeleton, symbolic shape inference, folding static ``Shape`` reads, and refreshing
a model's value_info after an edit.

Layer 1, above :mod:`onnxprune.graph`: analysis, cost figures and passes all read shapes through it.

*Skeleton*: a copy of the model whose large tensors keep their dims but not their bytes, so shape inference costs
memory proportional to the graph, not to the weights. *Symbolic inference*: onnxruntime's
``SymbolicShapeInference``, which follows run-time shape computations and fused ops.

*Static shape reads* (:func:`fold_static_shape_reads`): exporters compute sizes from the tensors themselves:
``torch.chunk`` becomes
``Shape -> Gather -> Div -> Slice``, ``x.view(b, s, heads, -1)`` a ``Concat`` of gathered and constant pieces,
and grouped-query attention's K/V repeat an ``Expand`` whose target mixes the batch and sequence sizes (dynamic)
with the K/V head count (static). The structured pass calls it before channel analysis; it evaluates every small computation
downstream of ``Shape`` twice, with the dynamic dims set to two different sets of sizes; a value
that comes out equal both times does not depend on any dynamic dim, so it is a constant.

Such a value is replaced by an initializer where it is read by a shape input (Reshape/Expand
targets, Slice bounds, Split sizes) or by a computation whose result still varies (a ``Concat``
of a static head count with the dynamic batch size), but only when everything downstream ends in
shape inputs. The op rules then find the constant entry and rewrite it when channels are removed;
where they cannot, they freeze the channels. Run-time reads that lead anywhere else stay.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper

from .graph import GraphIndex, get_attr, value_shapes

#: Tensors with more elements than this lose their data in the skeleton.
SKELETON_MAX_ELEMENTS = 4096


def _strip(tensor: onnx.TensorProto) -> None:
    if int(np.prod(tensor.dims, dtype=np.int64)) > SKELETON_MAX_ELEMENTS:
        for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(name)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def skeleton(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
    """A copy of ``model`` without large tensor bytes and with concrete input dims."""
    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    graph = skel.graph
    src = model.graph
    graph.name = src.name
    for init in src.initializer:
        t = graph.initializer.add()
        t.name, t.data_type = init.name, init.data_type
        t.dims.extend(init.dims)
        if int(np.prod(init.dims, dtype=np.int64)) <= SKELETON_MAX_ELEMENTS:
            t.CopyFrom(init)
    for node in src.node:
        new = graph.node.add()
        new.CopyFrom(node)
        for attr in new.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _strip(attr.t)
    graph.output.extend(src.output)
    init_names = {i.name for i in src.initializer}
    for value in src.input:
        new = graph.input.add()
        new.CopyFrom(value)
        if value.name in init_names:
            continue
        dims = new.type.tensor_type.shape.dim if new.type.HasField("tensor_type") else []
        wanted = (input_shapes or {}).get(value.name)
        for axis, dim in enumerate(dims):
            if wanted is not None and axis < len(wanted):
                dim.Clear()
                dim.dim_value = int(wanted[axis])
            elif not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = 1 if axis == 0 else default_dynamic_dim(axis)
    return skel


def default_dynamic_dim(axis: int) -> int:
    """Value used for a dynamic dim that nobody specified: batch (axis 0) is 1, others 16."""
    return 1 if axis == 0 else 16


def refresh_value_info(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> None:
    """Drop stale intermediate shapes and re-infer them (graph inputs and outputs stay as they are).

    Shapes of custom-domain outputs (the exporter's word; their inputs' channels are frozen) are kept.
    """
    custom = {o for n in model.graph.node if n.domain not in ("", "ai.onnx") for o in n.output}
    kept = [v for v in model.graph.value_info if v.name in custom]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    try:
        header = header_only(model)
        header.graph.value_info.extend(kept)
        inferred = onnx.shape_inference.infer_shapes(header, strict_mode=False)
    except Exception:  # noqa: BLE001 - value_info is optional; the full checker runs on the result anyway
        return
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


def header_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without large tensor bytes and with its own (possibly symbolic) input dims: shape inference needs
    dims, not values."""
    skel = skeleton(model, None)
    del skel.graph.input[:]
    skel.graph.input.extend(model.graph.input)
    return skel


@functools.cache
def _symbolic_shape_inference_class():
    """onnxruntime's SymbolicShapeInference, loaded from its file: the ``onnxruntime.tools`` package
    imports torch when it is installed, which the runtime path must not pay for."""
    path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
    spec = importlib.util.spec_from_file_location("onnxprune._ort_symbolic_shape_infer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SymbolicShapeInference


def symbolic_inference(skel: onnx.ModelProto) -> onnx.ModelProto:
    """``skel`` with onnxruntime's symbolic shape inference applied, or unchanged where it fails.

    It follows run-time shape computations (``Shape -> Gather -> Slice/Expand/Range``, as
    transformer exports have) and onnxruntime's fused ops, which onnx's own inference leaves unknown.
    """
    try:
        SymbolicShapeInference = _symbolic_shape_inference_class()
        # SymbolicShapeInference.infer_shapes drops partial results (and writes a debug file into
        # the working directory) when some shape stays unknown; run its loop and keep what it found.
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(skel)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_
    except Exception:  # noqa: BLE001 - best effort; onnx's inference runs after it anyway
        return skel


def cast_along(index: GraphIndex, value: np.ndarray, chain: list[onnx.NodeProto]) -> np.ndarray:
    """``value`` (a constant that :meth:`GraphIndex.resolve` found behind ``chain``) in the element type at the
    chain's end: an int32 constant read through ``Cast(to=int64)`` is int64 there, so whatever is computed from
    it or written in its place has the type its reader expects (Paddle's int32 shape chains)."""
    for step in chain:
        if step.op_type == "Cast":
            value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(int(get_attr(step, "to"))))
        elif step.op_type == "CastLike" and len(step.input) > 1:
            like, _ = index.resolve(step.input[1])
            if like is not None:
                value = value.astype(like.dtype)
    return value



#: (op, input slot) pairs that read a shape-like tensor the op rules know how to rewrite.
SINKS = {("Slice", 1), ("Slice", 2), ("Split", 1), ("Reshape", 1), ("Expand", 1), ("Tile", 1)}
#: ops never evaluated here (random, control flow, or too costly for shape arithmetic).
_NOT_EVALUATED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                  "Bernoulli", "If", "Loop", "Scan", "SequenceConstruct"}
_MAX_ELEMENTS = 4096  # shape arithmetic is small; anything larger is data
# two runs; the k-th named dynamic dim is probe[k % 4] + (k // 4) * step: no two dims keep one difference
# (or ratio) in both runs, so only values that truly do not depend on them come out equal
_PROBES = ((1_000_003, 999_983, 999_979, 999_961, 101), (1_000_033, 1_000_037, 1_000_039, 1_000_081, 211))


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Shapes with dynamic dims kept symbolic (a name) or unknown (None); nothing is concretised."""
    skel = symbolic_inference(header_only(model))
    with contextlib.suppress(Exception):  # keep what symbolic inference found
        skel = onnx.shape_inference.infer_shapes(skel)
    return value_shapes(skel.graph, symbolic=True)


def fold_static_shape_reads(model: onnx.ModelProto) -> int:
    """Replace static values computed from ``Shape`` reads by constants (see module doc); returns how many."""
    shape_nodes = [n for n in model.graph.node if n.op_type == "Shape" and n.domain in ("", "ai.onnx")]
    if not shape_nodes:
        return 0
    shapes = _symbolic_shapes(model)
    index = GraphIndex.build(model.graph)
    runs = [_evaluate(model, index, shapes, probe) for probe in _PROBES]
    static = {name for name, value in runs[0].items()
              if name in runs[1] and value.shape == runs[1][name].shape and np.array_equal(value, runs[1][name])}
    only_shapes = _reaches_only_sinks(model, index, runs[0])
    folded = 0
    constants: dict[str, str] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name not in static or index.producer.get(name) is None or index.producer[name].op_type == "Constant":
                continue
            into_sink = (node.op_type, slot) in SINKS and node.domain in ("", "ai.onnx")
            into_dynamic = node.output and node.output[0] in runs[0] and node.output[0] not in static and all(
                only_shapes.get(out, False) for out in node.output)
            if not (into_sink or into_dynamic):
                continue
            if name not in constants:
                constants[name] = f"{name}.folded"
                model.graph.initializer.append(numpy_helper.from_array(runs[0][name], constants[name]))
                folded += 1
            node.input[slot] = constants[name]
    return folded


def _evaluate(model: onnx.ModelProto, index: GraphIndex, shapes: dict[str, list[int | str | None]],
              probe: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Values of every small computation downstream of Shape nodes, dynamic dims set from ``probe``."""
    sizes: dict[str, int] = {}
    unknown = iter(range(7, 10_000))

    def dim(d: int | str | None) -> int:
        if isinstance(d, int):
            return d
        if d is None:  # an anonymous dynamic dim: its own size
            return probe[0] * 7 + next(unknown) * (probe[1] - probe[0] + 1)
        if d not in sizes:
            sizes[d] = probe[len(sizes) % 4] + probe[4] * (len(sizes) // 4)
        return sizes[d]

    values: dict[str, np.ndarray] = {}
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_EVALUATED or not node.output:
            continue
        if node.op_type == "Shape":
            dims = shapes.get(node.input[0])
            if dims is None:
                continue
            full = np.array([dim(d) for d in dims], dtype=np.int64)
            values[node.output[0]] = full[int(get_attr(node, "start", 0)):get_attr(node, "end")]
            continue
        if not any(name in values for name in node.input):
            continue
        inputs = []
        for name in node.input:
            if not name:
                inputs.append(None)
            elif name in values:
                inputs.append(values[name])
            else:
                weight, chain = index.resolve(name)
                if weight is None or weight.size > _MAX_ELEMENTS or any(n.op_type == "Transpose" for n in chain):
                    break
                inputs.append(cast_along(index, weight.array(), chain))
        else:
            result = _run(node, inputs, opset)
            if result is not None and result.size <= _MAX_ELEMENTS:
                values[node.output[0]] = result
    return values


def _reaches_only_sinks(model: onnx.ModelProto, index: GraphIndex, values: dict[str, np.ndarray]) -> dict[str, bool]:
    """For each evaluated value: does everything downstream of it end in shape inputs (SINKS)?"""
    outputs = {o.name for o in model.graph.output}
    result: dict[str, bool] = {}
    for node in reversed(model.graph.node):
        for out in node.output:
            if out not in values:
                continue
            ok = out not in outputs
            for consumer, slot in index.consumers.get(out, []):
                if (consumer.op_type, slot) in SINKS:
                    continue
                if not consumer.output or not all(result.get(o, False) for o in consumer.output if o):
                    ok = False
            result[out] = ok
    return result


def _axes(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(v) for v in np.atleast_1d(inputs[1])]
    value = get_attr(node, "axes")
    return None if value is None else [int(v) for v in value]


def _fast(node: onnx.NodeProto, x: list[np.ndarray | None]) -> np.ndarray | None:
    """numpy for the common shape-arithmetic ops (the reference evaluator is slow per node)."""
    op = node.op_type
    if op in ("Add", "Sub", "Mul", "Equal") and len(x) == 2:
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal}[op]
        return fn(x[0], x[1])
    if op == "Div" and x[0].dtype.kind in "iu" and x[1].dtype.kind in "iu":
        return np.trunc(x[0] / x[1]).astype(np.result_type(x[0], x[1]))
    if op == "Gather":
        return np.take(x[0], x[1], axis=int(get_attr(node, "axis", 0)))
    if op == "Unsqueeze":
        axes = _axes(node, x)
        out = x[0]
        rank = out.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            out = np.expand_dims(out, axis)
        return out
    if op == "Squeeze":
        axes = _axes(node, x)
        return np.squeeze(x[0]) if axes is None else np.squeeze(x[0], axis=tuple(a % x[0].ndim for a in axes))
    if op == "Concat":
        return np.concatenate(x, axis=int(get_attr(node, "axis")))
    if op in ("Identity",):
        return x[0]
    if op == "Where":
        return np.where(x[0], x[1], x[2])
    if op == "Shape":
        return np.array(x[0].shape, dtype=np.int64)
    return None


def _run(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    """Evaluate one small node: numpy for common ops, else onnx's reference implementation."""
    from onnx.reference import ReferenceEvaluator

    if all(v is not None for v in inputs):
        try:
            fast = _fast(node, [np.asarray(v) for v in inputs])
        except Exception:  # noqa: BLE001 - let the reference implementation decide
            fast = None
        if fast is not None:
            return np.asarray(fast)

    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    copy = onnx.helper.make_node(node.op_type, names, ["out"], **{a.name: onnx.helper.get_attribute_value(a)
                                                                   for a in node.attribute})
    graph = onnx.helper.make_graph([copy], "fold", [], [onnx.helper.make_empty_tensor_value_info("out")],
                                   [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, inputs) if n])
    try:
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception:  # noqa: BLE001 - anything odd: do not fold
        return None
