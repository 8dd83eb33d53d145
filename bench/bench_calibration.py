"""Accuracy without retraining on a trained CNN: magnitude vs activation-aware scoring vs repair.

    pip install -e ".[bench]" scikit-learn
    python bench/bench_calibration.py [--json out.json]

Trains a 3-conv CNN on scikit-learn's digits (8x8 images, 10 classes; 1,437 train / 360 test,
seeded), exports it to ONNX, and prunes it with onnxprune under several settings, measuring
top-1 on the held-out test set through ``--eval-data`` (which ``--target-macs`` also uses to
allocate by lost accuracy). Calibration: 256 training images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def train(out: Path) -> tuple[Path, Path, Path]:
    """Train the CNN, export it, write calibration and evaluation data; return their paths."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.2, random_state=0,
                                                        stratify=digits.target)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.int64))
    for _ in range(40):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    path = out / "digits_cnn.onnx"
    torch.onnx.export(model, (torch.from_numpy(x_test[:1]),), str(path), opset_version=17, dynamo=False,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    np.savez(out / "calib.npz", input=x_train[:256])
    np.savez(out / "val.npz", input=x_test, labels=y_test.astype(np.int64))
    return path, out / "calib.npz", out / "val.npz"


def run(model: Path, out: Path, val: Path, *args: str) -> dict:
    report = out / "report.json"
    cmd = [sys.executable, "-m", "onnxprune", str(model), "-o", str(out / "pruned.onnx"), "--force", "-q",
           "--eval-data", str(val), "--runs", "5", "--report", str(report), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    data = json.loads(report.read_text())
    v = data["validation"]
    return {"top1": v["accuracy"]["pruned"]["top1"], "original_top1": v["accuracy"]["original"]["top1"],
            "macs_kept": v["model"]["pruned"]["macs"] / v["model"]["original"]["macs"],
            "rel_l2": v["worst"]["rel_l2"]}


SETTINGS = [
    ("structured 50%, L1 magnitude", ["--structured", "--sparsity", "0.5", "--no-fold-constants"]),
    ("structured 50%, L1 + bias folding", ["--structured", "--sparsity", "0.5"]),
    ("structured 50%, L1 + --reconstruct", ["--structured", "--sparsity", "0.5", "--reconstruct"]),
    ("structured 50%, activation + --reconstruct", ["--structured", "--sparsity", "0.5", "--criterion", "activation",
                                                    "--reconstruct"]),
    ("structured 75%, L1 magnitude", ["--structured", "--sparsity", "0.75", "--no-fold-constants"]),
    ("structured 75%, L1 + --reconstruct", ["--structured", "--sparsity", "0.75", "--reconstruct"]),
    ("structured 50%, L2 + --reconstruct", ["--structured", "--sparsity", "0.5", "--criterion", "l2", "--reconstruct"]),
    ("structured 75%, L2 + --reconstruct", ["--structured", "--sparsity", "0.75", "--criterion", "l2", "--reconstruct"]),
    ("structured 75%, BN scale + --reconstruct", ["--structured", "--sparsity", "0.75", "--criterion", "bn",
                                                  "--reconstruct"]),
    ("unstructured 70%, magnitude (per layer)", ["--sparsity", "0.7"]),
    ("unstructured 70%, activation (Wanda)", ["--sparsity", "0.7", "--criterion", "activation"]),
    ("unstructured 70%, activation + --reconstruct", ["--sparsity", "0.7", "--criterion", "activation", "--reconstruct"]),
    ("unstructured 70%, magnitude + --reconstruct", ["--sparsity", "0.7", "--reconstruct"]),
    ("structured --target-macs 0.5", ["--structured", "--target-macs", "0.5"]),
    ("structured --target-macs 0.5 + --reconstruct", ["--structured", "--target-macs", "0.5", "--reconstruct"]),
    ("structured --target-macs 0.253 (the MACs of 50% uniform) + --reconstruct",
     ["--structured", "--target-macs", "0.253", "--reconstruct"]),
    ("structured --target-macs 0.5, L2 + --reconstruct",
     ["--structured", "--target-macs", "0.5", "--reconstruct", "--criterion", "l2"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        model, calib, val = train(out)
        rows = []
        for label, extra in SETTINGS:
            row = {"setting": label, **run(model, out, val, "--calibration-data", str(calib), *extra)}
            rows.append(row)
            print(row, file=sys.stderr)
        # uniform structured ratio with no fewer MACs removed than --target-macs 0.5, for comparison
        for sparsity in (0.3, 0.35, 0.4, 0.45, 0.5):
            row = run(model, out, val, "--calibration-data", str(calib), "--structured", "--sparsity", str(sparsity))
            target_row = next(r for r in rows if r["setting"] == "structured --target-macs 0.5")
            if "macs_kept" in row and row["macs_kept"] <= target_row.get("macs_kept", 0) + 1e-9:
                rows.append({"setting": f"structured uniform {sparsity:.2f} (same MACs budget)", **row})
                break
        # the same comparison with repair on both sides: the largest uniform ratio that keeps no fewer MACs
        target_row = next(r for r in rows if r["setting"] == "structured --target-macs 0.5 + --reconstruct")
        best = None
        for sparsity in (0.26, 0.28, 0.3, 0.32, 0.34):
            row = run(model, out, val, "--calibration-data", str(calib), "--structured", "--sparsity", str(sparsity),
                      "--reconstruct")
            if "macs_kept" in row and row["macs_kept"] >= target_row.get("macs_kept", 1) - 1e-9:
                best = {"setting": f"structured uniform {sparsity:.2f} + --reconstruct (no fewer MACs kept)", **row}
        if best:
            rows.append(best)
    original = next(r["original_top1"] for r in rows if "original_top1" in r)
    print(f"original top-1: {100 * original:.2f}%\n")
    print("| setting | MACs kept | top-1 | rel. L2 of logits |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['setting']} | fails: {r['error']} | | |")
        else:
            print(f"| {r['setting']} | {r['macs_kept']:.3f} | {100 * r['top1']:.2f}% | {r['rel_l2']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
