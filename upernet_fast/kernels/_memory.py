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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

from ._common import env_switch

HUGEPAGE = 2 * 1024 * 1024
MIN_BYTES = 4 * HUGEPAGE  # smaller buffers gain little and may not hold one whole aligned huge page
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


ENV_VAR = "UPERNET_FAST_HUGEPAGES"
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


def empty_output(
    shape: tuple[int, ...] | list[int],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """``torch.empty`` for an op's output buffer, huge-page advised when large and on the CPU."""
    return advise_hugepages(torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format))


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
