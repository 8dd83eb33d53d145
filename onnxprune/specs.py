"""What a model is fed: its input specs, feeds checked against them, and feeds cut into batches along each
input's sample axis (the bottom of the input modules: ``synthetic`` and ``feeds`` build on it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import InputDataError

ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


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


def check_feed(arrays: dict[str, np.ndarray], specs: list[InputSpec], where: str, *, any_samples: bool,
               options: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """``arrays`` checked against the model inputs: names (``labels`` aside), dtypes and shapes; ``where`` starts
    each error (the settings it names as ``{field}`` are ``options``). The sample axis may hold any number of
    samples with ``any_samples``, else only where the model fixes it to 1 (then the samples run one by one)."""
    names = {spec.name for spec in specs}
    missing, extra = sorted(names - arrays.keys()), sorted(arrays.keys() - names - {"labels"})
    if missing or extra:
        raise InputDataError(f"{where}: names do not match the model inputs"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unknown {', '.join(extra)}" if extra else ""), options=options)
    feeds: dict[str, np.ndarray] = {}
    axes = batch_axes(specs)
    for spec in specs:
        arr = np.asarray(arrays[spec.name])
        want = ORT_TYPES.get(spec.type)
        if want is not None and arr.dtype != np.dtype(want):
            raise InputDataError(f"{where}: {spec.name} has dtype {arr.dtype}, the model expects {np.dtype(want)}",
                                 options=options)
        axis = axes[spec.name]
        if arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d > 0 and d != s and not (i == axis and (any_samples or d == 1))
            for i, (d, s) in enumerate(zip(spec.shape, arr.shape))
        ):
            raise InputDataError(f"{where}: {spec.name} has shape {list(arr.shape)}, the model expects {spec.shape}",
                                 options=options)
        feeds[spec.name] = arr
    return feeds


def take_samples(feed: dict[str, np.ndarray], axes: dict[str, int | None], start: int, stop: int
                 ) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` of ``feed``, views of its arrays (inputs without a sample axis are passed whole)."""
    out = {}
    for name, arr in feed.items():
        axis = axes.get(name)
        if axis is None or arr.ndim <= axis:
            out[name] = arr
        else:
            index = [slice(None)] * arr.ndim
            index[axis] = slice(start, stop)
            out[name] = arr[tuple(index)]
    return out
