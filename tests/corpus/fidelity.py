"""Worst-case fidelity of a pruned model's outputs, shared by the corpus harness and bench/peer_measure.py (which
judges every tool's output the same way)."""

from __future__ import annotations

import numpy as np


def fidelity(dense: list[np.ndarray], pruned: list[np.ndarray]) -> tuple[float, float]:
    """Worst cosine and worst relative L2 error over the outputs."""
    cos, rel = [], []
    for a, b in zip(dense, pruned):
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        cos.append(float(a @ b / denom) if denom else float(np.array_equal(a, b)))
        rel.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)))
    return min(cos), max(rel)
