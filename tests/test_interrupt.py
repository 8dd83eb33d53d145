"""Ctrl-C (SIGINT) or SIGTERM at any stage: exit 130, one line, no traceback; no partial output file.

The tests do not sleep and hope: ``ONNXPRUNE_TEST_PAUSE_AT=<stage>:<file>`` makes the command write ``<file>`` when
it reaches ``<stage>`` and wait there, and the signal is sent once the file exists (see docs/testing.md). They pass
on a machine whose cores are all busy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from .conftest import listing

#: every stage a run passes, in order, and whether the output is complete there
STAGES = [("start", False), ("import", False), ("load", False), ("prune", False), ("write", False),
          ("rename", True), ("written", True)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small MLP (4 x 256 x 256): fast to prune, big enough for an external data file."""
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "input"
    for i in range(4):
        inits.append(numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 256])], inits)
    path = tmp_path_factory.mktemp("model") / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return path


def start_paused(stage, flag, args):
    """Start ``python -m onnxprune ARGS`` and wait (without a time limit that load could break) until it pauses."""
    env = dict(os.environ, ONNXPRUNE_TEST_PAUSE_AT=f"{stage}:{flag}")
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not flag.exists():
        assert proc.poll() is None, f"ended before reaching {stage}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"never reached {stage}"
        time.sleep(0.02)
    return proc


def error_lines(err):
    return [line for line in err.splitlines() if line.strip() and not line.startswith("[")]


CASES = [(stage, complete, signal.SIGINT) for stage, complete in STAGES] + [
    (stage, complete, signal.SIGTERM) for stage, complete in STAGES if stage in ("start", "prune", "rename")]


@pytest.mark.parametrize("stage, complete, sig", CASES, ids=[f"{s}-{g.name}" for s, _, g in CASES])
def test_signal_at_each_stage(model, tmp_path, stage, complete, sig):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, flag = out_dir / "out.onnx", tmp_path / "reached"
    proc = start_paused(stage, flag, [model, "-o", out, "--sparsity", "0.5", "--external-data", "--runs", "2"])
    proc.send_signal(sig)
    if stage == "rename":
        flag.unlink()  # signals are held across the renames: the run goes on to finish them first
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    if complete:
        assert error_lines(err) == [f"onnxprune: interrupted; output written completely: {out}.data, {out}"]
        assert listing(out_dir) == ["out.onnx", "out.onnx.data"]
        onnx.checker.check_model(str(out), full_check=True)
    else:
        assert error_lines(err) == ["onnxprune: interrupted; no output written"]
        assert listing(out_dir) == [], "no output and no temporary folder"


def test_interrupt_after_the_report_names_every_file(model, tmp_path):
    out, report, flag = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "reached"
    (tmp_path / "r.json").write_text("old")
    proc = start_paused("written", flag, [model, "-o", out, "--sparsity", "0.5", "--no-validate", "--report", report,
                                          "--force"])
    flag.unlink()  # go on past the model ...
    while not flag.exists():  # ... to the report (the same stage, reached again)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert error_lines(err) == [f"onnxprune: interrupted; output written completely: {out}, {report}"]
    assert '"schema_version"' in report.read_text()


def test_the_entry_point_installs_its_handlers_before_heavy_imports():
    code = ("import sys, signal; import onnxprune.entry as e; e.install_exit_handlers(); "
            "heavy = {'numpy', 'onnx', 'onnxruntime', 'click', 'onnxprune.cli'} & set(sys.modules); "
            "assert not heavy, heavy; import onnxprune.signals as s; assert signal.getsignal(signal.SIGINT) is s._exit_now")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_killed_run_leaves_a_temp_folder_the_next_run_removes(model, tmp_path):
    """SIGKILL cannot be caught: the temporary folder stays, and the next run writing beside it removes it."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = start_paused("write", tmp_path / "reached", [model, "-o", out_dir / "a.onnx", "--sparsity", "0.5",
                                                        "--no-validate", "--external-data"])
    proc.kill()
    proc.communicate(timeout=60)
    left = listing(out_dir)
    assert len(left) == 3 and left[0].startswith(".a.onnx.onnxprune-") and left[1:] == [
        f"{left[0]}/a.onnx", f"{left[0]}/a.onnx.data"]
    (out_dir / ".mine.onnxprune-keep.tmp").mkdir()  # a user's folder that only looks similar
    done = subprocess.run([sys.executable, "-m", "onnxprune", str(model), "-o", str(out_dir / "b.onnx"),
                           "--sparsity", "0.5", "--no-validate"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert listing(out_dir) == [".mine.onnxprune-keep.tmp", "b.onnx"]
