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
assert keep_freed_host_memory()
page_faults_of_churn(), page_faults_of_churn()  # these map the blocks that are kept from then on
print(default, page_faults_of_churn())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_host_memory_is_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    assert default >= 5  # by default every 64 MiB tensor is mapped afresh: its pages fault in (4 KiB or huge)
    assert kept < default // 20
