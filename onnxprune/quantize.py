"""Prune, then quantize: hand the pruned model to onnxruntime's quantization tools."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError, UsageError
from .outputs import commit, temp_folder

MODES = ("dynamic", "static")


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over feed dicts, one sample at a time."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._items = iter(list(feeds))

    def get_next(self):
        return next(self._items, None)

    def rewind(self):  # pragma: no cover - part of the reader protocol, unused by the calibrators here
        pass


def quantize_file(path: Path, mode: str, calibration: list[dict[str, np.ndarray]], external_data: bool) -> dict[str, Any]:
    """Quantize the model at ``path`` in place (atomically): int8 weights (dynamic) or weights and activations (static, QDQ)."""
    if mode not in MODES:
        raise UsageError(f"{{quantize}} must be one of {', '.join(MODES)}, got {mode!r}", options=("quantize",),
                         value=mode)
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    before = path.stat().st_size
    with temp_folder(path) as tmp_dir:  # onnxprune's own temp pattern: a killed run's leftovers are swept
        target = tmp_dir / path.name
        try:
            if mode == "dynamic":
                quantize_dynamic(str(path), str(target), weight_type=QuantType.QInt8,
                                 use_external_data_format=external_data)
            else:
                quantize_static(str(path), str(target), _Reader(calibration), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                use_external_data_format=external_data)
        except OSError as exc:
            raise OutputError(f"cannot write the quantized model {path}: {exc}") from None
        data = tmp_dir / f"{path.name}.data"
        moves = [(data, path.parent / data.name)] if data.exists() else []
        commit(moves + [(target, path)], "quantized model")
    return {"mode": mode, "format": "QDQ" if mode == "static" else "QOperator (dynamic)",
            "calibration_samples": len(calibration) if mode == "static" else 0,
            "pruned_bytes": before, "quantized_bytes": path.stat().st_size}
