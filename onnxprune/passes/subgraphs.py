"""Structured pruning inside If/Loop/Scan bodies: each subgraph is its own scope.

A subgraph is analysed as a stand-alone model (its *wrapper*): its formal inputs and the outer-scope tensors it
reads become graph inputs (no channels), its outputs stay graph outputs (frozen: they are the If/Loop/Scan node's
interface and loop-carried values). Weights are the subgraph's initializers and Constant nodes, plus outer-scope
weights that nothing outside this subgraph reads (lifted in, sliced, and written back where they live). An outer
weight read elsewhere too (e.g. by both branches of an If) is frozen. After removal the wrapper's graph replaces the
subgraph; nested subgraphs are scopes of their own, innermost first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx

from ..analysis.cost import infer_shapes
from ..graph import build_indexes, free_names, iter_graphs
from ..shapes import skeleton

#: criteria a subgraph can be scored with (the data-driven ones need activations inside the body: l1 instead)
WEIGHT_CRITERIA = ("l1", "l2", "random", "bn")
#: ops whose output channels structured pruning removes
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")


@dataclass
class Scope:
    """One subgraph analysed as a stand-alone model."""

    where: str  # "If 'cond' then_branch" (nested: "If 'a' else_branch / Loop 'b' body")
    graph: onnx.GraphProto  # the subgraph inside the model
    wrapper: onnx.ModelProto
    formal: int  # how many of the wrapper's inputs are the subgraph's own
    lifted: dict[str, onnx.TensorProto] = field(default_factory=dict)  # outer weights only this scope reads
    shared: dict[str, bytes] = field(default_factory=dict)  # outer weights read elsewhere too: name -> bytes
    shapes: dict[str, list[int]] = field(default_factory=dict)  # concrete input shapes of the wrapper
    layers: list[str] = field(default_factory=list)
    skipped: str | None = None  # why this scope cannot be analysed at all


def scopes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> Iterator[Scope]:
    """Every subgraph holding layers, innermost first, each wrapped only when the caller asks for the next one: a
    scope written back before then is what its parent's wrapper copies. (Pruning inside one scope changes neither
    the types nor the readers of the outer tensors another scope reads, so those are found once.)"""
    sites = []
    for where, graph in _walk(model.graph, ""):
        layers = [n.name or n.output[0] for g in iter_graphs(graph) for n in g.node if n.op_type in LAYER_OPS]
        if layers:
            sites.append((where, graph, layers))
    if not sites:
        return
    types, concrete = _outer_types(model, input_shapes)
    reads = _read_counts(model)
    for where, graph, layers in sites:
        yield _wrap(model, where, graph, layers, types, concrete, reads)


def _walk(graph: onnx.GraphProto, prefix: str):
    """(where, subgraph) for every subgraph under ``graph``, children before their parent (post-order)."""
    out = []
    stack = [(graph, prefix, False)]
    while stack:
        current, where, done = stack.pop()
        if done:
            out.append((where, current))
            continue
        if current is not graph:
            stack.append((current, where, True))
        for node in reversed(current.node):
            for attr in reversed(node.attribute):
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for k, sub in reversed(list(enumerate(subs))):
                    name = f"{node.op_type} {node.name!r} {attr.name}" + (f"[{k}]" if len(subs) > 1 else "")
                    stack.append((sub, f"{where} / {name}" if where else name, False))
    return out


def _outer_types(model: onnx.ModelProto, input_shapes) -> tuple[dict[str, onnx.TypeProto], dict[str, list]]:
    """Element types (with symbolic dims) and concrete shapes of every tensor, subgraphs included."""
    skel = skeleton(model, None)
    del skel.graph.input[:]
    skel.graph.input.extend(model.graph.input)  # symbolic dims stay symbolic in the wrapper
    with contextlib.suppress(Exception):
        skel = onnx.shape_inference.infer_shapes(skel, data_prop=True)
    types: dict[str, onnx.TypeProto] = {}
    for graph in iter_graphs(skel.graph):
        for value in [*graph.input, *graph.value_info, *graph.output]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                types.setdefault(value.name, value.type)
    return types, infer_shapes(model, input_shapes)


def _read_counts(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Tensor name -> ids of the graphs (any depth) whose nodes read it: an outer weight is lifted into a scope only
    when every reading graph lies inside that scope."""
    reads: dict[str, list[int]] = {}
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            for name in node.input:
                if name:
                    reads.setdefault(name, []).append(id(graph))
    return reads


def _wrap(model, where, graph, layers, types, concrete, reads) -> Scope:
    """The stand-alone model of ``graph``: formal inputs, then outer tensors as inputs or lifted weights."""
    wrapper = onnx.ModelProto()
    wrapper.ir_version = model.ir_version
    wrapper.opset_import.extend(model.opset_import)
    wrapper.graph.CopyFrom(graph)
    scope = Scope(where, graph, wrapper, len(graph.input), layers=layers)
    inner = {id(g) for g in iter_graphs(graph)}
    index = _index_of(model, graph)
    seen = set()
    for name in free_names(graph):
        if name in seen:
            continue
        seen.add(name)
        weight = index.lookup_weight(name) if index is not None else None
        if weight is not None:
            tensor = wrapper.graph.initializer.add()
            tensor.CopyFrom(weight.tensor)
            tensor.name = name
            if all(g in inner for g in reads.get(name, [])):
                scope.lifted[name] = weight.tensor
            else:
                scope.shared[name] = tensor.SerializeToString()
            continue
        if name not in types:
            scope.skipped = f"the type of outer-scope tensor {name!r} is unknown"
            return scope
        wrapper.graph.input.append(onnx.helper.make_value_info(name, types[name]))
        if concrete.get(name) is not None and None not in concrete[name]:
            scope.shapes[name] = list(concrete[name])
    for value in graph.input:
        if concrete.get(value.name) is not None and None not in concrete[value.name]:
            scope.shapes[value.name] = list(concrete[value.name])
    return scope


def _index_of(model: onnx.ModelProto, graph: onnx.GraphProto):
    """The :class:`GraphIndex` of ``graph`` (with its enclosing scopes), or None."""
    for index in build_indexes(model):
        if index.graph is graph:
            return index
    return None


def write_back(scope: Scope) -> str | None:
    """Replace the subgraph by the wrapper's graph and store lifted weights where they live. Returns why not, when
    the edit would change an outer-scope tensor that other graphs read too (nothing is written then)."""
    inits = {t.name: t for t in scope.wrapper.graph.initializer}
    for name in scope.shared:
        new = inits.get(name)
        if new is None or new.SerializeToString() != scope.shared[name]:
            return f"the edit would change outer-scope tensor {name!r}, which is read outside this subgraph too"
    for name, home in scope.lifted.items():
        new = inits.get(name)
        if new is not None:
            keep_name = home.name
            home.CopyFrom(new)
            home.name = keep_name
    outer = set(scope.lifted) | set(scope.shared)
    graph = scope.wrapper.graph
    kept = [t for t in graph.initializer if t.name not in outer]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.input[scope.formal:]
    del graph.value_info[:]  # shapes inferred for the wrapper's concrete inputs: the runtime infers its own
    scope.graph.CopyFrom(graph)
    return None


