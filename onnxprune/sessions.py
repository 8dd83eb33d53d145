"""Every onnxruntime session onnxprune builds comes from here (validation, calibration, compensation, inputs).

:func:`session_options` sets only what a caller asks for, so each use keeps the settings it needs (one thread and
no spinning for latency, no graph optimisation where intermediate tensors must stay observable);
:func:`create_session` accepts a path, serialized bytes or a proto; :func:`inference_session` hands large
initializers over as OrtValues so that weights are not serialized a second time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .model import copy_fields

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


def session_with_outputs(model: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    """A session that also returns the intermediate tensors ``names`` (no graph optimisation: all stay observable),
    built as :func:`inference_session` builds it (weights handed over, not copied) with :func:`lean_options`."""
    header = _header(model)
    existing = {o.name for o in model.graph.output}
    header.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in existing)
    return session_over(header, model.graph.initializer, options=lean_options())


def _header(model: onnx.ModelProto, skip: tuple[str, ...] = ()) -> onnx.ModelProto:
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
    header = _header(model, ("output",) if outputs is not None else ())
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
        placeholder = graph.initializer.add()  # declared, its data given at session creation
        placeholder.name, placeholder.data_type = tensor.name, tensor.data_type
        placeholder.dims.extend(tensor.dims)
        placeholder.data_location = onnx.TensorProto.EXTERNAL
        entry = placeholder.external_data.add()
        entry.key, entry.value = "location", "onnxprune-in-memory"
    options = options or ort.SessionOptions()
    if names:
        options.add_external_initializers(names, values)
    session = create_session(header, options, providers)
    session._onnxprune_arrays = keep_alive  # the OrtValues view these arrays
    return session


@dataclass
class ModelSource:
    """A model for onnxruntime: a file path (preferred: onnxruntime reads it, external data too), serialized
    bytes, or a proto (serialized for the session)."""

    model: onnx.ModelProto | None = None
    path: Path | None = None
    blob: bytes | None = None

    def session(self, provider: str, threads: int) -> ort.InferenceSession:
        options = session_options(threads=threads, inter_threads=1, optimize=True, log_level=4, spinning=False,
                                  inter_spinning=False)  # log level 4: failures raise, with their message
        source = self.path if self.path is not None else self.blob if self.blob is not None else self.model
        return create_session(source, options, [provider])
