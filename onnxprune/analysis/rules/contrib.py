"""onnxruntime's fused transformer ops (com.microsoft), registered as "com.microsoft::Op"."""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import get_attr
from ..registry import Analysis, Freeze, SetCount, rule
from ._common import _ann, _only_slot, _rank, _set

MS = "com.microsoft::"


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

    a.node_edits.append((node, SetCount("num_heads", head_ids)))
    if get_attr(node, "qkv_hidden_sizes") is not None:
        a.node_edits.append((node, SetCount("qkv_hidden_sizes", head_ids, scale=(dq, dq, dv))))
    _set(a, node, rank - 1, np.repeat(head_ids, dv))

