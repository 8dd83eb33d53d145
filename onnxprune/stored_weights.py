"""Where a loaded model's weights lie on disk, so that onnxruntime can read them there instead of from our arrays.

onnxruntime copies every initializer it is handed in memory (``add_external_initializers`` and ``add_initializer``
included), and while it optimises a session it holds that copy beside the layouts it makes from it (ResNet-50 with
every optimisation: +223 MB at the peak of building a session over OrtValues, +123 MB when the same weights are read
from a file, the same outputs bit for bit). :class:`StoredWeights` records, when a model is loaded, the byte range of
each main-graph initializer's data: its ``raw_data`` inside the model file, or its place in an external data file.
A session built over a model that still holds those bytes declares such a tensor as external data at that range
(:meth:`Verified.declare`), and onnxruntime reads it from the user's own files, one tensor at a time. Only the files
the model was read from are read, and a range is used only after its bytes are compared with the tensor's values in
memory and while the files are unchanged since (size, inode and modification time).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from .model_file import tensor_data_ranges

#: the session setting that names the folder external data locations are relative to (a model given as bytes)
FOLDER_KEY = "session.model_external_initializers_file_folder_path"
#: bytes compared at a time when a range is checked against the values in memory
CHUNK = 16 << 20
#: tensors of at most this many elements stay in the graphs (as the OrtValues handed over leave them)
SMALL_ELEMENTS = 256
#: the first onnxruntime release taken to honour :data:`FOLDER_KEY` (older ones would resolve the locations against
#: the working folder, a path the user did not name: no ranges are used with them)
FOLDER_KEY_SINCE = (1, 20)
#: the distributions onnxruntime's Python module is installed by
_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                      "onnxruntime-qnn", "ort-nightly", "ort-nightly-gpu")


@dataclass
class StoredWeights:
    """The byte range on disk of each main-graph initializer of a loaded model: ``entries`` maps a tensor's name to
    (file name inside ``folder``, offset, length)."""

    folder: Path
    entries: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    @classmethod
    def of_file(cls, path: Path, model: onnx.ModelProto) -> StoredWeights | None:
        """The ranges of ``model``'s initializers as read from ``path``: the ``raw_data`` inside the file, and the
        external data entries (``model`` before its external data is loaded). None when there are none."""
        entries = {name: (path.name, start, length) for name, (start, length) in tensor_data_ranges(path).items()}
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entry = _external_entry(tensor)
                if entry is not None:
                    entries[tensor.name] = entry
                else:
                    entries.pop(tensor.name, None)
        return cls(path.parent.absolute(), entries) if entries else None

    def verified(self, tensors: list[onnx.TensorProto], arrays: dict[str, np.ndarray] | None = None) -> Verified:
        """The ranges that hold ``tensors``' values now (compared byte for byte with ``arrays[name]`` where given,
        else with the tensor's ``raw_data``), with the files' stamps to check before each use. Tensors of at most
        :data:`SMALL_ELEMENTS` elements (shapes, axes, scalars) are left out: they stay in the graph."""
        arrays = arrays or {}
        if not folder_setting_supported():
            return Verified(self.folder, {}, {})
        found: dict[str, tuple[str, int, int]] = {}
        stamps: dict[str, tuple[int, int, int] | None] = {}
        for tensor in tensors:
            entry = self.entries.get(tensor.name)
            if (entry is None or tensor.data_location == onnx.TensorProto.EXTERNAL
                    or int(np.prod(tensor.dims, dtype=np.int64)) <= SMALL_ELEMENTS):
                continue
            if entry[0] not in stamps:
                stamps[entry[0]] = _stamp(self.folder / entry[0])
            if stamps[entry[0]] is None or not _expected_length(tensor, entry[2]):
                continue
            if _same_bytes(self.folder / entry[0], entry[1], entry[2], tensor, arrays.get(tensor.name)):
                found[tensor.name] = entry
        files = {entry[0] for entry in found.values()}
        if any(_stamp(self.folder / name) != stamps[name] for name in files):  # changed while compared
            found = {}
        return Verified(self.folder, found, {name: stamps[name] for name in files})


@dataclass
class Verified:
    """Ranges checked against the tensors in memory (:meth:`StoredWeights.verified`)."""

    folder: Path
    entries: dict[str, tuple[str, int, int]]
    stamps: dict[str, tuple[int, int, int] | None]

    def usable(self) -> bool:
        """Whether the files are as they were when compared (else the ranges are not used again)."""
        if self.entries and any(_stamp(self.folder / name) != stamp for name, stamp in self.stamps.items()):
            self.entries = {}
        return bool(self.entries)

    def declare(self, graph: onnx.GraphProto, tensor: onnx.TensorProto) -> bool:
        """Declare ``tensor`` in ``graph`` as external data at its range (True), or do nothing (False)."""
        entry = self.entries.get(tensor.name)
        if entry is None:
            return False
        declare_external(graph, tensor, location=entry[0], offset=str(entry[1]), length=str(entry[2]))
        return True

    def configure(self, options) -> None:
        """Point ``options`` (onnxruntime ``SessionOptions``) at the folder the locations are relative to."""
        options.add_session_config_entry(FOLDER_KEY, os.fspath(self.folder))


#: the location of a tensor whose data is handed to onnxruntime at session creation (an OrtValue), not in a file
IN_MEMORY = "onnxprune-in-memory"


def declare_external(graph: onnx.GraphProto, tensor: onnx.TensorProto, **entries: str) -> None:
    """Declare ``tensor`` in ``graph`` without its data: its name, type and shape, as external data with ``entries``
    (``location``, and ``offset``/``length`` for a file; :data:`IN_MEMORY` for data handed over as an OrtValue)."""
    placeholder = graph.initializer.add()
    placeholder.name, placeholder.data_type = tensor.name, tensor.data_type
    placeholder.dims.extend(tensor.dims)
    placeholder.data_location = onnx.TensorProto.EXTERNAL
    for key, value in entries.items():
        item = placeholder.external_data.add()
        item.key, item.value = key, value


def folder_setting_supported() -> bool:
    """Whether the installed onnxruntime reads external data relative to :data:`FOLDER_KEY` (its version)."""
    for distribution in _ORT_DISTRIBUTIONS:
        try:
            version = metadata.version(distribution)
            break
        except metadata.PackageNotFoundError:
            continue
    else:  # a build installed under another name: not known to honour it
        return False
    numbers = []
    for part in version.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers) >= FOLDER_KEY_SINCE


def _external_entry(tensor: onnx.TensorProto) -> tuple[str, int, int] | None:
    """(location, offset, length) of an external tensor as its entries give them; None without a relative location
    inside the folder (loading checked it already: a regular file, no link on the way) or a length that cannot be
    known without reading."""
    info = {item.key: item.value for item in tensor.external_data}
    location = info.get("location", "")
    parts = Path(location).parts
    if not location or Path(location).is_absolute() or any(part in ("..", ".", "") for part in parts):
        return None
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else _element_bytes(tensor)
    except (KeyError, ValueError):
        return None
    return (location, offset, length) if offset >= 0 and length is not None and length > 0 else None


def _element_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes of ``tensor``'s values as raw data (None for types without a fixed byte size)."""
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _expected_length(tensor: onnx.TensorProto, length: int) -> bool:
    """A range of ``length`` bytes can hold ``tensor`` as onnxruntime reads it (fixed-size elements, whole bytes,
    no sub-byte packing that would make the lengths agree by chance)."""
    expected = _element_bytes(tensor)
    return expected is not None and expected == length and tensor.data_type in _PLAIN_TYPES


def _same_bytes(path: Path, offset: int, length: int, tensor: onnx.TensorProto, array: np.ndarray | None) -> bool:
    """Whether bytes ``offset:offset+length`` of ``path`` are the tensor's values (``array``'s when given, read in
    place, else its raw data)."""
    if array is not None and array.dtype.isnative and array.flags.c_contiguous and array.nbytes == length:
        held = memoryview(array).cast("B")
    elif tensor.HasField("raw_data"):
        held = memoryview(tensor.raw_data)
    else:
        return False
    if len(held) != length:
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            for start in range(0, length, CHUNK):
                piece = handle.read(min(CHUNK, length - start))
                if piece != held[start:start + len(piece)]:
                    return False
    except OSError:
        return False
    return True


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """(size, inode, modification time) of a regular file; None for anything else."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_size, info.st_ino, info.st_mtime_ns) if stat.S_ISREG(info.st_mode) else None


#: the data types a range is declared for (little-endian fixed-size elements, as onnxruntime reads raw data)
_PLAIN_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL})
