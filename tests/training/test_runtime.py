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


def _draws() -> tuple:
    import random

    import numpy as np
    import torch

    return random.random(), random.getrandbits(64), np.random.rand(3).tolist(), torch.rand(3).tolist(), \
        torch.randint(0, 2**62, (2,)).tolist()


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**31, 2**32 - 1])
def test_transformers_set_seed_seeds_exactly_as_satrun_did(seed):
    """satrun seeds with ``transformers.set_seed``; the generators start where satrun's own
    seeding (random, NumPy with ``seed % 2**32``, torch) put them, for every seed NumPy takes."""
    import random

    import numpy as np
    import torch
    from transformers import set_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    before = _draws()
    set_seed(seed)
    assert _draws() == before


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seeds_numpy_cannot_take_are_refused_by_set_seed(seed):
    """Where satrun's own seeding wrapped the seed into NumPy's range, set_seed raises."""
    from transformers import set_seed

    with pytest.raises(ValueError):
        set_seed(seed)


def test_gpu_peaks_match_the_most_specific_name() -> None:
    from satrun.training.runtime import bf16_peak_for

    assert bf16_peak_for("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert bf16_peak_for("NVIDIA H100 NVL") == 835e12  # not the SXM peak
    assert bf16_peak_for("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak_for("NVIDIA H200 NVL") == 835e12
    assert bf16_peak_for("NVIDIA H200") == 989e12
    assert bf16_peak_for("NVIDIA L40") == 181e12 and bf16_peak_for("NVIDIA L4") == 121e12
    assert bf16_peak_for("NVIDIA GeForce RTX 3090") is None
