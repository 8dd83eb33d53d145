"""Turn a run's result dict into a terminal summary, Markdown, or JSON."""

from __future__ import annotations

import math
from typing import Any

NOTE_UNSTRUCTURED = (
    "zeroed weights do not make dense onnxruntime kernels faster; they shrink the compressed "
    "size, and N:M patterns are ready for sparse tensor cores"
)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + fmt.format(*headers)] + ["  " + fmt.format(*r) for r in rows]


def render(report: dict[str, Any], *, markdown: bool = False, verbose: bool = False, limit: int = 15) -> str:
    """A readable summary; ``markdown`` for a .md report, ``verbose`` lists every tensor/group."""
    h = "## " if markdown else ""
    lines: list[str] = []
    title = f"onnxprune {report.get('onnxprune_version', '')}: {report.get('input') or '<model>'}"
    lines.append(("# " if markdown else "") + title + (f" -> {report['output']}" if report.get("output") else ""))
    cfg = report["config"]
    for p in report["passes"]:
        d = p["details"]
        lines.append("")
        if p["name"] == "unstructured":
            what = {"nm": f"N:M pattern {d.get('pattern')}", "threshold": f"threshold |w| <= {d.get('threshold')}"}.get(
                d.get("mode"), f"sparsity {cfg.get('sparsity')} ({d.get('criterion')}, scope {d.get('scope')})")
            lines.append(f"{h}Unstructured pruning: {what}")
            lines.append(f"prunable weights: {len(d['tensors'])} tensors, {_num(d['prunable_params'])} params; "
                         f"zeros {_num(d['zeros'])} ({100 * d['achieved_sparsity']:.2f}%)")
            rows = [[t["weight"], "x".join(map(str, t["shape"])), ",".join(t["ops"]), f"{100 * t['sparsity']:.2f}%"]
                    for t in d["tensors"]]
            shown = rows if verbose or markdown else rows[:limit]
            if shown:
                lines += _table(["weight", "shape", "ops", "sparsity"], shown, markdown)
            if len(shown) < len(rows):
                lines.append(f"  ... {len(rows) - len(shown)} more (--verbose or --report)")
            for s in d.get("skipped", []):
                lines.append(f"  skipped {s['weight']}: {s['reason']}")
            rec = d.get("reconstruction")
            if rec:
                lines.append(f"refitted the kept weights of {rec['layers']} layer(s) by least squares on "
                             f"{rec['samples']} calibration samples")
            repair = d.get("obs")
            if repair:
                lines.append(f"OBS repaired {len(repair['layers'])} layer(s) on {repair['samples']} calibration samples "
                             f"({repair['stages']} onnxruntime pass(es)); relative output error, masked -> repaired:")
                for entry in repair["layers"] if verbose or markdown else repair["layers"][:limit]:
                    lines.append(f"  {entry['layer']} ({entry['algorithm']}, kept: {entry['choice']}): "
                                 f"{entry['rel_error_masked']:.4f} -> {entry['rel_error_repaired']:.4f}")
                for s in repair["skipped"]:
                    lines.append(f"  not repaired {s['weight']} (magnitude mask): {s['reason']}")
        elif p["name"] == "depth":
            _render_depth(d, lines, h, verbose or markdown, markdown, limit)
        elif p["name"] == "hidden":
            _render_hidden(d, lines, h, verbose or markdown, limit)
        elif p["name"] == "structured":
            lines.append(f"{h}Structured pruning: sparsity {d.get('target_sparsity')} "
                         f"({d.get('criterion')}, scope {d.get('scope')}, round-to {d.get('round_to')})")
            lines.append(f"channels: {_num(d.get('channels_total'))} in groups, {_num(d.get('channels_removed'))} removed, "
                         f"{_num(d.get('channels_frozen'))} frozen; params removed {_num(d.get('params_removed'))}, "
                         f"MACs removed {_num(d.get('macs_removed'))}")
            rows = [[str(g["id"]), f"{g['channels_before']} -> {g['channels_after']}", _num(g.get("params_removed")),
                     _num(g.get("macs_removed")), ",".join(g.get("producers", []))[:60]] for g in d.get("groups", [])]
            shown = rows if verbose or markdown else rows[:limit]
            if shown:
                lines += _table(["group", "channels", "params removed", "MACs removed", "producers"], shown, markdown)
            if len(shown) < len(rows):
                lines.append(f"  ... {len(rows) - len(shown)} more groups (--verbose or --report)")
            if d.get("approximate_layernorms"):
                lines.append(f"approximate: channels removed under {len(d['approximate_layernorms'])} LayerNorm(s) "
                             "over the channel axis (--prune-layernorm); the kept channels' statistics change")
            rec = d.get("reconstruction")
            if rec:
                lines.append(f"reconstructed {rec['layers']} layer(s) by least squares on {rec['samples']} calibration "
                             f"samples" + (f"; skipped {len(rec['skipped'])}" if rec["skipped"] else ""))
            folded = d.get("folded_constants") or {}
            if folded.get("consumers"):
                lines.append(f"folded removed channels' constants into {folded['consumers']} consumer bias(es) "
                             f"({folded['exact']} exact, {folded['approximate']} approximate)")
            for reason in folded.get("skipped", []):
                lines.append(f"note: {reason}")
            frozen = d.get("frozen", [])
            if frozen:
                lines.append(f"frozen groups ({len(frozen)}):")
                for f in frozen if (verbose or markdown) else frozen[:limit]:
                    lines.append(f"  {'- ' if markdown else ''}{f['id']} ({f.get('channels')} channels): {f['reason']}")
                if not (verbose or markdown) and len(frozen) > limit:
                    lines.append(f"  ... {len(frozen) - limit} more (--verbose or --report)")
    _render_removed_by_kind(report.get("summary") or {}, lines, h, markdown)
    _render_allocation(report.get("allocation"), lines, h, verbose or markdown, limit)
    quant = report.get("quantization")
    if quant:
        lines.append("")
        lines.append(f"{h}Quantization: {quant['mode']} ({quant['format']})")
        lines.append(f"pruned {_bytes(quant['pruned_bytes'])} -> quantized {_bytes(quant['quantized_bytes'])}; "
                     "the validation below compares the original with the pruned and quantized model")
    _render_validation(report.get("validation"), lines, h, markdown)
    gates = report.get("gates", {})
    if gates.get("failures"):
        lines.append("")
        lines.append("GATES FAILED: " + "; ".join(gates["failures"]))
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    timing = ", ".join(f"{p['name']} {p['seconds']:.2f}s" for p in report["passes"])
    others = ", ".join(f"{k} {v:.2f}s" for k, v in report.get("timings", {}).items() if k != "prune")
    lines.append("")
    lines.append(f"time: {timing}" + (f"; {others}" if others else "")
                 + (" (--low-memory: memory before time)" if report.get("low_memory") else ""))
    for note in caveats(report):
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


KINDS = ("width", "heads", "hidden", "depth", "vocabulary")


def removed_by_kind(passes: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """MACs and params removed per kind: width and heads from the structured pass (its first-order per-group
    figures split by head groups, the rest counted as width), hidden, depth and vocabulary from their passes'
    ``kind`` details (before - after). Empty when no pass of these kinds ran."""
    totals = {kind: {"macs": 0, "params": 0} for kind in KINDS}
    seen = False
    for p in passes:
        d = p.get("details", p)
        if p.get("name") == "structured":
            seen = True
            heads = [g for g in d.get("groups", []) if g.get("heads")]
            head_macs = sum(int(g.get("macs_removed", 0)) for g in heads)
            head_params = sum(int(g.get("params_removed", 0)) for g in heads)
            totals["heads"]["macs"] += head_macs
            totals["heads"]["params"] += head_params
            totals["width"]["macs"] += max(int(d.get("macs_removed") or 0) - head_macs, 0)
            totals["width"]["params"] += max(int(d.get("params_removed") or 0) - head_params, 0)
        elif d.get("kind") in KINDS and "macs_before" in d:
            seen = True
            totals[d["kind"]]["macs"] += int(d["macs_before"]) - int(d.get("macs_after", d["macs_before"]))
            totals[d["kind"]]["params"] += int(d["params_before"]) - int(d.get("params_after", d["params_before"]))
    return totals if seen else {}


def _render_removed_by_kind(summary: dict[str, Any], lines: list[str], h: str, markdown: bool) -> None:
    """The "removed by kind" table (kinds that removed something)."""
    kinds = summary.get("removed_by_kind") or {}
    rows = [[kind, _num(v["macs"]), _num(v["params"])] for kind, v in kinds.items() if v["macs"] or v["params"]]
    if rows:
        lines.append("")
        lines.append(f"{h}Removed by kind")
        lines += _table(["kind", "MACs removed", "params removed"], rows, markdown)


def _render_hidden(d: dict[str, Any], lines: list[str], h: str, full: bool, limit: int) -> None:
    """The hidden-size rotation: per stream the kept widths and how they were chosen, and the readers' refit."""
    lines.append(f"{h}Hidden size by rotation: sparsity {d.get('hidden_sparsity')}; MACs {_num(d.get('macs_before'))} "
                 f"-> {_num(d.get('macs_after'))}")
    for stream in d.get("streams", []):
        lines.append(f"stream {stream['hidden_before']} -> {stream['hidden_after']} on average ({stream['layout']}, "
                     f"bases {stream['bases']}; widths {stream.get('widths_chosen')}): "
                     + " ".join(str(w) for w in stream["widths"]))
        rec = stream.get("reconstruction")
        if rec:
            lines.append(f"refitted {len(rec['layers'])} stream reader(s) by least squares on {rec['samples']} "
                         "calibration samples; relative output error, rotated -> refitted:")
            for entry in rec["layers"] if full else rec["layers"][:limit]:
                lines.append(f"  {entry['layer']}: {entry['error_before']:.4f} -> {entry['error_after']:.4f}")
            if rec["skipped"]:
                lines.append(f"  not refitted: {', '.join(rec['skipped'])}")
    if d.get("reason"):
        lines.append(f"note: {d['reason']}")


def _render_depth(d: dict[str, Any], lines: list[str], h: str, full: bool, markdown: bool, limit: int) -> None:
    """The depth pass: blocks found, their influence, which were removed, and why others are not removable."""
    lines.append(f"{h}Depth pruning: removed {d.get('removed', 0)} of {d.get('blocks_found', 0)} removable residual "
                 f"block(s) (asked {d.get('asked', 0)}; {d.get('score')})")
    lines.append(f"MACs {_num(d.get('macs_before'))} -> {_num(d.get('macs_after'))}, params "
                 f"{_num(d.get('params_before'))} -> {_num(d.get('params_after'))}")
    rows = [[b["add"][:60], b["kind"], f"{b['influence']:.6f}", "removed" if b["removed"] else "kept"]
            for b in d.get("blocks", [])]
    shown = rows if full else rows[:limit]
    if shown:
        lines += _table(["block (Add)", "kind", "influence", ""], shown, markdown)
    if len(shown) < len(rows):
        lines.append(f"  ... {len(rows) - len(shown)} more blocks (--verbose or --report)")
    if d.get("reason"):
        lines.append(f"note: {d['reason']}")
    for b in d.get("not_removable", []) if full else d.get("not_removable", [])[:limit]:
        lines.append(f"  {'- ' if markdown else ''}not removable {b['add']}: {b['reason']}")


def caveats(report: dict[str, Any]) -> list[str]:
    """How to read the figures: the same notes in the terminal, JSON (``notes``), Markdown and HTML."""
    notes = []
    v = report.get("validation") or {}
    for provider, entry in v.get("providers", {}).items():
        lat = entry["latency"]
        if lat.get("change") == "no measurable change":
            notes.append(f"latency on {provider}: no measurable change (speedup {lat['speedup']:.2f}x is within the "
                         f"spread of {lat['original']['runs']} interleaved runs: the p25-p75 ranges of the two models "
                         f"overlap, or fewer than 5 runs)")
    if any(p["name"] == "unstructured" for p in report.get("passes", [])):
        notes.append(NOTE_UNSTRUCTURED)
    return notes


def speedup_text(latency: dict[str, Any]) -> str:
    """``1.85x faster``, ``0.80x (slower)`` or ``no measurable change``."""
    change = latency.get("change")
    if change == "no measurable change":
        return "no measurable change"
    return f"{latency['speedup']:.2f}x" + (" (slower)" if change == "slower" else "")


def nonfinite_text(result: dict[str, Any]) -> str:
    """``pruned: 8 NaN, 0 Inf`` for an output with non-finite values, else an empty string."""
    parts = [f"{side}: {counts['nan']} NaN, {counts['inf']} Inf"
             for side, counts in result.get("nonfinite", {}).items() if counts.get("nan") or counts.get("inf")]
    return "; ".join(parts)


def _render_allocation(alloc: dict[str, Any] | None, lines: list[str], h: str, full: bool, limit: int) -> None:
    """The allocation line ("sensitivity (N groups measured, X s)" or "uniform (reason)") and the chosen ratios."""
    if not alloc:
        return
    lines.append("")
    if alloc.get("method") == "uniform":
        lines.append(f"allocation: uniform ({alloc['reason']})")
        return
    if alloc.get("groups_measured") is not None:  # by default with calibration data: the uniform plan's MACs
        lines.append(f"{h}allocation: sensitivity ({alloc['groups_measured']} groups measured, "
                     f"{alloc['seconds']:.1f} s)"
                     f"; MACs of the uniform plan: {alloc['target_macs']:.3f}")
        worst = alloc.get("costliest")
        if worst:
            lines.append(f"costliest group alone: {', '.join(worst['producers'])[:60]} (rel L2 {worst['rel_l2']:.3g} "
                         f"at {worst['ratio']:g})")
    else:
        target = f"MACs {alloc['target_macs']}" if alloc.get("target_macs") is not None else \
            f"params {alloc['target_params']}"
        lines.append(f"{h}Allocation for target {target} (from measured sensitivity)")
        if alloc.get("depth"):
            _render_depth_allocation(alloc["depth"], lines)
    ratios = sorted(alloc["ratios"], key=lambda entry: -entry["ratio"])
    for entry in ratios if full else ratios[:limit]:
        lines.append(f"  {entry['ratio']:.3f}  {', '.join(entry['producers'])[:70]}")
    if not full and len(ratios) > limit:
        lines.append(f"  ... {len(ratios) - limit} more (--verbose or --report)")


def _render_depth_allocation(depth: dict[str, Any], lines: list[str]) -> None:
    """Which blocks the MAC target removed and why: each block's measured loss per MAC saved against width's."""
    width = depth.get("width_cost_per_mac")
    lines.append(f"blocks: {depth['chosen']} of {depth['removable']} removable chosen (at most {depth['limit']}), by "
                 "rel L2 of the outputs per MAC saved" + (f"; width's costliest step taken: {width:.3g}"
                                                          if width is not None else "; no width step before them"))
    for row in depth["blocks"]:
        cost = f"{row['cost_per_mac']:.3g}" if row["cost_per_mac"] is not None else "-"
        lines.append(f"  {'removed' if row['chosen'] else 'kept':7}  {cost:>9}  {row['add'][:50]}  ({row['why']})")
    lines.append("ratios for the rest of the target:")


def _render_validation(v: dict[str, Any] | None, lines: list[str], h: str, markdown: bool) -> None:
    if not v:
        return
    lines.append("")
    lines.append(f"{h}Validation")
    model = v.get("model", {})
    o, p = model.get("original", {}), model.get("pruned", {})
    size = v.get("size", {})
    so, sp = size.get("original", {}), size.get("pruned", {})
    rows = [
        ["params", _num(o.get("params")), _num(p.get("params")), _ratio(p.get("params"), o.get("params"))],
        ["non-zero params", _num(o.get("nonzero_params")), _num(p.get("nonzero_params")),
         _ratio(p.get("nonzero_params"), o.get("nonzero_params"))],
        ["MACs", _num(o.get("macs")), _num(p.get("macs")), _ratio(p.get("macs"), o.get("macs"))],
        ["file size", _bytes(so.get("bytes")), _bytes(sp.get("bytes")), _ratio(sp.get("bytes"), so.get("bytes"))],
        ["zip size", _bytes(so.get("zip_bytes")), _bytes(sp.get("zip_bytes")), _ratio(sp.get("zip_bytes"), so.get("zip_bytes"))],
    ]
    lines += _table(["", "original", "pruned", "pruned/original"], rows, markdown)
    if v.get("status") == "not validated":
        lines.append(f"NOT VALIDATED: {v.get('reason')}")
        return
    inputs = v.get("inputs", {})
    shapes = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in inputs.get("shapes", {}).items())
    how = inputs.get("resolution", {}).get("how")
    lines.append(f"inputs: {inputs_text(inputs)} ({shapes}{'; ' + how if how else ''})")
    acc = v.get("accuracy")
    if acc:
        lines.append(f"accuracy on {acc['samples']} labelled samples: top-1 {100 * acc['original']['top1']:.2f}% -> "
                     f"{100 * acc['pruned']['top1']:.2f}% (drop {acc['top1_drop_points']:.2f} points), top-5 "
                     f"{100 * acc['original']['top5']:.2f}% -> {100 * acc['pruned']['top5']:.2f}%"
                     + (f"; {acc['nonfinite']} non-finite logits" if acc.get("nonfinite") else ""))
    for provider, entry in v.get("providers", {}).items():
        lines.append(f"{provider}:")
        rows = [[name, _num(r.get("cosine")), _num(r.get("rel_l2")), _num(r.get("max_abs")),
                 _num(r.get("top1_agreement")), nonfinite_text(r) or "-"] for name, r in entry["outputs"].items()]
        lines += _table(["output", "cosine", "rel L2", "max abs", "top-1 agree", "NaN/Inf"], rows, markdown)
        lines += [f"  {name}: compared on the {r['columns']['compared']} of {r['columns']['of']} last-axis columns the "
                  "pruned model computes (the removed tokens' columns hold the lowest value)"
                  for name, r in entry["outputs"].items() if r.get("columns")]
        lat = entry["latency"]
        lines.append(f"  latency (threads {v.get('threads')}, {lat['original']['runs']} interleaved runs): "
                     f"original median {lat['original']['median_ms']:.3f} ms (p90 {lat['original']['p90_ms']:.3f}), "
                     f"pruned median {lat['pruned']['median_ms']:.3f} ms (p90 {lat['pruned']['p90_ms']:.3f}), "
                     + (f"speedup {speedup_text(lat)}" if lat.get("change") != "no measurable change"
                        else f"no measurable change (speedup {lat['speedup']:.2f}x within the noise)"))
    lines.append("  top-1 agree: classifier-like outputs only; one-element outputs: absolute error only "
                 "(docs/report.md)")


def inputs_text(inputs: dict[str, Any]) -> str:
    """Where the validation inputs came from, in words."""
    if inputs.get("source") == "calibration hold-out":
        first, last = inputs.get("held_out", [0, 0])
        which = ("its only sample, also used for calibration" if inputs.get("also_calibration") else
                 f"samples {first}-{last} of {inputs.get('of')}, the last 25%, not used for calibration")
        return f"calibration hold-out of {inputs.get('calibration_data')} ({which})"
    return str(inputs.get("source"))


def _ratio(a, b) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.3f}"
