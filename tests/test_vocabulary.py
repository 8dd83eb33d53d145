"""Vocabulary pruning: which tables and heads are found, which rows/columns stay, and that the pruned model
computes the original's logits on the kept tokens (the filler elsewhere), with the interface kept."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxprune import prune
from onnxprune.analysis.cost import node_macs, total_macs
from onnxprune.analysis.vocab import find_vocabulary
from onnxprune.config import ValidateConfig
from onnxprune.passes.vocabulary import METADATA_KEY

from .conftest import FIXTURES, listing, run_cli

TRANSFORMERS = FIXTURES / "transformers"
LARGE = TRANSFORMERS / "llama_vocab32k_ts.onnx"
LARGE_CALIBRATION = TRANSFORMERS / "llama_vocab32k_calibration.npz"
KEPT = np.array([0, 3, 7, 8, 20, 41, 99, 100, 128, 200, 254, 255])
LOWEST = np.finfo(np.float32).min


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def token_feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "decoder_input_ids": ids[:, ::-1].copy()}


def pruned(path, tmp_path, **options) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    keep = tmp_path / "keep.txt"
    keep.write_text(", ".join(map(str, KEPT)) + "\n")
    original = onnx.load(str(path))
    model, result = prune(str(path), keep_tokens=str(keep), **options)
    onnx.checker.check_model(model, full_check=True)
    details = next(p.details for p in result.passes if p.name == "vocabulary")
    return original, model, details


@pytest.mark.parametrize("name, head, tied", [
    ("gpt2_ts", "onnx::MatMul_591", "copy"), ("llama_ts", "onnx::MatMul_706", None),
    ("llama_dynamo", "val_261", None), ("qwen2_ts", "onnx::MatMul_718", None), ("phi3_ts", "onnx::MatMul_893", None),
    ("gptj_ts", "onnx::MatMul_745", None)])
def test_finds_the_embedding_and_the_lm_head(name, head, tied):
    vocab = find_vocabulary(onnx.load(str(TRANSFORMERS / f"{name}.onnx")))
    assert vocab.found and (vocab.size, vocab.hidden) == (256, 64)
    assert [e.inputs for e in vocab.embeddings] == [["input_ids"]]
    assert [(h.weight, h.vocab_axis, h.output, h.tied) for h in vocab.heads] == [(head, 1, "logits", tied)]


def test_phi3_gate_up_projection_of_vocabulary_width_is_not_an_lm_head():
    vocab = find_vocabulary(onnx.load(str(TRANSFORMERS / "phi3_ts.onnx")))
    assert [h.node for h in vocab.heads] == ["/model/lm_head/MatMul"]  # gate_up_proj is [64, 256] too


def test_position_and_token_type_tables_are_not_vocabulary():
    vocab = find_vocabulary(onnx.load(str(TRANSFORMERS / "bert_ts.onnx")))
    assert [e.weight for e in vocab.embeddings] == ["model.embeddings.word_embeddings.weight"]
    assert vocab.heads == []
    assert any("position_embeddings" in n and "computed tensor (Slice" in n for n in vocab.notes)
    assert any("token_type_embeddings" in n for n in vocab.notes)


def test_two_inputs_share_one_table():
    vocab = find_vocabulary(onnx.load(str(TRANSFORMERS / "t5_ts.onnx")))
    assert [(e.weight, e.inputs, len(e.gathers)) for e in vocab.embeddings] == [
        ("model.shared.weight", ["input_ids", "decoder_input_ids"], 2)]


@pytest.mark.parametrize("name", ["vit_ts", "bert_fused"])
def test_says_why_there_is_no_vocabulary(name):
    vocab = find_vocabulary(onnx.load(str(TRANSFORMERS / f"{name}.onnx")))
    assert not vocab.found
    assert ("EmbedLayerNormalization" if name == "bert_fused" else "no Gather reads") in vocab.reason


@pytest.mark.parametrize("name", ["gpt2_ts", "llama_ts", "llama_dynamo", "qwen2_ts", "phi3_ts", "t5_ts"])
def test_kept_columns_equal_the_original_and_the_rest_is_filler(name, tmp_path):
    original, model, details = pruned(TRANSFORMERS / f"{name}.onnx", tmp_path)
    vocab = find_vocabulary(original)
    before, after = weights(original), weights(model)
    table = vocab.embeddings[0].weight
    np.testing.assert_array_equal(after[table], before[table][KEPT])  # exactly the kept rows, in order
    for head in vocab.heads:
        np.testing.assert_array_equal(after[head.weight], before[head.weight][:, KEPT])
    ids = np.random.default_rng(0).choice(KEPT, (2, 9))
    reference, result = run(original, token_feeds(ids))[0], run(model, token_feeds(ids))[0]
    assert result.shape == reference.shape
    np.testing.assert_allclose(result[..., KEPT], reference[..., KEPT], rtol=1e-5, atol=1e-5)
    assert np.all(np.delete(result, KEPT, axis=-1) == LOWEST)
    assert details["tokens_kept"] == len(KEPT) and details["tokens_removed"] == 256 - len(KEPT)
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]


def test_embedding_only_model_keeps_hidden_states_identical(tmp_path):
    original, model, details = pruned(TRANSFORMERS / "bert_ts.onnx", tmp_path)
    ids = np.random.default_rng(1).choice(KEPT, (2, 9))
    for a, b in zip(run(original, token_feeds(ids)), run(model, token_feeds(ids))):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert weights(model)["model.embeddings.position_embeddings.weight"].shape == (128, 64)
    assert details["lm_heads"] == [] and details["macs_after"] == details["macs_before"]
    assert details["params_before"] - details["params_after"] == (256 - len(KEPT)) * 64


def test_unknown_ids_behave_as_the_unknown_token(tmp_path):
    original, model, details = pruned(TRANSFORMERS / "llama_ts.onnx", tmp_path, unknown_token=41)
    assert details["unknown_token"] == 41 and details["unknown_token_from"] == "given"
    ids = np.array([[3, 5, 41, 250, 7, 1]])  # 5, 250 and 1 are not kept
    as_unknown = np.where(np.isin(ids, KEPT), ids, 41)
    np.testing.assert_allclose(run(model, token_feeds(ids))[0][..., KEPT],
                               run(original, token_feeds(as_unknown))[0][..., KEPT], rtol=1e-5, atol=1e-5)


def test_default_unknown_token_is_the_smallest_kept_id_and_is_added_when_given_outside(tmp_path):
    _, _, details = pruned(TRANSFORMERS / "llama_ts.onnx", tmp_path)
    assert (details["unknown_token"], details["unknown_token_from"]) == (0, "the smallest kept id")
    _, model, details = pruned(TRANSFORMERS / "llama_ts.onnx", tmp_path, unknown_token=5)
    assert details["tokens_kept"] == len(KEPT) + 1
    assert weights(model)["model.model.embed_tokens.weight"].shape == (len(KEPT) + 1, 64)


def test_shrink_logits_outputs_the_kept_columns(tmp_path):
    original, model, details = pruned(TRANSFORMERS / "gpt2_ts.onnx", tmp_path, shrink_logits=True)
    ids = np.random.default_rng(2).choice(KEPT, (1, 5))
    np.testing.assert_allclose(run(model, token_feeds(ids))[0], run(original, token_feeds(ids))[0][..., KEPT],
                               rtol=1e-5, atol=1e-5)
    assert model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == len(KEPT)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata[METADATA_KEY]) == KEPT.tolist() == details["kept_tokens"]
    assert "--shrink-logits" in details["warning"]


def tied_gpt2() -> onnx.ModelProto:
    """gpt2_ts with the LM head reading the token embedding through a Transpose (one tensor, as torch ties it)."""
    model = onnx.load(str(TRANSFORMERS / "gpt2_ts.onnx"))
    head = next(n for n in model.graph.node if n.name == "/model/lm_head/MatMul")
    copy = head.input[1]
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == copy))
    model.graph.node.insert(0, helper.make_node("Transpose", ["model.transformer.wte.weight"], ["wte_t"],
                                                name="tie", perm=[1, 0]))
    head.input[1] = "wte_t"
    return model


def test_tied_embedding_is_pruned_once_and_read_by_both(tmp_path):
    original = tied_gpt2()
    vocab = find_vocabulary(original)
    assert [h.tied for h in vocab.heads] == ["shared"]
    path = tmp_path / "tied.onnx"
    onnx.save(original, str(path))
    _, model, details = pruned(path, tmp_path)
    assert details["weights_pruned"] == ["model.transformer.wte.weight"]
    after = weights(model)
    np.testing.assert_array_equal(after["model.transformer.wte.weight"],
                                  weights(original)["model.transformer.wte.weight"][KEPT])
    ids = np.random.default_rng(3).choice(KEPT, (2, 6))
    np.testing.assert_allclose(run(model, token_feeds(ids))[0][..., KEPT],
                               run(original, token_feeds(ids))[0][..., KEPT], rtol=1e-5, atol=1e-5)


def test_large_vocabulary_from_calibration_cuts_the_lm_head_macs(tmp_path):
    original = onnx.load(str(LARGE))
    calibration = np.load(LARGE_CALIBRATION)["input_ids"]
    model, result = prune(str(LARGE), vocab_from_calibration=True, calibration_data=str(LARGE_CALIBRATION))
    details = next(p.details for p in result.passes if p.name == "vocabulary")
    kept = np.unique(calibration)
    assert details["tokens_kept"] == kept.size and details["kept_from"] == "calibration data"
    np.testing.assert_array_equal(weights(model)["model.model.embed_tokens.weight"],
                                  weights(original)["model.model.embed_tokens.weight"][kept])
    shapes = {"input_ids": [1, 32], "attention_mask": [1, 32]}
    head = {k: v for k, v in node_macs(original, shapes).items() if "lm_head" in k}
    head_after = {k: v for k, v in node_macs(model, shapes).items() if "lm_head" in k}
    assert list(head_after.values()) == [v * kept.size // 32000 for v in head.values()]  # V/K fewer
    assert total_macs(model, shapes) == total_macs(original, shapes) - sum(head.values()) + sum(head_after.values())
    feeds = token_feeds(calibration[:2])
    reference, out = run(original, feeds)[0], run(model, feeds)[0]
    np.testing.assert_allclose(out[..., kept], reference[..., kept], rtol=1e-4, atol=1e-5)
    assert details["macs_after"] < 0.1 * details["macs_before"]


def test_combined_with_structured_width_and_heads(tmp_path):
    original, model, details = pruned(LARGE, tmp_path, structured=True, sparsity=0.5, head_sparsity=0.25)
    ids = np.random.default_rng(4).choice(KEPT, (1, 8))
    out, reference = run(model, token_feeds(ids))[0], run(original, token_feeds(ids))[0]
    assert out.shape == reference.shape
    assert np.all(np.delete(out, KEPT, axis=-1) == LOWEST) and np.all(out[..., KEPT] > LOWEST)
    shapes = {"input_ids": [1, 16], "attention_mask": [1, 16]}
    assert total_macs(model, shapes) < 0.05 * total_macs(original, shapes)
    assert details["macs_after"] < details["macs_before"]


@pytest.mark.parametrize("content, code, message", [
    ("1, 2, x3", 8, "'x3' is not an integer"), ("1 2 99999", 8, "outside the vocabulary"), ("", 8, "no token ids"),
    ("-1", 8, "outside the vocabulary")])
def test_bad_token_files_are_data_errors_and_write_nothing(tmp_path, content, code, message):
    (tmp_path / "keep.txt").write_text(content)
    before = listing(tmp_path)
    status, _, err = run_cli(TRANSFORMERS / "llama_ts.onnx", "--keep-tokens", tmp_path / "keep.txt", "-o",
                             tmp_path / "out.onnx", "--no-validate")
    assert status == code and message in err
    assert err.splitlines()[-1].startswith("onnxprune: error: --keep-tokens")
    assert "Traceback" not in err and listing(tmp_path) == before


def test_token_file_that_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    status, _, err = run_cli(TRANSFORMERS / "llama_ts.onnx", "--keep-tokens", tmp_path / "fifo", "-o",
                             tmp_path / "out.onnx", "--no-validate")
    assert status == 2 and "not a regular file" in err and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--unknown-token", "3"], "--unknown-token applies to vocabulary pruning"),
    (["--vocab-from-calibration"], "--vocab-from-calibration needs --calibration-data"),
    (["--keep-tokens", "k.txt", "--vocab-from-calibration", "--calibration-data", "c.npz"], "not both")])
def test_option_errors(tmp_path, args, message):
    status, _, err = run_cli(TRANSFORMERS / "llama_ts.onnx", *args, "-o", tmp_path / "out.onnx")
    assert status == 2 and message in err and not (tmp_path / "out.onnx").exists()


def test_cli_npy_keep_list_recipe_and_report(tmp_path):
    np.save(tmp_path / "keep.npy", KEPT.astype(np.int32))
    (tmp_path / "recipe.yaml").write_text(f"keep_tokens: {tmp_path / 'keep.npy'}\nshrink_logits: true\n")
    status, _, err = run_cli(TRANSFORMERS / "llama_ts.onnx", "--config", tmp_path / "recipe.yaml", "-o",
                             tmp_path / "out.onnx", "--report", tmp_path / "r.json", "--runs", "2")
    assert status == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    details = report["passes"][0]["details"]
    assert report["passes"][0]["name"] == "vocabulary" and details["kind"] == "vocabulary"
    assert details["tokens_kept"] == len(KEPT) and details["shrink_logits"] is True
    assert any("--shrink-logits" in w for w in report["warnings"])
    model = onnx.load(str(tmp_path / "out.onnx"))
    assert model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == len(KEPT)


def test_inspect_describes_the_vocabulary(tmp_path):
    status, out, _ = run_cli("inspect", TRANSFORMERS / "gpt2_ts.onnx", "--json")
    info = json.loads(out)["vocabulary"]
    assert status == 0 and info["vocab_size"] == 256 and info["tied"] == "copy"
    assert info["embeddings"][0]["weight"] == "model.transformer.wte.weight"
    status, out, _ = run_cli("inspect", TRANSFORMERS / "bert_ts.onnx")
    assert "vocabulary: 256 tokens" in out and "embedding model.embeddings.word_embeddings.weight" in out


def test_model_without_vocabulary_warns_and_changes_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("1 2 3")
    model, result = prune(str(TRANSFORMERS / "vit_ts.onnx"), keep_tokens=str(tmp_path / "keep.txt"))
    details = result.passes[0].details
    assert result.passes[0].modified is False and "no Gather reads" in details["reason"]
    assert any(w.startswith("vocabulary pruning removed nothing") for w in result.warnings)
    assert model.SerializeToString() == onnx.load(str(TRANSFORMERS / "vit_ts.onnx")).SerializeToString()


def test_combined_with_unstructured_sparsity_and_saved_recipe(tmp_path):
    (tmp_path / "keep.txt").write_text(" ".join(map(str, KEPT)))
    status, _, err = run_cli(TRANSFORMERS / "llama_ts.onnx", "--keep-tokens", tmp_path / "keep.txt", "--sparsity",
                             "0.5", "-o", tmp_path / "out.onnx", "--no-validate", "--save-recipe",
                             tmp_path / "applied.yaml", "--report", tmp_path / "r.json")
    assert status == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["vocabulary", "unstructured"]
    head = weights(onnx.load(str(tmp_path / "out.onnx")))["onnx::MatMul_706"]
    assert head.shape == (64, len(KEPT)) and 0.4 < np.mean(head == 0) < 0.6
    assert f"keep_tokens: {tmp_path / 'keep.txt'}" in (tmp_path / "applied.yaml").read_text()


def test_default_unknown_token_from_the_model_metadata(tmp_path):
    model = onnx.load(str(TRANSFORMERS / "llama_ts.onnx"))
    model.metadata_props.add(key="unk_token_id", value="5")
    path = tmp_path / "with_unk.onnx"
    onnx.save(model, str(path))
    _, pruned_model, details = pruned(path, tmp_path)
    assert (details["unknown_token"], details["unknown_token_from"]) == (5, "metadata unk_token_id")
    assert {p.key: p.value for p in pruned_model.metadata_props}["unk_token_id"] == "5"  # kept as it was
    ids = np.array([[3, 6, 7]])
    np.testing.assert_allclose(run(pruned_model, token_feeds(ids))[0][..., KEPT],
                               run(model, token_feeds(np.array([[3, 5, 7]])))[0][..., KEPT], rtol=1e-5, atol=1e-5)


def test_validation_reports_top1_agreement_through_the_scattered_logits(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("\n".join(map(str, range(255))))  # every token but 255
    _, result = prune(str(TRANSFORMERS / "llama_ts.onnx"), keep_tokens=str(keep), validate=True)
    logits = result.validation["providers"]["CPUExecutionProvider"]["outputs"]["logits"]
    assert logits["same_shape"] and logits["top1_agreement"] == 1.0  # token 255 is never the argmax here
    assert any("validation compares the kept tokens' columns" in w for w in result.warnings)


def test_validation_compares_the_kept_columns_only(tmp_path):
    """With every input id kept, the kept tokens' logits are the original's: validation over those columns is
    exact, where the filler columns would make the cosine meaningless."""
    keep = tmp_path / "keep.txt"
    keep.write_text(" ".join(map(str, KEPT)))
    data = tmp_path / "data.npz"
    ids = np.random.default_rng(3).choice(KEPT, (2, 8))
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids))
    _, result = prune(str(TRANSFORMERS / "llama_ts.onnx"), keep_tokens=str(keep), validate=ValidateConfig(data=str(data)))
    logits = result.validation["providers"]["CPUExecutionProvider"]["outputs"]["logits"]
    assert logits["columns"] == {"compared": KEPT.size, "of": 256}
    assert logits["cosine"] > 0.99999 and logits["rel_l2"] < 1e-4 and logits["top1_agreement"] == 1.0
    _, plain = prune(str(TRANSFORMERS / "llama_ts.onnx"), sparsity=0.5, validate=ValidateConfig(data=str(data)))
    assert "columns" not in plain.validation["providers"]["CPUExecutionProvider"]["outputs"]["logits"]


def test_malformed_token_file_fails_before_calibration(tmp_path):
    (tmp_path / "keep.txt").write_text("1 2 three")
    status, _, err = run_cli(LARGE, "--keep-tokens", tmp_path / "keep.txt", "--structured", "--sparsity", "0.5",
                             "--calibration-data", LARGE_CALIBRATION, "-o", tmp_path / "out.onnx")
    assert status == 8 and "'three' is not an integer" in err and "calibration" not in err.lower()
