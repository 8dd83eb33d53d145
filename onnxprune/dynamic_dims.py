"""Candidate sizes for the dynamic dims of a model's inputs, read from the graph: sizes it states (metadata, doc
strings), the product of strides from an input to its deepest feature map, fixed dims of sibling inputs, dim names
shared between inputs, then common sizes (:class:`DimPlan`; ``synthetic`` tries them in onnxruntime)."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import get_attr, iter_graphs, node_subgraphs
from .specs import InputSpec

#: sizes tried for dynamic dims after the graph's own suggestions, smallest (cheapest) first.
COMMON_SIZES = (32, 64, 128, 224, 320, 640)
#: a dynamic dim nobody specified: batch 1, other dims this (rounded up to the graph's stride).
DEFAULT_SIZE = 16

SIZE_KEYS = {"imgsz", "img_size", "image_size", "imagesize", "input_size", "inputsize", "input_shape", "inputshape",
             "shape", "size", "resolution", "input_resolution", "image_shape", "img_shape"}
STRIDE_KEYS = {"stride", "max_stride", "output_stride", "size_divisor", "size_divisibility"}
BATCH_NAMES = re.compile(r"^(n|b|bs|batch|batch_?size|batches|num_batch(es)?)$", re.IGNORECASE)
#: dim_param spellings that mean "unknown", not a name shared with other dims
PLACEHOLDER_NAMES = {"?", "-1", "none", "null", "dynamic", "unk", "unknown"}
DOWNSAMPLE_OPS = {"Conv", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv", "DeformConv"}


class DimPlan:
    """Which dims are fixed, which are batch (1), which must be chosen, and the candidates for them."""

    def __init__(self, model: onnx.ModelProto, specs: list[InputSpec], given: dict[str, list[int]]):
        self.model, self.specs = model, specs
        names = _dim_names(model)
        shared = _shared_given(specs, names, given)
        dynamic_batch = any(s.shape and s.shape[0] is None and s.name not in given for s in specs)
        self.dims: dict[str, list[int | str]] = {}
        self.batch: set[str] = set()
        for spec in specs:
            if spec.name in given:
                self.dims[spec.name] = list(given[spec.name])
                continue
            row: list[int | str] = []
            for axis, dim in enumerate(spec.shape):
                param = names.get(spec.name, [None] * len(spec.shape))[axis]
                key = f"name:{param}" if param else f"{spec.name}#{axis}"
                if dim is not None:
                    row.append(dim)
                elif key in shared:
                    row.append(shared[key])
                else:
                    row.append(key)
                    if axis == 0 or (param and BATCH_NAMES.match(param)) or (
                            dynamic_batch and not param and _lone_middle_dim(spec, axis)):
                        self.batch.add(key)
            self.dims[spec.name] = row
        self.given = bool(given)
        self.free = list(dict.fromkeys(k for row in self.dims.values() for k in row
                                       if isinstance(k, str) and k not in self.batch))
        open_inputs = [s for s in specs if any(k in self.free for k in self.dims[s.name])]
        strides = _strides(model, [s.name for s in open_inputs])
        stated = _metadata_stride(model)
        self.stride: dict[str, int] = {}
        for spec in open_inputs:
            for axis, key in enumerate(self.dims[spec.name]):
                if key in self.free:
                    step = strides[spec.name][axis - len(spec.shape)] if axis - len(spec.shape) >= -3 else 1
                    if spec.type.startswith("tensor(float") and len(spec.shape) >= 3 and axis >= len(spec.shape) - 2:
                        step = max(step, stated)
                    self.stride[key] = max(self.stride.get(key, 1), step)

    def shapes(self, values: dict[str, int]) -> dict[str, list[int]]:
        return {name: [d if isinstance(d, int) else (1 if d in self.batch else values[d]) for d in row]
                for name, row in self.dims.items()}

    def candidates(self) -> list[tuple[str, dict[str, list[int]]]]:
        """(how, shapes) in the order to try them, without repeats."""
        if not self.free:
            how = "--input-shape" if self.given else "static"
            return [(f"{how}, batch 1" if self.batch else how, self.shapes({}))]
        default = {k: _round_up(DEFAULT_SIZE, self.stride[k]) for k in self.free}
        strides = "x".join(str(self.stride[k]) for k in self.free)
        found: list[tuple[str, dict[str, int]]] = []
        for how, sizes in _hinted_sizes(self.model, self.specs, self.dims, self.free):
            found.append((how, {**default, **sizes}))
        rounded = any(self.stride[k] > 1 for k in self.free)
        found.append((f"default {DEFAULT_SIZE} rounded up to the graph's strides {strides}" if rounded else "default",
                      default))
        siblings = _sibling_sizes(self.specs, self.dims, self.free)
        if siblings:
            found.append(("fixed dims of sibling inputs", {**default, **siblings}))
        for size in COMMON_SIZES:
            found.append((f"common size {size}", {k: _round_up(size, self.stride[k]) for k in self.free}))
        out, seen = [], set()
        for how, values in found:
            shapes = self.shapes(values)
            key = repr(sorted(shapes.items()))
            if key not in seen:
                seen.add(key)
                out.append((how, shapes))
        return out


def _metadata_stride(model: onnx.ModelProto) -> int:
    """A stride the model states in its metadata (``stride``: 32), else 1."""
    for prop in model.metadata_props:
        numbers = re.findall(r"\d+", prop.value) if prop.key.lower() in STRIDE_KEYS else []
        if numbers and 1 < int(max(numbers, key=int)) <= 1024:
            return int(max(numbers, key=int))
    return 1


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def _lone_middle_dim(spec: InputSpec, axis: int) -> bool:
    """A state-like input ([layers, batch, hidden]): static outer dims around its only dynamic one."""
    dynamic = [i for i, d in enumerate(spec.shape) if d is None]
    return len(spec.shape) >= 3 and dynamic == [axis] and 0 < axis < len(spec.shape) - 1


def _dim_names(model: onnx.ModelProto) -> dict[str, list[str | None]]:
    out = {}
    for value in model.graph.input:
        if value.type.HasField("tensor_type"):
            out[value.name] = [d.dim_param if d.dim_param.strip().lower() not in PLACEHOLDER_NAMES | {""} else None
                               for d in value.type.tensor_type.shape.dim]
    return out


def _shared_given(specs, names, given) -> dict[str, int]:
    """Dim names fixed by ``--input-shape`` on one input, for the other inputs that share the name."""
    shared: dict[str, int] = {}
    for spec in specs:
        for axis, param in enumerate(names.get(spec.name, [])):
            if spec.name in given and param and axis < len(given[spec.name]):
                shared.setdefault(f"name:{param}", int(given[spec.name][axis]))
    return shared


def _hinted_sizes(model, specs, dims, free) -> list[tuple[str, dict[str, int]]]:
    """Sizes the model states about itself: metadata (``imgsz``, ``input_size``...) and doc strings."""
    texts = [(f"metadata {p.key}", p.value) for p in model.metadata_props if p.key.lower() in SIZE_KEYS]
    docs = [model.doc_string, model.graph.doc_string, *(v.doc_string for v in model.graph.input)]
    for doc in docs:
        for match in re.finditer(r"\b\d+(?:\s*[x×]\s*\d+)+\b", doc or ""):
            texts.append(("doc string", match.group(0)))
    out = []
    for how, text in texts:
        numbers = [int(n) for n in re.findall(r"\d+", text)][:8]
        if numbers and all(0 < n <= 8192 for n in numbers):
            sizes = _place(numbers, specs, dims, free)
            if sizes:
                out.append((f"{how} {'x'.join(map(str, numbers))}", sizes))
    return out


def _place(numbers: list[int], specs, dims, free) -> dict[str, int]:
    """Map stated sizes onto free dims: a full shape of one input, or its trailing (spatial) dims."""
    sizes: dict[str, int] = {}
    for spec in specs:
        row = dims[spec.name]
        keys = [k for k in row if isinstance(k, str) and k in free]
        if not keys or not spec.type.startswith("tensor(float"):
            continue
        if len(numbers) == len(row) and all(not isinstance(d, int) or d == n for d, n in zip(row, numbers)):
            sizes.update({d: n for d, n in zip(row, numbers) if isinstance(d, str) and d in free})
        elif len(numbers) == 1:
            sizes.update({k: numbers[0] for k in keys})
        elif len(numbers) <= len(keys):
            sizes.update(dict(zip(keys[-len(numbers):], numbers)))
    return sizes


def _sibling_sizes(specs, dims, free) -> dict[str, int]:
    """A free dim takes the fixed size another input of the same rank has on the same axis."""
    sizes: dict[str, int] = {}
    for spec in specs:
        for axis, key in enumerate(dims[spec.name]):
            if not isinstance(key, str) or key not in free or key in sizes:
                continue
            for other in specs:
                theirs = dims[other.name]
                if other.name != spec.name and len(theirs) == len(spec.shape) and isinstance(theirs[axis], int) \
                        and theirs[axis] > 1 and other.shape[axis] is not None:
                    sizes[key] = theirs[axis]
                    break
    return sizes


def nodes_in_order(graph: onnx.GraphProto):
    """Every node of ``graph`` and its subgraphs, each subgraph's nodes before the node that owns it (no recursion)."""
    stack: list[tuple[Any, bool]] = [(n, False) for n in reversed(graph.node)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            yield node
            continue
        stack.append((node, True))
        for sub in reversed(node_subgraphs(node)):
            stack.extend((n, False) for n in reversed(sub.node))


def _strides(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Per input: the largest downsampling factor (product of strides and Resize scales) reached from it,
    for each of its last three axes (the spatial axes of 1-D to 3-D convolutions)."""
    if not names:
        return {}
    consts = graph_constants(model, max_elements=16)
    nodes = list(nodes_in_order(model.graph))
    out = {}
    for name in names:
        factor: dict[str, tuple[float, ...]] = {name: (1.0, 1.0, 1.0)}
        deepest = (1.0, 1.0, 1.0)
        for node in nodes:
            reached = [factor[x] for x in node.input if x in factor]
            if not reached or node.op_type in ("Shape", "Size"):
                continue
            scale = _node_scale(node, consts)
            f = tuple(max(r[i] for r in reached) * scale[i] for i in range(3))
            deepest = tuple(max(a, b) for a, b in zip(deepest, f))
            factor.update({o: f for o in node.output if o})
        out[name] = tuple(round(d) if 1 < d <= 1024 and abs(d - round(d)) < 1e-6 else 1 for d in deepest)
    return out


def _node_scale(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """How much ``node`` shrinks each of the last three axes (2 for a stride-2 conv, 0.5 for a 2x upsample)."""
    steps: list[float] = []
    if node.op_type in DOWNSAMPLE_OPS:
        steps = [float(s) for s in get_attr(node, "strides", None) or []]
    elif node.op_type == "ConvTranspose":
        steps = [1.0 / s for s in get_attr(node, "strides", None) or [] if s > 0]
    elif node.op_type in ("Resize", "Upsample"):
        index = 2 if node.op_type == "Resize" else 1
        scales = get_attr(node, "scales", None)
        if scales is None and len(node.input) > index and node.input[index] in consts:
            scales = consts[node.input[index]].reshape(-1).tolist()
        steps = [1.0 / s if s > 0 else 1.0 for s in (scales or [])[2:]]
    steps = ([1.0, 1.0, 1.0] + steps)[-3:]
    return steps[0], steps[1], steps[2]


def graph_constants(model: onnx.ModelProto, max_elements: int) -> dict[str, np.ndarray]:
    """Small constant tensors of every graph (initializers and Constant nodes), by name."""
    out: dict[str, np.ndarray] = {}
    for graph in iter_graphs(model.graph):
        tensors = list(graph.initializer)
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                value = constant_value(node)
                if value is not None and value.size <= max_elements:
                    out[node.output[0]] = value
        for tensor in tensors:
            small = int(np.prod(tensor.dims, dtype=np.int64)) <= max_elements
            if small and tensor.data_location != onnx.TensorProto.EXTERNAL:
                try:
                    out[tensor.name] = numpy_helper.to_array(tensor)
                except Exception:  # noqa: BLE001, S112 - a malformed tensor is not a hint
                    continue
    return out


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        try:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
                return np.asarray(onnx.helper.get_attribute_value(attr))
        except Exception:  # noqa: BLE001 - a malformed constant is not a hint
            return None
    return None
