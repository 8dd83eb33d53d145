"""Prune, then quantize with onnxruntime's quantization tools."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from .conftest import FIXTURES, listing, run_cli


@pytest.mark.parametrize("mode, ops", [("dynamic", {"ConvInteger", "DynamicQuantizeLinear"}),
                                       ("static", {"QuantizeLinear", "DequantizeLinear"})])
# sparsity and the worst output cosine pruning + quantization keeps on the CNN fixture (measured: unstructured 0.2
# keeps ~0.85, structured 0.1 ~0.35; with the ranking inverted both fall below 0: -0.19 and -0.04)
@pytest.mark.parametrize("structured, sparsity, min_cosine", [(False, "0.2", 0.8), (True, "0.1", 0.3)])
def test_prune_then_quantize(tmp_path, mode, ops, structured, sparsity, min_cosine):
    np.savez(tmp_path / "data.npz", input=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    args = [FIXTURES / "cnn.onnx", "--sparsity", sparsity, "--quantize", mode, "-o", tmp_path / "q.onnx", "--report",
            tmp_path / "r.json", "--runs", "2", "--data", tmp_path / "data.npz"] + (["--structured"] if structured else [])
    code, out, err = run_cli(*args)
    assert code == 0, err
    model = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert ops <= {n.op_type for n in model.graph.node}
    report = json.loads((tmp_path / "r.json").read_text())
    quant = report["quantization"]
    assert quant["mode"] == mode and quant["quantized_bytes"] < quant["pruned_bytes"]
    size = report["validation"]["size"]
    assert size["pruned"]["bytes"] < size["original"]["bytes"] / 3
    assert report["validation"]["worst"]["cosine"] > min_cosine
    details = report["passes"][0]["details"]  # and the pruning happened (a no-op would keep the cosine at 1)
    assert details["channels_removed"] > 0 if structured else abs(details["achieved_sparsity"] - float(sparsity)) < 0.01
    assert "Quantization" in out
    assert sorted(p for p in listing(tmp_path) if not p.startswith(".")) == ["data.npz", "q.onnx", "r.json"]
    assert not [p for p in listing(tmp_path) if p.startswith(".")], "no temporary files left"


def test_static_quantization_without_data_warns(tmp_path):
    code, out, err = run_cli(FIXTURES / "mlp_gemm.onnx", "--sparsity", "0.5", "--quantize", "static", "-o",
                             tmp_path / "q.onnx", "--runs", "2")
    assert code == 0, err
    assert "synthetic inputs" in out
