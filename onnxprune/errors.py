"""Error classes of onnxprune, each with the process exit code the CLI uses for it."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

#: settings whose command-line flag is not the field name with dashes
FLAG_NAMES = {"input_shapes": "input-shape"}


def flag(option: str) -> str:
    """The command-line spelling of a setting (``round_to`` -> ``--round-to``, ``input_shapes`` -> ``--input-shape``):
    the CLI renders errors with it, and report text (the CLI's words) quotes errors with it."""
    return "--" + FLAG_NAMES.get(option, option.replace("_", "-"))


def named(message: str) -> tuple[str, ...]:
    """The settings ``message`` names as ``{field}``, in order: the ``options`` of an error with that message."""
    return tuple(dict.fromkeys(re.findall(r"\{([a-z_]+)\}", message)))


class OnnxPruneError(Exception):
    """Base class: a user-facing error with a one-line message and an exit code.

    The message may name settings as ``{option}`` (a :class:`~onnxprune.config.PruneConfig` field, listed in
    ``options``); :meth:`render` spells them, by default as the field name (the API's word), the CLI as its flag.
    ``value`` is the offending value, when one is at fault."""

    exit_code = 1
    kind = "error"

    def __init_subclass__(cls, *, exit_code: int | None = None, kind: str | None = None, **kwargs: Any):
        """Each subclass states its exit code and kind in its class line: ``class X(OnnxPruneError, exit_code=2,
        kind="usage")``."""
        super().__init_subclass__(**kwargs)
        cls.exit_code = exit_code if exit_code is not None else cls.exit_code
        cls.kind = kind if kind is not None else cls.kind

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


class UsageError(OnnxPruneError, exit_code=2, kind="usage"):
    """Bad options or option values (sparsity out of range, malformed pattern, ...)."""


class ModelReadError(OnnxPruneError, exit_code=3, kind="unreadable model"):
    """The model cannot be read: missing file, not ONNX, truncated, missing external data."""


class InvalidModelError(OnnxPruneError, exit_code=4, kind="invalid model"):
    """The model was read but fails the ONNX checker or is structurally broken."""


class UnsupportedError(OnnxPruneError, exit_code=5, kind="unsupported"):
    """The model or request uses something onnxprune does not support."""


class GateFailedError(OnnxPruneError, exit_code=6, kind="validation gate failed"):
    """A validation gate (--min-cosine, ...) was missed; the output was still written."""


class OutputError(OnnxPruneError, exit_code=7, kind="output"):
    """An output path is refused (see onnxprune/outputs.py): it is an input or another output of the run, exists
    without --force, is not a regular file (device, FIFO, socket, directory, symbolic link), or its folder is
    missing or unwritable."""


class InputDataError(UsageError, exit_code=8, kind="input data"):
    """Validation/calibration data does not match the model (names, shapes, dtypes)."""


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
