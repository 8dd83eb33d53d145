"""Symmetric positive definite systems solved in the memory of their matrix, for the allocation's refit
(:class:`~onnxprune.probe.Refit`) and the selection's wide inverses (:func:`~onnxprune.scoring.spd_inverse`): a
blocked Cholesky factorisation written over the matrix, and the solve of a leading block's system from that one
factor. ``np.linalg.cholesky`` and ``np.linalg.solve`` copy their matrix into
a work buffer of their own (a 4,608-feature Gram is 170 MB); here no temporary exceeds one block of rows. Numpy
only."""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np

from .obs_solve import _upper_solve

BLOCK = 256


def cholesky_in_place(a: np.ndarray, block: int = BLOCK, pool: Executor | None = None) -> np.ndarray:
    """The lower Cholesky factor L of ``a`` (A = L Lᵀ, float64, C-ordered, only its lower triangle read), written
    over ``a`` with a zeroed upper triangle (returned). Right-looking by ``block`` columns: each panel is solved
    against its diagonal factor and the trailing lower triangle updated by row strips, so no temporary exceeds
    ``block`` rows. Raises ``np.linalg.LinAlgError`` (``a`` then partly overwritten) when ``a`` is not numerically
    positive definite. With ``pool`` (:func:`~onnxprune.gram.product_pool`) the strips of each update run on its
    threads (disjoint rows, each the same product: the same factor bit for bit)."""
    n = a.shape[0]
    for start in range(0, n, block):
        end = min(n, start + block)
        diagonal = np.linalg.cholesky(a[start:end, start:end])
        a[start:end, start:end] = diagonal
        a[start:end, end:] = 0.0
        if end == n:
            break
        panel = a[end:, start:end]
        panel[...] = np.linalg.solve(diagonal, panel.T).T  # L21 = A21 L11⁻ᵀ

        def strip(row: int, end: int = end, panel: np.ndarray = panel) -> None:
            stop = min(n, row + block)
            a[row:stop, end:stop] -= panel[row - end:stop - end] @ panel[:stop - end].T

        rows = range(end, n, block)
        if pool is None or len(rows) < 2:
            for row in rows:
                strip(row)
        else:
            list(pool.map(strip, rows))
    return a


def solve_leading(lower: np.ndarray, c: np.ndarray, k: int, block: int = BLOCK) -> np.ndarray:
    """x with A_kk x = L_kk c_k, i.e. x = L_kk⁻ᵀ c_k, for the leading k×k block of A = L Lᵀ (whose Cholesky
    factor is L's leading block). With c = Lᵀ W this is the least-squares refit of W on the first k features:
    A_kk x = (A W)_k, since (A W)_k = [L_kk 0] Lᵀ W."""
    return _upper_solve(lower[:k, :k].T, c[:k], block)
