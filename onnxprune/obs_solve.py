"""The OBS / SparseGPT solvers on one layer's rows (see :mod:`onnxprune.obs` for how layers are measured and
repaired): the column sweep, exact greedy OBS for small layers, the inverse-Hessian factor, dense and masked refits
and the output error a candidate leaves. Numpy only; no graph, no onnxruntime."""

from __future__ import annotations

import numpy as np

BLOCK = 128


DAMP = 0.01


RIDGE = 1e-3  # the row-wise refit's ridge (compensation.reconstruct_sparse)


WIDE = 1024  # rows keeping at least this many weights are refitted by Cholesky (solve_wide_rows), others by LU


EXACT_WORK = 1e9  # layers with outputs x inputs³ up to this are pruned by exact per-row OBS (about a second)


def obs_prune_rows(rows: np.ndarray, hessian: np.ndarray, *, count: int | None = None,
                   nm: tuple[int, int] | None = None, block: int = BLOCK, damp: float = DAMP
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Prune ``rows`` ([outputs, inputs]) for inputs with Gram matrix ``hessian``; returns (rows, mask).

    Unstructured: exactly ``count`` weights are zeroed, spread over the column blocks in
    proportion to their width; N:M: ``nm[0]`` of every ``nm[1]`` consecutive columns in each row.
    """
    w = rows.astype(np.float32, copy=True)
    outputs, columns = w.shape
    u = inverse_hessian_factor(hessian, damp).astype(np.float32)
    mask = np.zeros(w.shape, dtype=bool)
    if nm is not None:
        block = max(nm[1], block // nm[1] * nm[1])
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w1, u1 = w[:, start:end].copy(), u[start:end, start:end]
        diag = np.diag(u1)
        if nm is None:
            share = _share(count or 0, outputs, columns, start, end)
            scores = w1 ** 2 / diag[None, :] ** 2
            chosen = np.zeros(scores.size, dtype=bool)
            if share:
                chosen[np.argpartition(scores, share - 1, axis=None)[:share]] = True
            mask[:, start:end] = chosen.reshape(scores.shape)
        errors = np.zeros_like(w1)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = w1[:, i:i + nm[1]] ** 2 / diag[None, i:i + nm[1]] ** 2
                lowest = np.argsort(group, axis=1, kind="stable")[:, :nm[0]]
                np.put_along_axis(mask[:, start + i:start + i + nm[1]], lowest, True, axis=1)
            pruned = mask[:, start + i]
            err = np.where(pruned, w1[:, i], 0.0) / diag[i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            w1[pruned, i] = 0.0
            errors[:, i] = err
        w[:, start:end] = w1
        w[:, end:] -= errors @ u[start:end, end:]
    w[mask] = 0.0
    return w, mask


def obs_exact_rows(rows: np.ndarray, hessian: np.ndarray, *, count: int | None = None,
                   nm: tuple[int, int] | None = None, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Greedy OBS per row (Optimal Brain Compression): remove the weight of least w² / [H⁻¹]_qq, update the
    row's other weights and its inverse Hessian exactly (rank-one), repeat; returns (rows, mask).

    Each row stays the exact least-squares optimum for its mask, unlike the one-pass sweep of
    :func:`obs_prune_rows`; the work is about outputs x inputs³, so only small layers take this path.
    Unstructured: ``count`` zeros spread evenly over the rows; N:M: ``nm[0]`` of every ``nm[1]``.
    """
    w = rows.astype(np.float64, copy=True)
    outputs, columns = w.shape
    factor = inverse_hessian_factor(hessian, damp)
    inverse = factor.T @ factor
    if nm is None:
        per_row = np.full(outputs, (count or 0) // outputs)
        per_row[:(count or 0) % outputs] += 1
    else:
        per_row = np.full(outputs, columns // nm[1] * nm[0])
    mask = np.zeros(w.shape, dtype=bool)
    chunk = max(1, 2 ** 24 // (columns * columns))  # rows at a time: 128 MB of inverse Hessians
    for start in range(0, outputs, chunk):
        stop = min(start + chunk, outputs)
        _greedy(w[start:stop], mask[start:stop], np.repeat(inverse[None], stop - start, axis=0),
                per_row[start:stop], nm)
    return w.astype(np.float32), mask


def _greedy(w: np.ndarray, mask: np.ndarray, inverse: np.ndarray, per_row: np.ndarray,
            nm: tuple[int, int] | None) -> None:
    """The OBS removal loop of :func:`obs_exact_rows` on a chunk of rows (all arguments updated in place)."""
    for step in range(int(per_row.max(initial=0))):
        rows = np.flatnonzero(per_row > step)
        if len(rows) < len(w):  # the last step of an uneven split: work on copies of the rows still pruning
            sub_w, sub_mask, sub_inverse = w[rows], mask[rows], inverse[rows]
            _remove_one(sub_w, sub_mask, sub_inverse, nm)
            w[rows], mask[rows], inverse[rows] = sub_w, sub_mask, sub_inverse
        else:
            _remove_one(w, mask, inverse, nm)


def _remove_one(w: np.ndarray, mask: np.ndarray, inverse: np.ndarray, nm: tuple[int, int] | None) -> None:
    """Remove the cheapest remaining weight of every row, updating the rows and their inverse Hessians."""
    rows = np.arange(len(w))
    scores = w ** 2 / np.where(mask, 1.0, np.einsum("rii->ri", inverse))
    scores[mask] = np.inf
    if nm is not None:  # groups that already have their N zeros take no more
        full = mask.reshape(len(w), -1, nm[1]).sum(axis=2) >= nm[0]
        scores[np.repeat(full, nm[1], axis=1)] = np.inf
    q = scores.argmin(axis=1)
    column = inverse[rows, :, q] / np.sqrt(inverse[rows, q, q])[:, None]  # [rows, inputs]
    w -= (w[rows, q] / np.sqrt(inverse[rows, q, q]))[:, None] * column
    for r in rows:  # in place, one row at a time: no temporary the size of all inverses
        inverse[r] -= np.outer(column[r], column[r])
    mask[rows, q] = True
    w[mask] = 0.0


def _share(count: int, outputs: int, columns: int, start: int, end: int) -> int:
    """The number of the tensor's ``count`` zeros that fall in columns [start, end) (sums exactly to count)."""
    total = outputs * columns
    return round(count * end * outputs / total) - round(count * start * outputs / total)


def inverse_hessian_factor(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = H⁻¹), λ = ``damp`` x mean diagonal; float64."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0  # inputs never active on the calibration data: any weight there is free to go
    lam = damp * float(np.mean(np.diag(h)))
    for _ in range(6):
        try:
            lower = np.linalg.cholesky(h + lam * np.eye(len(h)))
            break
        except np.linalg.LinAlgError:
            lam = lam * 10 if lam > 0 else 1e-8
    else:
        raise np.linalg.LinAlgError("the Hessian of a layer stays singular after damping")
    inverse_lower = np.linalg.inv(lower)
    inverse = inverse_lower.T @ inverse_lower
    return np.linalg.cholesky((inverse + inverse.T) / 2).T


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per group aᵀb of [samples, groups, inputs] column batches, as [groups, inputs, inputs]."""
    if a.shape[1] == 1:  # a plain 2-D product runs in BLAS (a stacked one over transposed views does not)
        return (a[:, 0, :].T @ b[:, 0, :])[None]
    return np.einsum("ngi,ngj->gij", a, b, optimize=True)


def refit_dense(rows: np.ndarray, h: np.ndarray, p: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """The dense rows that best map the pruned model's inputs to the original output:
    argmin ‖XₚAᵀ − XₒWᵀ‖² + λ‖A − W‖² = W (Pᵀ + λI)(H + λI)⁻¹, λ = ``damp`` x mean diag(H)."""
    lam = damp * float(np.mean(np.diag(h))) + 1e-12
    eye = np.eye(len(h))
    return np.linalg.solve(h + lam * eye, (p + lam * eye) @ rows.astype(np.float64).T).T


def refit_masked(rows: np.ndarray, mask: np.ndarray, h: np.ndarray, p: np.ndarray, ridge: float = RIDGE
                 ) -> np.ndarray:
    """Each row's kept weights (``mask`` False) refitted by ridge least squares to the original output,
    argmin ‖XₚAᵀ − XₒWᵀ‖² + λ‖A‖², λ = ``ridge`` x mean diag(H): the row-wise refit, on the given Gram.

    Rows keeping at least ``WIDE`` weights are solved one by one by Cholesky (:func:`solve_wide_rows`), the
    others in stacked LU solves.
    """
    lam = ridge * float(np.mean(np.diag(h))) + 1e-12
    rhs = rows.astype(np.float64) @ p.T  # row r: (P w_r), P = XₚᵀXₒ
    out = np.zeros(rows.shape, dtype=np.float32)
    kept_counts = (~mask).sum(axis=1)
    wide = kept_counts >= WIDE
    if wide.any():
        out[wide] = solve_wide_rows(h, lam, ~mask[wide], rhs[wide])
    _refit_exact(out, mask, np.where(wide, 0, kept_counts), h, rhs, lam)
    return out


def _refit_exact(out: np.ndarray, mask: np.ndarray, kept_counts: np.ndarray, h: np.ndarray, rhs: np.ndarray,
                 lam: float) -> None:
    """The ridge solve of every row with ``kept_counts`` > 0 on its kept sub-Gram, written into ``out``."""
    for count in np.unique(kept_counts[kept_counts > 0]):  # rows keeping as many weights: one stacked solve
        same = np.flatnonzero(kept_counts == count)
        chunk = max(1, 2 ** 24 // int(count) ** 2)  # 128 MB of sub-Gram matrices at a time
        for start in range(0, len(same), chunk):
            rows_now = same[start:start + chunk]
            kept = np.nonzero(~mask[rows_now])[1].reshape(len(rows_now), count)
            sub = h[kept[:, :, None], kept[:, None, :]] + lam * np.eye(count)
            solved = np.linalg.solve(sub, np.take_along_axis(rhs[rows_now], kept, axis=1)[:, :, None])[:, :, 0]
            out[rows_now[:, None], kept] = solved


def solve_wide_rows(h: np.ndarray, lam: float, keep: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """x_K = (H_KK + λI)⁻¹ rhs_K for each row's kept set K (``keep``, [rows, inputs]); zeros elsewhere.

    For rows keeping thousands of inputs: the sub-Gram is gathered by two contiguous takes and factored by
    Cholesky (k³/3 flops against LU's 2k³/3), then two blocked triangular solves (k² flops each).
    """
    out = np.zeros(keep.shape, dtype=np.float64)
    for r, row_keep in enumerate(keep):
        kept = np.flatnonzero(row_keep)
        if not len(kept):
            continue
        sub = h.take(kept, axis=0).take(kept, axis=1)
        sub[np.diag_indices(len(kept))] += lam
        try:
            lower = np.linalg.cholesky(sub)
        except np.linalg.LinAlgError:  # not numerically positive definite: LU, as for narrow rows
            out[r, kept] = np.linalg.solve(sub, rhs[r, kept])
            continue
        out[r, kept] = _upper_solve(lower.T, _lower_solve(lower, rhs[r, kept]))
    return out


def _lower_solve(lower: np.ndarray, y: np.ndarray, block: int = 256) -> np.ndarray:
    """L⁻¹y for lower-triangular L, by blocks: a small solve per diagonal block, one product for the rest."""
    x = np.array(y, dtype=np.float64)
    for start in range(0, len(x), block):
        end = min(len(x), start + block)
        x[start:end] = np.linalg.solve(lower[start:end, start:end], x[start:end])
        x[end:] -= lower[end:, start:end] @ x[start:end]
    return x


def _upper_solve(upper: np.ndarray, y: np.ndarray, block: int = 256) -> np.ndarray:
    """U⁻¹y for upper-triangular U, by blocks from the bottom."""
    x = np.array(y, dtype=np.float64)
    for end in range(len(x), 0, -block):
        start = max(0, end - block)
        x[start:end] = np.linalg.solve(upper[start:end, start:end], x[start:end])
        x[:start] -= upper[:start, start:end] @ x[start:end]
    return x


def output_error(rows: np.ndarray, new_rows: np.ndarray, grams: list[tuple[np.ndarray, ...]]) -> float:
    """‖XₚW'ᵀ − XₒWᵀ‖ / ‖XₒWᵀ‖ over the groups of a layer, from (H, P, G) per group."""
    num = den = 0.0
    for w, n, (h, p, g) in zip(rows, new_rows, grams):
        w, n = w.astype(np.float64), n.astype(np.float64)
        reference = float(np.einsum("ij,ij->", w @ g, w))
        num += float(np.einsum("ij,ij->", n @ h, n) - 2 * np.einsum("ij,ij->", n @ p, w)) + reference
        den += reference
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
