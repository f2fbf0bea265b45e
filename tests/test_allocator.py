"""The command line keeps freed memory for reuse (allocator.py): big tensors stop being page-faulted in afresh."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

FAULTS = """
import resource, sys, torch
from mapprune.allocator import keep_freed_memory
kept = keep_freed_memory()
def cycle():
    t = torch.empty(16 * 2**20)  # 64 MB, far above glibc's mmap threshold
    t.fill_(1.0)
    del t
for _ in range(10):  # glibc grows the heap a few times before it settles on reusing the freed chunks
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(extra_env: dict) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MAPPRUNE_ALLOCATOR"}
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", FAULTS], env={**env, **extra_env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    kept, faults = _run({})
    assert kept
    system, system_faults = _run({"MAPPRUNE_ALLOCATOR": "system"})
    assert not system
    # 64 MB is 16,384 pages of 4 KB: the default allocator faults every one of them in at each of the 5 cycles.
    assert system_faults > 5 * 10_000
    assert faults < 1_000


def test_a_users_own_malloc_settings_are_left_alone():
    kept, _ = _run({"MALLOC_ARENA_MAX": "2"})
    assert not kept
