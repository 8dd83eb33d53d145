"""Would onnx-graphsurgeon do onnxprune's graph clean-up? Its import -> cleanup -> toposort -> export round trip on
unchanged fixtures, compared byte for byte with the input, timed next to onnxprune's own dead-node removal.

    python -m pip install onnx-graphsurgeon   # not a dependency of onnxprune (README, "Dependencies")
    python bench/bench_graphsurgeon.py
"""

import statistics
import sys
import time
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.graph import remove_dead_nodes

for name in ["cnn.onnx", "transformers/bert_ts.onnx", "transformers/llama_ts.onnx", "int32/paddle_cls.onnx"]:
    model = onnx.load(str(ROOT / "fixtures" / name))
    ref = model.SerializeToString()
    t_gs, t_own = [], []
    for _ in range(5):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        start = time.perf_counter()
        out = gs.export_onnx(gs.import_onnx(m).cleanup().toposort())
        t_gs.append(time.perf_counter() - start)
        m2 = onnx.ModelProto()
        m2.CopyFrom(model)
        start = time.perf_counter()
        remove_dead_nodes(m2)
        t_own.append(time.perf_counter() - start)
    same = out.SerializeToString() == ref
    own_same = m2.SerializeToString() == ref
    diffs = []
    for what, a, b in (("nodes", out.graph.node, model.graph.node), ("initializers", out.graph.initializer,
                        model.graph.initializer), ("value_info", out.graph.value_info, model.graph.value_info),
                       ("opset_import", out.opset_import, model.opset_import),
                       ("metadata_props", out.metadata_props, model.metadata_props)):
        if list(a) != list(b):
            diffs.append(what)
    print(f"{name}: graphsurgeon round trip byte-identical={same} (differs in: {', '.join(diffs) or '-'}); "
          f"median {statistics.median(t_gs) * 1000:.1f} ms vs remove_dead_nodes "
          f"{statistics.median(t_own) * 1000:.1f} ms (identical={own_same})")
