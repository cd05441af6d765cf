"""Large CPU output buffers backed by transparent huge pages.

A freshly allocated large tensor lives in fresh ``mmap`` memory (glibc maps every block above its mmap
threshold anew and unmaps it on free), so its first write takes one page fault per 4 KiB page. That
fault can cost more than the write itself, and one fault per 2 MiB much less (bench/results/decisions.md,
"Huge pages"). PyTorch only advises its allocations when the ``THP_MEM_ALLOC_ENABLE`` environment
variable is set before it starts, which is the user's choice, so the ops advise just the buffers they
allocate themselves, before first touch. The advice is a per-range hint
that the kernel may ignore (THP ``never``) and that changes no process-wide setting.

``UPERNET_FAST_HUGEPAGES=0`` turns it off (read at import; ``_common.env_switch``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

from ._common import env_switch

HUGEPAGE = 2 * 1024 * 1024
MIN_BYTES = 4 * HUGEPAGE  # smaller buffers gain little and may not hold one whole aligned huge page
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


ENV_VAR = "UPERNET_FAST_HUGEPAGES"


def _load_madvise():
    if not sys.platform.startswith("linux") or not env_switch(ENV_VAR):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
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
