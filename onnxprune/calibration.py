"""Calibration data in, activations out (through onnxruntime, streamed batch by batch; activations streamed layer
after layer are :mod:`onnxprune.activation_stream`'s).

Sources: an ``.npz`` file (input name -> array with a batch axis), a directory of ``.npz``
files (one feed each) or ``.npy`` files (single-input models), or, from Python, any iterable
of feed dicts (the shape of onnxruntime's ``CalibrationDataReader``). Names, dtypes and
shapes are checked against the model's inputs with clear errors.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import InputDataError
from .feeds import InputSpec, batch_axes, check_feed, input_specs, split_samples
from .sessions import session_with_outputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")


class StageClock:
    """Wall and CPU seconds per named stage of a pass, for the report; a stage nested in another is not counted in
    its parent's own time (capture inside Gram accumulation counts as capture)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.stack: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body as ``name``."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            self.wall[name] = self.wall.get(name, 0.0) + wall
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu
            if self.stack:
                self.wall[self.stack[-1]] = self.wall.get(self.stack[-1], 0.0) - wall
                self.cpu[self.stack[-1]] = self.cpu.get(self.stack[-1], 0.0) - cpu

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Stage -> {"wall_s", "cpu_s"}, in the order the stages first ran."""
        return {k: {"wall_s": round(v, 3), "cpu_s": round(self.cpu[k], 3)} for k, v in self.wall.items()}


@dataclass
class ImagePreprocess:
    """How a folder of images becomes one image input: resize, scale to [0, 1], normalise, layout."""

    size: tuple[int, int] | None = None  # (height, width); default: the model input's static size
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    layout: str = "nchw"  # or "nhwc"
    channels: str = "rgb"  # or "bgr"


def load_images(folder: Path, spec: InputSpec, pre: ImagePreprocess) -> dict[str, np.ndarray]:
    """Every image in ``folder`` as one batch for the image input ``spec``."""
    try:
        from PIL import Image
    except ImportError:
        raise InputDataError("image calibration data needs Pillow: pip install 'onnxprune[images]'") from None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if pre.layout not in ("nchw", "nhwc") or pre.channels not in ("rgb", "bgr"):
        raise InputDataError("image layout must be nchw or nhwc, channel order rgb or bgr")
    dims = spec.shape
    static = (dims[2], dims[3]) if pre.layout == "nchw" and len(dims) == 4 else (dims[1], dims[2]) if len(dims) == 4 else None
    size = pre.size or (static if static and all(isinstance(d, int) for d in static) else None)
    if size is None:
        raise InputDataError(f"input {spec.name} has dynamic height/width: give the image size")
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)
        except OSError as exc:
            raise InputDataError(f"cannot read image {path}: {exc}") from None
        arr = (arr / 255.0 - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        if pre.channels == "bgr":
            arr = arr[..., ::-1]
        images.append(arr.transpose(2, 0, 1) if pre.layout == "nchw" else arr)
    return {spec.name: np.ascontiguousarray(np.stack(images)).astype(np.float32)}


def load_calibration(source: str | os.PathLike | Iterable[dict[str, np.ndarray]], model: onnx.ModelProto,
                     batch: int = 16, limit: int | None = None,
                     images: ImagePreprocess | None = None) -> list[dict[str, np.ndarray]]:
    """Calibration batches as feed dicts, checked against ``model``'s inputs."""
    specs = input_specs(model)
    axes = batch_axes(specs)
    fixed_one = any(axes[spec.name] is not None and spec.shape[axes[spec.name]] == 1 for spec in specs)
    feeds: list[dict[str, np.ndarray]] = []
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            if len(specs) != 1:
                raise InputDataError(f"image calibration data needs a single-input model; {len(specs)} inputs here")
            raw = [load_images(path, specs[0], images or ImagePreprocess())]
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
            if not files:
                raise InputDataError(f"calibration directory {path} holds no .npz, .npy or image files")
            raw = [_read(p, specs) for p in files]
        elif path.is_file():
            raw = [_read(path, specs)]
        else:
            raise InputDataError(f"calibration data not found: {path}")
    else:
        raw = list(source)
    for i, feed in enumerate(raw):
        where = f"calibration data {source if isinstance(source, (str, os.PathLike)) else f'item {i}'}"
        feeds.extend(split_samples(check_feed(feed, specs, where, any_samples=True), axes, 1 if fixed_one else batch))
    if not feeds:
        raise InputDataError("calibration data is empty")
    if limit is not None:
        feeds = feeds[:limit]
    return feeds


def _read(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise InputDataError(f"{path}: .npy files need a single-input model; use .npz with input names")
            return {specs[0].name: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read calibration file {path}: {exc}") from None


def channel_energy(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                   tensors: dict[str, int]) -> dict[str, np.ndarray]:
    """Per-channel squared norm (sum over batch and every other axis) of each tensor, streamed."""
    if not tensors:
        return {}
    names = sorted(tensors)
    session = session_with_outputs(model, names)
    energy: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            moved = np.moveaxis(value.astype(np.float64), tensors[name], 0).reshape(value.shape[tensors[name]], -1)
            energy[name] = energy.get(name, 0) + np.einsum("ij,ij->i", moved, moved)
    return energy
