"""Transformers exported by torch.onnx (TorchScript and dynamo) from Hugging Face model code.

Fixtures: ``fixtures/transformers/*.onnx``, built by ``fixtures/export_transformers.py`` (random
weights, small configs). Heads and MLP neurons are removed; the oracle compares removal against
zeroing at several batch sizes and sequence lengths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune

from .oracle import list_groups, masked_and_removed, random_choice, relative_error

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "transformers"
EXPORTS = ["bert_ts", "bert_dynamo", "bert_sdpa_dynamo", "bert_fused", "bert_fused_fp16", "gpt2_ts", "llama_ts", "llama_dynamo", "vit_ts",
           "qwen2_ts", "phi3_ts", "gpt_neox_ts", "distilbert_ts", "gptj_ts", "gpt_neo_ts", "gpt_bigcode_ts", "falcon_mqa_ts", "t5_ts", "swin_ts"]
# prunable head groups and 128-neuron MLP groups per export (default: one of each per layer, two layers).
# T5: a stack's layers share one relative position bias, so their heads form one group (encoder self,
# decoder self, decoder cross); Swin: 2 stages of 2 blocks, MLPs of 128 and 256 neurons.
GROUPS = {"t5_ts": (3, 4), "swin_ts": (4, 2)}
SHAPES = [(1, 5), (2, 16), (1, 33), (2, 7)]  # (batch, sequence): 3 sequence lengths, 2 batch sizes


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / f"{name}.onnx"))


def feeds(model: onnx.ModelProto, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        if value.name == "pixel_values":
            out[value.name] = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        elif value.name == "input_ids":
            out[value.name] = rng.integers(0, 256, (batch, seq)).astype(np.int64)
        elif value.name == "decoder_input_ids":
            out[value.name] = rng.integers(0, 256, (batch, seq + 3)).astype(np.int64)
        elif value.name == "attention_mask":
            mask = np.ones((batch, seq), dtype=np.int64)
            mask[0, seq - seq // 4:] = 0  # some padding in the first row
            out[value.name] = mask
    return out


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def shapes_of(name: str) -> list[tuple[int, int]]:
    return [(1, 0), (2, 0)] if name.startswith(("vit", "swin")) else SHAPES


def head_groups(model: onnx.ModelProto) -> list[dict]:
    return [g for g in list_groups(model) if ({"Reshape", "Softmax"} <= set(g["ops"]) or "Attention" in g["ops"])
            and g["prunable"]]


@pytest.mark.parametrize("name", EXPORTS)
def test_heads_and_neurons_are_prunable(name):
    model = load(name)
    groups = [g for g in list_groups(model) if not g["frozen"]]
    heads = head_groups(model)
    n_heads, n_mlp = GROUPS.get(name, (2, 2))
    assert len(heads) == n_heads, f"{name}: expected {n_heads} prunable attention head groups, got {heads}"
    mlp = [g for g in groups if g not in heads and g["prunable"] == 128]
    assert len(mlp) == n_mlp, f"{name}: expected {n_mlp} MLP neuron groups, got {groups}"


@pytest.mark.parametrize("name", EXPORTS)
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])  # seed 1: the slow suite
def test_oracle(name, seed):
    model = load(name)
    choice = random_choice(model, 0.5, seed)
    assert choice, "nothing was chosen"
    masked, removed = masked_and_removed(model, choice)
    onnx.checker.check_model(removed, full_check=True)
    assert sum(t.ByteSize() for t in removed.graph.initializer) < sum(t.ByteSize() for t in model.graph.initializer)
    for batch, seq in shapes_of(name):
        feed = feeds(model, batch, seq, seed)
        want, got = run(masked, feed), run(removed, feed)
        assert [w.shape for w in want] == [g.shape for g in got]
        assert relative_error(want, got) < 1e-4, (name, batch, seq)


# --head-sparsity per export and head units before -> after (GQA: a K/V head with its query heads;
# rounded down per layer: 0.25 of 2 units removes none)
HEAD_UNITS = {name: (0.5, {2: 1}) for name in ("llama_ts", "llama_dynamo", "qwen2_ts", "phi3_ts")}
HEAD_UNITS["swin_ts"] = (0.25, {2: 2, 4: 3})
HEAD_UNITS["gpt_bigcode_ts"] = (0.25, {36: 35})  # multi-query: 4 query heads (+ 32 K/V channels that stay)
HEAD_UNITS["falcon_mqa_ts"] = (0.5, {6: 4})  # multi-query, fused [H + 2] heads: 2 of the 4 query heads go
NEURONS = {128: 64, 256: 128}


@pytest.mark.parametrize("name", EXPORTS)
def test_cli_prunes_requested_share(name, tmp_path):
    src = FIXTURES / f"{name}.onnx"
    out = tmp_path / "pruned.onnx"
    head_sparsity, units = HEAD_UNITS.get(name, (0.25, {4: 3}))
    config = onnxprune.PruneConfig(structured=True, sparsity=0.5, head_sparsity=head_sparsity)
    _, result = onnxprune.prune(src, out, config=config)
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    groups = result.passes[0].details["groups"]
    heads = [g for g in groups if g["channels_before"] in units]
    neurons = [g for g in groups if g["channels_before"] in NEURONS]
    n_heads, n_mlp = GROUPS.get(name, (2, 2))
    assert len(heads) == n_heads and all(g["channels_after"] == units[g["channels_before"]] for g in heads), groups
    assert len(neurons) >= n_mlp and all(g["channels_after"] == NEURONS[g["channels_before"]] for g in neurons), groups
    original = load(name)
    for batch, seq in shapes_of(name):
        feed = feeds(original, batch, seq)
        want, got = run(original, feed), run(pruned, feed)
        assert [w.shape for w in want] == [g.shape for g in got]
        assert all(np.isfinite(g).all() for g in got)


@pytest.mark.parametrize("options", [
    {"sparsity": 0.5, "include_embeddings": True},
    {"sparsity": 0.5, "include_embeddings": True, "scope": "global"},
    {"pattern": "2:4", "include_embeddings": True},
    {"sparsity": 0.5},
    {"structured": True, "sparsity": 0.5, "head_sparsity": 0.25},
])
def test_tied_embedding_copies_stay_tied(options):
    """GPT-2's LM head is the token embedding; the exporter stores it twice (transposed for MatMul)."""
    model = load("gpt2_ts")
    pruned, result = onnxprune.prune(model, **options)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in pruned.graph.initializer}
    embedding = weights["model.transformer.wte.weight"]
    head = weights[next(n.input[1] for n in pruned.graph.node if n.name == "/model/lm_head/MatMul")]
    np.testing.assert_array_equal(embedding, head.T)
    details = result.to_dict()["passes"][0]["details"]
    if options.get("include_embeddings"):
        assert (embedding == 0).mean() > 0.3
        assert any(t.get("tied_to") for t in details["tensors"])
        if "pattern" in options:  # 2:4 along the head's reduction axis (hidden), in both copies
            assert ((head.reshape(-1, 4, head.shape[1]) != 0).sum(axis=1) <= 2).all()
    elif not options.get("structured"):
        assert (embedding != 0).all()
        assert any("tied to the embedding" in s["reason"] for s in details["skipped"])


def test_runtime_path_imports_no_heavy_framework():
    """Pruning a transformer (symbolic shape inference included) must not import torch or transformers."""
    import subprocess
    import sys

    code = ("import sys, onnxprune; onnxprune.prune(sys.argv[1], structured=True, sparsity=0.5, head_sparsity=0.5); "
            "print(sorted(m for m in ('torch', 'transformers', 'timm', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(FIXTURES / "llama_ts.onnx")], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_sdpa_decomposition_key_transpose_is_simplified():
    """The dynamo exporter's SDPA transposes K via Reshape(merge batch and heads) -> Transpose -> Reshape;
    canonicalisation turns it into one Transpose (exactly), so heads stay visible."""
    from onnxprune.passes.canonical import merge_batched_transposes

    model = load("bert_sdpa_dynamo")
    simplified = onnx.ModelProto()
    simplified.CopyFrom(model)
    assert merge_batched_transposes(simplified) == 2  # one per layer
    feed = feeds(model, 2, 9)
    assert relative_error(run(model, feed), run(simplified, feed)) < 1e-6


@pytest.mark.parametrize("head_sparsity", [pytest.param(0.0, marks=pytest.mark.slow), 0.5])  # 0.0: the slow suite
def test_target_macs_counts_pinned_heads(tmp_path, head_sparsity):
    """--target-macs allocates MLP neurons; heads stay at --head-sparsity and count toward the target."""
    model = load("llama_ts")
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=rng.integers(0, 256, (8, 16)).astype(np.int64),
             attention_mask=np.ones((8, 16), np.int64))
    config = onnxprune.PruneConfig(structured=True, target_macs=0.6, head_sparsity=head_sparsity,
                                   calibration_data=str(calib))
    _, result = onnxprune.prune(model, config=config)
    details = result.passes[0].details
    assert abs(details["macs_after"] / details["macs_before"] - 0.6) < 0.02
    heads = [g["channels_after"] for g in details["groups"] if g["channels_before"] == 2]
    assert heads == ([1, 1] if head_sparsity else [2, 2])


def test_sensitivity_sees_heads():
    from onnxprune.config import PruneConfig
    from onnxprune.passes.structured import prepare_for_analysis
    from onnxprune.sensitivity import measure

    model = load("llama_ts")
    prepare_for_analysis(model)
    result = measure(model, [feeds(model, 2, 8)], PruneConfig(structured=True), ratios=(0.5,))
    assert len(result["head_groups"]) == 2
    assert {g["id"] for g in result["groups"]} >= set(result["head_groups"])


def test_inspect_lists_heads_of_an_export():
    from onnxprune.passes.structured import describe_groups

    groups = describe_groups(load("llama_ts"))["groups"]
    assert sum(1 for g in groups if "Softmax" in g["ops"]) == 2
