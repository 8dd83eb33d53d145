"""The console-script entry point (``onnxprune``, ``python -m onnxprune``).

It imports only :mod:`onnxprune.signals` (standard library) before installing the signal handlers, so that Ctrl-C
or SIGTERM at any moment, even while numpy, onnx and onnxruntime are still being imported, ends the process with
exit code 130 and one line on stderr; the command-line interface is imported after that, inside :func:`main`.
"""

from __future__ import annotations

from .signals import checkpoint, install_exit_handlers


def main() -> None:
    """``onnxprune``: install the signal handlers, then import and run the command-line interface."""
    install_exit_handlers()
    checkpoint("start")
    from .cli import main as cli_main

    checkpoint("import")
    cli_main()
