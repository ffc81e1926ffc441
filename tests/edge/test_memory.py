"""Process memory helpers: RSS and the fixed glibc mmap threshold."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from edge import memory


def test_rss_follows_touched_memory() -> None:
    before = memory.rss_bytes()
    block = bytearray(64 * 2**20)  # zero-filled: every page touched
    after = memory.rss_bytes()
    assert before > 10 * 2**20
    assert after - before > 48 * 2**20
    del block


# In a fresh interpreter: free a 4 MiB mapped block (glibc then raises its threshold to
# 4 MiB unless it was fixed), then allocate 256 KiB and report whether it was mapped.
_PROBE = """
import ctypes, ctypes.util, sys
from edge import memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MI
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":
    assert memory.tune_allocator()
big = libc.malloc(4 * 2**20)
libc.free(big)
before = libc.mallinfo2().hblks
block = libc.malloc(256 * 1024)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc only",
)
@pytest.mark.parametrize(("mode", "mapped"), [("tuned", "1"), ("default", "0")])
def test_fixed_threshold_keeps_large_buffers_out_of_the_heap(mode: str, mapped: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "."},
    )
    assert out.stdout.strip() == mapped


def test_operator_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert memory.tune_allocator() is False
