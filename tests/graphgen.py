"""Random valid CNN/MLP graphs for property-based tests (built with onnx.helper).

``random_cnn(draw_int, draw_choice)`` takes two callables so the same builder serves
hypothesis strategies (``st.data()``) and plain ``random.Random`` loops.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ACTIVATIONS = ["Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Elu", "Softplus", "HardSwish", "Clip"]


def ir_for_opset(opset: int) -> int:
    """An IR version onnxruntime accepts for ``opset``."""
    return 10 if opset >= 21 else (9 if opset >= 19 else 8 if opset >= 15 else 7)


class _Builder:
    def __init__(self, opset: int, seed: int):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def weight(self, shape, scale=0.3, prefix="w") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const_i64(self, values, dtype=np.int64) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def reshape_int32(self, x: str, c: int, channels: str) -> tuple[str, str]:
        """Paddle's spelling of ``[N, C, H, W] -> [N, C, H*W]``: ``Shape -> Cast(int32) -> Slice -> Concat ->
        Cast(int64) -> Reshape``, the channel entry read at run time or an int32 constant; returns the flat tensor and
        the int64 shape to restore."""
        shape = self.node("Cast", [self.node("Shape", [x])[0]], to=TensorProto.INT32)[0]
        batch = self.node("Slice", [shape, self.const_i64([0]), self.const_i64([1]), self.const_i64([0])])[0]
        if channels == "read":
            count = self.node("Slice", [shape, self.const_i64([1]), self.const_i64([2]), self.const_i64([0])])[0]
        else:
            count = self.const_i64([c], np.int32)
        target = self.node("Concat", [batch, count, self.const_i64([-1], np.int32)], axis=0)[0]
        flat = self.node("Reshape", [x, self.node("Cast", [target], to=TensorProto.INT64)[0]])[0]
        return flat, self.node("Cast", [shape], to=TensorProto.INT64)[0]

    def node(self, op, inputs, n_out=1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(f"n_{op}"), **attrs))
        return outs

    def conv(self, x, cin, cout, k, group=1, bias=True) -> str:
        w = self.weight([cout, cin // group, k, k], scale=1.0 / np.sqrt(cin // group * k * k))
        inputs = [x, w] + ([self.weight([cout], 0.1, "b")] if bias else [])
        return self.node("Conv", inputs, pads=[k // 2] * 4, group=group)[0]

    def bn(self, x, c) -> str:
        scale = self.name("g")
        self.inits.append(numpy_helper.from_array((1 + 0.2 * self.rng.standard_normal(c)).astype(np.float32), scale))
        var = self.name("v")
        self.inits.append(numpy_helper.from_array((0.5 + self.rng.random(c)).astype(np.float32), var))
        return self.node("BatchNormalization", [x, scale, self.weight([c], 0.1, "beta"), self.weight([c], 0.1, "mu"), var])[0]

    def act(self, x, kind) -> str:
        if kind == "HardSwish" and self.opset < 14:
            kind = "Relu"
        if kind == "Clip" and self.opset >= 11:
            lo = self.name("lo")
            hi = self.name("hi")
            self.inits.append(numpy_helper.from_array(np.array(0.0, np.float32), lo))
            self.inits.append(numpy_helper.from_array(np.array(6.0, np.float32), hi))
            return self.node("Clip", [x, lo, hi])[0]
        return self.node(kind, [x])[0]

    def split2(self, x, c) -> tuple[list[str], list[int]]:
        sizes = [c // 2, c - c // 2]
        if self.opset >= 13:
            return self.node("Split", [x, self.const_i64(sizes)], n_out=2, axis=1), sizes
        return self.node("Split", [x], n_out=2, axis=1, split=sizes), sizes


def random_cnn(draw_int: Callable[[int, int], int], draw_choice: Callable[[list], object], seed: int = 0
               ) -> onnx.ModelProto:
    """A random, valid CNN: conv blocks with BN, activations, residual adds, concats, splits, SE, reshapes sized
    at run time (int64 or Paddle's int32 shape arithmetic), per-channel gates computed from constants, constant
    channel picks (Gather), and a head."""
    opset = draw_choice([11, 13, 14, 17, 18, 21])
    b = _Builder(opset, seed)
    size = 16
    c = draw_choice([4, 8, 12])
    x = b.conv("input", 3, c, 3)
    for _ in range(draw_int(1, 5)):
        block = draw_choice(["conv", "residual", "concat", "split", "se", "depthwise", "grouped", "reshape", "gate",
                                   "pick"])
        if block == "conv":
            cout = draw_choice([4, 6, 8, 16])
            y = b.conv(x, c, cout, draw_choice([1, 3]))
            y = b.bn(y, cout) if draw_int(0, 1) else y
            x, c = b.act(y, draw_choice(ACTIVATIONS)), cout
        elif block == "residual":
            y = b.act(b.conv(x, c, c, 3), draw_choice(ACTIVATIONS))
            y = b.conv(y, c, c, draw_choice([1, 3]))
            x = b.node("Add", [x, y])[0]
        elif block == "concat":
            cout = draw_choice([2, 4, 6])
            y = b.act(b.conv(x, c, cout, 3), "Relu")
            x = b.node("Concat", [x, y], axis=1)[0]
            c += cout
        elif block == "split" and c >= 4 and c % 2 == 0:
            (p, q), sizes = b.split2(x, c)
            p = b.conv(p, sizes[0], sizes[0], 3)
            x = b.node("Concat", [p, q], axis=1)[0]
        elif block == "se":
            pooled = b.node("GlobalAveragePool", [x])[0]
            hidden = max(2, c // 2)
            s = b.act(b.conv(pooled, c, hidden, 1), "Relu")
            s = b.node("HardSigmoid" if draw_int(0, 1) else "Sigmoid", [b.conv(s, hidden, c, 1)])[0]
            x = b.node("Mul", [x, s])[0]
        elif block == "depthwise":
            x = b.act(b.conv(x, c, c, 3, group=c), "Relu")
        elif block == "grouped" and c % 2 == 0:
            x = b.act(b.conv(x, c, c, 3, group=2), "Relu")
        elif block == "gate":  # a per-channel operand computed from a constant at run time
            vector = b.weight([c], 1.0)
            if opset >= 13:
                gate = b.node("Unsqueeze", [vector, b.const_i64([1, 2])])[0]
            else:
                gate = b.node("Unsqueeze", [vector], axes=[1, 2])[0]
            gate = b.node("Sigmoid", [gate])[0] if draw_int(0, 1) else gate
            x = b.node(draw_choice(["Mul", "Add"]), [x, gate])[0]
        elif block == "pick" and c >= 4:  # a constant subset of the channels, in another order
            picks = [int(i) for i in np.random.default_rng(seed + c).permutation(c)[: max(2, c // 2)]]
            x = b.node("Gather", [x, b.const_i64(picks)], axis=1)[0]
            c = len(picks)
        elif block == "reshape":  # [N, C, H, W] -> [N, C, H*W] -> back, both sized by run-time Shape reads
            if draw_choice(["int64", "int32"]) == "int64":
                shape = b.node("Shape", [x])[0]
                lead = b.node("Slice", [shape, b.const_i64([0]), b.const_i64([2]), b.const_i64([0])])[0]
                flat = b.node("Reshape", [x, b.node("Concat", [lead, b.const_i64([-1])], axis=0)[0]])[0]
            else:  # the same in int32 shape arithmetic (Paddle exports)
                flat, shape = b.reshape_int32(x, c, draw_choice(["read", "constant"]))
            flat = b.act(flat, draw_choice(ACTIVATIONS))
            x = b.node("Reshape", [flat, shape])[0]
        if draw_int(0, 3) == 0 and size >= 8:
            x = b.node(draw_choice(["MaxPool", "AveragePool"]), [x], kernel_shape=[2, 2], strides=[2, 2])[0]
            size //= 2
    head = draw_choice(["gap", "flatten"])
    if head == "gap":
        x = b.node("GlobalAveragePool", [x])[0]
        features = c
    else:
        features = c * size * size
    x = b.node("Flatten", [x], axis=1)[0]
    hidden = draw_choice([8, 16])
    x = b.act(b.node("Gemm", [x, b.weight([hidden, features], 1 / np.sqrt(features)), b.weight([hidden], 0.1)],
                     transB=1)[0], "Relu")
    if draw_int(0, 1):
        x = b.node("MatMul", [x, b.weight([hidden, 10], 1 / np.sqrt(hidden))])[0]
    else:
        x = b.node("Gemm", [x, b.weight([hidden, 10], 1 / np.sqrt(hidden)), b.weight([10], 0.1)])[0]
    b.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        b.nodes, "random_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_for_opset(opset))
    onnx.checker.check_model(model, full_check=True)
    return model


def run_input(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """Run a generated model (input named ``input``) in onnxruntime."""
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})


def draw_model(data) -> onnx.ModelProto:
    """A random CNN drawn from a hypothesis ``st.data()`` object."""
    from hypothesis import strategies as st

    return random_cnn(lambda lo, hi: data.draw(st.integers(lo, hi)), lambda xs: data.draw(st.sampled_from(xs)))
