"""Validation: run the original and pruned models in onnxruntime and compare them.

For each execution provider: per-output fidelity (cosine similarity, relative L2 error,
max abs error, top-1 agreement for classifier-like outputs, NaN/Inf counts) and latency of both
models measured in one process in alternating blocks (A B A B, one session alive at a time;
warm-up, then median, p25/p75 and p90 over the runs). The fidelity outputs of a model that computes each
sample on its own are run ``FIDELITY_SAMPLES`` samples at a time (a run's memory for a few samples): the same values,
up to the last bits of matrix products whose kernels block by batch rows; the original and the pruned model are run alike.
"""

from __future__ import annotations

import logging
import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .accuracy import evaluate
from .config import ValidateConfig
from .errors import InputDataError, UnsupportedError
from .feeds import prepare_feeds
from .heap import release_memory
from .model import PROTOBUF_LIMIT, _external_locations
from .specs import InputSpec, batch_axes, input_specs, sample_count, take_samples

logger = logging.getLogger(__name__)
from .sessions import ModelSource, run_outputs, samples_independent


def check_providers(providers: list[str]) -> None:
    """Raise a clear error for a provider this onnxruntime build does not have."""
    available = ort.get_available_providers()
    for name in providers:
        if name not in available:
            raise UnsupportedError(
                f"execution provider {name!r} is not available in this onnxruntime build "
                f"(available: {', '.join(available)})"
            )


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

#: Ops a classifier head ends with; walking back from an output passes through the bias Add, activations that
#: keep the argmax and shape-only ops (see docs/report.md "top-1 agreement").
CLASSIFIER_HEADS = {"Gemm", "MatMul"}
ARGMAX_PRESERVING = {"Add", "Softmax", "LogSoftmax", "Sigmoid", "Identity", "Cast", "Reshape", "Flatten", "Squeeze",
                     "Unsqueeze"}
#: Fewer timed runs than this cannot tell a latency change from noise.
MIN_RUNS_FOR_CHANGE = 5
#: Cosine below this on some output is "very low fidelity" and earns a warning.
LOW_COSINE = 0.5


def classifier_outputs(model: onnx.ModelProto | None) -> set[str] | None:
    """Graph outputs computed by a classifier head (Gemm/MatMul, then bias/softmax/reshapes); None without a graph."""
    if model is None:
        return None
    producers = {out: node for node in model.graph.node for out in node.output}
    constants = {i.name for i in model.graph.initializer}
    found = set()
    for output in model.graph.output:
        node, steps = producers.get(output.name), 0
        while node is not None and (node.op_type in ARGMAX_PRESERVING or node.op_type == "ScatterElements") \
                and steps < 16:  # ScatterElements: the vocabulary pass's kept logits placed among filler columns
            data = [name for name in node.input[:2 if node.op_type == "Add" else 1] if name and name not in constants]
            data = node.input[2:3] if node.op_type == "ScatterElements" else data
            node, steps = (producers.get(data[0]) if data else None), steps + 1
        if node is not None and node.op_type in CLASSIFIER_HEADS:
            found.add(output.name)
    return found


def is_classifier_shape(shape: tuple[int, ...]) -> bool:
    """[N, C] or [N, T, C] with C > 1: the shapes top-1 agreement is defined for."""
    return len(shape) in (2, 3) and shape[-1] > 1


def _nonfinite(arrays: list[np.ndarray]) -> dict[str, int]:
    return {"nan": int(sum(np.count_nonzero(np.isnan(a)) for a in arrays)),
            "inf": int(sum(np.count_nonzero(np.isinf(a)) for a in arrays))}


def compare_outputs(reference: np.ndarray | list[np.ndarray], candidate: np.ndarray | list[np.ndarray],
                    classifier: bool | None = None, filler: bool = False) -> dict[str, Any]:
    """Fidelity of ``candidate`` against ``reference`` for one output (arrays, or one array per input batch).

    Non-finite values are counted per model and leave the metrics out; a one-element output gets its
    absolute error only; top-1 agreement only for classifier-like outputs (``classifier``; None: by shape).
    ``filler``: the output's last axis has columns the pruned model fills with the dtype's lowest value (logits of
    removed tokens); the metrics compare the other columns only, and ``columns`` says how many.
    """
    refs = reference if isinstance(reference, list) else [reference]
    cands = candidate if isinstance(candidate, list) else [candidate]
    result: dict[str, Any] = {"shape": list(refs[0].shape),
                              "same_shape": all(r.shape == c.shape for r, c in zip(refs, cands))}
    if not result["same_shape"]:
        return result
    if filler and np.issubdtype(cands[0].dtype, np.floating) and cands[0].ndim >= 1:
        refs, cands, result["columns"] = _kept_columns(refs, cands)
    if not np.issubdtype(refs[0].dtype, np.floating):
        total = sum(r.size for r in refs)
        result["exact_match"] = float(sum(np.sum(r == c) for r, c in zip(refs, cands)) / total) if total else 1.0
        return result
    result["nonfinite"] = {"original": _nonfinite(refs), "pruned": _nonfinite(cands)}
    if any(result["nonfinite"][side][kind] for side in ("original", "pruned") for kind in ("nan", "inf")):
        return result
    a = np.concatenate([r.astype(np.float64).reshape(-1) for r in refs])
    b = np.concatenate([c.astype(np.float64).reshape(-1) for c in cands])
    result["max_abs"] = float(np.max(np.abs(a - b))) if a.size else 0.0
    if a.size == 1:
        result["values"] = {"original": float(a[0]), "pruned": float(b[0])}
        return result
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    diff = float(np.linalg.norm(a - b))
    if norm_a == 0 and norm_b == 0:
        cosine = 1.0
    elif norm_a == 0 or norm_b == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a, b) / (norm_a * norm_b))
    result["cosine"] = cosine
    result["rel_l2"] = diff / norm_a if norm_a > 0 else (0.0 if diff == 0 else float("inf"))
    if is_classifier_shape(refs[0].shape) and classifier is not False:
        width = refs[0].shape[-1]
        ref_top = np.concatenate([r.reshape(-1, width).argmax(axis=1) for r in refs])
        cand_top = np.concatenate([c.reshape(-1, width).argmax(axis=1) for c in cands])
        result["top1_agreement"] = float(np.mean(ref_top == cand_top))
    return result


def _kept_columns(refs: list[np.ndarray], cands: list[np.ndarray]) -> tuple[list, list, dict[str, int]]:
    """Both sides restricted to the last-axis columns the pruned model computes (not the lowest-value filler)."""
    lowest = np.finfo(cands[0].dtype).min
    kept = np.zeros(cands[0].shape[-1], dtype=bool)
    for c in cands:
        kept |= (c.reshape(-1, c.shape[-1]) > lowest).any(axis=0)
    return [r[..., kept] for r in refs], [c[..., kept] for c in cands], {"compared": int(kept.sum()),
                                                                         "of": int(kept.size)}


def latency_change(original: list[float], pruned: list[float]) -> str:
    """"faster", "slower" or "no measurable change": a change counts when the middle halves (p25-p75) of
    the two models' interleaved timings do not overlap, with at least ``MIN_RUNS_FOR_CHANGE`` runs each."""
    if min(len(original), len(pruned)) < MIN_RUNS_FOR_CHANGE:
        return "no measurable change"
    o25, o75 = np.percentile(original, [25, 75])
    p25, p75 = np.percentile(pruned, [25, 75])
    if p75 < o25:
        return "faster"
    if p25 > o75:
        return "slower"
    return "no measurable change"


#: Latency blocks per model: A B A B, one session alive at a time.
LATENCY_ROUNDS = 2


def _summary(series: list[float]) -> dict[str, Any]:
    arr = np.asarray(series) if series else np.asarray([float("nan")])
    p25, median, p75, p90 = (float(v) for v in np.percentile(arr, [25, 50, 75, 90]))
    return {"median_ms": median, "p25_ms": p25, "p75_ms": p75, "p90_ms": p90, "runs": len(series)}


def _latency(times: tuple[list[float], list[float]]) -> dict[str, Any]:
    """Median, p25/p75 and p90 milliseconds of each model, the speedup of the medians, and what changed."""
    stats = [_summary(series) for series in times]
    speedup = stats[0]["median_ms"] / stats[1]["median_ms"] if stats[1]["median_ms"] > 0 else float("nan")
    return {"original": stats[0], "pruned": stats[1], "speedup": speedup, "change": latency_change(*times)}


def _time_runs(session: ort.InferenceSession, feeds: dict[str, np.ndarray], warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


#: Most samples one fidelity run feeds a session: onnxruntime's memory for a run grows with its batch (ResNet-50 at
#: 224 x 224: ~14 MB a sample), so a larger batch of a model that computes each sample on its own runs in parts.
FIDELITY_SAMPLES = 4


def _measure(sources: tuple[ModelSource, ModelSource], provider: str, cfg: ValidateConfig,
             batches: list[dict[str, np.ndarray]], what: str, timed: dict[str, np.ndarray] | None = None,
             axes: dict[str, int | None] | None = None, samples: tuple[int, int] = (0, 0)):
    """Outputs of both models on every batch and their latency, with one onnxruntime session alive at a time.

    Blocks alternate A B A B (``LATENCY_ROUNDS``), each with a fresh session, its warm-up, then its share of the
    timed runs (on ``timed``, default the first batch); the outputs come from each model's first block
    (:func:`~onnxprune.sessions.run_outputs`: at most ``samples[which]`` samples at a time along ``axes``, the
    inputs' sample axes; default: whole batches). Peak memory holds one session and its run over a few samples, and an idle session's
    threads cannot steal the cores from the timed one.
    """
    timed = batches[0] if timed is None else timed
    outputs: list[list | None] = [None, None]
    names: list[str] = []
    times: tuple[list[float], list[float]] = ([], [])
    rounds = min(LATENCY_ROUNDS, max(cfg.runs, 1))
    for round_ in range(rounds):
        share = cfg.runs // rounds + (1 if round_ < cfg.runs % rounds else 0)
        for which in (0, 1):
            session = sources[which].session(provider, cfg.threads)
            if outputs[which] is None:
                names = names or [out.name for out in session.get_outputs()]
                try:
                    outputs[which] = run_outputs(session, batches, axes or {}, samples[which])
                except Exception as exc:  # sizes or values the model does not accept (e.g. a KV cache's lengths)
                    if which == 1:
                        raise
                    raise ValidationUnavailable(f"the original model does not run on the {what} "
                                                f"({ort_reason(exc)})") from exc
            times[which].extend(_time_runs(session, timed, cfg.warmup, share))
            del session
            release_memory()
    return names, outputs, _latency(times)


def file_sizes(files: list[Path] | None, model: onnx.ModelProto | None = None, blob: bytes | None = None
               ) -> dict[str, int]:
    """On-disk bytes (model + external data files) and deflate-compressed bytes (zip, level 6).

    Without files, the serialized ``blob`` or the in-memory ``model`` is measured (under protobuf's limit). The data
    is compressed 16 MiB at a time and only the compressed lengths are kept (the same length as one call on all of
    it: deflate's output does not depend on how its input is handed over)."""
    if not files:
        if blob is None:
            blob = model.SerializeToString() if model is not None and model.ByteSize() < PROTOBUF_LIMIT else b""
        view = memoryview(blob)
        return {"bytes": len(blob), "zip_bytes": _deflated(view[i:i + CHUNK] for i in range(0, len(view), CHUNK))}
    total = compressed = 0
    for file in files:
        with open(file, "rb") as handle:
            compressed += _deflated(iter(partial(handle.read, CHUNK), b""))
            total += handle.tell()
    return {"bytes": total, "zip_bytes": compressed}


#: bytes read and compressed at a time for the zip size
CHUNK = 16 << 20


def _deflated(chunks) -> int:
    """Length of the deflate (level 6) stream of the concatenated ``chunks``."""
    compressor = zlib.compressobj(6)
    return sum(len(compressor.compress(chunk)) for chunk in chunks) + len(compressor.flush())


def both_file_sizes(original: tuple, pruned: tuple) -> dict[str, dict[str, int]]:
    """:func:`file_sizes` of the original and the pruned model (each an argument tuple) at once, on two threads
    (zlib releases the GIL: the validation's zip sizes take half the wall time on two cores)."""
    with ThreadPoolExecutor(2, thread_name_prefix="onnxprune-zip") as workers:
        first = workers.submit(file_sizes, *original)
        second = file_sizes(*pruned)
        return {"original": first.result(), "pruned": second}


def model_files(path: Path, model: onnx.ModelProto) -> list[Path]:
    """``path`` and the external data files ``model`` (read from ``path`` without its data) references."""
    return [path, *(path.parent / loc for loc in _external_locations(model))]


#: Share of the calibration samples held out for validation when --data is absent (at least one sample).
HOLDOUT_SHARE = 0.25


def holdout(batches: list[dict[str, np.ndarray]], source: Any, axes: dict[str, int | None] | None = None
            ) -> tuple[list[dict[str, np.ndarray]], tuple[list[dict[str, np.ndarray]], dict[str, Any]]]:
    """Split calibration batches: (batches left for calibration, (validation batches, description)).

    The last ``HOLDOUT_SHARE`` of the samples (at least one) validate; calibration keeps the rest. With a single
    sample there is nothing to hold out: it serves both, and the description says so. ``axes`` gives each input's
    sample axis (:func:`~onnxprune.feeds.batch_axes`; default axis 0).
    """
    axes = axes if axes is not None else {name: 0 for name in batches[0]}
    sizes = [sample_count(batch, axes) for batch in batches]
    total = sum(sizes)
    held = max(1, int(total * HOLDOUT_SHARE))
    if total < 2:
        kept, validation = list(batches), list(batches)
    else:
        kept, validation, first = [], [], total - held  # samples [first, total) validate
        start = 0
        for batch, size in zip(batches, sizes):
            cut = min(max(first - start, 0), size)
            if cut:
                kept.append(take_samples(batch, axes, 0, cut))
            if cut < size:
                validation.append(take_samples(batch, axes, cut, size))
            start += size
    info: dict[str, Any] = {
        "source": "calibration hold-out", "calibration_data": os.fspath(source) if source is not None else None,
        "samples": held, "of": total, "held_out": [total - held, total - 1] if total >= 2 else [0, 0],
        "also_calibration": total < 2,
        "shapes": {name: list(arr.shape) for name, arr in validation[0].items()},
    }
    return kept, (validation, info)


class ValidationUnavailable(InputDataError):
    """The original model does not run on the validation inputs: the pruned model is not validated."""


def ort_reason(exc: BaseException, limit: int = 300) -> str:
    """The useful part of an onnxruntime error: the failing node and its status message on one line (the cause
    is at the end, so a long message keeps its tail)."""
    text = str(exc).strip()
    node = re.search(r"while running (\S+) node\. Name:'([^']*)'", text)
    message = text.split("Status Message:", 1)[-1] if "Status Message:" in text else text
    message = " ".join(line.strip() for line in message.splitlines() if line.strip()) or text
    message = re.sub(r"^\S+\.(?:h|cc|cpp|c):\d+\s+", "", message)  # source location
    message = re.sub(r"^[\w:~<>]+\([^)]*\)\s+", "", message)  # C++ function signature
    message = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", message)
    if len(message) > limit:
        message = "..." + message[-limit:]
    return f"{node.group(1)} node {node.group(2)!r}: {message}" if node else message


def _batches(feeds) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    batches, info = feeds
    return (list(batches) if isinstance(batches, list) else [batches]), info


def run_validation(original: ModelSource, pruned: ModelSource, cfg: ValidateConfig,
                   feeds: tuple[Any, dict[str, Any]] | None = None,
                   classifiers: set[str] | None = None, specs: list[InputSpec] | None = None,
                   filler_outputs: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Compare ``pruned`` with ``original`` on every provider of ``cfg``.

    ``feeds``: (one feed dict or a list of them, description). One session is alive at a time (see
    :func:`_measure`); the original runs first, so inputs it does not accept raise :class:`ValidationUnavailable`
    before the pruned model is loaded. ``classifiers``: the outputs that get
    top-1 agreement (default: read from the graph, see :func:`classifier_outputs`); ``specs``: the inputs
    ``--eval-data`` must match (default: read from the graph); ``filler_outputs``: outputs compared on the columns
    the pruned model computes (see :func:`compare_outputs`).
    """
    check_providers(cfg.providers)
    results: dict[str, Any] = {"status": "validated", "providers": {}, "threads": cfg.threads, "warmup": cfg.warmup,
                               "runs": cfg.runs}
    batches, results["inputs"] = _batches(feeds if feeds is not None else prepare_feeds(original.model, cfg))
    if classifiers is None:
        classifiers = classifier_outputs(original.model or pruned.model)
    source = results["inputs"].get("source")
    what = {"synthetic": "synthetic inputs", "calibration hold-out": "calibration hold-out"}.get(source, "given inputs")
    specs = specs if specs is not None else input_specs(original.model or pruned.model)
    timed = _latency_feed(batches, results["inputs"], specs)
    samples = tuple(FIDELITY_SAMPLES if samples_independent(source.structure()) else 0 for source in (original, pruned))
    for provider in cfg.providers:
        logger.info("validating on %s", provider)
        names, (ref, got), latency = _measure((original, pruned), provider, cfg, batches, what, timed,
                                              batch_axes(specs), samples)
        outputs = {name: compare_outputs([r[i] for r in ref], [g[i] for g in got],
                                         None if classifiers is None else name in classifiers,
                                         filler=name in filler_outputs)
                   for i, name in enumerate(names)}
        del ref, got
        latency["shapes"] = {name: list(arr.shape) for name, arr in timed.items()}
        results["providers"][provider] = {"outputs": outputs, "latency": latency}
    results["worst"] = _worst(results["providers"])
    if cfg.eval_data:
        logger.info("measuring accuracy on %s", cfg.eval_data)
        results["accuracy"] = evaluate(original, pruned, cfg.eval_data, specs)
    return results


def _latency_feed(batches: list[dict[str, np.ndarray]], info: dict[str, Any], specs: list[InputSpec]
                  ) -> dict[str, np.ndarray]:
    """The feed latency is timed on: the first sample of a calibration hold-out (its batches hold many samples, and
    ``runs`` timed runs of a whole batch per model would cost more than the fidelity check itself), else the first
    batch as given (``info``: the report's ``inputs``)."""
    if info.get("source") == "calibration hold-out":
        return take_samples(batches[0], batch_axes(specs), 0, 1)
    return batches[0]


def not_validated(reason: str) -> dict[str, Any]:
    """The ``validation`` entry of a run whose models could not be compared."""
    return {"status": "not validated", "reason": reason, "providers": {}, "worst": {}}


def _worst(providers: dict[str, Any]) -> dict[str, Any]:
    cos, rel, top, nonfinite = [], [], [], []
    for provider, entry in providers.items():
        for name, out in entry["outputs"].items():
            if "cosine" in out:
                cos.append(out["cosine"])
                rel.append(out["rel_l2"])
            if "top1_agreement" in out:
                top.append(out["top1_agreement"])
            counts = out.get("nonfinite", {})
            for side in ("original", "pruned"):
                bad = counts.get(side, {})
                if bad.get("nan") or bad.get("inf"):
                    nonfinite.append({"provider": provider, "output": name, "model": side, **bad})
    return {
        "cosine": min(cos) if cos else None,
        "rel_l2": max(rel) if rel else None,
        "top1_agreement": min(top) if top else None,
        "nonfinite": nonfinite,
    }


def describe_nonfinite(entry: dict[str, Any]) -> str:
    """``output 'y' of the pruned model: 8 NaN, 0 Inf``."""
    return f"output {entry['output']!r} of the {entry['model']} model: {entry['nan']} NaN, {entry['inf']} Inf"


def gates_given(cfg: ValidateConfig) -> list[str]:
    """The gate options set in ``cfg``, as the command line spells them."""
    return [option for option, value in (("--min-cosine", cfg.min_cosine), ("--max-rel-l2", cfg.max_rel_l2),
                                         ("--min-top1", cfg.min_top1), ("--max-accuracy-drop", cfg.max_accuracy_drop))
            if value is not None]


def check_gates(validation: dict[str, Any], cfg: ValidateConfig) -> list[str]:
    """Gate violations as readable strings (empty when every gate holds).

    Every gate fails when the models were not compared, or when an output (or the accuracy logits) holds NaN/Inf.
    """
    if validation.get("status") == "not validated":
        return [f"{option}: not validated ({validation.get('reason')})" for option in gates_given(cfg)]
    worst = validation.get("worst", {})
    bad = "; ".join(describe_nonfinite(entry) for entry in worst.get("nonfinite", []))
    accuracy = validation.get("accuracy")
    if accuracy is not None and accuracy.get("nonfinite"):
        bad = "; ".join(filter(None, [bad, f"accuracy logits: {accuracy['nonfinite']} non-finite values"]))
    failures = []
    gates = (("cosine", cfg.min_cosine, "--min-cosine", lambda v, g: v >= g),
             ("rel_l2", cfg.max_rel_l2, "--max-rel-l2", lambda v, g: v <= g),
             ("top1_agreement", cfg.min_top1, "--min-top1", lambda v, g: v >= g))
    if cfg.max_accuracy_drop is not None:
        if accuracy is None:
            failures.append("--max-accuracy-drop needs --eval-data with labels")
        elif bad:
            failures.append(f"--max-accuracy-drop {cfg.max_accuracy_drop}: non-finite outputs ({bad})")
        elif accuracy["top1_drop_points"] > cfg.max_accuracy_drop:
            failures.append(f"--max-accuracy-drop {cfg.max_accuracy_drop}: top-1 dropped "
                            f"{accuracy['top1_drop_points']:.2f} points")
    for key, gate, option, ok in gates:
        if gate is None:
            continue
        value = worst.get(key)
        if bad:
            failures.append(f"{option} {gate}: non-finite outputs ({bad})")
        elif value is None:
            failures.append(f"{option} {gate}: the model has no output to measure {key} on")
        elif not ok(value, gate):
            failures.append(f"{option} {gate}: measured {value:.6g}")
    return failures
