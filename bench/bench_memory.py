"""Peak memory of onnxprune with and without validation, against the model's size and a plain load + save.

    python bench/bench_memory.py [--sizes 50m,110m] [--repeat 1] [--json out.json] [--markdown]

Generates stacks of MatMul + Add and Gemm layers (random float32 weights, ~50M and ~110M parameters)
into bench/models/ (reused when present), then runs, each in a fresh child process:

- baseline: ``onnx.load`` + ``onnx.save_model`` of the same model;
- ``onnxprune MODEL --sparsity 0.5 --no-validate``;
- ``onnxprune MODEL --sparsity 0.5`` (validation: fidelity and interleaved latency, 5 runs);
- ``onnxprune MODEL --structured --sparsity 0.5``, without and with validation.

Peak memory is the child's own ``ru_maxrss`` (a one-child wrapper reports ``RUSAGE_CHILDREN``). Reports peak
RSS / model file size, and the same above the tool's fixed cost (each mode run first on a 16-wide model: the
libraries, onnxruntime's threads and arenas); the target is <= 3x with validation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from benchlib import child_cost
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models" / "memory"
#: name -> (hidden size, MatMul+Add blocks, Gemm blocks): params ~ (blocks) * hidden^2
SIZES = {"tiny": (16, 1, 1), "50m": (1600, 10, 10), "110m": (2048, 13, 13)}
MODES = {
    "load+save": None,
    "prune, no validation": ["--sparsity", "0.5", "--no-validate"],
    "prune + validation": ["--sparsity", "0.5", "--runs", "5", "--warmup", "1"],
    "structured, no validation": ["--structured", "--sparsity", "0.5", "--no-validate"],
    "structured + validation": ["--structured", "--sparsity", "0.5", "--runs", "5", "--warmup", "1"],
}


def build_model(hidden: int, matmuls: int, gemms: int, seed: int = 0) -> onnx.ModelProto:
    """A stack of ``matmuls`` MatMul + Add + Relu blocks, then ``gemms`` Gemm + Relu blocks ([N, hidden] -> [N, 10])."""
    rng = np.random.default_rng(seed)
    scale = np.float32(1 / np.sqrt(hidden))
    inits, nodes, prev = [], [], "input"
    for i in range(matmuls + gemms):
        weight = onnx.numpy_helper.from_array(rng.standard_normal((hidden, hidden), dtype=np.float32) * scale, f"w{i}")
        bias = onnx.numpy_helper.from_array(rng.standard_normal(hidden, dtype=np.float32) * 0.01, f"b{i}")
        inits += [weight, bias]
        if i < matmuls:
            nodes += [helper.make_node("MatMul", [prev, weight.name], [f"mm{i}"], name=f"matmul{i}"),
                      helper.make_node("Add", [f"mm{i}", bias.name], [f"pre{i}"], name=f"add{i}")]
        else:
            nodes.append(helper.make_node("Gemm", [prev, weight.name, bias.name], [f"pre{i}"], name=f"gemm{i}"))
        nodes.append(helper.make_node("Relu", [f"pre{i}"], [f"h{i}"], name=f"relu{i}"))
        prev = f"h{i}"
    head = onnx.numpy_helper.from_array(rng.standard_normal((hidden, 10), dtype=np.float32) * scale, "head")
    inits.append(head)
    nodes.append(helper.make_node("MatMul", [prev, "head"], ["logits"], name="head"))
    graph = helper.make_graph(nodes, "memory_bench",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, hidden])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def generate(name: str) -> Path:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        MODELS.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save_model(build_model(*SIZES[name]), str(tmp))
        tmp.replace(path)
    return path


def measure(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``argv`` run as a fresh child process."""
    cost = child_cost(argv)
    return cost.seconds, cost.peak_rss


def command(mode: str, model: Path, out: Path) -> list[str]:
    if MODES[mode] is None:
        code = "import onnx, sys; onnx.save_model(onnx.load(sys.argv[1]), sys.argv[2])"
        return [sys.executable, "-c", code, str(model), str(out)]
    return [sys.executable, "-m", "onnxprune", str(model), *MODES[mode], "-o", str(out), "--force", "-q"]


def run(sizes: list[str], repeat: int) -> list[dict]:
    """Every mode on every size, after the same modes on a 16-wide model: the tool's fixed cost (libraries,
    onnxruntime's threads and arenas), subtracted in the "net" ratio."""
    rows, fixed = [], {}
    for name in ["tiny", *sizes]:
        model = generate(name)
        size = model.stat().st_size
        params = sum(int(np.prod(t.dims)) for t in onnx.load(str(model), load_external_data=False).graph.initializer)
        out = MODELS / f"{name}.out.onnx"
        for mode in MODES:
            samples = [measure(command(mode, model, out)) for _ in range(repeat)]
            seconds = statistics.median(s for s, _ in samples)
            rss = statistics.median(r for _, r in samples)
            if name == "tiny":
                fixed[mode] = rss
                continue
            rows.append({"model": name, "params": params, "bytes": size, "mode": mode, "seconds": seconds,
                         "peak_rss": rss, "fixed_rss": fixed[mode], "ratio": rss / size,
                         "net_ratio": (rss - fixed[mode]) / size})
            print(f"{name:5} {mode:24} {seconds:7.2f} s  peak {rss / 2**20:7.0f} MiB  {rss / size:.2f}x model, "
                  f"{(rss - fixed[mode]) / size:.2f}x above the fixed {fixed[mode] / 2**20:.0f} MiB", file=sys.stderr)
        out.unlink(missing_ok=True)
    return rows


def markdown(rows: list[dict], argv: list[str]) -> str:
    lines = [(f"Command ({datetime.date.today()}; Python {platform.python_version()}, onnx {onnx.__version__}, "
              f"onnxruntime {onnxruntime.__version__}):"), "", "    python bench/bench_memory.py " + " ".join(argv), "",
             ("| model | params | file size | run | wall time | peak RSS | peak RSS / file size | fixed cost (same run, "
              "16-wide model) | (peak − fixed) / file size |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['bytes'] / 2**20:.0f} MiB | {r['mode']} | "
                     f"{r['seconds']:.2f} s | {r['peak_rss'] / 2**20:.0f} MiB | {r['ratio']:.2f}x | "
                     f"{r['fixed_rss'] / 2**20:.0f} MiB | {r['net_ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50m,110m")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = run(args.sizes.split(","), args.repeat)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        print(markdown(rows, sys.argv[1:]))
    # validation's own target: <= 3x above the fixed cost, or no higher than the same pruning without validation
    peaks = {(r["model"], r["mode"]): r for r in rows}
    for r in rows:
        if "+ validation" not in r["mode"]:
            continue
        alone = peaks.get((r["model"], r["mode"].replace(" + validation", ", no validation")))
        ok = r["net_ratio"] <= 3 or (alone is not None and r["peak_rss"] <= alone["peak_rss"] * 1.02)
        print(f"{r['model']} {r['mode']}: {r['net_ratio']:.2f}x above the fixed cost"
              + (f", pruning alone {alone['net_ratio']:.2f}x" if alone else "")
              + f" (validation target: <= 3x or no higher than pruning alone): {'PASS' if ok else 'FAIL'}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
