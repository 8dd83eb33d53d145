"""Signal handling for the command, and the test pause hook (standard library only).

:mod:`onnxprune.entry` installs these handlers before any heavy import, so that Ctrl-C or SIGTERM at any moment
(even while numpy, onnx and onnxruntime are still being imported) ends the process with exit code 130 and one line
on stderr.

Signals pass through three states:

* *exit* (:func:`install_exit_handlers`): outside the guarded body (imports, option parsing, teardown) a
  signal prints one line and leaves at once with ``os._exit(130)``; what was committed is named.
* *raise* (:func:`install_raise_handlers`): while a command runs, a signal raises ``KeyboardInterrupt`` so
  that temporary files are removed on the way out.
* *held* (:func:`held_signals`): around the renames that commit an output, a signal is only noted and acted
  on once the renames are done, so an output is either absent or complete.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: outputs renamed into place by this process, in order (the interrupt message names them)
COMMITTED: list[str] = []
#: ``<stage>:<file>``: at that stage, write the file and wait until it is removed or a signal arrives (tests)
PAUSE_ENV = "ONNXPRUNE_TEST_PAUSE_AT"
PAUSE_LIMIT_S = 300.0


def interrupted_message() -> str:
    """The one line printed for an interrupt: what was written completely, or that nothing was."""
    if not COMMITTED:
        return "onnxprune: interrupted; no output written"
    return "onnxprune: interrupted; output written completely: " + ", ".join(COMMITTED)


def _exit_now(signum, frame) -> None:
    os.write(2, (interrupted_message() + "\n").encode(errors="replace"))
    os._exit(130)


def _raise(signum, frame) -> None:
    install_exit_handlers()  # a second signal during clean-up leaves at once
    raise KeyboardInterrupt


def install_exit_handlers() -> None:
    """Signals end the process at once with exit code 130 (nothing is being written)."""
    for sig in SIGNALS:
        signal.signal(sig, _exit_now)


def install_raise_handlers() -> None:
    """Signals raise ``KeyboardInterrupt`` (a command is running; its clean-up must run)."""
    for sig in SIGNALS:
        signal.signal(sig, _raise)


@contextmanager
def held_signals() -> Iterator[None]:
    """Defer SIGINT/SIGTERM until the block is done, then deliver the first one to the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


def checkpoint(stage: str) -> None:
    """Test hook: with ``ONNXPRUNE_TEST_PAUSE_AT=<stage>:<file>``, write ``<file>`` at ``stage`` and wait
    (interruptibly) until the test removes it or signals the process. Does nothing otherwise."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec or spec.split(":", 1)[0] != stage or ":" not in spec:
        return
    path = spec.split(":", 1)[1]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"{stage} {os.getpid()}\n")
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
