"""External data containment, checked by onnxprune itself whatever the onnx version: a location must be a normalised
relative path to a regular file inside the model's folder, with no symbolic link on the way. Anything else is refused
with exit 3 naming the tensor and the location, before a path outside the folder is opened (an outside FIFO would
block the run if it were) and before anything is written."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import onnx
import pytest

from .conftest import FIXTURES, listing, run_subprocess
from .test_bad_input import assert_error

SOURCE = FIXTURES / "cnn_external"
FIRST = "stem.weight"  # the first tensor stored externally in the fixture


def relocate(model_path, location):
    """Point every external tensor of the model at ``location`` (the proto is rewritten, the data untouched)."""
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


@pytest.fixture
def layout(tmp_path):
    """``tmp_path/m/model.onnx`` (data moved away), and ``tmp_path/outside/`` with the real data and a FIFO."""
    (tmp_path / "m").mkdir()
    (tmp_path / "outside").mkdir()
    shutil.copy(SOURCE / "model.onnx", tmp_path / "m" / "model.onnx")
    shutil.copy(SOURCE / "model.onnx.data", tmp_path / "outside" / "model.onnx.data")
    os.mkfifo(tmp_path / "outside" / "fifo")
    return tmp_path


def build(root, case):
    """Make the model folder for ``case``; returns the location written into the model."""
    folder, outside = root / "m", root / "outside"
    if case == "link to an outside file":
        (folder / "model.onnx.data").symlink_to("../outside/model.onnx.data")
        return "model.onnx.data"
    if case == "link to an outside FIFO":
        (folder / "model.onnx.data").symlink_to(outside / "fifo")
        return "model.onnx.data"
    if case == "folder link leading outside":
        (folder / "w").symlink_to(outside)
        return "w/model.onnx.data"
    if case == "link inside the folder":
        shutil.copy(outside / "model.onnx.data", folder / "real.data")
        (folder / "model.onnx.data").symlink_to("real.data")
        return "model.onnx.data"
    if case == "absolute":
        return str(outside / "model.onnx.data")
    if case == "proc":
        return "/proc/self/environ"
    if case in ("../outside/model.onnx.data", "./model.onnx.data", "w//model.onnx.data", "", "."):
        shutil.copy(outside / "model.onnx.data", folder / "model.onnx.data")
        return case
    if case == "FIFO in the folder":
        os.mkfifo(folder / "model.onnx.data")
        return "model.onnx.data"
    if case == "folder":
        (folder / "model.onnx.data").mkdir()
        return "model.onnx.data"
    if case == "device":
        if os.geteuid() != 0:
            pytest.skip("device nodes need root")
        os.mknod(folder / "model.onnx.data", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        return "model.onnx.data"
    raise AssertionError(case)


CASES = ["link to an outside file", "link to an outside FIFO", "folder link leading outside", "link inside the folder",
         "absolute", "proc", "../outside/model.onnx.data", "./model.onnx.data", "w//model.onnx.data", ".", "",
         "FIFO in the folder", "folder", "device"]
WORDS = {"link to an outside file": "leading outside", "link to an outside FIFO": "leading outside",
         "folder link leading outside": "leading outside", "link inside the folder": "symbolic link",
         "absolute": "absolute", "proc": "absolute", "FIFO in the folder": "not a regular file",
         "folder": "not a regular file", "device": "not a regular file"}


def snapshot(root):
    return {str(p.relative_to(root)): (os.lstat(p).st_mode, os.lstat(p).st_size, os.lstat(p).st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def run_case(root, case, python=sys.executable):
    location = build(root, case)
    relocate(root / "m" / "model.onnx", location)
    before = snapshot(root)
    proc = subprocess.run([python, "-m", "onnxprune", str(root / "m" / "model.onnx"), "--sparsity", "0.5",
                           "--no-validate", "-o", str(root / "out.onnx")], capture_output=True, text=True, timeout=120, check=False)
    assert_error(proc.returncode, proc.stderr, 3, FIRST, repr(location), WORDS.get(case, "normalised"))
    assert snapshot(root) == before, "nothing written, nothing touched"
    return proc


@pytest.mark.parametrize("case", CASES)
def test_location_outside_or_odd_is_refused(layout, case):
    run_case(layout, case)


def test_location_in_a_subfolder_is_read(tmp_path):
    """A normalised relative location in a real subfolder is fine, and the output carries the weights over."""
    (tmp_path / "m" / "weights").mkdir(parents=True)
    shutil.copy(SOURCE / "model.onnx", tmp_path / "m" / "model.onnx")
    shutil.copy(SOURCE / "model.onnx.data", tmp_path / "m" / "weights" / "model.onnx.data")
    relocate(tmp_path / "m" / "model.onnx", "weights/model.onnx.data")
    proc = run_subprocess(tmp_path / "m" / "model.onnx", "--sparsity", "0.5", "--no-validate", "-o",
                          tmp_path / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "out.onnx.data" in listing(tmp_path)
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_inspect_refuses_the_same_locations(layout):
    build(layout, "link to an outside file")
    relocate(layout / "m" / "model.onnx", "model.onnx.data")
    proc = run_subprocess("inspect", layout / "m" / "model.onnx")
    assert_error(proc.returncode, proc.stderr, 3, FIRST, "leading outside")


OLDEST_ONNX = "1.16.2"  # the oldest release pyproject's onnx>=1.16 allows (latest patch)


@pytest.fixture(scope="module")
def oldest_onnx_python(tmp_path_factory):
    """A venv (with the system packages) whose onnx is the oldest pyproject allows; needs PyPI."""
    venv = tmp_path_factory.mktemp("venv") / "onnx-oldest"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", f"onnx=={OLDEST_ONNX}"], capture_output=True,
                             text=True, timeout=900, check=False)
    if install.returncode != 0:
        pytest.fail(f"cannot install onnx=={OLDEST_ONNX}: {install.stderr[-2000:]}")
    version = subprocess.run([python, "-c", "import onnx; print(onnx.__version__)"], capture_output=True, text=True, check=False)
    assert version.stdout.strip() == OLDEST_ONNX, version.stderr
    return python


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_containment_under_the_oldest_onnx(layout, case, oldest_onnx_python):
    """onnx 1.16 itself reads a linked-out data file (and onnxprune used to copy it into the output)."""
    run_case(layout, case, python=oldest_onnx_python)


@pytest.mark.parametrize("case", ["absolute", "link to an outside FIFO", "../outside/model.onnx.data"])
def test_validate_api_refuses_the_same_locations(layout, case):
    """``onnxprune.validate()`` hands model paths to onnxruntime, which would read the external data: the same
    containment check runs first and raises before any outside file is opened."""
    import onnxprune
    from onnxprune.errors import ModelReadError

    location = build(layout, case)
    relocate(layout / "m" / "model.onnx", location)
    with pytest.raises(ModelReadError, match=FIRST):
        onnxprune.validate(layout / "m" / "model.onnx", layout / "m" / "model.onnx")
