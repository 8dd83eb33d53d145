"""Finding the vocabulary of a language model: the token embedding and the LM head (reads the graph only).

The token embedding is a ``Gather`` on axis 0 of a 2-D float weight ``[V, H]`` whose indices come from an integer
graph input (possibly through Cast/Unsqueeze/Reshape/Identity/Squeeze/Flatten); position and token-type tables
are indexed by computed tensors and are not vocabulary. The LM head is a MatMul/Gemm whose weight has V on its
output axis (``[H, V]`` MatMul, ``[V, H]`` Gemm with ``transB=1``, or the embedding itself through a Transpose:
tied embeddings) and whose logits (possibly after a bias Add) are a graph output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from ..graph import GraphIndex, Weight, get_attr, iter_graphs, subgraph_reads

#: ops an index tensor may pass through between the integer input and the embedding Gather
INDEX_PASS_OPS = {"Cast", "Unsqueeze", "Reshape", "Identity", "Squeeze", "Flatten"}
#: ops the logits may pass through on their way to a graph output (they keep the vocabulary axis last)
LOGITS_PASS_OPS = {"Identity", "Cast", "Softmax", "LogSoftmax"}
INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
                 onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


@dataclass
class TokenEmbedding:
    """One embedding table ``[V, H]`` and the Gathers that read it with token ids."""

    weight: str
    gathers: list[str] = field(default_factory=list)  # node names
    inputs: list[str] = field(default_factory=list)  # the integer graph inputs the ids come from


@dataclass
class LMHead:
    """A MatMul/Gemm producing the logits: ``vocab_axis`` is the axis of ``weight`` (as stored) holding V."""

    node: str
    op: str
    weight: str
    vocab_axis: int
    logits: str  # the tensor after the head (and its bias): the one whose last axis is V
    output: str  # the graph output the logits become
    bias: str | None = None  # a [V] constant: Gemm's C or the Add's operand
    bias_node: str | None = None  # the Add node, when the bias is a separate Add
    tied: str | None = None  # "shared" (one tensor), "copy" (equal values in a second tensor) or None


@dataclass
class Vocabulary:
    """What :func:`find_vocabulary` found: the vocabulary size, its tables and heads, or why nothing."""

    size: int = 0
    hidden: int = 0
    embeddings: list[TokenEmbedding] = field(default_factory=list)
    heads: list[LMHead] = field(default_factory=list)
    reason: str | None = None  # why no vocabulary can be pruned (None: found)
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.reason is None

    @property
    def inputs(self) -> list[str]:
        return sorted({name for emb in self.embeddings for name in emb.inputs})

    def to_dict(self) -> dict[str, Any]:
        return {"found": self.found, "vocab_size": self.size, "hidden_size": self.hidden,
                "embeddings": [asdict(e) for e in self.embeddings], "lm_heads": [asdict(h) for h in self.heads],
                "tied": next((h.tied for h in self.heads if h.tied), None),
                "reason": self.reason, "notes": list(self.notes)}


def _index_source(index: GraphIndex, name: str, graph_inputs: dict[str, onnx.ValueInfoProto]) -> tuple[str | None, str]:
    """The integer graph input ``name`` comes from through index-preserving ops, or (None, why not)."""
    seen: set[str] = set()
    while name not in seen:
        seen.add(name)
        if name in graph_inputs:
            if graph_inputs[name].type.tensor_type.elem_type in INTEGER_TYPES:
                return name, ""
            return None, f"indices come from the non-integer input {name!r}"
        node = index.producer.get(name)
        if node is None:
            return None, f"indices come from the constant {name!r}"
        if node.op_type not in INDEX_PASS_OPS:
            return None, f"indices come from a computed tensor ({node.op_type} {node.name!r})"
        name = node.input[0]
    return None, "indices come from a cycle"


def _token_gathers(index: GraphIndex, notes: list[str]) -> dict[str, TokenEmbedding]:
    """Embedding tables read by Gathers on axis 0 with ids from integer graph inputs, by weight name."""
    graph = index.graph
    graph_inputs = {v.name: v for v in graph.input if v.name not in index.weights}
    tables: dict[str, TokenEmbedding] = {}
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        weight = index.weights.get(node.input[0])
        if weight is None or len(weight.shape) != 2 or not weight.is_float or get_attr(node, "axis", 0) != 0:
            continue
        source, why = _index_source(index, node.input[1], graph_inputs)
        if source is None:
            notes.append(f"table {weight.name!r} {list(weight.shape)} is not vocabulary: {why}")
            continue
        table = tables.setdefault(weight.name, TokenEmbedding(weight.name))
        table.gathers.append(node.name)
        if source not in table.inputs:
            table.inputs.append(source)
    return tables


def _reached_output(index: GraphIndex, name: str, outputs: set[str]) -> str | None:
    """The graph output ``name`` is, directly or through ops that keep the vocabulary axis last (None: none)."""
    for _ in range(8):
        if name in outputs:
            return name
        users = index.consumers.get(name, [])
        if len(users) != 1 or users[0][0].op_type not in LOGITS_PASS_OPS:
            return None
        node = users[0][0]
        if node.op_type in ("Softmax", "LogSoftmax") and get_attr(node, "axis", -1) != -1:
            return None
        name = node.output[0]
    return None


def _head_weight(index: GraphIndex, node: onnx.NodeProto, size: int, hidden: int) -> tuple[Weight, int] | None:
    """The weight of a MatMul/Gemm with V on its output axis and H on its input axis, and the stored V axis."""
    if node.op_type == "Gemm":
        if get_attr(node, "transA", 0) or len(node.input) < 2:
            return None
        weight = index.weights.get(node.input[1])
        axis = 0 if get_attr(node, "transB", 0) else 1
    elif node.op_type == "MatMul":
        weight, chain = index.resolve(node.input[1])
        if weight is None or any(n.op_type != "Transpose" and n.op_type != "Identity" for n in chain):
            return None
        flips = sum(1 for n in chain if n.op_type == "Transpose" and list(get_attr(n, "perm", [1, 0])) == [1, 0])
        if any(n.op_type == "Transpose" for n in chain) and flips != sum(n.op_type == "Transpose" for n in chain):
            return None
        axis = 0 if flips % 2 else 1
    else:
        return None
    if weight is None or len(weight.shape) != 2 or not weight.is_float:
        return None
    if weight.shape[axis] != size or weight.shape[1 - axis] != hidden:
        return None
    return weight, axis


def _bias(index: GraphIndex, node: onnx.NodeProto, size: int) -> tuple[str, str | None, str | None]:
    """The logits tensor after the head's bias, the [V] bias constant and the separate Add node (if any)."""
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        return node.output[0], node.input[2], None
    users = index.consumers.get(node.output[0], [])
    if len(users) == 1 and users[0][0].op_type == "Add":
        add, slot = users[0]
        other = index.weights.get(add.input[1 - slot])
        if other is not None and other.size == size and other.shape and other.shape[-1] == size:
            return add.output[0], other.name, add.name
    return node.output[0], None, None


def _lm_heads(index: GraphIndex, size: int, hidden: int, embeddings: set[str]) -> list[LMHead]:
    """The MatMul/Gemm nodes whose logits over ``size`` tokens reach a graph output."""
    outputs = {o.name for o in index.graph.output}
    heads = []
    for node in index.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        found = _head_weight(index, node, size, hidden)
        if found is None:
            continue
        weight, axis = found
        logits, bias, bias_node = _bias(index, node, size)
        output = _reached_output(index, logits, outputs)
        if output is None:
            continue
        heads.append(LMHead(node.name, node.op_type, weight.name, axis, logits, output, bias, bias_node,
                            _tied(index, weight, axis, embeddings)))
    return heads


def _tied(index: GraphIndex, weight: Weight, axis: int, embeddings: set[str]) -> str | None:
    """"shared" when the head reads an embedding table itself, "copy" when it holds the same values transposed."""
    if weight.name in embeddings:
        return "shared"
    values = weight.array() if axis == 0 else weight.array().T
    for name in embeddings:
        table = index.weights[name]
        if table.shape == values.shape and np.array_equal(table.array(), values):
            return "copy"
    return None


def _foreign_readers(index: GraphIndex, name: str, allowed: set[int]) -> list[str]:
    """Nodes other than ``allowed`` (ids) that read ``name``, subgraphs included."""
    readers = [f"{n.op_type} {n.name!r}" for n, _ in index.consumers.get(name, []) if id(n) not in allowed]
    readers += [f"{n.op_type} {n.name!r} (subgraph)" for n in index.graph.node if name in subgraph_reads(n)]
    return readers


def _check_readers(index: GraphIndex, vocab: Vocabulary) -> str | None:
    """Why a table or head weight cannot lose rows: another node reads it (None: only the found uses)."""
    nodes = {n.name: n for n in index.graph.node}
    allowed = {id(nodes[g]) for e in vocab.embeddings for g in e.gathers}
    for head in vocab.heads:
        node = nodes[head.node]
        allowed.add(id(node))
        if node.op_type == "MatMul":
            _, chain = index.resolve(node.input[1])
            allowed |= {id(n) for n in chain}
    allowed |= {id(nodes[h.bias_node]) for h in vocab.heads if h.bias_node}
    names = [e.weight for e in vocab.embeddings] + [h.weight for h in vocab.heads] + [
        h.bias for h in vocab.heads if h.bias]
    outputs = {o.name for o in index.graph.output}
    for name in dict.fromkeys(names):
        readers = _foreign_readers(index, name, allowed)
        if readers or name in outputs:
            return f"{name!r} is also read by {readers[0] if readers else 'a graph output'}"
    return None


def find_vocabulary(model: onnx.ModelProto) -> Vocabulary:
    """The token embedding(s) and LM head(s) of ``model``'s main graph, or the reason none can be pruned."""
    index = GraphIndex.build(model.graph)
    notes: list[str] = []
    tables = _token_gathers(index, notes)
    if not tables:
        fused = next((n for n in model.graph.node if n.op_type == "EmbedLayerNormalization"), None)
        why = (f"the token embedding is inside the fused {fused.domain}::{fused.op_type} {fused.name!r}" if fused
               else "no Gather reads a 2-D float table with ids from an integer graph input")
        return Vocabulary(reason=why + (f" ({notes[0]})" if notes else ""), notes=notes)
    size = max(index.weights[name].shape[0] for name in tables)
    chosen = [t for name, t in tables.items() if index.weights[name].shape[0] == size]
    hidden = {index.weights[t.weight].shape[1] for t in chosen}
    notes += [f"table {t.weight!r} {list(index.weights[t.weight].shape)} is indexed by ids too but is smaller than "
              f"the vocabulary ({size}): left alone" for name, t in tables.items() if t not in chosen]
    if len(hidden) != 1:
        return Vocabulary(size=size, embeddings=chosen, notes=notes,
                          reason=f"the {size}-row tables differ in width ({sorted(hidden)})")
    vocab = Vocabulary(size=size, hidden=hidden.pop(), embeddings=chosen, notes=notes)
    vocab.heads = _lm_heads(index, size, vocab.hidden, {t.weight for t in chosen})
    if not vocab.heads:
        vocab.notes.append(f"no LM head: no MatMul/Gemm with a [{vocab.hidden}, {size}] weight produces a graph output")
    if any(model.graph is not g and any(n.op_type == "Gather" for n in g.node) for g in iter_graphs(model.graph)):
        vocab.notes.append("subgraphs are not searched for token embeddings")
    vocab.reason = _check_readers(index, vocab)
    return vocab


def describe_vocabulary(model: onnx.ModelProto) -> dict[str, Any]:
    """``inspect``'s vocabulary section: embedding(s), LM head(s), tied or not, vocabulary size; or why none."""
    return find_vocabulary(model).to_dict()


def render_vocabulary(info: dict[str, Any]) -> list[str]:
    """The terminal lines of :func:`describe_vocabulary`."""
    if not info["embeddings"]:
        return [f"vocabulary: none ({info['reason']})"]
    lines = [f"vocabulary: {info['vocab_size']:,} tokens, hidden size {info['hidden_size']}"
             + ("" if info["found"] else f"; cannot be pruned: {info['reason']}")]
    for emb in info["embeddings"]:
        lines.append(f"  embedding {emb['weight']} read by {len(emb['gathers'])} Gather(s) with ids from "
                     f"{', '.join(emb['inputs'])}")
    for head in info["lm_heads"]:
        tied = {"shared": "tied (reads the embedding)", "copy": "tied by value (a copy of the embedding)"}.get(
            head["tied"], "not tied")
        lines.append(f"  LM head {head['op']} {head['node']!r} weight {head['weight']} -> {head['output']}, {tied}")
    lines += [f"  note: {note}" for note in info["notes"]]
    return lines
