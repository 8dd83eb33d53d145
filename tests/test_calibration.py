"""Calibration data loading and least-squares reconstruction after structured pruning."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.calibration import channel_energy, load_calibration
from onnxprune.errors import InputDataError

from .conftest import FIXTURES, listing, run_cli


def calib(tmp_path, n=48, size=32, name="calib.npz"):
    x = np.random.default_rng(1).standard_normal((n, 3, size, size)).astype(np.float32)
    np.savez(tmp_path / name, input=x)
    return tmp_path / name


def rel_error(a_model, b_model, x):
    a = ort.InferenceSession(str(a_model) if not isinstance(a_model, onnx.ModelProto) else a_model.SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(b_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("name, size", [("cnn.onnx", 32), ("arch/resnet18.onnx", 64), ("mlp_gemm.onnx", None),
                                        ("arch/mobilenetv2.onnx", 64)])
def test_reconstruction_brings_outputs_closer(tmp_path, name, size):
    rng = np.random.default_rng(2)
    if size is None:
        np.savez(tmp_path / "c.npz", input=rng.standard_normal((1024, 64)).astype(np.float32))  # rows >> features
        x = rng.standard_normal((32, 64)).astype(np.float32)
    else:
        np.savez(tmp_path / "c.npz", input=rng.standard_normal((32, 3, size, size)).astype(np.float32))
        x = rng.standard_normal((8, 3, size, size)).astype(np.float32)
    plain, _ = onnxprune.prune(FIXTURES / name, structured=True, sparsity=0.5)
    rebuilt, result = onnxprune.prune(FIXTURES / name, structured=True, sparsity=0.5, reconstruct=True,
                                      calibration_data=str(tmp_path / "c.npz"), uniform=True)  # same ratios as plain
    onnx.checker.check_model(rebuilt, full_check=True)
    rec = result.to_dict()["passes"][0]["details"]["reconstruction"]
    assert rec["layers"] > 0
    before, after = rel_error(FIXTURES / name, plain, x), rel_error(FIXTURES / name, rebuilt, x)
    assert after < 0.8 * before, (before, after)  # held-out inputs, random weights: a conservative bar
    # same architecture as the plain pruning: reconstruction changes values, not shapes
    assert [tuple(i.dims) for i in plain.graph.initializer if "bias" not in i.name][:5] == \
        [tuple(i.dims) for i in rebuilt.graph.initializer if "bias" not in i.name][:5]


def test_cli_reconstruct(tmp_path):
    code, out, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.1", "--reconstruct",
                             "--calibration-data", calib(tmp_path), "-o", tmp_path / "o.onnx", "--report",
                             tmp_path / "r.json", "--runs", "2", "--input-shape", "input:8x3x32x32", "--uniform")
    assert code == 0, err
    assert "reconstructed" in out
    report = json.loads((tmp_path / "r.json").read_text())
    # measured on the CNN fixture at 10 % with uniform ratios: cosine 0.62 with the repair, 0.27 without it
    # (the default sensitivity allocation gives 0.49 on this random-weight fixture)
    assert report["validation"]["worst"]["cosine"] > 0.5


def test_calibration_sources(tmp_path):
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    feeds = load_calibration(calib(tmp_path, n=40), model, batch=16)
    assert [f["input"].shape[0] for f in feeds] == [16, 16, 8]
    folder = tmp_path / "dir"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", np.zeros((2, 3, 32, 32), np.float32))
    assert len(load_calibration(folder, model)) == 3
    iterable = ({"input": np.ones((4, 3, 32, 32), np.float32)} for _ in range(2))
    assert len(load_calibration(iterable, model)) == 2
    energy = channel_energy(model, feeds, {"input": 1})
    assert energy["input"].shape == (3,) and (energy["input"] > 0).all()


@pytest.mark.parametrize("arrays, words", [
    ({"wrong": np.zeros((4, 3, 32, 32), np.float32)}, "missing input"),
    ({"input": np.zeros((4, 3, 16, 16), np.float32)}, "shape"),
    ({"input": np.zeros((4, 3, 32, 32), np.float64)}, "dtype"),
])
def test_bad_calibration_data(tmp_path, arrays, words):
    np.savez(tmp_path / "c.npz", **arrays)
    before = listing(tmp_path)
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.5", "--reconstruct",
                           "--calibration-data", tmp_path / "c.npz", "-o", tmp_path / "o.onnx")
    assert code == InputDataError.exit_code and words in err
    assert listing(tmp_path) == before


def test_reconstruct_needs_calibration(tmp_path):
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.5", "--reconstruct",
                           "-o", tmp_path / "o.onnx")
    assert code == 2 and "--calibration-data" in err
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.5", "--reconstruct", "--calibration-data",
                           calib(tmp_path), "-o", tmp_path / "o.onnx", "--no-validate")
    assert code == 0, err  # unstructured: the row-wise refit of the kept weights
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.5", "--calibration-data", tmp_path / "nope.npz",
                           "-o", tmp_path / "o2.onnx")
    assert code == InputDataError.exit_code and "not found" in err


def test_image_folder_calibration(tmp_path):
    from PIL import Image

    from onnxprune.calibration import ImagePreprocess

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    feeds = load_calibration(folder, model)
    assert feeds[0]["input"].shape == (5, 3, 32, 32) and len(feeds) == 1  # dynamic batch: one batch of 5
    assert abs(float(feeds[0]["input"].mean())) < 3
    pre = ImagePreprocess(mean=(0, 0, 0), std=(1, 1, 1), channels="bgr")
    raw = load_calibration(folder, model, images=pre)[0]["input"]
    assert raw.min() >= 0 and raw.max() <= 1
    code, _out, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.5", "--reconstruct",
                             "--calibration-data", folder, "-o", tmp_path / "o.onnx", "--no-validate")
    assert code == 0, err


def test_image_calibration_errors(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.5", "--reconstruct",
                           "--calibration-data", folder, "-o", tmp_path / "o.onnx")
    assert code == InputDataError.exit_code and "cannot read image" in err
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.5", "--reconstruct",
                           "--calibration-data", folder, "--image-size", "big", "-o", tmp_path / "o.onnx")
    assert code == 2 and "--image-size" in err


@pytest.mark.parametrize("options", [{"sparsity": 0.7}, {"pattern": "2:4"}, {"sparsity": 0.7, "criterion": "activation"}])
def test_unstructured_reconstruction_keeps_zeros_and_helps(tmp_path, options):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "c.npz", input=rng.standard_normal((32, 3, 32, 32)).astype(np.float32))
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    plain, _ = onnxprune.prune(FIXTURES / "cnn.onnx", calibration_data=str(tmp_path / "c.npz"), **options)
    rebuilt, result = onnxprune.prune(FIXTURES / "cnn.onnx", calibration_data=str(tmp_path / "c.npz"),
                                      reconstruct=True, repair="rowwise", **options)
    onnx.checker.check_model(rebuilt, full_check=True)
    assert result.to_dict()["passes"][0]["details"]["reconstruction"]["layers"] >= 7  # 2:4 skips the 3-channel stem
    from onnxprune.analysis.weights import find_prunable_weights

    before = {w.name: w.weight.array() == 0 for w in find_prunable_weights(plain)}
    for w in find_prunable_weights(rebuilt):
        assert (w.weight.array()[before[w.name]] == 0).all()  # every pruned weight stays zero
        # (a weight reading an input that is always zero, e.g. a dead ReLU channel, may become zero too)
    assert rel_error(FIXTURES / "cnn.onnx", rebuilt, x) < 0.5 * rel_error(FIXTURES / "cnn.onnx", plain, x)
