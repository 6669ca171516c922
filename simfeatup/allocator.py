"""Large CPU buffers reused between windows instead of fresh pages from the OS every time.

glibc's malloc hands allocations above its mmap threshold (at most 32 MiB by default) to mmap
and returns them to the OS when freed; the next window's buffers of the same size then fault
in and zero fresh pages. A 224 x 224 SimFeatUp window allocates ~130 MB of such buffers (its
output, filter weights and sources), and the page faults were ~20% of its CPU time on one
thread. :func:`keep_freed_memory` raises both thresholds once per process, so these buffers
come from the heap and stay there for the next window: peak memory is unchanged, but memory
freed after the peak is kept (up to ``TRIM_THRESHOLD``) instead of returned. Every
command-line entry point calls it (:func:`simfeatup.entry.run_command`);
``SIMFEATUP_KEEP_FREED_MEMORY=0`` turns it off. Torch-free: ctypes only.
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
MMAP_THRESHOLD = 256 << 20  # allocations up to this size come from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept up to this size
ENV = "SIMFEATUP_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether it was applied.

    Does nothing (False) off Linux, with a C library without mallopt (musl's ignores it), or
    when the environment sets SIMFEATUP_KEEP_FREED_MEMORY=0.
    """
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    logger.debug("large freed buffers kept for reuse (glibc mallopt): %s", applied)
    return applied
