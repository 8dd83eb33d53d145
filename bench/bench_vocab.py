"""Vocabulary pruning on decoders with realistic vocabularies: MACs kept, latency ratio, next-token fidelity.

    python bench/bench_vocab.py [--runs 50] [--out bench/out/vocab]

Models: ``fixtures/transformers/llama_vocab32k_ts.onnx`` (LLaMA-style, 32,000 tokens, untied LM head) and a
GPT-2-style decoder with GPT-2's 50,257 tokens (tied LM head, exported here into ``bench/models/``, needs torch and
transformers). Calibration ids: 64 x 32 Zipf-distributed ids below 2000 (``zipf_ids`` seed 0, the fixture's);
held-out ids: the same distribution, seed 1 (some of its ids never occur in calibration: they become unknown).

Rows: (a) width only (``--structured --sparsity 0.5 --head-sparsity 0.25 --uniform``), vocabulary only
(``--vocab-from-calibration``), the same with ``--shrink-logits`` (logits [.., K]), (d) both. Columns: MACs kept at [1, 32]; latency ratio pruned/original on onnxruntime
CPU (1 thread, interleaved, median); top-1 agreement of next-token predictions on the held-out ids, over the kept
tokens' columns (what the pruned model can predict) and over all V columns; the share of held-out ids not kept.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "fixtures"), str(ROOT / "bench")]

from benchlib import latencies
from export_transformers import SIZES, export, zipf_ids

from onnxprune import prune
from onnxprune.analysis.cost import total_macs

SHAPES = {"input_ids": [1, 32], "attention_mask": [1, 32]}
WIDTH = {"structured": True, "sparsity": 0.5, "head_sparsity": 0.25, "uniform": True}
ROWS = {"(a) width only": WIDTH, "vocabulary only": {}, "vocabulary, --shrink-logits": {"shrink_logits": True},
        "(d) width + vocabulary": WIDTH}


def gpt2_50k(models: Path) -> Path:
    """A GPT-2-style decoder with GPT-2's vocabulary (50,257 tokens, hidden 32, tied LM head)."""
    path = models / "gpt2_vocab50k_ts.onnx"
    if not path.exists():
        with tempfile.TemporaryDirectory() as tmp:  # export() names it gpt2_ts.onnx
            export("gpt2", {**SIZES["vocab32k"], "vocab": 50257}, Path(tmp), "ts").replace(path)
    return path


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def measure(name: str, path: Path, out: Path, calibration: Path, held_out: np.ndarray, runs: int) -> list[str]:
    """The rows of one model, as Markdown table lines."""
    base_macs = total_macs(onnx.load(str(path)), SHAPES)
    reference = logits(path, held_out)
    lines = []
    for row, options in ROWS.items():
        target = out / f"{path.stem}_{row.split()[0].strip('()')}_{len(lines)}.onnx"
        vocab = {"vocab_from_calibration": True} if "vocabulary" in row else {}
        model, result = prune(str(path), str(target), force=True, calibration_data=str(calibration),
                              **options, **vocab)
        details = next((p.details for p in result.passes if p.name == "vocabulary"), {})
        kept = np.unique(np.load(calibration)["input_ids"]) if details else np.arange(reference.shape[-1])
        pruned = logits(target, held_out)
        if pruned.shape != reference.shape:  # --shrink-logits: column i is token kept[i]
            full = np.full(reference.shape, np.finfo(np.float32).min, np.float32)
            full[..., kept] = pruned
            pruned = full
        top_kept = np.mean(pruned[..., kept].argmax(-1) == reference[..., kept].argmax(-1))
        top_all = np.mean(pruned.argmax(-1) == reference.argmax(-1))
        unknown = np.mean(~np.isin(held_out, kept))
        times = latencies({"original": path, "pruned": target}, {"input_ids": held_out[:1],
                                                                  "attention_mask": np.ones_like(held_out[:1])},
                          runs, 1)
        ratio = times["pruned"]["median_ms"] / times["original"]["median_ms"]
        lines.append(f"| {name} | {row} | {kept.size:,} / {reference.shape[-1]:,} | "
                     f"{total_macs(model, SHAPES) / base_macs:.3f} | {ratio:.2f} | {top_kept:.3f} | {top_all:.3f} | "
                     f"{unknown:.3f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "vocab")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    models = ROOT / "bench" / "models"
    models.mkdir(parents=True, exist_ok=True)
    calibration = ROOT / "fixtures" / "transformers" / "llama_vocab32k_calibration.npz"
    held_out = zipf_ids((64, 32), seed=1)
    print("| model | pruning | tokens kept | MACs kept | latency ratio | top-1 (kept columns) | top-1 (all columns) "
          "| held-out ids unknown |")
    print("|---|---|---|---|---|---|---|---|")
    measure("LLaMA-style, 32k vocab, hidden 32", ROOT / "fixtures" / "transformers" / "llama_vocab32k_ts.onnx",
            args.out, calibration, held_out, args.runs)
    measure("GPT-2-style, 50,257 vocab, hidden 32 (tied)", gpt2_50k(models), args.out, calibration, held_out,
            args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
