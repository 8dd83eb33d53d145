"""The residual stream's data model (what :mod:`onnxprune.analysis.stream` finds and
:mod:`onnxprune.passes.rotation` rewrites): norms, linear readers and writers, embedding rows, constant terms,
shortcuts, segments and streams, and their JSON description. Data only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

FLOAT = onnx.TensorProto.FLOAT


class NotRotatable(Exception):
    """The stream cannot be rotated exactly; the message says why."""


@dataclass(eq=False)
class Norm:
    """One norm over the hidden axis: ``output = normalize(input) * gamma + beta``."""

    name: str
    kind: str  # "layernorm" (subtracts the mean) or "rmsnorm"
    input: str
    output: str
    gamma: np.ndarray
    beta: np.ndarray
    epsilon: float
    nodes: list[onnx.NodeProto]


@dataclass(eq=False)
class Linear:
    """A MatMul/Gemm with a constant 2-D weight, seen as ``[in, out]``; ``reshapes`` keep the last axis."""

    node: onnx.NodeProto
    weight: np.ndarray  # float64, [in, out]
    bias: tuple[onnx.NodeProto, int] | None  # the node and input slot holding the [out] bias constant
    reshapes: list[onnx.NodeProto]
    entry: str  # reader: the stream-side tensor it reads; writer: the tensor added to the stream
    conv: bool = False  # a patch-embedding Conv writing the stream through Reshape + Transpose (ViT)

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]


@dataclass(eq=False)
class Embedding:
    """A ``Gather`` of rows of a constant [rows, H] table written into the stream."""

    node: onnx.NodeProto
    table: np.ndarray  # float64

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]


@dataclass(eq=False)
class ConstantTerm:
    """A constant [..., H] added into the stream (ViT's position embeddings, an expanded class token)."""

    node: onnx.NodeProto  # the node reading the constant
    slot: int
    value: np.ndarray  # float64


@dataclass(eq=False)
class Shortcut:
    """A term of a segment that carries an earlier stream value: a segment (``raw``) or a norm output."""

    add: onnx.NodeProto
    slot: int
    source: str  # the segment tensor, or the norm's output tensor
    norm: Norm | None  # set when the shortcut reads a norm's output (post-LN)


@dataclass(eq=False)
class Segment:
    """One tensor of the stream that norms read, with the terms it is the sum of."""

    tensor: str
    norms: list[Norm] = field(default_factory=list)
    writers: list[Linear] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)
    constants: list[ConstantTerm] = field(default_factory=list)
    shortcuts: list[Shortcut] = field(default_factory=list)
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # the Adds and Casts that build it


@dataclass(eq=False)
class Stream:
    """A residual stream: its segments in graph order, the readers of each norm's output, and the consumers of a
    norm's output that get the output rotated back (graph outputs and ops that are not linear readers)."""

    hidden: int
    centered: bool  # LayerNorm stream: writers are centered so the norms become RMSNorms
    segments: list[Segment]
    readers: dict[str, list[Linear]]  # norm name -> linear readers of its output
    restored: dict[str, list[str]]  # norm name -> what reads the output rotated back (node names / "output NAME")
    shape_reads: list[tuple[str, onnx.NodeProto, bool]] = field(default_factory=list)  # (stream tensor, Shape node, reads the width)

    @property
    def norms(self) -> list[Norm]:
        return [n for s in self.segments for n in s.norms]

    @property
    def post_ln(self) -> bool:
        return any(c.norm is not None for s in self.segments for c in s.shortcuts)


@dataclass
class StreamReport:
    """The streams found in a model and the norms that could not be placed in a rotatable stream."""

    streams: list[Stream]
    refused: list[str]  # reasons, one per stream or norm group not rotatable

    def to_dict(self) -> dict[str, Any]:
        return {"streams": [describe_stream(s) for s in self.streams], "refused": self.refused}


def describe_stream(stream: Stream) -> dict[str, Any]:
    """The JSON summary of one stream (inspect and the report)."""
    return {
        "hidden": stream.hidden,
        "norm": "layernorm" if stream.centered else "rmsnorm",
        "layout": "post-ln" if stream.post_ln else "pre-ln",
        "segments": len(stream.segments),
        "norms": [n.name for n in stream.norms],
        "writers": sum(len(s.writers) for s in stream.segments),
        "embeddings": sum(len(s.embeddings) + len(s.constants) for s in stream.segments),
        "readers": sum(len(r) for r in stream.readers.values()),
        "restored": sorted({r for names in stream.restored.values() for r in names}),
        "shape_reads": sum(1 for read in stream.shape_reads if read[2]),
    }
