"""Rows for least squares on calibration data: im2col patches, a seeded row sample, Gram sums (XᵀX, XᵀY).

Shared by the refit after removal (:mod:`onnxprune.refit`), the reconstruction-aware channel selection
(:mod:`onnxprune.scoring`) and the allocation's refit (:mod:`onnxprune.sensitivity`)."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
import onnx

from .graph import get_attr

#: Gram matrices (selection and refit) use at most max(GRAM_MIN_ROWS, GRAM_ROWS_PER_FEATURE × features) rows per
#: consumer: beyond that, a seeded uniform sample of the rows (im2col positions, tokens) of every calibration batch.
#: XᵀX/n of a uniform sample estimates the full Gram without bias; 32 rows per feature keep its relative error
#: small, and the sample is the same on every run (seed 0).
GRAM_MIN_ROWS = 16384
GRAM_ROWS_PER_FEATURE = 32


class RowSampler:
    """Which rows of each calibration batch enter one consumer's Gram: all of them while the batches hold at most
    the row budget for ``features``, else a seeded uniform sample of the same share of every batch."""

    def __init__(self, features: int, batches: int, seed: int = 0):
        self.budget = max(GRAM_MIN_ROWS, GRAM_ROWS_PER_FEATURE * features)
        self.batches = max(batches, 1)
        self.rng = np.random.default_rng(seed)
        self.share: float | None = None

    def pick(self, rows: int) -> np.ndarray | None:
        """Sorted row indices to keep out of ``rows`` (None: all); the share is fixed by the first batch."""
        if self.share is None:
            self.share = min(1.0, self.budget / max(rows * self.batches, 1))
        if self.share >= 1.0:
            return None
        count = max(1, round(rows * self.share))
        return np.sort(self.rng.choice(rows, size=count, replace=False))


def _im2col(x: np.ndarray, node: onnx.NodeProto, kernel: tuple[int, int]) -> np.ndarray:
    """Patches of a 4-D input as rows: [N*Ho*Wo, C*kh*kw] for a 2-D Conv's pads/strides/dilations."""
    return _patches(x, node, kernel)[0]


def _patches(x: np.ndarray, node: onnx.NodeProto, kernel: tuple[int, int], sampler: RowSampler | None = None
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_im2col` rows and the indices of the output positions they belong to (None: all, in order). With
    ``sampler`` only the sampled positions' patches are gathered (the full patch matrix is never built)."""
    kh, kw = kernel
    pads = list(get_attr(node, "pads") or [0, 0, 0, 0])
    sh, sw = list(get_attr(node, "strides") or [1, 1])
    dh, dw = list(get_attr(node, "dilations") or [1, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]
    n, c, ho, wo = win.shape[:4]
    picked = sampler.pick(n * ho * wo) if sampler is not None else None
    if picked is None:
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw), None
    b, rest = np.divmod(picked, ho * wo)
    i, j = np.divmod(rest, wo)
    return win[b, :, i, j].reshape(len(picked), c * kh * kw), picked


def auto_pad(node: onnx.NodeProto) -> str:
    """A Conv's ``auto_pad`` as text (attributes hold bytes)."""
    value = get_attr(node, "auto_pad", b"NOTSET")
    return value.decode() if isinstance(value, bytes) else value


def _reconstructable(node: onnx.NodeProto) -> bool:
    """Whether least squares can refit the node: a plain Conv (no groups, explicit pads), Gemm or MatMul."""
    if node.op_type == "Conv":
        return int(get_attr(node, "group", 1)) == 1 and auto_pad(node) == "NOTSET"
    if node.op_type == "Gemm":
        return not get_attr(node, "transA", 0) and get_attr(node, "alpha", 1.0) == 1.0 and get_attr(node, "beta", 1.0) == 1.0
    return node.op_type == "MatMul"


#: a :class:`GramSum` flushes its buffered rows once they are this many (or as many as its features, if fewer)
FLUSH_ROWS = 2048
#: a Gram wider than ``FLUSH_ROWS`` adds its product in blocks of this many columns
PRODUCT_COLUMNS = 512
#: products a :class:`GramSum` with a pool leaves running while its caller makes the next rows (each holds its
#: centred rows and a D×D float32 product, D ≤ ``FLUSH_ROWS``: at most 32 MB)
IN_FLIGHT = 1


class GramSum:
    """XᵀX (and XᵀY) over row blocks, summed in float64. Blocks are multiplied in ``dtype`` after subtracting a
    shift (the first block's column means), so float32 products keep the accuracy of the centred data (the mean,
    large after a ReLU and exact for a bias column, is added back in float64 from the column sums); blocks are
    buffered until they hold as many rows as features (at most ``FLUSH_ROWS``), so small batches do not each cost a
    D×D update. A Gram wider than ``FLUSH_ROWS`` adds its product ``PRODUCT_COLUMNS`` columns at a time: besides the
    float64 sum, a flush holds its rows and a D×512 float32 block, not a second D×D array (ResNet-50's 4,608-feature
    Grams: 19 MB instead of 85 MB of product, at most ~38 MB instead of 85 MB of rows).

    With ``pool`` (:func:`product_pool`) the products run on its threads: a narrow flush's product runs while the
    caller makes the next rows (``in_flight`` left running, added to the sum in the order of the flushes; with 0 it
    runs in place), a wide flush's column blocks run on the pool's threads at once (disjoint columns of the sum, the
    flush returning when they are done). Each product is the same call on the same arrays and the sums are added in
    the same order: the result is the same, bit for bit."""

    def __init__(self, dtype: type = np.float32, pool: Executor | None = None, in_flight: int = IN_FLIGHT):
        self.dtype = dtype
        self.pool, self.in_flight = pool, in_flight
        self.flights: deque = deque()  # narrow products running on the pool, oldest first
        self.gram: np.ndarray | int = 0
        self.cross: np.ndarray | int = 0
        self.rows: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.count = 0
        self.total = 0
        self.shift: np.ndarray | None = None
        self.target_shift: np.ndarray | None = None
        self.sum_x: np.ndarray | int = 0
        self.sum_y: np.ndarray | int = 0

    def add(self, rows: np.ndarray, target: np.ndarray | None = None) -> None:
        self.rows.append(rows)
        if target is not None:
            self.targets.append(target)
        self.count += rows.shape[0]
        if self.count >= min(rows.shape[1], FLUSH_ROWS):
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        owned = len(self.rows) > 1  # a concatenation of the blocks: centred in place
        rows = self.rows[0] if len(self.rows) == 1 else np.concatenate(self.rows)
        target = (self.targets[0] if len(self.targets) == 1 else np.concatenate(self.targets)) if self.targets else None
        self.rows, self.targets, self.count = [], [], 0  # the blocks are not held while the products run
        if self.shift is None:
            self.shift = rows.mean(axis=0, dtype=np.float64).astype(self.dtype)
            if target is not None:
                self.target_shift = target.mean(axis=0, dtype=np.float64).astype(self.dtype)
        self.total += rows.shape[0]
        self.sum_x = self.sum_x + rows.sum(axis=0, dtype=np.float64)
        if owned and rows.dtype == self.dtype:
            centred = rows
            centred -= self.shift
        else:
            centred = rows.astype(self.dtype, copy=False) - self.shift
        del rows
        shifted = None
        if target is not None:
            self.sum_y = self.sum_y + target.sum(axis=0, dtype=np.float64)
            shifted = target.astype(self.dtype, copy=False) - self.target_shift
        if centred.shape[1] > FLUSH_ROWS:
            self._wide(centred)
            if shifted is not None:
                self.cross = _accumulate(self.cross, centred.T @ shifted)
        elif self.pool is None or not self.in_flight:
            self._take(_products(centred, shifted))
        else:
            self.flights.append(self.pool.submit(_products, centred, shifted))
            del centred, shifted
            while len(self.flights) > self.in_flight:
                self._take(self.flights.popleft().result())

    def _take(self, products: tuple[np.ndarray, np.ndarray | None]) -> None:
        """Add one narrow flush's products to the float64 sums."""
        gram, cross = products
        self.gram = _accumulate(self.gram, gram)
        if cross is not None:
            self.cross = _accumulate(self.cross, cross)

    def _wide(self, centred: np.ndarray) -> None:
        """Add a wide flush's product to the sum ``PRODUCT_COLUMNS`` columns at a time (on the pool: at once)."""
        width = centred.shape[1]
        if isinstance(self.gram, int):
            self.gram = np.zeros((width, width))
        gram = self.gram

        def block(start: int) -> None:
            gram[:, start:start + PRODUCT_COLUMNS] += centred.T @ centred[:, start:start + PRODUCT_COLUMNS]

        if self.pool is None:
            for start in range(0, width, PRODUCT_COLUMNS):
                block(start)
        else:
            list(self.pool.map(block, range(0, width, PRODUCT_COLUMNS)))

    def result(self) -> tuple[np.ndarray, np.ndarray | int]:
        """(XᵀX, XᵀY) of every block added. The shift is added back in place, a block of rows at a time (the same
        sums in the same order as ``G + c sᵀ + s cᵀ − n c cᵀ``, without D×D temporaries); the sums are then final."""
        self._flush()
        while self.flights:
            self._take(self.flights.popleft().result())
        if self.shift is None:
            return self.gram, self.cross
        c = self.shift.astype(np.float64)
        if self.target_shift is not None:
            _add_shift(self.cross, c, self.sum_x, self.sum_y, self.target_shift.astype(np.float64), self.total)
        _add_shift(self.gram, c, self.sum_x, self.sum_x, c, self.total)
        self.shift = self.target_shift = None
        return self.gram, self.cross


def _products(centred: np.ndarray, shifted: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A narrow flush's float32 products: (centredᵀ centred, centredᵀ shifted)."""
    return centred.T @ centred, (centred.T @ shifted if shifted is not None else None)


#: threads of :func:`product_pool`
PRODUCT_THREADS = 2
_pool: dict[str, Executor] = {}
_pool_lock = threading.Lock()


def product_pool() -> Executor:
    """The process's pool for Gram products (:class:`GramSum` ``pool``), made on first use: for callers that sum
    Grams on one thread while the other core would idle (the selection under ``--low-memory``). What runs on it is
    a leaf computation that never waits on the pool itself (two threads: a task waiting on another could deadlock);
    callers on several threads only queue behind each other."""
    with _pool_lock:
        if "pool" not in _pool:
            _pool["pool"] = ThreadPoolExecutor(PRODUCT_THREADS, thread_name_prefix="onnxprune-gram")
        return _pool["pool"]


def _accumulate(total: np.ndarray | int, product: np.ndarray) -> np.ndarray:
    """``total + product`` in float64, in place once ``total`` is an array (``0 + p`` first, as before: in the
    product's own array when it is float64, the same values without a second D×D array)."""
    if isinstance(total, int):
        if product.dtype == np.float64:
            product += 0.0  # 0 + p: a negative zero becomes 0.0, as in zeros + p
            return product
        total = np.zeros(product.shape)
    total += product
    return total


#: rows of a Gram corrected at a time by :func:`_add_shift`
SHIFT_ROWS = 256


def _add_shift(out: np.ndarray, c: np.ndarray, sum_x: np.ndarray, sum_y: np.ndarray, d: np.ndarray,
               total: int) -> None:
    """``out += c sum_yᵀ; out += sum_x dᵀ; out -= total · c dᵀ``, elementwise in that order, by blocks of rows."""
    for start in range(0, out.shape[0], SHIFT_ROWS):
        block = out[start:start + SHIFT_ROWS]
        rows = slice(start, start + SHIFT_ROWS)
        block += np.outer(c[rows], sum_y)
        block += np.outer(sum_x[rows], d)
        block -= total * np.outer(c[rows], d)

