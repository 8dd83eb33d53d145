"""Validation: run the original and pruned models in onnxruntime and compare them.

For each execution provider: per-output fidelity (cosine similarity, relative L2 error,
max abs error, top-1 agreement for classifier-like outputs) and latency of both models
measured interleaved in one process (warm-up, then median and p90 over the runs).
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .analysis.cost import default_dynamic_dim
from .config import ValidateConfig
from .errors import InputDataError, UnsupportedError
from .model import PROTOBUF_LIMIT, get_attr

ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


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
# Inputs
# --------------------------------------------------------------------------------------


@dataclass
class InputSpec:
    """A graph input the caller must feed: name, ``tensor(...)`` type string, dims (None = dynamic)."""

    name: str
    type: str
    shape: list[int | None]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs to feed (graph inputs that are not initializers), read from the graph."""
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        type_name = onnx.helper.tensor_dtype_to_string(tensor_type.elem_type).replace("TensorProto.", "").lower()
        type_name = {"float": "float", "bool": "bool"}.get(type_name, type_name)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        specs.append(InputSpec(value.name, f"tensor({type_name})", dims))
    return specs


def prepare_feeds(model: onnx.ModelProto, cfg: ValidateConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The feeds for validation (from --data or synthesised) and a description of them."""
    specs = input_specs(model)
    if cfg.data:
        feeds = load_data(cfg.data, specs)
        info: dict[str, Any] = {"source": os.fspath(cfg.data)}
    else:
        feeds = synthesize_inputs(specs, resolve_shapes(specs, cfg.input_shapes), model, cfg.seed)
        info = {"source": "synthetic", "seed": cfg.seed}
    info["shapes"] = {name: list(arr.shape) for name, arr in feeds.items()}
    return feeds, info


def _index_ranges(model: onnx.ModelProto | None) -> dict[str, int]:
    """Graph inputs used as Gather indices into a constant table: name -> number of rows."""
    if model is None:
        return {}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    ranges: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in inits:
            axis = get_attr(node, "axis", 0)
            dims = inits[node.input[0]]
            if dims:
                ranges[node.input[1]] = min(ranges.get(node.input[1], 1 << 62), int(dims[axis]))
    return ranges


def resolve_shapes(specs: list[InputSpec], input_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Concrete shape for every input: --input-shape, static dims, then documented defaults."""
    names = {spec.name for spec in specs}
    for name in input_shapes:
        if name not in names:
            raise InputDataError(f"--input-shape names unknown input {name!r} (inputs: {', '.join(sorted(names))})")
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        given = input_shapes.get(spec.name)
        if given is not None:
            if len(given) != len(spec.shape):
                raise InputDataError(f"--input-shape {spec.name}: rank {len(given)} but the model input has rank {len(spec.shape)}")
            for axis, (want, have) in enumerate(zip(given, spec.shape)):
                if isinstance(have, int) and have > 0 and have != want:
                    raise InputDataError(f"--input-shape {spec.name}: axis {axis} is fixed to {have} in the model, got {want}")
            shapes[spec.name] = list(given)
        else:
            shapes[spec.name] = [d if isinstance(d, int) and d > 0 else default_dynamic_dim(i) for i, d in enumerate(spec.shape)]
    return shapes


def synthesize_inputs(specs: list[InputSpec], shapes: dict[str, list[int]], model: onnx.ModelProto | None,
                      seed: int) -> dict[str, np.ndarray]:
    """Random inputs matching the specs: floats ~ N(0,1), indices within their table, masks = 1."""
    rng = np.random.default_rng(seed)
    ranges = _index_ranges(model)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        dtype = ORT_TYPES.get(spec.type)
        if dtype is None:
            raise InputDataError(f"cannot synthesise input {spec.name!r} of type {spec.type}; give --data")
        shape = shapes[spec.name]
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=bool)
        elif "mask" in spec.name.lower():
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        else:
            high = ranges.get(spec.name, 10)
            feeds[spec.name] = rng.integers(0, max(high, 1), size=shape).astype(dtype)
    return feeds


def load_data(path: str, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Read ``--data file.npz`` and check names, dtypes and shapes against the model inputs."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise InputDataError(f"--data file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise InputDataError(f"--data {path} is not a readable .npz file: {exc}") from None
    names = {spec.name for spec in specs}
    missing = sorted(names - arrays.keys())
    extra = sorted(arrays.keys() - names - {"labels"})
    if missing or extra:
        raise InputDataError(
            f"--data {path}: names do not match the model inputs"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(extra)}" if extra else "")
        )
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = arrays[spec.name]
        want = ORT_TYPES.get(spec.type)
        if want is not None and arr.dtype != np.dtype(want):
            raise InputDataError(f"--data {path}: {spec.name} has dtype {arr.dtype}, the model expects {np.dtype(want)}")
        if arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d > 0 and d != s for d, s in zip(spec.shape, arr.shape)
        ):
            raise InputDataError(f"--data {path}: {spec.name} has shape {list(arr.shape)}, the model expects {spec.shape}")
        feeds[spec.name] = arr
    return feeds


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
