"""What ``prune`` refuses before any work: non-finite weights, quantized graphs, head pruning through fused attention
ops without a rule (each with the error and exit code of :mod:`onnxprune.errors`)."""

from __future__ import annotations

import numpy as np
import onnx

from .analysis.rules.catalog import RULES
from .analysis.weights import find_prunable_weights
from .config import PruneConfig
from .errors import InvalidModelError, UnsupportedError
from .graph import iter_graphs

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
                 "QLinearLeakyRelu", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
                 "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def refuse_non_finite(model: onnx.ModelProto) -> None:
    """A prunable weight holding NaN or infinity is refused (exit 4): magnitude ranking on it is undefined."""
    for item in find_prunable_weights(model):
        if not np.isfinite(item.weight.array()).all():
            raise InvalidModelError(f"weight {item.name!r} holds NaN or infinite values: pruning by magnitude is "
                                    "undefined on them; fix or re-export the model")


FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                   "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention"}


def refuse_fused_heads(model: onnx.ModelProto, config: PruneConfig) -> None:
    """Head pruning through fused attention ops without a rule is refused, naming the op.

    onnxruntime's ``com.microsoft::Attention`` (fused QKV) has a rule; ``MultiHeadAttention``,
    ``GroupQueryAttention``, ONNX ``Attention`` and the packed variants do not.
    """
    if not (config.structured and config.head_sparsity > 0):
        return
    for node in model.graph.node:
        if node.op_type in FUSED_ATTENTION and f"{node.domain}::{node.op_type}" not in RULES:
            domain = node.domain or "ai.onnx"
            raise UnsupportedError(f"{{head_sparsity}}: fused attention op {domain}::{node.op_type} ({node.name!r}) is "
                                   "not supported for head pruning; export the model without attention fusion",
                                   options=("head_sparsity",), value=f"{domain}::{node.op_type}")


def refuse_quantized(model: onnx.ModelProto, config: PruneConfig) -> None:
    """Structured pruning of a quantized graph, or unstructured with no float weight left, is refused."""
    found = sorted({n.op_type for g in iter_graphs(model.graph) for n in g.node if n.op_type in QUANTIZED_OPS})
    if not found:
        return
    hint = "prune the float model, then quantize it (onnxruntime.quantization)"
    if config.structured:
        raise UnsupportedError(f"structured pruning of a quantized model is not supported (found {', '.join(found)}); "
                               f"{hint}")
    if not find_prunable_weights(model):
        raise UnsupportedError(f"no float weights to prune: the layers are quantized ({', '.join(found)}); {hint}")
