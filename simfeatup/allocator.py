"""Large CPU buffers reused between windows instead of fresh pages from the OS every time.

glibc's malloc hands allocations above its mmap threshold (at most 32 MiB by default) to mmap
and returns them to the OS when freed; the next window's buffers of the same size then fault
in and zero fresh pages. A 224 x 224 SimFeatUp window allocates ~130 MB of such buffers (its
output, filter weights and sources), and the page faults were ~24% of its CPU time on one
thread. :func:`keep_freed_memory` raises both thresholds once per process, so these buffers
come from the heap and stay there for the next window. Memory freed after a peak then stays
with the process (at the top of the heap up to ``TRIM_THRESHOLD``; freed blocks below the top
are never returned), so resident memory can stay above what glibc's defaults would leave, and
a fragmented heap can hold somewhat more. Every command-line entry point calls it
(:func:`simfeatup.entry.run_command`); ``SIMFEATUP_KEEP_FREED_MEMORY=0`` turns it off (the
test suite does, except where it tests this). Torch-free: ctypes only.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# allocations up to this size come from the heap; older glibc caps the threshold at HEAP_MAX_SIZE / 2
# (32 MiB on 64-bit) and refuses more, so the cap is tried next
MMAP_THRESHOLDS = (256 << 20, 32 << 20)
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept up to this size
ENV = "SIMFEATUP_KEEP_FREED_MEMORY"
OFF = ("0", "false", "no", "off")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether both were applied.

    Does nothing (False) off Linux, with a C library without mallopt (musl's ignores it), or
    when the environment sets SIMFEATUP_KEEP_FREED_MEMORY to 0 (or false, no, off).
    """
    if os.environ.get(ENV, "1").strip().lower() in OFF or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap = next((size for size in MMAP_THRESHOLDS if mallopt(_M_MMAP_THRESHOLD, size) == 1), None)
    trim = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    logger.debug("freed buffers kept for reuse (glibc mallopt): mmap threshold %s, trim threshold %s",
                 f"{mmap >> 20} MiB" if mmap else "refused", f"{TRIM_THRESHOLD >> 20} MiB" if trim else "refused")
    return mmap is not None and trim
