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
