"""Ops whose channels stay: they rearrange, index, quantize or hide them."""

from __future__ import annotations

import onnx

from ..registry import Analysis, Freeze, rule


@rule("Einsum", "GatherElements", "ScatterND", "TopK", "NonZero",
      "QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul",
      "Size", "Loop", "If", "Scan", "Attention", "MultiHeadAttention",
      does="frozen: channels that reach it stay (rearranges, indexes, quantizes or hides them)")
def frozen_rule(a: Analysis, node: onnx.NodeProto) -> None:
    raise Freeze(f"{node.op_type} {node.name!r} is not supported for channel removal")

