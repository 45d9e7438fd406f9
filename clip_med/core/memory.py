"""Host memory: keep what a training step frees for the next step instead of giving it back to the OS.

glibc's malloc serves blocks from 128 KiB up (a threshold it raises as such blocks are freed, up to
32 MiB) with fresh ``mmap`` calls and returns free memory at the top of its heap to the OS. A CPU
training step allocates and frees the same activations and gradients every step, so each step
faults tens of thousands of zeroed pages back in: on the 2-core machine 18,000-37,000 page faults
and 36-70 ms of kernel time in a 630 ms step of medclip-tiny (``benchmarks/train_bench.py``).
With mmap off (``M_MMAP_MAX`` 0: blocks over the largest mmap threshold, 32 MiB, would still be
mapped afresh, as a larger model's activations are) and trimming off below 2 GiB of free heap,
freed blocks stay in the heap and are reused: on medclip-tiny under 100 page faults and about 1 ms
per step, the same arithmetic and results. This is what PyTorch's CPU performance guides get from
jemalloc or tcmalloc through ``LD_PRELOAD``, done with glibc's own ``mallopt`` so that nothing has
to be installed or preloaded.

The cost: the process keeps its peak heap until it exits (a training process reaches its peak in
the first steps and stays there). Other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: the largest trim threshold it accepts, i.e. trimming only beyond 2 GiB of free top.
TRIM_THRESHOLD_BYTES = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (for this process and the processes it forks
    later). Returns whether the setting took effect; False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: the C library's own malloc settings are kept")
        return False
    done = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not done:
        log.warning("glibc's mallopt refused the settings that keep freed memory for reuse: each CPU step "
                    "may fault its memory back in (slower, same results)")
    return done
