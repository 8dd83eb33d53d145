"""An op rule that fails with anything but ``Freeze`` is a bug: named as one in the report, raised under --debug
and in tests (conftest sets ONNXPRUNE_RAISE_RULE_ERRORS=1)."""

from __future__ import annotations

import json
import os

import onnx
import pytest

from onnxprune.analysis import registry
from onnxprune.analysis.groups import analyse, build_groups

from .conftest import FIXTURES, run_cli


@pytest.fixture
def broken_relu(monkeypatch):
    """The Relu rule replaced by one with a bug (an index past the end of the node's inputs)."""

    def relu_rule(a, node):
        return node.input[5]

    monkeypatch.setitem(registry.RULES, "Relu", relu_rule)


def test_tests_run_with_rule_errors_raised():
    assert os.environ.get(registry.RAISE_ENV) == "1"


def test_rule_bug_raises_in_tests(broken_relu):
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    with pytest.raises(IndexError):
        analyse(model)


def test_rule_bug_is_reported_as_internal_error(broken_relu, monkeypatch, tmp_path):
    monkeypatch.delenv(registry.RAISE_ENV)
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    reasons = {reason for g in build_groups(analyse(model)) for _, reason in g.frozen_units}
    assert any(r.startswith("internal error in rule relu_rule at Relu ") and "IndexError" in r for r in reasons)
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.5", "-o", tmp_path / "o.onnx",
                           "--report", tmp_path / "r.json", "--no-validate", "-q")
    assert code == 0, err
    frozen = json.loads((tmp_path / "r.json").read_text())["passes"][0]["details"]["frozen"]
    assert any(f["reason"].startswith("internal error in rule relu_rule") for f in frozen)


def test_rule_bug_raises_under_debug(broken_relu, monkeypatch, tmp_path):
    monkeypatch.delenv(registry.RAISE_ENV)
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.5", "-o", tmp_path / "o.onnx",
                           "--no-validate", "--debug")
    assert code == 1
    assert "Traceback" in err and "IndexError" in err and "internal error (a bug in onnxprune)" in err
    assert not (tmp_path / "o.onnx").exists()
    model = onnx.load(str(FIXTURES / "cnn.onnx"))  # --debug ended with its run: the same bug freezes again
    assert any(reason.startswith("internal error in rule relu_rule") for g in build_groups(analyse(model))
               for _, reason in g.frozen_units)
