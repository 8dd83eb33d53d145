"""Dependency groups: which channels of which tensors must be removed together.

Every output channel of a *producer* (Conv, ConvTranspose, Gemm, MatMul with a constant
weight) gets a global channel id. Walking the graph in topological order, each tensor that
carries channels is annotated with its channel axis and, per position on that axis, the id
of the channel it holds (a Concat output holds ids of several producers; a Flatten output
holds each id once per spatial position). The op rules in :mod:`rules` compute these
annotations and record *edits*: weight slices, per-channel constants and attributes that
follow the channels. Elementwise ops (residual Add, SE Mul) *tie* ids with a union-find.
A set of tied ids is one removable unit; anything the rules cannot follow *freezes* it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import build_indexes, constant_shapes, first_match, free_names, value_shapes
from ..shapes import skeleton, symbolic_inference
from .registry import (  # noqa: F401 - Annotation, Space: re-exported
    Analysis,
    Annotation,
    Freeze,
    Space,
    WeightEdit,
    find_root,
    rule_error,
    union,
)
from .rules._common import SAME_SHAPE
from .rules.catalog import CUSTOM_PRODUCERS, RULES, producer_rule


def complete_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
                    ) -> dict[str, list[int | None]]:
    """Static shapes of every tensor: onnx shape inference on a weight-less skeleton, continued by hand
    through shape-preserving ops it cannot infer and Reshapes whose run-time target folds to constants."""
    skel = skeleton(model, input_shapes)
    skel = _static_inference(skel) or _dynamic_inference(model, skel)
    return value_shapes(skel.graph) | constant_shapes(skel.graph)


def _dynamic_inference(model: onnx.ModelProto, skel: onnx.ModelProto) -> onnx.ModelProto:
    """``skel`` with shapes from onnxruntime's symbolic inference, onnx's inference (with data propagation)
    and :func:`_fill_types`, repeated while the last one adds shapes."""
    custom = {o for n in model.graph.node if n.domain not in ("", "ai.onnx") for o in n.output}
    skel = symbolic_inference(skel)
    custom &= {v.name for v in model.graph.value_info if v.type.tensor_type.HasField("shape")}  # a shape, not a type
    kept = [v for v in skel.graph.value_info if v.name not in custom]
    del skel.graph.value_info[:]
    skel.graph.value_info.extend(kept)
    skel.graph.value_info.extend(v for v in model.graph.value_info if v.name in custom)  # the exporter's word
    for _ in range(64):
        with contextlib.suppress(Exception):  # shapes are best effort; unknown shapes freeze channels
            skel = onnx.shape_inference.infer_shapes(skel, data_prop=True)
        types = {v.name: v.type for v in [*skel.graph.input, *skel.graph.value_info, *skel.graph.output]
                 if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
        added = _fill_types(skel, types)
        if not added:
            break
        skel.graph.value_info.extend(added)
    return skel


def _static_inference(skel: onnx.ModelProto) -> onnx.ModelProto | None:
    """The skeleton as onnx's own inference completes it when that gives every output of the graph a fully known
    shape (onnxruntime's symbolic inference, about a millisecond per node in Python, has nothing to add), else None."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
    except Exception:  # noqa: BLE001 - let the symbolic inference try
        return None
    known = {v.name for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
             and all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)}
    known.update(i.name for i in skel.graph.initializer)
    return inferred if all(out in known for node in skel.graph.node for out in node.output if out) else None


def _fill_types(skel: onnx.ModelProto, types: dict[str, onnx.TypeProto]) -> list[onnx.ValueInfoProto]:
    """Value infos for outputs shape inference left empty: shape-preserving ops and foldable Reshapes."""
    added = []
    values = _ShapeValues(skel, types)
    for node in skel.graph.node:
        if not node.output or node.output[0] in types or not node.input or node.input[0] not in types:
            continue
        source = types[node.input[0]]
        if node.op_type in SAME_SHAPE:
            new = onnx.TypeProto()
            new.CopyFrom(source)
            if node.op_type == "Cast":
                new.tensor_type.elem_type = next(a.i for a in node.attribute if a.name == "to")
        elif node.op_type == "Reshape" and len(node.input) > 1:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in source.tensor_type.shape.dim]
            target = values.get(node.input[1])
            if target is None or None in dims:
                continue
            target = [dims[i] if v == 0 else int(v) for i, v in enumerate(target)]
            if -1 in target:
                known = int(np.prod([v for v in target if v != -1], dtype=np.int64))
                target[target.index(-1)] = int(np.prod(dims, dtype=np.int64)) // max(known, 1)
            new = onnx.helper.make_tensor_type_proto(source.tensor_type.elem_type, target)
        else:
            continue
        types[node.output[0]] = new
        added.append(onnx.helper.make_value_info(node.output[0], new))
    return added


class _ShapeValues:
    """Folds small shape computations (Shape, Gather, Concat, Slice, Unsqueeze, Squeeze, Cast) to constants."""

    def __init__(self, skel: onnx.ModelProto, types: dict[str, onnx.TypeProto]):
        self.types = types
        self.producer = {o: n for n in skel.graph.node for o in n.output}
        self.consts = {i.name: i for i in skel.graph.initializer}

    _OPS = ("Constant", "Shape", "Gather", "Concat", "Slice", "Unsqueeze", "Squeeze", "Cast", "Identity")

    def get(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it folds; inputs first, with an explicit stack (no recursion on graph size)."""
        values: dict[str, np.ndarray | None] = {}
        stack, expanded = [name], set()
        while stack:
            current = stack[-1]
            if current in values:
                stack.pop()
                continue
            node = self.producer.get(current)
            if current not in expanded and current not in self.consts and node is not None and \
                    node.op_type in self._OPS and node.op_type not in ("Constant", "Shape"):
                expanded.add(current)  # inputs first; an input already expanded is an ancestor (a cycle)
                stack.extend(i for i in node.input if i and i not in values and i not in expanded)
                continue
            values[current] = self._fold(current, values)
            stack.pop()
        return values[name]

    def _fold(self, name: str, values: dict[str, np.ndarray | None]) -> np.ndarray | None:
        if name in self.consts:
            return onnx.numpy_helper.to_array(self.consts[name]) if self.consts[name].ByteSize() else None
        node = self.producer.get(name)
        if node is None or node.op_type not in self._OPS:
            return None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            return onnx.numpy_helper.to_array(attrs["value"]) if "value" in attrs else None
        if node.op_type == "Shape":
            t = self.types.get(node.input[0])
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim] if t else [None]
            dims = dims[attrs.get("start", 0):attrs.get("end", len(dims))]
            return None if None in dims else np.array(dims, dtype=np.int64)
        args = [values.get(i) if i else None for i in node.input]
        if any(a is None for a in args[:1]):
            return None
        if node.op_type == "Gather" and args[1] is not None:
            return np.take(args[0], args[1], axis=attrs.get("axis", 0))
        if node.op_type == "Concat" and all(a is not None for a in args):
            return np.concatenate([np.atleast_1d(a) for a in args], axis=attrs.get("axis", 0))
        if node.op_type == "Slice" and args[0].ndim == 1 and len(args) >= 3 and all(
                x is not None for x in args[1:3]) and all(x is None or x.size == 1 for x in args[3:]) and (
                len(args) < 5 or args[4] is None or int(args[4].reshape(-1)[0]) == 1):
            return args[0][int(args[1].reshape(-1)[0]):int(args[2].reshape(-1)[0])]
        if node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
            if node.op_type == "Unsqueeze":
                return args[0].reshape(1) if args[0].ndim == 0 else None
            return args[0].reshape(()) if node.op_type == "Squeeze" and args[0].size == 1 else args[0]
        return None


def analyse(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
            exclude: list[str] = (), approximate_layernorm: bool = False, overrides: list[dict] = ()) -> Analysis:
    """Walk the main graph, apply the op rules and return channel ids, ties, edits and frozen ids."""
    index = build_indexes(model)[0]
    analysis = Analysis(model=model, shapes=complete_shapes(model, input_shapes), index=index,
                        approximate_layernorm=approximate_layernorm)
    subgraph_refs = _outer_scope_refs(model.graph)
    for node in model.graph.node:
        annotated = [name for name in node.input if name in analysis.ann]
        snapshot = (analysis.num_channels, len(analysis.edits), len(analysis.node_edits))
        try:
            if node.domain not in ("", "ai.onnx"):
                custom = RULES.get(f"{node.domain}::{node.op_type}")
                if custom is not None and (annotated or f"{node.domain}::{node.op_type}" in CUSTOM_PRODUCERS):
                    custom(analysis, node)
                elif annotated:
                    raise Freeze(f"custom-domain op {node.domain}::{node.op_type} ({node.name!r}) has no channel rule")
                continue
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                refs = [name for name in subgraph_refs.get(id(node), ()) if name in analysis.ann]
                if annotated or refs:
                    raise Freeze(f"control-flow op {node.op_type} ({node.name!r}) reads these channels in a subgraph")
                continue
            if annotated:
                rule = RULES.get(node.op_type)
                if rule is None:
                    raise Freeze(f"no channel rule for {node.op_type} ({node.name!r})")
                rule(analysis, node)
            else:
                producer_rule(analysis, node)
        except Exception as exc:  # noqa: BLE001 - unknown means frozen; a rule's own failure is named as a bug
            if not isinstance(exc, Freeze):
                exc = rule_error(node, exc, bool(annotated))
            del analysis.edits[snapshot[1]:], analysis.node_edits[snapshot[2]:]
            analysis.freeze(np.arange(snapshot[0], analysis.num_channels), str(exc))
            for name in annotated:
                analysis.freeze(analysis.ann[name].ids, str(exc))
            for name in subgraph_refs.get(id(node), ()):
                if name in analysis.ann:
                    analysis.freeze(analysis.ann[name].ids, str(exc))
            for out in node.output:
                analysis.ann.pop(out, None)
    for check in analysis.deferred:
        check()
    for output in model.graph.output:
        if output.name in analysis.ann:
            analysis.freeze(analysis.ann[output.name].ids, f"reaches graph output {output.name!r}")
    _dedupe_shared_weights(analysis)
    if exclude or overrides:
        _apply_exclusions(analysis, list(exclude), list(overrides))
    return analysis


def _outer_scope_refs(graph: onnx.GraphProto) -> dict[int, list[str]]:
    """For each node with subgraphs: the outer tensors its subgraphs read."""
    refs: dict[int, list[str]] = {}
    for node in graph.node:
        names: list[str] = []
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                names.extend(free_names(sub))
        if names:
            refs[id(node)] = names
    return refs


def _dedupe_shared_weights(analysis: Analysis) -> None:
    """A weight read twice along one axis follows both channel sets: tie them position-wise.

    Per-channel parameters (biases, norm scales) that several nodes read are not tied: exporters
    merge equal initializers (freshly initialised zeros and ones), which is no reason to prune the
    layers alike. Each pruned reader gets its own copy instead.
    """
    readers = _readers(analysis)
    seen: dict[tuple[int, int], WeightEdit] = {}
    kept: list[WeightEdit] = []
    for edit in analysis.edits:
        if edit.role == "param" and readers.get(id(edit.weight.tensor), 0) > 1 and reader_slot(analysis, edit) is not None:
            edit.private = True
            kept.append(edit)
            continue
        key = (id(edit.weight.tensor), edit.axis)
        first = seen.get(key)
        if first is None:
            seen[key] = edit
            kept.append(edit)
        else:
            analysis.tie(first.ids, edit.ids)
            if edit.role == "consumer" and first.role != "consumer":
                first.role = "consumer"
    analysis.edits = kept


def _readers(analysis: Analysis) -> dict[int, int]:
    """How many (node, input) pairs of the main graph read each weight, through Identity/Cast chains."""
    counts: dict[int, int] = {}
    index = analysis.index
    for node in analysis.model.graph.node:
        for name in node.input:
            if not name or (node.op_type == "Identity" and name in index.weights):
                continue
            weight = index.lookup_weight(name) if node.op_type != "Identity" else None
            if weight is None and node.op_type != "Identity":
                weight, _ = index.resolve(name)
            if weight is not None:
                counts[id(weight.tensor)] = counts.get(id(weight.tensor), 0) + 1
    return counts


def reader_slot(analysis: Analysis, edit: WeightEdit) -> int | None:
    """The input of ``edit.node`` that reads the weight (directly or through Identity), if exactly one."""
    if edit.weight.graph is not analysis.model.graph:
        return None
    slots = []
    for slot, name in enumerate(edit.node.input):
        weight, chain = analysis.index.resolve(name) if name else (None, [])
        if weight is not None and weight.tensor is edit.weight.tensor and all(n.op_type == "Identity" for n in chain):
            slots.append(slot)
    return slots[0] if len(slots) == 1 else None


def _apply_exclusions(analysis: Analysis, patterns: list[str], overrides: list[dict] = ()) -> None:
    for edit in analysis.edits:
        if edit.role == "consumer":
            continue
        names = [edit.weight.name, edit.node.name]
        hit = first_match(patterns, names)
        if hit is not None:
            analysis.freeze(edit.ids, f"excluded by pattern {hit!r}")
            continue
        entry = first_match(overrides, names, lambda e: e["match"])
        if entry is not None and entry.get("exclude"):
            analysis.freeze(edit.ids, f"excluded by recipe override {entry['match']!r}")
        elif entry is not None and entry.get("method") == "unstructured":
            analysis.freeze(edit.ids, f"left to unstructured pruning by recipe override {entry['match']!r}")


@dataclass
class ChannelGroup:
    """Producers whose channels are tied, and the removable units (sets of tied channel ids)."""

    id: int
    spaces: list[Space]
    units: list[list[int]]  # each unit: channel ids that go together
    frozen_units: list[tuple[list[int], str]]
    ops: list[str]

    @property
    def channels(self) -> int:
        return len(self.units) + len(self.frozen_units)


def build_groups(analysis: Analysis) -> list[ChannelGroup]:
    """Cluster channel ids into units (union-find roots) and units into producer groups."""
    n = analysis.num_channels
    roots = np.array([analysis.find(i) for i in range(n)], dtype=np.int64)
    members: dict[int, list[int]] = {}
    for i, r in enumerate(roots.tolist()):
        members.setdefault(r, []).append(i)
    space_of = np.empty(n, dtype=np.int64)
    for space in analysis.spaces:
        space_of[space.start:space.start + space.size] = space.id
    # spaces linked through any tied unit form one group
    sp_parent = list(range(len(analysis.spaces)))
    for ids in members.values():
        first = int(space_of[ids[0]])
        for i in ids[1:]:
            first = union(sp_parent, first, int(space_of[i]))
    by_group: dict[int, list[int]] = {}
    for r, ids in members.items():
        by_group.setdefault(find_root(sp_parent, int(space_of[r])), []).append(r)
    groups: list[ChannelGroup] = []
    for gid, unit_roots in sorted(by_group.items()):
        spaces = sorted({int(space_of[i]) for r in unit_roots for i in members[r]})
        units, frozen_units, ops = [], [], set()
        for r in sorted(unit_roots):
            ids = members[r]
            reason = next((analysis.frozen[i] for i in ids if i in analysis.frozen), None)
            for i in ids:
                ops |= analysis.ops_by_id.get(i, set())
            (units.append(ids) if reason is None else frozen_units.append((ids, reason)))
        groups.append(ChannelGroup(len(groups), [analysis.spaces[s] for s in spaces], units, frozen_units, sorted(ops)))
    return groups
