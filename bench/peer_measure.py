"""Measuring helpers for bench/bench_peer.py: run a pruning tool in a child process, then judge its output.

Every pruned model, whichever tool wrote it, goes through the same checks: the full ONNX check, an
onnxruntime load and run on held-out inputs, input/output names and declared shapes kept, run-time output
shapes kept. Then the same measures: MACs (onnxprune's cost model on both files alike), parameters, zeros,
fidelity (worst output cosine and relative L2 against the original) and the case's task metric.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxprune.analysis.cost import total_macs
from tests.corpus.fidelity import fidelity  # the corpus harness judges by the same figures

Feeds = dict[str, np.ndarray]
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


@dataclass
class Case:
    """One model with its data: calibration batches, held-out check batches and an optional task metric."""

    name: str
    source: Path
    calibration: list[Feeds]
    check: list[Feeds]
    labels: object = None
    metric: Callable[[list[np.ndarray], object], float] | None = None
    metric_name: str = ""
    out_axis: int = 0  # batch axis of the outputs, to join the outputs of several check batches


@dataclass
class Outcome:
    """What one tool x method run on one case gave."""

    model: str
    method: str
    tool: str
    status: str  # "ok", "invalid" (ran, but the model fails a check) or "failed" (no model written)
    message: str = ""
    seconds: float | None = None  # the tool's own time: load, prune, save (imports excluded)
    wall: float = 0.0  # wall time of the child process
    failures: list[str] = field(default_factory=list)
    macs_kept: float | None = None
    size_kept: float | None = None  # file size, pruned / original
    params_kept: float | None = None
    zeros: float | None = None
    cosine: float | None = None
    rel_l2: float | None = None
    metric_dense: float | None = None
    metric_pruned: float | None = None


def run_child(command: list[str], timeout: float) -> tuple[int, str, float]:
    """Run ``command``; (exit code, last stderr line, wall seconds). A run past ``timeout`` is stopped: exit 124."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return 124, f"did not finish within {timeout:.0f} s (stopped)", time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else ""), time.perf_counter() - start


def onnxprune_command(source: Path, output: Path, args: list[str], calibration: Path | None) -> list[str]:
    """The ``python -m onnxprune`` command line of one run (validation is done by the bench, not the tool); its
    JSON report goes beside ``output`` (see ``report_path``)."""
    extra = ["--calibration-data", str(calibration)] if calibration else []
    return [sys.executable, "-m", "onnxprune", str(source), *args, *extra, "-o", str(output), "--force",
            "--no-validate", "-q", "--report", str(report_path(output))]


def report_path(output: Path) -> Path:
    return output.with_suffix(".report.json")


def onnxprune_seconds(output: Path) -> float | None:
    """The tool's own time (load, prune, check and save; interpreter start and imports excluded) from its report."""
    try:
        return float(sum(json.loads(report_path(output).read_text())["timings"].values()))
    except (OSError, KeyError, ValueError):
        return None


def session(path: Path) -> ort.InferenceSession:
    """A single-threaded CPU session, quiet."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_batches(sess: ort.InferenceSession, batches: list[Feeds], out_axis: int = 0) -> list[np.ndarray]:
    """Outputs over all ``batches``, joined along ``out_axis``."""
    runs = [sess.run(None, feeds) for feeds in batches]
    return [np.concatenate([r[j] for r in runs], axis=out_axis) for j in range(len(runs[0]))]


def interface(model: onnx.ModelProto) -> list[tuple[str, str, list]]:
    """Names and declared shapes of the graph inputs (initializers excluded) and outputs."""
    inits = {t.name for t in model.graph.initializer}

    def dims(value: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return ([("input", v.name, dims(v)) for v in model.graph.input if v.name not in inits]
            + [("output", v.name, dims(v)) for v in model.graph.output])


def checker_failure(path: Path) -> str | None:
    """The first line of the full ONNX check's complaint about the model at ``path``, or None when it passes."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker raises ValidationError and shape-inference errors alike
        return f"ONNX check: {str(exc).strip().splitlines()[0][:200]}"
    return None


def _tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers and Constant/attribute tensors of ``graph`` and its subgraphs."""
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                found.append(attr.t)
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                found += _tensors(sub)
    return found


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs reads."""
    names = {name for node in graph.node for name in node.input}
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= _read_names(sub)
    return names


def weight_counts(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(float parameters, elements of float weights of rank >= 2, zeros among those weights), counting the
    tensors the graph reads: an initializer left behind unread is file size, not a parameter."""
    params = elements = zeros = 0
    read = _read_names(model.graph) | {o.name for o in model.graph.output}
    for tensor in _tensors(model.graph):
        if tensor.data_type not in FLOATS or (tensor.name and tensor.name not in read):
            continue
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        params += size
        if len(tensor.dims) >= 2:
            elements += size
            zeros += int(np.count_nonzero(numpy_helper.to_array(tensor) == 0))
    return params, elements, zeros


def input_shapes(batches: list[Feeds]) -> dict[str, list[int]]:
    """The shapes of the first check batch: what MACs are counted at."""
    return {name: list(value.shape) for name, value in batches[0].items()}


def judge(case: Case, pruned_path: Path, outcome: Outcome) -> Outcome:
    """Check the model at ``pruned_path`` against ``case.source`` and fill in ``outcome``'s measures."""
    original, pruned = onnx.load(str(case.source)), onnx.load(str(pruned_path))
    failures = [f for f in [checker_failure(pruned_path)] if f]
    if interface(original) != interface(pruned):
        failures.append("interface changed: " + str([x for x in interface(pruned) if x not in interface(original)]))
    p0, _e0, _ = weight_counts(original)
    p1, e1, z1 = weight_counts(pruned)
    outcome.params_kept, outcome.zeros = p1 / max(p0, 1), z1 / max(e1, 1)
    outcome.size_kept = pruned.ByteSize() / max(original.ByteSize(), 1)
    try:
        shapes = input_shapes(case.check)
        outcome.macs_kept = total_macs(pruned, shapes) / max(total_macs(original, shapes), 1)
    except Exception as exc:  # noqa: BLE001 - a model the cost model cannot read is reported, not fatal
        failures.append(f"MACs not countable: {str(exc).splitlines()[0][:120]}")
    dense = run_batches(session(case.source), case.check, case.out_axis)
    try:
        got = run_batches(session(pruned_path), case.check, case.out_axis)
    except Exception as exc:  # noqa: BLE001 - any load or run failure of the pruned model is a finding
        failures.append(f"onnxruntime: {str(exc).strip().splitlines()[0][:200]}")
        got = None
    if got is not None and [d.shape for d in dense] != [g.shape for g in got]:
        failures.append(f"output shapes {[d.shape for d in dense]} -> {[g.shape for g in got]}")
    elif got is not None:
        outcome.cosine, outcome.rel_l2 = fidelity(dense, got)
        if case.metric:
            outcome.metric_dense, outcome.metric_pruned = case.metric(dense, case.labels), case.metric(got, case.labels)
    outcome.failures = failures
    outcome.status = "invalid" if failures else "ok"
    return outcome
