"""Structured pruning of exported transformers at --sparsity 0.5 --head-sparsity 0.25, on onnxruntime CPU.

    pip install -e ".[bench]"
    python bench/bench_transformers.py [--models bert-base,llama-decoder] [--scale] [--runs 30]
                                       [--threads 1,2] [--seq 128] [--json out.json]

For each model (Hugging Face model code, random weights, exported by torch.onnx's TorchScript
exporter with fixtures/export_transformers.py into the git-ignored bench/models/transformers/):
- onnxprune ``--structured --sparsity 0.5 --head-sparsity 0.25 --no-validate`` in a child process:
  wall time and peak RSS, next to a plain ``onnx.load`` + ``onnx.save`` of the same model (the tool's
  cost baseline); heads and neurons before/after from its JSON report;
- original and pruned timed in one process, interleaved A B A B after a warm-up, fixed intra-op
  threads, spinning off, batch 1 and ``--seq`` tokens: medians and p90; MACs counted by onnxprune's
  cost model on both files alike; speedup / MAC ratio says how much of the possible gain was realised.
``--scale`` adds a LLaMA-style decoder of ~1.1B parameters (external data) and reports the tool's
wall time and peak memory only (no latency).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "models" / "transformers"
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(HERE))

from bench_structured import versions
from benchlib import child_cost, latencies

from onnxprune.analysis.cost import total_macs
from onnxprune.graph import count_params

MODELS = {
    # name: (architecture in export_transformers, size)
    "bert-base": ("bert", {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 12, "inter": 3072, "vocab": 30522}),
    "llama-decoder": ("llama", {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "inter": 2816,
                                "vocab": 32000}),
    "llama-1b": ("llama", {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "inter": 5632,
                           "vocab": 32000}),  # TinyLlama-1.1B's shape
}
PRUNE = ["--structured", "--sparsity", "0.5", "--head-sparsity", "0.25"]


def exported(name: str) -> Path:
    """The model's ONNX file, exported once (reused when present)."""
    from export_transformers import export

    arch, size = MODELS[name]
    target = OUT / name / f"{arch}_ts.onnx"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        export(arch, size, target.parent, "ts")
        print(f"{name}: exported in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return target


def has_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def tool_cost(src: Path, external: bool) -> dict:
    """onnxprune's wall time and peak RSS, and those of a plain load + save of the same model."""
    dst = src.with_name(src.stem + ".pruned.onnx")
    report = dst.with_suffix(".json")
    tool = child_cost([sys.executable, "-m", "onnxprune", str(src), *PRUNE, "--no-validate", "-o", str(dst),
                       "--force", "-q", "--report", str(report)])
    copy = src.with_name(src.stem + ".copy.onnx")
    code = f"import onnx\nm = onnx.load({str(src)!r})\n"
    code += (f"onnx.save_model(m, {str(copy)!r}, save_as_external_data=True, location={copy.name + '.data'!r})\n"
             if external else f"onnx.save_model(m, {str(copy)!r})\n")
    base = child_cost([sys.executable, "-c", code])
    for leftover in (copy, copy.with_name(copy.name + ".data")):
        leftover.unlink(missing_ok=True)
    details = json.loads(report.read_text())["passes"][0]["details"]
    heads = [(g["channels_before"], g["channels_after"]) for g in details["groups"] if "Softmax" in g["ops"]]
    neurons = [(g["channels_before"], g["channels_after"]) for g in details["groups"] if "Softmax" not in g["ops"]]
    return {"pruned": dst, "seconds": tool.seconds, "peak_rss": tool.peak_rss, "baseline_seconds": base.seconds,
            "baseline_rss": base.peak_rss, "heads": heads, "neurons": neurons,
            "frozen": sorted({f["reason"].split(" (")[0][:90] for f in details["frozen"]})[:3]}


def bench(name: str, runs: int, threads: list[int], seq: int, timing: bool = True) -> dict:
    src = exported(name)
    external = has_external_data(src)
    cost = tool_cost(src, external)
    shapes = {"input_ids": [1, seq], "attention_mask": [1, seq]}
    row = {"model": name, **{k: v for k, v in cost.items() if k != "pruned"}}
    for key, path in (("original", src), ("pruned", cost["pruned"])):
        model = onnx.load(str(path), load_external_data=False)
        row[key] = {"macs": total_macs(model, shapes), "params": count_params(onnx.load(str(path)))[0]}
    row["mac_ratio"] = row["original"]["macs"] / row["pruned"]["macs"]
    if timing:
        rng = np.random.default_rng(0)
        feed = {"input_ids": rng.integers(0, 1000, (1, seq)).astype(np.int64),
                "attention_mask": np.ones((1, seq), dtype=np.int64)}
        row["latency"] = {}
        for t in threads:
            lat = latencies({"original": src, "pruned": cost["pruned"]}, feed, runs, t)
            speedup = lat["original"]["median_ms"] / lat["pruned"]["median_ms"]
            row["latency"][t] = {**lat, "speedup": speedup, "efficiency": speedup / row["mac_ratio"]}
    return row


def markdown(rows: list[dict], seq: int) -> str:
    lines = [(f"| model | params (orig → pruned) | heads per layer | MLP neurons per layer | MACs at seq {seq} "
             "(orig → pruned) | MAC ratio | threads | latency median (p90) orig → pruned | speedup "
             "| speedup / MAC ratio |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, p = r["original"], r["pruned"]
        heads = f"{r['heads'][0][0]} → {r['heads'][0][1]}" if r["heads"] else "-"
        neurons = f"{r['neurons'][0][0]} → {r['neurons'][0][1]}" if r["neurons"] else "-"
        head = (f"| {r['model']} | {o['params'] / 1e6:.1f}M → {p['params'] / 1e6:.1f}M | {heads} | {neurons} "
                f"| {o['macs'] / 1e9:.2f}G → {p['macs'] / 1e9:.2f}G | {r['mac_ratio']:.2f} ")
        for t, lat in (r.get("latency") or {"-": None}).items():
            if lat is None:
                lines.append(head + "| - | - | - | - |")
                continue
            lines.append(head + f"| {t} | {lat['original']['median_ms']:.1f} ({lat['original']['p90_ms']:.1f}) → "
                         f"{lat['pruned']['median_ms']:.1f} ({lat['pruned']['p90_ms']:.1f}) ms | {lat['speedup']:.2f}x "
                         f"| {lat['efficiency']:.2f} |")
    lines += ["", ("| model | onnxprune wall time | onnxprune peak RSS | load + save wall time | load + save peak RSS "
              "| time ratio | memory ratio |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['seconds']:.1f} s | {r['peak_rss'] / 2**30:.2f} GiB "
                     f"| {r['baseline_seconds']:.1f} s | {r['baseline_rss'] / 2**30:.2f} GiB "
                     f"| {r['seconds'] / r['baseline_seconds']:.2f}x | {r['peak_rss'] / r['baseline_rss']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert-base,llama-decoder")
    parser.add_argument("--scale", action="store_true", help="also the ~1.1B decoder (tool cost only)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for name in args.models.split(","):
        start = time.perf_counter()
        rows.append(bench(name, args.runs, threads, args.seq))
        print(f"{name}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    if args.scale:
        rows.append(bench("llama-1b", args.runs, threads, args.seq, timing=False))
    print(versions())
    print()
    print(markdown(rows, args.seq))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
