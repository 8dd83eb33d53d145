"""Vocabulary pruning: keep the embedding rows and LM-head columns of the tokens a deployment uses.

The model's interface stays: token ids are remapped inside the graph by a ``[V]`` Gather table (kept id -> its new
row, every other id -> the unknown token's row) in front of each embedding Gather, and the logits keep their
``[.., V]`` shape: the kept columns are scattered into a tensor filled with the dtype's lowest finite value. ``shrink_logits`` instead leaves the logits ``[.., K]``: column i is
kept token ``kept_tokens[i]``, written to the model's ``onnxprune.kept_tokens`` metadata.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..analysis.cost import total_macs
from ..analysis.vocab import LMHead, Vocabulary, find_vocabulary
from ..config import PruneConfig
from ..errors import InputDataError, UnsupportedError, UsageError
from ..graph import GraphIndex, count_params, opset_version
from ..shapes import refresh_value_info
from .manager import PassContext, PassResult

logger = logging.getLogger(__name__)

METADATA_KEY = "onnxprune.kept_tokens"
#: metadata keys naming the model's unknown-token id, the default ``unknown_token`` when present
UNKNOWN_KEYS = ("unk_token_id", "unknown_token_id")


def read_token_file(path: str | Path) -> np.ndarray:
    """Token ids from a text file (integers separated by whitespace, commas or newlines) or a ``.npy`` array."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{{keep_tokens}} {path}: not a regular file", options=("keep_tokens",), value=str(path))
    try:
        if path.suffix.lower() == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            text = path.read_text(encoding="utf-8")
            words = [w for w in re.split(r"[\s,]+", text) if w]
            bad = next((w for w in words if not re.fullmatch(r"[+-]?\d+", w)), None)
            if bad is not None:
                raise InputDataError(f"{{keep_tokens}} {path}: {bad[:40]!r} is not an integer token id",
                                     options=("keep_tokens",))
            values = np.array([int(w) for w in words], dtype=np.int64)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputDataError(f"{{keep_tokens}} {path}: cannot read token ids ({exc})", options=("keep_tokens",)) \
            from None
    if not np.issubdtype(values.dtype, np.integer):
        raise InputDataError(f"{{keep_tokens}} {path}: holds {values.dtype} values, not integer token ids",
                             options=("keep_tokens",))
    if values.size == 0:
        raise InputDataError(f"{{keep_tokens}} {path}: holds no token ids", options=("keep_tokens",))
    return values.reshape(-1).astype(np.int64)


def _check_range(ids: np.ndarray, size: int, where: str) -> None:
    """Every id must index the vocabulary (no negative ids in a keep list)."""
    bad = ids[(ids < 0) | (ids >= size)]
    if bad.size:
        raise InputDataError(f"{where}: token id {int(bad[0])} is outside the vocabulary [0, {size})",
                             options=("keep_tokens",))


def calibration_ids(vocab: Vocabulary, calibration: list[dict[str, np.ndarray]] | None) -> np.ndarray:
    """The ids that occur in the calibration data's inputs feeding the token embedding (negative ids wrapped)."""
    if not calibration:
        raise UsageError("{vocab_from_calibration} needs {calibration_data}",
                         options=("vocab_from_calibration", "calibration_data"))
    seen = [np.unique(batch[name]) for batch in calibration for name in vocab.inputs if name in batch]
    if not seen:
        raise InputDataError(f"calibration data holds none of the token inputs {vocab.inputs}")
    ids = np.unique(np.concatenate(seen)).astype(np.int64)
    ids = np.where(ids < 0, ids + vocab.size, ids)
    _check_range(ids, vocab.size, "calibration data")
    return np.unique(ids)


def _default_unknown(model: onnx.ModelProto, kept: np.ndarray, size: int) -> tuple[int, str]:
    """The model's own unknown-token id from its metadata, else the smallest kept id."""
    for prop in model.metadata_props:
        if prop.key.lower() in UNKNOWN_KEYS and re.fullmatch(r"\d+", prop.value.strip()):
            value = int(prop.value)
            if value < size:
                return value, f"metadata {prop.key}"
    return int(kept[0]), "the smallest kept id"


class VocabularyPass:
    """Remove the embedding rows and LM-head columns of the tokens not kept, keeping the model's interface."""

    name = "vocabulary"

    def __init__(self, config: PruneConfig):
        self.config = config

    def run(self, ctx: PassContext) -> PassResult:
        model, shapes = ctx.model, ctx.input_shapes
        before = {"macs_before": total_macs(model, shapes), "params_before": count_params(model)[0]}
        vocab = find_vocabulary(model)
        details: dict[str, Any] = {"kind": "vocabulary", **before, "vocabulary": vocab.to_dict()}
        if not vocab.found:
            logger.info("vocabulary: nothing pruned: %s", vocab.reason)
            return PassResult(False, {**details, "reason": vocab.reason, "macs_after": before["macs_before"],
                                      "params_after": before["params_before"]})
        kept, source = self._kept(vocab, ctx)
        unknown, unknown_from = self._unknown(model, vocab, kept)
        kept = np.union1d(kept, [unknown]).astype(np.int64)
        logger.info("vocabulary: keeping %d of %d tokens", kept.size, vocab.size)
        details.update(prune_vocabulary(model, vocab, kept, unknown, self.config.shrink_logits))
        details.update({"tokens_total": vocab.size, "tokens_kept": int(kept.size),
                        "tokens_removed": int(vocab.size - kept.size), "kept_from": source,
                        "unknown_token": unknown, "unknown_token_from": unknown_from,
                        "shrink_logits": self.config.shrink_logits,
                        "macs_after": total_macs(model, shapes), "params_after": count_params(model)[0]})
        return PassResult(True, details)

    def _kept(self, vocab: Vocabulary, ctx: PassContext) -> tuple[np.ndarray, str]:
        """The sorted ids to keep and where they came from (the keep file or the calibration data)."""
        if self.config.keep_tokens:
            ids = read_token_file(self.config.keep_tokens)
            _check_range(ids, vocab.size, f"{{keep_tokens}} {self.config.keep_tokens}")
            return np.unique(ids), str(self.config.keep_tokens)
        return calibration_ids(vocab, ctx.calibration), "calibration data"

    def _unknown(self, model: onnx.ModelProto, vocab: Vocabulary, kept: np.ndarray) -> tuple[int, str]:
        """The id that ids not kept are mapped to, and where it came from."""
        if self.config.unknown_token is None:
            return _default_unknown(model, kept, vocab.size)
        unknown = int(self.config.unknown_token)
        if not 0 <= unknown < vocab.size:
            raise UsageError(f"{{unknown_token}} {unknown} is outside the vocabulary [0, {vocab.size})",
                             options=("unknown_token",), value=unknown)
        return unknown, "given"


def prune_vocabulary(model: onnx.ModelProto, vocab: Vocabulary, kept: np.ndarray, unknown: int,
                     shrink: bool) -> dict[str, Any]:
    """Keep the rows/columns of ``kept`` (sorted ids, ``unknown`` among them); returns the report's details."""
    index = GraphIndex.build(model.graph)
    remap = np.full(vocab.size, int(np.searchsorted(kept, unknown)), dtype=np.int64)
    remap[kept] = np.arange(kept.size, dtype=np.int64)
    done: set[str] = set()
    for table in vocab.embeddings:
        _take(index, table.weight, kept, 0, done)
    _remap_ids(model, index, vocab, remap)
    heads = []
    for head in vocab.heads:
        _take(index, head.weight, kept, head.vocab_axis, done)
        if head.bias:
            _take(index, head.bias, kept, -1, done)
        entry = {"node": head.node, "weight": head.weight, "tied": head.tied, "logits": head.logits}
        if shrink:
            _shrink_output(model, head, kept.size)
            entry["logits_shape"] = "shrunk to the kept tokens"
        else:
            _scatter_logits(model, index, head, kept, vocab.size)
            entry["logits_shape"] = "kept (removed tokens' columns hold the dtype's lowest value)"
        heads.append(entry)
    if shrink and vocab.heads:
        _set_metadata(model, METADATA_KEY, json.dumps([int(i) for i in kept]))
    refresh_value_info(model)
    out: dict[str, Any] = {"tables": sorted({t.weight for t in vocab.embeddings}), "lm_heads": heads,
                           "weights_pruned": sorted(done)}
    if shrink and vocab.heads:
        out["warning"] = (f"--shrink-logits: the logits' last axis is now {kept.size} (was {vocab.size}); index i "
                          f"of it is token kept_tokens[i] (model metadata {METADATA_KEY!r})")
        out["kept_tokens"] = [int(i) for i in kept]
    return out


def _take(index: GraphIndex, name: str, kept: np.ndarray, axis: int, done: set[str]) -> None:
    """Keep the ``kept`` entries of weight ``name`` along ``axis`` (once per weight: tied tables are shared)."""
    if name in done:
        return
    weight = index.weights[name]
    weight.set_array(np.take(weight.array(), kept, axis=axis))
    done.add(name)


def _unique(model: onnx.ModelProto, base: str) -> str:
    """A tensor/node name not used in the model yet."""
    used = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.initializer} | {
        n.name for n in model.graph.node} | {i.name for i in model.graph.input}
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    return name


def _insert_before(model: onnx.ModelProto, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
    """Insert ``node`` just before ``anchor`` (topological order kept)."""
    nodes = list(model.graph.node)
    position = next(i for i, n in enumerate(nodes) if n is anchor)
    model.graph.node.insert(position, node)


def _remap_ids(model: onnx.ModelProto, index: GraphIndex, vocab: Vocabulary, remap: np.ndarray) -> None:
    """Put ``Gather(remap, ids)`` in front of every token-embedding Gather (one shared ``[V]`` table)."""
    table = _unique(model, "onnxprune/vocab_remap")
    model.graph.initializer.append(numpy_helper.from_array(remap, table))
    gathers = {g for t in vocab.embeddings for g in t.gathers}
    for node in [n for n in model.graph.node if n.name in gathers]:
        out = _unique(model, f"{node.name}/remapped_ids")
        remap_node = helper.make_node("Gather", [table, node.input[1]], [out], name=out, axis=0)
        _insert_before(model, node, remap_node)
        node.input[1] = out


def _scatter_logits(model: onnx.ModelProto, index: GraphIndex, head: LMHead, kept: np.ndarray, size: int) -> None:
    """``logits = ScatterElements(Expand(lowest, [.., V]), Expand(kept, [.., K]), kept_logits, axis=-1)``: the
    [.., V] shape is kept; the work is one fill of the output and K columns written (a Gather along the last axis
    would copy V elements one by one)."""
    if opset_version(model) < 11:
        raise UnsupportedError(f"keeping the logits' shape needs opset >= 11 (ScatterElements), the model has "
                               f"{opset_version(model)}: give {{shrink_logits}}", options=("shrink_logits",))
    producer = index.producer[head.logits]
    dtype = index.weights[head.weight].dtype
    base = "onnxprune/" + head.logits.replace("/", "_")
    name = {key: _unique(model, f"{base}_{key}") for key in (
        "kept", "shape", "lead", "full", "filled", "columns", "index", "zero", "last", "vocab", "filler")}
    producer.output[0] = name["kept"]
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array(np.finfo(dtype).min, dtype=dtype), name["filler"]),
        numpy_helper.from_array(kept.astype(np.int64), name["columns"]),
        numpy_helper.from_array(np.array([0], np.int64), name["zero"]),
        numpy_helper.from_array(np.array([-1], np.int64), name["last"]),
        numpy_helper.from_array(np.array([size], np.int64), name["vocab"])])
    nodes = [
        helper.make_node("Shape", [name["kept"]], [name["shape"]], name=name["shape"]),
        helper.make_node("Slice", [name["shape"], name["zero"], name["last"]], [name["lead"]], name=name["lead"]),
        helper.make_node("Concat", [name["lead"], name["vocab"]], [name["full"]], name=name["full"], axis=0),
        helper.make_node("Expand", [name["filler"], name["full"]], [name["filled"]], name=name["filled"]),
        helper.make_node("Expand", [name["columns"], name["shape"]], [name["index"]], name=name["index"]),
        helper.make_node("ScatterElements", [name["filled"], name["index"], name["kept"]], [head.logits],
                         name=_unique(model, f"{base}_scatter"), axis=-1)]
    position = next(i for i, n in enumerate(model.graph.node) if n is producer) + 1
    for node in reversed(nodes):
        model.graph.node.insert(position, node)


def _shrink_output(model: onnx.ModelProto, head: LMHead, count: int) -> None:
    """The graph output the logits reach declares ``count`` on its last axis."""
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if output.name == head.output and len(dims):
            dims[len(dims) - 1].Clear()
            dims[len(dims) - 1].dim_value = count


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def vocabulary_warnings(details: dict[str, Any]) -> list[str]:
    """The run's warnings from the vocabulary pass's details: nothing pruned, a shrunk output, filler columns."""
    if details.get("reason"):
        return [f"vocabulary pruning removed nothing: {details['reason']}"]
    warnings = [details["warning"]] if details.get("warning") else []
    if details.get("lm_heads") and not details.get("shrink_logits"):
        warnings.append(f"vocabulary: the logits of the {details['tokens_removed']} removed tokens hold the dtype's "
                        "lowest value; validation compares the kept tokens' columns")
    return warnings
