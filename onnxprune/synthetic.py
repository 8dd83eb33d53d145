"""Synthetic inputs on which the original model runs: shapes for dynamic dims and values for integer inputs.

Dynamic dims are chosen so that the *original* model runs. Candidates come from the graph itself
(sizes in metadata and doc strings, the product of strides from an input to its deepest feature
map, fixed dims of sibling inputs, dim names shared between inputs), then common sizes; each is
tried in onnxruntime, the most likely first, at most :data:`MAX_TRIALS` runs of one session.
Integer inputs take the values the graph compares them with, stay within the table they index,
or are small positive counts. ``prune`` and ``inspect`` resolve shapes through :func:`resolve_inputs`,
so both analyse the model at the same sizes.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .dynamic_dims import DimPlan, graph_constants, nodes_in_order
from .errors import InputDataError, flag
from .graph import get_attr
from .model import PROTOBUF_LIMIT
from .sessions import create_session, session_options
from .specs import ORT_TYPES, InputSpec, input_specs

#: onnxruntime runs of the original model that shape resolution may spend (one session for all).
MAX_TRIALS = 8
PASS_THROUGH = {"Cast", "CastLike", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"}
COMPARE_OPS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}
#: (op, input index) that take a count or a size: an integer input there is a small positive number
COUNT_INPUTS = {("Range", 1), ("Range", 2), ("Tile", 1), ("Expand", 1), ("ConstantOfShape", 0)}


@dataclass
class Resolution:
    """Concrete shapes for every input, integer values read from the graph, and how they were found."""

    shapes: dict[str, list[int]]
    how: str
    values: dict[str, str] = field(default_factory=dict)
    choice: dict[str, int] = field(default_factory=dict)
    trials: int = 0
    ran: bool | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": {k: list(v) for k, v in self.shapes.items()}, "how": self.how, "values": dict(self.values),
                "trials": self.trials, "ran": self.ran, "error": self.error}


def describe_resolution(res: dict[str, Any]) -> str:
    """One line: the synthetic input shapes, how they were found and whether the original model ran on them."""
    shapes = ", ".join(f"{k} {'x'.join(map(str, s)) or 'scalar'}" for k, s in res["shapes"].items())
    values = "".join(f"; {k} {v}" for k, v in res.get("values", {}).items())
    tries = f"{res['trials']} tr{'y' if res['trials'] == 1 else 'ies'}"
    ran = {True: f"the original model runs on them ({tries})", None: "not run",
           False: f"the original model ran on none of {tries}: {res.get('error')}"}[res.get("ran")]
    return f"synthetic inputs: {shapes} ({res['how']}{values}); {ran}"


def resolve_inputs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, *, seed: int = 0,
                   path: str | os.PathLike | None = None) -> Resolution:
    """Shapes (and integer values) for synthetic inputs on which the original model runs.

    ``input_shapes`` win; dims they leave open are resolved from the graph and
    checked by running the model (``path`` when given, which handles external data). Never raises
    for a model that does not run: the first candidate is returned with ``ran=False``.
    """
    specs = input_specs(model)
    given = _check_given(specs, dict(input_shapes or {}))
    plan = DimPlan(model, specs, given)
    rules = integer_rules(model, specs)
    candidates = plan.candidates()
    choices = _value_choices(rules)
    first = Resolution(candidates[0][1], candidates[0][0], _values_text(rules, choices[0]), choices[0])
    if not plan.free and not any(rule[0] == "values" for rule in rules.values()):
        return first  # nothing was guessed
    return _try_candidates(model, path, specs, rules, candidates, choices, seed, first)


def _check_given(specs: list[InputSpec], input_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    names = {spec.name for spec in specs}
    for name in input_shapes:
        if name not in names:
            raise InputDataError(f"{{input_shapes}} names unknown input {name!r} (inputs: {', '.join(sorted(names))})",
                                 options=("input_shapes",))
    for spec in specs:
        given = input_shapes.get(spec.name)
        if given is None:
            continue
        if len(given) != len(spec.shape):
            raise InputDataError(f"{{input_shapes}} {spec.name}: rank {len(given)} but the model input has rank "
                                 f"{len(spec.shape)}", options=("input_shapes",))
        for axis, (want, have) in enumerate(zip(given, spec.shape)):
            if isinstance(have, int) and have > 0 and have != want:
                raise InputDataError(f"{{input_shapes}} {spec.name}: axis {axis} is fixed to {have} in the model, "
                                     f"got {want}", options=("input_shapes",))
    return input_shapes


def _try_candidates(model, path, specs, rules, candidates, choices, seed, first: Resolution) -> Resolution:
    """Run the original model on each candidate until one works (at most MAX_TRIALS runs)."""
    try:
        session = _session(model, path)
    except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot load: nothing to choose by
        first.ran, first.error = False, f"onnxruntime cannot load it ({_first_line(exc)})"
        return first
    trials, error = 0, None
    for (how, shapes), choice in itertools.islice(itertools.product(candidates, choices), MAX_TRIALS):
        try:
            feeds = synthesize_inputs(specs, shapes, None, seed, rules=rules, choice=choice)
        except InputDataError as exc:  # a type nothing can be synthesised for (strings): no run can tell
            first.ran, first.error = False, exc.render(flag)  # report text: the CLI's words
            return first
        trials += 1
        try:
            session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - sizes or values the model does not accept
            error = error or f"{how}: {_first_line(exc)}"
            continue
        return Resolution(shapes, how, _values_text(rules, choice), choice, trials, True)
    first.trials, first.ran, first.error = trials, False, error
    return first


def _session(model: onnx.ModelProto, path):
    options = session_options(threads=1, inter_threads=1, log_level=4, spinning=False)
    if path is not None:
        return create_session(path, options)
    if model.ByteSize() >= PROTOBUF_LIMIT:
        raise InputDataError("the model is too large to run from memory")
    return create_session(model, options)


def _first_line(exc: BaseException) -> str:
    """The part of an onnxruntime message that names the failing node and why (its source path dropped)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"/\S+?\.(cc|h|cpp):\d+\s*", "", text)
    return text[:400]


# --------------------------------------------------------------------------------------
# Integer inputs
# --------------------------------------------------------------------------------------


def integer_rules(model: onnx.ModelProto | None, specs: list[InputSpec]) -> dict[str, tuple]:
    """How to fill each integer input, read from the graph.

    ``("values", [...])``: a small input compared with constants (Equal/Less/Greater...); ``("index", rows)``:
    a Gather index into a constant table; ``("count",)``: a Range/Tile/Expand count; ``("ones",)``: a mask;
    ``("random",)``: anything else, drawn from [0, 10).
    """
    rules: dict[str, tuple] = {}
    ints = [s for s in specs if ORT_TYPES.get(s.type) is not None and np.issubdtype(ORT_TYPES[s.type], np.integer)]
    if not ints:
        return rules
    uses = _uses(model) if model is not None else {}
    consts = graph_constants(model, max_elements=64) if model is not None else {}
    tables = _table_rows(model) if model is not None else {}
    for spec in ints:
        if "mask" in spec.name.lower():
            rules[spec.name] = ("ones",)
            continue
        compared, rows, count = [], None, False
        for node, index in _reached_uses(spec.name, uses):
            other = node.input[1 - index] if node.op_type in COMPARE_OPS and index < 2 else None
            if other in consts:
                compared.extend(v for v in consts[other].reshape(-1).tolist() if v not in compared)
            elif node.op_type == "Gather" and index == 1 and node.input[0] in tables:
                table, axis = tables[node.input[0]], get_attr(node, "axis", 0)
                if -len(table) <= axis < len(table):
                    rows = min(rows or 1 << 62, int(table[axis]))
            elif (node.op_type, index) in COUNT_INPUTS:
                count = True
        small = all(d is not None for d in spec.shape) and int(np.prod(spec.shape or [1])) <= 4
        if compared and small:
            rules[spec.name] = ("values", [int(v) for v in compared[:4]])
        elif rows is not None:
            rules[spec.name] = ("index", max(rows, 1))
        elif count:
            rules[spec.name] = ("count",)
        else:
            rules[spec.name] = ("random",)
    return rules


def _values_text(rules: dict[str, tuple], choice: dict[str, int]) -> dict[str, str]:
    """What each integer input was filled with, and why (for the report)."""
    text = {}
    for name, rule in rules.items():
        if rule[0] == "values":
            text[name] = f"= {rule[1][choice.get(name, 0)]} (the graph compares it with {'/'.join(map(str, rule[1]))})"
        elif rule[0] == "index":
            text[name] = f"in [0, {rule[1]}) (rows of the table it indexes)"
        elif rule[0] == "count":
            text[name] = "in [1, 4] (a count)"
        elif rule[0] == "ones":
            text[name] = "ones (a mask)"
    return text


def _value_choices(rules: dict[str, tuple]) -> list[dict[str, int]]:
    """Which compared value each such input takes, one dict per trial: the first values, then the others."""
    compared = {name: rule[1] for name, rule in rules.items() if rule[0] == "values"}
    depth = max((len(v) for v in compared.values()), default=1)
    return [{name: min(i, len(v) - 1) for name, v in compared.items()} for i in range(depth)]


def _uses(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in nodes_in_order(model.graph):
        for index, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node, index))
    return uses


def _reached_uses(name: str, uses) -> list[tuple[onnx.NodeProto, int]]:
    """Uses of ``name`` and of what Cast/Identity/Squeeze/Reshape... make of it."""
    found, todo, seen = [], [name], {name}
    while todo:
        for node, index in uses.get(todo.pop(), []):
            if node.op_type in PASS_THROUGH and index == 0:
                todo.extend(o for o in node.output if o and o not in seen)
                seen.update(node.output)
            else:
                found.append((node, index))
    return found


def _table_rows(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Dims of the constant tables (initializers, Constant nodes) by name."""
    dims: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in nodes_in_order(model.graph):
        if node.op_type == "Constant" and node.output:
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            if tensor is not None:
                dims[node.output[0]] = list(tensor.dims)
    return {name: d for name, d in dims.items() if d}


def synthesize_inputs(specs: list[InputSpec], shapes: dict[str, list[int]], model: onnx.ModelProto | None,
                      seed: int, *, rules: dict[str, tuple] | None = None,
                      choice: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random inputs matching the specs: floats ~ N(0,1), integers by :func:`integer_rules`, masks and bools = 1."""
    rng = np.random.default_rng(seed)
    rules = integer_rules(model, specs) if rules is None else rules
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        dtype = ORT_TYPES.get(spec.type)
        if dtype is None:
            raise InputDataError(f"cannot synthesise input {spec.name!r} of type {spec.type}; give {{data}}",
                                 options=("data",))
        shape = shapes[spec.name]
        rule = rules.get(spec.name, ("random",))
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_ or rule[0] == "ones":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif rule[0] == "values":
            feeds[spec.name] = np.full(shape, rule[1][(choice or {}).get(spec.name, 0)], dtype=dtype)
        elif rule[0] == "count":
            feeds[spec.name] = rng.integers(1, 5, size=shape).astype(dtype)
        else:
            high = rule[1] if rule[0] == "index" else 10
            feeds[spec.name] = rng.integers(0, max(high, 1), size=shape).astype(dtype)
    return feeds
