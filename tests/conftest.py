"""Shared test helpers: fixture paths and ways to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxprune.analysis.registry import RAISE_ENV
from onnxprune.cli import main

# a bug in an op rule fails the test instead of freezing the channels (child processes inherit it)
os.environ.setdefault(RAISE_ENV, "1")
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def run_subprocess(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m onnxprune`` in a child process."""
    return subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def listing(directory: Path) -> list[str]:
    """Every entry under ``directory`` (hidden temp files included)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))
