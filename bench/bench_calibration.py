"""Accuracy without retraining on trained models: magnitude vs activation-aware scoring vs repair.

    pip install -e ".[bench]" && pip install --no-deps torch-pruning
    python bench/bench_calibration.py [--json out.json] [--skip-torch-pruning]

Models: the trained fixtures of fixtures/build_trained.py (scikit-learn digits; 1,437 training /
360 test images): a residual CNN with BatchNorm and a small transformer classifier (8 tokens of
8 pixels, 2 encoder layers, 4 heads). Calibration: 256 training images (``--calibration-data``);
accuracy: the 360 test images through ``--eval-data`` (top-1 of original and pruned, same run).

Rows: structured 25/50/75 % of channels (plain L1 magnitude, + bias folding, activation-aware
selection, + ``--reconstruct`` with its default least-squares-aware selection and with L1
selection), ``--target-macs 0.5`` against uniform allocation, unstructured 50/70/90 % and 2:4
(magnitude, activation/Wanda, + row-wise least-squares repair) on both models, and Torch-Pruning's
L1 pruning of the same trained CNN (retrained here with the fixture script's seed; no fine-tuning).
The tool cost of calibration: wall time and peak RSS of the onnxprune process with and without it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRAINED = ROOT / "fixtures" / "trained"
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(HERE))

CNN = (TRAINED / "digits_cnn.onnx", TRAINED / "digits_calib.npz", TRAINED / "digits_val.npz")
TRANSFORMER = (TRAINED / "digits_transformer.onnx", TRAINED / "digits_seq_calib.npz", TRAINED / "digits_seq_val.npz")


def run(files: tuple[Path, Path, Path], out: Path, *args: str, calibrate: bool = True) -> dict:
    """One onnxprune run: top-1 of original and pruned on the test set, MACs kept, rel. L2 of the logits."""
    model, calib, val = files
    report = out / "report.json"
    cmd = [sys.executable, "-m", "onnxprune", str(model), "-o", str(out / "pruned.onnx"), "--force", "-q",
           "--eval-data", str(val), "--runs", "3", "--report", str(report), *args]
    if calibrate:
        cmd += ["--calibration-data", str(calib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    data = json.loads(report.read_text())
    v = data["validation"]
    return {"top1": v["accuracy"]["pruned"]["top1"], "original_top1": v["accuracy"]["original"]["top1"],
            "macs_kept": v["model"]["pruned"]["macs"] / v["model"]["original"]["macs"],
            "rel_l2": v["worst"]["rel_l2"]}


def structured_rows(out: Path) -> list[tuple[str, dict]]:
    rows = []
    for s in ("0.25", "0.5", "0.75"):
        pct = f"{round(float(s) * 100)}%"
        base = ["--structured", "--sparsity", s]
        rows += [
            (f"CNN structured {pct}, L1 magnitude", run(CNN, out, *base, "--no-fold-constants", calibrate=False)),
            (f"CNN structured {pct}, L1 + bias folding", run(CNN, out, *base)),
            (f"CNN structured {pct}, activation-aware selection", run(CNN, out, *base, "--criterion", "activation")),
            (f"CNN structured {pct}, L1 + `--reconstruct`", run(CNN, out, *base, "--reconstruct", "--criterion", "l1")),
            (f"CNN structured {pct}, `--reconstruct` (default: selection for repair)", run(CNN, out, *base,
                                                                                            "--reconstruct")),
        ]
    return rows


def target_rows(out: Path) -> list[tuple[str, dict]]:
    rows = [("CNN `--target-macs 0.5`", run(CNN, out, "--structured", "--target-macs", "0.5")),
            ("CNN `--target-macs 0.5` + `--reconstruct`", run(CNN, out, "--structured", "--target-macs", "0.5",
                                                              "--reconstruct")),
            ("CNN `--target-macs 0.253` (the MACs of 50% uniform) + `--reconstruct`",
             run(CNN, out, "--structured", "--target-macs", "0.253", "--reconstruct"))]
    for s in ("0.28", "0.3", "0.32", "0.34"):  # uniform ratios around the same MACs, no repair
        rows.append((f"CNN uniform {s}, no repair", run(CNN, out, "--structured", "--sparsity", s)))
    target = rows[1][1].get("macs_kept", 0.5)
    best = None  # the largest uniform ratio that keeps no fewer MACs than the allocated run
    for s in ("0.2", "0.22", "0.24", "0.26", "0.28", "0.3", "0.32", "0.34"):
        row = run(CNN, out, "--structured", "--sparsity", s, "--reconstruct")
        if "macs_kept" in row and row["macs_kept"] >= target - 1e-9:
            best = (f"CNN uniform {s} + `--reconstruct` (no fewer MACs kept)", row)
    return rows + ([best] if best else [])


def unstructured_rows(out: Path) -> list[tuple[str, dict]]:
    rows = []
    for label, files in (("CNN", CNN), ("transformer", TRANSFORMER)):
        for setting in (["--sparsity", "0.5"], ["--sparsity", "0.7"], ["--sparsity", "0.9"], ["--pattern", "2:4"]):
            what = f"{setting[1]} " + ("sparsity" if setting[0] == "--sparsity" else "pattern")
            rows += [
                (f"{label} unstructured {what}, magnitude", run(files, out, *setting, calibrate=False)),
                (f"{label} unstructured {what}, activation (Wanda)", run(files, out, *setting, "--criterion",
                                                                        "activation")),
                (f"{label} unstructured {what}, magnitude + `--reconstruct`", run(files, out, *setting,
                                                                                 "--reconstruct")),
                (f"{label} unstructured {what}, activation + `--reconstruct`", run(files, out, *setting, "--criterion",
                                                                                  "activation", "--reconstruct")),
            ]
    rows.append(("transformer structured 50% neurons + 25% heads", run(
        TRANSFORMER, out, "--structured", "--sparsity", "0.5", "--head-sparsity", "0.25", calibrate=False)))
    rows.append(("transformer structured 50% neurons + 25% heads, `--reconstruct`", run(
        TRANSFORMER, out, "--structured", "--sparsity", "0.5", "--head-sparsity", "0.25", "--reconstruct")))
    return rows


def torch_pruning_rows() -> list[tuple[str, dict]]:
    """Torch-Pruning's L1 magnitude pruning of the same trained CNN, no fine-tuning."""
    import build_trained
    import torch
    import torch_pruning as tp

    x_train, x_test, y_train, y_test = build_trained.digits()
    rows = []
    for ratio in (0.25, 0.5, 0.75):
        model = build_trained.models()["digits_cnn"][0]
        torch.manual_seed(0)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        build_trained.train(model, x_train[:, None], y_train, 40)
        x = torch.from_numpy(x_test[:, None])
        with torch.no_grad():
            original = float((model(x).argmax(1).numpy() == y_test).mean())
            macs_before = tp.utils.count_ops_and_params(model, x[:1])[0]
        pruner = tp.pruner.MagnitudePruner(model, x[:1], importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[model.head])
        pruner.step()
        with torch.no_grad():
            top1 = float((model(x).argmax(1).numpy() == y_test).mean())
            macs_after = tp.utils.count_ops_and_params(model, x[:1])[0]
        rows.append((f"CNN Torch-Pruning L1 {round(ratio * 100)}% (no fine-tuning)",
                     {"top1": top1, "original_top1": original, "macs_kept": macs_after / macs_before, "rel_l2": None}))
    return rows


def tool_cost() -> list[dict]:
    """Wall time and peak RSS of onnxprune on the CNN with and without calibration repair."""
    from benchlib import child_cost

    model, calib, _ = CNN
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "o.onnx")
        for label, extra in (("structured 50%", []),
                             ("structured 50% + calibration + `--reconstruct`", ["--calibration-data", str(calib),
                                                                                 "--reconstruct"])):
            cost = child_cost([sys.executable, "-m", "onnxprune", str(model), "--structured", "--sparsity",
                               "0.5", "--no-validate", "-o", out, "--force", "-q", *extra])
            rows.append({"setting": label, "seconds": cost.seconds, "peak_rss": cost.peak_rss})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-torch-pruning", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows = structured_rows(out) + target_rows(out) + unstructured_rows(out)
    if not args.skip_torch_pruning:
        try:
            rows += torch_pruning_rows()
        except Exception as exc:  # noqa: BLE001 - a failure is a result
            rows.append(("CNN Torch-Pruning", {"error": f"{type(exc).__name__}: {exc}"[:200]}))
    cost = tool_cost()
    originals = {label.split()[0]: r["original_top1"] for label, r in rows if "original_top1" in r}
    print("original top-1: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in originals.items()) + "\n")
    print("| setting | MACs kept | top-1 | rel. L2 of logits |\n|---|---|---|---|")
    for label, r in rows:
        if "error" in r:
            print(f"| {label} | fails: {r['error']} | | |")
        else:
            rel = f"{r['rel_l2']:.3f}" if r.get("rel_l2") is not None else "-"
            print(f"| {label} | {r['macs_kept']:.3f} | {100 * r['top1']:.2f}% | {rel} |")
    print("\n| CNN, `--no-validate` | wall time | peak RSS |\n|---|---|---|")
    for r in cost:
        print(f"| {r['setting']} | {r['seconds']:.2f} s | {r['peak_rss'] / 2**20:.0f} MiB |")
    if args.json:
        args.json.write_text(json.dumps({"rows": [{"setting": k, **v} for k, v in rows], "cost": cost}, indent=2))


if __name__ == "__main__":
    main()
