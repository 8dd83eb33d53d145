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
