"""Time of structured ``--reconstruct`` by stage: activation capture, Gram matrices, channel selection, refit.

Runs ``onnxprune.prune(MODEL, structured=True, sparsity=S, reconstruct=True, calibration_data=...)`` (the default
criterion with --reconstruct is ``reconstruction``: greedy OBS-block selection, then least-squares refit) and
splits its time by wrapping the stage functions of ``onnxprune.scoring`` / ``onnxprune.compensation``:

- capture: onnxruntime session creation and ``run`` calls made by selection and refit;
- gram: building the selection Gram matrices (``_consumer_grams``) minus its capture;
- selection: greedy elimination (``_greedy_order``);
- refit: ``reconstruct`` minus its capture.

Wall and CPU time (``time.process_time``: the machine is shared, CPU time is the stable figure) per stage.

    python bench/bench_reconstruct.py [--models digits,resnet18,resnet50,resnet18-224] [--samples 32] [--json out.json]
    python bench/bench_reconstruct.py --model path/to/model.onnx --calibration calib.npz [--sparsity 0.3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxprune
from onnxprune import compensation, scoring

BUILTIN = {
    "digits": (ROOT / "fixtures/trained/digits_cnn.onnx", None, 0.5),
    "resnet18": (ROOT / "fixtures/arch/resnet18.onnx", (3, 64, 64), 0.3),
    "resnet50": (ROOT / "fixtures/arch/resnet50.onnx", (3, 64, 64), 0.3),
    "resnet18-224": (ROOT / "bench/models/resnet18_full.onnx", (3, 224, 224), 0.3),  # built on first use
}


def resnet18_full(path: Path) -> Path:
    """A ResNet-18-sized network (widths 64-512, 224² input, He-initialised convs with biases, 1000 logits)
    built with onnx.helper, written to ``path`` (reused when present)."""
    import onnx
    from onnx import helper, numpy_helper

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, name, relu=True):
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"),
                      numpy_helper.from_array(rng.normal(0, 0.05, cout).astype(np.float32), f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        if not relu:
            return f"{name}.y"
        nodes.append(helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    x = conv("input", 3, 64, 7, 2, "stem")
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = "pool", 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage and not block else 1
            name = f"s{stage}b{block}"
            y = conv(conv(x, cin, cout, 3, stride, f"{name}.c1"), cout, cout, 3, 1, f"{name}.c2", relu=False)
            skip = conv(x, cin, cout, 1, stride, f"{name}.down", relu=False) if stride > 1 or cin != cout else x
            nodes.append(helper.make_node("Add", [y, skip], [f"{name}.sum"]))
            nodes.append(helper.make_node("Relu", [f"{name}.sum"], [f"{name}.out"]))
            x, cin = f"{name}.out", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits.append(numpy_helper.from_array((rng.standard_normal((1000, 512)) * 0.04).astype(np.float32), "fc.w"))
    inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc.b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet18_full",
                              [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


class Clock:
    """Wall and CPU seconds accumulated per stage; nested stages are subtracted from their parent."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.stack: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
            self.wall[name] = self.wall.get(name, 0.0) + wall
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu
            if self.stack:  # time of a nested stage is not its parent's own time
                parent = self.stack[-1]
                self.wall[parent] = self.wall.get(parent, 0.0) - wall
                self.cpu[parent] = self.cpu.get(parent, 0.0) - cpu


def instrument(clock: Clock) -> None:
    """Wrap the stage functions (names present in every version of onnxprune that has --reconstruct)."""
    def wrap(owner, attr, stage):
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            with clock.stage(stage):
                return original(*args, **kwargs)
        setattr(owner, attr, wrapped)

    wrap(scoring, "ConsumerGrams" if hasattr(scoring, "ConsumerGrams") else "_consumer_grams", "gram")  # the capture
    wrap(scoring, "_greedy_order", "selection")
    wrap(compensation, "reconstruct", "refit")
    from onnxprune.passes import structured
    structured.reconstruct = compensation.reconstruct
    session_init = ort.InferenceSession.__init__

    def init(self, *args, **kwargs):
        if clock.stack:
            with clock.stage("capture"):
                return session_init(self, *args, **kwargs)
        return session_init(self, *args, **kwargs)
    ort.InferenceSession.__init__ = init
    session_run = ort.InferenceSession.run

    def run(self, *args, **kwargs):
        if clock.stack:
            with clock.stage("capture"):
                return session_run(self, *args, **kwargs)
        return session_run(self, *args, **kwargs)
    ort.InferenceSession.run = run


def calibration_for(name: str, model: Path, shape, samples: int, folder: Path) -> Path:
    """The trained fixture's own calibration file, else smooth random images (seeded) of ``shape``."""
    if name == "digits":
        return ROOT / "fixtures/trained/digits_calib.npz"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, *shape)).astype(np.float32)
    for axis in (2, 3):  # neighbouring pixels correlate, as in photos
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    path = folder / f"{name}_calib.npz"
    np.savez(path, input=x.astype(np.float32))
    return path


CLOCK = Clock()


def bench(name: str, model: Path, calibration: Path, sparsity: float) -> dict:
    clock = CLOCK
    clock.wall.clear()
    clock.cpu.clear()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    _, result = onnxprune.prune(model, structured=True, sparsity=sparsity, reconstruct=True,
                                calibration_data=str(calibration))
    total_wall, total_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    details = result.passes[0].details
    return {"model": name, "sparsity": sparsity, "total_wall_s": round(total_wall, 2),
            "total_cpu_s": round(total_cpu, 2),
            "stages_wall_s": {k: round(v, 2) for k, v in clock.wall.items()},
            "stages_cpu_s": {k: round(v, 2) for k, v in clock.cpu.items()},
            "layers_refit": details["reconstruction"]["layers"] if details.get("reconstruction") else 0,
            "macs_kept": round(details["macs_after"] / max(details["macs_before"], 1), 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,resnet18,resnet50")
    parser.add_argument("--model", type=Path, help="any model (then --calibration is required)")
    parser.add_argument("--calibration", type=Path)
    parser.add_argument("--sparsity", type=float)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    instrument(CLOCK)
    with tempfile.TemporaryDirectory() as folder:
        if args.model:
            rows.append(bench(args.model.stem, args.model, args.calibration, args.sparsity or 0.3))
        else:
            for name in args.models.split(","):
                path, shape, sparsity = BUILTIN[name]
                if name == "resnet18-224":
                    resnet18_full(path)
                calibration = calibration_for(name, path, shape, args.samples, Path(folder))
                rows.append(bench(name, path, calibration, args.sparsity or sparsity))
                print(json.dumps(rows[-1]), flush=True)
    if args.model:
        print(json.dumps(rows[-1]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
