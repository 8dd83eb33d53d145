"""The validation step of a ``prune`` run: the pruned model compared with the original in onnxruntime, the
gates checked, warnings about what the figures say, and the error a missed gate ends the command with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from .analysis.cost import total_macs
from .config import ValidateConfig
from .errors import GateFailedError, InputDataError, OnnxPruneError
from .feeds import input_specs
from .graph import count_params
from .heap import bound_heap_for_sessions, release_memory
from .model import LoadedModel
from .model_file import read_model
from .sessions import ModelSource
from .validate import (
    LOW_COSINE,
    ValidationUnavailable,
    both_file_sizes,
    check_gates,
    classifier_outputs,
    describe_nonfinite,
    model_files,
    not_validated,
    run_validation,
)

if TYPE_CHECKING:
    from .api import PruneResult


def validate_step(result: PruneResult, loaded: LoadedModel, vcfg: ValidateConfig, original_src: ModelSource,
                   original_stats: dict[str, int], feeds, unavailable: str | None, written: list[Path],
                   owns_model: bool, input_shapes: dict[str, list[int]]) -> None:
    """Compare the pruned model with the original and fill ``result.validation``, gates and warnings.

    Params and MACs are counted first; then, when the pruned model is on disk and this run owns the in-memory
    copy, that copy is freed so that only onnxruntime's session (one at a time) holds weights (peak memory:
    docs/benchmarks.md);
    it is read back from the output afterwards. Inputs that do not run the original leave it "not validated".
    """
    input_files = None
    if result.input is not None:
        path = Path(result.input)
        input_files = model_files(path, onnx.load(str(path), load_external_data=False)) \
            if loaded.has_external_data else [path]
    pruned_stats = model_stats(loaded.model)
    pruned_stats["macs"] = total_macs(loaded.model, input_shapes)
    classifiers, specs = classifier_outputs(loaded.model), input_specs(loaded.model)
    output = Path(result.output) if result.output else None
    free = owns_model and output is not None
    if free:
        loaded.model = None
    bound_heap_for_sessions()  # each session from the heap peaked at 3x its model (onnxprune/heap.py)
    release_memory()
    sizes = both_file_sizes((input_files, None, original_src.blob), (written or None, loaded.model))
    try:
        if unavailable is not None:
            raise ValidationUnavailable(unavailable)
        validation = run_validation(original_src, ModelSource(model=loaded.model, path=output), vcfg,
                                    feeds=feeds, classifiers=classifiers, specs=specs,
                                    filler_outputs=_filler_outputs(result))
    except ValidationUnavailable as exc:
        source = feeds[1].get("source") if feeds else "synthetic"
        hint = "give --data (or --calibration-data), or sizes with --input-shape" if source == "synthetic" else \
            "give inputs the original model accepts with --data"
        validation = not_validated(f"{exc}; {hint}")
        result.warnings.append(f"not validated: {exc}; {hint}")
    if free:
        release_memory()  # what the sessions held, before the output is read back
        loaded.model = read_model(output)  # piece by piece, then its external data (if any)
        onnx.external_data_helper.load_external_data_for_model(loaded.model, str(output.parent))
    validation["size"] = sizes
    validation["model"] = {"original": original_stats, "pruned": pruned_stats}
    result.validation = validation
    result.gate_failures = check_gates(validation, vcfg)
    result.warnings.extend(fidelity_warnings(validation))


def fidelity_warnings(validation: dict[str, Any]) -> list[str]:
    """Warnings about what the fidelity figures say: NaN/Inf in outputs, very low cosine (suggesting real inputs)."""
    warnings = [f"non-finite values in {describe_nonfinite(entry)}"
                for entry in validation.get("worst", {}).get("nonfinite", [])]
    lowest = min(((out["cosine"], name) for entry in validation.get("providers", {}).values()
                  for name, out in entry["outputs"].items() if "cosine" in out), default=None)
    if lowest is not None and lowest[0] < LOW_COSINE:
        source = validation.get("inputs", {}).get("source")
        advice = ("synthetic inputs may be far from real ones: give --data or --calibration-data to measure on "
                  "real inputs" if source == "synthetic" else
                  "the pruned model's outputs differ strongly from the original's on these inputs")
        warnings.append(f"very low fidelity: cosine {lowest[0]:.3g} on output {lowest[1]!r}; {advice}")
    return warnings


def gate_error(result: PruneResult) -> OnnxPruneError | None:
    """The error a missed gate ends the command with: exit 8 when the models could not be compared, else 6."""
    if not result.gate_failures:
        return None
    validation = result.validation or {}
    if validation.get("status") == "not validated":
        written = f"; the pruned model was written to {result.output}" if result.output else ""
        options = ", ".join(failure.split(":")[0] for failure in result.gate_failures)
        return InputDataError(f"not validated: {validation.get('reason')}{written}; the gates ({options}) need "
                              "validation")
    return GateFailedError("validation gates missed: " + "; ".join(result.gate_failures))


def model_stats(model: onnx.ModelProto) -> dict[str, int]:
    params, nonzero = count_params(model)
    return {"params": params, "nonzero_params": nonzero}


def _filler_outputs(result: PruneResult) -> frozenset[str]:
    """Logits outputs whose removed tokens' columns hold the lowest value (vocabulary pruning without
    ``shrink_logits``): validation compares the kept tokens' columns of these."""
    names = set()
    for p in result.passes:
        details = p.details
        if details.get("kind") == "vocabulary" and not details.get("shrink_logits") and not details.get("reason"):
            names |= {head["logits"] for head in details.get("lm_heads", []) if head.get("logits")}
    return frozenset(names)
