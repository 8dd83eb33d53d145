"""Speed of structured ``--reconstruct`` on the issue-13 targets: the onnxprune CLI on exported models.

    pip install -e ".[bench]"
    OPENBLAS_NUM_THREADS=1 python bench/bench_speed.py [--models minilm,bert-base,resnet50] [--samples 128]
                                                       [--seq 128] [--cache DIR] [--json out.json]
    OPENBLAS_NUM_THREADS=1 python bench/bench_speed.py --selection   # greedy selection alone, synthetic groups

Models (random weights, exported once by torch.onnx's TorchScript exporter into ``--cache``, default the git-ignored
``bench/models/speed/``; nothing is written into the tracked tree):
- ``minilm``: a BERT encoder of the MiniLM-L6-H384 shape (hidden 384, 6 layers, 12 heads, FFN 1536, 30,522 tokens;
  22.7M parameters), Hugging Face ``BertModel``;
- ``bert-base``: the same code at BERT-base size (110M parameters);
- ``resnet50``: ResNet-50 (torchvision's layout: bottlenecks 3-4-6-3, BatchNorm, 25.6M parameters) at 224², built
  in torch here (timm needs torchvision, which the bench extras do not install).
Calibration data: ``--samples`` samples (token ids uniform over the vocabulary with ``--seq`` tokens and an all-ones
mask, or smooth seeded random images), one ``.npz`` file. Each model is pruned by

    python -m onnxprune MODEL --structured --sparsity 0.3 --calibration-data CALIB.npz --reconstruct -o OUT --report R

in a child process: wall and CPU seconds (user + system of the child), peak RSS, and the report's stage breakdown
(``timings``: load, prune, check_and_save, validate; the structured pass's ``stages``: analysis, selection capture,
gram, selection, removal, refit capture, refit solve).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import child_cost

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
    """Seeded calibration data for the model, one ``.npz``."""
    rng = np.random.default_rng(0)
    path = folder / f"{name}_calib_{samples}x{seq}.npz"
    if name == "resnet50":
        x = rng.standard_normal((samples, 3, 224, 224)).astype(np.float32)
        for axis in (2, 3):  # neighbouring pixels correlate, as in photos
            x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
        np.savez(path, input=x.astype(np.float32))
    else:
        ids = rng.integers(0, 30522, (samples, seq), dtype=np.int64)
        np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
    return path


def child(cmd: list[str]) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS of one child process."""
    cost = child_cost(cmd)
    return {"wall_s": round(cost.seconds, 1), "cpu_s": round(cost.cpu_seconds, 1), "peak_rss_mb": cost.peak_rss // 2**20}


def bench(name: str, model: Path, calib: Path, sparsity: float, extra: list[str]) -> dict:
    out = model.with_name(model.stem + ".pruned.onnx")
    report = model.with_name(model.stem + ".report.json")
    cmd = [sys.executable, "-m", "onnxprune", str(model), "--structured", "--sparsity", str(sparsity),
           "--calibration-data", str(calib), "--reconstruct", "-o", str(out), "--force", "-q", "--report", str(report),
           *extra]
    cost = child(cmd)
    data = json.loads(report.read_text())
    details = data["passes"][0]["details"]
    size_mb = model.stat().st_size / 2**20
    row = {"model": name, "size_mb": round(size_mb, 1), **cost, "target_s": TARGETS_S.get(name),
           "timings_s": {k: round(v, 1) for k, v in data.get("timings", {}).items()},
           "stages_s": details.get("stages"),
           "macs_kept": round(details["macs_after"] / max(details["macs_before"], 1), 3),
           "layers_refit": (details.get("reconstruction") or {}).get("layers"),
           "worst": (data.get("validation") or {}).get("worst"),
           "load": os.getloadavg()[0]}
    out.unlink(missing_ok=True)
    return row


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base,resnet50")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--cache", type=Path, default=HERE / "models" / "speed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--selection", action="store_true", help="only time greedy selection on synthetic groups")
    parser.add_argument("extra", nargs="*", help="further onnxprune options (after --)")
    args = parser.parse_args()
    if args.selection:
        selection_micro()
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        start = time.perf_counter()
        if name == "resnet50":
            model = export_resnet50(args.cache / "resnet50.onnx")
        else:
            model = export_bert(MINILM if name == "minilm" else BERT_BASE, args.cache / f"{name}.onnx")
        print(f"{name}: model ready in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
        calib = calibration(name, args.samples, args.seq, args.cache)
        rows.append(bench(name, model, calib, args.sparsity, args.extra))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
