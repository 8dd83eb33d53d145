"""onnxprune: post-training pruning for ONNX models, validated in onnxruntime.

    >>> import onnxprune
    >>> model, result = onnxprune.prune("model.onnx", "model.pruned.onnx", sparsity=0.7)
    >>> result.to_dict()["summary"]["achieved_sparsity"]

The public names are imported on first use, so that ``python -m onnxprune`` can install its signal
handlers before numpy, onnx and onnxruntime load.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {"PruneResult": "api", "build_passes": "api", "prune": "api", "sensitivity": "api", "validate": "api",
           "PruneConfig": "config", "ValidateConfig": "config", "OnnxPruneError": "errors"}

__all__ = ["OnnxPruneError", "PruneConfig", "PruneResult", "ValidateConfig", "build_passes", "prune", "sensitivity",
           "validate"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .api import PruneResult, build_passes, prune, sensitivity, validate
    from .config import PruneConfig, ValidateConfig
    from .errors import OnnxPruneError


class _Package(types.ModuleType):
    """The package module: a submodule named like a public function (``validate``, ``sensitivity``) does not hide it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable through sys.modules and ``from .validate import ...``
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
