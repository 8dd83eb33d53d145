"""``onnxprune inspect``: what can be pruned in a model, without changing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .analysis.blocks import describe_blocks
from .analysis.cost import infer_shapes, node_key, node_macs
from .analysis.stream import find_streams
from .analysis.vocab import describe_vocabulary, render_vocabulary
from .analysis.weights import find_prunable_weights
from .graph import count_params, opset_version
from .model import load_model
from .passes.structured import describe_groups
from .synthetic import describe_resolution, resolve_inputs


def inspect_model(path: Path, input_shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """A JSON-able description: params, MACs per layer, prunable weights with magnitude stats, groups.

    Dynamic input dims are resolved as ``prune`` resolves them (:func:`resolve_inputs`), so both
    commands report the same MACs and channel groups."""
    loaded = load_model(path)
    model = loaded.model
    resolution = resolve_inputs(model, input_shapes, path=path)
    shapes = infer_shapes(model, resolution.shapes)
    macs_notes: list[str] = []
    macs = node_macs(model, resolution.shapes, shapes=shapes, notes=macs_notes)
    positions = {id(node): i for i, node in enumerate(model.graph.node)}
    params, nonzero = count_params(model)
    layers = []
    for item in find_prunable_weights(model):
        values = item.weight.array().astype(np.float32)
        absval = np.abs(values)
        layers.append({
            "weight": item.name,
            "kind": item.weight.kind,
            "layers": item.node_names(),
            "ops": sorted({u.node.op_type for u in item.uses}),
            "shape": list(item.weight.shape),
            "params": int(values.size),
            "sparsity": float(np.mean(values == 0)) if values.size else 0.0,
            "abs_mean": float(absval.mean()) if values.size else 0.0,
            "abs_max": float(absval.max()) if values.size else 0.0,
            "std": float(values.std()) if values.size else 0.0,
            "reduction_axis": item.reduction_axis,
            "macs": int(sum(macs.get(node_key(u.node, positions.get(id(u.node), -1)), 0) for u in item.uses)),
        })
    info: dict[str, Any] = {
        "model": str(path),
        "ir_version": model.ir_version,
        "opsets": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        "opset": opset_version(model),
        "external_data": loaded.has_external_data,
        "file_bytes": loaded.file_bytes,
        "nodes": len(model.graph.node),
        "inputs": {v.name: shapes.get(v.name) for v in model.graph.input},
        "input_resolution": resolution.to_dict(),
        "outputs": {v.name: shapes.get(v.name) for v in model.graph.output},
        "params": params,
        "nonzero_params": nonzero,
        "macs": int(sum(macs.values())),
        "subgraph_macs": {key: int(macs.get(key, 0)) for key in _control_flow_keys(model)},
        "macs_notes": macs_notes,
        "prunable_weights": layers,
    }
    info["structured"] = describe_groups(model, resolution.shapes)
    info["depth"] = describe_blocks(model, resolution.shapes)
    info["vocabulary"] = describe_vocabulary(model)
    info["hidden"] = find_streams(model, shapes).to_dict()
    return info


def _control_flow_keys(model) -> list[str]:
    """Cost-table keys of the main graph's If/Loop/Scan nodes."""
    return [node_key(node, i) for i, node in enumerate(model.graph.node)
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)]


def render_inspection(info: dict[str, Any]) -> str:
    """The terminal view of :func:`inspect_model`."""
    lines = [
        f"{info['model']}: IR {info['ir_version']}, opsets {info['opsets']}, {info['nodes']} nodes"
        + (", external data" if info["external_data"] else ""),
        f"inputs: {info['inputs']}",
        describe_resolution(info["input_resolution"]),
        f"outputs: {info['outputs']}",
        f"params {info['params']:,} (non-zero {info['nonzero_params']:,}), MACs {info['macs']:,}",
        *[f"  MACs in the subgraphs of {key}: {value:,}" for key, value in info.get("subgraph_macs", {}).items()],
        *[f"  note: {note}" for note in info.get("macs_notes", [])],
        "",
        f"prunable weights ({len(info['prunable_weights'])}):",
    ]
    header = f"  {'weight':<32} {'shape':<18} {'ops':<14} {'params':>10} {'MACs':>14} {'sparsity':>8} {'|w| mean':>9}"
    lines.append(header)
    for w in info["prunable_weights"]:
        lines.append(f"  {w['weight'][:32]:<32} {'x'.join(map(str, w['shape'])):<18} {','.join(w['ops'])[:14]:<14} "
                     f"{w['params']:>10,} {w['macs']:>14,} {100 * w['sparsity']:>7.1f}% {w['abs_mean']:>9.4g}")
    structured = info.get("structured")
    if structured:
        lines.append("")
        groups = structured.get("groups", [])
        frozen = structured.get("frozen", [])
        lines.append(f"structured: {len(groups)} prunable channel groups, {len(frozen)} frozen")
        for g in groups:
            lines.append(f"  group {g['id']}: {g['channels']} channels, ops {','.join(g.get('ops', []))}")
        for f in frozen:
            lines.append(f"  frozen {f['id']}: {f.get('channels')} channels: {f['reason']}")
    depth = info.get("depth")
    if depth:
        lines.append("")
        lines.append(f"depth: {len(depth['blocks'])} removable residual blocks (one x + f(x) each), "
                     f"{len(depth['not_removable'])} not removable" + (f": {depth['reason']}" if depth.get("reason") else ""))
        lines += [f"  block {b['add']}: {b['kind']}, {b['nodes']} nodes" for b in depth["blocks"]]
        lines += [f"  not removable {b['add']}: {b['reason']}" for b in depth["not_removable"]]
    if info.get("vocabulary"):
        lines += ["", *render_vocabulary(info["vocabulary"])]
    lines += _render_hidden(info.get("hidden"))
    return "\n".join(lines)


def _render_hidden(hidden: dict[str, Any] | None) -> list[str]:
    """The residual streams that ``--hidden-sparsity`` can rotate, or why there are none."""
    if hidden is None:
        return []
    lines = ["", f"residual streams (--hidden-sparsity): {len(hidden['streams'])}"]
    for s in hidden["streams"]:
        lines.append(f"  hidden {s['hidden']}, {s['layout']} {s['norm']}: {s['segments']} segments, "
                     f"{len(s['norms'])} norms, {s['writers']} writers + {s['embeddings']} embeddings, "
                     f"{s['readers']} readers" + (f", rotated back for {', '.join(s['restored'])}"
                                                  if s["restored"] else ""))
    lines += [f"  not rotatable: {reason}" for reason in hidden["refused"]]
    return lines
