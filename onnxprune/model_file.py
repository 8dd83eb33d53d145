"""Reading an ONNX protobuf file without holding its bytes and the parsed model at once.

``onnx.load`` reads the whole file into one ``bytes`` object and parses it: the model exists twice until the parse
ends (an 86 MB encoder: 172 MB above the imports). Protobuf parses a message from concatenated pieces as it would
from the whole (repeated fields append in order, singular ones merge or the last wins), so :func:`read_model` merges
the model one top-level field at a time and the graph one entry (node, initializer, value info...) at a time: the
file's bytes are held one entry at a time, the largest tensor at most. Anything this reader does not expect (group
wire types, a length past the end, a field number 0) falls back to ``onnx.load``, so malformed files fail exactly
as they always did.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

import onnx

#: ModelProto's ``graph`` field number
GRAPH_FIELD = 7


class _Unexpected(Exception):
    """The file's wire format is not what the piecewise reader handles: parse it whole."""


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The model in the ONNX file ``path`` (external data not loaded), parsed piece by piece; the same message as
    ``onnx.load(path, load_external_data=False)`` (which other serialisation formats, by extension, still use)."""
    path = os.fspath(path)
    fmt = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(path)[1])
    if fmt not in (None, "protobuf"):
        return onnx.load(path, load_external_data=False)
    try:
        return _merge_pieces(path)
    except _Unexpected:
        return onnx.load(path, load_external_data=False)


def _merge_pieces(path: str, keep: Callable[[int, int, int], bool] | None = None) -> onnx.ModelProto:
    """The model in ``path`` merged one top-level field and one graph entry at a time; ``keep(field number, start,
    stop)`` chooses the graph entries read (default: all). Raises :class:`_Unexpected` on what it does not handle."""
    model = onnx.ModelProto()
    with open(path, "rb") as handle:
        end = os.fstat(handle.fileno()).st_size
        for number, start, stop in _fields(handle, 0, end):
            if number != GRAPH_FIELD:
                model.MergeFromString(_read(handle, start, stop))
                continue
            payload = _payload_start(handle, start)
            if payload == stop:  # an empty graph field still sets the graph
                model.MergeFromString(_read(handle, start, stop))
            for entry, entry_start, entry_stop in _fields(handle, payload, stop):
                if keep is None or keep(entry, entry_start, entry_stop):
                    model.MergeFromString(_as_graph_field(handle, entry_start, entry_stop))
    return model


#: GraphProto field numbers of its weights: ``initializer`` and ``sparse_initializer``
WEIGHT_FIELDS = (5, 15)
#: :func:`read_structure` keeps the initializers serialized in at most this many bytes (shapes, axes, scalars)
SMALL_ENTRY = 4096


def read_structure(path: str | os.PathLike) -> onnx.ModelProto:
    """The model in the ONNX file ``path`` without its main graph's large initializers (over ``SMALL_ENTRY`` bytes
    serialized, skipped unread): its nodes, inputs, outputs, opsets and small constants, to read its structure."""
    path = os.fspath(path)
    fmt = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(path)[1])
    try:
        if fmt not in (None, "protobuf"):
            raise _Unexpected
        return _merge_pieces(path, lambda entry, start, stop: entry not in WEIGHT_FIELDS or stop - start <= SMALL_ENTRY)
    except _Unexpected:
        model = read_model(path)
        for field in ("initializer", "sparse_initializer"):
            kept = [t for t in getattr(model.graph, field) if t.ByteSize() <= SMALL_ENTRY]
            model.graph.ClearField(field)
            getattr(model.graph, field).extend(kept)
    return model


#: TensorProto field numbers: ``name`` and ``raw_data``
TENSOR_NAME, TENSOR_RAW_DATA = 8, 9
#: GraphProto's ``initializer`` field number
INITIALIZER_FIELD = 5


def tensor_data_ranges(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """(offset, length) in the file ``path`` of each main-graph initializer's ``raw_data`` bytes, by name; reads
    the fields' tags and lengths only. Empty for a file this reader does not handle; a name met twice, or a tensor
    whose name or data is given twice, has no entry."""
    path = os.fspath(path)
    fmt = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(path)[1])
    if fmt not in (None, "protobuf"):
        return {}
    ranges: dict[str, tuple[int, int] | None] = {}
    try:
        with open(path, "rb") as handle:
            end = os.fstat(handle.fileno()).st_size
            for number, start, stop in _fields(handle, 0, end):
                if number != GRAPH_FIELD:
                    continue
                for entry, entry_start, entry_stop in _fields(handle, _payload_start(handle, start), stop):
                    if entry != INITIALIZER_FIELD or not _delimited(handle, entry_start, entry_stop):
                        continue
                    name, data = _name_and_data(handle, _payload_start(handle, entry_start), entry_stop)
                    if name is not None:
                        ranges[name] = None if name in ranges else data
    except (_Unexpected, OSError, UnicodeDecodeError):
        return {}
    return {name: found for name, found in ranges.items() if found is not None}


def _name_and_data(handle: BinaryIO, position: int, end: int) -> tuple[str | None, tuple[int, int] | None]:
    """A serialized TensorProto's name and the (offset, length) of its raw data (None where absent or given
    twice: protobuf would keep the last, and a merge may join them)."""
    names, data = [], []
    for number, start, stop in _fields(handle, position, end):
        if number in (TENSOR_NAME, TENSOR_RAW_DATA):
            if not _delimited(handle, start, stop):
                return None, None
            payload = _payload_start(handle, start)
            if number == TENSOR_NAME:
                names.append(_read(handle, payload, stop).decode("utf-8"))
            else:
                data.append((payload, stop - payload))
    return (names[0] if len(names) == 1 else None), (data[0] if len(data) == 1 else None)


def _delimited(handle: BinaryIO, start: int, stop: int) -> bool:
    """Whether the field at ``start`` is length-delimited (wire type 2)."""
    tag, _ = _varint(handle, start, stop)
    return tag & 7 == 2


def _as_graph_field(handle: BinaryIO, start: int, stop: int) -> bytearray:
    """The graph entry in bytes ``start:stop`` wrapped as a ModelProto ``graph`` field, read into one buffer."""
    prefix = varint_bytes((GRAPH_FIELD << 3) | 2) + varint_bytes(stop - start)
    buffer = bytearray(len(prefix) + stop - start)
    buffer[:len(prefix)] = prefix
    handle.seek(start)
    if handle.readinto(memoryview(buffer)[len(prefix):]) != stop - start:
        raise _Unexpected
    return buffer


def _read(handle: BinaryIO, start: int, stop: int) -> bytes:
    handle.seek(start)
    data = handle.read(stop - start)
    if len(data) != stop - start:
        raise _Unexpected
    return data


def _varint(handle: BinaryIO, position: int, end: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
    handle.seek(position)
    value = shift = 0
    while True:
        if position >= end or shift > 63:
            raise _Unexpected
        byte = handle.read(1)
        if not byte:
            raise _Unexpected
        position += 1
        value |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            return value, position


def varint_bytes(value: int) -> bytes:
    """``value`` as a protobuf varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _payload_start(handle: BinaryIO, start: int) -> int:
    """Where the payload of the length-delimited field at ``start`` begins (after its tag and length)."""
    _, position = _varint(handle, start, start + 20)
    _, position = _varint(handle, position, position + 10)
    return position


def _fields(handle: BinaryIO, position: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, stop) of each field of the message in bytes ``position:end``, the tag included."""
    while position < end:
        tag, after = _varint(handle, position, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Unexpected
        if wire == 0:
            _, stop = _varint(handle, after, end)
        elif wire == 1:
            stop = after + 8
        elif wire == 2:
            length, payload = _varint(handle, after, end)
            stop = payload + length
        elif wire == 5:
            stop = after + 4
        else:  # groups (3, 4) and invalid wire types
            raise _Unexpected
        if stop > end:
            raise _Unexpected
        yield number, position, stop
        position = stop
