"""MACs of layers behind run-time computed shapes, and depth pruning's MAC figures on such models.

A text recogniser exported by paddle2onnx (opset 12, weights as Constant nodes, a 6,625-class bias, a dynamic image
width) reported 0 MACs removed by ``--drop-blocks``: its transformer blocks sit behind reshapes whose targets are
computed from ``Shape`` in int32, and the cost analysis left them uncounted. The fixtures of
``fixtures/build_depth_fixtures.py`` reproduce both spellings; their MACs are counted here by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.analysis.blocks import find_blocks
from onnxprune.analysis.cost import infer_shapes, node_macs, total_macs, weights_as_inputs
from onnxprune.shapes import skeleton

from .conftest import run_cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "depth"
VARIANTS = ("svtr_constant_weights", "svtr_wide_classifier")
CHANNELS, HEADS, NECK, CLASSES = 48, 4, 8, 4100


def hand_macs(batch: int, width: int) -> dict[str, int]:
    """The fixtures' MACs at ``[batch, 3, 8, width]``, by part (see fixtures/build_depth_fixtures.py)."""
    half = (width - 1) // 2 + 1  # the second conv's output width (stride 2, pad 1, kernel 3)
    seq, c = 2 * half, CHANNELS
    parts = {"front": 16 * 4 * width * 3 * 9 + c * 2 * half * 16 * 9,
             "attention": seq * c * 3 * c + 2 * seq * seq * c + seq * c * c,
             "mlp": seq * c * 2 * c * 2,
             "head": seq * c * NECK + seq * NECK * CLASSES}
    return {k: batch * v for k, v in parts.items()}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / f"{name}.onnx"))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("width", [40, 64])
def test_layers_behind_run_time_reshapes_are_counted(name, width):
    model = load(name)
    shapes = {"x": [1, 3, 8, width]}
    assert total_macs(model, shapes) == sum(hand_macs(1, width).values())
    macs = node_macs(model, shapes)
    assert len([n for n in model.graph.node if n.op_type in ("Conv", "MatMul")]) == len(macs) == 2 + 4 + 2 + 2
    assert [b.kind for b in find_blocks(model, shapes).blocks] == ["attention", "mlp"]


def test_stripped_weights_become_shape_only_inputs():
    """Every weight the skeleton strips (Constant nodes and initializers) is an input with its dims and no value."""
    for name in VARIANTS:
        model = load(name)
        skel = skeleton(model, {"x": [1, 3, 8, 40]})
        moved = weights_as_inputs(skel)
        inputs = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in skel.graph.input}
        big = [n for n in skel.graph.node if n.op_type == "Constant" and np.prod(n.attribute[0].t.dims) > 4096]
        assert moved == 6 and not big
        assert all(int(np.prod(t.dims)) <= 4096 for t in skel.graph.initializer)
        assert inputs.pop("x") == [1, 3, 8, 40]
        assert sorted(inputs.values()) == [[8, 4100], [48, 16, 3, 3], [48, 96], [48, 144], [96, 48], [4100]]
    shapes = infer_shapes(load("svtr_wide_classifier"), {"x": [1, 3, 8, 40]})
    assert [d for v, d in shapes.items() if v.startswith("matmul_")][:2] == [[1, 40, 144], [1, 4, 40, 40]]


def _calibration(tmp_path: Path, width: int, count: int = 8) -> Path:
    path = tmp_path / "calibration.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((count, 3, 8, width)).astype(np.float32))
    return path


@pytest.mark.parametrize("name", VARIANTS)
def test_depth_report_counts_removed_macs_at_the_shapes_of_every_figure(tmp_path, name):
    """Summary, removed-by-kind and depth details give the same MACs, at the validation inputs' shapes (the
    calibration hold-out: 2 of 8 samples), and the difference is the removed blocks' hand count."""
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    code, _, err = run_cli(FIXTURES / f"{name}.onnx", "--drop-blocks", "2", "--calibration-data",
                           _calibration(tmp_path, 40), "-o", out, "--report", report, "-q")
    assert code == 0, err
    data = json.loads(report.read_text())
    depth = next(p["details"] for p in data["passes"] if p["name"] == "depth")
    macs = hand_macs(2, 40)
    assert data["validation"]["inputs"]["shapes"] == {"x": [2, 3, 8, 40]}
    assert depth["macs_before"] == data["validation"]["model"]["original"]["macs"] == sum(macs.values())
    assert depth["macs_after"] == data["validation"]["model"]["pruned"]["macs"] == macs["front"] + macs["head"]
    assert data["summary"]["removed_by_kind"]["depth"]["macs"] == macs["attention"] + macs["mlp"]
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for width in (40, 72):  # the width stays dynamic
        probs = session.run(None, {"x": np.zeros((1, 3, 8, width), np.float32)})[0]
        assert probs.shape == (1, 2 * ((width - 1) // 2 + 1), CLASSES)


@pytest.mark.slow
def test_real_text_recogniser_reports_the_macs_its_removed_blocks_cost(tmp_path):
    """The PP-OCRv4 recogniser of rapidocr-onnxruntime (the corpus): its SVTR neck is 2 attention + 2 MLP blocks on
    a 40-step sequence (width 320 / 8) of 120 channels, 8 heads, MLP 240."""
    from .corpus.models import INSTALL, REC

    path = REC.locate()
    if path is None:
        pytest.skip(f"corpus package {REC.dist} is not installed; install the corpus with: {INSTALL}")
    feeds, _ = REC.make(np.random.default_rng(1), 8, 0)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, **feeds)
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    code, _, err = run_cli(path, "--drop-blocks", "2", "--calibration-data", calibration, "-o", out,
                           "--report", report, "-q", "--runs", "2", "--warmup", "0")
    assert code == 0, err
    data = json.loads(report.read_text())
    depth = next(p["details"] for p in data["passes"] if p["name"] == "depth")
    batch = data["validation"]["inputs"]["shapes"]["x"][0]
    seq, c = 40, 120
    cost = {"attention": seq * c * 3 * c + 2 * seq * seq * c + seq * c * c, "mlp": 2 * seq * c * 2 * c}
    removed = sum(cost[b["kind"]] for b in depth["blocks"] if b["removed"]) * batch
    assert depth["removed"] == 2 and removed > 0
    assert depth["macs_before"] - depth["macs_after"] == removed
    assert data["summary"]["removed_by_kind"]["depth"]["macs"] == removed
    assert depth["macs_before"] == data["validation"]["model"]["original"]["macs"]
    assert depth["macs_after"] == data["validation"]["model"]["pruned"]["macs"]


@pytest.mark.parametrize(("name", "macs"), [("gpt_neo_ts", 1_376_256), ("swin_ts", 3_424_896)])
def test_every_layer_of_exports_with_large_constant_masks_is_counted(name, macs):
    """GPT-Neo's and Swin's exports (fixtures/transformers) also stopped symbolic inference at a stripped constant:
    most of their MatMuls counted 0 MACs (0.21 M and 2.33 M in all). Now every layer counts; GPT-Neo's projections
    at the default [1, 16] tokens are 16 x 64 x 64."""
    model = onnx.load(str(FIXTURES.parent / "transformers" / f"{name}.onnx"))
    counted = node_macs(model)
    layers = [n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert all(counted.get(n) for n in layers)
    assert sum(counted.values()) == macs
    if name == "gpt_neo_ts":
        assert counted["/model/transformer/h.1/attn/attention/q_proj/MatMul"] == 16 * 64 * 64
