"""A batch run a few samples at a time, the parts joined into the whole batch's arrays.

Where every sample is computed on its own (:func:`~onnxprune.sessions.samples_independent`) the joined arrays equal
one run's over the whole batch bit for bit, and the run holds the memory of a few samples instead of the batch's
(the refit's activation streams under ``--low-memory``, :class:`~onnxprune.activation_stream.ActivationStream`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def per_sample(value, count: int) -> bool:
    """Whether ``value`` holds ``count`` samples along axis 0: an array of that many rows, at least 2-D or of a float
    type (a 1-D integer tensor of that length is more likely a shape than per-sample values)."""
    return (isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == count
            and (value.ndim >= 2 or value.dtype.kind == "f"))


def part_bounds(count: int, samples: int) -> list[tuple[int, int]]:
    """(start, stop) of the parts of ``samples`` samples covering ``count``, none of a single sample unless ``count`` is
    1 (a last single sample joins the part before it): onnxruntime's matrix products take another path for one row
    (a Gemm over a batch of one sample gives other bits than that sample's row in a larger batch)."""
    stops = [*range(samples, count, samples), count]
    if len(stops) > 1 and stops[-1] - stops[-2] == 1:
        del stops[-2]
    return list(zip([0, *stops[:-1]], stops))


def run_in_parts(run: Callable[[list[str], dict[str, np.ndarray]], list], outputs: list[str],
                 feed: dict[str, np.ndarray], split: set[str], sampled: list[bool], count: int, samples: int,
                 consumers: list[Callable[[np.ndarray, int, int], bool] | None] | None = None
                 ) -> list[np.ndarray] | None:
    """``run(outputs, feed)`` computed ``samples`` samples at a time (:func:`part_bounds`): the inputs named in ``split`` are cut along axis
    0, the others given whole; the outputs flagged in ``sampled`` are written part by part into arrays of ``count``
    rows (one part's outputs alive at a time besides them), the others (computed from constants alone) are the
    first part's. A sampled output with a ``consumers`` entry is handed over part by part instead (``consumer(part,
    start, stop)``, False when it does not take it) and stands in the result as :func:`placeholder` of the whole
    array. None when an input or output
    does not hold its samples along axis 0 or a part fails: the caller runs the whole batch."""
    consumers = consumers or [None] * len(outputs)
    if any(not per_sample(feed[name], count) for name in split):
        return None
    joined: list | None = None
    for start, stop in part_bounds(count, samples):
        try:
            part = run(outputs, {k: v[start:stop] if k in split else v for k, v in feed.items()})
        except Exception:  # noqa: BLE001 - a part size the model does not take: the caller runs the whole batch
            return None
        if any(flag and not per_sample(value, stop - start) for value, flag in zip(part, sampled)):
            return None
        if joined is None:
            joined = [(placeholder(value, count) if consumer is not None else np.empty((count, *value.shape[1:]),
                                                                                          value.dtype))
                      if flag else value for value, flag, consumer in zip(part, sampled, consumers)]
        for whole, value, flag, consumer in zip(joined, part, sampled, consumers):
            if flag:
                if value.shape[1:] != whole.shape[1:] or value.dtype != whole.dtype:
                    return None
                if consumer is not None:
                    if not consumer(value, start, stop):
                        return None
                else:
                    whole[start:stop] = value
        del part
    return joined


def placeholder(value: np.ndarray, count: int) -> np.ndarray:
    """A read-only array of ``count`` samples shaped like ``value``'s, holding no memory (a broadcast zero): it stands
    for a joined output handed to a consumer part by part, its ``nbytes`` the whole output's."""
    return np.broadcast_to(np.zeros((), value.dtype), (count, *value.shape[1:]))
