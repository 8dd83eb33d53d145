"""MACs of a pruning plan counted on a light copy (large tensors without their bytes) against the pruned copy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.analysis.cost import total_macs
from onnxprune.analysis.groups import analyse, build_groups
from onnxprune.config import PruneConfig
from onnxprune.passes.structured import allocate_safe, prepare_for_analysis, remove
from onnxprune.plan_macs import light_copy, plan_macs
from onnxprune.scoring import unit_scores
from onnxprune.sensitivity import prune_groups, pruned_macs, uniform_macs

from .conftest import FIXTURES

CASES = ["cnn.onnx", "structured/concat_skip.onnx", "structured/depthwise.onnx", "structured/if_subgraph.onnx",
         "arch/mobilenetv2.onnx", "arch/resnet50.onnx", "transformers/bert_ts.onnx", "transformers/llama_ts.onnx",
         "recurrent/lstm_bidirectional.onnx", "int32/paddle_heads.onnx"]


def _model(name: str) -> onnx.ModelProto:
    model = onnx.load(str(FIXTURES / name))
    prepare_for_analysis(model)
    return model


def _copy_count(model: onnx.ModelProto, config: PruneConfig) -> int:
    """The uniform plan's MACs as counted before: on a pruned copy of the whole model."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    analysis = analyse(copy, None, config.exclude, config.prune_layernorm, config.overrides)
    groups = build_groups(analysis)
    remove(analysis, allocate_safe(analysis, groups, unit_scores(analysis, groups, "l1", config.seed), config))
    return total_macs(copy, None)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("sparsity, heads", [(0.3, 0.0), (0.8, 0.5)])
def test_the_light_count_is_the_pruned_copy_count(name, sparsity, heads):
    config = PruneConfig(structured=True, sparsity=sparsity, head_sparsity=heads)
    model = _model(name)
    before = model.SerializeToString()
    analysis = analyse(model, None, config.exclude, config.prune_layernorm, config.overrides)
    groups = build_groups(analysis)
    keep = allocate_safe(analysis, groups, unit_scores(analysis, groups, "l1", config.seed), config)
    assert not keep.all()
    light = plan_macs(model, analysis, keep, None, config.exclude, config.prune_layernorm, config.overrides)
    assert light is not None  # counted on the light copy, not on the fallback
    assert light == uniform_macs(model, config) == _copy_count(model, config) < total_macs(model)
    assert model.SerializeToString() == before  # the model is only read


def test_pruned_macs_is_the_count_of_prune_groups():
    config = PruneConfig(structured=True, sparsity=0.5)
    model = _model("arch/mobilenetv2.onnx")
    analysis = analyse(model, None, config.exclude, config.prune_layernorm)
    gids = [g.id for g in build_groups(analysis) if g.units]
    ratios = {gid: (0.125, 0.5, 0.875)[i % 3] for i, gid in enumerate(gids)}
    assert pruned_macs(model, ratios, config) == total_macs(prune_groups(model, ratios, config))


def test_an_analysis_of_another_model_is_not_counted_on_the_light_copy():
    """The channel ids of ``keep`` belong to the analysis given: a light copy whose analysis differs is refused."""
    config = PruneConfig(structured=True, sparsity=0.5)
    model, other = _model("cnn.onnx"), _model("cnn_opset21.onnx")
    del other.graph.node[-1].output[:]  # the last node feeds nothing: a different graph, other edits
    other.graph.node[-1].output.append("unused")
    analysis = analyse(model, None, config.exclude, config.prune_layernorm)
    keep = np.ones(analysis.num_channels, dtype=bool)
    assert plan_macs(model, analysis, keep, None) == total_macs(model)
    assert plan_macs(other, analysis, keep, None) is None


def test_the_light_copy_keeps_dims_not_bytes():
    model = _model("arch/resnet50.onnx")
    light = light_copy(model)
    big = [t for t in model.graph.initializer if np.prod(t.dims) > 4096]
    assert big and light.ByteSize() < model.ByteSize() / 3
    dims = {t.name: list(t.dims) for t in light.graph.initializer}
    assert all(dims[t.name] == list(t.dims) for t in model.graph.initializer)
