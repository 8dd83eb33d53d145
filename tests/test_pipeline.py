"""The pipeline's contracts: typed pass context and results, configs that are never mutated, the sensitivity API
that the CLI calls, progress through ``logging``."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.accuracy import load_eval_data
from onnxprune.api import build_passes, sensitivity
from onnxprune.config import PruneConfig, ValidateConfig
from onnxprune.errors import InputDataError, UsageError, flag
from onnxprune.feeds import input_specs, load_data, prepare_feeds, resolve_inputs
from onnxprune.graph import count_params
from onnxprune.passes import PassContext, PassManager
from onnxprune.passes import structured as structured_pass
from onnxprune.report_files import check_report_path

from .conftest import FIXTURES, run_cli


def test_validate_leaves_the_config_as_given():
    config = PruneConfig(structured=True, reconstruct=True, calibration_data="calib.npz", sparsity=0.5)
    before = copy.deepcopy(config)
    resolved = config.validate()
    assert config == before and config.criterion is None  # the default criterion is resolved in a new config
    assert resolved is not config and resolved.criterion == "reconstruction"
    assert PruneConfig(sparsity=0.5).validate().criterion == "l1"


def test_errors_carry_the_option_and_the_cli_spells_the_flag(tmp_path):
    """Core errors name settings by field and carry the value; the command words them with its flags."""
    with pytest.raises(UsageError) as caught:
        PruneConfig(sparsity=0.5, max_layer_sparsity=1.5).validate()
    assert caught.value.options == ("max_layer_sparsity",) and caught.value.value == 1.5
    assert str(caught.value) == "max_layer_sparsity must be in (0, 1), got 1.5"
    with pytest.raises(UsageError) as caught:
        PruneConfig(structured=True, sparsity=0.5, criterion="activation").validate()
    assert caught.value.options == ("criterion", "calibration_data") and caught.value.value == "activation"
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.5", "--max-layer-sparsity", "1.5",
                           "-o", tmp_path / "out.onnx")
    assert code == 2 and err.strip() == "onnxprune: error: --max-layer-sparsity must be in (0, 1), got 1.5"
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.5", "--criterion", "activation",
                           "-o", tmp_path / "out.onnx")
    assert code == 2 and err.strip() == "onnxprune: error: --criterion activation needs --calibration-data"
    assert not (tmp_path / "out.onnx").exists()


def test_input_errors_name_settings_and_the_cli_spells_their_flags(tmp_path):
    """Feeds, labelled data and report paths: the API's message names the setting, the command's its flag."""
    specs = input_specs(onnx.load(str(FIXTURES / "cnn.onnx")))
    cases = []
    for call in (lambda: load_data(tmp_path / "missing.npz", specs),
                 lambda: resolve_inputs(onnx.load(str(FIXTURES / "cnn.onnx")), {"nosuch": [1, 3, 32, 32]}),
                 lambda: check_report_path(tmp_path / "r.txt")):
        with pytest.raises(UsageError) as caught:
            call()
        cases.append(caught.value)
    np.savez(tmp_path / "eval.npz", **{specs[0].name: np.zeros([2, 3, 32, 32], np.float32)})
    with pytest.raises(InputDataError) as caught:
        load_eval_data(str(tmp_path / "eval.npz"), specs)
    cases.append(caught.value)
    assert [e.options for e in cases] == [("data",), ("input_shapes",), ("report",), ("eval_data",)]
    assert [str(e).split(" ")[0] for e in cases] == ["data", "input_shapes", "report", "eval_data"]
    assert [e.render(flag).split(" ")[0] for e in cases] == ["--data", "--input-shape", "--report", "--eval-data"]
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.5", "--input-shape", "nosuch:1x3x32x32",
                           "-o", tmp_path / "out.onnx")
    assert code == 8 and "onnxprune: error: --input-shape names unknown input 'nosuch'" in err


def test_the_config_is_validated_once_on_the_command_path(tmp_path, monkeypatch):
    """The CLI validates its config before claiming outputs; ``prune`` runs that config without checking it again,
    but checks a config that was changed after validation (or never validated)."""
    calls = []
    check = PruneConfig._check
    monkeypatch.setattr(PruneConfig, "_check", lambda self: calls.append(self) or check(self))
    code, _, _ = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.5", "-o", tmp_path / "o.onnx",
                         "--no-validate", "-q")
    assert code == 0 and len(calls) == 1
    config = PruneConfig(structured=True, sparsity=0.5).validate()
    assert config.checked() is config and len(calls) == 2
    config.exclude.append("conv1*")  # changed in place after validation: checked again
    assert config.checked() is not config and len(calls) == 3
    config.sparsity = 1.5
    with pytest.raises(UsageError):
        onnxprune.prune(FIXTURES / "cnn.onnx", config=config)


@pytest.mark.parametrize("options", [{"sparsity": 0.5}, {"target_macs": 0.6}])
def test_prune_leaves_the_callers_config_as_given(options):
    """A target allocation runs a new config carrying per-group overrides; the caller's object stays unchanged."""
    config = PruneConfig(structured=True, **options)
    before = copy.deepcopy(config)
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", config=config)
    assert config == before
    assert result.config is not config and result.config.criterion == "l1"
    if "target_macs" in options:
        assert result.config.overrides and result.config.sparsity == 0.0


def test_structured_pipeline_passes_and_typed_context():
    """Preparation and cleanup run as passes around the structured pass; the report lists the pruning pass."""
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    config = PruneConfig(structured=True, sparsity=0.5).validate()
    passes = build_passes(config)
    assert [p.name for p in passes] == ["preparation", "structured", "cleanup"]
    ctx = PassContext(model=model, input_shapes={})
    results = PassManager(passes).run(ctx)
    assert [(r.name, r.reported) for r in results] == [("preparation", False), ("structured", True),
                                                         ("cleanup", False)]
    structured = results[1]
    assert structured.modified and structured.details["channels_removed"] > 0
    assert not results[2].modified  # the structured pass left no dead node behind
    onnx.checker.check_model(ctx.model, full_check=True)
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", config=config)
    assert [p["name"] for p in result.to_dict()["passes"]] == ["structured"]


def test_the_structured_pipeline_prepares_the_model_once(monkeypatch):
    """The preparation pass prepares the graph; the structured pass after it does not fold shape reads again (a
    second symbolic shape inference of the whole model), but still prepares a model when it runs alone."""
    calls = []
    fold = structured_pass.fold_static_shape_reads
    monkeypatch.setattr(structured_pass, "fold_static_shape_reads", lambda model: calls.append(1) or fold(model))
    config = PruneConfig(structured=True, sparsity=0.5).validate()
    ctx = PassContext(model=onnx.load(str(FIXTURES / "cnn.onnx")))
    PassManager(build_passes(config)).run(ctx)
    assert ctx.prepared and len(calls) == 1
    alone = PassContext(model=onnx.load(str(FIXTURES / "cnn.onnx")))
    assert structured_pass.StructuredPrunePass(config).run(alone).modified and len(calls) == 2


@pytest.mark.parametrize("structured", [True, False])
def test_reconstruction_is_a_pass_after_the_pruning_pass(structured):
    """``reconstruct``: the pruning pass records its choice on the context, the reconstruction pass (bookkeeping, not
    listed in the report) refits those layers and fills the pruning pass's ``reconstruction`` details."""
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    calibration = [prepare_feeds(model, ValidateConfig(input_shapes={"input": [4, 3, 32, 32]}, seed=s))[0]
                   for s in range(2)]
    config = PruneConfig(structured=structured, sparsity=0.5, reconstruct=True, repair=None if structured else "rowwise",
                         calibration_data="batches in the pass context").validate()  # OBS repair needs no refit
    passes = build_passes(config)
    pruning = "structured" if structured else "unstructured"
    expected = ["preparation", "structured", "reconstruction", "cleanup"] if structured else \
        ["unstructured", "reconstruction"]
    assert [p.name for p in passes] == expected
    ctx = PassContext(model=model, input_shapes={"input": [4, 3, 32, 32]}, calibration=calibration)
    results = {r.name: r for r in PassManager(passes).run(ctx)}
    assert ctx.reconstruction is None  # consumed
    assert not results["reconstruction"].reported and results["reconstruction"].modified
    refit = results[pruning].details["reconstruction"]
    assert refit is not None and refit["layers"]
    assert results["reconstruction"].details["layers"] == refit["layers"] + len(refit["skipped"])
    if structured:  # the refit may add biases: the counts in the structured pass's report are taken after it
        details = results["structured"].details
        assert details["params_after"] == count_params(ctx.model)[0]
        assert details["params_removed"] == details["params_before"] - details["params_after"]
    onnx.checker.check_model(ctx.model, full_check=True)
    assert [p.name for p in build_passes(replace(config, reconstruct=False))] == [
        n for n in expected if n != "reconstruction"]


def test_sensitivity_api_matches_the_command(tmp_path):
    """``onnxprune sensitivity`` is the API call: the same measurements, group by group."""
    data = sensitivity(FIXTURES / "cnn.onnx", ratios=(0.25, 0.5), criterion="l2")
    code, _, err = run_cli("sensitivity", FIXTURES / "cnn.onnx", "--ratios", "0.25,0.5", "--criterion", "l2",
                           "--json", tmp_path / "s.json", "-q")
    assert code == 0, err
    assert json.loads(json.dumps(data, default=str)) == json.loads((tmp_path / "s.json").read_text())
    assert data["groups"] and all([p["ratio"] for p in g["points"]] == [0.25, 0.5] for g in data["groups"])
    first = data["groups"][0]["points"]
    assert first[1]["channels_removed"] > first[0]["channels_removed"] > 0
    assert first[1]["macs_saved"] > first[0]["macs_saved"] > 0


def test_sensitivity_api_refuses_bad_options():
    with pytest.raises(UsageError, match="not available here"):
        sensitivity(FIXTURES / "cnn.onnx", criterion="obs")


def test_progress_goes_through_logging(caplog):
    """The passes log through ``logging`` (logger ``onnxprune``); ``prune(log=...)`` still receives the lines."""
    lines: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="onnxprune"):
        onnxprune.prune(FIXTURES / "cnn.onnx", structured=True, sparsity=0.5, log=lines.append)
    assert "pass 1/1: structured" in lines and "analysing channel groups" in lines
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("onnxprune")]
    assert [line for line in logged if line in lines] == lines
    assert "preparation pass" in logged  # bookkeeping passes log at debug level only
    assert "preparation pass" not in lines


def test_cli_prints_progress_lines_unless_quiet(tmp_path):
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.5", "-o", tmp_path / "a.onnx", "--runs", "1",
                           "--warmup", "0")
    assert code == 0, err
    assert "] pass 1/1: unstructured" in err and "] loading model" in err
    code, out, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.5", "-o", tmp_path / "b.onnx", "-q")
    assert code == 0 and out == "" and err == ""
    assert np.array_equal(*(onnx.numpy_helper.to_array(onnx.load(str(tmp_path / n)).graph.initializer[0])
                            for n in ("a.onnx", "b.onnx")))
