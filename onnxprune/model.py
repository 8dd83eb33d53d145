"""Loading, checking and atomically saving ONNX models (with their external data).

Models are kept as ``onnx.ModelProto`` so that IR version, opset imports, metadata and doc
strings survive untouched; only the tensors onnxprune changes are rewritten. Walking graphs
and reading weights is :mod:`onnxprune.graph`.
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .errors import InvalidModelError, ModelReadError, OutputError
from .graph import iter_graphs, iter_tensors
from .model_file import read_model, varint_bytes
from .outputs import OutputGuard, commit, temp_folder
from .stored_weights import StoredWeights

#: Protobuf cannot serialise a message of 2 GiB or more; above this we write external data.
PROTOBUF_LIMIT = 2**31 - 1
#: Auto external data once the tensors alone reach this many bytes (margin for the graph).
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
#: Tensors at least this large go into the external data file when one is written.
EXTERNAL_TENSOR_MIN_BYTES = 1024


# --------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model with where it came from."""

    model: onnx.ModelProto
    path: Path | None = None
    has_external_data: bool = False
    file_bytes: int = 0  # model file plus external data files, as on disk
    warnings: list[str] = field(default_factory=list)
    data_files: list[Path] = field(default_factory=list)  # the external data files read (inside the folder)
    stored: StoredWeights | None = None  # where the initializers' bytes lie in those files (sessions read them there)


#: ops onnxruntime's transformer optimizer writes into the default ONNX domain, which onnxruntime runs
#: but the ONNX checker does not know (it rejects the model: "No Op registered for ...")
ORT_DEFAULT_DOMAIN_OPS = {"SimplifiedLayerNormalization"}


def check_input_model(model: onnx.ModelProto) -> list[str]:
    """:func:`check_model` for an input; a model whose only fault is onnxruntime's own default-domain ops
    (:data:`ORT_DEFAULT_DOMAIN_OPS`) passes with a warning (returned)."""
    try:
        check_model(model)
        return []
    except InvalidModelError as exc:
        nodes = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type in ORT_DEFAULT_DOMAIN_OPS]
        internal = sorted({n.op_type for n in nodes})
        if not any(f"No Op registered for {op}" in str(exc) for op in internal):
            raise
        added = "com.microsoft" not in {o.domain for o in model.opset_import}
        try:  # check once more with those nodes seen as onnxruntime's (in place: no copy of the weights)
            for node in nodes:
                node.domain = "com.microsoft"
            if added:
                model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
            check_model(model)  # anything else wrong still fails
        finally:
            for node in nodes:
                node.domain = ""
            if added:
                del model.opset_import[-1]
        return [(f"the model uses onnxruntime's {', '.join(internal)} in the ONNX domain: onnxruntime runs it, "
                 "the ONNX checker does not know it (the pruned model keeps it)")]


def _external_locations(model: onnx.ModelProto) -> list[str]:
    """The distinct external data locations of ``model`` (not checked: see :func:`external_data_file`)."""
    return [location for _, location in _external_tensors(model)]


def _external_tensors(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(tensor name, location) of each external tensor, first occurrence of each location."""
    locations: dict[str, str] = {}
    for tensor in iter_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            locations.setdefault(location, tensor.name)
    return [(name, location) for location, name in locations.items()]


def check_external_locations(model: onnx.ModelProto, path: Path) -> list[Path]:
    """The external data files of ``model`` (read from ``path``), each checked by :func:`external_data_file`."""
    return [external_data_file(path.parent, tensor, location) for tensor, location in _external_tensors(model)]


def _refuse_location(tensor: str, location: str, why: str) -> ModelReadError:
    return ModelReadError(f"external data of tensor {tensor!r}: location {location!r} {why}; onnxprune reads "
                          "external data only from regular files inside the model's folder")


def external_data_file(base: Path, tensor: str, location: str) -> Path:
    """The file holding ``tensor``'s external data, checked to lie inside ``base`` (the model's folder).

    The location must be a normalised relative path (no absolute path, ``..``, ``.`` or empty part); every
    part is ``lstat``-ed only once the parts before it are known to be real folders inside ``base``, so no
    path outside is opened or stat'ed. Symbolic links are refused (onnx refuses them too); the file must be
    a regular file. Independent of the installed onnx version.
    """
    parts = location.replace("\\", "/").split("/")
    if "\0" in location or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise _refuse_location(tensor, location, "is absolute")
    if any(part in ("", ".", "..") for part in parts):
        raise _refuse_location(tensor, location, "is not a normalised relative path")
    current = base
    for position, part in enumerate(parts):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise ModelReadError(f"external data file missing: {current} (tensor {tensor!r})") from None
        except OSError as exc:
            raise _refuse_location(tensor, location, f"cannot be read ({exc.strerror or exc})") from None
        if stat.S_ISLNK(info.st_mode):
            target = os.readlink(current)
            inside = not os.path.isabs(target) and not os.path.normpath(
                os.path.join(*parts[:position], target)).startswith("..")
            raise _refuse_location(tensor, location, "is a symbolic link" + (
                "" if inside else f" leading outside the model's folder (to {target})"))
        last = position == len(parts) - 1
        if not last and not stat.S_ISDIR(info.st_mode):
            raise _refuse_location(tensor, location, f"passes through {part!r}, which is not a folder")
        if last and not stat.S_ISREG(info.st_mode):
            raise _refuse_location(tensor, location, "is not a regular file (a folder, device, FIFO or socket)")
    return current


def load_model(path: str | os.PathLike, *, check: bool = True) -> LoadedModel:
    """Read ``path`` (with its external data) and run the ONNX checker on it.

    Raises :class:`ModelReadError` for anything that is not a readable ONNX file or external data outside the
    model's folder, and :class:`InvalidModelError` when the checker rejects the model or a tensor is malformed.
    """
    path = Path(path)
    if not path.exists():
        raise ModelReadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelReadError(f"expected an ONNX file, got a directory: {path}")
    if not path.is_file():
        raise ModelReadError(f"expected an ONNX file, got a device, FIFO or socket: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelReadError(f"model file is empty: {path}")
    try:
        model = read_model(path)  # piece by piece: the file's bytes and the model are not both held
    except DecodeError as exc:
        raise ModelReadError(f"not an ONNX model or corrupt/truncated file: {path} ({exc})") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelReadError(f"cannot read model {path}: {exc}") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelReadError(f"not an ONNX model (no IR version, graph or opset import): {path}")
    base = path.parent
    data_files = check_external_locations(model, path)
    file_bytes = size + sum(p.stat().st_size for p in data_files)
    stored = StoredWeights.of_file(path, model)  # before the external entries are replaced by the data
    if data_files:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as exc:
            raise ModelReadError(f"cannot read external data of {path}: {exc}") from None
    check_tensors(model, path)
    warnings = check_input_model(model) if check else []
    return LoadedModel(model=model, path=path, has_external_data=bool(data_files), file_bytes=file_bytes,
                       warnings=warnings, data_files=data_files, stored=stored)


#: bits per element of the packed sub-byte types (onnx versions without a type lack its name)
_PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in (
    ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(onnx.TensorProto, name)}
#: the typed field each data type stores its values in when it has no raw data, and values per element
_TYPED_FIELD = {
    onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1), onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1), onnx.TensorProto.STRING: ("string_data", 1),
}


def _element_bits(data_type: int) -> int | None:
    """Bits per element of an ONNX data type, None for an unknown one."""
    if data_type in _PACKED_BITS:
        return _PACKED_BITS[data_type]
    if data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    try:
        return 8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def check_tensors(model: onnx.ModelProto, path: Path | None = None) -> None:
    """Refuse malformed tensors the checker may miss (exit 4, naming the tensor): negative dims, unknown data
    types, data whose size does not match dims x type (raw or typed fields, sizes as Python ints, so huge dims
    cannot wrap around), and an initializer declared as a graph input with another type or shape."""
    where = f" in {path.name}" if path is not None else ""
    for tensor in iter_tensors(model):
        _check_tensor(tensor, where)
    for graph in iter_graphs(model.graph):
        _check_initializer_inputs(graph, where)


def _check_tensor(tensor: onnx.TensorProto, where: str) -> None:
    name, dims = tensor.name, list(tensor.dims)
    if any(d < 0 for d in dims):
        raise InvalidModelError(f"tensor {name!r}{where} has a negative dimension: {dims}")
    count = math.prod(dims)
    if tensor.data_type != onnx.TensorProto.STRING and _element_bits(tensor.data_type) is None:
        raise InvalidModelError(f"tensor {name!r}{where} has an unknown data type {tensor.data_type}")
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return
    if tensor.HasField("raw_data"):
        if tensor.data_type == onnx.TensorProto.STRING:
            raise InvalidModelError(f"tensor {name!r}{where}: a string tensor cannot have raw data")
        expected = (count * _element_bits(tensor.data_type) + 7) // 8
        if len(tensor.raw_data) != expected:
            raise InvalidModelError(f"tensor {name!r}{where} has {len(tensor.raw_data)} bytes of data, "
                                    f"expected {expected} for shape {dims}")
        return
    field_name, per = _TYPED_FIELD.get(tensor.data_type, ("int32_data", 1))
    bits = _PACKED_BITS.get(tensor.data_type)
    expected = -(-count // (8 // bits)) if bits else count * per  # packed types: one int32 entry per byte
    found = len(getattr(tensor, field_name))
    if found != expected and not (found == 0 and count == 0):
        raise InvalidModelError(f"tensor {name!r}{where} holds {found} values in {field_name}, expected "
                                f"{expected} for shape {dims}")


def _check_initializer_inputs(graph: onnx.GraphProto, where: str) -> None:
    """An initializer that is also a graph input must agree with the input's declared type and fixed dims."""
    declared = {v.name: v.type.tensor_type for v in graph.input if v.type.HasField("tensor_type")}
    for init in graph.initializer:
        kind = declared.get(init.name)
        if kind is None:
            continue
        if kind.elem_type and kind.elem_type != init.data_type:
            raise InvalidModelError(f"initializer {init.name!r}{where} has data type {init.data_type} but the graph "
                                    f"input of that name declares {kind.elem_type}")
        if kind.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim]
            if len(dims) != len(init.dims) or any(d is not None and d != v for d, v in zip(dims, init.dims)):
                raise InvalidModelError(f"initializer {init.name!r}{where} has shape {list(init.dims)} but the "
                                        f"graph input of that name declares {dims}")


def check_model(model: onnx.ModelProto, *, path: Path | None = None, full: bool = False) -> None:
    """Run ``onnx.checker`` on the graph of ``model`` without copying its weight bytes.

    The checker reads a *skeleton*: the model with each large tensor turned into an external
    reference to a sparse file of the right size (tensor byte counts are verified separately
    at load time). Checking a file that is not in memory (``path`` with ``model=None``)
    reads it from disk.
    """
    try:
        if model is None and path is not None:
            onnx.checker.check_model(str(path), full_check=full)
            return
        with tempfile.TemporaryDirectory(prefix="onnxprune-check-") as tmp:
            skeleton_path = Path(tmp) / "skeleton.onnx"
            _write_skeleton(model, skeleton_path)
            onnx.checker.check_model(str(skeleton_path), full_check=full)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"model fails the ONNX checker: {first}") from None
    except onnx.shape_inference.InferenceError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InvalidModelError(f"model fails ONNX shape inference: {first}") from None
    except UnicodeDecodeError:
        raise ModelReadError("corrupt model: a name or text field is not valid UTF-8") from None


def _write_skeleton(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model``'s graph with every tensor over 1 KB pointing into a sparse ``skeleton.data``."""
    skeleton, tensors = external_skeleton(model, "skeleton.data")
    with open(path.parent / "skeleton.data", "wb") as handle:
        handle.truncate(sum(len_ for _, _, len_ in tensors))
    onnx.save_model(skeleton, str(path))


def external_skeleton(model: onnx.ModelProto, location: str
                      ) -> tuple[onnx.ModelProto, list[tuple[onnx.TensorProto, int, int]]]:
    """A new model whose large tensors are external references into ``location``.

    ``model`` itself is not modified (its weight bytes are not copied); returns the skeleton
    and, in file order, (source tensor, offset, length) of the bytes the data file must hold.
    """
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip=("graph",))
    placements: list[tuple[onnx.TensorProto, int, int]] = []
    _skeleton_graph(model.graph, skeleton.graph, location, placements)
    return skeleton, placements


def copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except those named in ``skip``."""
    for descriptor, value in src.ListFields():
        if descriptor.name in skip:
            continue
        field = getattr(dst, descriptor.name)
        if _repeated(descriptor):
            field.extend(value)
        elif descriptor.message_type is not None:
            field.CopyFrom(value)
        else:
            setattr(dst, descriptor.name, value)


def _repeated(descriptor) -> bool:
    """Whether a protobuf field is repeated (protobuf >= 6 has ``is_repeated``; older ones ``label``)."""
    flag = getattr(descriptor, "is_repeated", None)
    return bool(flag) if flag is not None else descriptor.label == descriptor.LABEL_REPEATED


def _externalize(src: onnx.TensorProto, dst: onnx.TensorProto, location: str,
                 placements: list[tuple[onnx.TensorProto, int, int]]) -> None:
    offset = placements[-1][1] + placements[-1][2] if placements else 0
    offset += (-offset) % 4096
    size = len(src.raw_data)
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        dst.ClearField(name)
    del dst.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
        entry = dst.external_data.add()
        entry.key, entry.value = key, value
    dst.data_location = onnx.TensorProto.EXTERNAL
    placements.append((src, offset, size))


def _large(tensor: onnx.TensorProto) -> bool:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return False
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, ValueError, TypeError):
        return False
    return count * itemsize >= EXTERNAL_TENSOR_MIN_BYTES


def _skeleton_graph(src: onnx.GraphProto, dst: onnx.GraphProto, location: str,
                    placements: list[tuple[onnx.TensorProto, int, int]]) -> None:
    copy_fields(src, dst, skip=("initializer", "node"))
    for init in src.initializer:
        new = dst.initializer.add()
        if _large(init):
            new.name, new.data_type, new.doc_string = init.name, init.data_type, init.doc_string
            new.dims.extend(init.dims)
            _externalize(init, new, location, placements)
        else:
            new.CopyFrom(init)
    for node in src.node:
        new = dst.node.add()
        for name in ("name", "op_type", "domain", "doc_string"):
            if node.HasField(name):  # keep absent fields absent (byte-identical graphs)
                setattr(new, name, getattr(node, name))
        if node.HasField("overload"):
            new.overload = node.overload
        new.input.extend(node.input)
        new.output.extend(node.output)
        new.metadata_props.extend(node.metadata_props)
        for attr in node.attribute:
            out = new.attribute.add()
            if attr.type == onnx.AttributeProto.TENSOR and _large(attr.t):
                out.name, out.type, out.doc_string = attr.name, attr.type, attr.doc_string
                out.t.name, out.t.data_type = attr.t.name, attr.t.data_type
                out.t.dims.extend(attr.t.dims)
                _externalize(attr.t, out.t, location, placements)
            elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                out.name, out.type, out.doc_string = attr.name, attr.type, attr.doc_string
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    target = out.g if attr.type == onnx.AttributeProto.GRAPH else out.graphs.add()
                    _skeleton_graph(sub, target, location, placements)
            else:
                out.CopyFrom(attr)


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def compacted(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` in a new protobuf arena: upb frees memory only with the whole model, so the old bytes of each
    tensor a pass rewrote (MiniLM-shaped removal: ~80 MB) go only when the caller drops the old model for this."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    return fresh


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in memory (initializers and Constant values, subgraphs too)."""
    return sum(len(t.raw_data) if t.HasField("raw_data") else _typed_bytes(t) for t in iter_tensors(model))


def _typed_bytes(tensor: onnx.TensorProto) -> int:
    return 4 * (len(tensor.float_data) + len(tensor.int32_data)) + 8 * (
        len(tensor.int64_data) + len(tensor.double_data) + len(tensor.uint64_data)
    )


def default_output_path(input_path: Path) -> Path:
    """``model.onnx`` -> ``model.pruned.onnx`` beside the input."""
    return input_path.with_name(f"{input_path.stem}.pruned{input_path.suffix or '.onnx'}")


def check_output_path(output: Path, *, input_path: Path | None, force: bool) -> None:
    """Refuse writing over the input, an existing file without ``force``, a non-regular file or an unwritable
    place (the rules of :class:`onnxprune.outputs.OutputGuard`)."""
    guard = OutputGuard(force=force)
    guard.protect(input_path, "input model")
    guard.claim(output, "output")


def save_model(
    model: onnx.ModelProto,
    output: str | os.PathLike,
    *,
    external_data: bool | None = None,
    verify: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write ``model`` atomically: into a temporary folder beside ``output``, then rename.

    ``external_data=None`` writes external data when the tensors would not fit in one
    protobuf (over ~1.8 GB). ``verify(temp_path)`` runs before the rename and may raise to
    abort (nothing is then written). Returns the paths written; the in-memory model keeps
    its data.
    """
    output = Path(output)
    if external_data is None:
        external_data = tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    data_name = f"{output.name}.data"
    with temp_folder(output) as tmp_dir:
        tmp_model = tmp_dir / output.name
        try:
            if external_data:
                _save_external(model, tmp_model, data_name)
            else:
                _save_streamed(model, tmp_model)
        except OSError as exc:
            raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
        if verify is not None:
            verify(tmp_model)
        moves = [(tmp_dir / data_name, output.parent / data_name)] if external_data else []
        commit(moves + [(tmp_model, output)], "output")
    return [output] + [target for _, target in moves]


def _save_streamed(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` as one protobuf file without serialising it into one buffer.

    Protobuf merges repeated occurrences of an embedded message field, so the file is the
    model without its main-graph nodes and initializers, followed by one ``graph`` field per
    node and per initializer (each holding just that entry). Any protobuf parser reads back
    the same model; memory stays at one tensor beyond the model itself.
    """
    graph = model.graph
    head = onnx.ModelProto()
    copy_fields(model, head, skip=("graph",))
    copy_fields(graph, head.graph, skip=("node", "initializer"))
    graph_tag, node_tag, init_tag = varint_bytes((7 << 3) | 2), varint_bytes((1 << 3) | 2), varint_bytes((5 << 3) | 2)
    with open(path, "wb") as handle:
        handle.write(head.SerializeToString())
        for tag, items in ((node_tag, graph.node), (init_tag, graph.initializer)):
            for item in items:
                payload = item.SerializeToString()
                inner = tag + varint_bytes(len(payload))
                handle.write(graph_tag + varint_bytes(len(inner) + len(payload)) + inner)
                handle.write(payload)
                del payload


def _save_external(model: onnx.ModelProto, tmp_model: Path, data_name: str) -> None:
    """Save with large tensors in one external file, tensor by tensor, leaving ``model`` untouched."""
    skeleton, placements = external_skeleton(model, data_name)
    with open(tmp_model.parent / data_name, "wb") as data_file:
        position = 0
        for tensor, offset, _ in placements:
            if offset > position:
                data_file.write(b"\0" * (offset - position))
            raw = tensor.raw_data
            data_file.write(raw)
            position = offset + len(raw)
            del raw
    onnx.save_model(skeleton, str(tmp_model))
