"""Tool cost of unstructured pruning: onnxprune vs a plain onnx load + save of the same model.

    python bench/bench_unstructured.py [--sizes 25m,110m,1.2b] [--repeat 3] [--json out.json] [--markdown]

Generates MLP stacks of MatMul + Add + Relu layers (random float32 weights) into bench/models/
(reused when present; the 1.2B one with its weights in an external data file, > 2 GB, written
tensor by tensor), then runs, each in a fresh child process and interleaved (A B A B ...):

- baseline: ``onnx.load`` + ``onnx.save_model`` of the same model (``save_as_external_data=True``
  for the external-data model);
- onnxprune: ``onnxprune MODEL --sparsity 0.7 --no-validate -o OUT --force``.

Peak memory is the child's own ``ru_maxrss`` (a one-child wrapper process reports it). Reports
medians of wall time and peak RSS, ratios, and checks the targets: 110M time <= 3x baseline and
peak RSS < 3x the model's size; 1.2B completes, its output has external data and loads in
onnxruntime. ``--markdown`` prints the docs/benchmarks.md section (command, date, machine, table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from benchlib import child_cost
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
#: name -> (hidden size, layers): params = layers * (hidden^2 + hidden)
SIZES = {"25m": (1024, 24), "110m": (2048, 26), "1.2b": (4096, 72)}
#: Models whose weights go into an external data file (> 2 GiB, protobuf's limit).
EXTERNAL = {"1.2b"}
DATA_NAME = "model.onnx.data"

def params_of(name: str) -> int:
    hidden, layers = SIZES[name]
    return layers * (hidden * hidden + hidden)


def _set_external(tensor: TensorProto, offset: int, length: int) -> None:
    for key, value in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def generate(name: str) -> Path:
    """Write the model unless present: weights one at a time, streamed to the data file when external.

    Peak memory while generating the external-data model is one weight matrix plus the (weight-less) graph.
    """
    hidden, layers = SIZES[name]
    folder = MODELS / name
    path = folder / "model.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    external = name in EXTERNAL
    rng = np.random.default_rng(0)
    scale = np.float32(1 / np.sqrt(hidden))
    inits, nodes, prev, offset = [], [], "input", 0
    with open(folder / DATA_NAME, "wb") if external else open(os.devnull, "wb") as data:
        for i in range(layers):
            weight = rng.standard_normal((hidden, hidden), dtype=np.float32) * scale
            tensor = TensorProto(name=f"layer{i}.weight", data_type=TensorProto.FLOAT, dims=[hidden, hidden])
            if external:
                raw = weight.tobytes()
                data.write(raw)
                _set_external(tensor, offset, len(raw))
                offset += len(raw)
            else:
                tensor.raw_data = weight.tobytes()
            del weight
            bias = onnx.numpy_helper.from_array(rng.standard_normal(hidden, dtype=np.float32) * 0.01, f"layer{i}.bias")
            inits += [tensor, bias]
            nodes += [
                helper.make_node("MatMul", [prev, tensor.name], [f"mm{i}"], name=f"layer{i}.matmul"),
                helper.make_node("Add", [f"mm{i}", bias.name], [f"add{i}"], name=f"layer{i}.add"),
                helper.make_node("Relu", [f"add{i}"], [f"relu{i}"], name=f"layer{i}.relu"),
            ]
            prev = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        f"mlp_{name}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", hidden])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    tmp = folder / "model.onnx.tmp"
    onnx.save_model(model, str(tmp))  # external tensors stay references: the proto holds no weights
    tmp.replace(path)  # written last, so an interrupted generation is never reused
    return path


def files_bytes(path: Path) -> int:
    """The model file plus the external data files it references."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``cmd`` run in a fresh process."""
    cost = child_cost(cmd)
    return cost.seconds, cost.peak_rss


def baseline_cmd(src: Path, dst: Path, external: bool) -> list[str]:
    code = f"import onnx\nm = onnx.load({str(src)!r})\n"
    if external:
        code += f"onnx.save_model(m, {str(dst)!r}, save_as_external_data=True, location={dst.name + '.data'!r})\n"
    else:
        code += f"onnx.save_model(m, {str(dst)!r})\n"
    return [sys.executable, "-c", code]


def onnxprune_cmd(src: Path, dst: Path) -> list[str]:
    exe = shutil.which("onnxprune") or str(Path(sys.executable).parent / "onnxprune")
    return [exe, str(src), "--sparsity", "0.7", "--no-validate", "-o", str(dst), "--force", "-q"]


def check_output(path: Path) -> dict:
    """Sparsity of the first weight, whether weights are external, and that onnxruntime loads and runs it."""
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    weight = next(t for t in model.graph.initializer if len(t.dims) == 2)
    external = weight.data_location == TensorProto.EXTERNAL
    if external:
        onnx.external_data_helper.load_external_data_for_tensor(weight, str(path.parent))
    sparsity = float(np.mean(onnx.numpy_helper.to_array(weight) == 0))
    del model, weight
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    (out,) = session.run(None, {inp.name: np.ones((1, inp.shape[1]), dtype=np.float32)})
    return {
        "output_external_data": external,
        "output_first_weight_sparsity": round(sparsity, 4),
        "output_loads_in_onnxruntime": bool(np.isfinite(out).all()),
    }


def bench(name: str, repeat: int, warmup: int) -> dict:
    src = generate(name)
    external = name in EXTERNAL
    out = MODELS / f"{name}-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    base, tool = [], []
    for i in range(warmup + repeat):
        for f in out.iterdir():
            f.unlink()
        b = timed(baseline_cmd(src, out / "base.onnx", external))
        for f in out.glob("base.onnx*"):
            f.unlink()  # keep disk use at two copies of the model
        t = timed(onnxprune_cmd(src, out / "pruned.onnx"))
        if i >= warmup:
            base.append(b)
            tool.append(t)
        print(
            f"  {name} run {i + 1 - warmup}{' (warm-up)' if i < warmup else ''}: baseline {b[0]:.2f}s "
            f"{b[1] / 2**20:.0f} MiB, onnxprune {t[0]:.2f}s {t[1] / 2**20:.0f} MiB",
            file=sys.stderr,
        )
    size = files_bytes(src)
    result = {
        "model": name,
        "params": params_of(name),
        "bytes": size,
        "external_data": external,
        "runs": repeat,
        "baseline_s": statistics.median(t for t, _ in base),
        "onnxprune_s": statistics.median(t for t, _ in tool),
        "baseline_rss": statistics.median(r for _, r in base),
        "onnxprune_rss": statistics.median(r for _, r in tool),
        "baseline_all": base,
        "onnxprune_all": tool,
    }
    result["time_ratio"] = result["onnxprune_s"] / result["baseline_s"]
    result["rss_ratio"] = result["onnxprune_rss"] / result["baseline_rss"]
    result["rss_over_model"] = result["onnxprune_rss"] / size
    result.update(check_output(out / "pruned.onnx"))
    shutil.rmtree(out)
    return result


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["model"] == "110m":
            ok_t, ok_m = r["time_ratio"] <= 3, r["rss_over_model"] < 3
            lines.append(
                f"110m time: onnxprune {r['time_ratio']:.2f}x plain load+save (target <= 3x): "
                f"{'PASS' if ok_t else 'FAIL'}"
            )
            lines.append(
                f"110m memory: peak RSS {r['rss_over_model']:.2f}x model size (target < 3x): "
                f"{'PASS' if ok_m else 'FAIL'}"
            )
        if r["model"] == "1.2b":
            ok = r["output_external_data"] and r["output_loads_in_onnxruntime"]
            lines.append(
                f"1.2b: completed in {r['onnxprune_s']:.0f} s; output with external data: "
                f"{r['output_external_data']}, loads and runs in onnxruntime: "
                f"{r['output_loads_in_onnxruntime']}: {'PASS' if ok else 'FAIL'}"
            )
    return lines


def table(rows: list[dict]) -> str:
    lines = [
        (
            "| model | params | size | plain load+save | onnxprune | time ratio | plain peak RSS | onnxprune peak RSS "
            "| onnxprune RSS / model size |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']}{' (external data)' if r['external_data'] else ''} | {r['params'] / 1e6:.0f}M "
            f"| {r['bytes'] / 2**20:.0f} MiB | {r['baseline_s']:.2f} s | {r['onnxprune_s']:.2f} s "
            f"| {r['time_ratio']:.2f}x | {r['baseline_rss'] / 2**20:.0f} MiB "
            f"| {r['onnxprune_rss'] / 2**20:.0f} MiB | {r['rss_over_model']:.2f} |"
        )
    return "\n".join(lines)


def section(rows: list[dict], command: str) -> str:
    import onnxruntime as ort

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    runs = ", ".join(f"{r['model']}: {r['runs']}" for r in rows)
    return "\n".join(
        [
            "## Unstructured pruning: tool cost",
            "",
            (
                f"Command ({datetime.date.today().isoformat()}; {os.cpu_count()} cores, {mem:.0f} GB RAM, no GPU, "
                f"Python {platform.python_version()}, onnx {onnx.__version__}, onnxruntime {ort.__version__}):"
            ),
            "",
            f"    {command}",
            "",
            (
                "Generated MLP stacks of MatMul + Add + Relu layers (float32, random weights; the 1.2B one with its "
                "weights in an external data file). Each command runs in a fresh child process; baseline and onnxprune "
                f"interleaved (A B A B) after one warm-up pair (none for 1.2B); medians of the runs ({runs}). "
                "Peak RSS is the child's own `ru_maxrss`. Baseline = `onnx.load` + `onnx.save_model` of the same model "
                "(`save_as_external_data=True` for 1.2B); onnxprune = `onnxprune MODEL --sparsity 0.7 --no-validate "
                "-o OUT --force`."
            ),
            "",
            table(rows),
            "",
            *[f"- {line}" for line in targets(rows)],
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="25m,110m,1.2b", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per command (the 1.2B model runs once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (none for 1.2B)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print the docs/benchmarks.md section")
    parser.add_argument("--keep-models", action="store_true", help="keep the generated 1.2B model for the next run")
    args = parser.parse_args()
    names = args.sizes.split(",")
    if unknown := [n for n in names if n not in SIZES]:
        parser.error(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    command = "python bench/bench_unstructured.py " + " ".join(sys.argv[1:])
    rows = []
    for name in names:
        start = time.perf_counter()
        big = name in EXTERNAL
        rows.append(bench(name, 1 if big else args.repeat, 0 if big else args.warmup))
        print(f"{name}: done in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        if big and not args.keep_models:
            shutil.rmtree(MODELS / name)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(section(rows, command.strip()) if args.markdown else "\n".join([table(rows), "", *targets(rows)]))


if __name__ == "__main__":
    main()
