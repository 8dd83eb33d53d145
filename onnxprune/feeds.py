"""The feeds of a run: data files (``data``, ``--data``) read and checked, or synthetic inputs that run the model.

The specs, checking and batching live in :mod:`onnxprune.specs`, the synthetic inputs in
:mod:`onnxprune.synthetic`; the names most callers need are importable from here too.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx

from .config import ValidateConfig
from .errors import InputDataError
from .specs import (
    ORT_TYPES,
    InputSpec,
    batch_axes,
    check_feed,
    input_specs,
    sample_count,
    split_samples,
    take_samples,
)
from .synthetic import (
    MAX_TRIALS,
    Resolution,
    describe_resolution,
    integer_rules,
    resolve_inputs,
    synthesize_inputs,
)

__all__ = [
    "MAX_TRIALS", "ORT_TYPES", "InputSpec", "Resolution", "batch_axes", "check_feed", "describe_resolution",
    "input_specs", "integer_rules", "load_data", "prepare_feeds", "resolve_inputs", "sample_count", "split_samples",
    "synthesize_inputs", "take_samples",
]


def prepare_feeds(model: onnx.ModelProto, cfg: ValidateConfig, path: str | os.PathLike | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The feeds for validation (``cfg.data``, else synthesised so the original model runs) and a description of them."""
    specs = input_specs(model)
    if cfg.data:
        feeds = load_data(cfg.data, specs)
        info: dict[str, Any] = {"source": os.fspath(cfg.data)}
        batches = _single_sample_batches(feeds, specs)
        if batches is not None:  # a model fixed to one sample per run: the data holds several, one run each
            info["shapes"] = {name: list(arr.shape) for name, arr in batches[0].items()}
            info["samples"] = len(batches)
            return batches, info
    else:
        res = resolve_inputs(model, cfg.input_shapes, seed=cfg.seed, path=path)
        feeds = synthesize_inputs(specs, res.shapes, model, cfg.seed, choice=res.choice)
        info = {"source": "synthetic", "seed": cfg.seed, "resolution": res.to_dict()}
    info["shapes"] = {name: list(arr.shape) for name, arr in feeds.items()}
    return feeds, info


def _single_sample_batches(feeds: dict[str, np.ndarray], specs: list[InputSpec]
                           ) -> list[dict[str, np.ndarray]] | None:
    """``feeds`` split into one-sample feeds when an input's sample axis is fixed to 1 and holds more; else None."""
    axes = batch_axes(specs)
    fixed_one = any(axes[s.name] is not None and s.shape[axes[s.name]] == 1 for s in specs)
    if not fixed_one or sample_count(feeds, axes) <= 1:
        return None
    return split_samples(feeds, axes, 1)



def load_data(path: str | os.PathLike, specs: list[InputSpec], setting: str = "data") -> dict[str, np.ndarray]:
    """Read an .npz file (the ``setting`` that named it: ``data``, ``eval_data``) and check names, dtypes and shapes
    against the model inputs."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise InputDataError(f"{{{setting}}} file not found: {path}", options=(setting,)) from None
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{{{setting}}} {path} is not a readable .npz file: {exc}", options=(setting,)) from None
    return check_feed(arrays, specs, f"{{{setting}}} {path}", any_samples=False, options=(setting,))
