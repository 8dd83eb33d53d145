"""The allocation's refit of a sensitivity point: the consumers of the dropped channels refitted by least squares
from Gram matrices captured once on the calibration data (:class:`Refit`, used by :class:`~onnxprune.probe.Probe`'s
points through :func:`~onnxprune.sensitivity.measure_masked`)."""

from __future__ import annotations

import numpy as np

from .analysis.groups import Analysis
from .calibration import StageClock
from .consumer_grams import ConsumerGrams
from .scoring import WIDE_FEATURES, _refit_consumers, as_float64
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
    values to read instead of copies of their own (the probe's)."""

    def __init__(self, analysis: Analysis, feeds: list[dict[str, np.ndarray]], ridge: float = 1e-3,
                 clock: StageClock | None = None, originals: dict[str, np.ndarray] | None = None):
        self.consumers = _refit_consumers(analysis, originals)
        self.grams = ConsumerGrams(analysis.model, self.consumers, feeds, ridge, clock, analysis.shapes) \
            if self.consumers else {}
        self.products: dict[str, np.ndarray] = {}
        self.working: set[str] = set()
        self.orders: dict[str, np.ndarray] = {}  # wide consumer -> its features, kept longest first
        self.factors: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}  # -> (L, Lᵀ W'), None: not SPD

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
                cholesky_in_place(lower)
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
        if left and self.consumers:  # else no Grams at all
            self.grams.release(left, keep=keys)
        for key in left:
            self.products.pop(key, None)
            self.factors.pop(key, None)
        self.working = keys

    def forget(self, keys) -> None:
        """``keys`` are refitted by no later point: their Grams (and kept inputs no other consumer reads) go."""
        keys = set(keys) & set(self.consumers)
        if keys:
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
