"""`keep_freed_memory`: glibc keeps freed large blocks mapped for reuse, only when asked (process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import make_reference
from upernet_fast.kernels import _memory

# RSS growth that outlives a freed 64 MiB tensor (above glibc's 32 MiB dynamic mmap-threshold cap, so by
# default it is unmapped on free).
_PROBE = """
import torch, upernet_fast
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
kept = {call}
base = rss_mb()
x = torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)  # 64 MiB, written: resident
del x
print(kept, round(rss_mb() - base))
"""

needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _memory._libc_function("mallopt") is None,
    reason="keep_freed_memory needs glibc's mallopt",
)


def _probe(call: str, **env: str) -> tuple[str, int]:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE.format(call=call)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    kept, grown = run.stdout.split()
    return kept, int(grown)


@needs_glibc
def test_keep_freed_memory_keeps_a_freed_block_mapped():
    assert _probe("False") == ("False", pytest.approx(0, abs=16))  # glibc's default: unmapped on free
    kept, grown = _probe("upernet_fast.keep_freed_memory()")
    assert kept == "True" and grown >= 48, grown  # kept mapped for the next call to reuse


@needs_glibc
def test_keep_freed_memory_is_vetoed_by_the_switch():
    kept, grown = _probe("upernet_fast.keep_freed_memory()", UPERNET_FAST_KEEP_MEMORY="0")
    assert kept == "False" and grown < 16


def test_forward_turns_it_on_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    import upernet_fast

    model = upernet_fast.load(make_reference("convnext"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        monkeypatch.delenv("UPERNET_FAST_KEEP_MEMORY", raising=False)
        model(x)
        assert calls == []  # a library call never changes the process's allocator by itself
        monkeypatch.setenv("UPERNET_FAST_KEEP_MEMORY", "1")
        model(x)
        assert calls == [1]


# ------------------------------------------------------------------------------------- buffer cache
MB = 2**20


def test_buffer_cache_reuses_only_unreferenced_buffers(monkeypatch) -> None:
    monkeypatch.setattr(_memory, "_cache_enabled", True)
    _memory.empty_cache()
    a = _memory.empty_output((3, 1024, 1024), dtype=torch.float32, device="cpu")  # 12 MiB: cached
    ptr = a.data_ptr()
    view = a[1]
    del a
    b = _memory.empty_output((3, 1024, 1024), dtype=torch.float32, device="cpu")
    assert b.data_ptr() != ptr  # a view still references the first buffer
    del view
    c = _memory.empty_output((3, 1024, 1024), dtype=torch.float32, device="cpu")
    assert c.data_ptr() == ptr  # unreferenced now: handed out again
    array = c.numpy()
    del c
    d = _memory.empty_output((3, 1024, 1024), dtype=torch.float32, device="cpu")
    assert d.data_ptr() not in (ptr, b.data_ptr())  # a NumPy array shares it, and b is alive
    del array
    # Same bytes, another dtype and layout: the buffer is reused with the requested strides.
    e = _memory.empty_output(
        (1, 96, 1024, 64), dtype=torch.bfloat16, device="cpu", memory_format=torch.channels_last
    )
    assert e.data_ptr() == ptr and e.dtype == torch.bfloat16
    assert e.is_contiguous(memory_format=torch.channels_last)
    small = _memory.empty_output((1024,), dtype=torch.float32, device="cpu")  # below MIN_BYTES: not cached
    assert all(s.data_ptr() != small.data_ptr() for s in _memory._cache.storages)
    del b, d, e
    assert _memory.empty_cache() == 3 * 12 * MB
    assert _memory.empty_cache() == 0 and _memory._cache.storages == []


def test_buffer_cache_is_per_thread_and_capped(monkeypatch) -> None:
    import threading

    monkeypatch.setattr(_memory, "_cache_enabled", True)
    monkeypatch.setattr(_memory, "CACHE_BYTES", 20 * MB)
    _memory.empty_cache()
    first = _memory.empty_output((12 * MB,), dtype=torch.uint8, device="cpu").data_ptr()
    seen = []
    thread = threading.Thread(
        target=lambda: seen.append(
            _memory.empty_output((12 * MB,), dtype=torch.uint8, device="cpu").data_ptr()
        )
    )
    thread.start()
    thread.join()
    assert _memory.empty_output((12 * MB,), dtype=torch.uint8, device="cpu").data_ptr() == first
    assert [len(_memory._cache.storages)] == [1]  # the other thread's buffer is in its own cache
    _memory.empty_output((16 * MB,), dtype=torch.uint8, device="cpu")  # 12 + 16 MiB free > 20: LRU evicted
    assert [s.nbytes() for s in _memory._cache.storages] == [16 * MB]
    # Best fit: a request of at least half a free buffer's size takes it (no new buffer)
    ptr = _memory._cache.storages[0].data_ptr()
    assert _memory.empty_output((9 * MB,), dtype=torch.uint8, device="cpu").data_ptr() == ptr
    assert (
        _memory.empty_output((8 * MB - 1,), dtype=torch.uint8, device="cpu").data_ptr() != ptr
    )  # not cached
    assert [s.nbytes() for s in _memory._cache.storages] == [16 * MB]
    assert _memory.empty_cache() == 16 * MB


def test_buffer_cache_switch_and_other_devices(monkeypatch) -> None:
    monkeypatch.setattr(_memory, "_cache_enabled", False)
    _memory.empty_cache()
    _memory.empty_output((16 * MB,), dtype=torch.uint8, device="cpu")
    assert _memory._cache.storages == []
    monkeypatch.setattr(_memory, "_cache_enabled", True)
    meta = _memory.empty_output((16 * MB,), dtype=torch.uint8, device="meta")
    assert meta.device.type == "meta" and _memory._cache.storages == []
    run = subprocess.run(
        [sys.executable, "-c", "from upernet_fast.kernels import _memory; print(_memory._cache_enabled)"],
        env={**os.environ, "UPERNET_FAST_BUFFER_CACHE": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.strip() == "False"


def test_cached_logits_the_caller_holds_are_never_overwritten(monkeypatch) -> None:
    """The model's large outputs come from the cache; logits kept from one call survive the next call, and
    once dropped their buffer serves the next call."""
    import upernet_fast

    monkeypatch.setattr(_memory, "_cache_enabled", True)
    _memory.empty_cache()
    ref = make_reference("convnext", num_labels=40)
    model = upernet_fast.load(ref)
    x1, x2 = torch.randn(1, 3, 256, 256), torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        first = model(x1).logits  # 40 x 256 x 256 float32 = 10 MiB: from the cache
        assert any(s.data_ptr() == first.data_ptr() for s in _memory._cache.storages)
        kept = first.clone()
        second = model(x2).logits
        assert torch.equal(first, kept) and second.data_ptr() != first.data_ptr()
        expected = ref(x2).logits
        assert (second - expected).abs().max() <= 1e-4 * expected.abs().max()
        ptr = first.data_ptr()
        del first
        third = model(x1).logits
        assert third.data_ptr() == ptr and torch.equal(third, kept)
    _memory.empty_cache()


def test_buffer_cache_is_bypassed_while_tracing_with_fake_tensors(monkeypatch) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(_memory, "_cache_enabled", True)
    _memory.empty_cache()
    with FakeTensorMode():
        fake = _memory.empty_output((16 * MB,), dtype=torch.uint8, device="cpu")
    assert type(fake).__name__ == "FakeTensor" and _memory._cache.storages == []
