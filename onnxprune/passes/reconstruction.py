"""The reconstruction pass: the least-squares repair of what a pruning pass removed, on calibration data.

The pruning pass chooses (channels or weights) and records a :class:`~.manager.ReconstructionRequest` on the
context; this pass refits the layers it names against the model before pruning and writes the outcome into the
pruning pass's report details, so the report's ``passes`` list stays the pruning passes. It runs after the pruning
pass's own removal, including the control-flow subgraphs it pruned, so the refit sees the final pruned graph.
The structured refit holds the original model's large weights once, as the arrays its stream is fed from
(:func:`~onnxprune.refit.detach_weights`: the structured pass keeps no proto copy of the original), and lets each go
once neither stream reads it again. On a model the run owns it detaches the pruned model's large weights too (those
pruning left unchanged are the original's arrays; the refit layers' stay in the proto) and puts them back after the
refit (:func:`~onnxprune.refit.attach_weights`, a new arena: the removal's replaced bytes go with the old one). Under ``--low-memory`` (:func:`~onnxprune.heap.heap_bounded`) its activation streams share a
:class:`~onnxprune.activation_stream.KeptBudget` derived from the data, recompute the feeds that do not fit and run each
feed :data:`STREAM_SAMPLES` samples at a time where that gives the same bits (no matrix products in the run).
"""

from __future__ import annotations

import logging
from typing import Any

import onnx

from ..activation_stream import KeptBudget
from ..compensation import reconstruct, reconstruct_sparse
from ..graph import count_params
from ..heap import heap_bounded, release_memory
from ..refit import attach_weights, detach_weights, refit_weight_names
from .manager import PassContext, PassResult

logger = logging.getLogger(__name__)

#: samples per onnxruntime run of the refit's streams under ``--low-memory`` (a feed holds 16; 2 rather than 4:
#: ResNet-50's refit peak 932 -> 906 MB for ~5 % more CPU)
STREAM_SAMPLES = 2


class ReconstructionPass:
    """Refit the layers a pruning pass asked for (``--reconstruct``); nothing to do when none asked."""

    name = "reconstruction"
    reported = False  # its outcome is part of the pruning pass's details

    def run(self, ctx: PassContext) -> PassResult:
        request, ctx.reconstruction = ctx.reconstruction, None
        if request is None:
            return PassResult(False)
        if request.kind == "structured":
            logger.info(f"reconstructing {len(request.layers)} layers by least squares on calibration data")
            # --low-memory: both models' streams keep at most three quarters of one layer's input over the calibration set
            # and run each feed a few samples at a time (STREAM_SAMPLES) where every sample is computed on its own
            budget, samples = (KeptBudget(), STREAM_SAMPLES) if heap_bounded() else (1 << 30, 0)
            # the original's weights are held once, as the arrays its stream is fed from: its proto goes here
            original, weights = request.original, request.original_weights
            if weights is None:
                original, weights = detach_weights(original)
            request.original = request.original_weights = None
            release_memory()
            pruned, pruned_weights = ctx.model, None
            if ctx.owns_model:  # the pruned model's too, those pruning left unchanged as the original's arrays
                pruned, pruned_weights = detach_weights(ctx.model, refit_weight_names(ctx.model, request.layers),
                                                        weights)
                ctx.model = None  # its proto, and the removal's replaced bytes in its arena, go here
                release_memory()
            try:
                outcome = reconstruct(original, pruned, request.layers, ctx.calibration, budget=budget,
                                      clock=request.clock, original_weights=weights, samples=samples,
                                      pruned_weights=pruned_weights)
            finally:
                del original, weights
                if pruned_weights is not None:
                    release_memory()  # the original's own weights, before the pruned model's bytes are put back
                    pruned = attach_weights(pruned, pruned_weights)
                    del pruned_weights
                ctx.model = pruned
                del pruned
                release_memory()
            request.details["stages"] = request.clock.as_dict()
            _recount_params(request.details, ctx.model)
        else:
            logger.info(f"refitting the kept weights of {len(request.layers)} layers by least squares on calibration "
                        "data")
            outcome = reconstruct_sparse(request.original, ctx.model, request.layers, ctx.calibration)
        request.details["reconstruction"] = outcome
        return PassResult(True, {"kind": request.kind, "layers": len(request.layers)})


def _recount_params(details: dict[str, Any], model: onnx.ModelProto) -> None:
    """The refit may give a layer a bias it lacked: the structured pass's parameter counts are taken again."""
    after = count_params(model)[0]
    details["params_after"] = int(after)
    details["params_removed"] = int(details["params_before"] - after)
