"""The core of channel analysis, below both the op rules and group discovery.

:class:`Analysis` holds what a walk over the graph found (channel ids and their ties, annotations, edits, frozen
ids); :class:`Freeze` is what a rule raises when channels must stay; :func:`rule` registers an op rule in
``RULES`` (op type -> rule) with the one-line description the docs list; :func:`producer` registers what starts
new channels at a node no channels reach (``PRODUCERS``). The package :mod:`.rules` defines them, one module per
op family; :mod:`.groups` walks the graph with them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import GraphIndex, Weight, get_attr, transpose_perm  # noqa: F401 - transpose_perm: for the rules
from ..shapes import cast_along


def find_root(parent: list[int], i: int) -> int:
    """Union-find: the root of ``i`` (path halving)."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def union(parent: list[int], x: int, y: int) -> int:
    """Union-find: join the sets of ``x`` and ``y`` under the smaller root, which is returned."""
    rx, ry = find_root(parent, x), find_root(parent, y)
    if rx != ry:
        parent[max(rx, ry)] = min(rx, ry)
    return min(rx, ry)


class Freeze(Exception):
    """Raised by a rule: the channels reaching this node must stay."""


@dataclass
class Annotation:
    """The channel axis of a tensor and the channel id at each position of it."""

    axis: int
    ids: np.ndarray  # int64, one entry per position on ``axis``


@dataclass
class Space:
    """The output channels of one producer node."""

    id: int
    node: onnx.NodeProto
    start: int  # first global channel id
    size: int
    op: str


@dataclass
class WeightEdit:
    """A weight whose positions along ``axis`` follow the channel ids ``ids``."""

    weight: Weight
    axis: int
    ids: np.ndarray
    role: str  # producer | consumer | param
    node: onnx.NodeProto
    private: bool = False  # shared with other readers: copied before changing (passes/removal.py, own_copy)


@dataclass
class SetCount:
    """Set attribute ``attr`` to the number of ``ids`` kept, divided by ``per``; with ``scale``, the list of that
    number times each entry (a grouped conv's ``group``, ``num_groups``, ``hidden_size``, ``num_heads``)."""

    attr: str
    ids: np.ndarray
    per: int = 1
    scale: tuple[int, ...] = ()


@dataclass
class CountEntry:
    """Entry ``position`` of the constant that input ``slot`` of ``owner`` reads becomes the number of ``ids`` kept
    (a Reshape/Expand target, Resize sizes, a ConstantOfShape shape); the input points at a new initializer named
    ``<node>.<suffix>.pruned``."""

    owner: onnx.NodeProto
    slot: int
    position: int
    ids: np.ndarray
    suffix: str


@dataclass
class SplitSizes:
    """A Split along the channel axis: its sizes become the kept counts of ``parts`` (input 1 when ``from_input``,
    else the ``split`` attribute, or a new sizes input/attribute for an equal split that becomes uneven)."""

    parts: list[np.ndarray]
    from_input: bool


@dataclass
class SliceBounds:
    """A Slice along the channel axis (entry ``k`` of its bounds, ``start:end`` of ``ids``): the bounds become the
    kept positions."""

    k: int
    start: int
    end: int
    ids: np.ndarray


@dataclass
class Reindex:
    """A Gather of constant ``picks`` along the channel axis ``ids``: the indices become the kept picks' new
    positions (a ``scalar`` index stays scalar; the index type stays)."""

    ids: np.ndarray
    picks: np.ndarray
    scalar: bool
    index_type: np.dtype


#: a declarative node edit: data that says how a node follows the kept channels; ``passes/removal.py`` applies it
NodeEdit = SetCount | CountEntry | SplitSizes | SliceBounds | Reindex


@dataclass
class Analysis:
    """Everything structured pruning needs to know about one model."""

    model: onnx.ModelProto
    shapes: dict[str, list[int | None]]
    index: GraphIndex
    spaces: list[Space] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)  # union-find over channel ids
    frozen: dict[int, str] = field(default_factory=dict)  # channel id -> reason
    ann: dict[str, Annotation] = field(default_factory=dict)
    edits: list[WeightEdit] = field(default_factory=list)
    node_edits: list[tuple[onnx.NodeProto, NodeEdit]] = field(default_factory=list)  # applied at removal
    ops_by_id: dict[int, set[str]] = field(default_factory=dict)
    approximate_layernorm: bool = False  # let channels through LayerNorm over the channel axis
    approximations: list[str] = field(default_factory=list)  # nodes where removal is not exact
    rewritten: dict[str, np.ndarray] = field(default_factory=dict)  # constants created while removing
    head_ids: set[int] = field(default_factory=set)  # channel ids that stand for whole attention heads
    size_reads: set[tuple[int, int]] = field(default_factory=set)  # (id(node), shape entry) sized by a Shape read
    deferred: list[Callable[[], None]] = field(default_factory=list)  # checks once every node is walked
    lineage_nodes: set[int] = field(default_factory=set)  # id(node) computing a per-channel operand from constants
    lineage_users: set[int] = field(default_factory=set)  # id(node) reading such an operand with channel ids
    lineage_ids: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)  # lineage tensor -> (axis, ids)

    # -- channel ids -------------------------------------------------------------------

    @property
    def num_channels(self) -> int:
        return len(self.parent)

    def new_space(self, node: onnx.NodeProto, size: int) -> np.ndarray:
        start = len(self.parent)
        self.spaces.append(Space(len(self.spaces), node, start, size, node.op_type))
        self.parent.extend(range(start, start + size))
        return np.arange(start, start + size, dtype=np.int64)

    def find(self, i: int) -> int:
        return find_root(self.parent, i)

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        """Channels at equal positions of ``a`` and ``b`` must go together."""
        for x, y in zip(a.tolist(), b.tolist()):
            union(self.parent, x, y)

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        for i in set(np.asarray(ids).reshape(-1).tolist()):  # a set: np.unique costs more per call on short ids
            self.frozen.setdefault(int(i), reason)

    def mark(self, ids: np.ndarray, op: str) -> None:
        for i in set(np.asarray(ids).reshape(-1).tolist()):
            self.ops_by_id.setdefault(int(i), set()).add(op)

    # -- shapes and constants ------------------------------------------------------------

    def shape(self, name: str) -> list[int | None] | None:
        return self.shapes.get(name)

    def weight(self, name: str) -> tuple[Weight | None, list[onnx.NodeProto]]:
        if not name:
            return None, []
        return self.index.resolve(name)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a small constant input (shape tensors, axes, slice bounds)."""
        if name in self.rewritten:
            return self.rewritten[name]
        weight, chain = self.weight(name)
        if weight is None or any(n.op_type == "Transpose" for n in chain):
            return None
        return cast_along(self.index, weight.array(), chain)

    def add_weight_edit(self, name: str, axis: int, ids: np.ndarray, role: str, node: onnx.NodeProto) -> None:
        """Record that weight input ``name`` follows ``ids`` on ``axis`` (mapped through Transposes)."""
        weight, chain = self.weight(name)
        if weight is None:
            raise Freeze(f"{node.op_type} {node.name!r}: input {name!r} is not a constant weight")
        rank = len(weight.shape)
        for step in reversed(chain):
            if step.op_type == "Transpose":
                axis = transpose_perm(step, rank)[axis]
        axis = axis % rank if rank else 0
        if rank == 0 or weight.shape[axis] != len(ids):
            raise Freeze(f"{node.op_type} {node.name!r}: weight {weight.name!r} axis {axis} does not match the channels")
        self.edits.append(WeightEdit(weight, axis, ids.copy(), role, node))


Rule = Callable[[Analysis, onnx.NodeProto], None]
RULES: dict[str, Rule] = {}
DESCRIPTIONS: dict[str, str] = {}
PRODUCERS: dict[str, Rule] = {}


#: tests set this environment variable to 1 (tests/conftest.py): exceptions in rules propagate
RAISE_ENV = "ONNXPRUNE_RAISE_RULE_ERRORS"
_raise_rule_errors = [False]


def raise_rule_errors(on: bool = True) -> None:
    """Let exceptions in rules propagate instead of freezing the channels (``--debug``)."""
    _raise_rule_errors[0] = on


def rule_error(node: onnx.NodeProto, exc: Exception, annotated: bool) -> Freeze:
    """A rule that raised anything but :class:`Freeze` has a bug: re-raise it under ``--debug`` and in tests
    (:data:`RAISE_ENV`); otherwise freeze the channels with a reason that says so, which the report lists."""
    if _raise_rule_errors[0] or os.environ.get(RAISE_ENV) == "1":
        raise exc
    key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
    name = getattr(RULES.get(key), "__name__", key) if annotated else "producer_rule"
    return Freeze(f"internal error in rule {name} at {node.op_type} {node.name!r} ({type(exc).__name__}: {exc}); "
                  "please report it with the output of the same command with --debug")


def rule(*ops: str, does: str):
    """Register a rule for ``ops`` with a one-line description for the docs."""

    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
            DESCRIPTIONS[op] = does
        return fn

    return register


def producer(*ops: str):
    """Register what gives the outputs of ``ops`` new channel ids when no channels reach the node."""

    def register(fn: Rule) -> Rule:
        for op in ops:
            PRODUCERS[op] = fn
        return fn

    return register


def producer_rule(a: Analysis, node: onnx.NodeProto) -> None:
    """Called for nodes without incoming channels: start new channels at producers."""
    fn = PRODUCERS.get(node.op_type)
    if fn is not None:
        fn(a, node)
