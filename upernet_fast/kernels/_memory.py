"""Large CPU output buffers backed by transparent huge pages.

A freshly allocated large tensor lives in fresh ``mmap`` memory (glibc maps every block above its mmap
threshold anew and unmaps it on free), so its first write takes one page fault per 4 KiB page. That
fault can cost more than the write itself, and one fault per 2 MiB much less (bench/results/decisions.md,
"Huge pages"). PyTorch only advises its allocations when the ``THP_MEM_ALLOC_ENABLE`` environment
variable is set before it starts, which is the user's choice, so the ops advise just the buffers they
allocate themselves, before first touch. The advice is a per-range hint
that the kernel may ignore (THP ``never``) and that changes no process-wide setting.

``UPERNET_FAST_HUGEPAGES=0`` turns it off (read at import; ``_common.env_switch``).

The other half of the cost is paying those faults again on every call: glibc returns every block above its
mmap threshold to the kernel when it is freed, so each forward pass re-faults all of its large
intermediates. ``keep_freed_memory()`` raises glibc's mmap and trim thresholds to 1 GiB, so blocks below
that come from the heap and are reused by the next call, and at most 1 GiB of freed memory stays mapped.
That is a process-wide setting that speeds up every PyTorch CPU model in the process (transformers' UperNet
gains more from it than upernet_fast: bench/results/decisions.md, "Keeping freed memory"), so a library
import never makes it: the ``upernet-fast`` CLI and the Ray workers, which own their processes, turn it on;
in your own process call ``upernet_fast.keep_freed_memory()`` or set ``UPERNET_FAST_KEEP_MEMORY=1`` (read
by the first CPU forward pass). ``UPERNET_FAST_KEEP_MEMORY=0`` vetoes it everywhere.

Without touching that setting, the buffers the ops allocate themselves (``empty_output``: Winograd
workspaces and outputs, GEMM outputs, the resized logits...) come from a small cache of their own, kept
per thread: a cached buffer is handed out again only when nothing references it any more (its storage's
use count is the cache's own reference alone), so a result the caller still holds is never overwritten.
At most ``CACHE_BYTES`` of unreferenced buffers stay cached; ``empty_cache()`` frees them, and
``UPERNET_FAST_BUFFER_CACHE=0`` (read at import) turns the cache off. This is what makes repeated calls
steady without the process-wide switch (bench/results/decisions.md, "Buffer cache").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys
import threading

import torch

from ._common import env_switch

HUGEPAGE = 2 * 1024 * 1024
MIN_BYTES = 4 * HUGEPAGE  # smaller buffers gain little and may not hold one whole aligned huge page
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


ENV_VAR = "UPERNET_FAST_HUGEPAGES"
CACHE_ENV_VAR = "UPERNET_FAST_BUFFER_CACHE"
CACHE_BYTES = 1 << 30  # unreferenced cached buffers kept per thread at most
REUSE_SLACK = 2  # a cached buffer serves requests down to half its size
KEEP_ENV_VAR = "UPERNET_FAST_KEEP_MEMORY"
KEEP_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt) or no libc to load
        return None


def _load_madvise():
    if not sys.platform.startswith("linux") or not env_switch(ENV_VAR):
        return None
    fn = _libc_function("madvise")
    if fn is None:
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def advise_hugepages(t: torch.Tensor) -> torch.Tensor:
    """Ask the kernel to back the whole 2 MiB pages inside ``t``'s storage with huge pages (best effort;
    meant for storage not yet written). Returns ``t``."""
    if _madvise is None or t.device.type != "cpu":
        return t
    nbytes = t.untyped_storage().nbytes()
    if nbytes < MIN_BYTES:
        return t
    start = t.untyped_storage().data_ptr()
    lo = -(-start // HUGEPAGE) * HUGEPAGE
    hi = (start + nbytes) // HUGEPAGE * HUGEPAGE
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_HUGEPAGE)  # failure only means no huge pages: nothing to handle
    return t


class _BufferCache(threading.local):
    """One thread's cached buffers, least recently handed out first."""

    def __init__(self) -> None:
        self.storages: list[torch.UntypedStorage] = []


_cache = _BufferCache()
_cache_enabled = env_switch(CACHE_ENV_VAR)
# Private PyTorch hooks the cache needs; where a build lacks either, the cache stays off (plain torch.empty).
_use_count = getattr(torch._C, "_storage_Use_Count", None)
_FAKE_MODE = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)


def _referenced(storage: torch.UntypedStorage) -> bool:
    # One reference is the cache's own; every tensor or view made from it (or a NumPy array sharing it) adds one.
    return _use_count(storage._cdata) > 1


def _tracing() -> bool:
    """Whether tensors made now are fake (a fake-tensor mode is active): no memory to advise or cache."""
    return _FAKE_MODE is not None and torch._C._get_dispatch_mode(_FAKE_MODE) is not None


def _cacheable(nbytes: int, device: torch.device | str) -> bool:
    """Large CPU buffers, with the cache on and the hooks it needs present (without the fake-mode key,
    tracing could not be told apart)."""
    return (
        _cache_enabled
        and _use_count is not None
        and _FAKE_MODE is not None
        and nbytes >= MIN_BYTES
        and torch.device(device).type == "cpu"
    )


def empty_output(
    shape: tuple[int, ...] | list[int],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """``torch.empty`` for an op's output or scratch buffer (uninitialised). Large CPU buffers come from the
    calling thread's buffer cache (module docstring), new ones huge-page advised."""
    nbytes = math.prod(shape) * dtype.itemsize
    if _tracing():
        return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if not _cacheable(nbytes, device):
        return advise_hugepages(torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format))
    storages = _cache.storages
    # Best fit among the unreferenced buffers up to REUSE_SLACK times the request: fewer distinct buffers
    # (a smaller footprint) than exact sizes, without pinning a huge buffer for a small request.
    fits = [
        (storage.nbytes(), i)
        for i, storage in enumerate(storages)
        if nbytes <= storage.nbytes() <= REUSE_SLACK * nbytes and not _referenced(storage)
    ]
    if fits:
        storage = storages.pop(min(fits)[1])
        storages.append(storage)  # now the most recently used
    else:
        storage = advise_hugepages(torch.empty(nbytes, dtype=torch.uint8, device=device)).untyped_storage()
        storages.append(storage)
        _evict(storages)
    stride = torch.empty(shape, dtype=dtype, device="meta", memory_format=memory_format).stride()
    return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape, stride)


def _evict(storages: list[torch.UntypedStorage]) -> None:
    """Drop the least recently used unreferenced buffers while they add up to more than CACHE_BYTES."""
    excess = sum(s.nbytes() for s in storages if not _referenced(s)) - CACHE_BYTES
    kept = []
    for storage in storages:
        if excess > 0 and not _referenced(storage):
            excess -= storage.nbytes()
        else:
            kept.append(storage)
    storages[:] = kept


def empty_cache() -> int:
    """Free the calling thread's cached buffers that nothing references any more (see the module
    docstring); returns the bytes released. The next calls allocate (and fault in) afresh."""
    storages = _cache.storages
    released = sum(s.nbytes() for s in storages if not _referenced(s))
    storages[:] = [s for s in storages if _referenced(s)]
    return released


def keep_memory_requested() -> bool:
    """``UPERNET_FAST_KEEP_MEMORY=1``: the first CPU forward pass calls ``keep_freed_memory()``."""
    return env_switch(KEEP_ENV_VAR, default=False)


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks below 1 GiB mapped for reuse instead of returning them to the kernel
    (process-wide; see the module docstring). Idempotent; a no-op under ``UPERNET_FAST_KEEP_MEMORY=0`` or
    without glibc. Returns whether it is in effect."""
    return env_switch(KEEP_ENV_VAR) and _set_glibc_thresholds()


@functools.cache
def _set_glibc_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first: a trim threshold alone would switch off glibc's dynamic mmap threshold and
    # make every large block fresh mmap memory (twice as slow here), so it is only set if the first took.
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
