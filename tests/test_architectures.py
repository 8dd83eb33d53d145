"""Real exported architectures (fixtures/arch/, made by fixtures/export_architectures.py; no torch needed here).

For each: the committed file is valid and small; the structured-pruning oracle (masked vs removed, two random
channel choices) agrees to 1e-5; ``--structured --sparsity 0.5`` gives a model that passes the full checker, runs
in onnxruntime with the same output names and shapes, and has fewer params and MACs; the share of frozen channels
is recorded (``record_property``) and held under a per-architecture limit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune

from .conftest import FIXTURES

ARCH_DIR = FIXTURES / "arch"
ARCH = sorted(p.stem for p in ARCH_DIR.glob("*.onnx"))
EXPECTED = {"resnet18", "resnet50", "mobilenetv2", "mobilenetv3", "efficientnet_b0", "densenet121", "regnet",
            "convnext", "unet", "yolo", "nhwc_tf"}
#: committed fixtures stay small (see fixtures/export_architectures.py)
MAX_BYTES = 1_500_000
#: frozen share of channels (graph-output channels excluded) an architecture must stay under, with the reason;
#: every other architecture: 10 %
FROZEN_LIMITS = {
    "convnext": 0.30,  # LayerNormalization over channels ties the residual stream (see docs/structured.md)
}


def structured():
    """The structured pass and its oracle helpers, or a skip while they are not available."""
    try:
        from onnxprune.passes.structured import StructuredPrunePass  # noqa: F401

        from . import oracle
    except ImportError as exc:
        pytest.skip(f"structured pruning not available: {exc}")
    return oracle


def feeds(session: ort.InferenceSession, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else batch for d in i.shape]).astype(np.float32)
            for i in session.get_inputs()}


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def test_all_architectures_present():
    assert set(ARCH) >= EXPECTED


@pytest.mark.parametrize("name", ARCH)
def test_fixture_is_valid_and_small(name):
    path = ARCH_DIR / f"{name}.onnx"
    assert path.stat().st_size < MAX_BYTES
    model = onnx.load(str(path))
    assert model.ir_version <= 9
    onnx.checker.check_model(model, full_check=True)
    sess = session(str(path))
    assert all(np.isfinite(o).all() for o in sess.run(None, feeds(sess)))


@pytest.mark.parametrize("name", ARCH)
def test_oracle(name):
    oracle = structured()
    path = ARCH_DIR / f"{name}.onnx"
    model = onnx.load(str(path))
    inputs = feeds(session(str(path)))
    original = session(model).run(None, inputs)
    for seed in (0, 1):
        choice = oracle.random_choice(model, 0.5, seed)
        assert choice
        masked, removed = oracle.masked_and_removed(model, choice)
        masked_out = session(masked).run(None, inputs)
        assert oracle.relative_error(original, masked_out) > 1e-4  # the choice changes the outputs
        assert oracle.relative_error(masked_out, session(removed).run(None, inputs)) <= 1e-5


@pytest.mark.parametrize("name", ARCH)
def test_structured_prune(name, record_property):
    structured()
    path = ARCH_DIR / f"{name}.onnx"
    pruned, result = onnxprune.prune(path, structured=True, sparsity=0.5, validate=onnxprune.ValidateConfig(runs=2))
    onnx.checker.check_model(pruned, full_check=True)

    before, after = session(str(path)), session(pruned)
    inputs = feeds(before)
    assert [o.name for o in after.get_outputs()] == [o.name for o in before.get_outputs()]
    assert [o.name for o in after.get_inputs()] == [i.name for i in before.get_inputs()]
    for a, b in zip(before.run(None, inputs), after.run(None, inputs)):
        assert a.shape == b.shape
        assert np.isfinite(b).all()

    report = result.to_dict()
    stats = report["validation"]["model"]
    assert stats["pruned"]["params"] < stats["original"]["params"]
    assert stats["pruned"]["macs"] < 0.8 * stats["original"]["macs"]
    assert all(o["same_shape"] for o in report["validation"]["providers"]["CPUExecutionProvider"]["outputs"].values())

    details = report["passes"][0]["details"]
    assert details["channels_removed"] > 0
    assert all(f["reason"] for f in details["frozen"])
    at_outputs = sum(f["channels"] for f in details["frozen"] if f["reason"].startswith("reaches graph output"))
    share = (details["channels_frozen"] - at_outputs) / max(1, details["channels_total"] - at_outputs)
    record_property("frozen_share", round(share, 4))
    record_property("macs_kept", round(stats["pruned"]["macs"] / stats["original"]["macs"], 4))
    assert share <= FROZEN_LIMITS.get(name, 0.10), (name, share, sorted({f["reason"] for f in details["frozen"]}))
