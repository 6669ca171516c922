"""simfeatup.allocator: large freed buffers are reused instead of faulted in again from the OS."""
import os
import platform
import subprocess
import sys

import pytest

from simfeatup import allocator

# a 64 MiB buffer filled, freed and filled again: the second fill's page faults
PROBE = """
import resource, sys
from simfeatup.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def fill():
    buf = bytearray(64 << 20)  # calloc'd: fresh pages are faulted in when touched
    buf[::4096] = b"x" * len(buf[::4096])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
middle = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - middle)
"""


def _second_fill_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV}  # conftest turns it off for in-process runs
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")
def test_kept_buffers_are_not_faulted_in_again():
    pages = (64 << 20) // 4096
    assert _second_fill_faults("default") > pages // 2  # glibc mmaps and unmaps a 64 MiB block every time
    assert _second_fill_faults("keep") < pages // 20


@pytest.mark.parametrize("value", ["0", "false", "Off", "no"])
def test_turned_off_by_the_environment(monkeypatch, value):
    monkeypatch.setenv(allocator.ENV, value)
    assert allocator.keep_freed_memory() is False
