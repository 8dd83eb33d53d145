"""The measuring helpers of bench/bench_peer.py: they must flag invalid models and count what the graph uses."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import bench_peer
from peer_measure import Case, Outcome, checker_failure, judge, run_child, weight_counts

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((4, 6)).astype(np.float32)
W2 = RNG.standard_normal((6, 3)).astype(np.float32)


def mlp(w1: np.ndarray = W1, w2: np.ndarray = W2, output: str = "y", extra: list | None = None,
        shape: list | None = None) -> onnx.ModelProto:
    """x [N, 4] -> MatMul -> Relu -> MatMul -> ``output`` [N, 3]; ``extra`` initializers are left unread."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], [output])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), *(extra or [])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape or ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def case(tmp_path: Path) -> Case:
    source = save(mlp(), tmp_path / "dense.onnx")
    x = RNG.standard_normal((16, 4)).astype(np.float32)
    labels = np.argmax(np.maximum(x @ W1, 0) @ W2, axis=1)
    return Case("mlp", source, [{"x": x}], [{"x": x[:8]}, {"x": x[8:]}], labels,
                lambda outs, lab: float(np.mean(outs[0].argmax(-1) == lab)), "top-1")


def test_checker_failure_flags_a_type_clash(tmp_path: Path) -> None:
    """The full check flags an Add of a float input and an int64 constant; a well-formed model passes."""
    node = helper.make_node("Add", ["x", "k"], ["y"])
    graph = helper.make_graph([node], "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.array([1, 2], np.int64), "k")])
    bad = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "b.onnx")
    assert checker_failure(bad).startswith("ONNX check:")
    assert checker_failure(save(mlp(), tmp_path / "good.onnx")) is None


def test_unread_initializers_are_not_parameters() -> None:
    """An original weight left behind next to its pruned copy doubles the file, not the parameters or zeros."""
    pruned = W1.copy()
    pruned[np.abs(pruned) < np.median(np.abs(pruned))] = 0
    zeros = int(np.count_nonzero(pruned == 0))
    left = mlp(pruned, extra=[numpy_helper.from_array(W1, "w1_original")])
    assert weight_counts(mlp()) == (W1.size + W2.size, W1.size + W2.size, 0)
    assert weight_counts(left) == (W1.size + W2.size, W1.size + W2.size, zeros)


def test_judge_measures_a_valid_pruned_model(case: Case, tmp_path: Path) -> None:
    pruned = W2.copy()
    pruned[0] = 0  # one hidden unit no longer reaches the output
    out = judge(case, save(mlp(w2=pruned), tmp_path / "p.onnx"), Outcome("mlp", "m", "t", "failed"))
    assert out.status == "ok" and out.failures == []
    assert out.zeros == pytest.approx(3 / (W1.size + W2.size))
    assert out.params_kept == 1.0 and out.macs_kept == 1.0
    x = np.concatenate([b["x"] for b in case.check])
    dense, got = np.maximum(x @ W1, 0) @ W2, np.maximum(x @ W1, 0) @ pruned
    assert out.rel_l2 == pytest.approx(np.linalg.norm(dense - got) / np.linalg.norm(dense), rel=1e-4)
    assert out.metric_dense == 1.0 and out.metric_pruned == pytest.approx(np.mean(got.argmax(1) == case.labels))


def test_judge_flags_a_renamed_output(case: Case, tmp_path: Path) -> None:
    out = judge(case, save(mlp(output="logits"), tmp_path / "p.onnx"), Outcome("mlp", "m", "t", "failed"))
    assert out.status == "invalid"
    assert any(f.startswith("interface changed") for f in out.failures)


def test_judge_flags_a_model_that_does_not_run(case: Case, tmp_path: Path) -> None:
    """Hidden width cut in the first layer but not the second: both the checker and onnxruntime refuse it."""
    broken = save(mlp(w1=W1[:, :5]), tmp_path / "p.onnx")
    out = judge(case, broken, Outcome("mlp", "m", "t", "failed"))
    assert out.status == "invalid"
    assert [f.split(":")[0] for f in out.failures] == ["ONNX check", "onnxruntime"]
    assert out.cosine is None and out.metric_pruned is None


def test_judge_counts_removed_macs(case: Case, tmp_path: Path) -> None:
    """Two of six hidden units removed from both layers: MACs and parameters kept are 4/6."""
    out = judge(case, save(mlp(W1[:, :4], W2[:4]), tmp_path / "p.onnx"), Outcome("mlp", "m", "t", "failed"))
    assert out.status == "ok"
    assert out.macs_kept == pytest.approx(4 / 6) and out.params_kept == pytest.approx(4 / 6)


def test_run_child_reports_exit_code_last_line_and_stops_hangs() -> None:
    rc, line, _ = run_child([sys.executable, "-c", ("import sys; print('a', file=sys.stderr); "
                             "print('boom', file=sys.stderr); sys.exit(3)")], timeout=120)
    assert (rc, line) == (3, "boom")
    rc, line, _ = run_child([sys.executable, "-c", "import time; time.sleep(600)"], timeout=1)
    assert rc == 124 and "stopped" in line


def _row(status: str = "ok", macs: float = 1.0, metric: float | None = None, rel: float = 0.1) -> Outcome:
    return Outcome("m", "x", "t", status, macs_kept=macs, params_kept=1.0, zeros=0.5, metric_dense=metric,
                   metric_pruned=metric, rel_l2=rel)


def test_better_rules() -> None:
    assert bench_peer.better(_row(), _row("invalid")) and not bench_peer.better(_row("failed"), _row())
    assert bench_peer.better(_row(metric=0.90, rel=0.5), _row(metric=0.80, rel=0.1))
    # metrics within the band: the lower relative L2 decides; an equal one is a tie
    assert bench_peer.better(_row(metric=0.901, rel=0.1), _row(metric=0.900, rel=0.2))
    assert not bench_peer.better(_row(rel=0.1), _row(rel=0.1))
    assert not bench_peer.better(_row(metric=0.9, rel=0.1), _row(metric=0.9, rel=0.0995))
    # keeping more MACs never wins
    assert not bench_peer.better(_row(macs=0.8, metric=0.9), _row(macs=0.7, metric=0.5))


def test_pruned_nothing_and_summary_counts() -> None:
    noop = Outcome("m", "x", "onnxsim", "ok", macs_kept=1.0, params_kept=1.0, zeros=0.0, rel_l2=0.0)
    zeroed = Outcome("m", "x", "onnxprune", "ok", macs_kept=1.0, params_kept=1.0, zeros=0.5, rel_l2=0.2)
    assert bench_peer.pruned_nothing(noop) and not bench_peer.pruned_nothing(zeroed)
    lines = bench_peer.summary([zeroed, noop, Outcome("n", "x", "onnxsim", "failed")]).splitlines()
    assert lines[2].startswith("| onnxprune | 1 | 1 | 0 | 0 | 0 | 1: m / x")
    assert lines[3].startswith("| onnxsim | 2 | 1 | 0 | 1 | 1 | 0: –")  # its rel L2 of 0 does not make a no-op win
