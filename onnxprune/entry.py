"""The console-script entry point (``onnxprune``, ``python -m onnxprune``).

It imports only :mod:`onnxprune.signals` and :mod:`onnxprune.heap` (standard library) before installing the signal handlers, so that Ctrl-C
or SIGTERM at any moment, even while numpy, onnx and onnxruntime are still being imported, ends the process with
exit code 130 and one line on stderr; the command-line interface is imported after that, inside :func:`main`.
The process is the tool's own (:func:`onnxprune.heap.own_process`): its validation may fix the allocator's mmap
threshold, which the command run inside another process (the Python API, click's test runner) leaves alone.
"""

from __future__ import annotations

from .heap import own_process
from .signals import checkpoint, install_exit_handlers


def main() -> None:
    """``onnxprune``: install the signal handlers, then import and run the command-line interface."""
    install_exit_handlers()
    checkpoint("start")
    own_process()
    from .cli import main as cli_main

    checkpoint("import")
    cli_main()
