"""Products and loops over rows in two fixed parts, the second on a thread pool where the caller has one: the
selection's wide greedy steps and inverses (:mod:`onnxprune.scoring`) use the other core this way without changing
a bit.

The parts depend only on the row count, never on whether a pool is there: OpenBLAS handles a block's last rows (below
its kernel's unroll, 4-24 rows) by other code paths, whose sums may round differently, so a product split at an
arbitrary row could change those rows' last bits, and with OpenBLAS on several threads its own partition of a product
follows the product's shape. Splitting at a multiple of :data:`ROW_ALIGN` rows gave, with one OpenBLAS thread, the
unsplit product bit for bit on every shape measured (float64; splits at multiples of 8 or 16 rows did not); whatever
the threads, the parts are the same with and without a pool. Numpy only."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

#: a product split by rows is split at a multiple of this many rows (see the module's text)
ROW_ALIGN = 192
#: products of fewer rows than this are not split
SPLIT_ROWS = 512


def in_halves(pool: Executor | None, count: int, work: Callable[[int, int], None], least: int = 0,
              align: int = ROW_ALIGN) -> None:
    """``work(lo, hi)`` over ``range(count)``, in two parts split near the middle at a multiple of ``align`` where
    ``count`` is at least ``least`` (else at once): the second on ``pool`` where there is one (a pool whose tasks never
    wait on it), else after the first, here. Returns when both are done; an error of either is raised."""
    half = max(align, round(count / 2 / align) * align)
    if count < least or half >= count:
        work(0, count)
        return
    if pool is None:
        work(0, half)
        work(half, count)
        return
    other = pool.submit(work, half, count)
    try:
        work(0, half)
    finally:
        other.result()


def rows_product(a: np.ndarray, b: np.ndarray, pool: Executor | None = None, out: np.ndarray | None = None
                 ) -> np.ndarray:
    """``a @ b`` (into ``out`` when given, which must not overlap ``a`` or ``b``), the rows of ``a`` in two parts from
    :data:`SPLIT_ROWS` rows on (:func:`in_halves`), one on ``pool`` where there is one."""
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))

    def rows(lo: int, hi: int) -> None:
        np.matmul(a[lo:hi], b, out=out[lo:hi])

    in_halves(pool, a.shape[0], rows, least=SPLIT_ROWS)
    return out
