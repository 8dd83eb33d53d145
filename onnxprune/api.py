"""The Python API: ``prune()`` mirrors the ``onnxprune`` command, ``validate()`` compares two models."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import __version__
from .accuracy import load_eval_data
from .analysis.cost import total_macs
from .analysis.rules.catalog import RULES
from .analysis.weights import find_prunable_weights
from .calibration import ImagePreprocess, StageClock, load_calibration
from .config import PruneConfig, ValidateConfig
from .errors import GateFailedError, InputDataError, InvalidModelError, OnnxPruneError, UnsupportedError, UsageError
from .feeds import (
    batch_axes,
    describe_resolution,
    input_specs,
    prepare_feeds,
    resolve_inputs,
    sample_count,
    split_samples,
)
from .graph import count_params, iter_graphs
from .model import (
    EXTERNAL_DATA_THRESHOLD,
    PROTOBUF_LIMIT,
    LoadedModel,
    check_external_locations,
    check_input_model,
    check_model,
    check_output_path,
    load_model,
    save_model,
    tensor_bytes,
)
from .outputs import OutputGuard
from .passes.manager import PassContext, PassManager, PassResult
from .passes.prepare import CleanupPass, PreparePass
from .passes.structured import StructuredPrunePass, prepare_for_analysis
from .passes.unstructured import MagnitudePrunePass
from .quantize import quantize_file
from .report import caveats
from .sensitivity import (
    DEFAULT_RATIOS,
    allocate_for_target,
    around,
    costliest,
    measure,
    measure_masked,
    prune_groups,
    uniform_macs,
)
from .sessions import ModelSource
from .signals import checkpoint
from .validate import (
    LOW_COSINE,
    ValidationUnavailable,
    check_gates,
    check_providers,
    classifier_outputs,
    describe_nonfinite,
    file_sizes,
    holdout,
    model_files,
    not_validated,
    release_memory,
    run_validation,
)

SCHEMA_VERSION = 1

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """Everything a run did and measured; ``to_dict()`` is the JSON report."""

    input: str | None
    output: str | None
    config: PruneConfig
    passes: list[PassResult] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    gate_failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    quantization: dict[str, Any] | None = None
    allocation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        report = {
            "schema_version": SCHEMA_VERSION,
            "onnxprune_version": __version__,
            "input": self.input,
            "output": self.output,
            "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
            "passes": [p.to_dict() for p in self.passes],
            "summary": self.summary,
            "validation": self.validation,
            "quantization": self.quantization,
            "allocation": self.allocation,
            "gates": {"passed": not self.gate_failures, "failures": self.gate_failures},
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "warnings": self.warnings,
        }
        report["notes"] = caveats(report)
        return report


def build_passes(config: PruneConfig) -> list:
    """The pipeline the options ask for (the CLI and the API share it)."""
    methods = {"structured" if config.structured else "unstructured"}
    methods |= {entry["method"] for entry in config.overrides if "method" in entry}
    passes: list = []
    if "structured" in methods:
        passes += [PreparePass(), StructuredPrunePass(config), CleanupPass()]
    if "unstructured" in methods:
        passes.append(MagnitudePrunePass(config))
    return passes


def _as_loaded(model: str | os.PathLike | onnx.ModelProto | LoadedModel) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return LoadedModel(model=copy, warnings=check_input_model(copy))
    return load_model(model)


def prune(
    model: str | os.PathLike | onnx.ModelProto | LoadedModel,
    output: str | os.PathLike | None = None,
    *,
    config: PruneConfig | None = None,
    validate: bool | ValidateConfig = False,
    force: bool = False,
    external_data: bool | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[..., Any] | None = None,
    quantize: str | None = None,
    outputs: OutputGuard | None = None,
    **options: Any,
) -> tuple[onnx.ModelProto, PruneResult]:
    """Prune ``model`` (path or ModelProto) and return the pruned model and a result.

    Options are :class:`PruneConfig` fields (``sparsity=0.7``, ``pattern="2:4"``,
    ``structured=True``...). With ``output`` the model is written atomically (never over
    the input); with ``validate`` both models are compared in onnxruntime. ``quantize``
    ("dynamic" or "static", needs ``output``) quantizes the pruned model with onnxruntime;
    validation then compares the original with the pruned-and-quantized model. ``outputs`` (the CLI's
    :class:`~onnxprune.outputs.OutputGuard`) also protects the input's external data from the run's other outputs.
    """
    with forward_log(log):
        return _prune(model, output, config=config, validate=validate, force=force, external_data=external_data,
                      progress=progress, quantize=quantize, outputs=outputs, **options)


@contextlib.contextmanager
def forward_log(log: Callable[[str], None] | None) -> Iterator[None]:
    """While the block runs, hand onnxprune's progress lines (``logging``, INFO and up) to ``log`` as well."""
    if log is None:
        yield
        return
    handler = _CallbackHandler(log)
    package = logging.getLogger("onnxprune")
    previous = package.level
    package.addHandler(handler)
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)


class _CallbackHandler(logging.Handler):
    """A logging handler that calls a function with each message."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.callback = log

    def emit(self, record: logging.LogRecord) -> None:
        self.callback(record.getMessage())


def _prune(model, output, *, config: PruneConfig | None, validate: bool | ValidateConfig, force: bool,
           external_data: bool | None, progress: Callable[..., Any] | None, quantize: str | None,
           outputs: OutputGuard | None, **options: Any) -> tuple[onnx.ModelProto, PruneResult]:
    """The body of :func:`prune`."""
    config = (config or PruneConfig(**options)).validate()  # a new config: the caller's object stays as given
    vcfg = validate if isinstance(validate, ValidateConfig) else ValidateConfig(enabled=bool(validate))
    if vcfg.enabled:
        check_providers(vcfg.providers)
    timings: dict[str, float] = {}
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "path", None)
    output_path = Path(output) if output is not None else None
    if output_path is not None:
        check_output_path(output_path, input_path=input_path, force=force)

    start = time.perf_counter()
    logger.info("loading model")
    loaded = _as_loaded(model)
    timings["load"] = time.perf_counter() - start
    checkpoint("load")

    _refuse_quantized(loaded.model, config)
    _refuse_fused_heads(loaded.model, config)
    refuse_non_finite(loaded.model)
    if output_path is not None:
        external_data = _check_data_files(loaded, output_path, external_data, outputs or OutputGuard(force=force))
    calibration = _load_calibration(loaded.model, config) if config.calibration_data else None
    original_src = feeds = original_stats = None
    unavailable: str | None = None  # why the models cannot be compared (no inputs run the original)
    if vcfg.enabled:  # check the validation inputs before any work, so bad --data writes nothing
        if not vcfg.data and calibration:
            calibration, feeds = holdout(calibration, config.calibration_data, batch_axes(input_specs(loaded.model)))
        else:
            try:
                feeds = prepare_feeds(loaded.model, vcfg, path=input_path)
            except InputDataError as exc:
                if vcfg.data or str(exc).startswith("--input-shape"):
                    raise
                unavailable = str(exc)
        if vcfg.eval_data:
            load_eval_data(vcfg.eval_data, input_specs(loaded.model))
        original_stats = _model_stats(loaded.model)
        if input_path is not None:
            original_src = ModelSource(model=None, path=input_path)
        else:  # the passes change the model in place: keep the original as bytes for onnxruntime
            original_src = ModelSource(blob=loaded.model.SerializeToString())

    input_shapes = _input_shapes(loaded.model, vcfg, feeds, input_path)
    if original_stats is not None:  # counted at the shapes the passes analyse, as the pruned MACs are
        original_stats["macs"] = total_macs(loaded.model, input_shapes)
    allocation = None
    start = time.perf_counter()
    if config.target_macs is not None or config.target_params is not None:
        config, allocation = _allocate_for_target(loaded.model, config, calibration, vcfg, feeds, input_shapes)
    elif config.structured and config.sparsity:
        config, allocation = _default_allocation(loaded.model, config, calibration, input_shapes)
    if allocation is not None and allocation["method"] == "sensitivity":  # measured: timed apart from the pass
        release_memory()  # the measurement's copies and sessions, before the pass allocates its own
        timings["allocation"] = time.perf_counter() - start
    start = time.perf_counter()
    ctx = PassContext(model=loaded.model, progress=progress, input_shapes=dict(input_shapes),
                      feeds=feeds[0] if feeds and vcfg.data else None, calibration=calibration or None)
    checkpoint("prune")
    pass_results = [r for r in PassManager(build_passes(config)).run(ctx) if r.reported]
    timings["prune"] = time.perf_counter() - start

    result = PruneResult(
        input=str(input_path) if input_path else None,
        output=str(output_path) if output_path else None,
        config=config,
        passes=pass_results,
        timings=timings,
        allocation=allocation,
        warnings=list(loaded.warnings),
    )
    start = time.perf_counter()
    written: list[Path] = []
    if output_path is not None:
        logger.info("checking and writing %s", output_path)
        written = save_model(loaded.model, output_path, external_data=external_data,
                             verify=lambda path: _full_check(loaded.model, path, input_path, result))
    elif tensor_bytes(loaded.model) < PROTOBUF_LIMIT:
        logger.info("checking the pruned model")
        _full_check(loaded.model, None, input_path, result)
    timings["check_and_save"] = time.perf_counter() - start
    if quantize:
        if output_path is None:
            raise UsageError("{quantize} needs an output file", options=("quantize",))
        logger.info("quantizing (%s)", quantize)
        start = time.perf_counter()
        calibration = []
        if quantize == "static":
            feed = feeds[0] if feeds else prepare_feeds(loaded.model, vcfg)[0]
            batch_one = any(spec.shape and spec.shape[0] == 1 for spec in input_specs(loaded.model))
            calibration = list(feed) if isinstance(feed, list) else (
                split_samples(feed, dict.fromkeys(feed, 0), 1) if batch_one else [feed])
            if not feeds or feeds[1].get("source") == "synthetic":
                result.warnings.append("static quantization calibrated on synthetic inputs; give --data for real ones")
        result.quantization = quantize_file(output_path, quantize, calibration, bool(external_data))
        written = [output_path, *[path for path in written[1:] if path.exists()]]
        loaded.model = onnx.load(str(output_path))
        timings["quantize"] = time.perf_counter() - start

    result.summary = _summary(pass_results)
    structured = next((p.details for p in pass_results if p.name == "structured"), None)
    if structured is not None and config.head_sparsity > 0 and not structured.get("head_groups"):
        result.warnings.append(f"--head-sparsity {config.head_sparsity:g}: no attention heads could be removed "
                               "(the frozen groups in the report say why)")
    if structured is not None and (config.sparsity or 0) > 0 and not structured.get("channels_removed"):
        reasons = sorted({f["reason"] for f in structured.get("frozen", [])})
        result.warnings.append("structured pruning removed nothing" + (
            f": {reasons[0]}" + (f" (and {len(reasons) - 1} more reasons in the frozen groups)" if len(reasons) > 1
                                 else "") if reasons else ": no prunable channel groups"))
    if vcfg.enabled:
        start = time.perf_counter()
        del ctx  # the passes' view of the model: validation may free it
        _validate_step(result, loaded, vcfg, original_src, original_stats, feeds, unavailable, written,
                       owns_model=not isinstance(model, LoadedModel), input_shapes=input_shapes)
        timings["validate"] = time.perf_counter() - start
    return loaded.model, result


def _input_shapes(model: onnx.ModelProto, vcfg: ValidateConfig, feeds, path: Path | None
                  ) -> dict[str, list[int]]:
    """The input shapes the passes analyse at: those of the validation inputs, else the same resolution
    (:func:`resolve_inputs`, which ``inspect`` uses too) without validation."""
    if feeds is not None:
        info = feeds[1]
        if "resolution" in info:
            logger.info("%s", describe_resolution(info["resolution"]))
        return dict(info["shapes"])
    resolution = resolve_inputs(model, vcfg.input_shapes, seed=vcfg.seed, path=path)
    logger.info("%s", describe_resolution(resolution.to_dict()))
    return resolution.shapes


def _load_calibration(model: onnx.ModelProto, config: PruneConfig) -> list:
    """``--calibration-data`` as checked feed batches (images preprocessed as the options say)."""
    logger.info("reading calibration data %s", config.calibration_data)
    pre = ImagePreprocess(tuple(config.image_size) if config.image_size else None, tuple(config.image_mean),
                          tuple(config.image_std), config.image_layout, config.image_channels)
    return load_calibration(config.calibration_data, model, images=pre)


def _validate_step(result: PruneResult, loaded: LoadedModel, vcfg: ValidateConfig, original_src: ModelSource,
                   original_stats: dict[str, int], feeds, unavailable: str | None, written: list[Path],
                   owns_model: bool, input_shapes: dict[str, list[int]]) -> None:
    """Compare the pruned model with the original and fill ``result.validation``, gates and warnings.

    Params and MACs are counted first; then, when the pruned model is on disk and this run owns the in-memory
    copy, that copy is freed so that only onnxruntime's two sessions hold weights (peak memory: docs/benchmarks.md);
    it is read back from the output afterwards. Inputs that do not run the original leave it "not validated".
    """
    input_files = None
    if result.input is not None:
        path = Path(result.input)
        input_files = model_files(path, onnx.load(str(path), load_external_data=False)) \
            if loaded.has_external_data else [path]
    pruned_stats = _model_stats(loaded.model)
    pruned_stats["macs"] = total_macs(loaded.model, input_shapes)
    classifiers, specs = classifier_outputs(loaded.model), input_specs(loaded.model)
    output = Path(result.output) if result.output else None
    free = owns_model and output is not None
    if free:
        loaded.model = None
        release_memory()
    sizes = {"original": file_sizes(input_files, blob=original_src.blob),
             "pruned": file_sizes(written or None, loaded.model)}
    try:
        if unavailable is not None:
            raise ValidationUnavailable(unavailable)
        validation = run_validation(original_src, ModelSource(model=loaded.model, path=output), vcfg,
                                    feeds=feeds, classifiers=classifiers, specs=specs)
    except ValidationUnavailable as exc:
        source = feeds[1].get("source") if feeds else "synthetic"
        hint = "give --data (or --calibration-data), or sizes with --input-shape" if source == "synthetic" else \
            "give inputs the original model accepts with --data"
        validation = not_validated(f"{exc}; {hint}")
        result.warnings.append(f"not validated: {exc}; {hint}")
    if free:
        release_memory()  # what the sessions held, before the output is read back
        loaded.model = onnx.load(str(output))
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


def _as_batches(feed) -> list[dict]:
    """Validation feeds as a list of feed dicts (``--data`` for a one-sample model is already split)."""
    return list(feed) if isinstance(feed, list) else [feed]


def _allocate_for_target(model: onnx.ModelProto, config: PruneConfig, calibration, vcfg: ValidateConfig, feeds,
                         shapes: dict[str, list[int]]) -> tuple[PruneConfig, dict[str, Any]]:
    """Measure each group's sensitivity, pick per-group ratios for the target; a new config carries them as
    overrides (the given one is not changed)."""
    prepare_for_analysis(model)  # what the structured pass analyses, so group ids and heads agree

    samples = list(calibration or [])[:4] or (
        _as_batches(feeds[0]) if feeds else [prepare_feeds(model, replace(vcfg, input_shapes=shapes))[0]])
    labels = None
    if vcfg.eval_data:  # with labels, lost top-1 breaks ties between equally faithful allocations
        inputs, labels = load_eval_data(vcfg.eval_data, input_specs(model))
        samples = [{name: arr[:256] for name, arr in inputs.items()}]
        labels = labels[:256]
    logger.info("measuring each group's sensitivity for the target")
    sens = measure(model, samples, config, ratios=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875), labels=labels,
                   input_shapes=shapes, include_heads=False)
    ratios = allocate_for_target(model, sens, config, target_macs=config.target_macs,
                                 target_params=config.target_params, input_shapes=shapes)
    by_id = {g["id"]: g for g in sens["groups"]}
    planned = replace(config, overrides=_ratio_overrides(ratios, by_id) + list(config.overrides), sparsity=0.0)
    return planned, {"method": "sensitivity", "target_macs": config.target_macs,
                     "target_params": config.target_params,
                     "ratios": [{"producers": by_id[gid]["producers"], "ratio": ratio}
                                for gid, ratio in ratios.items()],
                     "sensitivity": sens}


def _ratio_overrides(ratios: dict[int, float], groups: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-group ratios as recipe overrides matching each group's first named producer (glob characters in
    the name escaped)."""
    overrides = []
    for gid, ratio in ratios.items():
        name = next((n for n in groups[gid]["producers"] if n), None)
        if name is not None:
            overrides.append({"match": glob.escape(name), "sparsity": ratio})
    return overrides


MEASURE_SAMPLES = 4  # calibration samples the default allocation measures fidelity on (taken from the front)
FIT_SAMPLES = 32  # the next ones: the Gram matrices its refit in the loop solves with (--reconstruct)


def _uniform_reason(config: PruneConfig, calibration) -> str | None:
    """Why ``--structured --sparsity`` keeps uniform ratios (None: allocate by measured sensitivity)."""
    if config.uniform:
        return "asked for"
    if not calibration:
        return "no calibration data"
    if config.overrides:
        return "per-layer overrides fix the ratios"
    if config.scope == "global":
        return "global scope ranks channels across groups"
    return None


def _default_allocation(model: onnx.ModelProto, config: PruneConfig, calibration, shapes: dict[str, list[int]],
                        ) -> tuple[PruneConfig, dict[str, Any]]:
    """With calibration data: the MACs the uniform plan removes, spread over the groups by measured sensitivity.

    Each group is measured alone at four ratios around the sparsity (masked weights, one analysis, one onnxruntime
    run per point on at most ``MEASURE_SAMPLES`` calibration samples); the greedy target allocation then reaches
    the uniform plan's MACs. Returns the config to run (a new one) and the report's ``allocation``."""
    reason = _uniform_reason(config, calibration)
    if reason is not None:
        return config, {"method": "uniform", "reason": reason}
    start = time.perf_counter()
    prepare_for_analysis(model)
    target = uniform_macs(model, config, shapes)
    base = total_macs(model, shapes)
    samples = _samples(model, list(calibration), 0, MEASURE_SAMPLES)
    # the refit in the loop learns from other samples than those it is judged on (else few samples overfit)
    fit = _samples(model, list(calibration), MEASURE_SAMPLES, MEASURE_SAMPLES + FIT_SAMPLES) or samples
    logger.info("measuring each group's sensitivity on calibration data")
    clock = StageClock()
    sens, estimate = measure_masked(model, samples, config, around(config.sparsity), input_shapes=shapes,
                                    fit_feeds=fit, clock=clock)
    if not sens["groups"] or base <= 0 or target >= base:
        return config, {"method": "uniform", "reason": "nothing to allocate: no prunable group loses MACs"}
    exact = bool(sens["head_groups"]) and config.head_sparsity > 0  # heads: the estimate does not model them
    ratios = allocate_for_target(model, sens, config, target_macs=target / base, input_shapes=shapes,
                                 macs_left=None if exact else estimate)
    if not exact:  # the estimate, checked once on a really pruned copy; an overshoot is asked back
        planned_macs = total_macs(prune_groups(model, ratios, config, shapes), shapes)
        if planned_macs > target + 0.002 * base:
            ratios = allocate_for_target(model, sens, config, target_macs=(2 * target - planned_macs) / base,
                                         input_shapes=shapes, macs_left=estimate)
    by_id = {g["id"]: g for g in sens["groups"]}
    every = {gid: ratios.get(gid, 0.0) for gid in by_id}  # groups left whole are pinned at 0, not at the sparsity
    planned = replace(config, overrides=_ratio_overrides(every, by_id))
    seconds = time.perf_counter() - start
    axes = batch_axes(input_specs(model))
    return planned, {"method": "sensitivity", "groups_measured": len(sens["groups"]),
                     "evaluations": sens["evaluations"], "samples": sum(sample_count(s, axes) for s in samples),
                     "seconds": round(seconds, 3), "stages": clock.as_dict(), "target_macs": round(target / base, 6), "uniform_macs": int(target),
                     "costliest": costliest(sens, config.sparsity),
                     "ratios": [{"producers": by_id[gid]["producers"], "ratio": ratio} for gid, ratio in every.items()],
                     "sensitivity": sens}


def _samples(model: onnx.ModelProto, batches: list[dict], start: int, stop: int) -> list[dict]:
    """Samples ``start`` to ``stop`` of the calibration batches, cut along each input's sample axis."""
    axes = batch_axes(input_specs(model))
    taken, first = [], 0
    for batch in batches:
        count = sample_count(batch, axes)
        lo, hi = max(start - first, 0), min(stop - first, count)
        first += count
        if hi <= lo:
            continue
        taken.append({name: np.take(arr, np.arange(lo, hi), axis=axes[name])
                      if axes.get(name) is not None and arr.ndim > axes[name] else arr for name, arr in batch.items()})
    return taken


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
                 "QLinearLeakyRelu", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
                 "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def _check_data_files(loaded: LoadedModel, output: Path, external_data: bool | None, guard: OutputGuard) -> bool:
    """Never write over the input or its external data files; ``<output>.data`` follows the output rules.

    Returns whether external data will be written (``None``: when the input has external data or its tensors
    reach the automatic threshold), decided here so the data file is checked before any work.
    """
    if external_data is None:
        external_data = loaded.has_external_data or tensor_bytes(loaded.model) >= EXTERNAL_DATA_THRESHOLD
    guard.protect(loaded.path, "input model")
    for path in loaded.data_files:
        guard.protect(path, "input model's external data")
    data = output.with_name(f"{output.name}.data")
    for path, what in ((output, "output"), (data, "output data file")):
        if (path is output or external_data) and not guard.claims(path):
            guard.claim(path, what)
    return external_data


def refuse_non_finite(model: onnx.ModelProto) -> None:
    """A prunable weight holding NaN or infinity is refused (exit 4): magnitude ranking on it is undefined."""
    for item in find_prunable_weights(model):
        if not np.isfinite(item.weight.array()).all():
            raise InvalidModelError(f"weight {item.name!r} holds NaN or infinite values: pruning by magnitude is "
                                    "undefined on them; fix or re-export the model")


FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                   "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention"}


def _refuse_fused_heads(model: onnx.ModelProto, config: PruneConfig) -> None:
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


def _refuse_quantized(model: onnx.ModelProto, config: PruneConfig) -> None:
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


def _model_stats(model: onnx.ModelProto) -> dict[str, int]:
    params, nonzero = count_params(model)
    return {"params": params, "nonzero_params": nonzero}


def _full_check(model: onnx.ModelProto, path: Path | None, input_path: Path | None, result: PruneResult) -> None:
    """The pruned model must pass the full checker; if the input itself does not, only warn."""
    try:
        check_model(model, path=path, full=True)
    except InvalidModelError as exc:
        try:
            if input_path is not None:
                check_model(None, path=input_path, full=True)
            else:
                raise
        except InvalidModelError:
            result.warnings.append(f"the input model also fails the full ONNX check: {exc}")
            return
        raise InvalidModelError(f"internal error: the pruned model fails the ONNX check ({exc}); nothing written") from None


def _summary(pass_results: list[PassResult]) -> dict[str, Any]:
    summary: dict[str, Any] = {"passes": [p.name for p in pass_results]}
    for p in pass_results:
        d = p.details
        if p.name == "unstructured":
            summary.update({
                "mode": d.get("mode"),
                "prunable_params": d.get("prunable_params"),
                "zeros": d.get("zeros"),
                "achieved_sparsity": d.get("achieved_sparsity"),
                "tensors_pruned": len(d.get("tensors", [])),
                "tensors_skipped": len(d.get("skipped", [])),
            })
        elif p.name == "structured":
            for key in ("channels_total", "channels_removed", "channels_frozen", "params_removed", "macs_removed"):
                summary[key] = d.get(key)
            summary["groups_pruned"] = len(d.get("groups", []))
            summary["groups_frozen"] = len(d.get("frozen", []))
    return summary


def sensitivity(
    model: str | os.PathLike | onnx.ModelProto | LoadedModel,
    *,
    config: PruneConfig | None = None,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    calibration_data: str | os.PathLike | None = None,
    eval_data: str | os.PathLike | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    outputs: OutputGuard | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Prune each channel group of ``model`` alone at each ratio and measure fidelity, MACs and params.

    Inputs: ``eval_data`` (labelled .npz: also top-1), else ``calibration_data`` (first 8 batches), else two
    synthetic batches at the shapes ``prune`` resolves. Options are structured :class:`PruneConfig` fields
    (``criterion="l2"``, ``prune_layernorm=True``); ``outputs`` also protects the input's external data."""
    with forward_log(log):
        base = (config or PruneConfig(**{"structured": True, "sparsity": 0.0, **options})).validate()
        input_path = Path(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "path", None)
        loaded = _as_loaded(model)
        for path in loaded.data_files if outputs is not None else ():
            outputs.protect(path, "input model's external data")
        refuse_non_finite(loaded.model)
        shapes = dict(input_shapes or {})
        labels = None
        if eval_data:
            inputs, labels = load_eval_data(str(eval_data), input_specs(loaded.model))
            feeds = load_calibration([inputs], loaded.model, batch=64)
        elif calibration_data:
            feeds = load_calibration(calibration_data, loaded.model, limit=8)
        else:
            first, info = prepare_feeds(loaded.model, ValidateConfig(input_shapes=shapes), path=input_path)
            shapes = info["shapes"]  # resolved as prune resolves them; the analysis below uses the same
            feeds = [first, prepare_feeds(loaded.model, ValidateConfig(input_shapes=shapes, seed=1))[0]]
        prepare_for_analysis(loaded.model)
        return measure(loaded.model, feeds, base, tuple(ratios), labels, shapes or None)


def validate(
    original: str | os.PathLike | onnx.ModelProto,
    pruned: str | os.PathLike | onnx.ModelProto,
    config: ValidateConfig | None = None,
) -> dict[str, Any]:
    """Compare two models in onnxruntime (fidelity and interleaved latency)."""
    config = config or ValidateConfig()

    def source(item) -> ModelSource:
        if isinstance(item, onnx.ModelProto):
            return ModelSource(model=item)
        model = onnx.load(str(item), load_external_data=False)
        check_external_locations(model, Path(item))  # onnxruntime reads these files: the same containment
        return ModelSource(model=model, path=Path(item))

    return run_validation(source(original), source(pruned), config)
