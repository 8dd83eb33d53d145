"""One corpus row: run ``onnxprune`` on a real model in one mode, then check and measure its output.

Checks (each failure is a line in ``Row.failures``): exit 0, the full ONNX check, onnxruntime runs at the
model's two input sizes with the original's output shapes, output names and declared shapes kept,
``metadata_props`` kept byte for byte, MACs removed in structured modes. Measures: zeros of the float
weights, MACs kept, fidelity (worst output cosine and relative L2 on realistic check data), the task
metric dense -> pruned, and the tool's wall time.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .fidelity import fidelity
from .models import CorpusModel, Feeds

CHECK_SEED, CALIB_SEED, ALT_SEED = 1, 2, 3  # check and calibration data never share a seed
MODES: dict[str, tuple[str, ...]] = {
    "sparsity 0.5": ("--sparsity", "0.5"),
    "sparsity 0.7": ("--sparsity", "0.7"),
    "2:4": ("--pattern", "2:4"),
    "structured 0.3": ("--structured", "--sparsity", "0.3"),
    "structured 0.5": ("--structured", "--sparsity", "0.5"),
    "structured 0.3 + reconstruct": ("--structured", "--sparsity", "0.3", "--reconstruct"),
}
FAST = ("--runs", "1", "--warmup", "0", "-q")
BARE = "sparsity 0.5, no --data"  # onnxprune MODEL --sparsity 0.5 with no input options, as a new user runs it
ROW_ORDER = (*MODES, BARE)


@dataclass
class Row:
    """What one model x mode run gave."""

    model: str
    mode: str
    rc: int
    message: str
    seconds: float
    failures: list[str] = field(default_factory=list)
    zeros: float | None = None
    macs_kept: float | None = None
    cosine: float | None = None
    rel_l2: float | None = None
    metric_dense: float | None = None
    metric_pruned: float | None = None
    stages: dict[str, float] = field(default_factory=dict)  # the tool's own wall seconds per stage (its report)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.failures


def expectations(row: Row) -> list[str]:
    """What the corpus asserts of a row beyond its output checks: exit 0, fidelity measured, MACs removed in
    structured modes, the requested share of zeros in unstructured ones (2:4: at least 10 %, tensors whose input
    axis is not a multiple of 4 are skipped as documented; bare rows: exit 0 and validated). Empty when it passes."""
    if row.rc != 0:
        return [f"exit {row.rc}: {row.message}"]
    problems = list(row.failures)
    if row.cosine is None or not math.isfinite(row.cosine):
        problems.append("fidelity was not measured")
    flags = MODES.get(row.mode, ())
    if "--structured" in flags:
        if row.macs_kept is not None and row.macs_kept >= 1.0:
            problems.append(f"MACs kept {row.macs_kept}")
    elif row.mode == "2:4":
        if row.zeros is None or row.zeros < 0.1:
            problems.append(f"zeros {row.zeros} of the float weights")
    elif row.mode != BARE and (row.zeros is None or row.zeros < 0.9 * float(flags[1])):
        problems.append(f"zeros {row.zeros} of the float weights")
    return problems


def save_npz(path: Path, feeds: Feeds) -> Path:
    np.savez(path, **feeds)
    return path


def make_data(model: CorpusModel, folder: Path, count: int | None = None) -> dict[str, Path]:
    """Check data (seed 1) and calibration data (seed 2, disjoint) for ``model`` as .npz files in ``folder``.

    The tool's ``--data`` is one batch: a model that only takes batch 1 gets the first check sample there
    (the harness itself compares all of them).
    """
    count = count or model.count
    check, _ = model.make(np.random.default_rng(CHECK_SEED), count, 0)
    if model.fixed_batch:
        check = {k: v[:1] for k, v in check.items()}
    calib, _ = model.make(np.random.default_rng(CALIB_SEED), count, 0)
    return {"check": save_npz(folder / f"{model.name}.check.npz", check),
            "calib": save_npz(folder / f"{model.name}.calib.npz", calib)}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_model(model: CorpusModel, sess: ort.InferenceSession, feeds: Feeds) -> list[np.ndarray]:
    """Outputs for every sample in ``feeds`` (one at a time where the model takes batch 1 only)."""
    if not model.fixed_batch:
        return sess.run(None, feeds)
    count = len(next(iter(feeds.values())))
    runs = [sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(count)]
    return [np.concatenate([r[j] for r in runs], axis=model.out_axis) for j in range(len(runs[0]))]


def float_weight_zeros(graph: onnx.GraphProto) -> tuple[int, int]:
    """(zeros, elements) of the float weights of rank >= 2 in ``graph`` and its subgraphs."""
    tensors = list(graph.initializer)
    zeros = total = 0
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                z, t = float_weight_zeros(sub)
                zeros, total = zeros + z, total + t
    for tensor in tensors:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(tensor.dims) >= 2:
            arr = numpy_helper.to_array(tensor)
            zeros, total = zeros + int(np.count_nonzero(arr == 0)), total + arr.size
    return zeros, total


def _declared(model: onnx.ModelProto) -> list[tuple[str, list]]:
    return [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in model.graph.output]


def invoke(model_path: Path, args: list[str], timeout: int = 1800) -> tuple[int, str, float]:
    """Run ``python -m onnxprune`` and return (exit code, last stderr line, wall seconds); a run past ``timeout``
    seconds is stopped and reported as exit 124."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "onnxprune", str(model_path), *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return 124, f"did not finish within {timeout} s (stopped)", time.perf_counter() - start
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return proc.returncode, (lines[-1] if lines else ""), time.perf_counter() - start


def tool_args(mode: str, out: Path, report: Path, data: dict[str, Path] | None, validate: bool = True) -> list[str]:
    """The command line of one row: the mode, output and report paths, realistic data when given; without
    ``validate`` the tool skips its own onnxruntime comparison (the harness checks the output itself)."""
    args = [*MODES[mode], "-o", str(out), "--report", str(report), *(FAST if validate else ("--no-validate", "-q"))]
    if data:
        args += ["--data", str(data["check"])]
        if "--reconstruct" in MODES[mode]:
            args += ["--calibration-data", str(data["calib"])]
    return args


def run_row(model: CorpusModel, mode: str, folder: Path, data: dict[str, Path] | None, label: str = "",
            validate: bool = True, count: int | None = None, timeout: int = 1800) -> Row:
    """Prune ``model`` in ``mode`` into ``folder`` and check the result on ``count`` samples (default the
    model's); ``label`` names the row (default the mode)."""
    src, label = model.locate(), label or mode
    stem = f"{folder / model.name}.{label.replace(' ', '_').replace(':', '-').replace(',', '')}"
    out, report = Path(stem + ".onnx"), Path(stem + ".json")
    rc, message, seconds = invoke(src, tool_args(mode, out, report, data, validate), timeout)
    row = Row(model.name, label, rc, message, seconds)
    if rc != 0:
        return row
    check_output(model, src, out, row, count or model.count)
    details = json.loads(report.read_text())
    row.stages = stage_seconds(details)
    macs = (details.get("validation") or {}).get("model") or {}  # absent with --no-validate
    if macs.get("original", {}).get("macs"):
        row.macs_kept = macs["pruned"]["macs"] / macs["original"]["macs"]
    if "--structured" in MODES[mode] and not details["summary"].get("macs_removed"):
        row.failures.append("structured mode removed no MACs")
    return row


def stage_seconds(report: dict) -> dict[str, float]:
    """Wall seconds per stage from a report: load, prune, check_and_save, validate, and within the structured
    pass its own stages (analysis, gram, selection, refit_gram, refit_solve, removal, ...) as ``prune.<stage>``."""
    stages = {k: round(float(v), 1) for k, v in report.get("timings", {}).items()}
    for item in report.get("passes", []):
        for name, times in (item.get("details") or {}).get("stages", {}).items():
            stages[f"prune.{name}"] = round(stages.get(f"prune.{name}", 0.0) + times["wall_s"], 1)
    return stages


def check_output(model: CorpusModel, src: Path, out: Path, row: Row, count: int) -> None:
    """The output checks and measures of one row (failures are appended to ``row.failures``)."""
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except onnx.checker.ValidationError as exc:
        row.failures.append(f"ONNX check: {str(exc).splitlines()[0]}")
    original, pruned = onnx.load(str(src)), onnx.load(str(out))
    if _declared(original) != _declared(pruned):
        row.failures.append(f"outputs changed: {_declared(original)} -> {_declared(pruned)}")
    if list(original.metadata_props) != list(pruned.metadata_props):
        row.failures.append("metadata_props changed")
    zeros, total = float_weight_zeros(pruned.graph)
    row.zeros = zeros / total if total else 0.0
    dense_sess, pruned_sess = session(src), session(out)
    sizes = ((0, CHECK_SEED),) if model.sizes[0] == model.sizes[1] else ((0, CHECK_SEED), (1, ALT_SEED))
    for size, seed in sizes:  # a model with fixed input dims accepts one size only
        feeds, labels = model.make(np.random.default_rng(seed), count if size == 0 else 3, size)
        dense = run_model(model, dense_sess, feeds)
        try:
            got = run_model(model, pruned_sess, feeds)
        except Exception as exc:  # noqa: BLE001 - any runtime failure of the pruned model is a finding
            row.failures.append(f"onnxruntime at size {model.sizes[size]}: {str(exc).splitlines()[0][:200]}")
            continue
        if [d.shape for d in dense] != [g.shape for g in got]:
            row.failures.append(f"output shapes at size {model.sizes[size]}: {[d.shape for d in dense]} -> "
                                f"{[g.shape for g in got]}")
            continue
        if size == 0:
            row.cosine, row.rel_l2 = fidelity(dense, got)
            if model.metric:
                row.metric_dense, row.metric_pruned = model.metric(dense, labels), model.metric(got, labels)
