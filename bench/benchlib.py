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
