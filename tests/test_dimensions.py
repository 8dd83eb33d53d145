"""Every pruning dimension in one run: width, heads, hidden size (rotation), depth and vocabulary together.

The large-vocabulary LLaMA-style decoder (32k tokens, tiny hidden size) is pruned along all five dimensions by one
command; the pipeline order is preparation, depth, vocabulary, width, hidden. The pruned model must keep at most
half of the MACs, keep its inputs and outputs (names and shapes), pass the full checker, and each pass must report
what it removed.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.analysis.cost import total_macs

from .conftest import FIXTURES, run_cli

LARGE = FIXTURES / "transformers" / "llama_vocab32k_ts.onnx"
CALIBRATION = FIXTURES / "transformers" / "llama_vocab32k_calibration.npz"


def _outputs(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_all_dimensions_in_one_run_keep_at_most_half_the_macs(tmp_path):
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    code, _, err = run_cli(LARGE, "-o", out, "--structured", "--sparsity", "0.5", "--head-sparsity", "0.25",
                           "--hidden-sparsity", "0.25", "--drop-blocks", "1", "--vocab-from-calibration",
                           "--calibration-data", CALIBRATION, "--no-validate", "--report", report)
    assert code == 0, err
    original, model = onnx.load(str(LARGE)), onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["passes"]] == ["depth", "vocabulary", "structured", "hidden"]
    shapes = {"input_ids": [1, 32], "attention_mask": [1, 32]}
    assert total_macs(model, shapes) <= 0.5 * total_macs(original, shapes)
    kinds = data["summary"]["removed_by_kind"]
    assert all(kinds[kind]["macs"] > 0 for kind in ("width", "hidden", "depth", "vocabulary")), kinds
    assert [(i.name, i.type) for i in model.graph.input] == [(i.name, i.type) for i in original.graph.input]
    assert [(o.name, o.type) for o in model.graph.output] == [(o.name, o.type) for o in original.graph.output]
    ids = np.load(CALIBRATION)["input_ids"][-2:]
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}
    reference, pruned = _outputs(LARGE, feeds)[0], _outputs(out, feeds)[0]
    assert pruned.shape == reference.shape and np.isfinite(pruned[..., np.unique(ids)]).all()
