"""Rewrite known exporter spellings into the simple ops the channel rules understand.

onnxscript's decomposition of ``scaled_dot_product_attention`` (torch.onnx's dynamo exporter,
Hugging Face's default attention) transposes K's last two axes by merging batch and heads:
``Reshape(k, [-1, S, D]) -> Transpose(0, 2, 1) -> Reshape(back to [B, H, D, S])``. The merge
mixes the head axis with the batch axis, which no channel rule can follow, yet the three nodes
are one ``Transpose(perm=[..., -1, -2])``. Replacing them is exact and keeps the heads visible.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..analysis.groups import complete_shapes
from ..graph import GraphIndex, get_attr


def merge_batched_transposes(model: onnx.ModelProto) -> int:
    """Replace ``Reshape -> Transpose(0, 2, 1) -> Reshape`` that swaps a tensor's last two axes; returns how many."""
    index = GraphIndex.build(model.graph)
    candidates = []
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        if list(get_attr(node, "perm") or []) != [0, 2, 1]:
            continue
        first = index.producer.get(node.input[0])
        after = index.consumers.get(node.output[0], [])
        if first is None or first.op_type != "Reshape" or len(after) != 1:
            continue
        second, slot = after[0]
        if second.op_type != "Reshape" or slot != 0 or len(index.consumers.get(first.output[0], [])) != 1:
            continue
        candidates.append((first, second))
    if not candidates:
        return 0
    shapes = complete_shapes(model)
    merged = 0
    for first, second in candidates:
        x = first.input[0]
        src, mid, out = shapes.get(x), shapes.get(first.output[0]), shapes.get(second.output[0])
        if not src or not mid or not out or None in src or None in mid or None in out or len(src) < 3:
            continue
        lead = int(np.prod(src[:-2], dtype=np.int64))
        if list(mid) != [lead, src[-2], src[-1]] or list(out) != [*src[:-2], src[-1], src[-2]]:
            continue
        rank = len(src)
        second.op_type = "Transpose"
        del second.input[:]
        second.input.append(x)
        del second.attribute[:]
        second.attribute.append(onnx.helper.make_attribute("perm", [*range(rank - 2), rank - 1, rank - 2]))
        merged += 1
    return merged
