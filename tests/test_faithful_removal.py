"""Faithful removal: what removed channels still output is folded into consumer biases."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.analysis.groups import analyse
from onnxprune.compensation import fold_removed_constants, zeroed_model
from onnxprune.passes.structured import remove

from .conftest import FIXTURES
from .oracle import choice_to_keep, prepared, random_choice, relative_error


def feeds_for(model, batch=4, seed=0):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else batch for d in i.shape]).astype(np.float32)
            for i in session.get_inputs()}


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def random_keep(model, seed):
    """The channel ids (as the analysis of ``model`` numbers them) of a random choice of half of each group."""
    return choice_to_keep(analyse(prepared(model)), random_choice(model, 0.5, seed))


def removed_model(model, keep, fold: bool):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    summary = None
    if fold:
        summary = fold_removed_constants(copy, keep, [feeds_for(model, seed=10), feeds_for(model, seed=11)])
    remove(analyse(copy), keep)
    onnx.checker.check_model(copy, full_check=True)
    return copy, summary


@pytest.mark.parametrize("name", ["mlp_gemm.onnx", "mlp_matmul.onnx", "mlp_dynamic.onnx"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removed_equals_zeroed_exactly_when_constants_fold_exactly(name, seed):
    model = onnx.load(str(FIXTURES / name))
    keep = random_keep(model, seed)
    zeroed = zeroed_model(model, keep)
    folded, summary = removed_model(model, keep, fold=True)
    assert summary["consumers"] > 0 and summary["approximate"] == 0
    feeds = feeds_for(model)
    assert relative_error(run(zeroed, feeds), run(folded, feeds)) <= 1e-5
    unfolded, _ = removed_model(model, keep, fold=False)
    assert relative_error(run(zeroed, feeds), run(unfolded, feeds)) > 1e-3, "the biases matter"


@pytest.mark.parametrize("seed", [0, 1])
def test_folding_brings_cnn_closer_to_zeroed_and_original(seed):
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    keep = random_keep(model, seed)
    zeroed = zeroed_model(model, keep)
    folded, summary = removed_model(model, keep, fold=True)
    unfolded, _ = removed_model(model, keep, fold=False)
    assert summary["approximate"] > 0  # padded 3x3 convs read zeros at the borders
    feeds = feeds_for(model)
    assert relative_error(run(zeroed, feeds), run(folded, feeds)) < relative_error(run(zeroed, feeds),
                                                                                   run(unfolded, feeds))


def test_cli_pass_folds_by_default_and_improves_fidelity():
    _, with_fold = onnxprune.prune(FIXTURES / "cnn.onnx", structured=True, sparsity=0.5, validate=True)
    _, without = onnxprune.prune(FIXTURES / "cnn.onnx", structured=True, sparsity=0.5, validate=True,
                                 fold_constants=False)
    details = with_fold.to_dict()["passes"][0]["details"]
    assert details["folded_constants"]["consumers"] > 0
    assert with_fold.validation["worst"]["rel_l2"] < without.validation["worst"]["rel_l2"]


@pytest.mark.parametrize("name, runs_session", [("llama_ts", False), ("bert_ts", True)])
def test_bias_free_paths_skip_the_measuring_session(monkeypatch, name, runs_session):
    """Removed channels behind bias-free producers and 0 -> 0 ops (LLaMA: MatMul, SiLU gate * up, P.V) are
    exactly zero: nothing to fold, no onnxruntime run. With biases (BERT) the values are measured."""
    from onnxprune import compensation

    model = prepared(onnx.load(str(FIXTURES / "transformers" / f"{name}.onnx")))
    analysis = analyse(model)
    keep = choice_to_keep(analysis, random_choice(model, 0.5, 0))
    calls = []
    real = compensation.inference_session
    monkeypatch.setattr(compensation, "inference_session", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 256, (2, 8)).astype(np.int64), "attention_mask": np.ones((2, 8), np.int64)}
    summary = fold_removed_constants(model, keep, [feed])
    assert bool(calls) == runs_session
    if not runs_session:
        assert summary["consumers"] == 0
