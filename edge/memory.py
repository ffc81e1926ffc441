"""Process memory: resident size for the self-metrics, and the allocator setting of services.

The agent and ingest run for months on edge boxes, so their resident size is a self-metric
(``rss_bytes``, in the ``agent`` measurement) that a dashboard can watch for creep.

:func:`tune_allocator` fixes glibc's mmap threshold. By default glibc raises that threshold
each time it frees a large mmapped block (up to 32 MiB), after which the platform's large,
short-lived buffers (backbone payloads of tens of KiB, line-protocol bodies and their gzip
output of hundreds of KiB) are carved from the brk heap instead. Long-lived small blocks end
up between them, the heap cannot shrink, and the process creeps: at 20 k samples/s the agent
grew ~35 KiB/min and ingest ~17 KiB/min over 40 minutes, all of it in ``[heap]``. With the
threshold fixed at 64 KiB those buffers are mapped and unmapped, and both stayed flat
(bench/bench_soak.py, figures in bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 64 * 1024
"""Blocks at least this large are mapped (and returned to the system when freed)."""

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = Path("/proc/self/statm")


def rss_bytes() -> int:
    """Resident set size of this process in bytes (0 where /proc is not available)."""
    try:
        fields = _STATM.read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * _PAGE


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(name)
        if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
            return libc
    return None


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold (see the module doc); True if it was set here.

    Does nothing on other C libraries, or when the operator set ``MALLOC_MMAP_THRESHOLD_``
    (glibc applies that one itself, and it wins).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused; the heap may creep under load")
    return ok
