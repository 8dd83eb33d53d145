"""The self-contained HTML report: structure (default run) and rendering in headless Chromium (slow)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from .conftest import FIXTURES, run_cli


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_data(self, data):
        self.text.append(data)


def make_report(tmp_path, *args) -> str:
    path = tmp_path / "report.html"
    code, _, err = run_cli(*args, "-o", tmp_path / "out.onnx", "--report", path, "--runs", "2")
    assert code == 0, err
    return path.read_text()


@pytest.mark.parametrize("args, words", [
    ((FIXTURES / "cnn.onnx", "--sparsity", "0.6"), ["Unstructured pruning", "Sparsity per layer", "Validation"]),
    ((FIXTURES / "arch" / "convnext.onnx", "--structured", "--sparsity", "0.5"),
     ["Structured pruning", "Channels kept per group", "MACs per layer", "Frozen channels", "LayerNormalization"]),
])
def test_html_report_is_self_contained(tmp_path, args, words):
    page = make_report(tmp_path, *args)
    parser = Collector()
    parser.feed(page)
    text = " ".join(parser.text)
    for word in words:
        assert word in text
    assert "script" not in parser.tags and parser.urls == [], "no scripts, no external resources"
    assert not re.search(r"https?://", page)
    assert page.count('class="bar"') >= 3


@pytest.mark.slow
def test_html_report_renders_in_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium package is not installed: apt-get install -y chromium")
    page = tmp_path / "report.html"
    page.write_text(make_report(tmp_path, FIXTURES / "arch" / "resnet18.onnx", "--structured", "--sparsity", "0.5"))
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--window-size=1200,1600",
         f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
