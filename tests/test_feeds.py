"""Synthetic inputs that run the original model (onnxprune/feeds.py), and ``inspect`` analysing at prune's shapes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.config import ValidateConfig
from onnxprune.feeds import MAX_TRIALS, input_specs, integer_rules, prepare_feeds, resolve_inputs

from .conftest import FIXTURES, run_cli

FEEDS = FIXTURES / "feeds"
FAST = ("--runs", "2", "--warmup", "1")


def runs(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> bool:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    source = model if isinstance(model, str) else model.SerializeToString()
    try:
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception:  # noqa: BLE001 - the point: which inputs the model refuses
        return False
    return True


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(FEEDS / f"{name}.onnx"))


def small_model(nodes, inputs, outputs, inits=(), opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


# -- the failure classes, reproduced by the fixtures ---------------------------------------------------------------


def test_detector_runs_only_at_multiples_of_32():
    path = str(FEEDS / "detector32.onnx")
    assert [runs(path, {"images": np.zeros((1, 3, s, s), np.float32)}) for s in (16, 32, 48, 64)] == [
        False, True, False, True]
    res = resolve_inputs(load("detector32"), path=path)
    assert res.shapes == {"images": [1, 3, 32, 32]}
    assert res.ran is True and res.trials == 1
    assert "strides 32x32" in res.how


def test_detector_synthetic_feeds_run_and_keep_the_seeded_values():
    feeds, info = prepare_feeds(load("detector32"), ValidateConfig(seed=3))
    assert info["shapes"] == {"images": [1, 3, 32, 32]}
    assert info["resolution"]["ran"] is True
    expected = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(feeds["images"], expected)


def test_sample_rate_takes_a_value_the_graph_compares_it_with():
    model = load("samplerate")
    assert integer_rules(model, input_specs(model))["sr"] == ("values", [16000, 8000])
    feeds, _info = prepare_feeds(model, ValidateConfig())
    assert feeds["sr"].dtype == np.int64 and feeds["sr"].shape == () and int(feeds["sr"]) == 16000
    assert feeds["audio"].shape == (1, 64)
    assert runs(model, feeds)
    assert not runs(model, {**feeds, "sr": np.array(5, np.int64)}), "other rates fail: the fixture is honest"


def test_sample_rate_tries_the_next_compared_value_when_the_first_fails():
    # 32 samples: too short for the 16 kHz branch (frames of 64), enough for 8 kHz (frames of 32)
    res = resolve_inputs(load("samplerate"), {"audio": [1, 32]})
    assert res.ran is True and res.trials == 2
    assert res.choice == {"sr": 1} and "= 8000" in res.values["sr"]
    feeds, _ = prepare_feeds(load("samplerate"), ValidateConfig(input_shapes={"audio": [1, 32]}))
    assert int(feeds["sr"]) == 8000


def test_size_named_in_metadata():
    model = load("metadata_size")
    res = resolve_inputs(model)
    assert res.shapes == {"image": [1, 3, 40, 40]} and res.ran is True and res.trials == 1
    assert res.how == "metadata input_size 40x40"


def test_size_named_in_a_doc_string():
    model = load("metadata_size")
    del model.metadata_props[:]
    model.doc_string = "Classifier for 1x3x40x40 crops."
    res = resolve_inputs(model)
    assert res.shapes == {"image": [1, 3, 40, 40]} and res.ran is True
    assert res.how.startswith("doc string")


def test_no_size_runs_is_bounded_and_says_why():
    model = load("metadata_size")
    del model.metadata_props[:]
    res = resolve_inputs(model)
    assert res.ran is False and 1 < res.trials <= MAX_TRIALS
    assert res.shapes == {"image": [1, 3, 16, 16]}, "the first candidate when none runs"
    assert "Gemm" in res.error


def test_given_shapes_are_not_second_guessed():
    res = resolve_inputs(load("detector32"), {"images": [1, 3, 48, 48]})
    assert res.shapes == {"images": [1, 3, 48, 48]} and res.trials == 0 and res.ran is None


def test_a_model_onnxruntime_cannot_load_keeps_the_first_candidate():
    node = helper.make_node("Mystery", ["x"], ["y"], domain="example.custom")
    model = small_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t"])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    res = resolve_inputs(model)
    assert res.shapes == {"x": [1, 16]} and res.ran is False and "cannot load" in res.error


# -- dims shared between inputs -------------------------------------------------------------------------------------


def _two_inputs(dims_a, dims_b) -> onnx.ModelProto:
    return small_model([helper.make_node("Concat", ["a", "b"], ["y"], axis=-1)],
                       [helper.make_tensor_value_info("a", TensorProto.FLOAT, dims_a),
                        helper.make_tensor_value_info("b", TensorProto.FLOAT, dims_b)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


def test_dim_names_shared_between_inputs_get_one_value():
    model = _two_inputs(["batch", "seq", 4], ["batch", "seq", 2])
    assert resolve_inputs(model).shapes == {"a": [1, 16, 4], "b": [1, 16, 2]}
    given = resolve_inputs(model, {"a": [2, 7, 4]})
    assert given.shapes == {"a": [2, 7, 4], "b": [2, 7, 2]} and given.trials == 0


def test_placeholder_names_are_not_shared():
    model = _two_inputs([1, "?", 4], [1, 3, "?"])
    res = resolve_inputs(model)
    assert res.shapes == {"a": [1, 3, 4], "b": [1, 3, 4]}, "each free dim from its sibling; ? is no shared name"
    assert res.how == "fixed dims of sibling inputs" and res.ran is True and res.trials == 2


def test_state_input_batch_dim_follows_the_batch():
    # x [?, ?] and a recurrent state [2, ?, 4] whose middle dim is the batch: Concat needs them equal
    nodes = [helper.make_node("ReduceMean", ["x"], ["s"], keepdims=1, axes=[1]),
             helper.make_node("Gather", ["state", "zero"], ["h"], axis=0),
             helper.make_node("Concat", ["s", "h"], ["y"], axis=1)]
    model = small_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None]),
                                helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 4])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                        [numpy_helper.from_array(np.array(0, np.int64), "zero")])
    res = resolve_inputs(model)
    assert res.shapes == {"x": [1, 16], "state": [2, 1, 4]} and res.ran is True and res.trials == 1


# -- integer inputs -------------------------------------------------------------------------------------------------


def test_integer_rules_index_count_mask_and_random():
    table = helper.make_tensor("table", TensorProto.FLOAT, [7, 3], np.arange(21, dtype=np.float32))
    nodes = [helper.make_node("Constant", [], ["tab"], value=table),
             helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["tab", "ids32"], ["emb"], axis=0),
             helper.make_node("Range", ["zero", "n", "one"], ["steps"]),
             helper.make_node("Cast", ["steps"], ["stepsf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["stepsf"], ["total"], keepdims=0),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["other"], ["otherf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["maskf", "otherf"], ["prod"]),
             helper.make_node("ReduceSum", ["prod"], ["psum"], keepdims=0),
             helper.make_node("Add", ["total", "psum"], ["t2"]),
             helper.make_node("Add", ["emb", "t2"], ["y"])]
    model = small_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5]),
                                helper.make_tensor_value_info("n", TensorProto.INT64, []),
                                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 5]),
                                helper.make_tensor_value_info("other", TensorProto.INT64, [1, 5])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                        [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                         numpy_helper.from_array(np.array(1, np.int64), "one")])
    rules = integer_rules(model, input_specs(model))
    assert rules == {"ids": ("index", 7), "n": ("count",), "attention_mask": ("ones",), "other": ("random",)}
    for seed in range(5):
        feeds, _ = prepare_feeds(model, ValidateConfig(seed=seed))
        assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 7
        assert 1 <= int(feeds["n"]) <= 4
        assert (feeds["attention_mask"] == 1).all()
        assert runs(model, feeds)


def test_compared_tensor_that_is_not_small_keeps_its_rule():
    # input_ids == 0 builds a padding mask in many exports: that must not fill the ids with zeros
    table = numpy_helper.from_array(np.ones((30, 2), np.float32), "emb")
    nodes = [helper.make_node("Equal", ["ids", "pad"], ["is_pad"]),
             helper.make_node("Gather", ["emb", "ids"], ["y"], axis=0)]
    model = small_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                         helper.make_tensor_value_info("is_pad", TensorProto.BOOL, None)],
                        [table, numpy_helper.from_array(np.array(0, np.int64), "pad")])
    assert integer_rules(model, input_specs(model)) == {"ids": ("index", 30)}


# -- models that ran before keep their feeds ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp_dynamic.onnx", "cnn.onnx", "embedding.onnx"])
def test_models_that_ran_keep_their_synthetic_values(name):
    """The previous rule (batch 1, other dynamic dims 16, N(0, 1) floats, indices within the table)."""
    model = onnx.load(str(FIXTURES / name))
    feeds, _ = prepare_feeds(model, ValidateConfig(seed=0))
    rng = np.random.default_rng(0)
    rows = {n.input[1]: next(next(iter(i.dims)) for i in model.graph.initializer if i.name == n.input[0])
            for n in model.graph.node if n.op_type == "Gather"}
    for spec in input_specs(model):
        shape = [d if d else (1 if axis == 0 else 16) for axis, d in enumerate(spec.shape)]
        if spec.type == "tensor(float)":
            expected = rng.standard_normal(shape).astype(np.float32)
        else:
            expected = rng.integers(0, rows.get(spec.name, 10), size=shape).astype(feeds[spec.name].dtype)
        np.testing.assert_array_equal(feeds[spec.name], expected)


# -- the command line -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["detector32", "samplerate", "metadata_size"])
def test_prune_with_no_other_option_validates(tmp_path, name):
    shutil.copy(FEEDS / f"{name}.onnx", tmp_path / "m.onnx")
    code, out, err = run_cli(tmp_path / "m.onnx", "--sparsity", "0.5", "--report", tmp_path / "r.json", *FAST)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    resolution = report["validation"]["inputs"]["resolution"]
    assert resolution["ran"] is True
    assert "synthetic inputs:" in err and "the original model runs on them" in err
    assert resolution["how"] in out, "the summary says how the sizes were found"
    assert report["validation"]["worst"]["cosine"] > 0.5


def _inspect(path, *args) -> dict:
    code, out, err = run_cli("inspect", path, "--json", *args)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("validate", [(), ("--no-validate",)])
@pytest.mark.parametrize("shape", [(), ("--input-shape", "images:1x3x64x64")])
def test_inspect_and_prune_analyse_the_same_shapes(tmp_path, validate, shape):
    path = FEEDS / "detector32.onnx"
    info = _inspect(path, *shape)
    code, _, err = run_cli(path, "--structured", "--sparsity", "0.3", "-o", tmp_path / "o.onnx", "--report",
                           tmp_path / "r.json", *shape, *validate, *FAST)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    details = report["passes"][0]["details"]
    side = 64 if shape else 32
    assert info["input_resolution"]["shapes"] == {"images": [1, 3, side, side]}
    assert info["macs"] == details["macs_before"]
    assert [(g["id"], g["channels"], g["producers"]) for g in info["structured"]["groups"]] == [
        (g["id"], g["channels_before"], g["producers"]) for g in details["groups"]]
    assert info["structured"]["frozen"] == details["frozen"]
    assert len(details["groups"]) == 5 and details["macs_removed"] > 0
    if not validate:
        assert report["validation"]["model"]["original"]["macs"] == info["macs"]


def test_inspect_says_how_it_chose_the_sizes():
    code, out, err = run_cli("inspect", FEEDS / "metadata_size.onnx")
    assert code == 0, err
    assert "synthetic inputs: image 1x3x40x40 (metadata input_size 40x40); the original model runs on them" in out


def test_fixtures_are_reproducible(monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(FIXTURES))  # the script imports fixture_io beside it
    spec = importlib.util.spec_from_file_location("build_feeds_fixtures", FIXTURES / "build_feeds_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, build in module.BUILDERS.items():
        assert build().SerializeToString() == (FEEDS / f"{name}.onnx").read_bytes(), name


def test_inspect_of_a_model_with_a_string_input(tmp_path):
    model = small_model([helper.make_node("Identity", ["x"], ["y"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t"]),
                         helper.make_tensor_value_info("label", TensorProto.STRING, ["n"])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t"])])
    onnx.save(model, tmp_path / "m.onnx")
    resolution = _inspect(tmp_path / "m.onnx")["input_resolution"]
    assert resolution["ran"] is False and "cannot synthesise input 'label'" in resolution["error"]
    # pruning is the job: without a gate the model is written and the run says it was not validated
    code, stdout, err = run_cli(tmp_path / "m.onnx", "--sparsity", "0.5", "-o", tmp_path / "o.onnx")
    out = stdout + err
    assert code == 0 and "not validated: cannot synthesise input 'label'" in out and "give --data" in out
    assert (tmp_path / "o.onnx").is_file()
    code, _, err = run_cli(tmp_path / "m.onnx", "--sparsity", "0.5", "-o", tmp_path / "o2.onnx", "--min-cosine", "0.9")
    assert code == 8 and "the pruned model was written" in err
