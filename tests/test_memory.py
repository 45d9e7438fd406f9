"""clip_med.core.memory: freed host memory is reused instead of being faulted back in every step."""

import platform
import subprocess
import sys

import pytest

from clip_med.training.config import TrainerConfig

# A training step in miniature, on glibc's malloc itself (torch's CPU allocator calls it the same way,
# but Python's own allocations between a step's tensors make the heap's layout vary from run to run):
# four 8 MiB activations and a 48 MiB one alive at once, written, then freed. Count the minor page
# faults (pages the kernel had to map and zero again) over 20 steps after 6 warm-up steps; a fresh process per setting.
_STEPS = """
import ctypes, resource, sys
from clip_med.core.memory import _glibc, reuse_freed_memory
libc = _glibc()
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def step():
    sizes = [8 * 2**20] * 4 + [48 * 2**20]  # and one above glibc's largest mmap threshold (32 MiB)
    activations = [libc.malloc(size) for size in sizes]
    for block, size in zip(activations, sizes):
        ctypes.memset(block, 1, size)
    for block in reversed(activations):
        libc.free(block)
for _ in range(6):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(setting: str) -> int:
    done = subprocess.run([sys.executable, "-c", _STEPS, setting], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")
def test_a_block_freed_every_step_is_reused_instead_of_faulted_back_in():
    default, reused = _page_faults("default"), _page_faults("reuse")
    # by default glibc maps the 48 MiB block afresh and gives the free top of its heap back each step
    assert default > 20 * 4000, default
    assert reused < default / 20, (reused, default)


def test_the_trainer_keeps_freed_memory_by_default():
    assert TrainerConfig().reuse_freed_memory
