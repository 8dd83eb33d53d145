"""Task accuracy of structured pruning with calibration data: uniform ratios vs sensitivity allocation at equal MACs.

    python -m pip install -q --no-deps -r tests/corpus/requirements.txt
    python bench/bench_accuracy.py [--models orientation,ocr_cls] [--eval 200] [--calib 32] [--json rows.json]
                                   [--no-docs]

Models: the trained models with a task metric: the digits CNN fixture (torch.onnx TorchScript exporter,
``fixtures/trained``, labelled validation split) and the corpus models of ``tests/corpus/models.py`` that have one
(orientation, ocr_cls, ocr_rec: Paddle; captcha_crnn: torch dynamo), on rendered data from ``tests/corpus/synth.py``;
calibration (seed 2) and evaluation (seed 1) data never share a seed. Per model the sparsity is the smallest of
0.3 / 0.35 / 0.4 / 0.45 / 0.5 whose uniform plan removes at least 30 % of the MACs; rows: dense, then
``--structured --sparsity S --calibration-data … --reconstruct`` with ``--uniform`` and with the default
sensitivity allocation (which reaches the uniform plan's MACs). Each row: task metric, MACs kept, tool time; the
allocation row names the group whose removal alone costs most (measured at S). Writes the table between the
``accuracy-table`` markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxprune
from onnxprune.analysis.cost import total_macs
from onnxprune.passes.structured import prepare_for_analysis
from onnxprune.sensitivity import costliest, uniform_macs
from tests.corpus.harness import CALIB_SEED, CHECK_SEED, run_model, save_npz
from tests.corpus.models import BY_NAME, CorpusModel

DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"
DIGITS = ROOT / "fixtures" / "trained"
CORPUS_MODELS = ("orientation", "ocr_cls", "ocr_rec", "captcha_crnn")
SPARSITIES = (0.3, 0.35, 0.4, 0.45, 0.5)


@dataclass
class Row:
    """One model x mode."""

    model: str
    exporter: str
    mode: str
    metric_name: str
    metric: float
    macs_kept: float = 1.0
    seconds: float = 0.0
    allocation: str = ""
    fragile: str = ""


@dataclass
class Task:
    """A model with its calibration file, evaluation inputs and metric."""

    name: str
    exporter: str
    path: Path
    calib: Path
    feeds: dict[str, np.ndarray]
    labels: list | np.ndarray
    metric_name: str
    score: object  # (model path) -> metric


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _chunked(run, feeds: dict[str, np.ndarray], size: int = 32) -> list[np.ndarray]:
    count = len(next(iter(feeds.values())))
    parts = [run({k: v[i:i + size] for k, v in feeds.items()}) for i in range(0, count, size)]
    return parts


def corpus_task(model: CorpusModel, folder: Path, evals: int, calibs: int) -> Task:
    feeds, labels = model.make(np.random.default_rng(CHECK_SEED), evals, 0)
    calib, _ = model.make(np.random.default_rng(CALIB_SEED), calibs, 0)

    def score(path: Path) -> float:
        sess = _session(path)
        parts = _chunked(lambda f: run_model(model, sess, f), feeds)
        outputs = [np.concatenate([p[j] for p in parts], axis=model.out_axis) for j in range(len(parts[0]))]
        return model.metric(outputs, labels)

    return Task(model.name, model.exporter, model.locate(), save_npz(folder / f"{model.name}.calib.npz", calib),
                feeds, labels, model.metric_name, score)


def digits_task() -> Task:
    val = np.load(DIGITS / "digits_val.npz")
    feeds, labels = {"input": val["input"]}, val["labels"]

    def score(path: Path) -> float:
        sess = _session(path)
        logits = np.concatenate([p[0] for p in _chunked(lambda f: sess.run(None, f), feeds)])
        return float(np.mean(logits.argmax(1) == labels))

    return Task("digits_cnn", "torch.onnx (TorchScript)", DIGITS / "digits_cnn.onnx", DIGITS / "digits_calib.npz",
                feeds, labels, "top-1", score)


def shapes_of(calib: Path) -> dict[str, list[int]]:
    with np.load(calib) as data:
        return {k: [1, *data[k].shape[1:]] for k in data.files}


def pick_sparsity(task: Task) -> float:
    """The smallest sparsity whose uniform plan removes at least 30 % of the MACs."""
    model = onnx.load(str(task.path))
    prepare_for_analysis(model)
    shapes = shapes_of(task.calib)
    base = total_macs(model, shapes)
    for s in SPARSITIES:
        if uniform_macs(model, onnxprune.PruneConfig(structured=True, sparsity=s), shapes) <= 0.7 * base:
            return s
    return SPARSITIES[-1]


def prune_row(task: Task, sparsity: float, uniform: bool, folder: Path) -> Row:
    out = folder / f"{task.name}.{'uniform' if uniform else 'sens'}.onnx"
    config = onnxprune.PruneConfig(structured=True, sparsity=sparsity, reconstruct=True,
                                   calibration_data=str(task.calib), uniform=uniform)
    start = time.perf_counter()
    _, result = onnxprune.prune(task.path, out, config=config, force=True,
                                validate=onnxprune.ValidateConfig(enabled=False, input_shapes=shapes_of(task.calib)))
    seconds = time.perf_counter() - start
    details = next(p.details for p in result.passes if p.name == "structured")
    alloc = result.allocation or {}
    row = Row(task.name, task.exporter, f"structured {sparsity:g} + reconstruct, " +
              ("uniform" if uniform else "sensitivity"), task.metric_name, task.score(out),
              details["macs_after"] / details["macs_before"], seconds)
    if alloc.get("method") == "sensitivity":
        row.allocation = f"{alloc['groups_measured']} groups, {alloc['evaluations']} runs, {alloc['seconds']:.1f} s"
        row.fragile = fragile_group(alloc["sensitivity"], sparsity)
    return row


def fragile_group(sens: dict, sparsity: float) -> str:
    """The group whose removal alone at ``sparsity`` loses most fidelity (relative L2 of the outputs)."""
    worst = costliest(sens, sparsity)
    return f"{worst['producers'][0]} (rel L2 {worst['rel_l2']:.3g} alone at {worst['ratio']:g})"


def run(names: list[str], evals: int, calibs: int) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in names:
            task = digits_task() if name == "digits_cnn" else corpus_task(BY_NAME[name], folder, evals, calibs)
            if task.path is None:
                print(f"{name}: package not installed, skipped", file=sys.stderr)
                continue
            sparsity = pick_sparsity(task)
            rows.append(Row(task.name, task.exporter, "dense", task.metric_name, task.score(task.path)))
            for uniform in (True, False):
                rows.append(prune_row(task, sparsity, uniform, folder))
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| model | exporter | mode | task metric | MACs kept | tool time | allocation (cost) | costliest group |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.exporter} | {r.mode} | {r.metric_name} {r.metric:.3f} | "
                     f"{100 * r.macs_kept:.1f} % | {r.seconds:.0f} s | {r.allocation or '–'} | "
                     f"{r.fragile or '–'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(("digits_cnn", *CORPUS_MODELS)))
    parser.add_argument("--eval", type=int, default=200, help="evaluation samples per corpus model")
    parser.add_argument("--calib", type=int, default=32, help="calibration samples per corpus model")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    rows = run(args.models.split(","), args.eval, args.calib)
    text = table(rows)
    print(text)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if not args.no_docs:
        doc = DOCS.read_text()
        if BEGIN not in doc:
            doc += f"\n{BEGIN}\n{END}\n"
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOCS.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


if __name__ == "__main__":
    main()
