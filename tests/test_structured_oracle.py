"""The oracle on every fixture under fixtures/structured: masked == removed at several random channel choices."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from .conftest import FIXTURES
from .oracle import list_groups, masked_and_removed, random_choice, relative_error

sys.path.insert(0, str(FIXTURES))
import build_structured_fixtures as builder

NAMES = sorted(builder.FIXTURES)
RUNNABLE = [n for n in NAMES if n != "custom_op"]  # com.example::FancyNorm has no kernel
#: fixture -> a phrase every frozen-group reason list must contain (besides the classifier output)
FROZEN = {
    "custom_op": "custom-domain op",
    "if_subgraph": "control-flow op If",
    "layernorm": "LayerNormalization",
    "concat_skip": "come from no prunable layer",
}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / "structured" / f"{name}.onnx"))


def feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value or 2 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def run(model: onnx.ModelProto, inputs) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, inputs)


def signature(model: onnx.ModelProto):
    return [(v.name, str(v.type)) for v in [*model.graph.input, *model.graph.output]]


@pytest.mark.parametrize("name", NAMES)
def test_fixture_file_is_current(name):
    assert load(name).SerializeToString() == builder.FIXTURES[name]().SerializeToString(), (
        "run python fixtures/build_structured_fixtures.py")
    assert (FIXTURES / "structured" / f"{name}.onnx").stat().st_size < 200_000


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("fraction,seed", [(0.25, 0), (0.5, 1), (0.75, 2)])
def test_masked_equals_removed(name, fraction, seed):
    model = load(name)
    choice = random_choice(model, fraction, seed)
    assert choice, "every fixture has prunable channels"
    masked, removed = masked_and_removed(model, choice)
    onnx.checker.check_model(removed, full_check=True)
    assert signature(removed) == signature(model)
    x = feeds(model, seed)
    out_masked, out_removed = run(masked, x), run(removed, x)
    assert [o.shape for o in out_removed] == [o.shape for o in run(model, x)]
    assert relative_error(out_masked, out_removed) <= 1e-5
    assert sum(t.ByteSize() for t in removed.graph.initializer) < sum(t.ByteSize() for t in model.graph.initializer) \
        or name == "constant_weights"


def test_custom_op_model_stays_valid():
    model = load("custom_op")
    _, removed = masked_and_removed(model, random_choice(model, 0.5, 0))
    onnx.checker.check_model(removed)
    frozen = [g for g in list_groups(removed) if any("custom-domain" in r for r in g["frozen"])]
    assert frozen and frozen[0]["channels"] == 8 and frozen[0]["prunable"] == 0  # what FancyNorm reads stays
    assert sum(g["channels"] for g in list_groups(removed)) < sum(g["channels"] for g in list_groups(model))
    assert fancy_shape(removed) == fancy_shape(model) == ["N", 8, 16, 16]  # the exporter's value_info survives


def fancy_shape(model: onnx.ModelProto) -> list:
    fancy = next(n for n in model.graph.node if n.op_type == "FancyNorm")
    info = next(v for v in model.graph.value_info if v.name == fancy.output[0])
    return [d.dim_value or d.dim_param for d in info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_frozen_groups_name_the_reason(name):
    reasons = [r for g in list_groups(load(name)) for r in g["frozen"]]
    assert any(FROZEN[name] in r for r in reasons), reasons
    assert any("reaches graph output 'logits'" in r for r in reasons)


def test_choice_validation():
    model = load("conv_bn_relu")
    groups = list_groups(model)
    with pytest.raises(ValueError, match="no channel group"):
        masked_and_removed(model, {999: [0]})
    with pytest.raises(ValueError, match="out of range"):
        masked_and_removed(model, {groups[0]["id"]: [groups[0]["prunable"]]})


def test_removing_everything_keeps_one_channel_per_tensor():
    model = load("split_slice")
    choice = {g["id"]: list(range(g["prunable"])) for g in list_groups(model) if g["prunable"]}
    masked, removed = masked_and_removed(model, choice)
    onnx.checker.check_model(removed, full_check=True)
    x = feeds(model)
    assert relative_error(run(masked, x), run(removed, x)) <= 1e-5
