"""Structured pruning time before and after the house redesign (issue 14): the same CLI command run with two source
trees, interleaved, in one run.

    git worktree add /tmp/house-before 3132613   # the commit before the first issue-14 merge (882450f)
    OPENBLAS_NUM_THREADS=1 python bench/bench_house.py --before /tmp/house-before [--repeats 3]
                                                      [--after TREE] [--models resnet50,bert-base] [--json out.json]

Each model is pruned by

    python -m onnxprune MODEL --structured --sparsity 0.5 [--head-sparsity 0.25] -o OUT --force -q --no-validate

(no calibration data; ``--head-sparsity 0.25`` for BERT) in a fresh child process whose ``PYTHONPATH`` is the
before tree or this one, A B A B... per model. Measured: wall seconds, CPU seconds of the child (user + system,
``RUSAGE_CHILDREN``: on a busy machine CPU time drifts less than wall time) and the report's ``timings.prune``.
Medians per side and the ratio after / before. Models: ``bench/models/speed/`` (git-ignored; ``bench_speed.py``
exports them): ResNet-50 at real width, BERT-base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import child_cost

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = {
    "resnet50": (HERE / "models" / "speed" / "resnet50.onnx", []),
    "bert-base": (HERE / "models" / "speed" / "bert-base.onnx", ["--head-sparsity", "0.25"]),
}


def run_once(tree: Path, model: Path, extra: list[str], work: Path) -> dict[str, float]:
    """One pruning run of ``model`` with the package in ``tree``: wall, CPU and the report's prune seconds."""
    out, report = work / "out.onnx", work / "report.json"
    argv = ["env", f"PYTHONPATH={tree}", sys.executable, "-m", "onnxprune", str(model), "--structured",
            "--sparsity", "0.5", *extra, "-o", str(out), "--force", "-q", "--no-validate", "--report", str(report)]
    cost = child_cost(argv)
    timings = json.loads(report.read_text())["timings"]
    return {"wall_s": cost.seconds, "cpu_s": cost.cpu_seconds, "prune_s": timings["prune"]}


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="source tree of the code before the redesign")
    parser.add_argument("--after", type=Path, default=ROOT, help="source tree of the code after it (default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="resnet50,bert-base")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, extra = MODELS[name]
            runs: dict[str, list] = {side: [] for side in sides}
            for repeat in range(args.repeats):
                order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
                for side in order:
                    runs[side].append(run_once(sides[side], model, extra, Path(tmp)))
                    print(name, side, repeat, runs[side][-1], flush=True)
            medians = {side: summary(r) for side, r in runs.items()}
            ratio = {key: round(medians["after"][key] / medians["before"][key], 3) for key in medians["before"]}
            results[name] = {"runs": runs, "median": medians, "ratio_after_over_before": ratio}
            print(name, "median", medians, "ratio", ratio, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
