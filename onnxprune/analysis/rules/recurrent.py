"""Recurrent layers (LSTM, GRU, RNN): hidden units are channels."""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import get_attr
from ..registry import Analysis, Freeze, SetCount, producer, rule
from ..weights import RECURRENT_GATES
from ._common import _only_slot, _rank, _set
from .shape_plumbing import _count_entry, _shape_entry


@producer("LSTM", "GRU", "RNN")
def recurrent_produce(a: Analysis, node: onnx.NodeProto) -> None:
    """Give the hidden units of a recurrent layer with constant W/R channel ids (see above)."""
    hidden = int(get_attr(node, "hidden_size", 0) or 0)
    gates = RECURRENT_GATES[node.op_type]
    w, r = a.weight(node.input[1])[0], a.weight(node.input[2])[0]
    if hidden <= 0 or w is None or r is None or len(r.shape) != 3 or r.shape[1:] != (gates * hidden, hidden):
        return
    ids = a.new_space(node, hidden)
    rows = np.tile(ids, gates)
    a.add_weight_edit(node.input[1], 1, rows, "producer", node)
    a.add_weight_edit(node.input[2], 1, rows, "producer", node)
    a.add_weight_edit(node.input[2], 2, ids, "consumer", node)  # the recurrence reads the unit's output
    optional = {3: np.tile(ids, 2 * gates), 7: np.tile(ids, 3)}  # B (Wb and Rb), P (LSTM peepholes)
    for slot, slot_ids in optional.items():
        if len(node.input) > slot and node.input[slot]:
            a.add_weight_edit(node.input[slot], 1, slot_ids, "param", node)
    for slot in (5, 6):  # initial_h, initial_c
        if len(node.input) > slot and node.input[slot]:
            _initial_state(a, node, slot, ids)
    a.node_edits.append((node, SetCount("hidden_size", ids)))
    a.mark(ids, node.op_type)
    for slot, axis in ((0, 3), (1, 2), (2, 2)):
        if len(node.output) > slot and node.output[slot]:
            _set(a, node, axis, ids, slot)


def _initial_state(a: Analysis, node: onnx.NodeProto, slot: int, ids: np.ndarray) -> None:
    """A constant initial state follows the units; zeros made by ConstantOfShape get their size rewritten."""
    name = node.input[slot]
    if a.weight(name)[0] is not None:
        a.add_weight_edit(name, 2, ids, "param", node)
        return
    producer = a.index.producer.get(name)
    if producer is None:
        a.freeze(ids, f"{node.op_type} {node.name!r}: the initial state {name!r} is a graph input "
                      "(its shape is part of the interface)")
        return
    if producer.op_type != "ConstantOfShape":
        a.freeze(ids, f"{node.op_type} {node.name!r}: the initial state {name!r} is computed at run time")
        return
    reader, position, value = _shape_entry(a, producer, 2, slot=0)
    if reader is None or value != len(ids):
        a.freeze(ids, f"{node.op_type} {node.name!r}: the size of the initial state {name!r} is read at run time")
        return
    _count_entry(a, producer, reader, position, ids)


@rule("LSTM", "GRU", "RNN", does="consumes input features (W axis 2); its hidden units are new channels (gate rows "
      "of W/R/B/P, R columns, initial states, `hidden_size`); both directions' unit j go together")
def recurrent_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis != _rank(a, node.input[0]) - 1 or int(get_attr(node, "layout", 0)) not in (0, 1):
        raise Freeze(f"{node.op_type} {node.name!r}: channels are not on the feature axis of X")
    a.add_weight_edit(node.input[1], 2, ann.ids, "consumer", node)
    a.mark(ann.ids, node.op_type)
    recurrent_produce(a, node)

