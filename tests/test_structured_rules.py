"""One small graph per op rule: the oracle holds where channels are prunable; frozen ones say why."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.analysis.groups import analyse, build_groups
from onnxprune.analysis.rules.catalog import DESCRIPTIONS

from .oracle import masked_and_removed, random_choice, relative_error

C = 8  # channels produced by the first conv


class G:
    """A tiny graph builder around ``input [N,3,8,8] -> conv1 (C channels) -> ...``."""

    def __init__(self, opset: int = 17):
        self.opset = opset
        self.rng = np.random.default_rng(0)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.x = self.conv("input", 3, C)

    def name(self, p="t"):
        self.n += 1
        return f"{p}{self.n}"

    def w(self, shape, scale=0.5):
        name = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(self, values, dtype=np.int64):
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, n_out=1, domain=None, **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]

    def conv(self, x, cin, cout, k=3, group=1):
        return self.op("Conv", [x, self.w([cout, cin // group, k, k]), self.w([cout], 0.1)], pads=[k // 2] * 4,
                       group=group)

    def head(self, x, channels, spatial=True):
        """Consumer conv then global pool, flatten and a Gemm to 4 logits (the graph output)."""
        if spatial:
            x = self.conv(x, channels, 6, k=1)
            x = self.op("GlobalAveragePool", [x])
            x = self.op("Flatten", [x])
            channels = 6
        self.nodes.append(helper.make_node("Gemm", [x, self.w([channels, 4]), self.w([4], 0.1)], ["logits"],
                                           name="head"))
        return self.model()

    def model(self, extra_opsets=()):
        graph = helper.make_graph(self.nodes, "rule", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                     ["N", 3, 8, 8])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], self.inits)
        opsets = [helper.make_opsetid("", self.opset), *extra_opsets]
        ir = 10 if self.opset >= 21 else 9 if self.opset >= 19 else 8
        return helper.make_model(graph, opset_imports=opsets, ir_version=ir)


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})


def oracle(model, seeds=(0, 1, 2)):
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    removed_any = False
    for seed in seeds:
        choice = random_choice(model, 0.5, seed)
        removed_any |= bool(choice)
        masked, removed = masked_and_removed(model, choice)
        onnx.checker.check_model(removed, full_check=True)
        assert relative_error(run(masked, x), run(removed, x)) <= 1e-5
        assert run(removed, x)[0].shape == run(model, x)[0].shape
    return removed_any


def frozen_reasons(model):
    analysis = analyse(model)
    return [r for g in build_groups(analysis) for _, r in g.frozen_units]


def first_group_prunable(model) -> bool:
    analysis = analyse(model)
    first = model.graph.node[0].name
    return any(g.units for g in build_groups(analysis) if any(s.node.name == first for s in g.spaces))


UNARY = ["Atan", "Sinh", "Cosh", "Asinh", "Tan", "Relu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Softsign", "Erf", "Exp", "Abs", "Neg", "HardSigmoid",
         "HardSwish", "LeakyRelu", "Celu", "Mish", "Identity", "Dropout", "Sqrt", "Reciprocal", "Gelu"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    g = G(opset=20 if op == "Gelu" else 18)
    x = g.op("Abs", [g.x]) if op in ("Sqrt", "Reciprocal") else g.x
    y = g.op(op, [x])
    assert oracle(g.head(y, C))
    assert first_group_prunable(g.model())


def test_clip_and_cast():
    g = G()
    y = g.op("Clip", [g.x, g.c(0.0, np.float32), g.c(6.0, np.float32)])
    y = g.op("Cast", [y], to=TensorProto.FLOAT)
    assert oracle(g.head(y, C))


def test_prelu_per_channel_slope():
    g = G()
    assert oracle(g.head(g.op("PRelu", [g.x, g.w([C, 1, 1])]), C))


def test_batchnorm_instancenorm():
    g = G()
    y = g.op("BatchNormalization", [g.x, g.w([C]), g.w([C]), g.w([C]), g.c(np.ones(C), np.float32)])
    y = g.op("InstanceNormalization", [y, g.w([C]), g.w([C])])
    assert oracle(g.head(y, C))


@pytest.mark.parametrize("groups", [C, 4, 2])
def test_groupnorm_removes_whole_groups(groups):
    g = G(opset=21)
    y = g.op("GroupNormalization", [g.x, g.w([C]), g.w([C])], num_groups=groups)
    model = g.head(y, C)
    assert oracle(model)
    sizes = {len(ids) for grp in build_groups(analyse(model)) for ids in grp.units}
    assert C // groups in sizes  # a group's channels form one unit


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_block_aware(mode):
    g = G()
    y = g.op("DepthToSpace", [g.x], blocksize=2, mode=mode)  # [N, 2, 16, 16]
    model = g.head(y, C // 4)
    assert oracle(model)
    assert {4} <= {len(ids) for grp in build_groups(analyse(model)) for ids in grp.units}


def test_space_to_depth_repeats_channels():
    g = G()
    y = g.op("SpaceToDepth", [g.x], blocksize=2)  # [N, 4C, 4, 4]
    assert oracle(g.head(y, 4 * C))


def test_normalizations_over_space_pass_over_channels_frozen():
    g = G(opset=13)
    y = g.op("MeanVarianceNormalization", [g.x], axes=[2, 3])
    y = g.op("LpNormalization", [y], axis=3)
    assert oracle(g.head(y, C))
    g = G(opset=13)
    model = g.head(g.op("LpNormalization", [g.x], axis=1), C)
    assert any("normalizes over the channel axis" in r for r in frozen_reasons(model))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"])
def test_binary_residual_ties_both_branches(op):
    g = G()
    a = g.op("Sigmoid", [g.x]) if op in ("Pow", "Div") else g.x
    b = g.op("Sigmoid", [g.conv(g.x, C, C)]) if op in ("Pow", "Div") else g.conv(g.x, C, C)
    b = g.op("Add", [b, g.c(np.ones((C, 1, 1)), np.float32)]) if op == "Div" else b
    assert oracle(g.head(g.op(op, [a, b]), C))


def test_per_channel_constant_operand_is_sliced():
    g = G()
    y = g.op("Mul", [g.x, g.w([1, C, 1, 1])])
    y = g.op("Add", [g.w([C, 1, 1]), y])
    assert oracle(g.head(y, C))


@pytest.mark.parametrize("spelling", ["unsqueeze", "sigmoid-transpose", "gather", "expand"])
def test_per_channel_operand_computed_from_constants_is_sliced(spelling):
    """An operand computed at run time from constants along the channel axis: its constants are sliced."""
    g = G(opset=17)
    if spelling == "unsqueeze":  # a [C] parameter broadcast as [C, 1, 1]
        operand = g.op("Unsqueeze", [g.w([C]), g.c([1, 2])])
    elif spelling == "sigmoid-transpose":  # a gate computed from a [1, 1, C] constant, moved to [1, C, 1, 1]
        operand = g.op("Unsqueeze", [g.op("Transpose", [g.op("Sigmoid", [g.w([1, 1, C])])], perm=[0, 2, 1]),
                                     g.c([3])])
    elif spelling == "gather":  # a row of a [rows, C] table picked by a constant index, then [1, C, 1, 1]
        operand = g.op("Reshape", [g.op("Gather", [g.w([3, C]), g.c([1])], axis=0), g.c([1, C, 1, 1])])
    else:  # a [1, C, 1, 1] constant expanded over the batch of the input
        batch = g.op("Gather", [g.op("Shape", ["input"]), g.c([0])], axis=0)
        operand = g.op("Expand", [g.w([1, C, 1, 1]), g.op("Concat", [batch, g.c([1, 1, 1])], axis=0)])
    y = g.op("Add", [g.x, operand])
    model = g.head(y, C)
    if spelling == "gather":  # the Reshape between the table and the Add is not followed: frozen, with the reason
        assert any("no channel ids" in r for r in frozen_reasons(model))
        return
    assert first_group_prunable(model)
    assert oracle(model)


def test_per_channel_operand_also_read_elsewhere_is_frozen():
    g = G(opset=17)
    gate = g.op("Sigmoid", [g.w([C, 1, 1])])
    y = g.op("Mul", [g.x, gate])
    pooled = g.op("ReduceMean", [gate], keepdims=0)  # the gate also feeds a node that knows no channels
    y = g.op("Add", [y, pooled])
    model = g.head(y, C)
    assert any("also read by ReduceMean" in r for r in frozen_reasons(model))
    oracle(model)


def test_squeeze_excitation():
    g = G()
    s = g.op("GlobalAveragePool", [g.x])
    s = g.op("Relu", [g.conv(s, C, 4, k=1)])
    s = g.op("HardSigmoid", [g.conv(s, 4, C, k=1)])
    assert oracle(g.head(g.op("Mul", [g.x, s]), C))


def test_concat_offsets_and_foreign_input():
    g = G()
    b = g.conv(g.x, C, 4)
    y = g.op("Concat", [g.x, b, "input"], axis=1)
    model = g.head(y, C + 4 + 3)
    assert oracle(model)
    assert any("come from no prunable layer" in r for r in frozen_reasons(model))


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split(opset):
    g = G(opset=opset)
    if opset < 13:
        a, b = g.op("Split", [g.x], n_out=2, axis=1, split=[3, 5])
    elif opset < 18:
        a, b = g.op("Split", [g.x, g.c([3, 5])], n_out=2, axis=1)
    else:
        a, b = g.op("Split", [g.x], n_out=2, axis=1, num_outputs=2)
    y = g.op("Concat", [g.conv(a, 3 if opset < 18 else 4, 5), b], axis=1)
    assert oracle(g.head(y, 10 if opset < 18 else 9))


def test_slice_channel_range():
    g = G()
    y = g.op("Slice", [g.x, g.c([2]), g.c([7]), g.c([1])])
    assert oracle(g.head(y, 5))


def test_pools_pad_resize():
    g = G(opset=13)
    y = g.op("MaxPool", [g.x], kernel_shape=[2, 2], strides=[2, 2])
    y = g.op("AveragePool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = g.op("Pad", [y, g.c([0, 0, 1, 1, 0, 0, 1, 1])])
    y = g.op("Resize", [y, "", g.c([1, 1, 2, 2], np.float32)], mode="nearest")
    y = g.op("LpPool", [y], kernel_shape=[2, 2])
    assert oracle(g.head(y, C))


def test_resize_with_sizes_is_rewritten():
    g = G(opset=13)
    y = g.op("Resize", [g.x, "", "", g.c([2, C, 16, 16])], mode="nearest")
    model = g.head(y, C)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    choice = random_choice(model, 0.5, 0)
    masked, removed = masked_and_removed(model, choice)
    assert relative_error(run(masked, x), run(removed, x)) <= 1e-5


def test_pad_on_channel_axis_is_frozen():
    g = G(opset=13)
    y = g.op("Pad", [g.x, g.c([0, 1, 0, 0, 0, 1, 0, 0])])
    model = g.head(y, C + 2)
    assert any("pads the channel axis" in r for r in frozen_reasons(model))
    oracle(model)


@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_over_space(keepdims):
    g = G(opset=13)
    y = g.op("ReduceMean", [g.x], axes=[2, 3], keepdims=keepdims)
    if keepdims:
        y = g.op("Flatten", [y])
    assert oracle(g.head(y, C, spatial=False))


def test_reduce_over_channels_is_frozen():
    g = G(opset=18)
    y = g.op("ReduceMean", [g.x, g.c([1])], keepdims=1)
    y = g.op("Add", [g.x, y])
    model = g.head(y, C)
    assert any("reduces over the channel axis" in r for r in frozen_reasons(model))
    oracle(model)


def test_flatten_to_gemm_blocks():
    g = G()
    y = g.op("MaxPool", [g.x], kernel_shape=[4, 4], strides=[4, 4])  # [N, C, 2, 2]
    y = g.op("Flatten", [y])
    assert oracle(g.head(y, C * 4, spatial=False))


def test_reshape_flatten_like_to_matmul():
    g = G()
    y = g.op("MaxPool", [g.x], kernel_shape=[4, 4], strides=[4, 4])
    y = g.op("Reshape", [y, g.c([-1, C * 4])])
    y = g.op("MatMul", [y, g.w([C * 4, 6])])
    assert oracle(g.head(y, 6, spatial=False))


def test_reshape_that_splits_channels_prunes_whole_blocks():
    """[N, C, H, W] -> [N, 2, C/2, HW] -> back: the channel axis splits into 2 blocks (like attention heads)."""
    g = G()
    y = g.op("Reshape", [g.x, g.c([0, 2, C // 2, 64])])
    y = g.op("Reshape", [y, g.c([0, C, 8, 8])])
    model = g.head(y, C)
    analysis = analyse(model)
    units = [len(ids) for grp in build_groups(analysis) for ids in grp.units]
    assert C // 2 in units  # a block of C/2 channels is one unit
    oracle(model)

def test_transpose_channels_last_linear():
    """ConvNeXt style: NCHW -> NHWC, LayerNorm + MatMul on channels-last, back to NCHW."""
    g = G()
    y = g.op("Transpose", [g.x], perm=[0, 2, 3, 1])
    y = g.op("MatMul", [y, g.w([C, 12])])
    y = g.op("Gelu", [y]) if g.opset >= 20 else g.op("Relu", [y])
    y = g.op("MatMul", [y, g.w([12, C])])
    y = g.op("Transpose", [y], perm=[0, 3, 1, 2])
    y = g.op("Add", [g.x, y])
    model = g.head(y, C)
    assert oracle(model)


def test_layernorm_over_channels_is_frozen_over_space_passes():
    g = G()
    y = g.op("Transpose", [g.x], perm=[0, 2, 3, 1])
    y = g.op("LayerNormalization", [y, g.w([C]), g.w([C])], axis=-1)
    y = g.op("Transpose", [y], perm=[0, 3, 1, 2])
    model = g.head(y, C)
    assert any("LayerNormalization" in r for r in frozen_reasons(model))
    oracle(model)
    g = G()
    y = g.op("LayerNormalization", [g.x, g.w([8, 8]), g.w([8, 8])], axis=2)
    assert oracle(g.head(y, C))


def test_squeeze_unsqueeze_opset_forms():
    for opset in (11, 13):
        g = G(opset=opset)
        y = g.op("GlobalAveragePool", [g.x])
        if opset < 13:
            y = g.op("Squeeze", [y], axes=[3])
            y = g.op("Unsqueeze", [y], axes=[3])
        else:
            y = g.op("Squeeze", [y, g.c([3])])
            y = g.op("Unsqueeze", [y, g.c([3])])
        y = g.op("Flatten", [y])
        assert oracle(g.head(y, C, spatial=False))


def test_softmax_over_space_passes_over_channels_frozen():
    g = G(opset=13)
    y = g.op("Softmax", [g.x], axis=3)
    assert oracle(g.head(y, C))
    g = G(opset=13)
    model = g.head(g.op("Softmax", [g.x], axis=1), C)
    assert any("along the channel axis" in r for r in frozen_reasons(model))


def test_depthwise_ties_input_and_output():
    g = G()
    y = g.op("Relu", [g.conv(g.x, C, C, group=C)])
    y = g.conv(y, C, 2 * C, group=C)  # depthwise with multiplier 2
    assert oracle(g.head(y, 2 * C))


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_conv_removes_whole_groups(group):
    g = G()
    y = g.op("Relu", [g.conv(g.x, C, 2 * C, group=group)])
    model = g.head(y, 2 * C)
    assert oracle(model)
    analysis = analyse(model)
    unit_sizes = {len(ids) for grp in build_groups(analysis) for ids in grp.units if len(ids) > 1}
    assert C // group + 2 * C // group in unit_sizes  # a group's inputs and outputs form one unit


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_conv_transpose(group):
    g = G()
    y = g.op("ConvTranspose", [g.x, g.w([C, 12 // group, 2, 2]), g.w([12], 0.1)], strides=[2, 2], group=group)
    model = g.head(g.op("Relu", [y]), 12)
    assert oracle(model)
    assert C // group + 12 // group in {len(ids) for grp in build_groups(analyse(model)) for ids in grp.units}


def test_conv_transpose():
    g = G()
    y = g.op("ConvTranspose", [g.x, g.w([C, 5, 2, 2]), g.w([5], 0.1)], strides=[2, 2])
    y = g.op("Relu", [y])
    y = g.op("ConvTranspose", [y, g.w([5, 6, 3, 3])], pads=[1, 1, 1, 1])
    assert oracle(g.head(y, 6))


def test_gemm_trans_b_and_trans_a_frozen():
    g = G()
    y = g.op("Flatten", [g.op("GlobalAveragePool", [g.x])])
    y = g.op("Gemm", [y, g.w([10, C]), g.w([10], 0.1)], transB=1)
    y = g.op("Relu", [y])
    assert oracle(g.head(y, 10, spatial=False))


def test_expand_and_tile():
    g = G()
    s = g.op("GlobalAveragePool", [g.x])
    s = g.op("Expand", [s, g.c([1, C, 8, 8])])
    y = g.op("Mul", [g.x, s])
    y = g.op("Tile", [y, g.c([1, 1, 1, 1])])
    assert oracle(g.head(y, C))


def test_shape_reading_batch_passes():
    g = G()
    shape = g.op("Shape", [g.x])
    batch = g.op("Gather", [shape, g.c([0])], axis=0)
    target = g.op("Concat", [batch, g.c([-1])], axis=0)
    y = g.op("Reshape", [g.op("GlobalAveragePool", [g.x]), target])
    assert oracle(g.head(y, C, spatial=False))


@pytest.mark.parametrize("spelling", ["gather", "slice", "scalar", "shape-attrs"])
def test_channel_count_read_at_run_time_to_reshape_its_own_channels_passes(spelling):
    """Shape(x) -> Gather/Slice/Unsqueeze -> Concat -> Reshape of x's channels: the read count shrinks with them."""
    g = G(opset=17)
    pooled = g.op("GlobalAveragePool", [g.x])
    shape = g.op("Shape", [pooled], **({"start": 1, "end": 2} if spelling == "shape-attrs" else {}))
    if spelling == "gather":
        chans = g.op("Gather", [shape, g.c([1])], axis=0)
    elif spelling == "slice":
        chans = g.op("Slice", [shape, g.c([1]), g.c([2]), g.c([0])])
    elif spelling == "scalar":
        chans = g.op("Unsqueeze", [g.op("Gather", [shape, g.c(1)], axis=0), g.c([0])])
    else:
        chans = shape
    target = g.op("Concat", [g.c([-1]), g.op("Cast", [chans], to=TensorProto.INT64)], axis=0)
    y = g.op("Reshape", [pooled, target])
    model = g.head(y, C, spatial=False)
    assert not any("read at run time" in r for r in frozen_reasons(model))
    assert oracle(model)


def test_channel_count_read_at_run_time_elsewhere_is_tied_or_frozen():
    # the count shapes another group's channels: both groups go together
    g = G()
    chans = g.op("Gather", [g.op("Shape", [g.x]), g.c([1])], axis=0)
    other = g.op("Reshape", [g.op("GlobalAveragePool", [g.conv(g.x, C, C, k=1)]), g.c([-1, C])])
    y = g.op("Reshape", [other, g.op("Concat", [g.c([-1]), chans], axis=0)])
    model = g.head(y, C, spatial=False)
    analysis = analyse(model)
    groups = [grp for grp in build_groups(analysis) if grp.units]
    assert len(groups) == 1 and {s.node.op_type for s in groups[0].spaces} == {"Conv"} and len(groups[0].spaces) == 2
    assert oracle(model)
    # the count shapes a tensor without channels
    g = G()
    chans = g.op("Gather", [g.op("Shape", [g.x]), g.c([1])], axis=0)
    ones = g.op("Expand", [g.c([[1.0]], np.float32), g.op("Concat", [g.c([1]), chans], axis=0)])
    total = g.op("ReduceSum", [ones], keepdims=0)
    y = g.op("Mul", [g.op("Reshape", [g.op("GlobalAveragePool", [g.x]), g.c([-1, C])]), total])
    model = g.head(y, C, spatial=False)
    assert any("read at run time" in r and "do not follow" in r for r in frozen_reasons(model))
    oracle(model)
    # the count is computed with (doubled)
    g = G()
    pooled = g.op("GlobalAveragePool", [g.x])
    chans = g.op("Gather", [g.op("Shape", [pooled]), g.c([1])], axis=0)
    target = g.op("Concat", [g.c([-1]), g.op("Mul", [chans, g.c([2])])], axis=0)
    y = g.op("Reshape", [g.op("Concat", [pooled, pooled], axis=1), target])
    model = g.head(y, 2 * C, spatial=False)
    assert any("read at run time" in r and "Mul" in r for r in frozen_reasons(model))
    oracle(model)


def test_custom_domain_op_is_frozen():
    g = G()
    y = g.op("MyOp", [g.x], domain="com.example")
    model = g.model([helper.make_opsetid("com.example", 1)])
    model.graph.output[0].name = y
    assert any("custom-domain" in r for r in frozen_reasons(model))


def test_if_subgraph_reading_channels_is_frozen():
    g = G()
    then_out = helper.make_tensor_value_info("then_y", TensorProto.FLOAT, None)
    else_out = helper.make_tensor_value_info("else_y", TensorProto.FLOAT, None)
    then_g = helper.make_graph([helper.make_node("Relu", [g.x], ["then_y"])], "then", [], [then_out])
    else_g = helper.make_graph([helper.make_node("Sigmoid", [g.x], ["else_y"])], "else", [], [else_out])
    cond = g.c(np.array(True), np.bool_)
    y = g.op("If", [cond], then_branch=then_g, else_branch=else_g)
    model = g.head(y, C)
    assert any("subgraph" in r for r in frozen_reasons(model))
    oracle(model)


def test_registry_lists_required_ops():
    ops = DESCRIPTIONS  # op type -> what its rule does
    for op in ["Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "GroupNormalization", "Relu",
               "PRelu", "Clip", "HardSwish", "Add", "Mul", "Concat", "Split", "Slice", "MaxPool", "LpPool",
               "GlobalMaxPool", "ReduceMean", "Resize", "Pad", "DepthToSpace", "Flatten", "Reshape", "Transpose",
               "Squeeze", "Unsqueeze", "Gemm", "MatMul", "Dropout", "Identity", "Cast", "LayerNormalization"]:
        assert op in ops, op


def test_layernorm_over_channels_approximate_option():
    """--prune-layernorm lets channels through a channels-last LayerNorm: valid model, scale/bias sliced."""
    import onnxprune

    g = G()
    y = g.op("Transpose", [g.x], perm=[0, 2, 3, 1])
    y = g.op("LayerNormalization", [y, g.w([C]), g.w([C])], axis=-1)
    y = g.op("MatMul", [y, g.w([C, C])])
    y = g.op("Transpose", [y], perm=[0, 3, 1, 2])
    model = g.head(y, C)
    _, frozen = onnxprune.prune(model, structured=True, sparsity=0.5)
    pruned, result = onnxprune.prune(model, structured=True, sparsity=0.5, prune_layernorm=True)
    onnx.checker.check_model(pruned, full_check=True)
    details = result.to_dict()["passes"][0]["details"]
    assert details["approximate_layernorms"] and details["channels_removed"] > 0
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert run(pruned, x)[0].shape == (2, 4)
    assert details["macs_after"] < frozen.to_dict()["passes"][0]["details"]["macs_after"]


def test_a_failing_rule_freezes_as_an_internal_error(monkeypatch):
    """Outside tests and --debug (tests/test_rule_errors.py) a rule's bug freezes its channels, named as a bug."""
    from onnxprune.analysis import registry

    def broken(a, node):
        raise IndexError("boom")

    monkeypatch.setitem(registry.RULES, "Relu", broken)
    monkeypatch.delenv(registry.RAISE_ENV)
    g = G()
    model = g.head(g.op("Relu", [g.x]), C)
    assert any(r.startswith("internal error in rule broken at Relu") and "(IndexError: boom)" in r
               for r in frozen_reasons(model))
    oracle(model)


def test_docs_table_lists_every_registered_op():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "structured.md").read_text()
    table = text[text.index("## Supported ops"):]
    missing = [op for op in DESCRIPTIONS if op not in table]
    assert not missing, f"docs/structured.md lacks {missing}"


def test_reduce_noop_with_empty_axes_passes_reduce_all_frozen():
    g = G(opset=18)
    y = g.op("ReduceSum", [g.x], noop_with_empty_axes=1)
    assert oracle(g.head(y, C))
    g = G(opset=18)
    s = g.op("ReduceSum", [g.x], keepdims=1)
    model = g.head(g.op("Add", [g.x, s]), C)
    assert any("reduces every axis" in r for r in frozen_reasons(model))
    oracle(model)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_resize_and_reducemean_opset_forms(opset):
    """Resize (roi/scales inputs since opset 11) and ReduceMean (axes attribute until 17, input from 18)."""
    g = G(opset=opset)
    y = g.op("Resize", [g.x, g.c([], np.float32), g.c([1, 1, 2, 2], np.float32)], mode="nearest")
    if opset < 18:
        y = g.op("ReduceMean", [y], axes=[2, 3], keepdims=0)
    else:
        y = g.op("ReduceMean", [y, g.c([2, 3])], keepdims=0)
    assert oracle(g.head(y, C, spatial=False))


@pytest.mark.parametrize("case", ["other-axis", "pick-list", "pick-one"])
def test_gather(case):
    g = G(opset=17)
    if case == "other-axis":  # a row of the feature map: channels pass
        y = g.op("Gather", [g.x, g.c(3)], axis=2)  # [N, C, 8]
        y = g.op("Unsqueeze", [y, g.c([3])])
        assert oracle(g.head(y, C))
        return
    if case == "pick-list":  # channels 0, 2, 5, 7 picked (and in another order): they follow
        y = g.op("Gather", [g.x, g.c([7, 0, 2, 5])], axis=1)
        model = g.head(y, 4)
    else:  # channel 3 picked alone: it stays, the others go, the index moves
        y = g.op("Unsqueeze", [g.op("Gather", [g.x, g.c(3)], axis=1), g.c([1])])
        model = g.head(y, 1)
    assert any("Gather" in r for r in frozen_reasons(model)) == (case == "pick-one")
    assert first_group_prunable(model)
    assert oracle(model)


def test_trilu_passes_channels_off_its_triangle_and_freezes_them_on_it():
    """The worked example of docs/architecture.md ("Adding an op"): Trilu keeps a triangle of its last two axes,
    so channels on axis 1 pass through it, channels on the last axis stay."""
    g = G(opset=14)
    y = g.op("Trilu", [g.x, g.c(1)], upper=0)
    model = g.head(y, C)
    assert not any("Trilu" in r for r in frozen_reasons(model)) and first_group_prunable(model)
    assert oracle(model)
    g = G(opset=14)
    y = g.op("Transpose", [g.x], perm=[0, 2, 3, 1])
    y = g.op("Trilu", [y])
    y = g.op("Transpose", [y], perm=[0, 3, 1, 2])
    model = g.head(y, C)
    assert any("Trilu" in r and "triangle" in r for r in frozen_reasons(model))
    oracle(model)
