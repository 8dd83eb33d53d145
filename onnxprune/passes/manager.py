"""The pass manager: an ordered pipeline of passes over one model.

A pass is a small object with a ``name`` and a ``run(ctx) -> dict`` method; it changes
``ctx.model`` in place and returns a JSON-able summary of what it changed. The manager
times each pass and collects :class:`PassResult` records for the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import onnx


@dataclass
class PassContext:
    """What every pass sees: the model being changed, and a logger for progress lines."""

    model: onnx.ModelProto
    log: Callable[[str], None] = lambda message: None
    progress: Callable[..., Any] | None = None  # progress(iterable, label=..., length=...) -> iterable
    state: dict[str, Any] = field(default_factory=dict)  # shared between passes (e.g. weight stats)

    def iterate(self, items, label: str, length: int | None = None):
        """Wrap ``items`` in the progress display, if one is attached."""
        if self.progress is None:
            return items
        return self.progress(items, label=label, length=length)


class Pass(Protocol):
    """The protocol every pass follows."""

    name: str

    def run(self, ctx: PassContext) -> dict[str, Any]:
        """Change ``ctx.model``; return what changed (JSON-able, with a ``changed`` flag)."""
        ...


@dataclass
class PassResult:
    """One pass's record for the report."""

    name: str
    changed: bool
    seconds: float
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "changed": self.changed, "seconds": round(self.seconds, 4), "details": self.details}


class PassManager:
    """Runs passes in order and records each one's result and wall time."""

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def run(self, ctx: PassContext) -> list[PassResult]:
        results: list[PassResult] = []
        for number, pass_ in enumerate(self.passes, 1):
            ctx.log(f"pass {number}/{len(self.passes)}: {pass_.name}")
            start = time.perf_counter()
            details = pass_.run(ctx) or {}
            elapsed = time.perf_counter() - start
            changed = bool(details.pop("changed", True))
            results.append(PassResult(pass_.name, changed, elapsed, details))
            ctx.log(f"pass {number}/{len(self.passes)}: {pass_.name} done in {elapsed:.2f}s")
        return results
