"""The output guard: every path onnxprune writes (-o, <output>.data, --report, --save-recipe, sensitivity --json and
--plot) is refused with exit 7 and one line when it would replace an input, another output of the run, an existing
file without --force, or anything but a regular file; and nothing at all is then read past the check or written."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat

import onnx
import pytest

from onnxprune.outputs import TEMP_PATTERN, sweep_stale

from .conftest import FIXTURES, listing, run_cli
from .test_bad_input import assert_error

CNN = FIXTURES / "cnn.onnx"
QUICK = ("--sparsity", "0.5", "--no-validate")


def snapshot(folder):
    """Every entry under ``folder`` with what it is: file hash, link target, device number, or kind."""
    state = {}
    for path in sorted(folder.rglob("*")):
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            state[str(path.relative_to(folder))] = ("link", os.readlink(path))
        elif stat.S_ISREG(info.st_mode):
            state[str(path.relative_to(folder))] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            state[str(path.relative_to(folder))] = (stat.S_IFMT(info.st_mode), info.st_rdev)
    return state


@pytest.fixture
def work(tmp_path):
    shutil.copy(CNN, tmp_path / "model.onnx")
    return tmp_path


def refused(folder, *args, words=()):
    """Run the CLI; it must exit 7 with one line naming ``words`` and leave ``folder`` exactly as it was."""
    before = snapshot(folder)
    code, _, err = run_cli(*args)
    assert_error(code, err, 7, *words)
    assert snapshot(folder) == before


def test_save_recipe_over_the_input_model(work):
    """It used to replace the input model with YAML and exit 0."""
    refused(work, work / "model.onnx", *QUICK, "--save-recipe", work / "model.onnx", "--force",
            words=["input model", "recipe"])


def test_save_recipe_over_the_output(work):
    refused(work, work / "model.onnx", *QUICK, "-o", work / "out.onnx", "--save-recipe", work / "out.onnx",
            words=["same file"])


def test_two_reports_on_the_same_file(work, monkeypatch):
    monkeypatch.chdir(work)
    (work / "sub").mkdir()
    refused(work, "model.onnx", *QUICK, "--report", "r.json", "--report", "./sub/../r.json", words=["same file"])


def test_report_over_the_output(work):
    refused(work, work / "model.onnx", *QUICK, "-o", work / "o.json", "--report", work / "o.json", words=["same file"])


def test_existing_report_needs_force_and_is_replaced_by_a_rename(work):
    """Without --force an existing report is kept; with it, a new file is renamed into place (a hard link to the
    old one still holds the old bytes: nothing was written into the old file)."""
    (work / "r.json").write_text("keep me")
    refused(work, work / "model.onnx", *QUICK, "--report", work / "r.json", words=["report exists", "--force"])
    os.link(work / "r.json", work / "old.json")
    code, _, err = run_cli(work / "model.onnx", *QUICK, "--report", work / "r.json", "--force")
    assert code == 0, err
    assert (work / "old.json").read_text() == "keep me"
    assert '"schema_version"' in (work / "r.json").read_text()
    assert (work / "r.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert listing(work) == ["model.onnx", "model.pruned.onnx", "old.json", "r.json"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_recipe_over_the_inputs_external_data(tmp_path):
    """The input's data file is known once the model is read: refused then, before any pruning or writing."""
    shutil.copytree(FIXTURES / "cnn_external", tmp_path / "ext")
    refused(tmp_path, tmp_path / "ext" / "model.onnx", *QUICK, "--save-recipe", tmp_path / "ext" / "model.onnx.data",
            "--force", words=["external data", "recipe"])


def test_output_hard_linked_to_the_input(work):
    os.link(work / "model.onnx", work / "alias.onnx")
    refused(work, work / "model.onnx", *QUICK, "-o", work / "alias.onnx", "--force", words=["input model"])


def test_recipe_over_the_config_it_reads(work):
    (work / "recipe.yaml").write_text("sparsity: 0.5\n")
    refused(work, work / "model.onnx", "--no-validate", "--config", work / "recipe.yaml", "--save-recipe",
            work / "recipe.yaml", "--force", words=["recipe"])


def _special(kind, path):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        return server
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("device nodes need root")
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "link to a file":
        (path.parent / "elsewhere.onnx").write_bytes(b"keep me")
        path.symlink_to(path.parent / "elsewhere.onnx")
    elif kind == "dangling link":
        path.symlink_to(path.parent / "nowhere.onnx")
    return None


KINDS = ["fifo", "socket", "directory", "device", "link to a file", "dangling link"]


@pytest.mark.parametrize("kind", KINDS)
def test_output_that_is_not_a_regular_file_is_refused_even_with_force(work, kind):
    """-o onto a device node with --force used to replace the node with a regular file."""
    server = _special(kind, work / "target.onnx")
    try:
        refused(work, work / "model.onnx", *QUICK, "-o", work / "target.onnx", "--force",
                words=["regular files"] if kind != "directory" else [])
    finally:
        if server is not None:
            server.close()


@pytest.mark.parametrize("option", ["--report", "--save-recipe"])
@pytest.mark.parametrize("kind", ["fifo", "link to a file"])
def test_report_and_recipe_that_are_not_regular_files(work, option, kind):
    _special(kind, work / "target.json")
    refused(work, work / "model.onnx", *QUICK, option, work / "target.json", "--force", words=["regular files"])


def test_external_data_file_that_is_a_link(work):
    (work / "elsewhere.data").write_bytes(b"keep me")
    (work / "out.onnx.data").symlink_to(work / "elsewhere.data")
    refused(work, work / "model.onnx", *QUICK, "-o", work / "out.onnx", "--external-data", "--force",
            words=["output data file", "symbolic link"])


@pytest.mark.parametrize("option", ["-o", "--report", "--save-recipe"])
def test_missing_folder_is_refused_before_the_model_is_read(tmp_path, option):
    """The output checks come before any work: an unreadable model is not even opened (exit 7, not 3)."""
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    refused(tmp_path, tmp_path / "model.onnx", "--sparsity", "0.5", option, tmp_path / "nodir" / "x.json",
            words=["does not exist"])


def test_sensitivity_outputs(work):
    (work / "s.json").write_text("keep me")
    refused(work, "sensitivity", work / "model.onnx", "--json", work / "s.json", words=["exists", "--force"])
    refused(work, "sensitivity", work / "model.onnx", "--json", work / "model.onnx", "--force", words=["input model"])
    refused(work, "sensitivity", work / "model.onnx", "--json", work / "p.png", "--plot", work / "p.png",
            words=["same file"])
    os.mkfifo(work / "p.png")
    refused(work, "sensitivity", work / "model.onnx", "--plot", work / "p.png", "--force", words=["FIFO"])
    os.unlink(work / "p.png")
    code, _, err = run_cli("sensitivity", work / "model.onnx", "--ratios", "0.5", "--json", work / "s.json",
                           "--force", "-q")
    assert code == 0, err
    assert (work / "s.json").read_text().startswith("{")
    assert listing(work) == ["model.onnx", "s.json"]


def _fake_temp(folder, name, pid, files):
    path = folder / f".{name}.onnxprune-{pid}-abcd1234.tmp"
    path.mkdir()
    for file in files:
        (path / file).write_bytes(b"x")
    return path


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=False)
    return int(proc.stdout)


def test_stale_temp_folders_are_removed_and_look_alikes_kept(tmp_path):
    """Only a folder of onnxprune's own pattern, holding only the files it writes, of a process that is gone."""
    dead = _dead_pid()
    stale = _fake_temp(tmp_path, "out.onnx", dead, ["out.onnx", "out.onnx.data"])
    kept = [
        _fake_temp(tmp_path, "a.onnx", dead, ["a.onnx", "notes.txt"]),  # a file onnxprune never writes there
        _fake_temp(tmp_path, "b.onnx", os.getpid(), ["b.onnx"]),  # its process is alive
        tmp_path / ".c.onnx.onnxprune-backup.tmp",  # not the pattern
    ]
    kept[-1].mkdir()
    (tmp_path / f".d.onnx.onnxprune-{dead}-abcd1234.tmp").write_bytes(b"a file, not a folder")
    assert TEMP_PATTERN.match(stale.name) and TEMP_PATTERN.match(kept[0].name)
    assert sweep_stale(tmp_path) == [stale]
    assert not stale.exists() and all(path.exists() for path in kept)
    assert (tmp_path / f".d.onnx.onnxprune-{dead}-abcd1234.tmp").exists()


def test_a_run_removes_the_temp_folder_a_killed_run_left(work):
    dead = _dead_pid()
    stale = _fake_temp(work, "model.pruned.onnx", dead, ["model.pruned.onnx"])
    look_alike = _fake_temp(work, "other.onnx", dead, ["other.onnx", "mine.txt"])
    code, _, err = run_cli(work / "model.onnx", *QUICK)
    assert code == 0, err
    assert not stale.exists() and look_alike.exists()
    onnx.checker.check_model(str(work / "model.pruned.onnx"), full_check=True)
