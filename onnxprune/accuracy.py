"""Accuracy on labelled data (``eval_data``, ``--eval-data``): top-1 and top-5 of the original and the pruned model."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputDataError
from .feeds import load_data
from .sessions import ModelSource

EVAL_DATA = ("eval_data",)  # the setting the errors about labelled data name
from .specs import InputSpec, split_samples


def load_eval_data(path: str, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inputs (batch axis first) and integer class ``labels`` from an .npz file."""
    with np.load(path, allow_pickle=False) as data:
        if "labels" not in data.files:
            raise InputDataError(f"{{eval_data}} {path}: no 'labels' array (integer class per sample)",
                                 options=EVAL_DATA)
        labels = data["labels"]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputDataError(f"{{eval_data}} {path}: 'labels' must be a 1-D integer array, got {labels.dtype} "
                             f"{labels.shape}", options=EVAL_DATA)
    relaxed = [InputSpec(s.name, s.type, [None, *s.shape[1:]]) for s in specs]
    inputs = load_data(path, relaxed, "eval_data")
    for name, arr in inputs.items():
        if arr.shape[0] != len(labels):
            raise InputDataError(f"{{eval_data}} {path}: {name} has {arr.shape[0]} samples but there are "
                                 f"{len(labels)} labels", options=EVAL_DATA)
    return inputs, labels


def _logits(source: ModelSource, inputs: dict[str, np.ndarray], batch: int, fixed_batch: bool) -> np.ndarray:
    session = source.session("CPUExecutionProvider", threads=2)
    chunks = []
    for feed in split_samples(inputs, dict.fromkeys(inputs, 0), 1 if fixed_batch else batch):
        out = session.run(None, feed)[0]
        chunks.append(out.reshape(out.shape[0], -1))
    return np.concatenate(chunks)


def topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    best = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(best == labels[:, None], axis=1)))


def evaluate(original: ModelSource, pruned: ModelSource, path: str, specs: list[InputSpec],
             batch: int = 32) -> dict[str, Any]:
    """Top-1/top-5 of both models on the labelled samples, the top-1 drop in points, and how many logits of
    either model are NaN/Inf (``nonfinite``: the accuracy gate fails on any)."""
    inputs, labels = load_eval_data(path, specs)
    fixed = any(spec.shape and spec.shape[0] == 1 for spec in specs)
    result: dict[str, Any] = {"samples": len(labels), "nonfinite": 0}
    for key, source in (("original", original), ("pruned", pruned)):
        logits = _logits(source, inputs, batch, fixed)
        result["nonfinite"] += int(logits.size - np.count_nonzero(np.isfinite(logits)))
        if logits.shape[1] < 2 or labels.max() >= logits.shape[1]:
            raise InputDataError(f"{{eval_data}} {path}: the first output has {logits.shape[1]} classes, labels go "
                                 f"to {int(labels.max())}", options=EVAL_DATA)
        result[key] = {"top1": topk(logits, labels, 1), "top5": topk(logits, labels, 5)}
    result["top1_drop_points"] = 100.0 * (result["original"]["top1"] - result["pruned"]["top1"])
    return result
