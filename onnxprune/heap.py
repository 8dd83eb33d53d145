"""The process heap: freed memory goes back to the system instead of raising the next stage's peak.

glibc serves a large request with ``mmap`` (returned to the system on ``free``) only above its mmap threshold, and
raises that threshold to the size of every mmapped block freed, up to 32 MiB (64-bit). After the first captured
activation or onnxruntime tensor of a few MiB is freed, later ones of that size come from the heap, whose freed
pages stay resident: on a 86 MB encoder this kept ~600 MB that the pruning stages had freed. :func:`bound_heap`
fixes the threshold (which also stops the adjustment), :func:`release_memory` hands back what is free now.
:func:`heap_bounded` tells later stages that the process asked for this (``--low-memory``): those that can trade time
for memory (the refit's kept activations, :mod:`onnxprune.refit`) then do. Without it, the command-line tool still
fixes the threshold for its last stage (:func:`bound_heap_for_sessions`, validation): with the dynamic threshold an
onnxruntime session built after an earlier one was freed peaked at 3x its model (the model's bytes, its tensors and
the prepacked copy, each from the heap), 1.1x with the threshold fixed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Iterator

#: ``mallopt`` parameter number of glibc's mmap threshold (malloc.h ``M_MMAP_THRESHOLD``)
M_MMAP_THRESHOLD = -3
#: blocks of at least this many bytes are mmapped, so freeing one returns its pages at once
MMAP_THRESHOLD = 1 << 20

_requested = {"bounded": False, "own_process": False}


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def bound_heap(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of at least ``threshold`` bytes by ``mmap`` for the rest of the process (glibc only;
    False elsewhere: nothing changed). The command-line tool calls it once; a host process may too. Either way
    :func:`heap_bounded` is True from then on."""
    _requested["bounded"] = True
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1)


def own_process() -> None:
    """The command-line tool runs in a process of its own (its console entry, ``python -m onnxprune``):
    :func:`bound_heap_for_sessions` may fix the threshold there. The Python API and the command run inside another
    process leave the host's allocator alone (and its results independent of the runs before them)."""
    _requested["own_process"] = True


def bound_heap_for_sessions() -> bool:
    """Fix the mmap threshold for the rest of the run where the process is the tool's own (:func:`own_process`),
    without asking later stages to trade time for memory (:func:`heap_bounded` stays as it was): called before the
    validation's sessions, the last stage, whose activations live in onnxruntime's arena, so the time the fixed
    threshold costs the pruning stages (page faults on every large block) is not spent. False where nothing
    changed (a host process, not glibc)."""
    if not _requested["own_process"]:
        return False
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)


@contextlib.contextmanager
def memory_first(enabled: bool = True) -> Iterator[None]:
    """While the block runs, the stages trade time for memory (:func:`heap_bounded` is True: ``--low-memory``,
    ``prune(low_memory=True)``); after it they are as before. The mmap threshold :func:`bound_heap` fixes stays
    fixed for the rest of the process: glibc has no way back to its dynamic threshold. ``enabled`` False, or memory
    already first (an enclosing block, the command): nothing."""
    if not enabled or _requested["bounded"]:
        yield
        return
    bound_heap()
    try:
        yield
    finally:
        _requested["bounded"] = False


def heap_bounded() -> bool:
    """Whether memory comes before time now: :func:`bound_heap` was called in this process, or a
    :func:`memory_first` block runs (``--low-memory``)."""
    return _requested["bounded"]


def trim_heap() -> None:
    """Hand freed heap pages back to the system, without a garbage collection: after runs whose many tensors were
    each below the mmap threshold (the freed pages between live blocks stay resident otherwise)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system: glibc keeps them otherwise, and the next
    large allocation (a session, a model read back) adds to the peak instead of reusing them."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
