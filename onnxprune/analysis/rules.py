"""The op-rule registry: how channels flow through each op (one small rule per op family).

A rule is called for a node with at least one input carrying channels. It sets the
annotation of the node's outputs (or none: the channels are consumed), records the weight
slices, per-channel constants and attributes that follow the channels, ties channels that
must go together, or raises :class:`Freeze` with the reason the channels must stay.
``RULES`` maps op type -> rule, ``DESCRIPTIONS`` op type -> what the rule does (registry: :mod:`.registry`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import get_attr, opset_version
from .registry import DESCRIPTIONS, RULES, Analysis, Annotation, Freeze, rule  # noqa: F401 - RULES, DESCRIPTIONS: the registry
from .weights import RECURRENT_GATES

# -- helpers ---------------------------------------------------------------------------


def _ann(a: Analysis, node: onnx.NodeProto, slot: int = 0) -> Annotation | None:
    return a.ann.get(node.input[slot]) if len(node.input) > slot and node.input[slot] else None


def _only_slot(a: Analysis, node: onnx.NodeProto, slot: int = 0) -> Annotation:
    for i, name in enumerate(node.input):
        if i != slot and name in a.ann:
            raise Freeze(f"{node.op_type} {node.name!r}: channels reach input {i}, which has no channel rule")
    ann = _ann(a, node, slot)
    if ann is None:
        raise Freeze(f"{node.op_type} {node.name!r}: channels reach an unsupported input")
    return ann


def _rank(a: Analysis, name: str) -> int:
    shape = a.shape(name)
    if shape is None:
        raise Freeze(f"shape of {name!r} is unknown")
    return len(shape)


def _set(a: Analysis, node: onnx.NodeProto, axis: int, ids: np.ndarray, slot: int = 0) -> None:
    a.ann[node.output[slot]] = Annotation(axis, ids)
    a.mark(ids, node.op_type)


def _axes(a: Analysis, node: onnx.NodeProto, input_slot: int, attr: str = "axes") -> list[int] | None:
    """Axes given as an attribute (old opsets) or as a constant input (new opsets)."""
    value = get_attr(node, attr)
    if value is not None:
        return [int(v) for v in value]
    if len(node.input) > input_slot and node.input[input_slot]:
        const = a.constant(node.input[input_slot])
        if const is None:
            raise Freeze(f"{node.op_type} {node.name!r}: axes computed at run time")
        return [int(v) for v in np.atleast_1d(const)]
    return None


def _replace_input(a: Analysis, node: onnx.NodeProto, slot: int, values: np.ndarray, suffix: str) -> None:
    """Point input ``slot`` of ``node`` at a new initializer (shared constants stay intact)."""
    name = f"{node.name or node.output[0]}.{suffix}.pruned"
    existing = next((i for i, init in enumerate(a.model.graph.initializer) if init.name == name), None)
    if existing is not None:  # a shared shape tensor rewritten again (e.g. q, k and v reading one Concat)
        del a.model.graph.initializer[existing]
    a.model.graph.initializer.append(numpy_helper.from_array(values, name))
    a.rewritten[name] = values
    while len(node.input) <= slot:
        node.input.append("")
    node.input[slot] = name


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


# -- producers -------------------------------------------------------------------------


def produce(a: Analysis, node: onnx.NodeProto) -> None:
    """Give the outputs of a Conv/ConvTranspose/Gemm/MatMul with a constant weight new channel ids."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        weight, _ = a.weight(node.input[1])
        if weight is None or len(weight.shape) < 3:
            return
        group = int(get_attr(node, "group", 1))
        size = weight.shape[0] if op == "Conv" else weight.shape[1] * group
        ids = a.new_space(node, size)
        if group != 1:
            a.freeze(ids, f"{op} {node.name!r} is grouped (group={group}): its output channels stay")
            _set(a, node, 1, ids)
            return
        a.add_weight_edit(node.input[1], 0 if op == "Conv" else 1, ids, "producer", node)
        if len(node.input) > 2 and node.input[2]:
            a.add_weight_edit(node.input[2], 0, ids, "param", node)
        _set(a, node, 1, ids)
    elif op == "Gemm":
        weight, _ = a.weight(node.input[1])
        if weight is None or len(weight.shape) != 2:
            return
        axis = 0 if get_attr(node, "transB", 0) else 1
        ids = a.new_space(node, weight.shape[axis])
        a.add_weight_edit(node.input[1], axis, ids, "producer", node)
        if len(node.input) > 2 and node.input[2]:
            bias = a.shape(node.input[2])
            if bias and bias[-1] == len(ids) and len(ids) > 1:
                a.add_weight_edit(node.input[2], len(bias) - 1, ids, "param", node)
        _set(a, node, 1, ids)
    elif op == "MatMul":
        weight, _ = a.weight(node.input[1])
        out = a.shape(node.output[0])
        if weight is None or len(weight.shape) != 2 or out is None or a.weight(node.input[0])[0] is not None:
            return
        ids = a.new_space(node, weight.shape[1])
        a.add_weight_edit(node.input[1], 1, ids, "producer", node)
        _set(a, node, len(out) - 1, ids)


def producer_rule(a: Analysis, node: onnx.NodeProto) -> None:
    """Called for nodes without incoming channels: start new channels at producers."""
    if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        produce(a, node)
    elif node.op_type in RECURRENT_GATES:
        recurrent_produce(a, node)


# -- layers that consume channels ---------------------------------------------------------


def _conv_input(a: Analysis, node: onnx.NodeProto):
    """Channels entering a (transposed) convolution: (annotation, weight, group, input channels)."""
    ann = _only_slot(a, node, 0)
    if ann.axis != 1:
        raise Freeze(f"{node.op_type} {node.name!r}: channels on axis {ann.axis}, not 1")
    weight, _ = a.weight(node.input[1])
    if weight is None:
        raise Freeze(f"{node.op_type} {node.name!r}: weight computed at run time")
    return ann, weight, int(get_attr(node, "group", 1)), len(ann.ids)


@rule("Conv", does="consumes input channels (weight axis 1); grouped/depthwise: a group's channels go together")
def conv_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann, weight, group, cin = _conv_input(a, node)
    if group == 1:
        a.add_weight_edit(node.input[1], 1, ann.ids, "consumer", node)
        a.mark(ann.ids, "Conv")
        produce(a, node)
    elif cin % group == 0 and weight.shape[1] == cin // group and weight.shape[0] % group == 0:
        _grouped_conv(a, node, ann.ids, group, weight.shape[0])
    else:
        raise Freeze(f"Conv {node.name!r}: group={group} does not match its {cin} input channels")


def _grouped_conv(a: Analysis, node: onnx.NodeProto, in_ids: np.ndarray, group: int, cout: int) -> None:
    """Grouped and depthwise convs: a group's input and output channels form one unit; `group` is rewritten."""
    ci, co = len(in_ids) // group, cout // group
    out_ids = a.new_space(node, cout)
    for k in range(group):
        a.tie(np.full(ci + co, in_ids[k * ci]), np.concatenate([in_ids[k * ci:(k + 1) * ci], out_ids[k * co:(k + 1) * co]]))
    a.add_weight_edit(node.input[1], 0, out_ids, "consumer", node)
    if len(node.input) > 2 and node.input[2]:
        a.add_weight_edit(node.input[2], 0, out_ids, "param", node)
    a.node_edits.append((node, lambda keep, n=node, o=out_ids, co=co: _set_attr(n, "group", int(keep[o].sum()) // co)))
    a.mark(in_ids, "Conv")
    _set(a, node, 1, out_ids)


@rule("ConvTranspose", does="consumes input channels (weight axis 0); grouped: a group's input and output channels "
      "go together and `group` is rewritten")
def conv_transpose_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann, weight, group, cin = _conv_input(a, node)
    if group == 1:
        a.add_weight_edit(node.input[1], 0, ann.ids, "consumer", node)
        a.mark(ann.ids, "ConvTranspose")
        produce(a, node)
        return
    if cin % group or weight.shape[0] != cin:
        raise Freeze(f"ConvTranspose {node.name!r}: group={group} does not match its {cin} input channels")
    ci, co = cin // group, weight.shape[1]
    out_ids = a.new_space(node, co * group)
    for k in range(group):
        a.tie(np.full(ci + co, ann.ids[k * ci]),
              np.concatenate([ann.ids[k * ci:(k + 1) * ci], out_ids[k * co:(k + 1) * co]]))
    a.add_weight_edit(node.input[1], 0, ann.ids, "consumer", node)
    if len(node.input) > 2 and node.input[2]:
        a.add_weight_edit(node.input[2], 0, out_ids, "param", node)
    a.node_edits.append((node, lambda keep, n=node, i=ann.ids, ci=ci: _set_attr(n, "group", int(keep[i].sum()) // ci)))
    a.mark(ann.ids, "ConvTranspose")
    _set(a, node, 1, out_ids)


@rule("Gemm", does="consumes input features (B axis by transB); produces new output channels")
def gemm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis != (0 if get_attr(node, "transA", 0) else 1):
        raise Freeze(f"Gemm {node.name!r}: channels are not on the reduction axis of A")
    a.add_weight_edit(node.input[1], 1 if get_attr(node, "transB", 0) else 0, ann.ids, "consumer", node)
    a.mark(ann.ids, "Gemm")
    produce(a, node)


@rule("MatMul", does="consumes the last axis against a 2-D weight (rows); other axes pass through")
def matmul_rule(a: Analysis, node: onnx.NodeProto) -> None:
    weight, _ = a.weight(node.input[1])
    if node.input[1] in a.ann or weight is None:
        _batched_matmul(a, node)
        return
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    if weight is None or len(weight.shape) != 2:
        raise Freeze(f"MatMul {node.name!r}: B is not a 2-D constant weight")
    if ann.axis == rank - 1:
        a.add_weight_edit(node.input[1], 0, ann.ids, "consumer", node)
        a.mark(ann.ids, "MatMul")
        produce(a, node)
    elif ann.axis < rank - 2 or (ann.axis == rank - 2 and rank > 2):
        _set(a, node, ann.axis + _rank(a, node.output[0]) - rank, ann.ids)
    else:
        raise Freeze(f"MatMul {node.name!r}: channels on the row axis of A")


def _batched_matmul(a: Analysis, node: onnx.NodeProto) -> None:
    """MatMul of two activations (attention): channels on a shared batch axis (heads) pass through and tie."""
    out_rank = _rank(a, node.output[0])
    anns = {slot: a.ann[name] for slot, name in enumerate(node.input[:2]) if name in a.ann}
    blocked = {slot for slot, ann in anns.items() if ann.axis >= _rank(a, node.input[slot]) - 2}
    if blocked and len(blocked) == len(anns):
        raise Freeze(f"MatMul {node.name!r}: channels on a matrix axis of input {min(blocked)}")
    for slot in blocked:  # multi-query attention: the one K/V head's channels stay, the query heads go on
        a.freeze(anns.pop(slot).ids, f"MatMul {node.name!r}: channels on a matrix axis of input {slot} (a K/V "
                                     "head shared by every query head stays)")
    axes = set()
    for slot, ann in anns.items():
        rank = _rank(a, node.input[slot])
        axes.add(ann.axis + out_rank - rank)
    if len(axes) != 1:
        raise Freeze(f"MatMul {node.name!r}: inputs carry channels on different axes")
    axis = axes.pop()
    ids = next(iter(anns.values())).ids
    for ann in anns.values():
        if len(ann.ids) != len(ids):
            raise Freeze(f"MatMul {node.name!r}: inputs carry different channel counts")
        a.tie(ids, ann.ids)
    for slot in (0, 1):
        if slot not in anns:
            shape = a.shape(node.input[slot])
            pos = axis - (out_rank - len(shape)) if shape is not None else 0
            if shape is None or (pos >= 0 and shape[pos] not in (1,) and not _repeated_for_heads(
                    a, node, node.input[slot], pos, ids)):
                raise Freeze(f"MatMul {node.name!r} mixes these channels with {node.input[slot]!r}, "
                             "which has no channel ids")
    _set(a, node, axis, ids)


def _repeated_for_heads(a: Analysis, user: onnx.NodeProto, name: str, pos: int, ids: np.ndarray) -> bool:
    """Axis ``pos`` of ``name`` repeats one tensor once per head (multi-query attention's K/V expanded to
    the query heads: Unsqueeze -> Expand -> Reshape, Transposes): the sizes that make the repeat (the
    Expand target's entry, the Reshape's) are rewritten to the heads kept. False when not so spelled."""
    edits: list[tuple[onnx.NodeProto, int]] = []
    tensors: list[tuple[str, int]] = []
    for _ in range(8):
        shape = a.shape(name)
        producer = a.index.producer.get(name)
        if shape is None or producer is None or shape[pos] is None:
            return False
        tensors.append((name, pos))
        if producer.op_type == "Transpose":
            perm = get_attr(producer, "perm") or list(range(len(shape)))[::-1]
            name, pos = producer.input[0], int(perm[pos])
        elif producer.op_type == "Reshape":  # [.., 1, H, ..] -> [.., H, ..]: the same axis without a size-1 one
            src = a.shape(producer.input[0])
            if src is None or len(src) != len(shape) + 1:
                return False
            j = next((j for j in range(len(src) - 1) if src[j] == 1 and src[j + 1] == shape[pos]
                      and list(src[:j]) == list(shape[:pos]) and list(src[j + 2:]) == list(shape[pos + 1:])), None)
            if j is None:
                return False
            edits.append((producer, pos))
            name, pos = producer.input[0], j + 1
        elif producer.op_type == "Expand":
            src = a.shape(producer.input[0])
            p = pos - (len(shape) - len(src or []))
            if src is None or (p >= 0 and src[p] != 1):
                return False
            edits.append((producer, pos))
            break
        else:
            return False
    else:
        return False
    for owner, axis in edits:
        target = a.shape(owner.input[1])
        if not target or target[0] is None:
            return False
        j = axis - (_rank(a, owner.output[0]) - target[0])
        reader, position, value = _shape_entry(a, owner, j)
        if reader is None or value != len(ids):
            return False
        _count_entry(a, owner, reader, position, ids)
    _guard_lineage(a, user, tensors, ids)
    return True


# -- per-channel ops ------------------------------------------------------------------------


@rule("BatchNormalization", does="per-channel scale, bias, mean, var follow the channels")
def batchnorm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis != 1:
        raise Freeze(f"BatchNormalization {node.name!r}: channels not on axis 1")
    for slot in range(1, 5):
        a.add_weight_edit(node.input[slot], 0, ann.ids, "param", node)
    _set(a, node, 1, ann.ids)


@rule("InstanceNormalization", does="per-channel scale and bias follow the channels")
def instancenorm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis != 1:
        raise Freeze(f"InstanceNormalization {node.name!r}: channels not on axis 1")
    for slot in (1, 2):
        a.add_weight_edit(node.input[slot], 0, ann.ids, "param", node)
    _set(a, node, 1, ann.ids)


@rule("GroupNormalization", does="a group's channels go together (whole groups are removed); `num_groups` is "
      "rewritten; per-group (opset 18) or per-channel (opset 21) scale and bias follow")
def groupnorm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    groups, n = int(get_attr(node, "num_groups", 0)), len(ann.ids)
    if ann.axis != 1 or groups <= 0 or n % groups:
        raise Freeze(f"GroupNormalization {node.name!r}: {groups} groups do not divide its {n} channels")
    size = n // groups
    heads = ann.ids[::size]
    for k in range(groups):
        a.tie(np.full(size, heads[k]), ann.ids[k * size:(k + 1) * size])
    for slot in (1, 2):
        shape = a.shape(node.input[slot])
        a.add_weight_edit(node.input[slot], 0, ann.ids if shape and shape[0] == n else heads, "param", node)
    a.node_edits.append((node, lambda keep, n_=node, h=heads: _set_attr(n_, "num_groups", int(keep[h].sum()))))
    _set(a, node, 1, ann.ids)


@rule("LayerNormalization", does="passes when it normalizes axes after the channel axis; over the channel axis frozen "
      "(or, with --prune-layernorm, its scale and bias follow the channels: approximate)")
def layernorm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    axis = int(get_attr(node, "axis", -1)) % rank
    if ann.axis < axis:
        _set(a, node, ann.axis, ann.ids)
        return
    if not a.approximate_layernorm or axis != rank - 1 or ann.axis != rank - 1:
        raise Freeze(f"LayerNormalization {node.name!r} normalizes over the channel axis (mean/variance change)")
    for slot in (1, 2):
        if len(node.input) > slot and node.input[slot]:
            a.add_weight_edit(node.input[slot], 0, ann.ids, "param", node)
    a.approximations.append(node.name)
    _set(a, node, ann.axis, ann.ids)


UNARY = [
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Mish",
    "Softplus", "Softsign", "Erf", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Sin", "Cos", "Floor", "Ceil",
    "Round", "Sign", "ThresholdedRelu", "Shrink", "Swish", "Identity", "Dropout", "Cast", "CastLike", "Not",
    "IsNaN", "IsInf", "Clip", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cosh", "Sinh", "Tan", "BitwiseNot",
]


@rule(*UNARY, does="element-wise or per-channel spatial op: channels pass through")
def passthrough_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0) if node.op_type not in ("Clip", "CastLike", "Dropout") else _ann(a, node, 0)
    if ann is None:
        raise Freeze(f"{node.op_type} {node.name!r}: channels reach a parameter input")
    if node.op_type in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        if ann.axis != 1:
            raise Freeze(f"{node.op_type} {node.name!r}: channels not on axis 1")
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            raise Freeze(f"MaxPool {node.name!r}: pooling indices depend on the channel count")
    _set(a, node, ann.axis, ann.ids)


@rule("PRelu", does="per-channel slope follows the channels")
def prelu_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    _elementwise_constant(a, node, 1, ann.axis, _rank(a, node.output[0]), ann.ids)
    _set(a, node, ann.axis, ann.ids)


def _elementwise_constant(a: Analysis, node: onnx.NodeProto, slot: int, axis: int, rank: int, ids: np.ndarray) -> None:
    """A broadcast operand that is not annotated: slice it if it is per-channel, else it must broadcast."""
    shape = a.shape(node.input[slot])
    if shape is None:
        raise Freeze(f"{node.op_type} {node.name!r}: shape of {node.input[slot]!r} unknown")
    pos = axis - (rank - len(shape))
    if pos < 0 or shape[pos] == 1 or (shape[pos] is None and _at_most_one(a, node.input[slot], pos)):
        return
    if a.weight(node.input[slot])[0] is not None:
        a.add_weight_edit(node.input[slot], pos, ids, "param", node)
        return
    found: list[tuple] = []
    tensors: list[tuple[str, int]] = []
    if not _lineage(a, node.input[slot], pos, node, found, tensors):
        raise Freeze(f"{node.op_type} {node.name!r} mixes these channels with {node.input[slot]!r}, which has no channel "
                     f"ids{_origin(a, node.input[slot])}")
    for name, where, reader in found:
        if name != "shape":
            a.add_weight_edit(name, where, ids, "param", reader)
            continue
        owner, (entry_slot, position, j) = where, reader
        if entry_slot is None:
            _follow_read(a, owner, j, position, ids)
            continue
        _count_entry(a, owner, entry_slot, position, ids)
    _guard_lineage(a, node, tensors, ids)


_LINEAGE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"}
#: element-wise one-input ops (UNARY without the pools, which change other axes)
_ELEMENTWISE = {op for op in UNARY if not op.endswith("Pool")}


def _at_most_one(a: Analysis, name: str, pos: int, depth: int = 0) -> bool:
    """Is axis ``pos`` of ``name`` (size unknown to shape inference) provably of size 1 or 0? A causal mask
    sliced at run time from a ``[1, 1, max, max]`` buffer broadcasts over heads (GPT-Neo)."""
    shape = a.shape(name)
    if shape is None or not 0 <= pos < len(shape) or depth > 32:
        return False
    if shape[pos] is not None:
        return shape[pos] <= 1
    producer = a.index.producer.get(name)
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return False
    op, inputs = producer.op_type, list(producer.input)
    if op == "Slice" or op in _ELEMENTWISE:  # a slice never grows an axis
        return _at_most_one(a, inputs[0], pos, depth + 1)
    if op in _LINEAGE_BINARY or op in ("Equal", "Less", "Greater", "And", "Or"):
        for inp in inputs:
            src = a.shape(inp) if inp else None
            if src is None:
                return False
            p = pos - (len(shape) - len(src))
            if p >= 0 and not _at_most_one(a, inp, p, depth + 1):
                return False
        return True
    if op == "Transpose":
        perm = get_attr(producer, "perm") or list(range(len(shape)))[::-1]
        return _at_most_one(a, inputs[0], int(perm[pos]), depth + 1)
    if op == "Expand":  # the larger of the input's size and the target's entry
        src, target = a.shape(inputs[0]), a.shape(inputs[1])
        if src is None or not target or target[0] is None:
            return False
        p = pos - (len(shape) - len(src))
        if p >= 0 and not _at_most_one(a, inputs[0], p, depth + 1):
            return False
        j = pos - (len(shape) - target[0])
        if j < 0:
            return True
        try:
            reader, _, value = _shape_entry(a, producer, j)
        except Freeze:
            return False
        return reader is not None and 0 <= value <= 1
    return False


def _lineage(a: Analysis, name: str, pos: int, reader: onnx.NodeProto, found: list, tensors: list,
             depth: int = 0) -> bool:
    """Is axis ``pos`` of ``name`` computed from constants only, along that axis? Records the constants to
    slice (weight, axis, reader) in ``found`` and the tensors in between in ``tensors``: a per-head bias
    gathered from a table at run time (T5, Swin), a constant plus a mask that broadcasts over heads."""
    shape = a.shape(name)
    if shape is None or not 0 <= pos < len(shape) or depth > 32 or name in a.ann:
        return False
    if shape[pos] == 1:
        return True
    if a.weight(name)[0] is not None:
        found.append((name, pos, reader))
        return True
    producer = a.index.producer.get(name)
    if producer is None or producer.domain not in ("", "ai.onnx") or shape[pos] is None:
        return False
    tensors.append((name, pos))
    op, inputs = producer.op_type, list(producer.input)

    def follow(slot: int, p: int) -> bool:
        return _lineage(a, inputs[slot], p, producer, found, tensors, depth + 1)

    if op in _ELEMENTWISE:
        return follow(0, pos)
    if op in _LINEAGE_BINARY:
        for slot, inp in enumerate(inputs):
            r = len(a.shape(inp) or []) if inp else 0
            if inp and a.shape(inp) is None:
                return False
            if inp and pos - (len(shape) - r) >= 0 and not follow(slot, pos - (len(shape) - r)):
                return False
        return True
    if op == "Transpose":
        perm = get_attr(producer, "perm") or list(range(len(shape)))[::-1]
        return follow(0, int(perm[pos]))
    if op in ("Unsqueeze", "Squeeze"):
        axes = _axes(a, producer, 1)
        rank_in = len(a.shape(inputs[0]) or [])
        if op == "Unsqueeze":
            axes = sorted(x % len(shape) for x in axes)
            return pos not in axes and follow(0, pos - sum(x < pos for x in axes))
        src = a.shape(inputs[0])
        axes = sorted(x % rank_in for x in axes) if axes is not None else [i for i, d in enumerate(src) if d == 1]
        kept = [i for i in range(rank_in) if i not in axes]
        return follow(0, kept[pos])
    if op == "Gather":
        data, indices = a.shape(inputs[0]), a.shape(inputs[1])
        if data is None or indices is None:
            return False
        g = int(get_attr(producer, "axis", 0)) % len(data)
        if pos < g:
            return follow(0, pos)
        if pos >= g + len(indices):
            return follow(0, pos - len(indices) + 1)
        return False
    if op == "Expand":
        src = a.shape(inputs[0])
        p = pos - (len(shape) - len(src or []))
        if src is not None and p >= 0 and src[p] == shape[pos]:
            return follow(0, p)
        return (src is not None and (p < 0 or src[p] == 1)) and _lineage_shape(a, producer, 1, pos, len(shape), found)
    if op == "ConstantOfShape":
        return _lineage_shape(a, producer, 0, pos, len(shape), found)
    return False


def _lineage_shape(a: Analysis, node: onnx.NodeProto, slot: int, pos: int, rank: int, found: list) -> bool:
    """The channel axis of a lineage is created by a shape input (ConstantOfShape, Expand from size 1): the
    entry that sizes it is rewritten (a constant), or read at run time from a tensor with these channels."""
    target = a.shape(node.input[slot])
    if not target or target[0] is None:
        return False
    try:
        reader, position, _ = _shape_entry(a, node, pos - (rank - target[0]), slot)
    except Freeze:
        return False
    found.append(("shape", node, (reader, position, pos - (rank - target[0]))))
    return True


def _guard_lineage(a: Analysis, user: onnx.NodeProto, tensors: list[tuple[str, int]], ids: np.ndarray) -> None:
    """Slicing a constant along a lineage changes every reader of the tensors in it: each must be another
    link of a lineage or a node that uses it with these channels (checked once the walk is done). Users of
    one lineage tensor (a bias shared by several layers) have their channels tied."""
    if not tensors:
        return
    a.lineage_users.add(id(user))
    for name, pos in tensors:
        a.lineage_nodes.add(id(a.index.producer[name]))
        seen = a.lineage_ids.setdefault(name, (pos, ids))
        if seen[0] != pos or len(seen[1]) != len(ids):
            raise Freeze(f"{user.op_type} {user.name!r}: {name!r} is used with channels on another axis")
        a.tie(seen[1], ids)

    def check(tensors=tensors, ids=ids) -> None:
        outputs = {o.name for o in a.model.graph.output}
        for name, _ in tensors:
            for consumer, _ in a.index.consumers.get(name, []):
                if id(consumer) not in a.lineage_users and id(consumer) not in a.lineage_nodes:
                    a.freeze(ids, f"{user.op_type} {user.name!r}: the per-channel operand {name!r} is also read by "
                                  f"{consumer.op_type} {consumer.name!r}")
                    return
            if name in outputs:
                a.freeze(ids, f"{user.op_type} {user.name!r}: the per-channel operand {name!r} is a graph output")
                return

    a.deferred.append(check)


_ORIGINS = {"Gather": "an embedding lookup", "LayerNormalization": "a normalization over these channels",
            "SimplifiedLayerNormalization": "a normalization over these channels",
            "SkipLayerNormalization": "a normalization over these channels",
            "ReduceMean": "a normalization over these channels (mean/RMS)", "Sqrt": "a normalization (RMS)",
            "Reciprocal": "a normalization (RMS)"}


def _origin(a: Analysis, name: str) -> str:
    """Where a tensor without channel ids comes from, when that explains a frozen stream (norms, embeddings)."""
    for _ in range(24):
        producer = a.index.producer.get(name)
        if producer is None:
            return f" (graph input {name!r})" if name in {i.name for i in a.model.graph.input} else ""
        if producer.op_type in _ORIGINS:
            what = _ORIGINS[producer.op_type]
            return f" (it comes from {what}, {producer.op_type} {producer.name!r}: this stream's width stays)"
        inputs = [i for i in producer.input if i and a.weight(i)[0] is None]
        if not inputs:
            return ""
        name = inputs[0]
    return ""


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Greater", "Less",
      "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "BitShift", "Mod", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
      does="broadcasting element-wise: ties channels of its inputs (residual Add, SE Mul); per-channel constants follow")
def elementwise_rule(a: Analysis, node: onnx.NodeProto) -> None:
    rank = _rank(a, node.output[0])
    annotated = [(slot, a.ann[name]) for slot, name in enumerate(node.input) if name in a.ann]
    axes = {ann.axis + rank - _rank(a, node.input[slot]) for slot, ann in annotated}
    if len(axes) != 1:
        raise Freeze(f"{node.op_type} {node.name!r}: inputs carry channels on different axes")
    axis = axes.pop()
    ids = annotated[0][1].ids
    for _, ann in annotated[1:]:
        if len(ann.ids) != len(ids):
            raise Freeze(f"{node.op_type} {node.name!r}: inputs carry different channel counts")
        a.tie(ids, ann.ids)
    for slot, name in enumerate(node.input):
        if name and name not in a.ann:
            _elementwise_constant(a, node, slot, axis, rank, ids)
    _set(a, node, axis, ids)


@rule("Concat", does="places each input's channels at its offset; other axes tie the inputs")
def concat_rule(a: Analysis, node: onnx.NodeProto) -> None:
    known = [a.shape(n) for n in (node.output[0], *node.input) if a.shape(n) is not None]
    if not known:
        raise Freeze(f"Concat {node.name!r}: ranks unknown")
    rank = len(known[0])
    axis = int(get_attr(node, "axis")) % rank
    annotated = {slot: a.ann[name] for slot, name in enumerate(node.input) if name in a.ann}
    if any(ann.axis != next(iter(annotated.values())).axis for ann in annotated.values()):
        raise Freeze(f"Concat {node.name!r}: inputs carry channels on different axes")
    ch_axis = next(iter(annotated.values())).axis
    if ch_axis == axis:
        parts = []
        for slot, name in enumerate(node.input):
            if slot in annotated:
                parts.append(annotated[slot].ids)
            else:
                shape = a.shape(name)
                if shape is None or shape[axis] is None:
                    raise Freeze(f"Concat {node.name!r}: shape of {name!r} unknown")
                foreign = a.new_space(node, int(shape[axis]))
                a.freeze(foreign, f"Concat {node.name!r}: channels of {name!r} come from no prunable layer")
                parts.append(foreign)
        _set(a, node, axis, np.concatenate(parts))
        return
    ids = next(iter(annotated.values())).ids
    for ann in annotated.values():
        a.tie(ids, ann.ids)
    for slot, name in enumerate(node.input):
        if slot not in annotated:
            _elementwise_constant(a, node, slot, ch_axis, rank, ids)
    _set(a, node, ch_axis, ids)


@rule("Split", does="gives each output its range of channels; split sizes are rewritten")
def split_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    axis = int(get_attr(node, "axis", 0)) % rank
    if axis != ann.axis:
        for slot in range(len(node.output)):
            _set(a, node, ann.axis, ann.ids, slot)
        return
    sizes = get_attr(node, "split")
    from_input = sizes is None and len(node.input) > 1 and node.input[1]
    if from_input:
        sizes = a.constant(node.input[1])
        if sizes is None:
            raise Freeze(f"Split {node.name!r}: sizes computed at run time")
    if sizes is None:
        n = len(node.output)
        sizes = [len(ann.ids) // n + (1 if i < len(ann.ids) % n else 0) for i in range(n)]
        if len(ann.ids) % n:
            raise Freeze(f"Split {node.name!r}: uneven equal split")
    bounds = np.cumsum([0, *[int(s) for s in sizes]])
    parts = [ann.ids[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    for slot, part in enumerate(parts):
        _set(a, node, axis, part, slot)

    def rewrite(keep: np.ndarray, n=node, parts=parts, from_input=from_input) -> None:
        new = np.array([int(keep[p].sum()) for p in parts], dtype=np.int64)
        if from_input:
            _replace_input(a, n, 1, new, "split")
        elif get_attr(n, "split") is not None:
            _set_attr(n, "split", new.tolist())
        elif len(set(new.tolist())) != 1:
            _replace_input(a, n, 1, new, "split") if opset_version(a.model) >= 13 else _set_attr(n, "split", new.tolist())
            for attr in list(n.attribute):
                if attr.name == "num_outputs":
                    n.attribute.remove(attr)

    a.node_edits.append((node, rewrite))


@rule("Slice", does="takes a range of channels (step 1); bounds are rewritten")
def slice_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    if len(node.input) < 3:  # opset < 10: attributes
        starts, ends = get_attr(node, "starts"), get_attr(node, "ends")
        axes, steps = get_attr(node, "axes") or list(range(len(starts))), [1] * len(starts)
    else:
        values = [a.constant(node.input[i]) if len(node.input) > i and node.input[i] else None for i in range(1, 5)]
        if values[0] is None or values[1] is None or (len(node.input) > 3 and node.input[3] and values[2] is None) or (
                len(node.input) > 4 and node.input[4] and values[3] is None):
            raise Freeze(f"Slice {node.name!r}: bounds computed at run time")
        starts, ends = values[0].tolist(), values[1].tolist()
        axes = values[2].tolist() if values[2] is not None else list(range(len(starts)))
        steps = values[3].tolist() if values[3] is not None else [1] * len(starts)
    axes = [int(x) % rank for x in axes]
    if ann.axis not in axes:
        _set(a, node, ann.axis, ann.ids)
        return
    k = axes.index(ann.axis)
    if steps[k] != 1:
        raise Freeze(f"Slice {node.name!r}: step {steps[k]} on the channel axis")
    n = len(ann.ids)
    start, end = int(np.clip(starts[k] + (n if starts[k] < 0 else 0), 0, n)), int(np.clip(ends[k] + (n if ends[k] < 0 else 0), 0, n))
    _set(a, node, ann.axis, ann.ids[start:end])

    def rewrite(keep: np.ndarray, n_=node, k=k, start=start, end=end, ids=ann.ids) -> None:
        new_start = int(keep[ids[:start]].sum())
        new_end = new_start + int(keep[ids[start:end]].sum())
        if len(n_.input) < 3:
            s, e = list(get_attr(n_, "starts")), list(get_attr(n_, "ends"))
            s[k], e[k] = new_start, new_end
            _set_attr(n_, "starts", s)
            _set_attr(n_, "ends", e)
            return
        s, e = a.constant(n_.input[1]).copy(), a.constant(n_.input[2]).copy()
        s[k], e[k] = new_start, new_end
        _replace_input(a, n_, 1, s, "starts")
        _replace_input(a, n_, 2, e, "ends")

    a.node_edits.append((node, rewrite))


@rule("Transpose", does="moves the channel axis")
def transpose_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    perm = list(get_attr(node, "perm") or range(rank)[::-1])
    _set(a, node, perm.index(ann.axis), ann.ids)


@rule("Squeeze", "Unsqueeze", does="shifts the channel axis")
def squeeze_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    out_rank = _rank(a, node.output[0])
    axes = _axes(a, node, 1)
    if node.op_type == "Squeeze":
        in_rank = _rank(a, node.input[0])
        axes = [x % in_rank for x in axes] if axes is not None else [
            i for i, d in enumerate(a.shape(node.input[0])) if d == 1]
        if ann.axis in axes:
            raise Freeze(f"Squeeze {node.name!r} removes the channel axis")
        _set(a, node, ann.axis - sum(1 for x in axes if x < ann.axis), ann.ids)
    else:
        pos = ann.axis
        for x in sorted(v % out_rank for v in axes):
            if x <= pos:
                pos += 1
        _set(a, node, pos, ann.ids)


REDUCE = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]


@rule(*REDUCE, does="passes when reducing other axes; frozen when reducing the channel axis")
def reduce_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    axes = _axes(a, node, 1)
    if not axes and int(get_attr(node, "noop_with_empty_axes", 0)):
        _set(a, node, ann.axis, ann.ids)  # no axes and noop: an identity
        return
    if not axes:
        raise Freeze(f"{node.op_type} {node.name!r} reduces every axis, the channel axis too")
    axes = [x % rank for x in axes]
    if ann.axis in axes:
        raise Freeze(f"{node.op_type} {node.name!r} reduces over the channel axis")
    keep = int(get_attr(node, "keepdims", 1))
    _set(a, node, ann.axis if keep else ann.axis - sum(1 for x in axes if x < ann.axis), ann.ids)


@rule("Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "CumSum",
      does="passes when working along another axis; frozen along the channel axis")
def axis_op_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    default = -1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and opset_version(a.model) >= 13 else (
        1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") else 0)
    if node.op_type == "CumSum":
        const = a.constant(node.input[1])
        if const is None:
            raise Freeze(f"CumSum {node.name!r}: axis computed at run time")
        axis = int(const) % rank
    else:
        axis = int(get_attr(node, "axis", default)) % rank
    if axis == ann.axis or (node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and opset_version(a.model) < 13
                            and ann.axis >= axis):
        raise Freeze(f"{node.op_type} {node.name!r} works along the channel axis")
    out = ann.axis
    if node.op_type in ("ArgMax", "ArgMin") and not int(get_attr(node, "keepdims", 1)) and axis < ann.axis:
        out -= 1
    _set(a, node, out, ann.ids)


@rule("Resize", "Upsample", does="passes when the channel axis is not resized; `sizes` are rewritten")
def resize_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    scales_slot = 2 if node.op_type == "Resize" and len(node.input) > 2 else 1
    if len(node.input) > scales_slot and node.input[scales_slot]:
        scales = a.constant(node.input[scales_slot])
        if scales is None:
            raise Freeze(f"{node.op_type} {node.name!r}: scales computed at run time")
        if scales.size and scales[ann.axis] != 1:
            raise Freeze(f"{node.op_type} {node.name!r} resizes the channel axis")
    if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
        sizes = a.constant(node.input[3])
        if sizes is None:
            raise Freeze(f"Resize {node.name!r}: sizes computed at run time")
        if get_attr(node, "axes") is not None:
            raise Freeze(f"Resize {node.name!r}: sizes with axes")

        def rewrite(keep: np.ndarray, n=node, ids=ann.ids, sizes=sizes, axis=ann.axis) -> None:
            new = sizes.copy()
            new[axis] = int(keep[ids].sum())
            _replace_input(a, n, 3, new, "sizes")

        a.node_edits.append((node, rewrite))
    _set(a, node, ann.axis, ann.ids)


@rule("Pad", does="passes when the channel axis is not padded")
def pad_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    pads = get_attr(node, "pads")
    if pads is None:
        pads = a.constant(node.input[1]) if len(node.input) > 1 else None
        if pads is None:
            raise Freeze(f"Pad {node.name!r}: pads computed at run time")
        pads = pads.tolist()
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        const = a.constant(node.input[3])
        if const is None:
            raise Freeze(f"Pad {node.name!r}: axes computed at run time")
        axes = [int(x) % rank for x in const.tolist()]
    half = len(pads) // 2
    for i, axis in enumerate(axes[:half]):
        if axis == ann.axis and (pads[i] or pads[i + half]):
            raise Freeze(f"Pad {node.name!r} pads the channel axis")
    _set(a, node, ann.axis, ann.ids)


@rule("Flatten", does="turns each channel into a block of features for the next Gemm/MatMul")
def flatten_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    shape = a.shape(node.input[0])
    if shape is None or any(d is None for d in shape[1:]):
        raise Freeze(f"Flatten {node.name!r}: input shape unknown")
    axis = int(get_attr(node, "axis", 1))
    axis = axis + len(shape) if axis < 0 else axis
    if ann.axis < axis:
        raise Freeze(f"Flatten {node.name!r}: channel axis before the flatten axis")
    inner = int(np.prod(shape[ann.axis + 1:], dtype=np.int64))
    outer = int(np.prod(shape[axis:ann.axis], dtype=np.int64))
    _set(a, node, 1, np.tile(np.repeat(ann.ids, inner), outer))


@rule("Reshape", does="keeps the channel axis, or merges it with the axes after it (blocks of features)")
def reshape_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    src, dst = a.shape(node.input[0]), a.shape(node.output[0])
    if src is None or dst is None or any(d is None for d in src[ann.axis:]):
        raise Freeze(f"Reshape {node.name!r}: shapes unknown")
    c, n = ann.axis, len(ann.ids)
    inner = int(np.prod(src[c + 1:], dtype=np.int64))
    if any(d is None for d in dst[c:]):
        dst = _complete_reshape_target(a, node, src, dst, c)
    # sizes of the trailing output axes (leading ones may be unknown, e.g. batch x windows): the output axes
    # from j on hold exactly the channel axis and what follows it when their product is n * inner
    suffix = [None if any(d is None for d in dst[j:]) else int(np.prod(dst[j:], dtype=np.int64))
              for j in range(len(dst) + 1)]
    if n * inner not in suffix[:-1] and _merge_before_channels(a, node, ann, src, dst, suffix):
        return
    if n * inner not in suffix[:-1]:
        raise Freeze(f"Reshape {node.name!r} mixes the channel axis with the axes before it"
                     if None not in suffix else f"Reshape {node.name!r}: shapes unknown")

    def fits(j: int) -> bool:
        return suffix[j] == n * inner and dst[j] % n == 0 and dst[j] > 0 and inner % (dst[j] // n) == 0 and \
            suffix[j + 1] == inner // (dst[j] // n)

    j = next((j for j in range(len(dst)) if fits(j)), None)
    if j is None:
        _split_into_heads(a, node, ann, dst, suffix, inner)
        return
    out_ids = np.repeat(ann.ids, dst[j] // n)
    slot, position, value = _shape_entry(a, node, j)
    if slot is None:
        _follow_read(a, node, j, position, out_ids)
    elif value not in (-1, 0) or (value == 0 and j != c):
        _count_entry(a, node, slot, position, out_ids)
    _set(a, node, j, out_ids)


def _merge_before_channels(a: Analysis, node: onnx.NodeProto, ann: Annotation, src: list, dst: list,
                           suffix: list[int | None]) -> bool:
    """Reshape merging the channel axis with known axes before it (a bidirectional recurrent layer's
    [.., D, .., H] -> [.., D*H]): the ids repeat once per position of those axes. False when not so."""
    c, n = ann.axis, len(ann.ids)
    inner = int(np.prod(src[c + 1:], dtype=np.int64))
    for k in range(c - 1, -1, -1):
        if src[k] is None:
            return False
        outer = int(np.prod(src[k:c], dtype=np.int64))
        for j in range(len(dst)):
            if suffix[j] != outer * n * inner or dst[j] % (outer * n) or inner % (dst[j] // (outer * n)) \
                    or suffix[j + 1] != inner // (dst[j] // (outer * n)):
                continue
            out_ids = np.tile(np.repeat(ann.ids, dst[j] // (outer * n)), outer)
            slot, position, value = _shape_entry(a, node, j)
            if slot is None:
                _follow_read(a, node, j, position, out_ids)
            elif value == 0:
                raise Freeze(f"Reshape {node.name!r}: the merged channel axis copies the input's size")
            elif value != -1:
                _count_entry(a, node, slot, position, out_ids)
            _set(a, node, j, out_ids)
            return True
    return False


def _complete_reshape_target(a: Analysis, node: onnx.NodeProto, src: list, dst: list, c: int) -> list:
    """Output sizes shape inference left unknown, from the target's entries: constants, ``0`` (copy),
    run-time reads of a known size; one ``-1`` after axis ``c`` is resolved when the entries before ``c``
    are the input's own sizes (``x.view(*x.shape[:c], -1)``)."""
    dst = list(dst)
    if len(dst) <= c:
        return dst
    def entry(i: int):
        try:
            return _shape_entry(a, node, i)
        except Freeze:
            return None, None, None
    lead = True
    for i in range(c):
        reader, position, value = entry(i)
        if reader is None and position is not None:
            lead &= position == (node.input[0], i)
        else:
            lead &= value == 0 or (value is not None and value > 0 and value == src[i])
    unknown = []
    for i in range(c, len(dst)):
        if dst[i] is not None:
            continue
        reader, position, value = entry(i)
        if reader is None and position is not None:
            size = (a.shape(position[0]) or [None] * (position[1] + 1))[position[1]]
        elif value is not None and value > 0:
            size = value
        elif value == 0 and i < len(src):
            size = src[i]
        else:
            size = None
        dst[i] = size
        if size is None:
            unknown.append(i)
    if lead and len(unknown) == 1 and None not in src[c:]:
        known = int(np.prod([d for i, d in enumerate(dst[c:], c) if i != unknown[0]], dtype=np.int64))
        total = int(np.prod(src[c:], dtype=np.int64))
        if known and total % known == 0:
            dst[unknown[0]] = total // known
    return dst


def _split_into_heads(a: Analysis, node: onnx.NodeProto, ann: Annotation, dst: list[int], suffix: list[int | None],
                      inner: int) -> None:
    """Reshape [.., H*D, ..] -> [.., H, D, ..] (attention heads): each head's D channels go together."""
    n = len(ann.ids)
    j = next((j for j in range(len(dst) - 1) if suffix[j] == n * inner and dst[j] * dst[j + 1] == n and dst[j] > 1
              and suffix[j + 2] == inner), None)
    if j is None:
        raise Freeze(f"Reshape {node.name!r} splits the channel axis")
    heads, width = dst[j], dst[j + 1]
    for h in range(heads):
        a.tie(np.full(width, ann.ids[h * width]), ann.ids[h * width:(h + 1) * width])
    slot, position, value = _shape_entry(a, node, j)
    if value == 0:
        raise Freeze(f"Reshape {node.name!r}: the head count is copied from the input")
    representatives = ann.ids[::width].copy()
    a.head_ids.update(int(i) for i in representatives)
    if slot is None:
        _follow_read(a, node, j, position, representatives)
    elif value != -1:
        _count_entry(a, node, slot, position, representatives)
    a.mark(ann.ids, "Reshape")
    _set(a, node, j, representatives)


def _shape_entry(a: Analysis, node: onnx.NodeProto, j: int, slot: int = 1
                 ) -> tuple[tuple[onnx.NodeProto, int], int, int]:
    """Where entry ``j`` of the shape tensor read by input ``slot`` lives: ((reader, its input), position, value).

    Follows a run-time shape through the pieces of a ``Concat``, 1-D ``Reshape``/``Cast``/``Identity``,
    and ``Where(Equal(t, c), ..., t)`` (how exporters spell "-1 means keep") down to a constant; through
    ``Slice``/``Gather``/``Unsqueeze``/``Squeeze`` to a ``Shape`` read of another tensor, returned as
    ``(None, (tensor, axis), size)`` (see :func:`_follow_read`).
    """
    reader, name, pos = (node, slot), node.input[slot], j
    for _ in range(16):
        value = a.constant(name)
        if value is not None:
            return reader, pos, int(np.atleast_1d(value).reshape(-1)[pos])
        producer = a.index.producer.get(name)
        op = producer.op_type if producer is not None else None
        if op == "Concat":
            offset = 0
            for piece_slot, piece in enumerate(producer.input):
                shape = a.shape(piece)
                if not shape or shape[0] is None:
                    break
                if offset <= pos < offset + shape[0]:
                    reader, name, pos = (producer, piece_slot), piece, pos - offset
                    break
                offset += shape[0]
            else:
                break
            if reader[0] is not producer:
                break
        elif op in ("Cast", "Identity") or (op == "Reshape" and a.shape(producer.input[0]) == a.shape(name)):
            reader, name = (producer, 0), producer.input[0]
        elif op == "Where" and _where_branch(a, producer, pos) is not None:
            branch = _where_branch(a, producer, pos)
            reader, name = (producer, branch), producer.input[branch]
        elif op == "Shape":
            rank = _rank(a, producer.input[0])
            axis = _clip(int(get_attr(producer, "start", 0)), rank) + pos
            size = (a.shape(producer.input[0]) or [None] * rank)[axis]
            return None, (producer.input[0], axis), size if size is not None else -2
        elif op in ("Unsqueeze", "Squeeze") and a.shape(name) in ([1], []):
            reader, name, pos = (producer, 0), producer.input[0], 0
        elif op == "Slice" and a.shape(producer.input[0]) and a.shape(producer.input[0])[0] is not None \
                and (bounds := _vector_slice(a, producer, a.shape(producer.input[0])[0])):
            reader, name, pos = (producer, 0), producer.input[0], pos + bounds[0]
        elif op == "Gather" and int(get_attr(producer, "axis", 0)) == 0 and a.constant(producer.input[1]) is not None \
                and a.shape(producer.input[0]) and a.shape(producer.input[0])[0]:
            picks = np.atleast_1d(a.constant(producer.input[1])).reshape(-1)
            reader, name, pos = (producer, 0), producer.input[0], int(picks[pos]) % a.shape(producer.input[0])[0]
        else:
            break
    raise Freeze(f"{node.op_type} {node.name!r}: the size of the channel axis is computed at run time")


def _where_branch(a: Analysis, where: onnx.NodeProto, pos: int) -> int | None:
    """The input of a 1-D ``Where`` that entry ``pos`` comes from: by a constant condition, or
    ``Where(Equal(t, c), other, t)`` (exporters' "-1 means keep"), whose entries of ``t`` pass unchanged."""
    cond = a.constant(where.input[0])
    if cond is not None:
        cond = np.broadcast_to(np.atleast_1d(cond), a.shape(where.output[0]) or np.shape(cond)).reshape(-1)
        return 1 if bool(cond[pos]) else 2
    test = a.index.producer.get(where.input[0])
    return 2 if test is not None and test.op_type == "Equal" and where.input[2] in test.input else None


@rule("Expand", "Tile", does="Expand passes when the channel axis is not expanded, its shape is rewritten (also "
      "pieces of run-time targets); Tile copies the ids of a repeated channel axis (the repeat count stays)")
def expand_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank_in, rank_out = _rank(a, node.input[0]), _rank(a, node.output[0])
    axis = ann.axis + rank_out - rank_in
    n = len(ann.ids)
    out = a.shape(node.output[0])
    if node.op_type == "Tile":  # repeats of the channel axis copy the ids (K/V heads tiled for grouped queries)
        value = a.constant(node.input[1])
        if value is None:
            raise Freeze(f"Tile {node.name!r}: repeats computed at run time")
        _set(a, node, ann.axis, np.tile(ann.ids, int(value[ann.axis])))
        return
    if out is None or out[axis] != n:
        raise Freeze(f"{node.op_type} {node.name!r} repeats the channel axis")
    target = a.shape(node.input[1])
    pos = axis - (rank_out - target[0]) if target and target[0] is not None else None
    if pos is None:
        raise Freeze(f"Expand {node.name!r}: shape computed at run time")
    if pos >= 0 and n > 1:
        slot, position, value = _shape_entry(a, node, pos)
        if slot is None:
            _follow_read(a, node, pos, position, ann.ids)
        elif value not in (1, n):
            raise Freeze(f"Expand {node.name!r} expands the channel axis")
        elif value == n:
            _count_entry(a, node, slot, position, ann.ids)
    _set(a, node, axis, ann.ids)


@rule("Shape", does="allowed when only other axes' sizes are read, or when the channel count read goes "
      "(through Slice/Gather/Concat/Unsqueeze/Cast) only into Reshape/Expand shapes whose channels follow it")
def shape_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    start, end = _clip(int(get_attr(node, "start", 0)), rank), _clip(int(get_attr(node, "end", rank)), rank)
    if not start <= ann.axis < end:
        return
    sinks, reader = _size_sinks(a, node.output[0], ann.axis - start)
    if sinks is None:
        raise Freeze(f"the channel count is read at run time (Shape {node.name!r} -> {reader})")
    for sink, position in sinks:
        def check(sink=sink, position=position, ids=ann.ids) -> None:
            if (id(sink), position) not in a.size_reads:
                a.freeze(ids, f"the channel count is read at run time (Shape {node.name!r}) to shape "
                              f"{sink.op_type} {sink.name!r}, whose channels do not follow it")

        a.deferred.append(check)


def _clip(index: int, rank: int) -> int:
    return int(np.clip(index + rank if index < 0 else index, 0, rank))


def _vector_slice(a: Analysis, node: onnx.NodeProto, length: int) -> tuple[int, int] | None:
    """(start, end) of a step-1 ``Slice`` of a 1-D tensor with constant bounds, else None."""
    if len(node.input) < 3:
        starts, ends = get_attr(node, "starts"), get_attr(node, "ends")
        axes, steps = get_attr(node, "axes") or [0], [1]
    else:
        values = [a.constant(node.input[i]) if len(node.input) > i and node.input[i] else None for i in range(1, 5)]
        if values[0] is None or values[1] is None or any(
                len(node.input) > i + 1 and node.input[i + 1] and values[i] is None for i in (2, 3)):
            return None
        starts, ends = values[0].tolist(), values[1].tolist()
        axes = values[2].tolist() if values[2] is not None else [0]
        steps = values[3].tolist() if values[3] is not None else [1]
    if len(starts) != 1 or len(axes) != 1 or list(steps) != [1]:
        return None
    return _clip(int(starts[0]), length), _clip(int(ends[0]), length)


def _size_sinks(a: Analysis, name: str, pos: int) -> tuple[list[tuple[onnx.NodeProto, int]] | None, str]:
    """Follow entry ``pos`` of the shape vector ``name`` forward through shape plumbing (Slice, Gather,
    Concat, Unsqueeze, Squeeze, Cast, Identity): the (Reshape/Expand, entry of its shape input) it ends
    in, or None with the op that computes with it (then the channel count cannot change)."""
    sinks: list[tuple[onnx.NodeProto, int]] = []
    todo, seen = [(name, pos)], set()
    while todo:
        name, pos = todo.pop()
        if (name, pos) in seen:
            continue
        seen.add((name, pos))
        shape = a.shape(name)
        length = int(np.prod(shape, dtype=np.int64)) if shape is not None and None not in shape else None
        for consumer, slot in a.index.consumers.get(name, []):
            op, out = consumer.op_type, consumer.output[0] if consumer.output else ""
            if op in ("Reshape", "Expand") and slot == 1:
                sinks.append((consumer, pos))
            elif op in ("Cast", "Identity") or (op in ("Unsqueeze", "Squeeze") and slot == 0 and length == 1):
                todo.append((out, pos))
            elif op == "Slice" and slot == 0 and length is not None and (bounds := _vector_slice(a, consumer, length)):
                lo, hi = bounds
                if lo <= pos < hi:
                    todo.append((out, pos - lo))
            elif op == "Gather" and slot == 0 and length and a.constant(consumer.input[1]) is not None \
                    and int(get_attr(consumer, "axis", 0)) == 0:
                picks = np.atleast_1d(a.constant(consumer.input[1])).reshape(-1) % length
                todo.extend((out, int(k)) for k in np.flatnonzero(picks == pos))
            elif op == "Concat" and all(a.shape(x) is not None and len(a.shape(x)) == 1 and a.shape(x)[0] is not None
                                        for x in consumer.input):
                offset = sum(a.shape(x)[0] for x in consumer.input[:slot])
                todo.append((out, offset + pos))
            else:
                return None, op
    return sinks, ""


def _count_entry(a: Analysis, node: onnx.NodeProto, slot: tuple[onnx.NodeProto, int], position: int,
                 ids: np.ndarray) -> None:
    """At removal, entry ``position`` of the constant read by ``slot`` (a (node, input) pair, as
    :func:`_shape_entry` finds it) becomes the number of ``ids`` kept."""
    def rewrite(keep: np.ndarray) -> None:
        owner, input_slot = slot
        new = np.array(a.constant(owner.input[input_slot]), copy=True)
        new.reshape(-1)[position] = int(keep[ids].sum())
        _replace_input(a, owner, input_slot, new, f"shape{input_slot}")

    a.node_edits.append((node, rewrite))


def _follow_read(a: Analysis, node: onnx.NodeProto, j: int, read: tuple[str, int], ids: np.ndarray) -> None:
    """Entry ``j`` of ``node``'s shape is the size of axis ``read[1]`` of ``read[0]``, read at run time: fine
    when that axis carries channels that go with ``ids`` (the ones the entry sizes); they are tied."""
    source, axis = read
    src = a.ann.get(source)
    if src is None or src.axis != axis or len(src.ids) != len(ids):
        raise Freeze(f"{node.op_type} {node.name!r}: the size of the channel axis is read at run time from "
                     f"{source!r}, whose channels do not follow")
    a.tie(src.ids, ids)
    a.size_reads.add((id(node), j))


@rule("Einsum", "GatherElements", "ScatterND", "TopK", "NonZero",
      "QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul",
      "Size", "Loop", "If", "Scan", "Attention", "MultiHeadAttention",
      does="frozen: channels that reach it stay (rearranges, indexes, quantizes or hides them)")
def frozen_rule(a: Analysis, node: onnx.NodeProto) -> None:
    raise Freeze(f"{node.op_type} {node.name!r} is not supported for channel removal")


# -- recurrent layers (LSTM, GRU, RNN) ----------------------------------------------------------
# W [D, G*H, I], R [D, G*H, H], B [D, 2*G*H], P [D, 3*H] (LSTM peepholes), initial_h/c [D, N, H];
# Y [S, D, N, H] (layout 1: [N, S, D, H]), Y_h / Y_c [D, N, H] (layout 1: [N, D, H]). Hidden unit j is
# row g*H + j of every gate block g of W, R and both halves of B, column j of R, entry j of the states
# and peepholes. The directions are tied: unit j of the forward and of the backward pass go together,
# so that Y's hidden axis (3) carries one id per position, also after Y's directions are merged with
# the hidden axis into [.., D*H] (the ids repeat once per direction).


def recurrent_produce(a: Analysis, node: onnx.NodeProto) -> None:
    """Give the hidden units of a recurrent layer with constant W/R channel ids (see above)."""
    hidden = int(get_attr(node, "hidden_size", 0) or 0)
    gates = RECURRENT_GATES[node.op_type]
    w, r = a.weight(node.input[1])[0], a.weight(node.input[2])[0]
    if hidden <= 0 or w is None or r is None or len(r.shape) != 3 or r.shape[1:] != (gates * hidden, hidden):
        return
    ids = a.new_space(node, hidden)
    rows = np.tile(ids, gates)
    a.add_weight_edit(node.input[1], 1, rows, "producer", node)
    a.add_weight_edit(node.input[2], 1, rows, "producer", node)
    a.add_weight_edit(node.input[2], 2, ids, "consumer", node)  # the recurrence reads the unit's output
    optional = {3: np.tile(ids, 2 * gates), 7: np.tile(ids, 3)}  # B (Wb and Rb), P (LSTM peepholes)
    for slot, slot_ids in optional.items():
        if len(node.input) > slot and node.input[slot]:
            a.add_weight_edit(node.input[slot], 1, slot_ids, "param", node)
    for slot in (5, 6):  # initial_h, initial_c
        if len(node.input) > slot and node.input[slot]:
            _initial_state(a, node, slot, ids)
    a.node_edits.append((node, lambda keep, n=node, i=ids: _set_attr(n, "hidden_size", int(keep[i].sum()))))
    a.mark(ids, node.op_type)
    for slot, axis in ((0, 3), (1, 2), (2, 2)):
        if len(node.output) > slot and node.output[slot]:
            _set(a, node, axis, ids, slot)


def _initial_state(a: Analysis, node: onnx.NodeProto, slot: int, ids: np.ndarray) -> None:
    """A constant initial state follows the units; zeros made by ConstantOfShape get their size rewritten."""
    name = node.input[slot]
    if a.weight(name)[0] is not None:
        a.add_weight_edit(name, 2, ids, "param", node)
        return
    producer = a.index.producer.get(name)
    if producer is None:
        a.freeze(ids, f"{node.op_type} {node.name!r}: the initial state {name!r} is a graph input "
                      "(its shape is part of the interface)")
        return
    if producer.op_type != "ConstantOfShape":
        a.freeze(ids, f"{node.op_type} {node.name!r}: the initial state {name!r} is computed at run time")
        return
    reader, position, value = _shape_entry(a, producer, 2, slot=0)
    if reader is None or value != len(ids):
        a.freeze(ids, f"{node.op_type} {node.name!r}: the size of the initial state {name!r} is read at run time")
        return
    _count_entry(a, producer, reader, position, ids)


@rule("LSTM", "GRU", "RNN", does="consumes input features (W axis 2); its hidden units are new channels (gate rows "
      "of W/R/B/P, R columns, initial states, `hidden_size`); both directions' unit j go together")
def recurrent_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis != _rank(a, node.input[0]) - 1 or int(get_attr(node, "layout", 0)) not in (0, 1):
        raise Freeze(f"{node.op_type} {node.name!r}: channels are not on the feature axis of X")
    a.add_weight_edit(node.input[1], 2, ann.ids, "consumer", node)
    a.mark(ann.ids, node.op_type)
    recurrent_produce(a, node)


@rule("Gather", does="picks along another axis: channels pass; constant picks along the channel axis: the "
      "picked channels follow (indices rewritten), a single pick keeps its channel")
def gather_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    axis = int(get_attr(node, "axis", 0)) % rank
    indices = a.constant(node.input[1])
    index_rank = len(a.shape(node.input[1]) or []) if indices is None else np.ndim(indices)
    if axis != ann.axis:
        _set(a, node, ann.axis + (index_rank - 1 if axis < ann.axis else 0), ann.ids)
        return
    if indices is None or np.ndim(indices) > 1:
        raise Freeze(f"Gather {node.name!r} picks channels at run time")
    n = len(ann.ids)
    picks = np.atleast_1d(indices).astype(np.int64) % n
    index_type = np.asarray(indices).dtype  # int32 indices stay int32
    if np.ndim(indices) == 0:  # one channel, its axis dropped: that channel stays; its position may move
        picked = ann.ids[picks]
        a.freeze(picked, f"Gather {node.name!r} reads this channel at a fixed position")
        ids = ann.ids
    else:
        ids = ann.ids
        _set(a, node, axis, ann.ids[picks])

    scalar = np.ndim(indices) == 0

    def rewrite(keep: np.ndarray, n_=node, ids=ids, picks=picks, scalar=scalar, index_type=index_type) -> None:
        position = np.cumsum(keep[ids]) - 1
        chosen = [int(position[p]) for p in picks if keep[ids[p]]]
        new = np.array(chosen[0] if scalar else chosen, dtype=index_type)
        _replace_input(a, n_, 1, new, "indices")

    a.node_edits.append((node, rewrite))


@rule("DepthToSpace", does="block-aware: the blocksize^2 input channels that form one output channel go together")
def depth_to_space_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    b2 = int(get_attr(node, "blocksize")) ** 2
    if ann.axis != 1 or len(ann.ids) % b2:
        raise Freeze(f"DepthToSpace {node.name!r}: channels not on axis 1 or not a multiple of blocksize^2")
    mode = get_attr(node, "mode", b"DCR")
    crd = (mode.decode() if isinstance(mode, bytes) else mode) == "CRD"
    blocks = ann.ids.reshape(-1, b2) if crd else ann.ids.reshape(b2, -1).T  # row c': the inputs of output c'
    for row in blocks:
        a.tie(np.full(b2, row[0]), row)
    _set(a, node, 1, blocks[:, 0].copy())


@rule("SpaceToDepth", does="block-aware: each input channel becomes blocksize^2 output channels (at stride C)")
def space_to_depth_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis != 1:
        raise Freeze(f"SpaceToDepth {node.name!r}: channels not on axis 1")
    _set(a, node, 1, np.tile(ann.ids, int(get_attr(node, "blocksize")) ** 2))


@rule("MeanVarianceNormalization", "LpNormalization",
      does="passes when normalizing over other axes; frozen over the channel axis")
def normalize_axes_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    if node.op_type == "LpNormalization":
        axes = [int(get_attr(node, "axis", -1)) % rank]
    else:
        axes = [int(x) % rank for x in (get_attr(node, "axes") or [0, 2, 3])]
    if ann.axis in axes:
        raise Freeze(f"{node.op_type} {node.name!r} normalizes over the channel axis")
    _set(a, node, ann.axis, ann.ids)


# -- onnxruntime's fused transformer ops (com.microsoft) -----------------------------------------
# Registered as "com.microsoft::Op"; the analysis calls them for nodes of that domain.

MS = "com.microsoft::"
#: custom-domain ops that start channels (called without incoming channels, like Conv/MatMul producers)
CUSTOM_PRODUCERS = {MS + "Attention"}


@rule(MS + "BiasGelu", MS + "FastGelu", MS + "BiasSplitGelu", does="element-wise activation with an optional "
      "per-channel bias: channels pass through, the bias follows them")
def ms_bias_activation_rule(a: Analysis, node: onnx.NodeProto) -> None:
    if node.op_type == "BiasSplitGelu":
        raise Freeze(f"BiasSplitGelu {node.name!r} splits the channel axis in halves")
    ann = _only_slot(a, node, 0)
    if ann.axis != _rank(a, node.input[0]) - 1:
        raise Freeze(f"{node.op_type} {node.name!r}: channels not on the last axis")
    if len(node.input) > 1 and node.input[1]:
        a.add_weight_edit(node.input[1], 0, ann.ids, "param", node)
    _set(a, node, ann.axis, ann.ids)


@rule(MS + "Gelu", MS + "QuickGelu", MS + "BiasAdd", does="element-wise: channels pass through")
def ms_elementwise_rule(a: Analysis, node: onnx.NodeProto) -> None:
    if node.op_type == "BiasAdd":
        raise Freeze(f"BiasAdd {node.name!r} adds the residual stream (hidden size stays)")
    ann = _only_slot(a, node, 0)
    _set(a, node, ann.axis, ann.ids)


@rule(MS + "SkipLayerNormalization", MS + "SkipSimplifiedLayerNormalization", MS + "SimplifiedLayerNormalization",
      MS + "EmbedLayerNormalization", does="frozen: normalizes over the hidden size (the residual stream stays)")
def ms_layernorm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    raise Freeze(f"{node.domain}::{node.op_type} {node.name!r} normalizes over the hidden size "
                 "(the residual stream stays)")


@rule(MS + "Attention", does="fused QKV projection + attention: heads are units; weight columns and bias of q, k "
      "and v follow the heads, `num_heads` and `qkv_hidden_sizes` are rewritten")
def ms_attention_rule(a: Analysis, node: onnx.NodeProto) -> None:
    if any(name in a.ann for name in node.input[1:]):
        raise Freeze(f"Attention {node.name!r}: channels reach a weight, mask or past input")
    if (len(node.input) > 4 and node.input[4]) or (len(node.output) > 1 and node.output[1]):
        raise Freeze(f"Attention {node.name!r} keeps a past key/value state (its head count is fixed there)")
    if get_attr(node, "do_rotary", 0):
        raise Freeze(f"Attention {node.name!r} applies rotary embeddings inside the op")
    weight, _ = a.weight(node.input[1])
    rank = _rank(a, node.input[0])
    if weight is None or len(weight.shape) != 2:
        raise Freeze(f"Attention {node.name!r}: the QKV weight is not a 2-D constant")
    ann = _ann(a, node, 0)
    if ann is not None:
        if ann.axis != rank - 1:
            raise Freeze(f"Attention {node.name!r}: channels not on the hidden axis")
        a.add_weight_edit(node.input[1], 0, ann.ids, "consumer", node)
        a.mark(ann.ids, "Attention")
    heads = int(get_attr(node, "num_heads"))
    sizes = [int(s) for s in (get_attr(node, "qkv_hidden_sizes") or [weight.shape[1] // 3] * 3)]
    if sum(sizes) != weight.shape[1] or any(s % heads for s in sizes) or sizes[0] != sizes[1]:
        raise Freeze(f"Attention {node.name!r}: QKV sizes {sizes} do not split into {heads} heads")
    dq, dv = sizes[0] // heads, sizes[2] // heads
    head_ids = a.new_space(node, heads)
    ids = np.concatenate([np.repeat(head_ids, dq), np.repeat(head_ids, dq), np.repeat(head_ids, dv)])
    a.add_weight_edit(node.input[1], 1, ids, "producer", node)
    if len(node.input) > 2 and node.input[2]:
        a.add_weight_edit(node.input[2], 0, ids, "param", node)
    a.head_ids.update(int(i) for i in head_ids)
    a.mark(head_ids, "Attention")

    explicit = get_attr(node, "qkv_hidden_sizes") is not None

    def rewrite(keep: np.ndarray, n=node, h=head_ids, explicit=explicit) -> None:
        kept = int(keep[h].sum())
        _set_attr(n, "num_heads", kept)
        if explicit:
            _set_attr(n, "qkv_hidden_sizes", [kept * dq, kept * dq, kept * dv])

    a.node_edits.append((node, rewrite))
    _set(a, node, rank - 1, np.repeat(head_ids, dv))
