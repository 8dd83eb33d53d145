"""Error classes of onnxprune, each with the process exit code the CLI uses for it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class OnnxPruneError(Exception):
    """Base class: a user-facing error with a one-line message and an exit code.

    The message may name settings as ``{option}`` (a :class:`~onnxprune.config.PruneConfig` field, listed in
    ``options``); :meth:`render` spells them, by default as the field name (the API's word), the CLI as its flag.
    ``value`` is the offending value, when one is at fault."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str = "", *, options: Sequence[str] = (), value: Any = None):
        super().__init__(message)
        self.options, self.value = tuple(options), value

    def render(self, spell: Callable[[str], str] = lambda option: option) -> str:
        """The message with each ``{option}`` spelled by ``spell``."""
        text = super().__str__()
        for option in self.options:
            text = text.replace("{" + option + "}", spell(option))
        return text

    def __str__(self) -> str:
        return self.render()


class UsageError(OnnxPruneError):
    """Bad options or option values (sparsity out of range, malformed pattern, ...)."""

    exit_code = 2
    kind = "usage"


class ModelReadError(OnnxPruneError):
    """The model cannot be read: missing file, not ONNX, truncated, missing external data."""

    exit_code = 3
    kind = "unreadable model"


class InvalidModelError(OnnxPruneError):
    """The model was read but fails the ONNX checker or is structurally broken."""

    exit_code = 4
    kind = "invalid model"


class UnsupportedError(OnnxPruneError):
    """The model or request uses something onnxprune does not support."""

    exit_code = 5
    kind = "unsupported"


class GateFailedError(OnnxPruneError):
    """A validation gate (--min-cosine, ...) was missed; the output was still written."""

    exit_code = 6
    kind = "validation gate failed"


class OutputError(OnnxPruneError):
    """An output path is refused (see onnxprune/outputs.py): it is an input or another output of the run, exists
    without --force, is not a regular file (device, FIFO, socket, directory, symbolic link), or its folder is
    missing or unwritable."""

    exit_code = 7
    kind = "output"


class InputDataError(UsageError):
    """Validation/calibration data does not match the model (names, shapes, dtypes)."""

    exit_code = 8
    kind = "input data"


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it with --debug output)",
    UsageError.exit_code: "usage: bad option or option value",
    ModelReadError.exit_code: "unreadable model: missing file, not ONNX, truncated/corrupt, missing external data or "
                              "external data outside the model's folder",
    InvalidModelError.exit_code: "invalid model: fails the ONNX checker, malformed tensor, non-finite weights",
    UnsupportedError.exit_code: "unsupported model or request",
    GateFailedError.exit_code: "validation gate failed (output written, gates missed)",
    OutputError.exit_code: "output refused (an input or another output, exists without --force, not a regular file, "
                           "missing or unwritable folder)",
    InputDataError.exit_code: "input data (--data, --input-shape) does not match the model",
}
