"""Faithful removal: fold what removed channels still feed into their consumers' biases.

A removed channel is not always silent: with its producer weights zeroed it still outputs
its bias, BN shift or ``act(constant)``. onnxprune measures, in onnxruntime, the value each
removed channel carries into every consumer of the *zeroed* model (producer slices of the
removed channels set to zero, shapes unchanged), and adds ``W[:, c] * value`` to the
consumer's bias (adding a bias where there is none). When the value is constant over space
and the consumer reads no padding, the pruned model equals the zeroed model exactly;
otherwise the fold is the best constant (bias correction) and is reported as approximate.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .analysis.groups import Analysis, WeightEdit, analyse
from .calibration import ActivationStream
from .graph import GraphIndex, get_attr
from .model import PROTOBUF_LIMIT, tensor_bytes
from .sessions import create_session, inference_session, session_options, session_with_outputs


def zeroed_model(model: onnx.ModelProto, keep: np.ndarray, input_shapes=None,
                 approximate_layernorm: bool = False) -> onnx.ModelProto:
    """A copy with the producer weight slices of removed channels zeroed (channels zeroed in place)."""
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for edit in analyse(zeroed, input_shapes, approximate_layernorm=approximate_layernorm).edits:
        drop = ~keep[edit.ids]
        if edit.role == "producer" and drop.any():
            values = edit.weight.array()
            index = [slice(None)] * values.ndim
            index[edit.axis] = drop
            values[tuple(index)] = 0
            edit.weight.set_array(values)
    return zeroed


def _zeroed_producers(analysis, keep: np.ndarray) -> dict[str, np.ndarray] | None:
    """Producer weights with removed channels zeroed, by initializer name (None: some are not main-graph
    initializers, so the caller zeroes a copy of the model instead)."""
    zeros: dict[str, np.ndarray] = {}
    for edit in analysis.edits:
        drop = ~keep[edit.ids]
        if edit.role != "producer" or not drop.any():
            continue
        if edit.weight.kind != "initializer" or edit.weight.graph is not analysis.model.graph:
            return None
        values = zeros.get(edit.weight.name)
        if values is None:
            values = zeros[edit.weight.name] = edit.weight.array()
        index = [slice(None)] * values.ndim
        index[edit.axis] = drop
        values[tuple(index)] = 0
    return zeros


_ZERO_TO_ZERO = {"Relu", "LeakyRelu", "PRelu", "Gelu", "Erf", "Tanh", "Neg", "Abs", "Sin", "Softsign", "HardSwish",
                 "Mish", "Identity", "Cast", "Dropout", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                 "Slice", "Split", "Expand", "Tile", "Resize", "MaxPool", "AveragePool", "GlobalAveragePool",
                 "GlobalMaxPool", "DepthToSpace", "SpaceToDepth"}


def _known_zero(analysis, name: str, memo: dict[str, bool]) -> bool:
    """Whether removed channels are exactly zero in ``name`` once their producers' weights are zeroed,
    decided from the graph alone: bias-free producers, then ops that map 0 to 0 (then nothing to fold).

    Walks producers with an explicit stack (a chain of thousands of element-wise ops must not hit
    Python's recursion limit); ``memo`` holds every answer, cycles and unknowns count as not zero."""
    stack, visiting = [name], set()
    while stack:
        current = stack[-1]
        if current in memo:
            stack.pop()
            continue
        needed = [i for i in _zero_inputs(analysis, current) if i not in memo]
        if needed and current not in visiting:
            visiting.add(current)
            stack.extend(needed)
            continue
        memo[current] = _zero_from_inputs(analysis, current, memo)
        stack.pop()
    return memo[name]


def _zero_inputs(analysis, name: str) -> list[str]:
    """The annotated inputs whose answers decide :func:`_known_zero` for ``name`` (none for producers)."""
    node = analysis.index.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx") or _weighted(analysis, node):
        return []
    annotated = [i for i in node.input if i in analysis.ann]
    if node.op_type in ("Mul", "MatMul"):
        return annotated
    if node.op_type in ("Add", "Sub", "Sum", "Concat", "Max", "Min"):  # zero only when every input is
        return annotated if len(annotated) == len([i for i in node.input if i]) else []
    if node.op_type == "Div" or node.op_type in _ZERO_TO_ZERO:
        return [node.input[0]] if node.input[0] in annotated else []
    return []


def _weighted(analysis, node: onnx.NodeProto) -> bool:
    return node.op_type in ("MatMul", "Conv", "ConvTranspose", "Gemm") and len(node.input) > 1 and \
        analysis.index.resolve(node.input[1])[0] is not None


def _zero_from_inputs(analysis, name: str, memo: dict[str, bool]) -> bool:
    """:func:`_known_zero` for ``name`` once its inputs are decided (missing answers: a cycle, not zero)."""
    node = analysis.index.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if _weighted(analysis, node):  # a producer: its output channels are zeroed rows/columns, unless a bias is added
        return len(node.input) < 3 or not node.input[2]
    annotated = [i for i in node.input if i in analysis.ann]
    if node.op_type in ("Mul", "MatMul"):  # anything times zero
        return any(memo.get(i, False) for i in annotated)
    if node.op_type in ("Add", "Sub", "Sum", "Concat", "Max", "Min"):
        return bool(annotated) and len(annotated) == len([i for i in node.input if i]) and all(
            memo.get(i, False) for i in annotated)
    if node.op_type == "Div" or node.op_type in _ZERO_TO_ZERO:
        return node.input[0] in annotated and memo.get(node.input[0], False)
    return False


def _foldable(edit: WeightEdit, analysis) -> bool:
    node = edit.node
    if edit.role != "consumer" or node.op_type not in ("Conv", "Gemm", "MatMul"):
        return False
    if node.op_type == "Conv" and int(get_attr(node, "group", 1)) != 1:
        return False  # depthwise: its own output channel goes too
    _, chain = analysis.index.resolve(node.input[1])
    return not any(step.op_type == "Transpose" for step in chain)


def _reads_padding(node: onnx.NodeProto) -> bool:
    if node.op_type != "Conv":
        return False
    pads = get_attr(node, "pads") or []
    auto = get_attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return any(int(p) for p in pads) or auto not in ("NOTSET", "VALID")


def fold_removed_constants(model: onnx.ModelProto, keep: np.ndarray, feeds: list[dict[str, np.ndarray]],
                           input_shapes=None, approximate_layernorm: bool = False,
                           analysis: Analysis | None = None) -> dict[str, Any]:
    """Measure removed channels' values in the zeroed model and fold them into consumer biases (``analysis``: the
    one ``keep`` was chosen on, when the caller has it, so the graph is not analysed twice)."""
    if analysis is None:
        analysis = analyse(model, input_shapes, approximate_layernorm=approximate_layernorm)
    edits = [e for e in analysis.edits if _foldable(e, analysis) and not keep[e.ids].all()]
    summary = {"consumers": 0, "exact": 0, "approximate": 0, "skipped": []}
    if not edits or not feeds:
        return summary
    memo: dict[str, bool] = {}
    edits = [e for e in edits if not _known_zero(analysis, e.node.input[0], memo)]
    if not edits:  # removed channels are exactly zero where they are read (no biases on their path)
        return summary
    names = sorted({e.node.input[0] for e in edits})
    # log level 4: a failing run is reported in the summary; no prepacking: one run, no second copy of the weights
    options = session_options(log_level=4, prepacking=False)
    zeros = _zeroed_producers(analysis, keep)
    if zeros is not None:  # the zeroed model is the model with a few weights swapped: no copy of the rest
        session = inference_session(model, outputs=names, replaced=zeros, options=options)
    else:
        if tensor_bytes(model) >= PROTOBUF_LIMIT:
            summary["skipped"].append("model over 2 GB with weights in Constant nodes: constants not folded")
            return summary
        zeroed = zeroed_model(model, keep, input_shapes, approximate_layernorm)
        del zeroed.graph.output[:]
        zeroed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
        session = create_session(zeroed, options)
    try:
        runs = [dict(zip(names, session.run(names, feed))) for feed in feeds]
    except Exception as exc:  # noqa: BLE001 - e.g. synthetic inputs whose sizes the model does not accept
        summary["skipped"].append("the model did not run on the inputs used to measure removed channels "
                                  f"({str(exc).strip().splitlines()[0][:200]}): their constant outputs were not "
                                  "folded into the next layers' biases; give --data or --calibration-data")
        return summary
    finally:
        del session
    for edit in edits:
        name = edit.node.input[0]
        axis = analysis.ann[name].axis
        drop = np.flatnonzero(~keep[edit.ids])
        per_run = [np.moveaxis(r[name].astype(np.float64), axis, 0)[drop].reshape(len(drop), -1) for r in runs]
        stacked = np.concatenate(per_run, axis=1)
        values = stacked.mean(axis=1)
        constant = np.allclose(stacked, values[:, None], rtol=1e-5, atol=1e-6)
        if not np.any(values):
            continue
        _add_to_bias(model, analysis, edit, drop, values)
        summary["consumers"] += 1
        exact = constant and not (_reads_padding(edit.node) and np.any(values))
        summary["exact" if exact else "approximate"] += 1
    return summary


def _add_to_bias(model: onnx.ModelProto, analysis, edit: WeightEdit, drop: np.ndarray, values: np.ndarray) -> None:
    node, weight = edit.node, edit.weight.array().astype(np.float64)
    if node.op_type == "Conv":
        taken = np.take(weight, drop, axis=1).reshape(weight.shape[0], len(drop), -1).sum(axis=2)
        delta = taken @ values
    elif node.op_type == "Gemm" and get_attr(node, "transB", 0):
        delta = np.take(weight, drop, axis=1) @ values
    else:  # Gemm B [K, N] or MatMul B [K, N]
        delta = values @ np.take(weight, drop, axis=0)
    dtype = edit.weight.dtype
    for step in analysis.index.resolve(node.input[1])[1]:  # a weight stored fp16 and Cast to float
        if step.op_type == "Cast":
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(get_attr(step, "to"))))
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        bias, chain = analysis.index.resolve(node.input[2])
        if bias is not None:
            shared = bool(chain) or len(analysis.index.consumers.get(bias.name, [])) != 1
            if not shared or any(step.op_type != "Identity" for step in chain):
                bias.set_array((bias.array().astype(np.float64) + delta).astype(bias.dtype))
                return
            delta, dtype = bias.array().astype(np.float64) + delta, bias.dtype  # shared: this node gets a copy
    if node.op_type == "MatMul" and _add_to_following_bias(analysis, node, delta):
        return
    name = f"{node.name or node.output[0]}.folded_bias"
    model.graph.initializer.append(numpy_helper.from_array(delta.astype(dtype), name))
    if node.op_type in ("Conv", "Gemm"):
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        return
    original = node.output[0]
    node.output[0] = f"{original}.before_folded_bias"
    position = list(model.graph.node).index(node)
    model.graph.node.insert(position + 1, onnx.helper.make_node(
        "Add", [node.output[0], name], [original], name=f"{node.name or original}.folded_bias_add"))


def _add_to_following_bias(analysis, node: onnx.NodeProto, delta: np.ndarray) -> bool:
    """MatMul followed only by ``Add(bias)`` with a constant bias of the output width: fold there."""
    consumers = analysis.index.consumers.get(node.output[0], [])
    if len(consumers) != 1 or consumers[0][0].op_type != "Add":
        return False
    add, slot = consumers[0]
    bias, chain = analysis.index.resolve(add.input[1 - slot])
    if bias is None or any(step.op_type == "Transpose" for step in chain):
        return False
    if bias.shape not in ((len(delta),), (1, len(delta))):
        return False
    shared = len(analysis.index.consumers.get(bias.name, [])) != 1 or chain
    if not shared:
        bias.set_array((bias.array().astype(np.float64) + delta.reshape(bias.shape)).astype(bias.dtype))
        return True
    # a bias shared by several layers (or reached through Identity/Cast): this Add gets its own copy
    dtype = bias.dtype
    for step in chain:
        if step.op_type == "Cast":
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(get_attr(step, "to"))))
    name = f"{add.name or add.output[0]}.folded_bias"
    values = (bias.array().astype(np.float64) + delta.reshape(bias.shape)).astype(dtype)
    analysis.model.graph.initializer.append(numpy_helper.from_array(values, name))
    add.input[1 - slot] = name
    return True


# --------------------------------------------------------------------------------------
# Least-squares reconstruction (--reconstruct)
# --------------------------------------------------------------------------------------


class StageClock:
    """Wall and CPU seconds per named stage of a pass, for the report; a stage nested in another is not counted in
    its parent's own time (capture inside Gram accumulation counts as capture)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.stack: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body as ``name``."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            self.wall[name] = self.wall.get(name, 0.0) + wall
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu
            if self.stack:
                self.wall[self.stack[-1]] = self.wall.get(self.stack[-1], 0.0) - wall
                self.cpu[self.stack[-1]] = self.cpu.get(self.stack[-1], 0.0) - cpu

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Stage -> {"wall_s", "cpu_s"}, in the order the stages first ran."""
        return {k: {"wall_s": round(v, 3), "cpu_s": round(self.cpu[k], 3)} for k, v in self.wall.items()}


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


def _reconstructable(node: onnx.NodeProto) -> bool:
    if node.op_type == "Conv":
        auto = get_attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        return int(get_attr(node, "group", 1)) == 1 and auto == "NOTSET"
    if node.op_type == "Gemm":
        return not get_attr(node, "transA", 0) and get_attr(node, "alpha", 1.0) == 1.0 and get_attr(node, "beta", 1.0) == 1.0
    return node.op_type == "MatMul"


def reconstruct(original: onnx.ModelProto, pruned: onnx.ModelProto, layers: list[tuple[str, np.ndarray]],
                feeds: list[dict[str, np.ndarray]], ridge: float = 1e-3, budget: int = 1 << 30,
                clock: StageClock | None = None) -> dict[str, Any]:
    """Refit each layer's kept weights (and bias) so its output on ``feeds`` matches the original's.

    ``layers`` are (output tensor name, mask of the original output channels still present),
    in topological order; each is solved with ridge-regularised normal equations on the
    pruned model's own inputs to that layer (earlier refits already applied). Layers are refitted in
    waves: a wave holds every layer whose upstream refits are all done, so one pass over ``feeds`` serves the whole
    wave. Both models are streamed (:class:`~onnxprune.calibration.ActivationStream`): each node runs once per feed,
    the tensors later waves read are kept between waves (at most ``budget`` bytes, else recomputed), and the
    refitted weights are session inputs of the pruned model. ``clock`` times capture, Gram products and solves.
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
    live = {}
    for item in plan:
        live[item.weight.name] = item.weight.array()
        if item.bias is not None:
            live[item.bias.name] = item.bias.array()
    done = []
    reference, current = ActivationStream(original, feeds, budget), ActivationStream(pruned, feeds, budget)
    for wave in _waves(pruned, plan):
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
    for item in plan:
        if item.solution is None and item.added is not None:
            _drop_added_bias(pruned, item.node, item.added)
    return {"layers": len(done), "skipped": skipped, "samples": int(sum(next(iter(f.values())).shape[0] for f in feeds))}


class _Refit:
    """One layer to refit: its node, weight and bias (None for MatMul) and, once solved, the solution."""

    def __init__(self, name: str, out_mask: np.ndarray, node: onnx.NodeProto, weight, index: GraphIndex,
                 added: tuple[str, str] | None):
        self.name, self.out_mask, self.node, self.weight, self.added = name, out_mask, node, weight, added
        self.bias = index.resolve(node.input[2])[0] if node.op_type != "MatMul" else None
        self.solution: np.ndarray | None = None
        shape = weight.shape
        self.features = int(np.prod(shape[1:])) if node.op_type == "Conv" else int(
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


def _refit_wave(wave: list[_Refit], reference, current, live: dict[str, np.ndarray], ridge: float,
                clock: StageClock) -> None:
    """Accumulate every wave layer's normal equations over the calibration feeds and solve; ``reference`` and
    ``current`` stream the original and the pruned model (its refitted weights fed as inputs). Products run in
    float32 over at most the :class:`RowSampler` budget of rows and are summed in float64; the solve is float64."""
    inputs = sorted({item.node.input[0] for item in wave})
    outputs = [item.name for item in wave]
    sums: dict[str, GramSum | None] = {}
    samplers: dict[str, RowSampler] = {}
    for xs, ys in zip(current.run(inputs, live, clock), reference.run(outputs, clock=clock)):
        with clock.stage("refit_gram"):
            for item in wave:
                if item.name in sums and sums[item.name] is None:
                    continue
                sampler = samplers.setdefault(item.name, RowSampler(item.features, len(current.feeds)))
                rows, target = _refit_rows(item, xs[item.node.input[0]], ys[item.name], sampler)
                if rows is None:
                    sums[item.name] = None
                    continue
                sums.setdefault(item.name, GramSum(np.float32)).add(rows, target)
    with clock.stage("refit_solve"):
        for item in wave:
            if sums.get(item.name) is not None:
                gram, cross = sums[item.name].result()
                lam = ridge * float(np.trace(gram)) / gram.shape[0] + 1e-12
                item.solution = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), cross)  # [D(+1), O]


class GramSum:
    """XᵀX (and XᵀY) over row blocks, summed in float64. Blocks are multiplied in ``dtype`` after subtracting a
    shift (the first block's column means), so float32 products keep the accuracy of the centred data (the mean,
    large after a ReLU and exact for a bias column, is added back in float64 from the column sums); blocks are
    buffered until they hold as many rows as features, so small batches do not each cost a D×D update."""

    def __init__(self, dtype: type = np.float32):
        self.dtype = dtype
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
        if self.count >= rows.shape[1]:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        rows = self.rows[0] if len(self.rows) == 1 else np.concatenate(self.rows)
        target = (self.targets[0] if len(self.targets) == 1 else np.concatenate(self.targets)) if self.targets else None
        if self.shift is None:
            self.shift = rows.mean(axis=0, dtype=np.float64).astype(self.dtype)
            if target is not None:
                self.target_shift = target.mean(axis=0, dtype=np.float64).astype(self.dtype)
        self.total += rows.shape[0]
        self.sum_x = self.sum_x + rows.sum(axis=0, dtype=np.float64)
        centred = rows.astype(self.dtype, copy=False) - self.shift
        self.gram = self.gram + (centred.T @ centred).astype(np.float64)
        if target is not None:
            self.sum_y = self.sum_y + target.sum(axis=0, dtype=np.float64)
            shifted = target.astype(self.dtype, copy=False) - self.target_shift
            self.cross = self.cross + (centred.T @ shifted).astype(np.float64)
        self.rows, self.targets, self.count = [], [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray | int]:
        """(XᵀX, XᵀY) of every block added."""
        self._flush()
        if self.shift is None:
            return self.gram, self.cross
        c = self.shift.astype(np.float64)
        gram = self.gram + np.outer(c, self.sum_x) + np.outer(self.sum_x, c) - self.total * np.outer(c, c)
        if self.target_shift is None:
            return gram, self.cross
        d = self.target_shift.astype(np.float64)
        cross = self.cross + np.outer(c, self.sum_y) + np.outer(self.sum_x, d) - self.total * np.outer(c, d)
        return gram, cross


def _refit_rows(item: _Refit, x: np.ndarray, y: np.ndarray, sampler: RowSampler | None = None
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The layer's input rows (im2col for a Conv, with a ones column for the bias) and its targets, float32; with
    ``sampler``, only the sampled rows (the same ones of both)."""
    node = item.node
    x, y = x.astype(np.float32, copy=False), y.astype(np.float32, copy=False)
    if node.op_type == "Conv":
        rows, picked = _patches(x, node, tuple(item.weight.shape[2:4]), sampler)
        target = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    else:
        rows, target = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        picked = sampler.pick(rows.shape[0]) if sampler is not None and rows.shape[0] == target.shape[0] else None
        rows = rows if picked is None else rows[picked]
    if picked is not None and target.shape[0] > int(picked[-1]):
        target = target[picked]
    if rows.shape[0] != target.shape[0]:
        return None, None
    target = target[:, item.out_mask]
    if node.op_type != "MatMul":
        rows = np.hstack([rows, np.ones((rows.shape[0], 1), dtype=np.float32)])
    return rows, target


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
