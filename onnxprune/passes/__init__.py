"""Pruning passes and the pass manager that runs them."""

from .manager import Pass, PassContext, PassManager, PassResult

__all__ = ["Pass", "PassContext", "PassManager", "PassResult"]
