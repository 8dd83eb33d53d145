"""Channel removal: applies what the analysis recorded, weight slices and declarative node edits.

The analysis (``analysis/``) only describes; this module is the one place that changes the graph for it:
weights are compressed along their channel axis, and each node edit (:data:`~..analysis.registry.NodeEdit`)
becomes an attribute or a new constant input sized to the channels kept.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..analysis.groups import reader_slot
from ..analysis.registry import Analysis, CountEntry, NodeEdit, Reindex, SetCount, SliceBounds, SplitSizes, WeightEdit
from ..graph import Weight, get_attr, opset_version


def apply_removal(analysis: Analysis, keep: np.ndarray) -> None:
    """Compress every recorded weight to the channels ``keep`` marks True, then apply the node edits in order."""
    for edit in analysis.edits:
        mask = keep[edit.ids]
        if not mask.all():
            if edit.private:
                own_copy(analysis, edit)
            edit.weight.set_array(np.compress(mask, edit.weight.array(), axis=edit.axis))
    for node, node_edit in analysis.node_edits:
        apply_node_edit(analysis, node, node_edit, keep)


def own_copy(analysis: Analysis, edit: WeightEdit) -> None:
    """Point ``edit.node`` at a private copy of its shared parameter, so that changing it leaves the others."""
    slot = reader_slot(analysis, edit)
    graph = analysis.model.graph
    names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    base = f"{edit.weight.name}.{edit.node.name or 'copy'}"
    name, k = base, 1
    while name in names:
        name, k = f"{base}.{k}", k + 1
    tensor = graph.initializer.add()
    tensor.CopyFrom(edit.weight.tensor)
    tensor.name = name
    edit.node.input[slot] = name
    edit.weight = Weight(name, "initializer", tensor, graph)
    edit.private = False
    analysis.index.weights[name] = edit.weight
    analysis.index.consumers.setdefault(name, []).append((edit.node, slot))


def apply_node_edit(analysis: Analysis, node: onnx.NodeProto, edit: NodeEdit, keep: np.ndarray) -> None:
    """Make ``node`` follow the kept channels as ``edit`` says."""
    if isinstance(edit, SetCount):
        kept = int(keep[edit.ids].sum())
        set_attr(node, edit.attr, [kept * s for s in edit.scale] if edit.scale else kept // edit.per)
    elif isinstance(edit, CountEntry):
        new = np.array(analysis.constant(edit.owner.input[edit.slot]), copy=True)
        new.reshape(-1)[edit.position] = int(keep[edit.ids].sum())
        replace_input(analysis, edit.owner, edit.slot, new, edit.suffix)
    elif isinstance(edit, SplitSizes):
        _split_sizes(analysis, node, edit, keep)
    elif isinstance(edit, SliceBounds):
        _slice_bounds(analysis, node, edit, keep)
    elif isinstance(edit, Reindex):
        position = np.cumsum(keep[edit.ids]) - 1
        chosen = [int(position[p]) for p in edit.picks if keep[edit.ids[p]]]
        replace_input(analysis, node, 1, np.array(chosen[0] if edit.scalar else chosen, dtype=edit.index_type),
                      "indices")
    else:
        raise TypeError(f"unknown node edit {edit!r}")


def _split_sizes(analysis: Analysis, node: onnx.NodeProto, edit: SplitSizes, keep: np.ndarray) -> None:
    new = np.array([int(keep[p].sum()) for p in edit.parts], dtype=np.int64)
    if edit.from_input:
        replace_input(analysis, node, 1, new, "split")
    elif get_attr(node, "split") is not None:
        set_attr(node, "split", new.tolist())
    elif len(set(new.tolist())) != 1:
        if opset_version(analysis.model) >= 13:
            replace_input(analysis, node, 1, new, "split")
        else:
            set_attr(node, "split", new.tolist())
        for attr in list(node.attribute):
            if attr.name == "num_outputs":
                node.attribute.remove(attr)


def _slice_bounds(analysis: Analysis, node: onnx.NodeProto, edit: SliceBounds, keep: np.ndarray) -> None:
    new_start = int(keep[edit.ids[:edit.start]].sum())
    new_end = new_start + int(keep[edit.ids[edit.start:edit.end]].sum())
    if len(node.input) < 3:  # opset < 10: attributes
        starts, ends = list(get_attr(node, "starts")), list(get_attr(node, "ends"))
        starts[edit.k], ends[edit.k] = new_start, new_end
        set_attr(node, "starts", starts)
        set_attr(node, "ends", ends)
        return
    starts, ends = analysis.constant(node.input[1]).copy(), analysis.constant(node.input[2]).copy()
    starts[edit.k], ends[edit.k] = new_start, new_end
    replace_input(analysis, node, 1, starts, "starts")
    replace_input(analysis, node, 2, ends, "ends")


def replace_input(analysis: Analysis, node: onnx.NodeProto, slot: int, values: np.ndarray, suffix: str) -> None:
    """Point input ``slot`` of ``node`` at a new initializer (shared constants stay intact)."""
    name = f"{node.name or node.output[0]}.{suffix}.pruned"
    graph = analysis.model.graph
    existing = next((i for i, init in enumerate(graph.initializer) if init.name == name), None)
    if existing is not None:  # a shared shape tensor rewritten again (e.g. q, k and v reading one Concat)
        del graph.initializer[existing]
    graph.initializer.append(numpy_helper.from_array(values, name))
    analysis.rewritten[name] = values
    while len(node.input) <= slot:
        node.input.append("")
    node.input[slot] = name


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Replace (or add) attribute ``name`` of ``node``."""
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))
