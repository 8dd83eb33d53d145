"""Hidden size by rotation (``--hidden-sparsity``): the residual stream rotated into its PCA basis, then sliced.

The oracle: with S = 0 the rotated model computes what the original computes (every output, rtol ~1e-4, random
token ids with full and partly padded attention masks, two shapes). With S > 0 every rotated matrix has the kept
width, MACs drop, and the PCA basis beats deleting the same number of unrotated dimensions (the ones with the
least activation energy): a test that fails if the principal directions were taken in the wrong order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.analysis.cost import infer_shapes, total_macs
from onnxprune.analysis.stream import find_streams
from onnxprune.config import PruneConfig
from onnxprune.inspect import inspect_model
from onnxprune.passes.hidden_widths import WidthProbe, candidate_widths, choose_widths, probe_model, projections
from onnxprune.passes.manager import PassContext
from onnxprune.passes.rotation import (
    Bases,
    HiddenRotationPass,
    choose_bases,
    principal_basis,
    rotate_stream,
    segment_widths,
    sequential_bases,
    stream_covariances,
    tensor_grams,
)
from onnxprune.passes.structured import prepare_for_analysis
from onnxprune.report import render
from onnxprune.sessions import session_with_outputs

from .test_transformers import FIXTURES, feeds, load, run

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"input_ids": [1, 16], "attention_mask": [1, 16]}
EXACT = ["bert_ts", "bert_dynamo", "bert_sdpa_dynamo", "distilbert_ts", "gpt2_ts", "gpt_neo_ts", "gpt_neox_ts", "gptj_ts",
         "gpt_bigcode_ts", "falcon_mqa_ts", "llama_ts", "llama_dynamo", "qwen2_ts", "phi3_ts", "t5_ts", "vit_ts"]


def token_feed(batch: int, seq: int, seed: int, padded: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    if padded:
        mask[-1, seq - seq // 3:] = 0
    return {"input_ids": rng.integers(0, 256, (batch, seq)).astype(np.int64), "attention_mask": mask}


def calibration(count: int = 6, name: str = "gpt2_ts") -> list[dict[str, np.ndarray]]:
    model = load(name)
    return [feeds(model, 2, 12, seed) for seed in range(count)]


def shapes_for(name: str) -> dict[str, list[int]]:
    if name.startswith("vit"):
        return {"pixel_values": [1, 3, 32, 32]}
    return {**SHAPES, "decoder_input_ids": [1, 19]} if name.startswith("t5") else dict(SHAPES)


def rotated(name: str, sparsity: float, per_segment: bool | None = False, widths: str = "tail"
            ) -> tuple[onnx.ModelProto, dict]:
    model = load(name)
    config = PruneConfig(hidden_sparsity=sparsity, calibration_data="calibration", hidden_widths=widths)
    result = HiddenRotationPass(config, per_segment).run(
        PassContext(model=model, calibration=calibration(name=name), input_shapes=shapes_for(name)))
    onnx.checker.check_model(model, full_check=True)
    return model, result.details


def assert_same_interface(original: onnx.ModelProto, model: onnx.ModelProto) -> None:
    for before, after in ((original.graph.input, model.graph.input), (original.graph.output, model.graph.output)):
        assert [v.name for v in before] == [v.name for v in after]
        assert [str(v.type) for v in before] == [str(v.type) for v in after]


@pytest.mark.parametrize("name", EXACT)
def test_zero_sparsity_is_exact(name: str) -> None:
    original = load(name)
    model, details = rotated(name, 0.0)
    assert details["kind"] == "hidden" and details["streams"][0]["hidden_after"] == 64
    assert_same_interface(original, model)
    shapes = [(1, 0), (2, 0)] if name.startswith("vit") else [(1, 5), (2, 16), (3, 9)]
    for batch, seq in shapes:  # feeds(): the first row's attention mask ends in padding
        feed = feeds(original, batch, seq, seed=batch * 100 + seq)
        for expected, got in zip(run(original, feed), run(model, feed)):
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize("name", ["bert_ts", "gpt2_ts", "llama_ts"])
def test_zero_sparsity_is_exact_with_a_basis_per_segment(name: str) -> None:
    original = load(name)
    model, details = rotated(name, 0.0, per_segment=True)
    stream = details["streams"][0]
    assert stream["bases"] == "per segment"
    # pre-LN: a shortcut matrix between every two segments; post-LN: one per shortcut as always
    assert stream["shortcut_matrices"] == 4
    feed = token_feed(2, 11, seed=3)
    for expected, got in zip(run(original, feed), run(model, feed)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_streams_found_and_refused() -> None:
    def report(path: Path, shapes: dict) -> dict:
        model = onnx.load(str(path))
        prepare_for_analysis(model)
        return find_streams(model, infer_shapes(model, shapes)).to_dict()

    bert = report(FIXTURES / "bert_ts.onnx", SHAPES)["streams"][0]
    assert (bert["norm"], bert["layout"], bert["segments"], bert["writers"], bert["embeddings"]) == \
        ("layernorm", "post-ln", 5, 4, 3)
    assert bert["readers"] == 8 and "Gather /model/pooler/Gather" in bert["restored"]
    llama = report(FIXTURES / "llama_ts.onnx", SHAPES)["streams"][0]
    assert (llama["norm"], llama["layout"], llama["readers"], llama["restored"]) == ("rmsnorm", "pre-ln", 11, [])
    fused = report(FIXTURES / "bert_fused.onnx", SHAPES)
    assert not fused["streams"] and "SkipLayerNormalization" in fused["refused"][0]
    convnext = report(ROOT / "fixtures" / "arch" / "convnext.onnx", {"input": [1, 3, 64, 64]})
    assert not convnext["streams"]
    assert convnext["refused"][0].startswith("rotation does not apply: depthwise Conv ")
    assert "conv_dw" in convnext["refused"][0] and "reads the residual stream" in convnext["refused"][0]


def _weights_reading_and_writing(model: onnx.ModelProto) -> list[tuple[str, tuple[int, ...]]]:
    return [(t.name, tuple(t.dims)) for t in model.graph.initializer if t.name.endswith(".rotated")]


def test_sliced_stream_has_the_kept_width_everywhere() -> None:
    original = load("llama_ts")
    model, details = rotated("llama_ts", 0.25)
    stream = details["streams"][0]
    assert (stream["hidden_before"], stream["hidden_after"]) == (64, 48)
    assert 0.5 < stream["explained_variance_kept"] < 1.0
    rotated_weights = _weights_reading_and_writing(model)
    assert len(rotated_weights) == 1 + 4 + 11  # embedding, writers (o_proj, down_proj), readers incl. the LM head
    for name, dims in rotated_weights:  # the stream axis has 48; the other axis keeps its size (q/o_proj: 64 too)
        assert 48 in dims, (name, dims)
    by_name = dict(rotated_weights)
    assert by_name["model.model.embed_tokens.weight.rotated"] == (256, 48)
    assert sum(1 for dims in by_name.values() if dims == (48, 256)) == 1  # the LM head
    assert details["macs_after"] < details["macs_before"]
    assert details["macs_before"] == total_macs(original, SHAPES) and details["macs_after"] == total_macs(model, SHAPES)
    assert details["params_after"] < details["params_before"]
    feed = token_feed(2, 10, seed=7)
    (expected,), (got,) = run(original, feed), run(model, feed)
    assert got.shape == expected.shape and np.isfinite(got).all()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("name", ["llama_ts", "gpt2_ts", "bert_ts"])
def test_pca_beats_deleting_the_weakest_unrotated_dimensions(name: str) -> None:
    """The same number of directions deleted: the principal ones kept vs the unrotated dimensions with the most
    activation energy kept (the smallest-norm ones deleted). PCA in the wrong order fails this."""
    original = load(name)
    prepared = load(name)
    prepare_for_analysis(prepared)
    stream = find_streams(prepared, infer_shapes(prepared, SHAPES)).streams[0]
    grams = stream_covariances(prepared, stream, calibration())
    total = sum(grams.values())
    keep = np.sort(np.argsort(np.diag(total))[::-1][:48])
    selection = np.eye(64)[:, keep]
    baseline = onnx.ModelProto()
    baseline.CopyFrom(prepared)
    rotate_stream(baseline, stream_of(baseline), Bases({n: selection for n in grams}, {}))
    model, _ = rotated(name, 0.25)
    feeds = [token_feed(2, 12, seed) for seed in range(50, 54)]
    cos_rotated = np.mean([_cosine(run(original, f)[0], run(model, f)[0]) for f in feeds])
    cos_selected = np.mean([_cosine(run(original, f)[0], run(baseline, f)[0]) for f in feeds])
    assert np.isfinite(cos_rotated) and cos_rotated > cos_selected, (cos_rotated, cos_selected)


def _subspace_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance between the column spans of two orthonormal bases (0: the same subspace)."""
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


def test_sequential_bases_are_the_pca_of_the_model_sliced_so_far() -> None:
    """Post-LN BERT: the first segment's basis is the one-shot PCA; the last one is the PCA of the last segment in the
    model rotated and sliced with every earlier basis (and full width from there on), not of the original model."""
    model = load("bert_ts")
    prepare_for_analysis(model)
    stream, feeds = stream_of(model), calibration(name="bert_ts")
    keep = 3 * stream.hidden // 4
    sequential = sequential_bases(model, stream, SHAPES, feeds, {s.tensor: keep for s in stream.segments})
    one_shot = choose_bases(stream, stream_covariances(model, stream, feeds), keep, per_segment=True)
    first, last = stream.segments[0].tensor, stream.segments[-1].tensor
    assert _subspace_gap(sequential.of[first], one_shot.of[first]) < 1e-6
    assert _subspace_gap(sequential.of[last], one_shot.of[last]) > 1e-3
    sliced = onnx.ModelProto()
    sliced.CopyFrom(model)
    copied = stream_of(sliced)
    full = np.eye(stream.hidden)
    rotate_stream(sliced, copied, Bases({s.tensor: full if s.tensor == last else sequential.of[s.tensor]
                                         for s in copied.segments}, {}))
    onnx.checker.check_model(sliced, full_check=True)
    gram = tensor_grams(sliced, [last], stream.hidden, stream.centered, feeds)[last]  # the others are sliced
    expected = principal_basis(gram)[0][:, :keep]
    assert _subspace_gap(sequential.of[last], expected) < 1e-6
    assert 0.5 < sequential.kept_variance[last] < 1.0


def test_post_ln_keeps_the_last_two_segments_whole_at_the_same_mean_width() -> None:
    """Post-LN BERT (5 segments, H = 64) at 25 %: mean width 48; the output's segment and the one before keep 64, the
    other three share the rest (38, 37, 37); the model is smaller and runs. Pre-LN LLaMA keeps one uniform basis."""
    original = load("bert_ts")
    model = load("bert_ts")
    details = HiddenRotationPass(PruneConfig(hidden_sparsity=0.25, calibration_data="c"), measure=False).run(
        PassContext(model=model, calibration=calibration(name="bert_ts"), input_shapes=dict(SHAPES))).details
    stream = details["streams"][0]
    assert stream["widths_chosen"] == "default (last two segments whole)"
    assert stream["bases"] == "per segment" and stream["widths"] == [38, 37, 37, 64, 64]
    assert sum(stream["widths"]) == 5 * stream["hidden_after"] == 5 * 48
    assert details["macs_after"] < details["macs_before"]
    feed = token_feed(2, 10, seed=7)
    for expected, got in zip(run(original, feed), run(model, feed)):
        assert got.shape == expected.shape and np.isfinite(got).all()
    _, details = rotated("llama_ts", 0.25, per_segment=None)
    assert details["streams"][0]["bases"] == "one for the stream" and set(details["streams"][0]["widths"]) == {48}


def test_segment_widths_fall_back_when_the_others_would_be_too_narrow() -> None:
    model = load("bert_ts")
    prepare_for_analysis(model)
    stream = stream_of(model)
    assert list(segment_widths(stream, 40).values()) == [24, 24, 24, 64, 64]
    assert list(segment_widths(stream, 24).values()) == [14, 14, 14, 14, 64]  # two whole would leave nothing
    assert list(segment_widths(stream, 16).values()) == [16] * 5  # one whole would leave 4 < 8 each: uniform
    assert list(segment_widths(stream, 64).values()) == [64] * 5


def stream_of(model: onnx.ModelProto):
    return find_streams(model, infer_shapes(model, SHAPES)).streams[0]


def test_combined_with_structured_width_and_heads(tmp_path: Path) -> None:
    data = tmp_path / "calibration.npz"
    feeds = calibration(8)
    np.savez(data, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    model, result = _prune_combined(data)
    names = [p.name for p in result.passes]
    assert names == ["structured", "hidden"]
    hidden = result.passes[1].details
    assert hidden["streams"][0]["hidden_after"] == 48
    structured = result.passes[0].details
    assert hidden["macs_before"] == structured["macs_after"] and hidden["macs_after"] < hidden["macs_before"]
    onnx.checker.check_model(model, full_check=True)
    feed = token_feed(2, 9, seed=11)
    (expected,), (got,) = run(load("llama_ts"), feed), run(model, feed)
    assert got.shape == expected.shape and np.isfinite(got).all()


def _prune_combined(data: Path):
    config = PruneConfig(structured=True, sparsity=0.5, head_sparsity=0.25, hidden_sparsity=0.25,
                         calibration_data=str(data), uniform=True)
    return onnxprune.prune(str(FIXTURES / "llama_ts.onnx"), config=config)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxprune", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_cli_needs_calibration_data(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    done = _cli(str(FIXTURES / "gpt2_ts.onnx"), "--hidden-sparsity", "0.25", "-o", str(out))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("onnxprune: error: --hidden-sparsity needs "
                                                           "--calibration-data")
    assert not out.exists()
    done = _cli(str(FIXTURES / "gpt2_ts.onnx"), "--hidden-sparsity", "1.5", "--calibration-data", str(tmp_path))
    assert done.returncode == 2 and "--hidden-sparsity must be in [0, 1)" in done.stderr


def test_cli_and_recipe(tmp_path: Path) -> None:
    data = tmp_path / "calibration.npz"
    feeds = calibration(8)
    np.savez(data, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("hidden_sparsity: 0.25\n")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    done = _cli(str(FIXTURES / "gpt2_ts.onnx"), "--config", str(recipe), "--calibration-data", str(data),
                "-o", str(out), "--report", str(report), "--save-recipe", str(tmp_path / "applied.yaml"),
                "--no-validate")
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    (hidden,) = [p for p in result["passes"] if p["name"] == "hidden"]
    details = hidden["details"]
    assert details["kind"] == "hidden" and details["streams"][0]["hidden_after"] == 48
    for key in ("macs_before", "macs_after", "params_before", "params_after"):
        assert isinstance(details[key], int)
    assert details["macs_after"] < details["macs_before"]
    assert "hidden_sparsity: 0.25" in (tmp_path / "applied.yaml").read_text()
    pruned = onnx.load(str(out))
    assert [o.name for o in pruned.graph.output] == ["logits"]


def test_no_stream_is_reported_not_crashed() -> None:
    model = load("bert_fused")
    result = HiddenRotationPass(PruneConfig(hidden_sparsity=0.25, calibration_data="x")).run(
        PassContext(model=model, calibration=calibration(2), input_shapes=dict(SHAPES)))
    assert not result.modified and "SkipLayerNormalization" in result.details["reason"]
    assert result.details["macs_after"] == result.details["macs_before"]


def test_inspect_lists_the_stream() -> None:
    info = inspect_model(FIXTURES / "gpt2_ts.onnx")
    stream = info["hidden"]["streams"][0]
    assert (stream["hidden"], stream["norm"], stream["layout"], stream["segments"]) == (64, "layernorm", "pre-ln", 5)
    info = inspect_model(ROOT / "fixtures" / "arch" / "convnext.onnx")
    assert info["hidden"]["streams"] == [] and "depthwise Conv" in info["hidden"]["refused"][0]


def test_a_probe_computes_what_the_rotated_and_sliced_model_computes() -> None:
    """Post-LN BERT: cutting two segments in the probe model (projection inputs) gives the outputs of the model the
    rotation writes with those widths (others whole), so the probes measure the real cut."""
    model = load("bert_ts")
    prepare_for_analysis(model)
    stream, feeds = stream_of(model), calibration(name="bert_ts")
    grams = stream_covariances(model, stream, feeds)
    ordered = {name: principal_basis(gram)[0] for name, gram in grams.items()}
    widths = {s.tensor: 64 for s in stream.segments}
    first, last = stream.segments[1].tensor, stream.segments[-1].tensor
    widths[first], widths[last] = 40, 52
    probe, inputs = probe_model(model, stream)
    centering, cut = projections(stream, {name: ordered[name][:, :w] for name, w in widths.items()})
    feed = token_feed(2, 10, seed=5)
    probed = run(probe, {**feed, **{inputs[n]: cut[n].astype(np.float32) for n in widths}})
    whole = run(probe, {**feed, **{inputs[n]: centering.astype(np.float32) for n in widths}})
    sliced = onnx.ModelProto()
    sliced.CopyFrom(model)
    rotate_stream(sliced, stream_of(sliced), Bases({n: ordered[n][:, :w] for n, w in widths.items()}, {}))
    for expected, got, full, before in zip(probed, run(sliced, feed), whole, run(load("bert_ts"), feed)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
        np.testing.assert_allclose(full, before, rtol=1e-4, atol=1e-4 * float(np.abs(before).max()))
        assert np.abs(got - before).max() > 1e-2 * np.abs(before).max()  # the cut changes the outputs


def test_measured_widths_give_the_harder_hit_segment_more_width() -> None:
    """The knapsack over probed errors: a segment whose cut costs ten times more keeps more width, the mean width is
    exactly the promised one, and equal curves share equally (within one step)."""
    hurt = {64: 0.0, 56: 0.01, 48: 0.04, 32: 0.2}
    probe = WidthProbe({"a": hurt, "b": {w: e * 10 for w, e in hurt.items()}, "c": hurt})
    widths = choose_widths(probe, 64, 52)
    assert sum(widths.values()) == 3 * 52
    assert widths["b"] > widths["a"] and widths["b"] > widths["c"] and abs(widths["a"] - widths["c"]) <= 1
    assert candidate_widths(384, 0.3) == [326, 269, 211, 154]  # cuts of 0.5, 1, 1.5, 2 times S


def test_post_ln_widths_are_measured_on_held_back_calibration_feeds() -> None:
    """Post-LN BERT at 25 %: the pass probes every segment on the feeds the bases did not come from, reports the
    errors, gives the widest width to a segment with the largest probed error, and keeps the mean width at 48."""
    original = load("bert_ts")
    model, details = rotated("bert_ts", 0.25, per_segment=None, widths="measured")
    stream = details["streams"][0]
    assert stream["widths_chosen"] == "measured" and sum(stream["widths"]) == 5 * 48
    errors = [curve[str(candidate_widths(64, 0.25)[1])] for curve in stream["probe_errors"]]
    assert stream["widths"][int(np.argmax(errors))] == max(stream["widths"])
    feed = token_feed(2, 10, seed=7)
    for expected, got in zip(run(original, feed), run(model, feed)):
        assert got.shape == expected.shape and np.isfinite(got).all()


def test_cli_hidden_widths_tail_by_default_measured_on_request(tmp_path: Path) -> None:
    """Post-LN BERT through the CLI: the tail rule unless ``--hidden-widths measured``; the applied recipe keeps it."""
    data = tmp_path / "calibration.npz"
    feeds = calibration(name="bert_ts")
    np.savez(data, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    chosen = {}
    for widths in ("tail", "measured"):
        report, applied = tmp_path / f"{widths}.json", tmp_path / f"{widths}.yaml"
        extra = ["--hidden-widths", "measured"] if widths == "measured" else []
        done = _cli(str(FIXTURES / "bert_ts.onnx"), "--hidden-sparsity", "0.25", "--calibration-data", str(data),
                    *extra, "-o", str(tmp_path / f"{widths}.onnx"), "--report", str(report), "--save-recipe",
                    str(applied), "--no-validate")
        assert done.returncode == 0, done.stderr
        (hidden,) = [p for p in json.loads(report.read_text())["passes"] if p["name"] == "hidden"]
        chosen[widths] = hidden["details"]["streams"][0]["widths_chosen"]
        assert f"hidden_widths: {widths}" in applied.read_text()
    assert chosen == {"tail": "default (last two segments whole)", "measured": "measured"}


def test_low_memory_reader_refit_keeps_less_and_gives_the_same_weights(monkeypatch) -> None:
    """Under ``--low-memory`` the readers' refit streams share a budget derived from the data: they keep less between
    steps than with the default budget, and the refitted weights are the same bit for bit."""
    from onnxprune import activation_stream, heap
    from onnxprune.passes import hidden_refit

    feeds = calibration(name="bert_ts")
    feeds = [{k: np.concatenate([v] * 4) for k, v in feed.items()} for feed in feeds]  # larger activations
    held: dict[bool, int] = {}

    def rotate(low: bool) -> onnx.ModelProto:
        monkeypatch.setattr(hidden_refit, "heap_bounded", lambda: low)
        model = load("bert_ts")
        config = PruneConfig(hidden_sparsity=0.4, calibration_data="calibration", reconstruct=True)
        HiddenRotationPass(config, True, measure=False).run(
            PassContext(model=model, calibration=feeds, input_shapes=dict(SHAPES)))
        return model

    real = activation_stream.ActivationStream._keep
    low_now = [False]

    def kept(self, number, frontier):
        real(self, number, frontier)
        held[low_now[0]] = max(held.get(low_now[0], 0), self.budget.held())

    monkeypatch.setattr(activation_stream.ActivationStream, "_keep", kept)
    default = rotate(False)
    low_now[0] = True
    low = rotate(True)
    assert 0 < held[True] < 0.5 * held[False], held
    assert not heap.heap_bounded()  # the stage asked hidden_refit, not the process
    weights = {t.name: t.SerializeToString() for t in default.graph.initializer}
    assert all(weights[t.name] == t.SerializeToString() for t in low.graph.initializer)


def test_reconstruct_refits_the_stream_readers_and_lowers_their_error() -> None:
    """``--hidden-sparsity --reconstruct`` on BERT: every Q/K/V/MLP-input reader is refitted and each one's calibration
    error falls; the figures are the model's own: a reader's output error read back from the repaired and the plain
    rotated model (sessions on the written graphs) is the reported after/before."""
    original, feeds = load("bert_ts"), calibration(name="bert_ts")

    def rotate(reconstruct: bool) -> tuple[onnx.ModelProto, dict]:
        config = PruneConfig(hidden_sparsity=0.4, calibration_data="calibration", reconstruct=reconstruct)
        model = load("bert_ts")
        details = HiddenRotationPass(config, True, measure=False).run(
            PassContext(model=model, calibration=feeds, input_shapes=dict(SHAPES))).details
        onnx.checker.check_model(model, full_check=True)
        return model, details

    plain, _ = rotate(False)
    model, details = rotate(True)
    stream = details["streams"][0]
    outcome = stream["reconstruction"]
    assert len(outcome["layers"]) == stream["readers"] == 8 and not outcome["skipped"]
    assert all(layer["error_after"] < layer["error_before"] for layer in outcome["layers"])
    value = next(layer for layer in outcome["layers"] if "value" in layer["layer"] and "layer.1" in layer["layer"])
    node = next(n for n in original.graph.node if n.name == value["layer"])
    output = next(n for n in original.graph.node if node.output[0] in n.input and n.op_type == "Add").output[0]

    def error(candidate: onnx.ModelProto) -> float:
        num = den = 0.0
        for feed in feeds:
            (expected,), (got,) = (session_with_outputs(m, [output]).run([output], feed) for m in (original, candidate))
            keep = feed["attention_mask"] != 0
            num += float(np.sum((got[keep] - expected[keep]).astype(np.float64) ** 2))
            den += float(np.sum(expected[keep].astype(np.float64) ** 2))
        return num / den

    assert error(model) == pytest.approx(value["error_after"], rel=1e-3)
    assert error(plain) == pytest.approx(value["error_before"], rel=1e-3)
    text = render({"config": {}, "passes": [{"name": "hidden", "details": details, "seconds": 1.0}]})
    assert stream["widths"] == [21, 21, 20, 64, 64] and sum(stream["widths"]) == 5 * 38
    assert "stream 64 -> 38 on average (post-ln, bases per segment; widths default (last two segments whole)): " \
        "21 21 20 64 64" in text
    assert f"  {value['layer']}: {value['error_before']:.4f} -> {value['error_after']:.4f}" in text
