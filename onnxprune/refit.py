"""Least-squares reconstruction after pruning (``--reconstruct``): structured refits layer by layer in waves,
row-wise refits that keep an unstructured sparsity pattern."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .activation_stream import ActivationStream, KeptBudget
from .calibration import StageClock
from .gram import GRAM_MIN_ROWS, GRAM_ROWS_PER_FEATURE, GramSum, RowSampler, _im2col, _patches, _reconstructable
from .graph import GraphIndex, get_attr
from .model import copy_fields
from .sessions import FED_TYPES, array_owner, model_header, session_with_outputs, shared_weights
from .shapes import header_only


def reconstruct(original: onnx.ModelProto, pruned: onnx.ModelProto, layers: list[tuple[str, np.ndarray]],
                feeds: list[dict[str, np.ndarray]], ridge: float = 1e-3, budget: int | KeptBudget = 1 << 30,
                clock: StageClock | None = None, original_weights: dict[str, np.ndarray] | None = None,
                samples: int = 0, pruned_weights: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Refit each layer's kept weights (and bias) so its output on ``feeds`` matches the original's.

    ``layers`` are (output tensor name, mask of the original output channels still present),
    in topological order; each is solved with ridge-regularised normal equations on the
    pruned model's own inputs to that layer (earlier refits already applied). Layers are refitted in
    waves: a wave holds every layer whose upstream refits are all done, so one pass over ``feeds`` serves the whole
    wave. Both models are streamed (:class:`~onnxprune.activation_stream.ActivationStream`): each node runs once per feed,
    the tensors later waves read are kept between waves and the refitted weights are session inputs of the pruned
    model. ``budget`` bounds the kept tensors: bytes per stream, or a :class:`~onnxprune.activation_stream.KeptBudget`
    both streams share (with no limit of its own it allows the largest layer input of the original model over
    ``feeds``, or a larger tensor the streams compute); a feed whose tensors do not fit is recomputed from the
    tensors it last kept (the same values). Under a :class:`~onnxprune.activation_stream.KeptBudget` the original's
    outputs of consecutive waves of Convs are gathered ahead in one step of its stream (:func:`_gather_ahead`: only
    the sampled rows the refit reads, within the budget), so the original's feeds that do not fit recompute once per
    window of waves, not once per wave. ``clock`` times capture, Gram products and solves.
    ``original_weights``, ``pruned_weights``: the values of the initializers ``original`` and ``pruned`` only declare
    (:func:`detach_weights`; ``pruned`` declares none of the layers' weights and biases, :func:`refit_weight_names`).
    ``samples`` > 0: both streams run a feed ``samples`` samples at a time where the models compute every sample on
    its own (the same values, less memory per run).
    """
    clock = clock or StageClock()

    nodes = {out: node for node in pruned.graph.node for out in node.output}
    index = GraphIndex.build(pruned.graph)
    chosen, skipped = [], []
    for name, out_mask in layers:
        node = nodes.get(name)
        weight, chain = index.resolve(node.input[1]) if node is not None and len(node.input) > 1 else (None, [])
        if node is None or not _reconstructable(node) or weight is None or chain:
            skipped.append(name)
        else:
            chosen.append((name, out_mask, node, _ensure_bias(pruned, index, node, weight)))
    index = GraphIndex.build(pruned.graph)  # with the biases just added
    plan = [_Refit(name, out_mask, node, index.resolve(node.input[1])[0], index, added)
            for name, out_mask, node, added in chosen]
    if isinstance(budget, KeptBudget) and budget.limit is None:  # only a derived budget reads the widths
        before = {node.output[0]: node for node in original.graph.node if node.output}
        original_index = GraphIndex.build(original.graph)
        for item in plan:  # the original layer's input is wider by the share of its input channels pruning removed
            node = before.get(item.name)
            weight = original_index.resolve(node.input[1])[0] if node is not None and len(node.input) > 1 else None
            item.widen = _features(node, weight.shape) / max(item.features, 1) if weight is not None else 1.0
    live = {}
    for item in plan:
        live[item.weight.name] = item.weight.array()
        if item.bias is not None:
            live[item.bias.name] = item.bias.array()
    done = []
    # the weights pruning left unchanged, held once for both streams (name -> raw bytes, the array over them)
    shared = shared_weights(original_weights)
    reference = ActivationStream(original, feeds, budget, shared, original_weights, samples)
    current = ActivationStream(pruned, feeds, budget, shared, dict(pruned_weights or {}), samples)
    ahead = isinstance(budget, KeptBudget) and any(item.node.op_type == "Conv" for item in plan)
    sizes = _spatial_sizes(original) if ahead else {}
    for item in plan:
        item.picks = _Picks(RowSampler(item.features, len(feeds)))
        item.positions = sum(reference.counts) * sizes[item.name] if item.name in sizes else None
    waves = _waves(pruned, plan)
    for position, wave in enumerate(waves):
        if ahead and any(item.targets is None for item in wave):
            _gather_ahead(_window(waves[position:], budget, reference), reference, clock)
        _refit_wave(wave, reference, current, live, ridge, clock)
        for item in wave:
            if item.solution is None:
                skipped.append(item.name)
                continue
            _write_solution(pruned, index, item.node, item.weight, item.solution)
            live[item.weight.name] = item.weight.array()
            if item.bias is not None:
                live[item.bias.name] = item.bias.array()
            done.append(item.name)
        # the wave's layers run now with their final weights when their outputs are less to keep than their inputs
        current.advance([item.name for item in wave], live, clock)
        for name in reference.release_weights() & current.release_weights():  # neither stream reads them again
            shared.pop(name, None)
    for item in plan:
        if item.solution is None and item.added is not None:
            _drop_added_bias(pruned, item.node, item.added)
    return {"layers": len(done), "skipped": skipped, "samples": int(sum(next(iter(f.values())).shape[0] for f in feeds))}


def detach_weights(model: onnx.ModelProto, keep: set[str] = frozenset(),
                   shared: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` with its large float initializers (but those named in ``keep``) declared only (every field but their
    data) and their values, each a read-only array over one copy of the tensor's bytes, or the array of ``shared``
    of that name when it holds the same bytes (the pruned model's weights that pruning left unchanged are the
    original's arrays). upb frees a model's bytes only with the whole model: once the caller drops ``model``, the
    weights are held once, as the arrays the refit's sessions are fed from; :func:`attach_weights` puts them back."""
    header, weights = model_header(model), {}
    for tensor in model.graph.initializer:
        if (tensor.name in keep or tensor.data_type not in FED_TYPES or not tensor.HasField("raw_data")
                or not np.dtype("<f4").isnative or int(np.prod(tensor.dims, dtype=np.int64)) <= 256):
            header.graph.initializer.add().CopyFrom(tensor)
            continue
        raw, hit = tensor.raw_data, (shared or {}).get(tensor.name)
        if hit is not None and hit.shape == tuple(tensor.dims) and array_owner(hit) == raw:
            weights[tensor.name] = hit
        else:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            weights[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
        del raw
        copy_fields(tensor, header.graph.initializer.add(), skip=("raw_data",))
    return header, weights


def attach_weights(header: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The model :func:`detach_weights` took apart, in a new protobuf arena: ``header``'s initializers in their order,
    those it declares with the data of ``weights`` (the same message, byte for byte, as before detaching)."""
    model = model_header(header)
    for tensor in header.graph.initializer:
        added = model.graph.initializer.add()
        added.CopyFrom(tensor)
        if tensor.name in weights and not tensor.HasField("raw_data"):
            array = weights[tensor.name]
            whole = array_owner(array)
            added.raw_data = whole if isinstance(whole, bytes) and len(whole) == array.nbytes else array.tobytes()
    return model


def refit_weight_names(model: onnx.ModelProto, layers: list[tuple[str, np.ndarray]]) -> set[str]:
    """The initializers :func:`reconstruct` reads or writes in ``model`` as weights and biases of ``layers``."""
    index = GraphIndex.build(model.graph)
    names = set()
    for name, _ in layers:
        node = index.producer.get(name)
        for tensor in (node.input[1:] if node is not None else []):
            weight = index.resolve(tensor)[0] if tensor else None
            if weight is not None:
                names.add(weight.name)
    return names


class _Refit:
    """One layer to refit: its node, weight and bias (None for MatMul) and, once solved, the solution."""

    def __init__(self, name: str, out_mask: np.ndarray, node: onnx.NodeProto, weight, index: GraphIndex,
                 added: tuple[str, str] | None):
        self.name, self.out_mask, self.node, self.weight, self.added = name, out_mask, node, weight, added
        self.bias = index.resolve(node.input[2])[0] if node.op_type != "MatMul" else None
        self.solution: np.ndarray | None = None
        self.features = _features(node, weight.shape)
        self.widen = 1.0  # the original layer's input features per feature here
        self.picks: _Picks | None = None  # the rows sampled of each feed (set by reconstruct)
        #: per feed, the original output at the sampled rows, the kept channels, gathered ahead (see _gather_ahead)
        self.targets: list[np.ndarray | None] | None = None
        self.positions: int | None = None  # output positions over the calibration data, where shapes tell them

    def target_bytes(self, feeds: int) -> int:
        """The most bytes :attr:`targets` can hold: the sampler's rows (one more per feed for rounding), or every
        output position where :attr:`positions` says they are fewer, of float32."""
        rows = max(GRAM_MIN_ROWS, GRAM_ROWS_PER_FEATURE * self.features) + feeds
        if self.positions is not None:
            rows = min(rows, self.positions)
        return rows * int(np.count_nonzero(self.out_mask)) * 4


class _Picks:
    """One layer's :class:`~onnxprune.gram.RowSampler` with its draws kept per feed: the original's output gathered
    ahead (:func:`_gather_ahead`) and the pruned model's inputs later take the same rows, drawn once per feed in feed
    order as a single pass would draw them."""

    def __init__(self, sampler: RowSampler):
        self.sampler, self.drawn = sampler, {}

    def draw(self, number: int, rows: int) -> np.ndarray | None:
        """Feed ``number``'s sorted rows out of ``rows`` (None: all)."""
        if number not in self.drawn:
            self.drawn[number] = self.sampler.pick(rows)
        return self.drawn[number]

    def feed(self, number: int) -> SimpleNamespace:
        """The sampler feed ``number``'s rows are taken with (:func:`~onnxprune.gram._patches` calls ``pick``)."""
        return SimpleNamespace(pick=partial(self.draw, number))


def _features(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    """Input features of a Conv (channels x kernel), Gemm or MatMul with a weight of ``shape``."""
    return int(np.prod(shape[1:])) if node.op_type == "Conv" else int(
        shape[-1] if node.op_type == "Gemm" and get_attr(node, "transB", 0) else shape[0])


def _ensure_bias(model: onnx.ModelProto, index: GraphIndex, node: onnx.NodeProto, weight) -> tuple[str, str] | None:
    """Give a Conv/Gemm its own bias initializer of the output width when it has none (zeros) or one of another
    size (broadcast), as the refit would; returns (new name, previous input) so a layer left unsolved gets its
    previous bias back, None when nothing was added."""
    if node.op_type == "MatMul":
        return None
    width = weight.shape[0] if node.op_type == "Conv" or get_attr(node, "transB", 0) else weight.shape[-1]
    previous = node.input[2] if len(node.input) > 2 else ""
    existing = index.resolve(previous)[0] if previous else None
    if existing is not None and existing.size == width:
        return None
    value = np.zeros(width, dtype=weight.dtype)
    if existing is not None:
        value = np.broadcast_to(existing.array().reshape(-1), (width,)).astype(weight.dtype)
    name = f"{node.name or node.output[0]}.reconstructed_bias"
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    return name, previous


def _drop_added_bias(model: onnx.ModelProto, node: onnx.NodeProto, added: tuple[str, str]) -> None:
    name, previous = added
    if previous:
        node.input[2] = previous
    else:
        del node.input[2:]
    kept = [init for init in model.graph.initializer if init.name != name]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _waves(model: onnx.ModelProto, plan: list[_Refit]) -> list[list[_Refit]]:
    """``plan`` split into waves: a layer joins the wave after the last refitted layer upstream of its input."""
    position = {id(item.node): i for i, item in enumerate(plan)}
    upstream: dict[str, int] = {}  # tensor -> bit set of the plan layers it depends on
    depends: dict[int, int] = {}
    for node in model.graph.node:
        mask = 0
        for name in node.input:
            mask |= upstream.get(name, 0)
        i = position.get(id(node))
        if i is not None:
            depends[i] = upstream.get(node.input[0], 0)
            mask |= 1 << i
        for out in node.output:
            upstream[out] = mask
    wave_of: dict[int, int] = {}
    for i in range(len(plan)):
        bits, before = depends.get(i, 0), [-1]
        before.extend(wave_of[j] for j in wave_of if bits >> j & 1)
        wave_of[i] = max(before) + 1
    waves: list[list[_Refit]] = [[] for _ in range(max(wave_of.values(), default=-1) + 1)]
    for i, item in enumerate(plan):
        waves[wave_of[i]].append(item)
    return waves


def _spatial_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Height x width of every 4-D tensor whose last two dims shape inference gives as numbers (nothing on failure:
    the sizes only narrow an estimate)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(header_only(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - an estimate's refinement: a model shape inference rejects keeps the bound
        return {}
    sizes = {}
    for info in inferred.graph.value_info:
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            sizes[info.name] = dims[2].dim_value * dims[3].dim_value
    return sizes


#: under a budget derived from the data, the share of it the original's outputs gathered ahead may take
AHEAD_SHARE = 0.5


def _window(waves: list[list[_Refit]], budget: KeptBudget, reference: ActivationStream) -> list[list[_Refit]]:
    """The waves from the first on whose original outputs one run of the original model gathers ahead (none unless
    they are two or more): consecutive waves of 2-D Convs whose sampled outputs (:meth:`_Refit.target_bytes`)
    fit ``AHEAD_SHARE`` of the budget and the room left beside what the pruned model's stream keeps."""
    feeds = len(reference.feeds)
    room = min(AHEAD_SHARE * budget.allowed(),
               budget.allowed() - budget.held() + reference.stale_bytes())
    window, used = [], 0
    for wave in waves:
        if any(item.node.op_type != "Conv" or len(item.weight.shape) != 4 for item in wave):
            break
        used += sum(item.target_bytes(feeds) for item in wave)
        if used > room:
            break
        window.append(wave)
    return window if len(window) > 1 else []


def _gather_ahead(window: list[list[_Refit]], reference: ActivationStream, clock: StageClock) -> None:
    """Run the original model once through the ``window``'s waves, keeping of each layer's output, per feed, only
    the rows its sampler draws (the kept channels), counted in the budget as reserved until the layer's wave takes
    them. The original's stream takes one step for the window instead of one per wave: under a budget its feeds that
    do not keep their frontier recompute once (from their inputs: what they kept makes room for the rows), not once
    per wave."""
    items = [item for wave in window for item in wave if item.targets is None]
    if not items:
        return
    reference.forget_stale()
    estimate = sum(item.target_bytes(len(reference.feeds)) for item in items)
    reference.budget.reserved += estimate  # the most the rows take: the stream keeps its frontier beside them
    for item in items:
        item.targets = [None] * len(reference.feeds)
    y_feeds = reference.run([item.name for item in items], clock=clock)
    for number, count in enumerate(reference.counts):
        gathers = {item.name: _AheadGather(item, number, count) for item in items}
        reference.consumers.update(gathers)
        ys = _next_feed(reference, y_feeds)
        with clock.stage("refit_gram"):
            for item in items:
                target = gathers[item.name].result()
                if target is None and ys[item.name].ndim == 4:  # handed over whole (kept for a later step)
                    gather = _AheadGather(item, number, count)
                    target = gather.result() if gather(ys[item.name], 0, count) else None
                item.targets[number] = target
        del ys
    reference.budget.reserved += sum(t.nbytes for item in items for t in item.targets if t is not None) - estimate


def _next_feed(stream: ActivationStream, values) -> dict[str, np.ndarray]:
    """The next feed's tensors of ``values`` (a :meth:`~ActivationStream.run` of ``stream``), the consumers set for
    that feed cleared after it, whatever happens."""
    try:
        return next(values)
    finally:
        stream.consumers.clear()


def _refit_wave(wave: list[_Refit], reference, current, live: dict[str, np.ndarray], ridge: float,
                clock: StageClock) -> None:
    """Accumulate every wave layer's normal equations over the calibration feeds and solve; ``reference`` and
    ``current`` stream the original and the pruned model (its refitted weights fed as inputs). Products run in
    float32 over at most the :class:`RowSampler` budget of rows and are summed in float64; the solve is float64."""
    inputs = sorted({item.node.input[0] for item in wave})
    outputs = [item.name for item in wave if item.targets is None]
    sums: dict[str, GramSum | None] = {}
    x_feeds = current.run(inputs, live, clock)
    y_feeds = reference.run(outputs, clock=clock) if outputs else iter(dict, None)  # every output gathered: {}
    for number in range(len(current.feeds)):
        xs = next(x_feeds)
        if number == 0 and current.budget.limit is None:
            for item in wave:  # a budget derived from the data allows the original layer's input, every feed
                current.budget.allow(xs[item.node.input[0]].nbytes * item.widen / current.shares[0])
        patches: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        gathers: dict[str, _TargetGather] = {}
        with clock.stage("refit_gram"):  # a Conv's patches first: its targets are gathered as the original runs
            for item in wave:
                if item.node.op_type != "Conv" or (item.name in sums and sums[item.name] is None):
                    continue
                x = xs[item.node.input[0]].astype(np.float32, copy=False)
                patches[item.name] = _patches(x, item.node, tuple(item.weight.shape[2:4]), item.picks.feed(number))
                del x
                if patches[item.name][1] is not None and item.targets is None:
                    gathers[item.name] = reference.consumers[item.name] = _TargetGather(
                        patches[item.name][1], reference.counts[number])
        ys = _next_feed(reference, y_feeds)
        with clock.stage("refit_gram"):
            for item in wave:
                if item.name in sums and sums[item.name] is None:
                    continue
                if item.targets is not None:
                    rows, target = _finish_rows(item, patches.pop(item.name)[0], _take_target(item, number, current),
                                                None, masked=True)
                elif item.name in patches:
                    gather = gathers.pop(item.name, None)
                    rows, target = _conv_rows(item, *patches.pop(item.name), ys[item.name],
                                              gather.result() if gather is not None else None)
                else:
                    rows, target = _refit_rows(item, xs[item.node.input[0]], ys[item.name], item.picks.feed(number))
                if rows is None:
                    sums[item.name] = None
                    continue
                sums.setdefault(item.name, GramSum(np.float32)).add(rows, target)
                del rows, target
        del xs, ys  # before the next feed is computed
    for item in wave:  # a layer that gave up keeps no rows gathered ahead
        for number in range(len(item.targets or [])):
            _take_target(item, number, current)
    with clock.stage("refit_solve"):
        for item in wave:
            if sums.get(item.name) is not None:
                gram, cross = sums[item.name].result()
                lam = ridge * float(np.trace(gram)) / gram.shape[0] + 1e-12
                np.add(gram, 0.0, out=gram)  # in place, as gram + λI: -0 becomes +0 off the diagonal, as it did
                gram[np.diag_indices_from(gram)] += lam
                item.solution = np.linalg.solve(gram, cross)  # [D(+1), O]
                del sums[item.name], gram, cross  # this layer's sums go before the next one's solve


def _take_target(item: _Refit, number: int, stream: ActivationStream) -> np.ndarray | None:
    """Feed ``number``'s rows of the original output gathered ahead, no longer held by ``item`` nor reserved."""
    target, item.targets[number] = item.targets[number], None
    stream.budget.reserved -= target.nbytes if target is not None else 0
    return target


def _refit_rows(item: _Refit, x: np.ndarray, y: np.ndarray, sampler: RowSampler | None = None
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The layer's input rows (im2col for a Conv, with a ones column for the bias) and its targets, float32; with
    ``sampler``, only the sampled rows (the same ones of both)."""
    node = item.node
    x = x.astype(np.float32, copy=False)
    if node.op_type == "Conv":
        return _conv_rows(item, *_patches(x, node, tuple(item.weight.shape[2:4]), sampler), y)
    y = y.astype(np.float32, copy=False)
    rows, target = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    picked = sampler.pick(rows.shape[0]) if sampler is not None and rows.shape[0] == target.shape[0] else None
    rows = rows if picked is None else rows[picked]
    return _finish_rows(item, rows, target, picked)


def _conv_rows(item: _Refit, rows: np.ndarray, picked: np.ndarray | None, y: np.ndarray,
               gathered: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A Conv's :func:`_refit_rows` from its patch rows at the positions ``picked`` (None: all) and its output ``y``,
    or the output at those positions already ``gathered`` (:class:`_TargetGather`)."""
    if gathered is not None:
        return _finish_rows(item, rows, gathered, None)
    n, _, ho, wo = y.shape if y.ndim == 4 else (0, 0, 0, 0)
    if picked is not None and n * ho * wo > int(picked[-1]):  # only the sampled positions' targets are gathered
        return _finish_rows(item, rows, _conv_target(y, picked), None)
    return _finish_rows(item, rows, _conv_target(y, None), picked)


def _conv_target(y: np.ndarray, picked: np.ndarray | None) -> np.ndarray:
    """A Conv output [samples, channels, height, width] as float32 rows [positions, channels]: those ``picked``
    (indices over samples x height x width, sorted), or all of them in order."""
    y = y.astype(np.float32, copy=False)
    if picked is None:
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    b, i, j = _positions(picked, y.shape[2], y.shape[3])
    return y[b, :, i, j].reshape(len(b), y.shape[1])


def _positions(picked: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample, row and column of each index in ``picked`` over samples x ``height`` x ``width``."""
    b, rest = np.divmod(picked, height * width)
    i, j = np.divmod(rest, width)
    return b, i, j


def _finish_rows(item: _Refit, rows: np.ndarray, target: np.ndarray | None, picked: np.ndarray | None,
                 masked: bool = False) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The rows with a ones column for the bias and the target's kept channels (already taken where ``masked``)."""
    if target is None:
        return None, None
    if picked is not None and target.shape[0] > int(picked[-1]):
        target = target[picked]
    if rows.shape[0] != target.shape[0]:
        return None, None
    if not masked:
        target = target[:, item.out_mask]
    if item.node.op_type != "MatMul":
        rows = np.hstack([rows, np.ones((rows.shape[0], 1), dtype=np.float32)])
    return rows, target


class _TargetGather:
    """A Conv's output at the sampled positions ``picked`` (indices over samples x height x width, sorted) of a feed
    of ``count`` samples, gathered from the parts of the original's run (``ActivationStream.consumers``): the rows
    :func:`_conv_rows` takes from the whole output, without the whole output."""

    def __init__(self, picked: np.ndarray | None, count: int):
        self.picked, self.count = picked, count
        self.rows: np.ndarray | None = None
        self.covered = np.zeros(count, dtype=bool)

    def __call__(self, part: np.ndarray, start: int, stop: int) -> bool:
        """Take the output's samples ``start:stop``; False (nothing taken) when they are not a 2-D conv's output
        holding the sampled positions: the stream then yields the whole output."""
        if part.ndim != 4 or self.count * part.shape[2] * part.shape[3] <= int(self.picked[-1]):
            return False
        b, i, j = _positions(self.picked, part.shape[2], part.shape[3])
        inside = (b >= start) & (b < stop)
        if self.rows is None:
            self.rows = np.empty((len(self.picked), part.shape[1]), dtype=np.float32)
        self.rows[inside] = part[b[inside] - start, :, i[inside], j[inside]]
        self.covered[start:stop] = True
        return True

    def result(self) -> np.ndarray | None:
        """The gathered rows [picked, output channels], float32; None unless every sample was covered."""
        return self.rows if self.covered.all() else None


class _AheadGather(_TargetGather):
    """A :class:`_TargetGather` for the original's output gathered ahead: the feed's rows are drawn from the layer's
    :class:`_Picks` when the first part comes (all rows where it draws none), and :meth:`result` gives them as the
    refit takes them from the whole output (the kept channels, laid out alike: the bias's sums depend on the
    layout)."""

    def __init__(self, item: _Refit, number: int, count: int):
        super().__init__(None, count)
        self.item, self.number = item, number

    def __call__(self, part: np.ndarray, start: int, stop: int) -> bool:
        if part.ndim != 4:
            return False
        if self.picked is None:
            rows = self.count * part.shape[2] * part.shape[3]
            picked = self.item.picks.draw(self.number, rows)
            if start == 0 and stop == self.count:  # the whole output at once
                self.rows = _conv_target(part, picked)
                self.covered[:] = True
                return True
            self.picked = np.arange(rows) if picked is None else picked
        return super().__call__(part, start, stop)

    def result(self) -> np.ndarray | None:
        """The gathered rows' kept channels (as :func:`_finish_rows` takes them); None unless every sample came."""
        rows = super().result()
        return None if rows is None else rows[:, self.item.out_mask]


def _write_solution(model: onnx.ModelProto, index: GraphIndex, node: onnx.NodeProto, weight,
                    solution: np.ndarray) -> None:
    dtype = weight.dtype
    shape = weight.shape
    if node.op_type == "MatMul":
        weight.set_array(solution.astype(dtype))
        return
    coef, bias = solution[:-1], solution[-1]
    if node.op_type == "Conv":
        weight.set_array(coef.T.reshape(shape).astype(dtype))
    else:
        weight.set_array((coef.T if get_attr(node, "transB", 0) else coef).astype(dtype))
    if len(node.input) > 2 and node.input[2]:
        existing, _ = index.resolve(node.input[2])
        if existing is not None and existing.size == bias.size:
            existing.set_array(bias.reshape(existing.shape).astype(existing.dtype))
            return
    name = f"{node.name or node.output[0]}.reconstructed_bias"
    model.graph.initializer.append(numpy_helper.from_array(bias.astype(dtype), name))
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name


def reconstruct_sparse(original: onnx.ModelProto, pruned: onnx.ModelProto, layers: list[onnx.NodeProto],
                       feeds: list[dict[str, np.ndarray]], ridge: float = 1e-3) -> dict[str, Any]:
    """Row-wise least squares for zeroed weights: each output row's *kept* weights are refitted so the
    layer's output on ``feeds`` matches the original's; zeros stay zero (the sparsity pattern holds)."""
    done, skipped = [], []
    reference = session_with_outputs(original, [node.output[0] for node in layers])
    index = GraphIndex.build(pruned.graph)
    for node in layers:
        weight, chain = index.resolve(node.input[1])
        if weight is None or chain or not _reconstructable(node):
            skipped.append(node.name or node.output[0])
            continue
        w = weight.array().astype(np.float64)
        rows_w = _as_rows(node, w)  # [O, D]
        bias = None
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            b, _ = index.resolve(node.input[2])
            bias = b.array().astype(np.float64).reshape(-1) if b is not None else None
        current = session_with_outputs(pruned, [node.input[0]])
        gram = cross = None
        for feed in feeds:
            x = current.run([node.input[0]], feed)[0].astype(np.float64)
            y = reference.run([node.output[0]], feed)[0].astype(np.float64)
            if node.op_type == "Conv":
                a = _im2col(x, node, tuple(w.shape[2:4]))
                t = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
            else:
                a, t = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            if bias is not None and bias.size in (1, t.shape[1]):
                t = t - bias
            gram = a.T @ a if gram is None else gram + a.T @ a
            cross = a.T @ t if cross is None else cross + a.T @ t
        lam = ridge * float(np.trace(gram)) / gram.shape[0] + 1e-12
        for o in range(rows_w.shape[0]):
            kept = np.flatnonzero(rows_w[o])
            if kept.size:
                sub = gram[np.ix_(kept, kept)] + lam * np.eye(kept.size)
                rows_w[o, kept] = np.linalg.solve(sub, cross[kept, o])
        weight.set_array(_from_rows(node, rows_w, w.shape).astype(weight.dtype))
        done.append(node.name or node.output[0])
    return {"layers": len(done), "skipped": skipped,
            "samples": int(sum(next(iter(f.values())).shape[0] for f in feeds))}


def _as_rows(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """The weight as [output rows, inputs] in im2col / feature order."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).copy()
    if node.op_type == "Gemm" and get_attr(node, "transB", 0):
        return w.copy()
    return w.T.copy()


def _from_rows(node: onnx.NodeProto, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Conv":
        return rows.reshape(shape)
    if node.op_type == "Gemm" and get_attr(node, "transB", 0):
        return rows
    return rows.T

