"""Tool cost of unstructured pruning: onnxprune vs a plain onnx load + save of the same model.

    python bench/bench_unstructured.py [--sizes 25m,110m,1.2b] [--repeat 3] [--json out.json]

Generates MLP stacks of MatMul layers (random float32 weights) into bench/models/ (the 1.2B
one with external data, > 2 GB), then runs, each in a fresh child process and interleaved
(A B A B ...): the baseline ``onnx.load`` + ``onnx.save`` and
``onnxprune MODEL --sparsity 0.7 --no-validate``. Reports medians of wall time and peak RSS,
their ratios, and checks the targets (110M: time <= 3x baseline, peak RSS < 3x model size;
1.2B completes and its output loads in onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
#: name -> (hidden size, layers): params = layers * hidden^2
SIZES = {"25m": (1024, 24), "110m": (2048, 26), "1.2b": (4096, 72)}


def generate(name: str) -> Path:
    """Write the model (tensor by tensor; external data for the 1.2B one) unless it exists."""
    hidden, layers = SIZES[name]
    folder = MODELS / name
    path = folder / "model.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    external = hidden * hidden * layers * 4 > 2**31
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "input"
    data = open(folder / "model.onnx.data", "wb") if external else None  # noqa: SIM115 - closed below
    offset = 0
    for i in range(layers):
        values = rng.standard_normal((hidden, hidden), dtype=np.float32) / np.float32(np.sqrt(hidden))
        tensor = TensorProto(name=f"layer{i}.weight", data_type=TensorProto.FLOAT, dims=[hidden, hidden])
        if data is not None:
            raw = values.tobytes()
            data.write(raw)
            for key, value in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
            offset += len(raw)
        else:
            tensor.raw_data = values.tobytes()
        inits.append(tensor)
        nodes.append(helper.make_node("MatMul", [prev, tensor.name], [f"h{i}"], name=f"layer{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    if data is not None:
        data.close()
    graph = helper.make_graph(nodes, f"mlp_{name}", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", hidden])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save_model(model, str(path))
    return path


def model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith("model.onnx"))


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:]); t = time.perf_counter() - t; "
               "print(t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    seconds, rss = proc.stdout.split()[-2:]
    return float(seconds), int(rss)


def baseline_cmd(src: Path, dst: Path, external: bool) -> list[str]:
    code = (f"import onnx; m = onnx.load({str(src)!r}); "
            f"onnx.save_model(m, {str(dst)!r}, save_as_external_data={external}, location='base.onnx.data')")
    return [sys.executable, "-c", code]


def onnxprune_cmd(src: Path, dst: Path) -> list[str]:
    return [sys.executable, "-m", "onnxprune", str(src), "--sparsity", "0.7", "--no-validate", "-o", str(dst),
            "--force", "-q"]


def bench(name: str, repeat: int) -> dict:
    src = generate(name)
    hidden, layers = SIZES[name]
    external = (src.parent / "model.onnx.data").exists()
    out = MODELS / f"{name}-out"
    out.mkdir(exist_ok=True)
    base, tool = [], []
    for _ in range(repeat):
        for f in out.iterdir():
            f.unlink()
        base.append(timed(baseline_cmd(src, out / "base.onnx", external)))
        tool.append(timed(onnxprune_cmd(src, out / "pruned.onnx")))
    result = {
        "model": name, "params": hidden * hidden * layers, "bytes": model_bytes(src), "external_data": external,
        "runs": repeat,
        "baseline_s": statistics.median(t for t, _ in base), "onnxprune_s": statistics.median(t for t, _ in tool),
        "baseline_rss": statistics.median(r for _, r in base), "onnxprune_rss": statistics.median(r for _, r in tool),
    }
    result["time_ratio"] = result["onnxprune_s"] / result["baseline_s"]
    result["rss_over_model"] = result["onnxprune_rss"] / result["bytes"]
    if external:
        import onnxruntime as ort

        ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
        result["output_loads_in_onnxruntime"] = True
        result["output_external_data"] = (out / "pruned.onnx.data").exists()
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    return result


def markdown(rows: list[dict]) -> str:
    lines = [("| model | params | size | plain load+save | onnxprune | time ratio | plain peak RSS | onnxprune peak RSS "
             "| onnxprune RSS / model size |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']}{' (external data)' if r['external_data'] else ''} | {r['params'] / 1e6:.0f}M "
                     f"| {r['bytes'] / 2**20:.0f} MiB | {r['baseline_s']:.2f} s | {r['onnxprune_s']:.2f} s "
                     f"| {r['time_ratio']:.2f}x | {r['baseline_rss'] / 2**20:.0f} MiB | {r['onnxprune_rss'] / 2**20:.0f} MiB "
                     f"| {r['rss_over_model']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="25m,110m,1.2b")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (the 1.2B model runs once)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-models", action="store_true", help="keep bench/models/ for the next run")
    args = parser.parse_args()
    rows = []
    for name in args.sizes.split(","):
        start = time.perf_counter()
        rows.append(bench(name, 1 if name == "1.2b" else args.repeat))
        print(f"{name}: done in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        if not args.keep_models and name == "1.2b":
            for f in (MODELS / name).iterdir():
                f.unlink()
    print(markdown(rows))
    for r in rows:
        if r["model"] == "110m":
            print(f"110m: time ratio {r['time_ratio']:.2f} (target <= 3): {'PASS' if r['time_ratio'] <= 3 else 'FAIL'}; "
                  f"peak RSS / size {r['rss_over_model']:.2f} (target < 3): {'PASS' if r['rss_over_model'] < 3 else 'FAIL'}")
        if r["model"] == "1.2b":
            print(f"1.2b: completed, output with external data: {r.get('output_external_data')}, "
                  f"loads in onnxruntime: {r.get('output_loads_in_onnxruntime')}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
