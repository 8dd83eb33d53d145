"""The pass manager: an ordered pipeline of passes over one model.

A pass is a small object with a ``name`` and a ``run(ctx) -> PassResult`` method; it changes ``ctx.model`` in
place and returns whether it did and a JSON-able summary (``details``). The manager times each pass, names its
result and logs its progress through :mod:`logging`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx

if TYPE_CHECKING:
    from ..compensation import StageClock

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


@dataclass
class ReconstructionRequest:
    """A pruning pass's choice handed to the reconstruction pass: the model before the pass changed it, the layers to
    refit, and the pass's report details (``details["reconstruction"]`` receives the outcome).

    ``kind`` "structured": ``layers`` are (output tensor, kept-output mask) of the layers that lost input channels,
    refit by least squares (``compensation.reconstruct``, its stages timed on ``clock``); "unstructured": the nodes
    whose kept weights are refit row by row under their masks (``compensation.reconstruct_sparse``)."""

    kind: str
    original: onnx.ModelProto
    layers: list
    details: dict[str, Any]
    clock: StageClock | None = None
    original_weights: dict[str, Any] | None = None  # the values of the initializers ``original`` only declares


@dataclass
class PassContext:
    """What every pass sees: the model being changed and the run's inputs, as typed fields."""

    model: onnx.ModelProto
    progress: Callable[..., Any] | None = None  # progress(iterable, label=..., length=...) -> iterable
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # the shapes the passes analyse at
    calibration: list[Feed] | None = None  # --calibration-data as checked feed batches
    feeds: Feed | list[Feed] | None = None  # the validation inputs given with --data
    reconstruction: ReconstructionRequest | None = None  # set by a pruning pass, consumed by ReconstructionPass
    prepared: bool = False  # the preparation pass ran: the structured pass does not prepare the model again
    owns_model: bool = False  # nobody else holds ``model``: a pass may replace it by a compacted copy

    def iterate(self, items, label: str, length: int | None = None):
        """Wrap ``items`` in the progress display, if one is attached."""
        if self.progress is None:
            return items
        return self.progress(items, label=label, length=length)


@dataclass
class PassResult:
    """What one pass did: whether it changed the model, its details for the report, its name and wall time."""

    modified: bool
    details: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    seconds: float = 0.0
    reported: bool = True  # False: bookkeeping passes (preparation, cleanup) that the report does not list

    @property
    def changed(self) -> bool:
        """The report's word for :attr:`modified`."""
        return self.modified

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "changed": self.modified, "seconds": round(self.seconds, 4),
                "details": self.details}


class Pass(Protocol):
    """The protocol every pass follows."""

    name: str

    def run(self, ctx: PassContext) -> PassResult:
        """Change ``ctx.model``; return whether it changed and what (JSON-able details)."""
        ...


class PassManager:
    """Runs passes in order and records each one's result and wall time."""

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def run(self, ctx: PassContext) -> list[PassResult]:
        """Run every pass; the passes the report lists are numbered in the progress lines, the others log at debug."""
        results: list[PassResult] = []
        listed, number = sum(1 for p in self.passes if getattr(p, "reported", True)), 0
        for pass_ in self.passes:
            reported = getattr(pass_, "reported", True)
            number += reported
            level, label = (logging.INFO, f"pass {number}/{listed}: {pass_.name}") if reported \
                else (logging.DEBUG, f"{pass_.name} pass")
            logger.log(level, "%s", label)
            start = time.perf_counter()
            result = pass_.run(ctx)
            result.seconds = time.perf_counter() - start
            result.name, result.reported = pass_.name, reported
            results.append(result)
            logger.log(level, "%s done in %.2fs", label, result.seconds)
        return results
