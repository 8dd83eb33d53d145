"""Every onnxruntime session onnxprune builds comes from here (validation, calibration, compensation, inputs).

:func:`session_options` sets only what a caller asks for, so each use keeps the settings it needs (one thread and
no spinning for latency, no graph optimisation where intermediate tensors must stay observable);
:func:`create_session` accepts a path, serialized bytes or a proto; :func:`inference_session` hands large
initializers over as OrtValues so that weights are not serialized a second time; :func:`run_outputs` runs batches a
few samples at a time and keeps outputs that hold no session memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .graph import iter_graphs
from .model import copy_fields
from .model_file import read_structure
from .sample_parts import part_bounds
from .specs import sample_count, take_samples
from .stored_weights import IN_MEMORY, declare_external

CPU = ("CPUExecutionProvider",)


def session_options(*, threads: int | None = None, inter_threads: int | None = None, optimize: bool | None = None,
                    log_level: int | None = None, spinning: bool | None = None, inter_spinning: bool | None = None,
                    prepacking: bool | None = None) -> ort.SessionOptions:
    """``SessionOptions`` with only the given settings changed from onnxruntime's defaults.

    ``optimize``: True for every graph optimisation, False for none (intermediate tensors stay observable);
    ``spinning``/``inter_spinning`` False stop idle threads from spinning (two live sessions on few cores);
    ``prepacking`` False keeps onnxruntime from a second, prepacked copy of the weights (sessions run once).
    """
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if inter_threads is not None:
        options.inter_op_num_threads = inter_threads
    if optimize is not None:
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if log_level is not None:
        options.log_severity_level = log_level
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if inter_spinning is not None:
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if inter_spinning else "0")
    if prepacking is not None:
        options.add_session_config_entry("session.disable_prepacking", "0" if prepacking else "1")
    return options


def create_session(model: onnx.ModelProto | bytes | str | os.PathLike, options: ort.SessionOptions | None = None,
                   providers: tuple[str, ...] | list[str] = CPU) -> ort.InferenceSession:
    """A session over a model file (onnxruntime reads it, external data too), serialized bytes or a proto."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
    return ort.InferenceSession(model, options or ort.SessionOptions(), providers=list(providers))


def lean_options(**settings) -> ort.SessionOptions:
    """Options for sessions that run a few times over calibration or probe data: no graph optimisation
    (intermediate tensors stay observable), no CPU memory arena (each run's memory goes back when the run ends,
    instead of the arena keeping its largest run's) and no weight prepacking (no second copy of the weights)."""
    options = session_options(log_level=3, optimize=False, prepacking=False, **settings)
    options.enable_cpu_mem_arena = False
    return options


def session_with_outputs(model: onnx.ModelProto, names: list[str]) -> FedSession:
    """A session that also returns the intermediate tensors ``names`` (no graph optimisation: all stay observable),
    with :func:`lean_options` and the weights fed in place (:func:`fed_session`)."""
    header = model_header(model)
    existing = {o.name for o in model.graph.output}
    header.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in existing)
    return fed_session(header, model.graph.initializer, lean_options())


def model_header(model: onnx.ModelProto, skip: tuple[str, ...] = ()) -> onnx.ModelProto:
    """``model`` without its main graph's initializers (nor the graph fields in ``skip``): nodes, inputs, outputs,
    opsets and functions, a few kilobytes whatever the weights."""
    header = onnx.ModelProto()
    copy_fields(model, header, skip=("graph",))
    copy_fields(model.graph, header.graph, skip=("initializer", *skip))
    return header


def inference_session(model: onnx.ModelProto, outputs: list[str] | None = None,
                      replaced: dict[str, np.ndarray] | None = None, options=None,
                      providers: tuple[str, ...] = CPU) -> ort.InferenceSession:
    """A session over ``model`` that does not serialize its weights (see :func:`session_over`); ``replaced`` arrays
    stand in for initializers of the same name (e.g. zeroed weights); ``outputs`` replaces the graph outputs."""
    header = model_header(model, ("output",) if outputs is not None else ())
    if outputs is not None:
        header.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in outputs)
    return session_over(header, model.graph.initializer, replaced, options, providers)


def session_over(header: onnx.ModelProto, initializers: Iterable[onnx.TensorProto],
                 replaced: dict[str, np.ndarray] | None = None, options=None,
                 providers: tuple[str, ...] = CPU) -> ort.InferenceSession:
    """A session over ``header`` (a model whose main graph holds no initializers) with ``initializers`` added.

    The larger ones are handed to onnxruntime as OrtValues over numpy arrays
    (``SessionOptions.add_external_initializers``); only the graph is serialized, so a model over 2 GB works, no
    serialized copy of the weights is made and onnxruntime reads the arrays in place: the weights exist once more,
    in numpy, for as long as the session lives. ``replaced`` arrays stand in for initializers of the same name.
    """
    replaced = replaced or {}
    graph = header.graph
    names, values, keep_alive = [], [], []
    for tensor in initializers:
        array = replaced.get(tensor.name)
        if array is None and (int(np.prod(tensor.dims, dtype=np.int64)) <= 256 or tensor.data_type in (
                onnx.TensorProto.STRING, onnx.TensorProto.BFLOAT16) or tensor.data_location == onnx.TensorProto.EXTERNAL):
            graph.initializer.append(tensor)
            continue
        if array is None:
            array = numpy_helper.to_array(tensor)
        array = np.ascontiguousarray(array)
        keep_alive.append(array)
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        declare_external(graph, tensor, location=IN_MEMORY)  # its data given at session creation
    options = options or ort.SessionOptions()
    if names:
        options.add_external_initializers(names, values)
    session = create_session(header, options, providers)
    session._onnxprune_arrays = keep_alive  # the OrtValues view these arrays
    return session


#: data types whose large initializers :func:`fed_session` feeds as inputs (kernels that need a constant input
#: read integer tensors: shapes, indices, quantization parameters; those stay initializers)
FED_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


class FedSession:
    """An onnxruntime session whose large float weights are graph inputs, fed from numpy arrays on every run.

    onnxruntime reads input arrays in place: the session holds no copy of the weights (external initializers are
    copied into the session; initializers also prepacked), so building one costs its graph, not its weights. The
    arrays are those of the model's tensors, made once. Without prepacking the kernels are those of a session with
    prepacking disabled: outputs equal such a session's bit for bit. ``get_inputs`` lists the caller's inputs only."""

    def __init__(self, session: ort.InferenceSession, weights: dict[str, np.ndarray]):
        self.session, self.weights = session, weights

    def run(self, output_names, input_feed: dict[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        return self.session.run(output_names, {**input_feed, **self.weights}, run_options)

    def get_inputs(self) -> list:
        return [i for i in self.session.get_inputs() if i.name not in self.weights]

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def fed_session(header: onnx.ModelProto, initializers: Iterable[onnx.TensorProto],
                options: ort.SessionOptions | None = None, providers: tuple[str, ...] = CPU,
                shared: Mapping[str, tuple[bytes, np.ndarray]] | None = None) -> FedSession:
    """A :class:`FedSession` over ``header`` (a model whose main graph holds no initializers): ``initializers`` of a
    :data:`FED_TYPES` type and more than 256 elements become typed graph inputs fed from arrays, the rest are copied
    into the graph. ``shared`` (name -> raw bytes and the array over them) lets sessions over two versions of one
    model (original and pruned) hold one array per weight both have unchanged: a dict gains the arrays made here,
    a read-only mapping (``types.MappingProxyType``) is only read (the other arrays go with the session)."""
    graph = header.graph
    declared = {i.name for i in graph.input}
    weights: dict[str, np.ndarray] = {}
    for tensor in initializers:
        if (tensor.data_type not in FED_TYPES or tensor.data_location == onnx.TensorProto.EXTERNAL
                or int(np.prod(tensor.dims, dtype=np.int64)) <= 256):
            graph.initializer.append(tensor)
            continue
        weights[tensor.name] = _weight_array(tensor, shared)
        if tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return FedSession(create_session(header, options or lean_options(), providers), weights)


def array_owner(array: np.ndarray):
    """The object ``array``'s memory belongs to (for the arrays of :func:`~onnxprune.refit.detach_weights`, the
    bytes copied out of the tensor)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


def shared_weights(arrays: dict[str, np.ndarray] | None) -> dict[str, tuple[bytes, np.ndarray]]:
    """``arrays`` over bytes (as :func:`~onnxprune.refit.detach_weights` makes them) in the form :func:`fed_session`
    takes as ``shared``: sessions fed from them hold no copy of their own."""
    return {name: (array_owner(array), array) for name, array in (arrays or {}).items()
            if isinstance(array_owner(array), bytes)}


def _weight_array(tensor: onnx.TensorProto, shared: Mapping[str, tuple[bytes, np.ndarray]] | None) -> np.ndarray:
    """The tensor's values as a contiguous array: a read-only view of its raw bytes (one copy, out of the proto),
    the array in ``shared`` when it holds the same bytes under that name."""
    if not tensor.HasField("raw_data") or not np.dtype("<f4").isnative:
        return np.ascontiguousarray(numpy_helper.to_array(tensor))
    raw = tensor.raw_data
    if shared is not None:
        hit = shared.get(tensor.name)
        if hit is not None and hit[0] == raw and hit[1].shape == tuple(tensor.dims):
            return hit[1]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    array = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
    if isinstance(shared, dict):
        shared[tensor.name] = (raw, array)
    return array


def output_sample_axes(session: ort.InferenceSession, axes: dict[str, int | None]) -> list[int] | None:
    """Each output's sample axis: its one dimension named like the inputs' sample axes (a symbolic batch size);
    None unless every output is a tensor with such a dimension and every input with a sample axis names it alike."""
    symbols = {tuple(inp.shape)[axes[inp.name]] for inp in session.get_inputs()
               if axes.get(inp.name) is not None and len(inp.shape) > axes[inp.name]}
    symbol = symbols.pop() if len(symbols) == 1 else None
    if not isinstance(symbol, str) or not symbol:
        return None
    found = []
    for out in session.get_outputs():
        hits = [i for i, dim in enumerate(out.shape or []) if dim == symbol] if out.type.startswith("tensor(") else []
        if len(hits) != 1:
            return None
        found.append(hits[0])
    return found


#: reductions: one sample's result mixes the others' when the axes reduced include the sample axis (0)
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"})
#: ops over the axes from ``axis`` on (Softmax before opset 13: a flattened [0:axis, axis:] view)
AXIS_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax", "LayerNormalization"})


def samples_independent(model: onnx.ModelProto) -> bool:
    """Whether every graph of ``model`` computes each sample of a batch (axis 0) on its own, so that running a
    batch in parts gives the same outputs. Conservative: False for dynamic quantization (one scale over the whole
    tensor), training-mode BatchNormalization, and reductions or normalizations whose axes may include axis 0
    (absent or unknown axes, 0, or a negative axis other than -1)."""
    nodes = [*(node for graph in iter_graphs(model.graph) for node in graph.node),
             *(node for function in model.functions for node in function.node)]
    constants = {init.name: init for init in model.graph.initializer}
    constants.update({node.output[0]: attr.t for node in nodes if node.op_type == "Constant"
                      for attr in node.attribute if attr.name == "value"})
    for node in nodes:
        if "Dynamic" in node.op_type:
            return False
        if node.op_type not in REDUCE_OPS | AXIS_OPS | {"BatchNormalization"}:
            continue
        attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        if node.op_type == "BatchNormalization":
            if attrs.get("training_mode"):
                return False
            continue
        if node.op_type in REDUCE_OPS:
            axes = attrs.get("axes", attrs.get("axis", 0 if node.op_type.startswith("Arg") else None))
            if axes is None and len(node.input) > 1 and node.input[1]:
                tensor = constants.get(node.input[1])
                if tensor is None:
                    return False
                axes = numpy_helper.to_array(tensor).ravel().tolist()
            if axes is None or axes == []:
                if not attrs.get("noop_with_empty_axes"):
                    return False
                continue
        else:
            axes = attrs.get("axis", -1)
        if any(axis == 0 or axis < -1 for axis in (axes if isinstance(axes, list) else [axes])):
            return False
    return True


def owned(value):
    """An output array in memory of its own: onnxruntime's arrays view memory of the session that made them, and
    holding one keeps the session's whole arena alive after the session is gone."""
    return np.array(value) if isinstance(value, np.ndarray) else value


def run_outputs(session: ort.InferenceSession, batches: list[dict[str, np.ndarray]], axes: dict[str, int | None],
                samples: int = 0) -> list[list]:
    """``session``'s outputs on every batch, each array owning its memory (:func:`owned`).

    A batch of more than ``samples`` (0: no limit) samples (``axes``: each input's sample axis) runs in parts of ``samples`` when
    every output's sample axis is known (:func:`output_sample_axes`), the parts' outputs joined along it: where
    each sample is computed on its own (:func:`samples_independent`, the caller's to check) the joined arrays
    equal the whole batch's (bit for bit for elementwise and convolution kernels; onnxruntime's Gemm/MatMul can
    differ in the last bits when fewer rows share a call), and the run's memory is that of ``samples`` samples. An output whose parts do not stack so falls back to the whole run.
    """
    out_axes = output_sample_axes(session, axes) if samples else None
    results = []
    for batch in batches:
        count = sample_count(batch, axes)
        joined = None
        if out_axes is not None and count > samples:
            joined = _run_in_parts(session, batch, axes, out_axes, count, samples)
        results.append(joined if joined is not None else [owned(value) for value in session.run(None, batch)])
    return results


def _run_in_parts(session: ort.InferenceSession, batch: dict[str, np.ndarray], axes: dict[str, int | None],
                  out_axes: list[int], count: int, samples: int) -> list[np.ndarray] | None:
    """The outputs on ``batch`` run ``samples`` at a time (:func:`~onnxprune.sample_parts.part_bounds`: no part of a
    single sample) and joined along ``out_axes``; None when a part fails or its outputs do not hold its samples along
    those axes (the caller runs the whole batch instead)."""
    parts = []
    for start, stop in part_bounds(count, samples):
        try:
            part = [owned(value) for value in session.run(None, take_samples(batch, axes, start, stop))]
        except Exception:  # noqa: BLE001 - sizes the model does not accept: the caller runs the whole batch
            return None
        if any(not isinstance(value, np.ndarray) or value.ndim <= axis or value.shape[axis] != stop - start
               for value, axis in zip(part, out_axes)):
            return None
        parts.append(part)
    return [np.concatenate([part[i] for part in parts], axis=axis) for i, axis in enumerate(out_axes)]


@dataclass
class ModelSource:
    """A model for onnxruntime: a file path (preferred: onnxruntime reads it, external data too), serialized
    bytes, or a proto (serialized for the session)."""

    model: onnx.ModelProto | None = None
    path: Path | None = None
    blob: bytes | None = None

    def structure(self) -> onnx.ModelProto:
        """The model's graph without its large weights (the proto itself when in memory)."""
        if self.model is not None:
            return self.model
        return read_structure(self.path) if self.path is not None else onnx.ModelProto.FromString(self.blob)

    def session(self, provider: str, threads: int) -> ort.InferenceSession:
        options = session_options(threads=threads, inter_threads=1, optimize=True, log_level=4, spinning=False,
                                  inter_spinning=False)  # log level 4: failures raise, with their message
        source = self.path if self.path is not None else self.blob if self.blob is not None else self.model
        return create_session(source, options, [provider])
