"""Unstructured magnitude pruning: zero individual weights, per layer, globally or N:M.

Modes:
- ``sparsity``: zero the given fraction of each tensor's weights (``scope="layer"``) or of
  all prunable weights by one ranking (``scope="global"``, each tensor capped at
  ``max_layer_sparsity`` so no layer is emptied);
- ``threshold``: zero every weight with ``|w| <= T``;
- ``pattern`` N:M: zero the N smallest of every M consecutive weights along the layer's
  reduction (input) axis, the layout sparse tensor cores accelerate.

For single weights, ``l1`` (|w|) and ``l2`` (w^2) give the same order; ``random`` is a
seeded baseline. Weights that are already zero count toward the target.

Recurrent W/R (LSTM/GRU/RNN) rank per layer within each (direction, gate) block, like the
row blocks of separate layers, so no gate of one direction is emptied for another's sake;
global scope ranks them with every other weight. N:M runs along their input (last) axis.

"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx

from ..analysis.cost import infer_shapes
from ..analysis.weights import PrunableWeight, Selection, find_prunable_weights, select_weights, tied_copies
from ..calibration import channel_energy
from ..config import PruneConfig
from ..graph import get_attr
from ..obs import ObsRepair
from ..recipe import find_override, wants
from .manager import PassContext, PassResult, ReconstructionRequest

logger = logging.getLogger(__name__)


def zero_smallest(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` smallest entries of flat ``scores`` (ties broken by position)."""
    n = scores.size
    mask = np.zeros(n, dtype=bool)
    if k <= 0:
        return mask
    if k >= n:
        mask[:] = True
        return mask
    kth = np.partition(scores, k - 1)[k - 1]
    np.less(scores, kth, out=mask)
    missing = k - int(mask.sum())
    if missing > 0:
        ties = np.flatnonzero(scores == kth)[:missing]
        mask[ties] = True
    return mask


def wanda_scores(values: np.ndarray, axis: int, norms: np.ndarray) -> np.ndarray:
    """|W| times the input-channel norm along the reduction axis (Wanda)."""
    shape = [1] * values.ndim
    shape[axis] = -1
    return np.abs(values.astype(np.float32)) * norms.astype(np.float32).reshape(shape)


def per_row_mask(scores: np.ndarray, reduction_axis: int, sparsity: float) -> np.ndarray:
    """Zero ``sparsity`` of each output row's weights, ranked within the row."""
    output_axis = 1 if reduction_axis == 0 else 0
    rows = np.moveaxis(scores, output_axis, 0).reshape(scores.shape[output_axis], -1)
    k = min(round(sparsity * rows.shape[1]), rows.shape[1] - 1)
    mask = np.zeros(rows.shape, dtype=bool)
    if k > 0:
        order = np.argpartition(rows, k - 1, axis=1)[:, :k]
        np.put_along_axis(mask, order, True, axis=1)
    moved_shape = list(np.moveaxis(scores, output_axis, 0).shape)
    return np.moveaxis(mask.reshape(moved_shape), 0, output_axis)


def per_block_mask(scores: np.ndarray, block_rows: int, k_of: Callable[[int], int]) -> np.ndarray:
    """Zero ``k_of(block size)`` smallest scores in each block of ``block_rows`` rows of a [D, rows, I] weight."""
    blocks = scores.reshape(-1, block_rows * scores.shape[-1])
    mask = np.zeros(blocks.shape, dtype=bool)
    for b in range(blocks.shape[0]):
        mask[b] = zero_smallest(blocks[b], k_of(blocks.shape[1]))
    return mask.reshape(scores.shape)


def nm_mask(values: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Mask zeroing the ``n`` smallest |values| of every ``m`` consecutive entries along ``axis``."""
    moved = np.moveaxis(np.abs(values.astype(np.float32)), axis, -1)
    blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    order = np.argsort(blocks, axis=-1, kind="stable")
    block_mask = np.zeros(blocks.shape, dtype=bool)
    np.put_along_axis(block_mask, order[..., :n], True, axis=-1)
    return np.moveaxis(block_mask.reshape(moved.shape), -1, axis)


class MagnitudePrunePass:
    """Zero weights by magnitude (or at random), per layer, globally, by threshold or N:M."""

    name = "unstructured"

    def __init__(self, config: PruneConfig):
        self.config = config

    # -- scoring -----------------------------------------------------------------------

    def _scores(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        flat = values.reshape(-1).astype(np.float32, copy=False)
        if self.config.criterion == "random":
            scores = rng.random(flat.size, dtype=np.float32)
            scores[flat == 0] = -1.0  # existing zeros stay zeros and count first
            return scores
        return np.square(flat) if self.config.criterion == "l2" else np.abs(flat)

    def _activation_norms(self, ctx: PassContext, items: list[PrunableWeight]) -> dict[str, np.ndarray]:
        """||X_j||_2 of each weight's input channels on the calibration data (Wanda)."""
        feeds = ctx.calibration
        self.config.require_calibration(bool(feeds), ("activation",))
        wanted: dict[str, tuple[str, int]] = {}
        for item in items:
            use = item.uses[0]
            if use.slot != 1 or item.reduction_axis is None or len(item.uses) > 1:
                continue  # shared weights and weights read as A keep magnitude scores
            rank = len(item.weight.shape)
            axis = {"conv": 1, "gemm": 0 if get_attr(use.node, "transA", 0) else 1}.get(use.role)
            if use.role in ("matmul", "recurrent"):  # X of a recurrent op is [seq, batch, inputs]
                axis = -1
            if axis is not None:
                wanted[item.name] = (use.node.input[0], axis if axis >= 0 else -1)
            del rank
        logger.info(f"measuring input activations of {len(wanted)} layers on calibration data")
        energy = channel_energy(ctx.model, feeds, {name: axis for name, axis in wanted.values() if axis >= 0})
        last = {name for name, axis in wanted.values() if axis < 0}
        if last:
            shapes = infer_shapes(ctx.model, ctx.input_shapes or None)
            energy.update(channel_energy(ctx.model, feeds, {n: len(shapes[n]) - 1 for n in last if shapes.get(n)}))
        sizes = {item.name: item.weight.shape[item.reduction_axis] for item in items if item.name in wanted}
        return {item: np.sqrt(energy[name]) for item, (name, _) in wanted.items()
                if name in energy and len(energy[name]) == sizes[item]}  # grouped convs keep magnitude

    # -- allocation --------------------------------------------------------------------

    def _global_counts(self, items: list[PrunableWeight], rng: np.random.Generator, ctx: PassContext) -> list[int]:
        """How many weights each tensor loses under one global ranking, with a per-tensor cap."""
        sizes = [item.weight.size for item in items]
        caps = [int(np.floor(self.config.max_layer_sparsity * s)) for s in sizes]
        target = round(self.config.sparsity * sum(sizes))
        target = min(target, sum(caps))
        scores = [self._scores(item.weight.array(), rng) for item in ctx.iterate(items, "scoring", len(items))]
        capped: set[int] = set()
        while True:
            free = [i for i in range(len(items)) if i not in capped]
            budget = target - sum(caps[i] for i in capped)
            if not free or budget <= 0:
                counts = [caps[i] if i in capped else 0 for i in range(len(items))]
                break
            pool = np.concatenate([scores[i] for i in free])
            kth = np.partition(pool, min(budget, pool.size) - 1)[min(budget, pool.size) - 1]
            del pool
            below = {i: int(np.count_nonzero(scores[i] < kth)) for i in free}
            ties = {i: int(np.count_nonzero(scores[i] == kth)) for i in free}
            new_caps = {i for i in free if below[i] > caps[i]}
            if new_caps:
                capped |= new_caps
                continue
            counts = [caps[i] if i in capped else below[i] for i in range(len(items))]
            missing = budget - sum(below.values())
            for i in free:  # hand out the weights tied at the threshold, in order, within caps
                if missing <= 0:
                    break
                take = min(ties[i], caps[i] - counts[i], missing)
                counts[i] += take
                missing -= take
            break
        return counts

    # -- the pass ----------------------------------------------------------------------

    def run(self, ctx: PassContext) -> PassResult:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        prunable = find_prunable_weights(ctx.model)
        tied = tied_copies(prunable)
        selection = select_weights(
            prunable,
            exclude=cfg.exclude,
            min_params=cfg.min_params,
            prune_first=cfg.prune_first,
            prune_last=cfg.prune_last,
            include_embeddings=cfg.include_embeddings,
        )
        selection, followers = _tie_copies(selection, tied)
        skipped = [{"weight": item.name, "layers": item.node_names(), "reason": why} for item, why in selection.skipped]
        items, settings = [], {}
        for item in selection.selected:
            names = [item.name, *item.node_names()]
            override = find_override(cfg, names) or {}
            if not wants(cfg, names, "unstructured"):
                continue  # the structured pass handles it
            if override.get("exclude"):
                skipped.append({"weight": item.name, "layers": item.node_names(),
                                "reason": f"excluded by recipe override {override['match']!r}"})
            else:
                items.append(item)
                settings[item.name] = override
        norms = self._activation_norms(ctx, items) if cfg.criterion == "activation" else {}
        nm = cfg.nm()
        if nm is not None or any("pattern" in s for s in settings.values()):
            kept = []
            for item in items:
                item_nm = PruneConfig(pattern=settings[item.name]["pattern"]).nm() if "pattern" in settings[item.name] else nm
                if item_nm is None:
                    kept.append(item)
                    continue
                axis = item.reduction_axis
                if axis is None:
                    skipped.append({"weight": item.name, "layers": item.node_names(),
                                    "reason": "no single reduction axis (shared by layers reading it differently, or an embedding)"})
                elif item.weight.shape[axis] % item_nm[1]:
                    skipped.append({"weight": item.name, "layers": item.node_names(),
                                    "reason": f"reduction axis {axis} has {item.weight.shape[axis]} entries, "
                                              f"not divisible by M={item_nm[1]}"})
                else:
                    kept.append(item)
            items = kept
        counts: dict[str, int] = {}
        pooled = [i for i in items if "sparsity" not in settings[i.name] and "pattern" not in settings[i.name]]
        if cfg.sparsity is not None and cfg.scope == "global" and nm is None and pooled:
            counts = dict(zip([i.name for i in pooled], self._global_counts(pooled, rng, ctx)))
        original = None
        if cfg.reconstruct and not cfg.structured:
            cfg.require_calibration(bool(ctx.calibration), ("reconstruct",))
            original = onnx.ModelProto()
            original.CopyFrom(ctx.model)
        obs = cfg.criterion == "obs" or (original is not None and cfg.repair != "rowwise")
        repair = _obs_repair(ctx, items, followers, original) if obs else None
        tensors = []
        total = zeros_total = 0
        for item in ctx.iterate(items, "pruning", len(items)):
            values = item.weight.array()
            zeros_before = int(values.size - np.count_nonzero(values))
            override = settings[item.name]
            item_nm = PruneConfig(pattern=override["pattern"]).nm() if "pattern" in override else (
                nm if "sparsity" not in override else None)
            wanda = norms.get(item.name)
            blocks = item.gate_blocks if cfg.scope == "layer" or item.name not in counts else 0
            if item_nm is not None:
                source = rng.random(values.shape, dtype=np.float32) if cfg.criterion == "random" else values
                if wanda is not None:
                    source = wanda_scores(values, item.reduction_axis, wanda)
                mask = nm_mask(source, item.reduction_axis, *item_nm)
            elif cfg.threshold is not None and "sparsity" not in override:
                mask = (np.abs(values.astype(np.float32)) <= cfg.threshold).reshape(values.shape)
            else:
                target = override.get("sparsity", cfg.sparsity) or 0.0
                k = counts[item.name] if item.name in counts else round(target * values.size)
                k = min(k, values.size - 1)  # rounding never empties a tensor
                if wanda is not None and item.gate_blocks:  # each row of each gate block is one output unit
                    scores = wanda_scores(values, item.reduction_axis, wanda)
                    mask = per_row_mask(scores.reshape(-1, values.shape[-1]), 1, target).reshape(values.shape)
                elif wanda is not None:
                    mask = per_row_mask(wanda_scores(values, item.reduction_axis, wanda), item.reduction_axis, target)
                elif blocks:
                    scores = self._scores(values, rng).reshape(values.shape)
                    mask = per_block_mask(scores, blocks, lambda n, t=target: min(round(t * n), n - 1))
                else:
                    mask = zero_smallest(self._scores(values, rng), k).reshape(values.shape)
            if repair is not None and repair.covers(item):  # OBS, or the row-wise refit of this mask if better
                mask = repair.prune(item, values, None if item_nm else int(mask.sum()), item_nm, baseline=mask)
            for target, target_mask, tied_to in [(item, mask, None)] + [
                    (copy, mask.T if transposed else mask, item.name) for copy, transposed in followers.get(item.name, [])]:
                if target is not item:
                    values = target.weight.array()
                    zeros_before = int(values.size - np.count_nonzero(values))
                values[target_mask] = 0
                zeros_after = int(values.size - np.count_nonzero(values))
                target.weight.set_array(values)
                total += values.size
                zeros_total += zeros_after
                tensors.append({
                    **_scoring_note(target, cfg.criterion, target.name in norms),
                    "weight": target.name,
                    "kind": target.weight.kind,
                    **({"sources": [source.name for source in target.weight.sources]}
                       if target.weight.kind == "sliced" else {}),
                    "layers": target.node_names(),
                    "ops": sorted({u.node.op_type for u in target.uses}),
                    "shape": list(target.weight.shape),
                    "params": int(values.size),
                    "zeros_before": zeros_before,
                    "zeros_after": zeros_after,
                    "sparsity": zeros_after / values.size if values.size else 0.0,
                    **({"tied_to": tied_to} if tied_to else {}),
                })
        layers = [item.uses[0].node for item in items if len(item.uses) == 1 and item.uses[0].slot == 1
                  and item.uses[0].role != "recurrent" and item.weight.kind != "sliced"
                  and not (repair is not None and repair.covers(item))] if original is not None else []
        modified = any(t["zeros_after"] != t["zeros_before"] for t in tensors)
        details = {
            "reconstruction": None,  # what OBS does not cover keeps the row-wise refit: the reconstruction pass
            **({"obs": repair.report()} if repair is not None else {}),
            "mode": "nm" if nm else ("threshold" if cfg.threshold is not None else "sparsity"),
            "criterion": cfg.criterion,
            "scope": cfg.scope,
            "target_sparsity": (nm[0] / nm[1]) if nm else cfg.sparsity,
            "threshold": cfg.threshold,
            "pattern": cfg.pattern,
            "prunable_params": total,
            "zeros": zeros_total,
            "achieved_sparsity": zeros_total / total if total else 0.0,
            "tensors": tensors,
            "skipped": skipped,
        }
        if layers:
            ctx.reconstruction = ReconstructionRequest("unstructured", original, layers, details)
        return PassResult(modified, details)


def _scoring_note(item: PrunableWeight, criterion: str, measured: bool) -> dict[str, str]:
    """Why a weight kept magnitude scores under ``--criterion activation`` (recurrent R, shared weights)."""
    if criterion != "activation" or measured:
        return {}
    if item.uses[0].role == "recurrent" and item.uses[0].slot == 2:
        why = "ranked by magnitude: R reads the hidden state inside the recurrent op, which no activation shows"
    else:
        why = "ranked by magnitude: its input activation could not be measured per input channel"
    return {"note": why}


def _obs_repair(ctx: PassContext, items: list[PrunableWeight], followers: dict[str, list],
                original: onnx.ModelProto | None = None):
    """The SparseGPT repair (onnxprune/obs.py) over ``items``; weights with tied copies keep the criterion's mask."""
    PruneConfig(criterion="obs").require_calibration(bool(ctx.calibration), ("obs",))
    tied = {name: "tied to an embedding copy that must stay equal to it" for name in followers}
    if original is None:
        original = onnx.ModelProto()
        original.CopyFrom(ctx.model)
    return ObsRepair(ctx.model, items, ctx.calibration, reference=original, exclude=tied)


def _tie_copies(selection: Selection, tied: dict[str, tuple[PrunableWeight, bool]]
                ) -> tuple[Selection, dict[str, list[tuple[PrunableWeight, bool]]]]:
    """Tied embedding copies follow their layer weight's mask; with embeddings left out, both stay.

    Returns the adjusted selection and, per layer weight, the copies that take its mask.
    """
    selected = {item.name: item for item in selection.selected}
    followers: dict[str, list[tuple[PrunableWeight, bool]]] = {}
    skipped = list(selection.skipped)
    for embedding, (layer, transposed) in tied.items():
        if layer.name not in selected:
            continue
        copy = selected.pop(embedding, None)
        if copy is None:  # the embedding is left alone: its tied copy too
            why = (f"tied to the embedding {embedding!r} (stored as a second copy), which is left alone; "
                   "--include-embeddings prunes both alike")
            skipped.append((selected.pop(layer.name), why))
            continue
        followers.setdefault(layer.name, []).append((copy, transposed))
    kept = [item for item in selection.selected if item.name in selected]
    return Selection(kept, skipped), followers
