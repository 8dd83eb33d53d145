"""Preparation and cleanup: the bookkeeping passes around structured pruning."""

from __future__ import annotations

from ..graph import remove_dead_nodes
from ..shapes import refresh_value_info
from .manager import PassContext, PassResult
from .structured import prepare_for_analysis


class PreparePass:
    """Fold static run-time size reads and simplify exporter spellings, so every later analysis sees one graph."""

    name = "preparation"
    reported = False  # bookkeeping: logged, not listed in the report

    def run(self, ctx: PassContext) -> PassResult:
        changes = prepare_for_analysis(ctx.model)
        ctx.prepared = True
        return PassResult(bool(changes), {"rewrites": changes})


class CleanupPass:
    """Drop nodes and initializers nothing reads any more; when it dropped any, re-infer the intermediate shapes.

    The structured pass already leaves its own removals clean, so after it this pass changes nothing; it catches
    what a pass composed before it left dead."""

    name = "cleanup"
    reported = False

    def run(self, ctx: PassContext) -> PassResult:
        removed = remove_dead_nodes(ctx.model)
        if removed:
            refresh_value_info(ctx.model)
        return PassResult(bool(removed), {"removed": removed})
