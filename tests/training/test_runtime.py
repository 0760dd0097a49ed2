import os
import platform
import subprocess
import sys

import pytest

CHURN = """
import resource, torch
from satrun.training.runtime import keep_freed_host_memory

def page_faults_of_churn():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 2**20)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = page_faults_of_churn()
if keep_freed_host_memory():
    page_faults_of_churn(), page_faults_of_churn()  # these map the blocks that are kept from then on
    print(default, page_faults_of_churn())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or "LD_PRELOAD" in os.environ,
                    reason="tunes glibc malloc only (a preloaded allocator ignores it)")
def test_freed_host_memory_is_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True).stdout
    if not out.strip():
        pytest.skip("this glibc refused the settings")
    default, kept = map(int, out.split())
    assert default >= 5  # by default every 64 MiB tensor is mapped afresh: its pages fault in (4 KiB or huge)
    assert kept < default // 20
