"""Channel choices before/after a reconstruction-speed change: the trained corpus models, one run, both trees.

    python bench/bench_speed_fidelity.py --before DIR [--models orientation,ocr_cls,ocr_rec,captcha_crnn]
                                         [--count 32] [--json out.json]

``DIR`` holds the other onnxprune tree (e.g. ``git archive <commit> | tar -x -C DIR``). For each model, the
"structured 0.3 + reconstruct" row of the corpus harness (check data seed 1, calibration seed 2, ``--count`` samples
each) runs with ``PYTHONPATH=DIR`` and with this tree, interleaved; the harness measures the task metric, worst
cosine and relative L2 to the dense model, MACs kept and the tool's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.corpus.harness import make_data, run_row
from tests.corpus.models import BY_NAME

MODE = "structured 0.3 + reconstruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--models", default="orientation,ocr_cls,ocr_rec,captcha_crnn")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    trees = {"before": str(args.before.resolve()), "after": str(ROOT)}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            model = BY_NAME[name]
            if model.locate() is None:
                print(f"{name}: not installed", file=sys.stderr)
                continue
            data = make_data(model, Path(folder), args.count)
            for label, tree in trees.items():
                os.environ["PYTHONPATH"] = tree
                os.chdir(tree)  # ``python -m`` puts the working directory first on sys.path
                row = run_row(model, MODE, Path(folder), data, label=label, validate=False, count=args.count)
                rows.append({"tree": label, **asdict(row)})
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
