"""End-to-end runs of the ``onnxprune`` command on the fixtures (in-process and as ``python -m onnxprune``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.analysis.weights import find_prunable_weights

from .conftest import FIXTURES, listing, run_cli, run_subprocess

CNN = FIXTURES / "cnn.onnx"
FAST = ("--runs", "2", "--warmup", "1")


def outputs(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def image(n: int = 2, seed: int = 0):
    return {"input": np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)}


def sparsity_of(path) -> float:
    arrays = [item.weight.array() for item in find_prunable_weights(onnx.load(str(path)))]
    return sum(int(a.size - np.count_nonzero(a)) for a in arrays) / sum(a.size for a in arrays)


@pytest.fixture
def work(tmp_path):
    shutil.copy(CNN, tmp_path / "model.onnx")
    return tmp_path


def test_default_output_beside_the_input(work):
    code, out, err = run_cli(work / "model.onnx", "--sparsity", "0.7", *FAST)
    assert code == 0, err
    assert listing(work) == ["model.onnx", "model.pruned.onnx"]
    assert (work / "model.onnx").read_bytes() == CNN.read_bytes(), "the input is never touched"
    assert sparsity_of(work / "model.pruned.onnx") == pytest.approx(0.7, abs=0.005)
    assert "Unstructured pruning" in out and "Validation" in out
    assert "[" in err and "loading model" in err  # progress goes to stderr, the summary to stdout


def test_prune_subcommand_equals_default_command(work):
    assert run_cli(work / "model.onnx", "--sparsity", "0.5", "-o", work / "a.onnx", "--no-validate")[0] == 0
    assert run_cli("prune", work / "model.onnx", "--sparsity", "0.5", "-o", work / "b.onnx", "--no-validate")[0] == 0
    assert (work / "a.onnx").read_bytes() == (work / "b.onnx").read_bytes()


def test_force_replaces_an_existing_output(work):
    (work / "out.onnx").write_bytes(b"old")
    code, _, err = run_cli(work / "model.onnx", "--sparsity", "0.5", "-o", work / "out.onnx", "--force", "--no-validate")
    assert code == 0, err
    onnx.checker.check_model(str(work / "out.onnx"), full_check=True)
    assert listing(work) == ["model.onnx", "out.onnx"], "no temporary files left beside the output"


def test_quiet_prints_nothing(work):
    code, out, err = run_cli(work / "model.onnx", "--sparsity", "0.5", "-q", *FAST)
    assert code == 0 and out == "" and err == ""
    assert (work / "model.pruned.onnx").exists()


def test_verbose_lists_every_tensor(work):
    code, out, err = run_cli(work / "model.onnx", "--sparsity", "0.5", "-v", "--no-validate")
    assert code == 0, err
    names = [item.name for item in find_prunable_weights(onnx.load(str(CNN)))]
    assert len(names) == 9 and all(name in out for name in names)
    _, short, _ = run_cli(work / "model.onnx", "--sparsity", "0.5", "-o", work / "o.onnx", "--no-validate")
    assert len(short) <= len(out)


def test_json_and_markdown_reports(work):
    code, _, err = run_cli(work / "model.onnx", "--sparsity", "0.7", "-o", work / "o.onnx", "--report",
                           work / "r.json", "--report", work / "r.md", "--runs", "3", "--warmup", "1")
    assert code == 0, err
    report = json.loads((work / "r.json").read_text())
    assert {"schema_version", "input", "output", "config", "passes", "summary", "validation"} <= set(report)
    assert report["schema_version"] == 1
    assert report["input"] == str(work / "model.onnx") and report["output"] == str(work / "o.onnx")
    assert report["config"]["sparsity"] == 0.7 and report["config"]["criterion"] == "l1"
    (unstructured,) = report["passes"]
    assert {"name", "changed", "seconds", "details"} <= set(unstructured)
    assert unstructured["name"] == "unstructured" and unstructured["changed"] is True and unstructured["seconds"] >= 0
    assert report["summary"]["achieved_sparsity"] == pytest.approx(sparsity_of(work / "o.onnx"), abs=1e-9)
    latency = report["validation"]["providers"]["CPUExecutionProvider"]["latency"]
    assert latency["original"]["runs"] == latency["pruned"]["runs"] == 3
    fidelity = report["validation"]["providers"]["CPUExecutionProvider"]["outputs"]["logits"]
    assert fidelity["shape"] == [1, 10] and -1 <= fidelity["cosine"] <= 1
    markdown = (work / "r.md").read_text()
    assert markdown.startswith("# onnxprune") and "| weight |" in markdown


def test_report_cosine_matches_the_written_model(work):
    x = image(4, seed=3)
    np.savez(work / "data.npz", **x)
    code, _, err = run_cli(work / "model.onnx", "--sparsity", "0.6", "-o", work / "o.onnx", "--data",
                           work / "data.npz", "--report", work / "r.json", *FAST)
    assert code == 0, err
    reported = json.loads((work / "r.json").read_text())["validation"]["providers"]["CPUExecutionProvider"]
    a, b = outputs(work / "model.onnx", x)[0].ravel(), outputs(work / "o.onnx", x)[0].ravel()
    cosine = float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    assert reported["outputs"]["logits"]["cosine"] == pytest.approx(cosine, abs=1e-5)


def test_no_validate_writes_model_without_validation(work):
    code, out, err = run_cli(work / "model.onnx", "--sparsity", "0.5", "-o", work / "o.onnx", "--no-validate",
                             "--report", work / "r.json")
    assert code == 0, err
    assert json.loads((work / "r.json").read_text())["validation"] is None
    assert "Validation" not in out


def test_pattern_and_threshold_from_the_command_line(work):
    code, _, err = run_cli(work / "model.onnx", "--pattern", "2:4", "-o", work / "nm.onnx", "--no-validate")
    assert code == 0, err
    conv = next(i for i in find_prunable_weights(onnx.load(str(work / "nm.onnx"))) if i.name == "block3.conv.weight")
    blocks = np.moveaxis(conv.weight.array(), 1, -1).reshape(-1, 4)
    assert (np.count_nonzero(blocks == 0, axis=1) >= 2).all()
    code, _, err = run_cli(work / "model.onnx", "--threshold", "0.02", "-o", work / "t.onnx", "--no-validate")
    assert code == 0, err
    for item in find_prunable_weights(onnx.load(str(work / "t.onnx"))):
        values = item.weight.array()
        assert np.all(np.abs(values[values != 0]) > 0.02)


@pytest.mark.parametrize("flag, files", [
    ("--external-data", ["model.onnx", "o.onnx", "o.onnx.data"]),
    ("--no-external-data", ["model.onnx", "o.onnx"]),
])
def test_external_data_flags(work, flag, files):
    code, _, err = run_cli(work / "model.onnx", "--sparsity", "0.5", "-o", work / "o.onnx", flag, "--no-validate")
    assert code == 0, err
    assert listing(work) == files
    x = image()
    reference, _ = onnxprune.prune(CNN, sparsity=0.5)
    expected = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    np.testing.assert_array_equal(outputs(work / "o.onnx", x)[0], expected[0])


def test_external_data_model_in_and_out(tmp_path):
    shutil.copytree(FIXTURES / "cnn_external", tmp_path / "ext")
    code, _, err = run_cli(tmp_path / "ext" / "model.onnx", "--sparsity", "0.7", *FAST)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == [
        "model.onnx", "model.onnx.data", "model.pruned.onnx", "model.pruned.onnx.data"]
    assert (tmp_path / "ext" / "model.onnx.data").read_bytes() == (FIXTURES / "cnn_external/model.onnx.data").read_bytes()
    assert sparsity_of(tmp_path / "ext" / "model.pruned.onnx") == pytest.approx(0.7, abs=0.005)
    code, _, err = run_cli(tmp_path / "ext" / "model.onnx", "--sparsity", "0.7", "-o", tmp_path / "single.onnx",
                           "--no-external-data", "--no-validate")
    assert code == 0, err
    assert not (tmp_path / "single.onnx.data").exists()
    x = image()
    np.testing.assert_array_equal(outputs(tmp_path / "single.onnx", x)[0],
                                  outputs(tmp_path / "ext" / "model.pruned.onnx", x)[0])


def test_input_shape_for_dynamic_dims(tmp_path):
    code, _, err = run_cli(FIXTURES / "mlp_dynamic.onnx", "--sparsity", "0.5", "-o", tmp_path / "o.onnx",
                           "--input-shape", "input:3x5x32", "--report", tmp_path / "r.json", *FAST)
    assert code == 0, err
    validation = json.loads((tmp_path / "r.json").read_text())["validation"]
    assert validation["inputs"]["shapes"] == {"input": [3, 5, 32]}
    assert validation["providers"]["CPUExecutionProvider"]["outputs"]["output"]["shape"] == [3, 5, 32]


def test_gates_pass_and_fail(work):
    code, _, err = run_cli(work / "model.onnx", "--sparsity", "0.1", "-o", work / "a.onnx", "--min-cosine", "0.5",
                           "--max-rel-l2", "0.9", *FAST)
    assert code == 0, err
    code, _, err = run_cli(work / "model.onnx", "--sparsity", "0.9", "-o", work / "b.onnx", "--max-rel-l2", "1e-9",
                           *FAST)
    assert code == 6 and "--max-rel-l2" in err
    assert (work / "b.onnx").exists(), "a missed gate still writes the output"


def test_providers_cpu_alias(work):
    code, _, err = run_cli(work / "model.onnx", "--sparsity", "0.3", "--providers", "cpu", "-o", work / "o.onnx",
                           "--report", work / "r.json", *FAST)
    assert code == 0, err
    assert list(json.loads((work / "r.json").read_text())["validation"]["providers"]) == ["CPUExecutionProvider"]


def test_sparsity_zero_keeps_outputs(work):
    code, _, err = run_cli(work / "model.onnx", "--sparsity", "0", "-o", work / "o.onnx", "--report", work / "r.json",
                           *FAST)
    assert code == 0, err
    x = image(3)
    np.testing.assert_array_equal(outputs(work / "o.onnx", x)[0], outputs(CNN, x)[0])
    worst = json.loads((work / "r.json").read_text())["validation"]["worst"]
    assert worst["rel_l2"] == 0.0 and worst["top1_agreement"] == 1.0


def test_python_m_onnxprune(work):
    proc = run_subprocess(work / "model.onnx", "--sparsity", "0.7", "-o", work / "o.onnx", "--report",
                          work / "r.json", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "Unstructured pruning" in proc.stdout
    assert json.loads((work / "r.json").read_text())["summary"]["achieved_sparsity"] == pytest.approx(0.7, abs=0.005)
    onnx.checker.check_model(str(work / "o.onnx"), full_check=True)


def test_help_and_version():
    proc = run_subprocess("--help")
    assert proc.returncode == 0 and "prune" in proc.stdout
    code, out, _ = run_cli("prune", "--help")
    assert code == 0
    for option in ("--output", "--force", "--sparsity", "--threshold", "--pattern", "--criterion", "--scope",
                   "--max-layer-sparsity", "--structured", "--round-to", "--exclude", "--min-params", "--prune-first",
                   "--prune-last", "--include-embeddings", "--seed", "--external-data", "--validate", "--providers",
                   "--data", "--input-shape", "--threads", "--runs", "--warmup", "--report", "--min-cosine",
                   "--max-rel-l2", "--min-top1", "--quiet", "--verbose", "--debug"):
        assert option in out, option
    code, out, _ = run_cli("--version")
    assert code == 0 and onnxprune.__version__ in out


def test_python_api_returns_model_and_result(tmp_path):
    model, result = onnxprune.prune(str(CNN), sparsity=0.7)
    assert isinstance(model, onnx.ModelProto) and isinstance(result, onnxprune.PruneResult)
    assert result.output is None and listing(tmp_path) == []
    report = result.to_dict()
    json.dumps(report)  # serialisable as is
    assert report["summary"]["achieved_sparsity"] == pytest.approx(0.7, abs=0.005)
    model2, _ = onnxprune.prune(CNN, tmp_path / "o.onnx", sparsity=0.7)
    assert onnx.load(str(tmp_path / "o.onnx")).SerializeToString() == model2.SerializeToString()
    assert model2.SerializeToString() == model.SerializeToString()
