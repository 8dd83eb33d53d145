"""Validation: run the original and pruned models in onnxruntime and compare them.

For each execution provider: per-output fidelity (cosine similarity, relative L2 error,
max abs error, top-1 agreement for classifier-like outputs) and latency of both models
measured interleaved in one process (warm-up, then median and p90 over the runs).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .config import ValidateConfig
from .errors import InputDataError, UnsupportedError
from .feeds import ORT_TYPES, InputSpec, input_specs, load_data, prepare_feeds, synthesize_inputs  # noqa: F401
from .model import PROTOBUF_LIMIT


@dataclass
class ModelSource:
    """A model for onnxruntime: a file path (preferred, handles external data) or a proto."""

    model: onnx.ModelProto | None = None
    path: Path | None = None

    def session(self, provider: str, threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4  # failures raise, with their message
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.path is not None:
            return ort.InferenceSession(str(self.path), options, providers=[provider])
        return ort.InferenceSession(self.model.SerializeToString(), options, providers=[provider])


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


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Fidelity of ``candidate`` against ``reference`` for one output."""
    result: dict[str, Any] = {"shape": list(reference.shape), "same_shape": reference.shape == candidate.shape}
    if reference.shape != candidate.shape:
        return result
    if not np.issubdtype(reference.dtype, np.floating):
        result["exact_match"] = float(np.mean(reference == candidate)) if reference.size else 1.0
        return result
    a = reference.astype(np.float64).reshape(-1)
    b = candidate.astype(np.float64).reshape(-1)
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
    result["max_abs"] = float(np.max(np.abs(a - b))) if a.size else 0.0
    if reference.ndim >= 2 and 2 <= reference.shape[-1] <= 1_000_000:
        ref_top = reference.reshape(-1, reference.shape[-1]).argmax(axis=1)
        cand_top = candidate.reshape(-1, candidate.shape[-1]).argmax(axis=1)
        result["top1_agreement"] = float(np.mean(ref_top == cand_top))
    return result


def _latency(sessions: tuple[ort.InferenceSession, ort.InferenceSession], feeds, warmup: int, runs: int):
    """Median and p90 milliseconds of each session, runs interleaved A B / B A."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(warmup):
        for session in sessions:
            session.run(None, feeds)
    for round_ in range(runs):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter()
            sessions[which].run(None, feeds)
            times[which].append((time.perf_counter() - start) * 1000.0)
    stats = []
    for series in times:
        arr = np.asarray(series) if series else np.asarray([float("nan")])
        stats.append({"median_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90)), "runs": len(series)})
    speedup = stats[0]["median_ms"] / stats[1]["median_ms"] if stats[1]["median_ms"] > 0 else float("nan")
    return {"original": stats[0], "pruned": stats[1], "speedup": speedup}


def file_sizes(path: Path | None, model: onnx.ModelProto | None) -> dict[str, int]:
    """On-disk bytes (model + external data) and deflate-compressed bytes (zip, level 6)."""
    files: list[Path] = [path, *_data_files(path)] if path is not None else []
    if not files:
        blob = model.SerializeToString() if model is not None and model.ByteSize() < PROTOBUF_LIMIT else b""
        return {"bytes": len(blob), "zip_bytes": len(zlib.compress(blob, 6))}
    total = compressed = 0
    for file in files:
        compressor = zlib.compressobj(6)
        with open(file, "rb") as handle:
            while chunk := handle.read(16 << 20):
                total += len(chunk)
                compressed += len(compressor.compress(chunk))
        compressed += len(compressor.flush())
    return {"bytes": total, "zip_bytes": compressed}


def _data_files(path: Path) -> list[Path]:
    model = onnx.load(str(path), load_external_data=False)
    from .model import _external_locations

    return [path.parent / loc for loc in _external_locations(model)]


def run_validation(original: ModelSource, pruned: ModelSource, cfg: ValidateConfig,
                   log: Callable[[str], None] = lambda m: None,
                   feeds: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Compare ``pruned`` with ``original`` on every provider of ``cfg``."""
    check_providers(cfg.providers)
    results: dict[str, Any] = {"providers": {}, "threads": cfg.threads, "warmup": cfg.warmup, "runs": cfg.runs}
    feeds, results["inputs"] = feeds if feeds is not None else prepare_feeds(original.model, cfg)
    for provider in cfg.providers:
        log(f"validating on {provider}")
        sessions = (original.session(provider, cfg.threads), pruned.session(provider, cfg.threads))
        names = [out.name for out in sessions[0].get_outputs()]
        try:
            ref = sessions[0].run(None, feeds)
        except Exception as exc:  # sizes the model does not accept (e.g. a KV cache's lengths)
            what = "synthetic" if results["inputs"].get("source") == "synthetic" else "given"
            raise InputDataError(f"the original model does not run on the {what} inputs "
                                 f"({str(exc).strip().splitlines()[0][:240]}); give inputs it accepts with --data "
                                 "or sizes with --input-shape") from exc
        got = sessions[1].run(None, feeds)
        outputs = {name: compare_outputs(r, g) for name, r, g in zip(names, ref, got)}
        latency = _latency(sessions, feeds, cfg.warmup, cfg.runs)
        results["providers"][provider] = {"outputs": outputs, "latency": latency}
        del sessions
    results["worst"] = _worst(results["providers"])
    if cfg.eval_data:
        from .accuracy import evaluate

        log(f"measuring accuracy on {cfg.eval_data}")
        results["accuracy"] = evaluate(original, pruned, cfg.eval_data, input_specs(original.model or pruned.model))
    return results


def _worst(providers: dict[str, Any]) -> dict[str, float | None]:
    cos, rel, top = [], [], []
    for entry in providers.values():
        for out in entry["outputs"].values():
            if "cosine" in out:
                cos.append(out["cosine"])
                rel.append(out["rel_l2"])
            if "top1_agreement" in out:
                top.append(out["top1_agreement"])
    return {
        "cosine": min(cos) if cos else None,
        "rel_l2": max(rel) if rel else None,
        "top1_agreement": min(top) if top else None,
    }


def check_gates(validation: dict[str, Any], cfg: ValidateConfig) -> list[str]:
    """Gate violations as readable strings (empty when every gate holds)."""
    worst = validation.get("worst", {})
    failures = []
    gates = (("cosine", cfg.min_cosine, min, "--min-cosine", lambda v, g: v >= g),
             ("rel_l2", cfg.max_rel_l2, max, "--max-rel-l2", lambda v, g: v <= g),
             ("top1_agreement", cfg.min_top1, min, "--min-top1", lambda v, g: v >= g))
    accuracy = validation.get("accuracy")
    if cfg.max_accuracy_drop is not None:
        if accuracy is None:
            failures.append("--max-accuracy-drop needs --eval-data with labels")
        elif accuracy["top1_drop_points"] > cfg.max_accuracy_drop:
            failures.append(f"--max-accuracy-drop {cfg.max_accuracy_drop}: top-1 dropped "
                            f"{accuracy['top1_drop_points']:.2f} points")
    for key, gate, _, option, ok in gates:
        if gate is None:
            continue
        value = worst.get(key)
        if value is None:
            failures.append(f"{option} {gate}: the model has no output to measure {key} on")
        elif not ok(value, gate):
            failures.append(f"{option} {gate}: measured {value:.6g}")
    return failures
