"""Unstructured, threshold and N:M pruning on the fixture models, end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.analysis.weights import find_prunable_weights

from .conftest import FIXTURES, run_cli

MAIN_FIXTURES = ["cnn.onnx", "cnn_constant_weights.onnx", "cnn_external/model.onnx", "mlp_gemm.onnx",
                 "mlp_matmul.onnx", "mlp_dynamic.onnx", "cnn_opset11.onnx", "cnn_opset21.onnx", "shared_weight.onnx",
                 "embedding.onnx"]


def zeros_among_prunable(path) -> tuple[int, int]:
    model = onnx.load(str(path))
    total = zeros = 0
    for item in find_prunable_weights(model):
        if item.is_embedding:
            continue
        values = item.weight.array()
        total += values.size
        zeros += int(values.size - np.count_nonzero(values))
    return zeros, total


def output_shapes(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.shape for o in session.run(None, feeds)], [o.name for o in session.get_outputs()]


def feeds_for(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in arg.shape]
        feeds[arg.name] = (rng.integers(0, 100, shape) if "int" in arg.type else rng.standard_normal(shape)).astype(
            np.int64 if "int" in arg.type else np.float32)
    return feeds


@pytest.mark.parametrize("name", MAIN_FIXTURES)
def test_cli_sparsity_07(tmp_path, name):
    source = FIXTURES / name
    out = tmp_path / "pruned.onnx"
    code, stdout, err = run_cli(source, "--sparsity", "0.7", "-o", out, "--report", tmp_path / "r.json", "--runs", "3")
    assert code == 0, err
    assert "Unstructured pruning" in stdout and "Validation" in stdout
    zeros, total = zeros_among_prunable(out)
    assert abs(zeros / total - 0.7) <= 0.005
    onnx.checker.check_model(str(out), full_check=True)
    feeds = feeds_for(source)
    assert output_shapes(out, feeds) == output_shapes(source, feeds)
    report = json.loads((tmp_path / "r.json").read_text())
    assert abs(report["summary"]["achieved_sparsity"] - 0.7) <= 0.005
    assert report["validation"]["model"]["pruned"]["nonzero_params"] < report["validation"]["model"]["original"]["nonzero_params"]
    if name.startswith("cnn_external"):
        assert (tmp_path / "pruned.onnx.data").exists(), "external data in, external data out"


def test_model_metadata_kept(tmp_path):
    source = FIXTURES / "cnn.onnx"
    onnxprune.prune(source, tmp_path / "p.onnx", sparsity=0.5)
    a, b = onnx.load(str(source)), onnx.load(str(tmp_path / "p.onnx"))
    assert b.ir_version == a.ir_version
    assert list(b.opset_import) == list(a.opset_import)
    assert list(b.metadata_props) == list(a.metadata_props)
    assert b.doc_string == a.doc_string and b.producer_name == a.producer_name
    assert [i.SerializeToString() for i in b.graph.input] == [i.SerializeToString() for i in a.graph.input]
    assert [o.SerializeToString() for o in b.graph.output] == [o.SerializeToString() for o in a.graph.output]
    assert [n.SerializeToString() for n in b.graph.node] == [n.SerializeToString() for n in a.graph.node]


def test_constant_node_weights_are_pruned():
    model, result = onnxprune.prune(FIXTURES / "cnn_constant_weights.onnx", sparsity=0.6)
    tensors = result.to_dict()["passes"][0]["details"]["tensors"]
    assert tensors and all(t["kind"] == "constant" for t in tensors)
    names = {t["weight"] for t in tensors}
    assert "block1.conv1.weight_raw" in names, "weight behind Identity"
    assert "block4.conv1.weight_fp16" in names, "fp16 weight behind Cast"
    fp16 = next(n for n in model.graph.node if n.output[0] == "block4.conv1.weight_fp16").attribute[0].t
    assert fp16.data_type == onnx.TensorProto.FLOAT16
    values = onnx.numpy_helper.to_array(fp16)
    assert abs(np.mean(values == 0) - 0.6) < 0.01


def test_layer_scope_is_per_tensor():
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", sparsity=0.5)
    for t in result.to_dict()["passes"][0]["details"]["tensors"]:
        assert abs(t["sparsity"] - 0.5) <= 1.0 / t["params"] + 1e-9


def test_global_scope_exact_total_and_cap():
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", sparsity=0.9, scope="global", max_layer_sparsity=0.95)
    details = result.to_dict()["passes"][0]["details"]
    assert abs(details["achieved_sparsity"] - 0.9) < 1e-4
    sparsities = [t["sparsity"] for t in details["tensors"]]
    assert max(sparsities) <= 0.95 + 1e-9
    assert len({round(s, 3) for s in sparsities}) > 1, "global ranking allocates unevenly"


def test_threshold():
    model = onnx.load(str(FIXTURES / "mlp_gemm.onnx"))
    before = {p.name: p.weight.array() for p in find_prunable_weights(model)}
    pruned, result = onnxprune.prune(model, threshold=0.05)
    for item in find_prunable_weights(pruned):
        old, new = before[item.name], item.weight.array()
        np.testing.assert_array_equal(new, np.where(np.abs(old) <= 0.05, 0, old))
    assert result.to_dict()["summary"]["mode"] == "threshold"


def test_l1_l2_same_zeros_random_differs():
    a, _ = onnxprune.prune(FIXTURES / "mlp_gemm.onnx", sparsity=0.5, criterion="l1")
    b, _ = onnxprune.prune(FIXTURES / "mlp_gemm.onnx", sparsity=0.5, criterion="l2")
    c, _ = onnxprune.prune(FIXTURES / "mlp_gemm.onnx", sparsity=0.5, criterion="random", seed=1)
    wa, wb, wc = (find_prunable_weights(m)[0].weight.array() for m in (a, b, c))
    np.testing.assert_array_equal(wa == 0, wb == 0)
    assert abs(np.mean(wc == 0) - 0.5) < 0.01 and not np.array_equal(wa == 0, wc == 0)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("name", ["cnn.onnx", "mlp_gemm.onnx", "mlp_matmul.onnx", "cnn_constant_weights.onnx"])
def test_nm_along_reduction_axis(name, pattern):
    n, m = map(int, pattern.split(":"))
    pruned, result = onnxprune.prune(FIXTURES / name, pattern=pattern)
    details = result.to_dict()["passes"][0]["details"]
    done = {t["weight"] for t in details["tensors"]}
    skipped = {s["weight"]: s["reason"] for s in details["skipped"]}
    assert done
    for item in find_prunable_weights(pruned):
        op = item.uses[0].node.op_type
        axis = item.reduction_axis
        expected = {"Conv": 1, "MatMul": 0}.get(op)
        if op == "Gemm":
            expected = 1 if any(a.name == "transB" and a.i for a in item.uses[0].node.attribute) else 0
        assert axis == expected
        if item.name in skipped:
            assert item.weight.shape[axis] % m != 0
            continue
        values = np.moveaxis(item.weight.array(), axis, -1)
        blocks = values.reshape(*values.shape[:-1], values.shape[-1] // m, m)
        assert (np.count_nonzero(blocks == 0, axis=-1) >= n).all()


def test_nm_skips_indivisible_and_reports():
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", pattern="2:4")
    skipped = result.to_dict()["passes"][0]["details"]["skipped"]
    stem = [s for s in skipped if s["weight"] == "stem.weight"]
    assert stem and "not divisible by M=4" in stem[0]["reason"]  # Cin = 3


def test_exclude_and_min_params_and_first_last():
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", sparsity=0.5, exclude=["block1.*"], min_params=500,
                                prune_first=False, prune_last=False)
    details = result.to_dict()["passes"][0]["details"]
    done = {t["weight"] for t in details["tensors"]}
    reasons = {s["weight"]: s["reason"] for s in details["skipped"]}
    assert "block1.conv1.weight" in reasons and "excluded" in reasons["block1.conv1.weight"]
    assert "min-params" in reasons["block2.dw.weight"]  # 32*1*3*3 = 288 weights
    assert "first layer" in reasons["stem.weight"]
    assert "last layer" in reasons["fc2.weight"]
    assert "block3.conv.weight" in done


def test_embeddings_opt_in():
    _, result = onnxprune.prune(FIXTURES / "embedding.onnx", sparsity=0.5)
    details = result.to_dict()["passes"][0]["details"]
    assert {t["weight"] for t in details["tensors"]} == {"proj.weight"}
    assert any("opt-in" in s["reason"] for s in details["skipped"])
    _, result = onnxprune.prune(FIXTURES / "embedding.onnx", sparsity=0.5, include_embeddings=True)
    assert {t["weight"] for t in result.to_dict()["passes"][0]["details"]["tensors"]} == {"proj.weight", "embed.weight"}


def test_shared_weight_pruned_once():
    model, result = onnxprune.prune(FIXTURES / "shared_weight.onnx", sparsity=0.5)
    tensors = result.to_dict()["passes"][0]["details"]["tensors"]
    assert len(tensors) == 1 and sorted(tensors[0]["layers"]) == ["first", "second"]
    assert abs(tensors[0]["sparsity"] - 0.5) < 1e-3
    assert len(model.graph.initializer) == 1


def test_integer_inputs_synthesised_in_range(tmp_path):
    code, _stdout, err = run_cli(FIXTURES / "embedding.onnx", "--sparsity", "0.5", "-o", tmp_path / "o.onnx",
                                "--input-shape", "tokens:2x7", "--report", tmp_path / "r.json", "--runs", "2")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["inputs"]["shapes"] == {"tokens": [2, 7]}


def test_validation_with_data_file(tmp_path):
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "data.npz", input=x)
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.3", "-o", tmp_path / "o.onnx", "--data",
                           tmp_path / "data.npz", "--report", tmp_path / "r.json", "--report", tmp_path / "r.md",
                           "--runs", "3")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    out = report["validation"]["providers"]["CPUExecutionProvider"]["outputs"]["logits"]
    assert out["shape"] == [4, 10] and 0 < out["cosine"] <= 1 and "top1_agreement" in out
    latency = report["validation"]["providers"]["CPUExecutionProvider"]["latency"]
    assert latency["original"]["runs"] == 3 and latency["speedup"] > 0
    assert report["validation"]["size"]["pruned"]["zip_bytes"] < report["validation"]["size"]["original"]["zip_bytes"]
    assert report["validation"]["model"]["original"]["macs"] == report["validation"]["model"]["pruned"]["macs"] > 0
    assert "| output |" in (tmp_path / "r.md").read_text()


def test_gates_pass(tmp_path):
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.1", "-o", tmp_path / "o.onnx", "--min-cosine",
                           "0.5", "--max-rel-l2", "0.9", "--runs", "2")
    assert code == 0, err


def test_python_api_in_memory_and_passes():
    from onnxprune import PruneConfig
    from onnxprune.passes import PassContext, PassManager
    from onnxprune.passes.unstructured import MagnitudePrunePass

    model = onnx.load(str(FIXTURES / "mlp_matmul.onnx"))
    ctx = PassContext(model=model)
    results = PassManager([MagnitudePrunePass(PruneConfig(sparsity=0.25)),
                           MagnitudePrunePass(PruneConfig(sparsity=0.5))]).run(ctx)
    assert [r.name for r in results] == ["unstructured", "unstructured"] and all(r.changed for r in results)
    assert results[1].details["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert results[0].seconds >= 0


def test_global_scope_never_empties_a_layer():
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", sparsity=0.97, scope="global")
    details = result.to_dict()["passes"][0]["details"]
    assert details["achieved_sparsity"] == pytest.approx(0.97, abs=1e-3)
    for t in details["tensors"]:
        assert t["sparsity"] <= 0.99 + 1.0 / t["params"], t
    model, _ = onnxprune.prune(FIXTURES / "cnn.onnx", sparsity=0.97, scope="global")
    assert all(np.count_nonzero(item.weight.array()) > 0 for item in find_prunable_weights(model))


def test_random_criterion_is_seeded():
    def mask(seed):
        model, _ = onnxprune.prune(FIXTURES / "cnn.onnx", sparsity=0.5, criterion="random", seed=seed)
        return {item.name: item.weight.array() == 0 for item in find_prunable_weights(model)}

    first, again, other = mask(7), mask(7), mask(8)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)
    assert all(abs(m.mean() - 0.5) <= 1.0 / m.size for m in first.values())


def test_shared_weight_both_users_see_the_pruned_tensor(tmp_path):
    code, _, err = run_cli(FIXTURES / "shared_weight.onnx", "--sparsity", "0.6", "-o", tmp_path / "o.onnx",
                           "--no-validate")
    assert code == 0, err
    model = onnx.load(str(tmp_path / "o.onnx"))
    (weight,) = model.graph.initializer
    readers = [n.name for n in model.graph.node if weight.name in n.input]
    assert readers == ["first", "second"]
    w = onnx.numpy_helper.to_array(weight)
    assert np.mean(w == 0) == pytest.approx(0.6, abs=1.0 / w.size)
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    np.testing.assert_allclose(got[0], np.tanh(x @ w) @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    ["--sparsity", "0.7"], ["--sparsity", "0.7", "--scope", "global"], ["--pattern", "2:4"],
    ["--sparsity", "0.5", "--criterion", "random", "--seed", "3"], ["--threshold", "0.05"],
])
@pytest.mark.parametrize("name", ["cnn.onnx", "cnn_constant_weights.onnx", "cnn_external/model.onnx"])
def test_same_options_give_byte_identical_files(tmp_path, name, options):
    for run in ("a", "b"):  # same file name in two folders: an external model names its data file
        (tmp_path / run).mkdir()
        code, _, err = run_cli(FIXTURES / name, *options, "-o", tmp_path / run / "o.onnx", "--no-validate")
        assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == (["o.onnx", "o.onnx.data"] if name.startswith("cnn_external") else ["o.onnx"])
    for file in files:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


@pytest.mark.parametrize("name", MAIN_FIXTURES)
def test_sparsity_zero_changes_no_output(tmp_path, name):
    code, _, err = run_cli(FIXTURES / name, "--sparsity", "0", "-o", tmp_path / "o.onnx", "--no-validate")
    assert code == 0, err
    before = {i.name: i.weight.array().tobytes() for i in find_prunable_weights(onnx.load(str(FIXTURES / name)))}
    after = {i.name: i.weight.array().tobytes() for i in find_prunable_weights(onnx.load(str(tmp_path / "o.onnx")))}
    assert before == after
    feeds = feeds_for(FIXTURES / name)
    runs = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
            for path in (FIXTURES / name, tmp_path / "o.onnx")]
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
