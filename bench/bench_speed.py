"""Speed of structured ``--reconstruct`` on the issue-13 targets: the onnxprune CLI on exported models.

    pip install -e ".[bench]"
    OPENBLAS_NUM_THREADS=1 python bench/bench_speed.py [--models minilm,bert-base,resnet50] [--samples 128]
                                                       [--seq 128] [--cache DIR] [--json out.json]
    OPENBLAS_NUM_THREADS=1 python bench/bench_speed.py --selection   # greedy selection alone, synthetic groups

Models (random weights, exported once by torch.onnx's TorchScript exporter into ``--cache``, default the git-ignored
``bench/models/speed/``; nothing is written into the tracked tree; a child process of this script, ``--prepare``, exports
and writes what is missing, so the measured children are never forked from a process that imported torch, whose
resident set their ``ru_maxrss`` would report):
- ``minilm``: a BERT encoder of the MiniLM-L6-H384 shape (hidden 384, 6 layers, 12 heads, FFN 1536, 30,522 tokens;
  22.7M parameters), Hugging Face ``BertModel``;
- ``bert-base``: the same code at BERT-base size (110M parameters);
- ``resnet50``: ResNet-50 (torchvision's layout: bottlenecks 3-4-6-3, BatchNorm, 25.6M parameters) at 224², built
  in torch here (timm needs torchvision, which the bench extras do not install).
Calibration data: ``--samples`` samples (token ids uniform over the vocabulary with ``--seq`` tokens and an all-ones
mask, or smooth seeded random images), one ``.npz`` file. Each model is pruned by

    python -m onnxprune MODEL --structured --sparsity 0.3 --calibration-data CALIB.npz --reconstruct -o OUT --report R

in a child process: wall and CPU seconds (user + system of the child), peak RSS, the RSS when loading starts (after
the imports) and the peak RSS of each stage (the child's resident set sampled every 20 ms, counted to the stage its
last progress line opened), and the report's stage breakdown (``timings``: load, allocation, prune, check_and_save,
validate; the allocation's ``stages``: reference, analysis, capture, gram, refit, probe; the structured pass's
``stages``: analysis, capture, gram, selection, removal, refit_gram, refit_solve), wall and CPU seconds each, and
the load average before and after. Each model's figures end with one markdown table row (docs/benchmarks.md).

    OPENBLAS_NUM_THREADS=1 python bench/bench_speed.py --selection-quality resnet50 --samples 16

compares the batched greedy selection (the default for groups of more than ``SELECTION_STEPS`` steps) with one unit
per step on the model's real Grams: CPU seconds, shared removed units and the refit error of each removed set.

    OPENBLAS_NUM_THREADS=1 python bench/bench_speed.py --allocation resnet50 --samples 16 --json alloc.json \
        [--compare before.json]

runs only the default allocation's measurement in-process (``--reconstruct`` on, the first ``--samples`` calibration
samples: 4 measured, the rest fitted): its wall and CPU seconds by stage, the chosen ratios and every sensitivity
point. ``--compare`` a file written the same way (e.g. by the code before a change, ``PYTHONPATH`` pointing at it; the
pruning runs then start python with ``-P``, so that PYTHONPATH's package is the one measured):
whether the chosen ratios are identical and the largest absolute difference of the points' relative L2.
``--low-memory`` bounds the heap first (the measurement's ``--low-memory`` path); ``peak_rss_mb`` is the process's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "fixtures"))

MINILM = {"hidden": 384, "layers": 6, "heads": 12, "kv_heads": 12, "inter": 1536, "vocab": 30522}
BERT_BASE = {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 12, "inter": 3072, "vocab": 30522}
TARGETS_S = {"minilm": 60, "bert-base": 300, "resnet50": 180}


def export_bert(size: dict, path: Path) -> Path:
    """A Hugging Face BERT of ``size`` exported with dynamic batch and sequence (reused when present)."""
    if not path.exists():
        from export_transformers import export

        path.parent.mkdir(parents=True, exist_ok=True)
        written = export("bert", size, path.parent, "ts")
        written.rename(path)
    return path


def export_resnet50(path: Path) -> Path:
    """ResNet-50 (bottleneck 3-4-6-3, BatchNorm with randomised statistics, 1000 logits), 224² input."""
    if path.exists():
        return path
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for block in range(blocks):
            layers.append(Bottleneck(cin, width, 2 if stage and not block else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    model = nn.Sequential(*layers).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # trained-looking statistics, so channels differ
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.2, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    import onnx

    loaded = onnx.load(str(path))
    loaded.ir_version = 8
    onnx.save(loaded, str(path))
    return path


def calibration(name: str, samples: int, seq: int, folder: Path) -> Path:
    """Seeded calibration data for the model, one ``.npz`` (reused when present)."""
    rng = np.random.default_rng(0)
    path = folder / f"{name}_calib_{samples}x{seq}.npz"
    if path.exists():
        return path
    if name == "resnet50":
        x = rng.standard_normal((samples, 3, 224, 224)).astype(np.float32)
        for axis in (2, 3):  # neighbouring pixels correlate, as in photos
            x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
        np.savez(path, input=x.astype(np.float32))
    else:
        ids = rng.integers(0, 30522, (samples, seq), dtype=np.int64)
        np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
    return path


#: progress line prefix -> stage it opens (the lines onnxprune prints on stderr without -q)
STAGE_LINES = (("loading model", "load"), ("measuring each group's sensitivity", "allocation"),
               ("group ", "allocation"), ("analysing channel groups", "analysis"),
               ("measuring channel activations", "capture"), ("choosing channels", "selection"),
               ("removing channels", "removal"), ("reconstructing", "refit"), ("folding constants", "fold"),
               ("checking", "check_and_save"), ("validating", "validate"), ("measuring accuracy", "validate"))


def child(cmd: list[str]) -> dict:
    """Wall and CPU seconds (user + system) and peak RSS of one child process, and its RSS per stage: the child's
    resident set is sampled every 20 ms and each sample counted to the stage its last progress line opened;
    ``rss_at_load_mb`` is the RSS when loading starts (after the imports), the baseline of the memory target."""
    import re
    import subprocess
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    current, lines = ["start"], []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            message = re.sub(r"^\[\s*[\d.]+s\]\s*", "", line.strip())
            current[0] = next((stage for prefix, stage in STAGE_LINES if message.startswith(prefix)), current[0])
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peaks: dict[str, int] = {}
    at_load = None
    while True:
        pid, code, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps the child itself: its rusage is the figure
        if pid:
            break
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        if found:
            rss = int(found.group(1)) << 10
            peaks[current[0]] = max(peaks.get(current[0], 0), rss)
            if current[0] == "load" and at_load is None:
                at_load = rss
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(code)
    reader.join(timeout=5)
    code = proc.returncode
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {''.join(lines)[-2000:]}")
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": usage.ru_maxrss >> 10, "rss_at_load_mb": (at_load or 0) >> 20,
            "peak_rss_by_stage_mb": {stage: rss >> 20 for stage, rss in peaks.items()}}


def bench(name: str, model: Path, calib: Path, sparsity: float, extra: list[str], keep: bool = False) -> dict:
    out = model.with_name(model.stem + ".pruned.onnx")
    report = model.with_name(model.stem + ".report.json")
    # with PYTHONPATH set (the code before a change, for --compare or a baseline) -P keeps the current folder out of
    # sys.path: python -m puts it first, and from the repository root its onnxprune would win over PYTHONPATH's
    first = ["-P"] if os.environ.get("PYTHONPATH") else []
    cmd = [sys.executable, *first, "-m", "onnxprune", str(model), "--structured", "--sparsity", str(sparsity),
           "--calibration-data", str(calib), "--reconstruct", "-o", str(out), "--force", "--report", str(report),
           *extra]
    before = os.getloadavg()[0]
    cost = child(cmd)
    data = json.loads(report.read_text())
    details = data["passes"][0]["details"]
    size_mb = model.stat().st_size / 2**20
    row = {"model": name, "size_mb": round(size_mb, 1), **cost, "target_s": TARGETS_S.get(name),
           "timings_s": {k: round(v, 1) for k, v in data.get("timings", {}).items()},
           "stages_s": details.get("stages"),
           "allocation_stages_s": (data.get("allocation") or {}).get("stages"),
           "macs_kept": round(details["macs_after"] / max(details["macs_before"], 1), 3),
           "layers_refit": (details.get("reconstruction") or {}).get("layers"),
           "worst": (data.get("validation") or {}).get("worst"),
           "load": [round(before, 1), round(os.getloadavg()[0], 1)]}
    if not keep:
        out.unlink(missing_ok=True)
    return row


def markdown_row(row: dict) -> str:
    """The row as a docs/benchmarks.md table line: wall / CPU, timings, allocation and pass stages (CPU s), memory."""
    def cpu(stages: dict | None) -> str:
        return " / ".join(f"{k} {v['cpu_s']:.1f}" for k, v in (stages or {}).items())
    size = row["size_mb"]
    timings = " / ".join(f"{k} {v}" for k, v in row["timings_s"].items())
    return (f"| {row['model']} ({size} MB) | {row['wall_s']} ({row['target_s']}) | {row['cpu_s']} | {timings} | "
            f"{cpu(row.get('allocation_stages_s'))} | {cpu(row.get('stages_s'))} | {row['peak_rss_mb']:,} MB "
            f"({row['peak_rss_mb'] / size:.1f}x; {row['peak_rss_mb'] - row['rss_at_load_mb']:,} above imports) | "
            f"{row['macs_kept']} | {row['load'][0]}–{row['load'][1]} |")


def selection_micro() -> list[dict]:
    """CPU seconds of greedy selection alone on one synthetic group (random Gram of 4·D rows, random weights)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT))
    from onnxprune.scoring import _greedy_order

    rows = []
    rng = np.random.default_rng(0)
    for features, outputs, k, steps in ((1536, 384, 1, 462), (2304, 256, 9, 78), (4608, 512, 9, 155)):
        units = features // k
        x = rng.standard_normal((4 * features, features))
        gram = x.T @ x
        gram += 1e-3 * np.trace(gram) / features * np.eye(features)
        group = SimpleNamespace(units=[np.array([u]) for u in range(units)])
        consumers = {"c": (None, None, rng.standard_normal((features, outputs)), np.repeat(np.arange(units), k))}
        wall, cpu = time.perf_counter(), time.process_time()
        _greedy_order(group, consumers, {"c": gram}, steps)
        rows.append({"features": features, "outputs": outputs, "block": k, "steps": steps,
                     "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def selection_quality(model: Path, calib: Path, samples: int, ratios=(0.3, 0.6)) -> list[dict]:
    """Greedy selection on the model's real Grams (``samples`` calibration samples), batched (the default past
    ``SELECTION_STEPS`` steps) against one unit per step (exact), for every group of more than that many units:
    CPU seconds of each, the share of removed units both choose, and the refit error each removed set leaves
    (Σ over consumers of W_qᵀ (H⁻¹)_qq⁻¹ W_q, the least-squares output error after refitting without q)."""
    import math

    import onnx

    sys.path.insert(0, str(ROOT))
    from onnxprune import scoring
    from onnxprune.analysis.groups import analyse, build_groups
    from onnxprune.passes.structured import prepare_for_analysis

    loaded = onnx.load(str(model))
    prepare_for_analysis(loaded)
    data = dict(np.load(calib))
    feeds = [{k: v[i:i + 8] for k, v in data.items()} for i in range(0, samples, 8)]
    analysis = analyse(loaded)
    consumers = scoring.refit_consumers(analysis)
    grams = scoring._consumer_grams(loaded, consumers, feeds, 1e-3, None, analysis.shapes)
    rows = []
    for group in build_groups(analysis):
        if len(group.units) <= scoring.SELECTION_STEPS:
            continue
        steps = math.ceil(max(ratios) * max(group.channels, len(group.units))) + 1
        orders = {}
        for mode, limit in (("exact", 1 << 30), ("batched", scoring.SELECTION_STEPS)):
            scoring.SELECTION_STEPS, saved = limit, scoring.SELECTION_STEPS
            cpu = time.process_time()
            scores = scoring._greedy_order(group, consumers, grams, steps)
            orders[mode] = (np.argsort(scores, kind="stable"), time.process_time() - cpu)
            scoring.SELECTION_STEPS = saved
        row = {"group": group.id, "units": len(group.units), "cpu_s_exact": round(orders["exact"][1], 2),
               "cpu_s_batched": round(orders["batched"][1], 2)}
        for ratio in ratios:
            n = int(ratio * len(group.units))
            chosen = {mode: order[:n] for mode, (order, _) in orders.items()}
            row[f"same_{ratio}"] = round(len(set(chosen["exact"]) & set(chosen["batched"])) / max(n, 1), 3)
            errors = {mode: _refit_error(group, consumers, grams, units) for mode, units in chosen.items()}
            row[f"error_ratio_{ratio}"] = round(errors["batched"] / max(errors["exact"], 1e-30), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _refit_error(group, consumers: dict, grams: dict, units) -> float:
    """Σ over the group's consumers of the least-squares output error left by removing ``units`` and refitting."""
    ids = {int(i) for u in units for i in np.asarray(group.units[u]).ravel()}
    total = 0.0
    for key, (_, _, matrix, feature_ids) in consumers.items():
        q = np.flatnonzero([int(i) in ids for i in feature_ids])
        if key not in grams or not q.size:
            continue
        inverse = np.linalg.inv(grams[key])
        total += float(np.sum(matrix[q] * np.linalg.solve(inverse[np.ix_(q, q)], matrix[q])))
    return total


def allocation_only(model: Path, calib: Path, samples: int, sparsity: float) -> dict:
    """The default allocation's measurement alone (the package on ``PYTHONPATH``): stages, ratios, points."""
    import onnx

    from onnxprune.allocation import default_allocation
    from onnxprune.calibration import load_calibration
    from onnxprune.config import PruneConfig

    loaded = onnx.load(str(model))
    data = dict(np.load(calib))
    batches = load_calibration([{k: v[:samples] for k, v in data.items()}], loaded)
    shapes = {name: [1, *arr.shape[1:]] for name, arr in batches[0].items()}
    config = PruneConfig(structured=True, sparsity=sparsity, reconstruct=True,
                         calibration_data=str(calib))
    wall, cpu = time.perf_counter(), time.process_time()
    _, report = default_allocation(loaded, config, batches, shapes)
    return {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
            "stages": report.get("stages"), "ratios": report.get("ratios"),
            "points": {str(g["id"]): [p["rel_l2"] for p in g["points"]] for g in report["sensitivity"]["groups"]}}


def compare_allocations(before: dict, after: dict) -> dict:
    """Same chosen ratios? The largest absolute (and relative) difference between the points' relative L2."""
    diffs = [(abs(a - b), abs(a - b) / max(abs(b), 1e-30)) for gid, points in before["points"].items()
             for a, b in zip(after["points"].get(gid, []), points)]
    return {"same_ratios": before["ratios"] == after["ratios"],
            "same_points": before["points"].keys() == after["points"].keys(),
            "max_abs_diff_rel_l2": max((d[0] for d in diffs), default=0.0),
            "max_rel_diff_rel_l2": max((d[1] for d in diffs), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base,resnet50")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--cache", type=Path, default=HERE / "models" / "speed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-output", action="store_true", help="keep the pruned model (<cache>/<model>.pruned.onnx)")
    parser.add_argument("--selection", action="store_true", help="only time greedy selection on synthetic groups")
    parser.add_argument("--selection-quality", metavar="MODEL", choices=["resnet50", "minilm", "bert-base"],
                        help="batched against exact greedy selection on the model's real Grams")
    parser.add_argument("--allocation", metavar="MODEL", choices=["resnet50", "minilm", "bert-base"],
                        help="only the default allocation's measurement, in-process")
    parser.add_argument("--compare", type=Path, help="with --allocation: a JSON file it wrote before")
    parser.add_argument("--low-memory", action="store_true",
                        help="with --allocation: bound the heap first, as the tool's --low-memory does")
    parser.add_argument("--prepare", action="store_true",
                        help="only export the models and write their calibration data into --cache")
    parser.add_argument("extra", nargs="*", help="further onnxprune options (after --)")
    args = parser.parse_args()
    if args.selection:
        selection_micro()
        return
    if args.selection_quality:
        name = args.selection_quality
        rows = selection_quality(args.cache / f"{name}.onnx", calibration(name, args.samples, args.seq, args.cache),
                                 args.samples)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    if args.allocation:
        name = args.allocation
        if args.low_memory:
            from onnxprune.heap import bound_heap
            bound_heap()
        row = allocation_only(args.cache / f"{name}.onnx", calibration(name, args.samples, args.seq, args.cache),
                              args.samples, args.sparsity)
        if args.compare:
            row["compare"] = compare_allocations(json.loads(args.compare.read_text()), row)
        print(json.dumps({k: v for k, v in row.items() if k != "points"}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(row, indent=1))
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    if not args.prepare:  # exports and calibration data in a process of their own: a measured child forked from a
        # process that imported torch would report that process's resident set as its own peak (ru_maxrss keeps it)
        import subprocess

        subprocess.run([sys.executable, __file__, "--prepare", "--models", args.models, "--samples", str(args.samples),
                        "--seq", str(args.seq), "--cache", str(args.cache)], check=True)
    rows = []
    for name in args.models.split(","):
        start = time.perf_counter()
        if name == "resnet50":
            model = export_resnet50(args.cache / "resnet50.onnx")
        else:
            model = export_bert(MINILM if name == "minilm" else BERT_BASE, args.cache / f"{name}.onnx")
        print(f"{name}: model ready in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
        calib = calibration(name, args.samples, args.seq, args.cache)
        if args.prepare:
            continue
        rows.append(bench(name, model, calib, args.sparsity, args.extra, args.keep_output))
        print(json.dumps(rows[-1]), flush=True)
        print(markdown_row(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
