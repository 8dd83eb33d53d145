"""Reports written to files: JSON, Markdown or HTML by the file's extension, atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UsageError
from .html_report import render_html
from .outputs import check_target, write_text_atomic
from .report import render


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_report_path(path: Path) -> None:
    """Refuse a report path we cannot write, before any work is done (the output guard's rules and a known
    extension; :class:`onnxprune.outputs.OutputGuard` also keeps it apart from the run's other files)."""
    if path.suffix.lower() not in (".json", ".md", ".markdown", ".html", ".htm"):
        raise UsageError(f"{{report}} {path}: use a .json, .md or .html file name", options=("report",))
    check_target(path, "report", force=True)


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write JSON, Markdown or HTML by extension, atomically (a temporary file beside it, then a rename)."""
    if path.suffix.lower() == ".json":
        text = json.dumps(report, indent=2, sort_keys=True, default=_json_default, allow_nan=True) + "\n"
    elif path.suffix.lower() in (".html", ".htm"):
        text = render_html(report)
    else:
        text = render(report, markdown=True)
    write_text_atomic(Path(path), text, "report")
