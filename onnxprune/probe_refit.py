"""The allocation's refit of a sensitivity point: the consumers of the dropped channels refitted by least squares
from Gram matrices captured once on the calibration data (:class:`Refit`, used by :class:`~onnxprune.probe.Probe`'s
points through :func:`~onnxprune.sensitivity.measure_masked`)."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

from .analysis.groups import Analysis
from .calibration import StageClock
from .consumer_grams import ConsumerGrams
from .gram import product_pool
from .scoring import WIDE_FEATURES, as_float64, refit_consumers
from .selection_windows import CaptureSource, consumer_input_bytes, consumer_windows
from .sessions import shared_weights
from .spd_solve import cholesky_in_place, solve_leading


class Refit:
    """Least-squares refit of masked consumers from Gram matrices captured once on the calibration data
    (:class:`~onnxprune.consumer_grams.ConsumerGrams`: a deep layer keeps its few inputs instead of its large Gram
    and builds the Gram when a point first needs it). Deferred Grams and ``H @ W`` products are held while the
    points need the same consumers (a group's points) and dropped when a point needs others.

    A group's points drop nested sets of features (more units each), so after :meth:`plan` a wide consumer's Gram
    is built once with its features permuted, those dropped first at the end
    (:meth:`~onnxprune.consumer_grams.ConsumerGrams.permuted`), and factored in place (H' = L Lᵀ):
    each point's kept features are a leading block, whose system is solved from L and c = Lᵀ W' alone
    (:func:`~onnxprune.spd_solve.solve_leading`). ``originals`` (weight name -> array) are the consumer weights'
    values to read instead of copies of their own (the probe's); those over bytes also feed the capture sessions.

    With ``points`` (per group, in the order the groups are measured, the channels its points keep) the Grams are
    captured per window of consecutive groups (:func:`~onnxprune.selection_windows.consumer_windows`: the consumers the
    window's points refit hold at most their weights' bytes in Grams and kept inputs) when :meth:`enter` reaches
    the window's first group, and the previous window's go; each capture after the first starts from the frontier
    the previous one kept where that fits (:class:`~onnxprune.selection_windows.CaptureSource`). A consumer refitted in
    two windows is captured in both: the same Gram bit for bit (``--low-memory``)."""

    def __init__(self, analysis: Analysis, feeds: list[dict[str, np.ndarray]], ridge: float = 1e-3,
                 clock: StageClock | None = None, originals: dict[str, np.ndarray] | None = None,
                 points: list[list[np.ndarray]] | None = None):
        self.consumers = refit_consumers(analysis, originals)
        # the capture sessions are fed the originals, not copies of them; the copies of other weights they make go
        # with them (read-only: not kept for later windows' captures beside the Grams)
        self.shared = MappingProxyType(shared_weights(originals))
        self.analysis, self.feeds, self.ridge, self.clock = analysis, feeds, ridge, clock or StageClock()
        self.windows: list[tuple[range, set[str]]] = []
        self.grams: ConsumerGrams | dict = {}
        if points is not None and self.consumers:
            self._plan_windows(points)
        elif self.consumers:
            self.grams = ConsumerGrams(analysis.model, self.consumers, feeds, ridge, clock, analysis.shapes,
                                       shared=self.shared, pool=product_pool())  # the windows go without it
        self.products: dict[str, np.ndarray] = {}
        self.working: set[str] = set()
        self.orders: dict[str, np.ndarray] = {}  # wide consumer -> its features, kept longest first
        self.factors: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}  # -> (L, Lᵀ W'), None: not SPD

    def _plan_windows(self, points: list[list[np.ndarray]]) -> None:
        """The windows of consecutive groups and the consumers each window's points refit; where captures start."""
        readers: dict[str, list[int]] = {}  # consumer -> the groups with a point that drops some of its features
        for number, keeps in enumerate(points):
            for key, (*_, feature_ids) in self.consumers.items():
                if any(not keep[feature_ids].all() for keep in keeps):
                    readers.setdefault(key, []).append(number)
        windows = consumer_windows(self.analysis, points, self.consumers, readers, self.feeds)
        self.windows = [(window, {key for key, numbers in readers.items() if set(numbers) & set(window)})
                        for window in windows]
        start = consumer_input_bytes(self.analysis, self.consumers, self.feeds) if len(windows) > 1 else 0
        self.source = CaptureSource(self.analysis.model, self.feeds, start, self.analysis.shapes)

    def enter(self, group: int) -> None:
        """Group ``group`` is measured next: at a window's first group, the previous window's Grams go and the
        window's are captured (nothing without windows)."""
        number = next((n for n, (window, _) in enumerate(self.windows) if window.start == group), None)
        if number is None:
            return
        self._work_on(set())
        self.grams, self.products, self.orders, self.factors = {}, {}, {}, {}
        keys = self.windows[number][1]
        if not keys:
            return
        later = {self.consumers[key][0].input[0] for _, others in self.windows[number + 1:] for key in others}
        frontier = self.source.frontier(later, {self.consumers[key][0].input[0] for key in keys}) if later else None
        with self.clock.stage("gram"):
            self.grams = ConsumerGrams(self.analysis.model, {key: self.consumers[key] for key in self.consumers
                                                             if key in keys}, self.source.feeds, self.ridge,
                                       self.clock, self.analysis.shapes, frontier=frontier, shared=self.shared)
        self.source.advance(frontier, self.grams.frontier)
        self.grams.frontier = []
        if not later:  # no capture after this one: the kept frontier is not held through the window's points
            self.source.feeds = self.source.inputs

    def plan(self, keeps: list[np.ndarray]) -> None:
        """The channels kept by the next points (one group's, in order): each wide consumer's feature order for
        one factorisation serving every point whose kept features lead it."""
        self.orders, self.factors = {}, {}  # the previous group's factors follow its order
        for key, (*_, feature_ids) in self.consumers.items():
            if len(feature_ids) < WIDE_FEATURES or key not in self.grams:
                continue
            kept = [keep[feature_ids] for keep in keeps]
            if all(k.all() or not k.any() for k in kept):
                continue
            dropped_at = np.full(len(feature_ids), len(keeps))  # the first point that drops each feature
            for point in range(len(keeps) - 1, -1, -1):
                dropped_at[~kept[point]] = point
            self.orders[key] = np.argsort(-dropped_at, kind="stable")

    def apply(self, keep: np.ndarray) -> None:
        """Write the refitted weights of every consumer that lost input features (after :func:`mask`)."""
        touched = [key for key, (*_, feature_ids) in self.consumers.items()
                   if key in self.grams and not keep[feature_ids].all() and keep[feature_ids].any()]
        self._work_on(set(touched))
        for key in touched:
            node, edit, matrix, feature_ids = self.consumers[key]
            kept = keep[feature_ids]
            fitted = np.zeros_like(matrix, dtype=np.float64)
            try:
                factor = self._factor(key, kept, matrix)
                if factor is not None:
                    order = self.orders[key][:int(kept.sum())]
                    fitted[order] = solve_leading(*factor, len(order))
                else:
                    gram = self.grams[key]
                    fitted[kept] = np.linalg.solve(gram[np.ix_(kept, kept)], self._target(key, gram, matrix, kept))
                    gram = None
            except np.linalg.LinAlgError:
                continue
            if node.op_type == "Conv":
                values = fitted.T.reshape(edit.weight.shape)
            elif node.op_type == "Gemm" and edit.axis == 1:
                values = fitted.T
            else:
                values = fitted
            edit.weight.set_array(values)

    def _factor(self, key: str, kept: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(L, Lᵀ W') of a wide consumer's permuted Gram when ``kept`` is a leading block of its order, made once
        per group; None: solve directly (no order, not a leading block, or not numerically positive definite)."""
        order = self.orders.get(key)
        if order is None or not kept[order[:int(kept.sum())]].all():
            return None
        if key not in self.factors:
            lower = self.grams.permuted(key, order)
            try:
                # strips on the other core (the same factor), but not in windows (--low-memory): their temporaries
                # beside the probe's sessions raised ResNet-50's allocation peak by ~9 MB, to 773 of its 776 budget
                cholesky_in_place(lower, pool=None if self.windows else product_pool())
            except np.linalg.LinAlgError:
                self.factors[key] = None
                return None
            self.factors[key] = (lower, lower.T @ as_float64(matrix)[order])
            self.grams.release({key}, keep=self.working - set(self.factors))  # the factor replaces the Gram
        return self.factors[key]

    def _work_on(self, keys: set[str]) -> None:
        """Drop the deferred Grams, products and factors of the consumers the previous point refitted and this one
        does not."""
        left = self.working - keys
        if left and not isinstance(self.grams, dict):  # else no Grams at all
            self.grams.release(left, keep=keys)
        for key in left:
            self.products.pop(key, None)
            self.factors.pop(key, None)
        self.working = keys

    def forget(self, keys) -> None:
        """``keys`` are refitted by no later point: their Grams (and kept inputs no other consumer reads) go."""
        keys = set(keys) & set(self.consumers)
        if keys and not isinstance(self.grams, dict):
            self._work_on(self.working - keys)
            self.grams.forget(keys)

    def _target(self, key: str, gram: np.ndarray, matrix: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """H[kept] @ W, the right-hand side of the refit; for a wide consumer (every point of its group solves
        with it) H @ W is computed once and its rows taken."""
        if gram.shape[0] < WIDE_FEATURES:
            return gram[kept] @ as_float64(matrix)
        return self._product(key, gram, matrix)[kept]

    def _product(self, key: str, gram: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """H @ W of a consumer, computed once."""
        if key not in self.products:
            self.products[key] = gram @ as_float64(matrix)
        return self.products[key]
