"""Inputs for onnxruntime runs: the graph's input specs, ``--data`` files, and synthetic inputs that run the model.

Dynamic dims are chosen so that the *original* model runs. Candidates come from the graph itself
(sizes in metadata and doc strings, the product of strides from an input to its deepest feature
map, fixed dims of sibling inputs, dim names shared between inputs), then common sizes; each is
tried in onnxruntime, the most likely first, at most :data:`MAX_TRIALS` runs of one session.
Integer inputs take the values the graph compares them with, stay within the table they index,
or are small positive counts. ``prune`` and ``inspect`` resolve shapes through :func:`resolve_inputs`,
so both analyse the model at the same sizes.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .config import ValidateConfig
from .errors import InputDataError
from .graph import get_attr, iter_graphs, node_subgraphs
from .model import PROTOBUF_LIMIT
from .sessions import create_session, session_options

ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}

#: onnxruntime runs of the original model that shape resolution may spend (one session for all).
MAX_TRIALS = 8
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
PASS_THROUGH = {"Cast", "CastLike", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"}
COMPARE_OPS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}
#: (op, input index) that take a count or a size: an integer input there is a small positive number
COUNT_INPUTS = {("Range", 1), ("Range", 2), ("Tile", 1), ("Expand", 1), ("ConstantOfShape", 0)}
DOWNSAMPLE_OPS = {"Conv", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv", "DeformConv"}


@dataclass
class InputSpec:
    """A graph input the caller must feed: name, ``tensor(...)`` type string, dims (None = dynamic)."""

    name: str
    type: str
    shape: list[int | None]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs to feed (graph inputs that are not initializers), read from the graph."""
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        type_name = onnx.helper.tensor_dtype_to_string(tensor_type.elem_type).replace("TensorProto.", "").lower()
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        specs.append(InputSpec(value.name, f"tensor({type_name})", dims))
    return specs


# --------------------------------------------------------------------------------------
# The resolution
# --------------------------------------------------------------------------------------


def batch_axes(specs: list[InputSpec]) -> dict[str, int | None]:
    """The axis along which each input stacks samples: axis 0 when it is dynamic or 1, else the first dynamic
    axis (a recurrent state such as ``[2, batch, 128]``); None for an input without one (a 0-d sample rate), which
    every sample shares."""
    axes: dict[str, int | None] = {}
    for spec in specs:
        dynamic = [i for i, d in enumerate(spec.shape) if not isinstance(d, int) or d <= 0]
        axes[spec.name] = 0 if spec.shape and (0 in dynamic or spec.shape[0] == 1) else (
            dynamic[0] if dynamic else None)
    return axes


def sample_count(feed: dict[str, np.ndarray], axes: dict[str, int | None]) -> int:
    """How many samples ``feed`` holds (1 when no input has a sample axis)."""
    counts = [arr.shape[axes[name]] for name, arr in feed.items()
              if axes.get(name) is not None and arr.ndim > axes[name]]
    return min(counts) if counts else 1


def split_samples(feed: dict[str, np.ndarray], axes: dict[str, int | None], step: int) -> list[dict[str, np.ndarray]]:
    """``feed`` in batches of ``step`` samples along each input's sample axis (:func:`batch_axes`)."""
    count = sample_count(feed, axes)
    return [take_samples(feed, axes, start, min(start + step, count)) for start in range(0, count, step)]


def check_feed(arrays: dict[str, np.ndarray], specs: list[InputSpec], where: str, *, any_samples: bool
               ) -> dict[str, np.ndarray]:
    """``arrays`` checked against the model inputs: names (``labels`` aside), dtypes and shapes; ``where`` starts
    each error. The sample axis may hold any number of samples with ``any_samples``, else only where the model
    fixes it to 1 (then the samples run one by one)."""
    names = {spec.name for spec in specs}
    missing, extra = sorted(names - arrays.keys()), sorted(arrays.keys() - names - {"labels"})
    if missing or extra:
        raise InputDataError(f"{where}: names do not match the model inputs"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unknown {', '.join(extra)}" if extra else ""))
    feeds: dict[str, np.ndarray] = {}
    axes = batch_axes(specs)
    for spec in specs:
        arr = np.asarray(arrays[spec.name])
        want = ORT_TYPES.get(spec.type)
        if want is not None and arr.dtype != np.dtype(want):
            raise InputDataError(f"{where}: {spec.name} has dtype {arr.dtype}, the model expects {np.dtype(want)}")
        axis = axes[spec.name]
        if arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d > 0 and d != s and not (i == axis and (any_samples or d == 1))
            for i, (d, s) in enumerate(zip(spec.shape, arr.shape))
        ):
            raise InputDataError(f"{where}: {spec.name} has shape {list(arr.shape)}, the model expects {spec.shape}")
        feeds[spec.name] = arr
    return feeds


def take_samples(feed: dict[str, np.ndarray], axes: dict[str, int | None], start: int, stop: int
                 ) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` of ``feed`` (inputs without a sample axis are passed whole)."""
    out = {}
    for name, arr in feed.items():
        axis = axes.get(name)
        out[name] = arr if axis is None or arr.ndim <= axis else np.take(arr, range(start, stop), axis=axis)
    return out


@dataclass
class Resolution:
    """Concrete shapes for every input, integer values read from the graph, and how they were found."""

    shapes: dict[str, list[int]]
    how: str
    values: dict[str, str] = field(default_factory=dict)
    choice: dict[str, int] = field(default_factory=dict)
    trials: int = 0
    ran: bool | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": {k: list(v) for k, v in self.shapes.items()}, "how": self.how, "values": dict(self.values),
                "trials": self.trials, "ran": self.ran, "error": self.error}


def describe_resolution(res: dict[str, Any]) -> str:
    """One line: the synthetic input shapes, how they were found and whether the original model ran on them."""
    shapes = ", ".join(f"{k} {'x'.join(map(str, s)) or 'scalar'}" for k, s in res["shapes"].items())
    values = "".join(f"; {k} {v}" for k, v in res.get("values", {}).items())
    tries = f"{res['trials']} tr{'y' if res['trials'] == 1 else 'ies'}"
    ran = {True: f"the original model runs on them ({tries})", None: "not run",
           False: f"the original model ran on none of {tries}: {res.get('error')}"}[res.get("ran")]
    return f"synthetic inputs: {shapes} ({res['how']}{values}); {ran}"


def resolve_inputs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, *, seed: int = 0,
                   path: str | os.PathLike | None = None) -> Resolution:
    """Shapes (and integer values) for synthetic inputs on which the original model runs.

    ``input_shapes`` (``--input-shape``) win; dims they leave open are resolved from the graph and
    checked by running the model (``path`` when given, which handles external data). Never raises
    for a model that does not run: the first candidate is returned with ``ran=False``.
    """
    specs = input_specs(model)
    given = _check_given(specs, dict(input_shapes or {}))
    plan = _DimPlan(model, specs, given)
    rules = integer_rules(model, specs)
    candidates = plan.candidates()
    choices = _value_choices(rules)
    first = Resolution(candidates[0][1], candidates[0][0], _values_text(rules, choices[0]), choices[0])
    if not plan.free and not any(rule[0] == "values" for rule in rules.values()):
        return first  # nothing was guessed
    return _try_candidates(model, path, specs, rules, candidates, choices, seed, first)


def _check_given(specs: list[InputSpec], input_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    names = {spec.name for spec in specs}
    for name in input_shapes:
        if name not in names:
            raise InputDataError(f"--input-shape names unknown input {name!r} (inputs: {', '.join(sorted(names))})")
    for spec in specs:
        given = input_shapes.get(spec.name)
        if given is None:
            continue
        if len(given) != len(spec.shape):
            raise InputDataError(f"--input-shape {spec.name}: rank {len(given)} but the model input has rank "
                                 f"{len(spec.shape)}")
        for axis, (want, have) in enumerate(zip(given, spec.shape)):
            if isinstance(have, int) and have > 0 and have != want:
                raise InputDataError(f"--input-shape {spec.name}: axis {axis} is fixed to {have} in the model, "
                                     f"got {want}")
    return input_shapes


def _try_candidates(model, path, specs, rules, candidates, choices, seed, first: Resolution) -> Resolution:
    """Run the original model on each candidate until one works (at most MAX_TRIALS runs)."""
    try:
        session = _session(model, path)
    except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot load: nothing to choose by
        first.ran, first.error = False, f"onnxruntime cannot load it ({_first_line(exc)})"
        return first
    trials, error = 0, None
    for (how, shapes), choice in itertools.islice(itertools.product(candidates, choices), MAX_TRIALS):
        try:
            feeds = synthesize_inputs(specs, shapes, None, seed, rules=rules, choice=choice)
        except InputDataError as exc:  # a type nothing can be synthesised for (strings): no run can tell
            first.ran, first.error = False, str(exc)
            return first
        trials += 1
        try:
            session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - sizes or values the model does not accept
            error = error or f"{how}: {_first_line(exc)}"
            continue
        return Resolution(shapes, how, _values_text(rules, choice), choice, trials, True)
    first.trials, first.ran, first.error = trials, False, error
    return first


def _session(model: onnx.ModelProto, path):
    options = session_options(threads=1, inter_threads=1, log_level=4, spinning=False)
    if path is not None:
        return create_session(path, options)
    if model.ByteSize() >= PROTOBUF_LIMIT:
        raise InputDataError("the model is too large to run from memory")
    return create_session(model, options)


def _first_line(exc: BaseException) -> str:
    """The part of an onnxruntime message that names the failing node and why (its source path dropped)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"/\S+?\.(cc|h|cpp):\d+\s*", "", text)
    return text[:400]


# --------------------------------------------------------------------------------------
# Dynamic dims
# --------------------------------------------------------------------------------------


class _DimPlan:
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


def _nodes_in_order(graph: onnx.GraphProto):
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
    consts = _constants(model, max_elements=16)
    nodes = list(_nodes_in_order(model.graph))
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


def _constants(model: onnx.ModelProto, max_elements: int) -> dict[str, np.ndarray]:
    """Small constant tensors of every graph (initializers and Constant nodes), by name."""
    out: dict[str, np.ndarray] = {}
    for graph in iter_graphs(model.graph):
        tensors = list(graph.initializer)
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                value = _constant_value(node)
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


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        try:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
                return np.asarray(onnx.helper.get_attribute_value(attr))
        except Exception:  # noqa: BLE001 - a malformed constant is not a hint
            return None
    return None


# --------------------------------------------------------------------------------------
# Integer inputs
# --------------------------------------------------------------------------------------


def integer_rules(model: onnx.ModelProto | None, specs: list[InputSpec]) -> dict[str, tuple]:
    """How to fill each integer input, read from the graph.

    ``("values", [...])``: a small input compared with constants (Equal/Less/Greater...); ``("index", rows)``:
    a Gather index into a constant table; ``("count",)``: a Range/Tile/Expand count; ``("ones",)``: a mask;
    ``("random",)``: anything else, drawn from [0, 10).
    """
    rules: dict[str, tuple] = {}
    ints = [s for s in specs if ORT_TYPES.get(s.type) is not None and np.issubdtype(ORT_TYPES[s.type], np.integer)]
    if not ints:
        return rules
    uses = _uses(model) if model is not None else {}
    consts = _constants(model, max_elements=64) if model is not None else {}
    tables = _table_rows(model) if model is not None else {}
    for spec in ints:
        if "mask" in spec.name.lower():
            rules[spec.name] = ("ones",)
            continue
        compared, rows, count = [], None, False
        for node, index in _reached_uses(spec.name, uses):
            other = node.input[1 - index] if node.op_type in COMPARE_OPS and index < 2 else None
            if other in consts:
                compared.extend(v for v in consts[other].reshape(-1).tolist() if v not in compared)
            elif node.op_type == "Gather" and index == 1 and node.input[0] in tables:
                table, axis = tables[node.input[0]], get_attr(node, "axis", 0)
                if -len(table) <= axis < len(table):
                    rows = min(rows or 1 << 62, int(table[axis]))
            elif (node.op_type, index) in COUNT_INPUTS:
                count = True
        small = all(d is not None for d in spec.shape) and int(np.prod(spec.shape or [1])) <= 4
        if compared and small:
            rules[spec.name] = ("values", [int(v) for v in compared[:4]])
        elif rows is not None:
            rules[spec.name] = ("index", max(rows, 1))
        elif count:
            rules[spec.name] = ("count",)
        else:
            rules[spec.name] = ("random",)
    return rules


def _values_text(rules: dict[str, tuple], choice: dict[str, int]) -> dict[str, str]:
    """What each integer input was filled with, and why (for the report)."""
    text = {}
    for name, rule in rules.items():
        if rule[0] == "values":
            text[name] = f"= {rule[1][choice.get(name, 0)]} (the graph compares it with {'/'.join(map(str, rule[1]))})"
        elif rule[0] == "index":
            text[name] = f"in [0, {rule[1]}) (rows of the table it indexes)"
        elif rule[0] == "count":
            text[name] = "in [1, 4] (a count)"
        elif rule[0] == "ones":
            text[name] = "ones (a mask)"
    return text


def _value_choices(rules: dict[str, tuple]) -> list[dict[str, int]]:
    """Which compared value each such input takes, one dict per trial: the first values, then the others."""
    compared = {name: rule[1] for name, rule in rules.items() if rule[0] == "values"}
    depth = max((len(v) for v in compared.values()), default=1)
    return [{name: min(i, len(v) - 1) for name, v in compared.items()} for i in range(depth)]


def _uses(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in _nodes_in_order(model.graph):
        for index, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node, index))
    return uses


def _reached_uses(name: str, uses) -> list[tuple[onnx.NodeProto, int]]:
    """Uses of ``name`` and of what Cast/Identity/Squeeze/Reshape... make of it."""
    found, todo, seen = [], [name], {name}
    while todo:
        for node, index in uses.get(todo.pop(), []):
            if node.op_type in PASS_THROUGH and index == 0:
                todo.extend(o for o in node.output if o and o not in seen)
                seen.update(node.output)
            else:
                found.append((node, index))
    return found


def _table_rows(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Dims of the constant tables (initializers, Constant nodes) by name."""
    dims: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in _nodes_in_order(model.graph):
        if node.op_type == "Constant" and node.output:
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            if tensor is not None:
                dims[node.output[0]] = list(tensor.dims)
    return {name: d for name, d in dims.items() if d}


# --------------------------------------------------------------------------------------
# Feeds
# --------------------------------------------------------------------------------------


def prepare_feeds(model: onnx.ModelProto, cfg: ValidateConfig, path: str | os.PathLike | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The feeds for validation (from --data or synthesised so the original model runs) and a description of them."""
    specs = input_specs(model)
    if cfg.data:
        feeds = load_data(cfg.data, specs)
        info: dict[str, Any] = {"source": os.fspath(cfg.data)}
        batches = _single_sample_batches(feeds, specs)
        if batches is not None:  # a model fixed to one sample per run: --data holds several, one run each
            info["shapes"] = {name: list(arr.shape) for name, arr in batches[0].items()}
            info["samples"] = len(batches)
            return batches, info
    else:
        res = resolve_inputs(model, cfg.input_shapes, seed=cfg.seed, path=path)
        feeds = synthesize_inputs(specs, res.shapes, model, cfg.seed, choice=res.choice)
        info = {"source": "synthetic", "seed": cfg.seed, "resolution": res.to_dict()}
    info["shapes"] = {name: list(arr.shape) for name, arr in feeds.items()}
    return feeds, info


def _single_sample_batches(feeds: dict[str, np.ndarray], specs: list[InputSpec]
                           ) -> list[dict[str, np.ndarray]] | None:
    """``feeds`` split into one-sample feeds when an input's sample axis is fixed to 1 and holds more; else None."""
    axes = batch_axes(specs)
    fixed_one = any(axes[s.name] is not None and s.shape[axes[s.name]] == 1 for s in specs)
    if not fixed_one or sample_count(feeds, axes) <= 1:
        return None
    return split_samples(feeds, axes, 1)


def synthesize_inputs(specs: list[InputSpec], shapes: dict[str, list[int]], model: onnx.ModelProto | None,
                      seed: int, *, rules: dict[str, tuple] | None = None,
                      choice: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random inputs matching the specs: floats ~ N(0,1), integers by :func:`integer_rules`, masks and bools = 1."""
    rng = np.random.default_rng(seed)
    rules = integer_rules(model, specs) if rules is None else rules
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        dtype = ORT_TYPES.get(spec.type)
        if dtype is None:
            raise InputDataError(f"cannot synthesise input {spec.name!r} of type {spec.type}; give --data")
        shape = shapes[spec.name]
        rule = rules.get(spec.name, ("random",))
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_ or rule[0] == "ones":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif rule[0] == "values":
            feeds[spec.name] = np.full(shape, rule[1][(choice or {}).get(spec.name, 0)], dtype=dtype)
        elif rule[0] == "count":
            feeds[spec.name] = rng.integers(1, 5, size=shape).astype(dtype)
        else:
            high = rule[1] if rule[0] == "index" else 10
            feeds[spec.name] = rng.integers(0, max(high, 1), size=shape).astype(dtype)
    return feeds


def load_data(path: str | os.PathLike, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Read ``--data file.npz`` and check names, dtypes and shapes against the model inputs."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise InputDataError(f"--data file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise InputDataError(f"--data {path} is not a readable .npz file: {exc}") from None
    return check_feed(arrays, specs, f"--data {path}", any_samples=False)

