"""The Python API: ``prune()`` mirrors the ``onnxprune`` command, ``validate()`` compares two models."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import onnx

from . import __version__
from .accuracy import load_eval_data
from .allocation import allocate_to_target, default_allocation
from .analysis.cost import total_macs
from .calibration import ImagePreprocess, load_calibration
from .config import PruneConfig, ValidateConfig
from .depth_allocation import allocate_with_depth
from .errors import InputDataError, InvalidModelError, UsageError, flag
from .feeds import (
    batch_axes,
    describe_resolution,
    input_specs,
    prepare_feeds,
    resolve_inputs,
    split_samples,
)
from .heap import heap_bounded, memory_first
from .model import (
    EXTERNAL_DATA_THRESHOLD,
    PROTOBUF_LIMIT,
    LoadedModel,
    check_external_locations,
    check_input_model,
    check_model,
    check_output_path,
    compacted,
    load_model,
    save_model,
    tensor_bytes,
)
from .outputs import OutputGuard
from .passes.depth import DepthPrunePass
from .passes.manager import PassContext, PassManager, PassResult
from .passes.prepare import CleanupPass, PreparePass
from .passes.reconstruction import ReconstructionPass
from .passes.rotation import HiddenRotationPass
from .passes.structured import StructuredPrunePass, prepare_for_analysis
from .passes.unstructured import MagnitudePrunePass
from .passes.vocabulary import VocabularyPass, read_token_file, vocabulary_warnings
from .quantize import quantize_file
from .refusals import refuse_fused_heads, refuse_non_finite, refuse_quantized
from .report import caveats, removed_by_kind
from .sensitivity import DEFAULT_RATIOS, measure
from .sessions import ModelSource
from .signals import checkpoint
from .validate import check_providers, holdout, release_memory, run_validation
from .validate_step import model_stats, validate_step

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
    low_memory: bool = False  # the run traded time for memory (heap.heap_bounded)

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
            "low_memory": self.low_memory,
            "gates": {"passed": not self.gate_failures, "failures": self.gate_failures},
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "warnings": self.warnings,
        }
        report["notes"] = caveats(report)
        return report


def build_passes(config: PruneConfig) -> list:
    """The pipeline the options ask for (the CLI and the API share it): preparation, depth, vocabulary, width
    (structured, then cleanup), hidden size (rotation), magnitude pruning; each only when its options ask for it."""
    methods = {"structured" if config.structured else "unstructured"}
    methods |= {entry["method"] for entry in config.overrides if "method" in entry}
    weights = config.prunes_weights()
    passes: list = [PreparePass()] if "structured" in methods and weights else []
    if config.depth:
        passes.append(DepthPrunePass(config))
    if config.prunes_vocabulary():  # vocabulary before width: the structured pass sees the smaller tables
        passes.append(VocabularyPass(config))
    if weights and "structured" in methods:
        passes += [StructuredPrunePass(config), *_repair(config), CleanupPass()]
    if config.hidden_sparsity:  # rotation after width: it rotates the matrices the structured pass left
        passes += [HiddenRotationPass(config), CleanupPass()]
    if weights and "unstructured" in methods:
        passes += [MagnitudePrunePass(config), *_repair(config)]
    return passes


def _repair(config: PruneConfig) -> list:
    """The reconstruction pass after a pruning pass, with ``reconstruct`` (it refits what that pass chose)."""
    return [ReconstructionPass()] if config.reconstruct else []


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
    low_memory: bool = False,
    **options: Any,
) -> tuple[onnx.ModelProto, PruneResult]:
    """Prune ``model`` (path or ModelProto) and return the pruned model and a result.

    Options are :class:`PruneConfig` fields (``sparsity=0.7``, ``pattern="2:4"``,
    ``structured=True``...). With ``output`` the model is written atomically (never over
    the input); with ``validate`` both models are compared in onnxruntime. ``quantize``
    ("dynamic" or "static", needs ``output``) quantizes the pruned model with onnxruntime;
    validation then compares the original with the pruned-and-quantized model. ``outputs`` (the CLI's
    :class:`~onnxprune.outputs.OutputGuard`) also protects the input's external data from the run's other outputs.
    ``low_memory`` (``--low-memory``): memory before time for this call, the same model (:func:`~onnxprune.heap.memory_first`;
    glibc's mmap threshold stays fixed for the rest of the process).
    """
    with forward_log(log), memory_first(low_memory):
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
    config = (config or PruneConfig(**options)).checked()  # checked once (the CLI validated it already); never changed
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

    refuse_quantized(loaded.model, config)
    refuse_fused_heads(loaded.model, config)
    refuse_non_finite(loaded.model)
    if output_path is not None:
        external_data = _check_data_files(loaded, output_path, external_data, outputs or OutputGuard(force=force))
    if config.keep_tokens:  # a malformed token file fails before any work (its ids are range-checked by the pass)
        read_token_file(config.keep_tokens)
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
                if vcfg.data or "input_shapes" in exc.options:
                    raise
                unavailable = exc.render(flag)  # report text: the CLI's words
        if vcfg.eval_data:
            load_eval_data(vcfg.eval_data, input_specs(loaded.model))
        original_stats = model_stats(loaded.model)
        if input_path is not None:
            original_src = ModelSource(model=None, path=input_path)
        else:  # the passes change the model in place: keep the original as bytes for onnxruntime
            original_src = ModelSource(blob=loaded.model.SerializeToString())

    input_shapes = _input_shapes(loaded.model, vcfg, feeds, input_path)
    if original_stats is not None:  # counted at the shapes the passes analyse, as the pruned MACs are
        original_stats["macs"] = total_macs(loaded.model, input_shapes)
    allocation = None
    start = time.perf_counter()
    if config.target_macs is not None and config.depth:
        config, allocation = allocate_with_depth(loaded.model, config, calibration, vcfg, feeds, input_shapes,
                                                 stored=loaded.stored)
    elif config.target_macs is not None or config.target_params is not None:
        config, allocation = allocate_to_target(loaded.model, config, calibration, vcfg, feeds, input_shapes)
    elif config.structured and config.sparsity:
        config, allocation = default_allocation(loaded.model, config, calibration, input_shapes, stored=loaded.stored)
    if allocation is not None and allocation["method"] == "sensitivity":  # measured: timed apart from the pass
        release_memory()  # the measurement's copies and sessions, before the pass allocates its own
        timings["allocation"] = time.perf_counter() - start
    start = time.perf_counter()
    owns = not isinstance(model, LoadedModel)  # the run's own model: passes may replace it by a compacted copy
    ctx = PassContext(model=loaded.model, progress=progress, input_shapes=dict(input_shapes),
                      feeds=feeds[0] if feeds and vcfg.data else None, calibration=calibration or None,
                      owns_model=owns)
    if owns:
        loaded.model = None  # held by the context alone while the passes run
    checkpoint("prune")
    try:
        pass_results = [r for r in PassManager(build_passes(config)).run(ctx) if r.reported]
    finally:
        loaded.model = ctx.model
    if config.structured and owns:  # the replaced tensors' old bytes go with the old arena
        loaded.model = ctx.model = compacted(ctx.model)
        release_memory()
    timings["prune"] = time.perf_counter() - start

    result = PruneResult(
        input=str(input_path) if input_path else None,
        output=str(output_path) if output_path else None,
        config=config,
        passes=pass_results,
        timings=timings,
        allocation=allocation,
        warnings=list(loaded.warnings),
        low_memory=heap_bounded(),
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
    vocabulary = next((p.details for p in pass_results if p.name == "vocabulary"), None)
    if vocabulary is not None:
        result.warnings += vocabulary_warnings(vocabulary)
    if vcfg.enabled:
        start = time.perf_counter()
        del ctx  # the passes' view of the model: validation may free it
        validate_step(result, loaded, vcfg, original_src, original_stats, feeds, unavailable, written,
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
        elif p.name == "depth":
            summary["blocks_removed"] = d.get("removed", 0)
    by_kind = removed_by_kind([p.to_dict() for p in pass_results])
    if by_kind:
        summary["removed_by_kind"] = by_kind
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
        base = (config or PruneConfig(**{"structured": True, "sparsity": 0.0, **options})).checked()
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
