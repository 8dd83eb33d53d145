"""Structured pruning at --sparsity 0.5: onnxprune vs Torch-Pruning, on onnxruntime CPU.

    pip install -e ".[bench]" && pip install --no-deps timm torch-pruning
    python bench/bench_structured.py [--models resnet50,mobilenetv3_large_100,efficientnet_b0,convnext_tiny]
                                     [--runs 30] [--threads 1] [--json out.json] [--fresh]

For each architecture (timm, random init, 224x224, exported with torch.onnx into the git-ignored
bench/models/structured/ by fixtures/export_architectures.py):
- onnxprune ``--structured --sparsity 0.5`` (and ``--round-to 8``; ConvNeXt also ``--prune-layernorm``)
  in a child process: wall time and peak RSS of the tool, frozen share from its JSON report;
- Torch-Pruning (L1 group magnitude, ``pruning_ratio=0.5``, classifier in ``ignored_layers``) on the
  same torch model and weights: time to build the pruner and prune, then the pruned model exported
  to ONNX the same way; a failure is reported in the table, not raised;
- every ONNX model (original, onnxprune, onnxprune round-to 8, Torch-Pruning) timed in one
  process, interleaved round-robin after a warm-up, one intra-op thread, spinning off;
  medians and p90; MACs counted by onnxprune's cost model on every ONNX file alike;
  speedup / MAC ratio says how much of the possible gain was realised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "models" / "structured"
sys.path.insert(0, str(ROOT / "fixtures"))

from benchlib import child_cost, latencies

from onnxprune.analysis.cost import total_macs


def torch_pruning(name: str, path: Path) -> dict:
    """Prune the same model (same weights as the exported original) with Torch-Pruning and export it to ONNX."""
    from export_architectures import _torch, export, full_model, randomize_batchnorm

    torch, _ = _torch()
    import torch_pruning as tp

    model = full_model(name).eval()
    randomize_batchnorm(model)
    example = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[model.get_classifier()])
    pruner.step()
    seconds = time.perf_counter() - start
    export(model, path, 224, randomize_bn=False)
    return {"seconds": seconds}


def onnxprune_run(src: Path, dst: Path, extra: list[str]) -> dict:
    report = dst.with_suffix(".json")
    cost = child_cost([sys.executable, "-m", "onnxprune", str(src), "--structured", "--sparsity", "0.5",
                       "--no-validate", "-o", str(dst), "--force", "-q", "--report", str(report), *extra])
    seconds, rss = cost.seconds, cost.peak_rss
    details = json.loads(report.read_text())["passes"][0]["details"]
    at_outputs = sum(f["channels"] for f in details["frozen"] if f["reason"].startswith("reaches graph output"))
    reasons: dict[str, int] = {}
    for f in details["frozen"]:
        if not f["reason"].startswith("reaches graph output"):
            reason = f["reason"].split("'")[0].strip() + " ... " + f["reason"].split("'")[-1].strip()
            reasons[reason] = reasons.get(reason, 0) + f["channels"]
    return {"seconds": seconds, "peak_rss": rss, "channels_frozen": details["channels_frozen"],
            "channels_total": details["channels_total"],
            "frozen_share": (details["channels_frozen"] - at_outputs) / max(1, details["channels_total"] - at_outputs),
            "frozen_reasons": reasons}


def bench(name: str, runs: int, threads: int) -> dict:
    from export_architectures import export, full_model

    OUT.mkdir(parents=True, exist_ok=True)
    original = OUT / f"{name}.onnx"
    if not original.exists():
        export(full_model(name), original, 224)
    paths = {"original": original}
    row: dict = {"model": name}
    variants = [("onnxprune", []), ("onnxprune_r8", ["--round-to", "8"])]
    if name.startswith("convnext"):
        variants.append(("onnxprune_ln", ["--prune-layernorm"]))
    for key, extra in variants:
        dst = OUT / f"{name}.{key}.onnx"
        try:
            row[key] = onnxprune_run(original, dst, extra)
            paths[key] = dst
        except Exception as exc:  # noqa: BLE001 - a failure is a result
            row[key] = {"error": str(exc)}
    tp_path = OUT / f"{name}.torch_pruning.onnx"
    try:
        row["torch_pruning"] = torch_pruning(name, tp_path)
        paths["torch_pruning"] = tp_path
    except Exception as exc:  # noqa: BLE001
        row["torch_pruning"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        traceback.print_exc()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    lat = latencies(paths, {"input": x}, runs, threads)
    base_macs = total_macs(onnx.load(str(original), load_external_data=False))
    row["original"] = {"macs": base_macs, "params": _params(original), **lat["original"]}
    for key, path in paths.items():
        if key == "original":
            continue
        macs = total_macs(onnx.load(str(path), load_external_data=False))
        entry = row[key]
        entry.update(lat[key])
        entry["macs"] = macs
        entry["params"] = _params(path)
        entry["macs_kept"] = macs / base_macs
        entry["speedup"] = lat["original"]["median_ms"] / lat[key]["median_ms"]
        entry["efficiency"] = entry["speedup"] / (base_macs / macs)
    return row


def _params(path: Path) -> int:
    model = onnx.load(str(path))
    return int(sum(np.prod(t.dims) for t in model.graph.initializer if len(t.dims) > 1 or np.prod(t.dims) > 1))


def markdown(rows: list[dict]) -> str:
    lines = [("| model | tool | params | MACs kept | latency median (p90) | speedup | MAC ratio | speedup / MAC ratio "
              "| frozen | tool time | tool peak RSS |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["original"]
        lines.append(f"| {r['model']} | original | {o['params'] / 1e6:.1f}M | 1.000 | {o['median_ms']:.1f} ms "
                     f"({o['p90_ms']:.1f}) | 1.00x | 1.00 | - | - | - | - |")
        for key, label in (("onnxprune", "onnxprune"), ("onnxprune_r8", "onnxprune --round-to 8"),
                           ("onnxprune_ln", "onnxprune --prune-layernorm"), ("torch_pruning", "Torch-Pruning")):
            if key not in r:
                continue
            e = r[key]
            if "error" in e or "macs" not in e:
                lines.append(f"| {r['model']} | {label} | fails: {e.get('error', '?')} | | | | | | | | |")
                continue
            rss = f"{e['peak_rss'] / 2**20:.0f} MiB" if "peak_rss" in e else "-"
            frozen = f"{e['frozen_share']:.0%}" if "frozen_share" in e else "-"
            lines.append(f"| {r['model']} | {label} | {e['params'] / 1e6:.1f}M | {e['macs_kept']:.3f} "
                         f"| {e['median_ms']:.1f} ms ({e['p90_ms']:.1f}) | {e['speedup']:.2f}x "
                         f"| {1 / e['macs_kept']:.2f} | {e['efficiency']:.2f} | {frozen} | {e['seconds']:.1f} s | {rss} |")
    return "\n".join(lines)


def versions() -> str:
    import platform

    import onnxprune

    try:
        from importlib.metadata import version

        tp_version = version("torch-pruning")
    except Exception:  # noqa: BLE001 - not installed
        tp_version = "not installed"
    return (f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
            f"onnxprune {onnxprune.__version__}, Torch-Pruning {tp_version}")


def main() -> None:
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,mobilenetv3_large_100,efficientnet_b0,convnext_tiny")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fresh", action="store_true", help="re-export the original models even if present")
    args = parser.parse_args()
    if args.fresh:
        for name in args.models.split(","):
            (OUT / f"{name}.onnx").unlink(missing_ok=True)
    rows = []
    for name in args.models.split(","):
        start = time.perf_counter()
        rows.append(bench(name, args.runs, args.threads))
        print(f"{name}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    print(versions())
    print()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
