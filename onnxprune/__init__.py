"""onnxprune: post-training pruning for ONNX models, validated in onnxruntime.

    >>> import onnxprune
    >>> model, result = onnxprune.prune("model.onnx", "model.pruned.onnx", sparsity=0.7)
    >>> result.to_dict()["summary"]["achieved_sparsity"]
"""

__version__ = "0.1.0"

from .api import PruneResult, build_passes, prune, validate
from .config import PruneConfig, ValidateConfig
from .errors import OnnxPruneError

__all__ = ["OnnxPruneError", "PruneConfig", "PruneResult", "ValidateConfig", "build_passes", "prune", "validate"]
