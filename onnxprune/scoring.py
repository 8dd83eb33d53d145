"""Importance of removable channel units: L1/L2 magnitude over every coupled weight, BN scale, random."""

from __future__ import annotations

import numpy as np

from .analysis.groups import Analysis, ChannelGroup


def channel_scores(analysis: Analysis, criterion: str, energy: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Per channel id: summed |w| (l1) or w^2 (l2) of every producer and consumer slice, |gamma| (bn), or
    (activation) the energy each channel sends through its consumers: ||X_c||^2 * ||W[:, c]||^2."""
    acc = np.zeros(analysis.num_channels, dtype=np.float64)
    if criterion == "activation":
        for edit in analysis.edits:
            x = (energy or {}).get(edit.node.input[0])
            if edit.role != "consumer" or x is None or len(x) != len(edit.ids):
                continue
            values = np.moveaxis(edit.weight.array().astype(np.float32), edit.axis, 0).reshape(len(edit.ids), -1)
            np.add.at(acc, edit.ids, x * np.square(values).sum(axis=1))
        return acc
    for edit in analysis.edits:
        if criterion == "bn":
            gamma = analysis.index.resolve(edit.node.input[1])[0] if edit.node.op_type == "BatchNormalization" else None
            if gamma is None or gamma.tensor is not edit.weight.tensor:
                continue
        elif edit.role == "param":
            continue
        values = np.moveaxis(edit.weight.array().astype(np.float32), edit.axis, 0).reshape(len(edit.ids), -1)
        per = np.abs(values).sum(axis=1) if criterion in ("l1", "bn") else np.square(values).sum(axis=1)
        np.add.at(acc, edit.ids, per)
    return acc


def unit_scores(analysis: Analysis, groups: list[ChannelGroup], criterion: str, seed: int = 0,
                energy: dict[str, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Group id -> score of each prunable unit (same order as ``group.units``)."""
    rng = np.random.default_rng(seed)
    per_channel = channel_scores(analysis, criterion, energy) if criterion != "random" else None
    scores: dict[int, np.ndarray] = {}
    for group in groups:
        if criterion == "random":
            scores[group.id] = rng.random(len(group.units))
            continue
        values = np.array([per_channel[ids].sum() for ids in group.units], dtype=np.float64)
        scores[group.id] = np.sqrt(values) if criterion == "l2" else values
    return scores


# -- selection aware of the least-squares repair (--criterion reconstruction) ----------------------


def reconstruction_scores(analysis: Analysis, groups: list[ChannelGroup], feeds: list[dict[str, np.ndarray]],
                          ridge: float = 1e-3) -> dict[int, np.ndarray]:
    """Group id -> unit scores from greedy elimination that knows the consumers will be refitted.

    For each consumer layer of a group, its input features X on the calibration data give the Gram
    matrix H = XᵀX. Removing a unit (its block q of input features) and refitting the rest by least
    squares raises the consumer's output error by wᵀ (H⁻¹_qq)⁻¹ w (the optimal-brain-surgeon block
    formula, w the unit's current weight rows), summed over the group's consumers. Units are removed
    greedily, cheapest first, updating H⁻¹ and the refitted weights after each removal (He et al.'s
    channel selection for reconstruction, ThiNet's greedy order). A unit's score is the accumulated
    error when it went, so lower-scored units go first. Groups whose consumers cannot be refitted
    (grouped convs, batched MatMuls) keep L1 scores.
    """
    fallback = unit_scores(analysis, groups, "l1")
    consumers = _refit_consumers(analysis)
    if not consumers:
        return fallback
    grams = _consumer_grams(analysis.model, consumers, feeds, ridge)
    scores: dict[int, np.ndarray] = {}
    for group in groups:
        scores[group.id] = _greedy_order(group, consumers, grams) if group.units else fallback[group.id]
        if scores[group.id] is None:
            scores[group.id] = fallback[group.id]
    return scores


def _refit_consumers(analysis: Analysis) -> dict[str, tuple]:
    """Consumer node name -> (node, edit, weight matrix [features, outputs], channel id per feature)."""
    from .compensation import _reconstructable

    found = {}
    for edit in analysis.edits:
        node = edit.node
        if edit.role != "consumer" or not _reconstructable(node) or node.input[0] not in analysis.ann:
            continue
        w = edit.weight.array().astype(np.float64)
        _, chain = analysis.index.resolve(node.input[1])
        if chain:
            continue
        if node.op_type == "Conv" and edit.axis == 1 and w.ndim == 4:
            k = w.shape[2] * w.shape[3]
            matrix, feature_ids = w.reshape(w.shape[0], -1).T, np.repeat(edit.ids, k)
        elif node.op_type == "Gemm" and w.ndim == 2:
            matrix = w.T if edit.axis == 1 else w  # transB: B is [N, K]
            feature_ids = edit.ids
        elif node.op_type == "MatMul" and w.ndim == 2 and edit.axis == 0:
            matrix, feature_ids = w, edit.ids
        else:
            continue
        found[node.name or node.output[0]] = (node, edit, matrix, np.asarray(feature_ids))
    return found


def _consumer_grams(model, consumers: dict[str, tuple], feeds: list[dict[str, np.ndarray]],
                    ridge: float) -> dict[str, np.ndarray]:
    """XᵀX of each consumer's input features on ``feeds`` (+ ridge), in bounded memory."""
    from .calibration import session_with_outputs
    from .compensation import _im2col

    names = sorted({node.input[0] for node, *_ in consumers.values()})
    session = session_with_outputs(model, names)
    grams: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = dict(zip(names, session.run(names, feed)))
        for key, (node, _, matrix, _) in consumers.items():
            x = values[node.input[0]].astype(np.float64)
            if node.op_type == "Conv":
                rows = _im2col(x, node, _kernel(node, matrix.shape[0], x.shape[1]))
            else:
                rows = x.reshape(-1, x.shape[-1])
            if rows.shape[1] != matrix.shape[0]:
                continue
            grams[key] = grams.get(key, 0) + rows.T @ rows
    for key, gram in grams.items():
        gram += (ridge * float(np.trace(gram)) / gram.shape[0] + 1e-12) * np.eye(gram.shape[0])
    return grams


def _kernel(node, features: int, channels: int) -> tuple[int, int]:
    from .model import get_attr

    shape = get_attr(node, "kernel_shape")
    if shape:
        return int(shape[0]), int(shape[1])
    side = round(float(np.sqrt(features // channels)))
    return side, side


def _greedy_order(group: ChannelGroup, consumers: dict[str, tuple], grams: dict[str, np.ndarray]) -> np.ndarray | None:
    """Greedy OBS elimination over the group's units: each step removes the unit whose block costs least,
    summed over the consumers, then downdates each consumer's inverse Gram and refitted weights."""
    unit_of = {}
    for u, ids in enumerate(group.units):
        for i in np.asarray(ids).tolist():
            unit_of[int(i)] = u
    states = []
    for key, (_, _, matrix, feature_ids) in consumers.items():
        if key not in grams:
            continue
        units = np.array([unit_of.get(int(i), -1) for i in feature_ids])
        if not (units >= 0).any():
            continue
        try:
            inverse = np.linalg.inv(grams[key])
        except np.linalg.LinAlgError:
            return None
        states.append(_State(inverse, matrix.copy(), units))
    if not states:
        return None
    n = len(group.units)
    alive = np.ones(n, dtype=bool)
    scores = np.zeros(n)
    total = 0.0
    for step in range(n):
        cost = np.zeros(n)
        for state in states:
            state.add_costs(cost)
        cost[~alive] = np.inf
        u = int(np.argmin(cost))
        total += max(float(cost[u]), 0.0)
        scores[u] = total + 1e-12 * step
        alive[u] = False
        for state in states:
            state.remove(u)
    return scores


class _State:
    """One consumer's inverse Gram ``P`` and refitted weights ``W`` over its surviving input features.

    Removed features are dropped from ``P`` and ``W`` (compacted) instead of zeroed, so each step costs
    O(D_alive² · |block|); units with blocks of equal size are costed in one batched solve."""

    def __init__(self, inverse: np.ndarray, weights: np.ndarray, units: np.ndarray):
        self.P, self.W, self.units = inverse, weights, units

    def add_costs(self, cost: np.ndarray) -> None:
        """cost[u] += wᵀ (P_qq)⁻¹ w for every surviving unit u of this consumer (its block q of features)."""
        for unit_ids, index in self._blocks():
            w = self.W[index]  # [units, k, outputs]
            block = self.P[index[:, :, None], index[:, None, :]]  # [units, k, k]
            try:
                solved = np.linalg.solve(block, w)
            except np.linalg.LinAlgError:
                cost[unit_ids] += [_removal_cost(self.P, self.W, q) for q in index]
                continue
            cost[unit_ids] += np.einsum("ukj,ukj->u", w, solved)

    def _blocks(self):
        units = self.units
        present = units >= 0
        order = np.argsort(units, kind="stable")
        order = order[present[order]]
        ids, starts, sizes = np.unique(units[order], return_index=True, return_counts=True)
        for size in np.unique(sizes):
            chosen = np.flatnonzero(sizes == size)
            index = order[starts[chosen][:, None] + np.arange(size)[None, :]]
            yield ids[chosen], index

    def remove(self, unit: int) -> None:
        """Drop the unit's features (see :func:`_remove_block`)."""
        q = np.flatnonzero(self.units == unit)
        if q.size:
            _remove_block(self, q)


def _removal_cost(P: np.ndarray, W: np.ndarray, q: np.ndarray) -> float:
    w = W[q]
    block = P[np.ix_(q, q)]
    try:
        return float(np.sum(w * np.linalg.solve(block, w)))
    except np.linalg.LinAlgError:
        return float("inf")


def _remove_block(state: _State, q: np.ndarray) -> None:
    """Drop features ``q``: refit the remaining weights and downdate the inverse Gram (block OBS update),
    P ← P_rr − P_rq P_qq⁻¹ P_qr and W ← W_r − P_rq P_qq⁻¹ W_q over the remaining features r."""
    P, W = state.P, state.W
    block = P[np.ix_(q, q)]
    try:
        inv = np.linalg.inv(block)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(block)
    rest = np.setdiff1d(np.arange(len(P)), q, assume_unique=True)
    column = P[np.ix_(rest, q)] @ inv
    state.W = W[rest] - column @ W[q]
    state.P = P[np.ix_(rest, rest)] - column @ P[np.ix_(q, rest)]
    state.units = state.units[rest]
