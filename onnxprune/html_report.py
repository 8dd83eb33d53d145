"""``--report report.html``: one self-contained page (inline CSS, no scripts, no network)."""

from __future__ import annotations

import html
from typing import Any

from .report import caveats, inputs_text, nonfinite_text, speedup_text

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2433;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde2ea;padding-bottom:.3rem}
.sub{color:#5b667a;margin-top:0}table{border-collapse:collapse;width:100%;margin:.6rem 0}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #eef1f5;vertical-align:middle}
th{background:#f5f7fa;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{background:#eef1f5;border-radius:3px;height:.9rem;width:260px;position:relative}
.fill{background:#3b82f6;height:100%;border-radius:3px}.fill.kept{background:#10b981}.fill.after{background:#f59e0b}
.cards{display:flex;flex-wrap:wrap;gap:.8rem}.card{border:1px solid #dde2ea;border-radius:6px;padding:.6rem .9rem;min-width:150px}
.card b{display:block;font-size:1.2rem}.card.bad{border-color:#fca5a5}.bad{color:#b91c1c}.ok{color:#047857}.warn{background:#fff7ed;border:1px solid #fed7aa;padding:.5rem .8rem;border-radius:6px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else _e(value)


def _bar(fraction: float, css: str = "") -> str:
    width = max(0.0, min(1.0, float(fraction))) * 100
    return f'<div class="bar"><div class="fill {css}" style="width:{width:.1f}%"></div></div>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: Any, numeric: bool = False) -> str:
    return f'<td class="num">{_num(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def render_html(report: dict[str, Any]) -> str:
    """The whole report as an HTML page."""
    parts = [(f"<h1>onnxprune report</h1><p class='sub'>{_e(report.get('input') or '<model>')} &rarr; "
             f"{_e(report.get('output') or '(in memory)')} &middot; onnxprune {_e(report.get('onnxprune_version'))}</p>")]
    parts.append(_summary_cards(report))
    notes = report.get("notes", caveats(report))
    if notes:
        parts.append("<ul class='notes'>" + "".join(f"<li>note: {_e(n)}</li>" for n in notes) + "</ul>")
    for p in report.get("passes", []):
        if p["name"] == "unstructured":
            parts.append(_unstructured(p["details"]))
        elif p["name"] == "structured":
            parts.append(_structured(p["details"]))
        elif p["name"] == "depth":
            parts.append(_depth(p["details"]))
    parts.append(_removed_by_kind(report.get("summary") or {}))
    if report.get("quantization"):
        q = report["quantization"]
        parts.append(f"<h2>Quantization</h2><p>{_e(q['mode'])} ({_e(q['format'])}): pruned {_num(q['pruned_bytes'])} bytes "
                     f"&rarr; quantized {_num(q['quantized_bytes'])} bytes.</p>")
    parts.append(_validation(report.get("validation")))
    gates = report.get("gates", {})
    if gates.get("failures"):
        parts.append("<h2>Gates</h2><p class='bad'>" + "<br>".join(_e(f) for f in gates["failures"]) + "</p>")
    for warning in report.get("warnings", []):
        parts.append(f"<p class='warn'>{_e(warning)}</p>")
    timing = "".join(f"<tr>{_td(p['name'])}{_td(round(p['seconds'], 3), True)}</tr>" for p in report.get("passes", []))
    timing += "".join(f"<tr>{_td(k)}{_td(round(v, 3), True)}</tr>" for k, v in report.get("timings", {}).items())
    parts.append(f"<h2>Time (seconds)</h2><table><tbody>{timing}</tbody></table>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>onnxprune report</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")


def _summary_cards(report: dict[str, Any]) -> str:
    s, v = report.get("summary", {}), report.get("validation") or {}
    model = v.get("model", {})
    o, p = model.get("original", {}), model.get("pruned", {})
    cards = []
    if "achieved_sparsity" in s:
        cards.append(("sparsity", f"{100 * (s['achieved_sparsity'] or 0):.1f}%"))
    if "channels_removed" in s:
        cards.append(("channels removed", f"{s['channels_removed']:,} / {s['channels_total']:,}"))
    if o.get("params"):
        cards.append(("params kept", f"{100 * p.get('params', 0) / o['params']:.1f}%"))
    if o.get("macs"):
        cards.append(("MACs kept", f"{100 * p.get('macs', 0) / o['macs']:.1f}%"))
    worst = v.get("worst", {})
    if v.get("status") == "not validated":
        cards.append(("validation", "not validated"))
    if worst.get("nonfinite"):
        cards.append(("outputs with NaN/Inf", str(len(worst["nonfinite"]))))
    if worst.get("cosine") is not None:
        cards.append(("worst cosine", f"{worst['cosine']:.4f}"))
    for entry in v.get("providers", {}).values():
        cards.append(("speedup", speedup_text(entry["latency"])))
        break
    bad = {"validation", "outputs with NaN/Inf"}
    return "<div class='cards'>" + "".join(
        f"<div class='card{' bad' if k in bad else ''}'>{_e(k)}<b>{_e(val)}</b></div>" for k, val in cards) + "</div>"


def _unstructured(d: dict[str, Any]) -> str:
    rows = [[_td(t["weight"]), _td("x".join(map(str, t["shape"]))), _td(",".join(t["ops"])), _td(t["params"], True),
             f"<td>{_bar(t['sparsity'])}</td>", _td(f"{100 * t['sparsity']:.1f}%", True)] for t in d["tensors"]]
    skipped = "".join(f"<li><code>{_e(s['weight'])}</code>: {_e(s['reason'])}</li>" for s in d.get("skipped", []))
    return (f"<h2>Unstructured pruning ({_e(d.get('mode'))}, {_e(d.get('criterion'))}, scope {_e(d.get('scope'))})</h2>"
            f"<p>{_num(d['zeros'])} of {_num(d['prunable_params'])} prunable weights are zero "
            f"({100 * d['achieved_sparsity']:.2f}%).</p><h3>Sparsity per layer</h3>"
            + _table(["weight", "shape", "ops", "params", "sparsity", ""], rows)
            + (f"<h3>Skipped</h3><ul>{skipped}</ul>" if skipped else ""))


def _structured(d: dict[str, Any]) -> str:
    rows = [[_td(g["id"]), _td(", ".join(g["producers"])[:80]), _td(f"{g['channels_after']} / {g['channels_before']}"),
             f"<td>{_bar(g['channels_after'] / max(1, g['channels_before']), 'kept')}</td>",
             _td(g["params_removed"], True), _td(g["macs_removed"], True)] for g in d.get("groups", [])]
    layers = [[_td(layer["node"]), _td(layer["macs_before"], True), _td(layer["macs_after"], True),
               f"<td>{_bar(layer['macs_after'] / max(1, layer['macs_before']), 'after')}</td>"]
              for layer in d.get("layers", [])]
    frozen = "".join(f"<tr>{_td(f['id'])}{_td(f['channels'], True)}{_td(f['reason'])}</tr>" for f in d.get("frozen", []))
    return (f"<h2>Structured pruning (sparsity {_e(d.get('target_sparsity'))}, {_e(d.get('criterion'))}, "
            f"scope {_e(d.get('scope'))}, round-to {_e(d.get('round_to'))})</h2>"
            f"<p>{_num(d.get('channels_removed'))} of {_num(d.get('channels_total'))} channels removed, "
            f"{_num(d.get('channels_frozen'))} frozen; {_change(d, 'params')}; {_change(d, 'macs')}.</p>"
            "<h3>Channels kept per group</h3>"
            + _table(["group", "producers", "kept", "", "params removed", "MACs removed"], rows)
            + "<h3>MACs per layer, before and after</h3>"
            + _table(["layer", "MACs before", "MACs after", "after / before"], layers)
            + (f"<h3>Frozen channels</h3><table><thead><tr><th>group</th><th>channels</th><th>reason</th></tr></thead>"
               f"<tbody>{frozen}</tbody></table>" if frozen else ""))


def _change(d: dict[str, Any], what: str) -> str:
    """``MACs a &rarr; b`` / ``params a &rarr; b`` from a pass's ``<what>_before`` / ``<what>_after``."""
    label = "MACs" if what == "macs" else what
    return f"{label} {_num(d.get(what + '_before'))} &rarr; {_num(d.get(what + '_after'))}"


def _depth(d: dict[str, Any]) -> str:
    rows = [[_td(b["add"]), _td(b["kind"]), _td(round(b["influence"], 6), True), _td("removed" if b["removed"] else "kept")]
            for b in d.get("blocks", [])]
    others = "".join(f"<li><code>{_e(b['add'])}</code>: {_e(b['reason'])}</li>" for b in d.get("not_removable", []))
    return (f"<h2>Depth pruning</h2><p>{_num(d.get('removed', 0))} of {_num(d.get('blocks_found', 0))} removable "
            f"residual blocks removed (asked {_num(d.get('asked', 0))}; {_e(d.get('score'))}); "
            f"{_change(d, 'macs')}, {_change(d, 'params')}.</p>"
            + (f"<p>{_e(d['reason'])}</p>" if d.get("reason") else "")
            + _table(["block (Add)", "kind", "influence", ""], rows)
            + (f"<h3>Not removable</h3><ul>{others}</ul>" if others else ""))


def _removed_by_kind(summary: dict[str, Any]) -> str:
    kinds = summary.get("removed_by_kind") or {}
    rows = [[_td(kind), _td(v["macs"], True), _td(v["params"], True)] for kind, v in kinds.items()
            if v["macs"] or v["params"]]
    return "<h2>Removed by kind</h2>" + _table(["kind", "MACs removed", "params removed"], rows) if rows else ""


def _validation(v: dict[str, Any] | None) -> str:
    if not v:
        return "<h2>Validation</h2><p>not run (--no-validate)</p>"
    model, size = v.get("model", {}), v.get("size", {})
    rows = []
    for label, key, src in (("params", "params", model), ("non-zero params", "nonzero_params", model),
                            ("MACs", "macs", model), ("file bytes", "bytes", size), ("zip bytes", "zip_bytes", size)):
        a, b = src.get("original", {}).get(key), src.get("pruned", {}).get(key)
        ratio = b / a if a else None
        rows.append([_td(label), _td(a, True), _td(b, True), _td(None if ratio is None else round(ratio, 4), True),
                     f"<td>{_bar(ratio or 0, 'after')}</td>"])
    parts = ["<h2>Validation</h2>", _table(["", "original", "pruned", "pruned / original", ""], rows)]
    if v.get("status") == "not validated":
        return "".join(parts) + f"<p class='bad'>Not validated: {_e(v.get('reason'))}</p>"
    parts.append(f"<p>inputs: {_e(inputs_text(v.get('inputs', {})))}</p>")
    acc = v.get("accuracy")
    if acc:
        parts.append(f"<h3>Accuracy ({acc['samples']} labelled samples)</h3>" + _table(["", "top-1", "top-5"], [
            [_td("original"), _td(acc["original"]["top1"], True), _td(acc["original"]["top5"], True)],
            [_td("pruned"), _td(acc["pruned"]["top1"], True), _td(acc["pruned"]["top5"], True)]])
            + f"<p>top-1 drop: {acc['top1_drop_points']:.2f} points</p>")
    for provider, entry in v.get("providers", {}).items():
        outs = [[_td(name), _td(r.get("cosine"), True), _td(r.get("rel_l2"), True), _td(r.get("max_abs"), True),
                 _td(r.get("top1_agreement"), True), f"<td class='bad'>{_e(nonfinite_text(r))}</td>"]
                for name, r in entry["outputs"].items()]
        lat = entry["latency"]
        parts.append(f"<h3>{_e(provider)}</h3>" + _table(["output", "cosine", "rel. L2", "max abs", "top-1 agreement",
                                                          "NaN/Inf"], outs))
        parts.append(_table(["latency", "median ms", "p90 ms", "runs"], [
            [_td("original"), _td(lat["original"]["median_ms"], True), _td(lat["original"]["p90_ms"], True),
             _td(lat["original"]["runs"], True)],
            [_td("pruned"), _td(lat["pruned"]["median_ms"], True), _td(lat["pruned"]["p90_ms"], True),
             _td(lat["pruned"]["runs"], True)]]) + f"<p>speedup: {_e(speedup_text(lat))} (median ratio "
            f"{lat['speedup']:.2f}x, interleaved, {_e(v.get('threads'))} thread(s))</p>")
    parts.append("<p class='sub'>top-1 agreement: classifier-like outputs only; one-element outputs: absolute error "
                 "only (docs/report.md)</p>")
    return "".join(parts)
