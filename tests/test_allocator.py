"""Host memory: freed blocks are kept for reuse (glibc), so a repeated large allocation faults no new pages."""

import resource

import pytest
import torch

from blip3o.allocator import keep_freed_memory


def page_faults_of_a_64mb_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MiB, every page written
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_freed_large_block_is_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("glibc's mallopt is not available here")
    assert keep_freed_memory()  # once per process; the second call reports the same
    for _ in range(3):  # the heap grows to hold the block (glibc settles within a few rounds)
        page_faults_of_a_64mb_tensor()
    # fresh pages would be 16,384 faults (4 KiB each), as they are every time without the tuning
    assert max(page_faults_of_a_64mb_tensor() for _ in range(3)) < 1000
