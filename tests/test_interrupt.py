"""Ctrl-C (SIGINT) or SIGTERM at any stage leaves no partial output file."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A ~40 MB MLP: big enough that loading, pruning, checking and saving each take a moment."""
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "input"
    for i in range(10):
        inits.append(numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 1024])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("delay", [0.6, 1.1, 1.3, 1.5, 1.8, 2.6])
def test_signal_leaves_no_partial_output(big_model, tmp_path, sig, delay):
    out = tmp_path / "out.onnx"
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxprune", str(big_model), "-o", str(out), "--sparsity", "0.5", "--external-data",
         "--runs", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert proc.returncode in (0, 130), err.decode()
    if proc.returncode == 130 and b"no output written" in err:
        assert leftovers == [], f"partial files left after interrupt: {leftovers}"
    else:
        # the signal came after the output was complete (e.g. during validation): it must be whole
        assert proc.returncode == 0 or b"written completely" in err, err.decode()
        assert leftovers == ["out.onnx", "out.onnx.data"]
        onnx.checker.check_model(str(out), full_check=True)
