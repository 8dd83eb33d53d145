"""The mechanisms that bound onnxprune's peak memory (docs/benchmarks.md, "Peak memory by stage, fourth round").

A peak-RSS threshold would depend on the machine's load; these tests check what keeps the peak down instead: capture
and probe sessions that neither serialize nor copy the weights and keep no arena, captured tensors released feed by
feed, a heap that hands freed blocks back, the refit's streams holding one model's weights each.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import sessions
from onnxprune.activation_stream import ActivationStream
from onnxprune.sessions import create_session, fed_session, session_with_outputs

from .conftest import FIXTURES, run_cli

WIDTH = 256  # 256 KiB per weight: far above what a session's graph bytes may hold


def _chain(layers: int = 3) -> onnx.ModelProto:
    """MatMul + Relu layers of WIDTH x WIDTH float32 weights ([N, WIDTH] -> [N, WIDTH])."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) / 16, f"w{i}"))
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"h{i}"])]
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def created(monkeypatch):
    """Every session onnxprune creates through ``sessions.create_session``: (serialized bytes, options)."""
    seen: list[tuple[int, ort.SessionOptions]] = []

    def spy(model, options=None, providers=sessions.CPU):
        size = len(model.SerializeToString()) if isinstance(model, onnx.ModelProto) else -1
        seen.append((size, options))
        return create_session(model, options, providers)

    monkeypatch.setattr(sessions, "create_session", spy)
    return seen


def _lean(options: ort.SessionOptions) -> bool:
    return (not options.enable_cpu_mem_arena and options.get_session_config_entry("session.disable_prepacking") == "1"
            and options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL)


def _feeds(count: int = 3, rows: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((rows, WIDTH), dtype=np.float32)} for _ in range(count)]


def _reference(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(names, feed)


def test_session_with_outputs_hands_weights_over(created):
    model, feed = _chain(), _feeds(1)[0]
    names = ["m0", "h1"]
    session = session_with_outputs(model, names)
    got = session.run(names, feed)
    (size, options), = created
    assert sorted(session.weights) == ["w0", "w1", "w2"]  # fed in place on every run, not copied into the session
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert size < WIDTH * WIDTH  # graph only: no weight's bytes serialized
    assert _lean(options)
    for a, b in zip(got, _reference(model, names, feed)):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5)  # prepacked kernels round differently


@pytest.mark.parametrize("mode", ["by_feed", "run"])
def test_activation_stream_sessions_are_lean_and_exact(created, mode):
    model, feeds = _chain(), _feeds()
    chunks = [["m0"], ["m2"]]
    stream = ActivationStream(model, feeds)
    got: dict[tuple[int, str], np.ndarray] = {}
    if mode == "by_feed":
        for position, (i, values) in enumerate(stream.by_feed(chunks)):
            got[position // len(chunks), chunks[i][0]] = values[chunks[i][0]].copy()
    else:
        for names in chunks:
            for number, values in enumerate(stream.run(names)):
                got[number, names[0]] = values[names[0]]
    assert created and all(size < WIDTH * WIDTH and _lean(options) for size, options in created)
    for number, feed in enumerate(feeds):
        expected = _reference(model, ["m0", "m2"], feed)
        assert np.allclose(got[number, "m0"], expected[0], rtol=1e-5, atol=1e-5)
        assert np.allclose(got[number, "m2"], expected[1], rtol=1e-5, atol=1e-5)


def test_captured_tensors_are_released_feed_by_feed():
    """A feed's captured tensors die once the stream moves to the next feed: memory holds one feed's, not all."""
    model, feeds = _chain(), _feeds(4)
    alive: list[list[weakref.ref]] = [[] for _ in feeds]
    number = -1
    for i, values in ActivationStream(model, feeds).by_feed([["m0"], ["h1"], ["m2"]]):
        number += i == 0
        if i == 0 and number > 0:
            gc.collect()
            assert all(ref() is None for ref in alive[number - 1])  # the previous feed's tensors are gone
        alive[number].extend(weakref.ref(v) for v in values.values())
        del values
    assert number == len(feeds) - 1


def test_bound_heap_returns_freed_blocks_to_the_system():
    """After ``bound_heap`` (or ``bound_heap_for_sessions`` in the tool's own process) a freed 8 MiB block is
    unmapped, and the next one is mapped again rather than carved from the heap (glibc would otherwise raise its
    threshold to 8 MiB and keep such blocks resident); in a host process the sessions' bound changes nothing."""
    script = """
import ctypes, sys
import numpy as np
from onnxprune import heap

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "bound":
    assert heap.bound_heap()
if sys.argv[1] == "sessions":  # the tool's own process: validation fixes the threshold, --low-memory stays off
    heap.own_process()
    assert heap.bound_heap_for_sessions() and not heap.heap_bounded()
if sys.argv[1] == "host":  # a host process's allocator is left alone
    assert not heap.bound_heap_for_sessions()
block = np.ones(8 << 20, dtype=np.uint8)
del block
block = np.ones(8 << 20, dtype=np.uint8)
print(libc.mallinfo2().hblkhd >= 8 << 20)
"""
    if not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    results = {mode: subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
                                    ).stdout.strip() for mode in ("bound", "default", "sessions", "host")}
    assert results == {"bound": "True", "default": "False", "sessions": "True", "host": "False"}


def test_sessions_over_original_and_pruned_share_unchanged_weights():
    """The refit's two streams (original and pruned model) hold each weight pruning left unchanged once."""
    original, feed = _chain(), _feeds(1)[0]
    pruned = onnx.ModelProto()
    pruned.CopyFrom(original)
    changed = numpy_helper.to_array(pruned.graph.initializer[1]) * 0.5
    pruned.graph.initializer[1].CopyFrom(numpy_helper.from_array(changed, "w1"))
    shared: dict = {}
    names = ["h2"]
    one, two = (fed_session(sessions.model_header(m), m.graph.initializer, shared=shared) for m in (original, pruned))
    assert one.weights["w0"] is two.weights["w0"] and one.weights["w2"] is two.weights["w2"]
    assert one.weights["w1"] is not two.weights["w1"] and np.array_equal(two.weights["w1"], changed)
    for session, model in ((one, original), (two, pruned)):
        assert np.allclose(session.run(names, feed)[0], _reference(model, names, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag", [False, True])
def test_cli_bounds_the_heap_only_with_low_memory(tmp_path, monkeypatch, flag):
    """``--low-memory`` fixes the mmap threshold for the run and says so in the report; without it the allocator is
    left as it is (the bound costs time where activations are large). Either way the stages are back to time
    before memory after the command (a later call in the same process does not inherit it)."""
    import json

    from onnxprune import heap

    calls: list[int] = []
    monkeypatch.setitem(heap._requested, "bounded", False)
    monkeypatch.setattr(heap, "_libc", lambda: None)  # the allocator of this test process is left as it is
    real = heap.bound_heap
    monkeypatch.setattr(heap, "bound_heap", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, text, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.5", "--no-validate", "-o", out,
                              "--report", report, *(["--low-memory"] if flag else []))
    assert code == 0, err
    assert out.exists() and calls == ([1] if flag else [])
    assert json.loads(report.read_text())["low_memory"] is flag
    assert ("--low-memory: memory before time" in text) is flag
    assert not heap.heap_bounded()


def test_api_low_memory_gives_the_same_model_and_ends_with_the_call(monkeypatch):
    """``prune(low_memory=True)``: the stages that trade time for memory do so during the call (the refit's budget
    derived from the data), the model is the default run's bit for bit, the report says it, and the process is back
    to time before memory afterwards."""
    import onnxprune
    from onnxprune import heap
    from onnxprune.passes import reconstruction

    monkeypatch.setitem(heap._requested, "bounded", False)
    monkeypatch.setattr(heap, "_libc", lambda: None)
    seen: list[bool] = []
    monkeypatch.setattr(reconstruction, "heap_bounded", lambda: seen.append(heap.heap_bounded()) or seen[-1])
    trained = FIXTURES / "trained"
    options = {"structured": True, "sparsity": 0.3, "reconstruct": True,
               "calibration_data": str(trained / "digits_calib.npz")}
    default, plain = onnxprune.prune(trained / "digits_cnn.onnx", **options)
    assert seen == [False] and not plain.to_dict()["low_memory"]
    low, bounded = onnxprune.prune(trained / "digits_cnn.onnx", low_memory=True, **options)
    assert seen == [False, True] and bounded.to_dict()["low_memory"]
    assert not heap.heap_bounded()
    assert low.SerializeToString() == default.SerializeToString()