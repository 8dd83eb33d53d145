"""The output guard: every file onnxprune writes is checked here before any work and written atomically.

Rules for each output path (``-o``, ``<output>.data``, ``--report``, ``--save-recipe``, ``sensitivity --json`` and
``--plot``), refused with :class:`OutputError` (exit 7):

* never a file the run reads (the input model, its external data files, ``--data``, ``--config`` ...), also when
  spelled differently or reached through a hard link;
* never another output of the same run;
* an existing file only with ``--force``, and only a regular file: a directory, device node, FIFO or socket is
  refused even with ``--force``, and so is a symbolic link (onnxprune does not write through links, whatever
  they point to);
* the folder must exist and be writable.

Writing goes into a private temporary folder beside the target, named ``.<name>.onnxprune-<pid>-<random>.tmp``,
then ``os.replace`` moves the file(s) into place with SIGINT/SIGTERM held (see :mod:`onnxprune.entry`). A folder
of that pattern left by a killed run is removed by the next run writing beside it (see :func:`sweep_stale`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OutputError
from .signals import COMMITTED, checkpoint, held_signals

#: a temporary folder of onnxprune's own: ``.<target name>.onnxprune-<pid>-<8 random chars>.tmp``
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.onnxprune-(?P<pid>[1-9][0-9]{0,9})-(?P<tag>[a-z0-9]{8})\.tmp$")
#: a left-behind temporary folder whose process still exists is removed only after this long untouched
STALE_AFTER_S = 24 * 3600


def _kind(mode: int) -> str | None:
    """What a non-regular file is, or None for a regular file."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. a path under a regular file (ENOTDIR)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def check_target(path: Path, what: str, *, force: bool) -> None:
    """The rules for one path on its own: a writable folder; absent, or a regular file and ``force``."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise OutputError(f"{what} must be a file name: {path}")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{what} directory does not exist: {parent}")
    info = _lstat(path)
    if info is not None:
        kind = _kind(info.st_mode)
        if kind is not None:
            raise OutputError(f"{what} {path} is {kind}; onnxprune writes only regular files (not even with --force)")
        if not force:
            raise OutputError(f"{what} exists: {path} (use --force to replace it)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} directory is not writable: {parent}")


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    """The resolved path and, for an existing file, its (device, inode) (hard links are the same file)."""
    try:
        info = os.stat(path)
        inode = (info.st_dev, info.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


@dataclass
class OutputGuard:
    """The files one run reads and writes; :meth:`claim` refuses an output that would clash with any of them."""

    force: bool = False
    inputs: list[tuple[str, str, tuple[int, int] | None]] = field(default_factory=list)
    outputs: list[tuple[str, str, tuple[int, int] | None]] = field(default_factory=list)

    def protect(self, path: str | os.PathLike | None, what: str) -> None:
        """Record a file the run reads: no output may replace it (also one claimed before)."""
        if path is None:
            return
        real, inode = _identity(Path(path))
        for label, other_real, other_inode in self.outputs:
            if real == other_real or (inode is not None and inode == other_inode):
                raise OutputError(f"refusing to overwrite the {what} with the {label}: {path}")
        self.inputs.append((what, real, inode))

    def claims(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is already one of this run's outputs."""
        real = os.path.realpath(path)
        return any(real == other for _, other, _ in self.outputs)

    def claim(self, path: str | os.PathLike, what: str, *, exists_ok: bool | None = None) -> Path:
        """Check ``path`` as an output (all rules) and record it; returns it. ``exists_ok`` overrides ``force``
        for the existence rule (None: ``force``)."""
        path = Path(path)
        real, inode = _identity(path)
        for label, other_real, other_inode in self.inputs:
            if real == other_real or (inode is not None and inode == other_inode):
                raise OutputError(f"refusing to overwrite the {label} with the {what}: {path}")
        for label, other_real, _ in self.outputs:
            if real == other_real:
                raise OutputError(f"the {what} {path} is the same file as the {label}")
        check_target(path, what, force=self.force if exists_ok is None else exists_ok)
        self.outputs.append((f"{what} {path}", real, inode))
        return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(entry: Path) -> bool:
    """Whether ``entry`` is a temporary folder onnxprune left: our pattern, our user, only the files it writes
    (``<name>``, ``<name>.data``) and a process that is gone (or nothing touched for a day)."""
    match = TEMP_PATTERN.match(entry.name)
    info = _lstat(entry) if match else None
    if info is None or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return False
    newest = info.st_mtime
    for child in os.scandir(entry):
        child_info = child.stat(follow_symlinks=False)
        if child.name not in (match["name"], f"{match['name']}.data") or not stat.S_ISREG(child_info.st_mode):
            return False
        newest = max(newest, child_info.st_mtime)
    pid = int(match["pid"])
    return pid != os.getpid() and (not _alive(pid) or time.time() - newest > STALE_AFTER_S)


def sweep_stale(folder: Path) -> list[Path]:
    """Remove the temporary folders killed onnxprune runs left in ``folder``; returns those removed."""
    removed: list[Path] = []
    try:
        entries = [Path(e.path) for e in os.scandir(folder) if e.name.startswith(".") and ".onnxprune-" in e.name]
    except OSError:
        return removed
    for entry in entries:
        try:
            if _is_stale(entry):
                shutil.rmtree(entry)
                removed.append(entry)
        except (OSError, OutputError):
            continue  # another run removed it meanwhile, or it is not ours to judge
    return removed


@contextmanager
def temp_folder(target: Path) -> Iterator[Path]:
    """A private temporary folder beside ``target`` (stale ones of killed runs are removed first)."""
    parent = target.parent
    sweep_stale(parent)
    tmp = parent / f".{target.name}.onnxprune-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        os.mkdir(tmp, 0o700)
    except OSError as exc:
        raise OutputError(f"cannot write into {parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit(moves: list[tuple[Path, Path]], what: str) -> None:
    """Rename each (temporary file, target) into place, signals held; the last target is the main one.

    Each target is checked again just before (still absent, or a regular file): a link, device or folder that
    appeared meanwhile is refused and nothing is moved.
    """
    for _, target in moves:
        info = _lstat(target)
        kind = _kind(info.st_mode) if info is not None else None
        if kind is not None:
            raise OutputError(f"{what} {target} is {kind}; onnxprune writes only regular files")
    checkpoint("write")
    with held_signals():
        umask = os.umask(0)
        os.umask(umask)
        try:
            for position, (source, target) in enumerate(moves):
                os.chmod(source, 0o666 & ~umask)
                os.replace(source, target)
                COMMITTED.append(str(target))
                if position < len(moves) - 1:
                    checkpoint("rename")  # between the data file and the model: signals are held here
        except OSError as exc:
            raise OutputError(f"cannot write {moves[-1][1]}: {exc.strerror or exc}") from None
    checkpoint("written")


def write_atomic(path: Path, what: str, writer: Callable[[Path], None]) -> None:
    """Write one file: ``writer(temp_path)`` fills a file beside ``path``, which is then renamed into place."""
    path = Path(path)
    with temp_folder(path) as tmp:
        temp_path = tmp / path.name
        try:
            writer(temp_path)
        except OSError as exc:
            raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
        commit([(temp_path, path)], what)


def write_text_atomic(path: Path, text: str, what: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_atomic(path, what, lambda temp: temp.write_text(text, encoding="utf-8"))
