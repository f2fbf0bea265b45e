"""The process's memory allocator: keep freed memory for reuse (glibc)."""

import ctypes
import os
import sys

_ALLOCATOR_TUNED = False


def keep_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above a few MB with a fresh ``mmap`` and unmaps it on free, so each
    large tensor (a batch of 1,024 images' activations is tens of MB) has every page faulted in again: FMT's
    testing phase spent about 40% of its wall time in the kernel doing that (``benchmarks/allocator.py`` and
    ``benchmarks/fmt_recipe_cost.py --system-allocator`` show the figures with and without). The price:
    resident memory stays near its peak instead of shrinking, and glibc grows the heap a few times before it
    settles on reusing a freed chunk (the testing phase of a CIFAR model peaked at 1.25 GB against 0.83 GB).
    Process-wide, so the library never does it on import; the command line does it at start. Nothing happens off
    glibc, when the user already chose (a ``MALLOC_*`` environment variable, or another allocator preloaded), or
    with ``MAPPRUNE_ALLOCATOR=system``. Returns whether the setting is in force.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD") \
            or any(k.startswith("MALLOC_") for k in os.environ) or os.environ.get("MAPPRUNE_ALLOCATOR") == "system":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    _ALLOCATOR_TUNED = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    return _ALLOCATOR_TUNED
