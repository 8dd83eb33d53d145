"""SparseGPT-style repair (``--criterion obs``) against magnitude, Wanda and the row-wise refit.

    python bench/bench_obs.py [--json out.json]

Models: the trained fixtures of fixtures/build_trained.py (scikit-learn digits): the residual CNN,
the MLP and the transformer classifier. Calibration: 256 training images (digits_calib.npz /
digits_seq_calib.npz); evaluation: the 360 test images (digits_val.npz / digits_seq_val.npz),
disjoint from the calibration data. Settings: unstructured 50 %, 70 % and 2:4, per layer.

Rows: magnitude (l1), Wanda (``--criterion activation``), Wanda + row-wise least-squares refit
(``--reconstruct --repair rowwise``), magnitude + row-wise refit (``--repair rowwise`` alone), OBS
(``--criterion obs``: dense refit to the original layer output, then exact per-row OBS for layers
this small), OBS with the SparseGPT sweep for every layer (what layers above
``onnxprune.obs.EXACT_WORK`` get), and that sweep with the paper's objective (each layer keeps its
own output on the pruned model's inputs, no drift correction). The last two have no CLI switch:
the benchmark sets the module constant / builds the repair object itself. Figures:
top-1 on the test images (dense -> pruned), relative L2 of the logits against the dense model on
the same images, and the tool's wall time (``onnxprune.prune`` in this process, no validation).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxprune
from onnxprune import obs
from onnxprune.passes import unstructured

TRAINED = Path(__file__).resolve().parent.parent / "fixtures" / "trained"
MODELS = {"CNN": ("digits_cnn.onnx", "digits_calib.npz", "digits_val.npz"),
          "MLP": ("digits_mlp.onnx", "digits_calib.npz", "digits_val.npz"),
          "transformer": ("digits_transformer.onnx", "digits_seq_calib.npz", "digits_seq_val.npz")}
SETTINGS = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"pattern": "2:4"}}
METHODS = {"magnitude": {}, "Wanda": {"criterion": "activation"},
           "Wanda + refit": {"criterion": "activation", "reconstruct": True, "repair": "rowwise"},
           "magnitude + refit": {"criterion": "l1", "reconstruct": True, "repair": "rowwise"},
           "OBS": {"criterion": "obs"}, "OBS, SparseGPT sweep": {"criterion": "obs", "sweep": True},
           "OBS, SparseGPT sweep, paper objective": {"criterion": "obs", "sweep": True, "paper": True}}


def logits(model: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs})[0]


@contextmanager
def variant(sweep: bool, paper: bool):
    """OBS with the SparseGPT sweep for every layer and/or without the original model as reference."""
    build, exact = unstructured._obs_repair, obs.EXACT_WORK
    if paper:
        unstructured._obs_repair = lambda ctx, items, followers, original=None: obs.ObsRepair(
            ctx.model, items, ctx.calibration, reference=None)
    if sweep:
        obs.EXACT_WORK = 0
    try:
        yield
    finally:
        unstructured._obs_repair, obs.EXACT_WORK = build, exact


def run(model: str, calib: str, val: dict, setting: dict, method: dict, dense: np.ndarray) -> dict:
    options = {k: v for k, v in method.items() if k not in ("paper", "sweep")}
    config = onnxprune.PruneConfig(calibration_data=str(TRAINED / calib), **setting, **options)
    start = time.perf_counter()
    with variant(method.get("sweep", False), method.get("paper", False)):
        pruned, _ = onnxprune.prune(TRAINED / model, config=config)
    seconds = time.perf_counter() - start
    out = logits(pruned, val["input"])
    return {"top1": float((out.argmax(1) == val["labels"]).mean()), "seconds": seconds,
            "rel_l2": float(np.linalg.norm(out - dense) / np.linalg.norm(dense))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    rows = []
    print("| model | setting | method | top-1 dense -> pruned | rel. L2 of logits | tool time |")
    print("|---|---|---|---|---|---|")
    for label, (model, calib, val_file) in MODELS.items():
        val = dict(np.load(TRAINED / val_file))
        dense = logits(onnx.load(str(TRAINED / model)), val["input"])
        dense_top1 = float((dense.argmax(1) == val["labels"]).mean())
        for setting_label, setting in SETTINGS.items():
            for method_label in args.methods:
                method = METHODS[method_label]
                r = run(model, calib, val, setting, method, dense)
                rows.append({"model": label, "setting": setting_label, "method": method_label,
                             "dense_top1": dense_top1, **r})
                print(f"| {label} | {setting_label} | {method_label} | {100 * dense_top1:.2f} -> "
                      f"{100 * r['top1']:.2f}% | {r['rel_l2']:.3f} | {r['seconds']:.2f} s |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
