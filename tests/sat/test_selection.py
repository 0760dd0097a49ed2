"""Selectors: exact counts, no duplicates, top-k correctness, temperature limits."""

from __future__ import annotations

import pytest
import torch

from satrun.sat.selection import kept_count, sample, topk


def test_kept_count_rounds_and_aligns() -> None:
    assert kept_count(1536, 0.5) == 768
    assert kept_count(9, 0.5) == 4  # round(4.5) -> 4 (banker's rounding of .5)
    assert kept_count(10, 0.0) == 10
    assert kept_count(10, 0.99) == 1  # never zero
    assert kept_count(1536, 0.3, align=64) % 64 == 0 and abs(kept_count(1536, 0.3, align=64) - 1075) <= 32
    assert kept_count(1536, 0.99, align=64) == 64
    assert kept_count(48, 0.5, align=64) == 24  # fewer than align: alignment is impossible, plain rounding


def test_topk_picks_the_top_scores_sorted() -> None:
    scores = torch.tensor([[0.1, 5.0, 0.3, 4.0, 2.0], [9.0, 0.0, 1.0, 8.0, 7.0]])
    assert topk(scores, 3).tolist() == [[1, 3, 4], [0, 3, 4]]


def test_sampling_exact_k_without_duplicates() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 100, generator=g)
    for k in (1, 17, 50, 100):
        idx = sample(scores, k, 0.05, g)
        assert idx.shape == (4, k)
        for row in idx:
            assert row.unique().numel() == k and bool((row[1:] > row[:-1]).all())


def test_sampling_is_deterministic_given_the_generator_seed() -> None:
    scores = torch.rand(1, 200)
    draw = lambda seed: sample(scores, 50, 0.05, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_sampling_low_temperature_approaches_topk() -> None:
    scores = torch.linspace(0.0, 1.0, 64)[None]
    g = torch.Generator().manual_seed(1)
    hits = [(sample(scores, 16, 1e-4, g) == topk(scores, 16)).all().item() for _ in range(50)]
    assert all(hits)


def test_sampling_high_temperature_approaches_uniform() -> None:
    n, k, draws = 20, 5, 4000
    scores = torch.linspace(0.0, 1.0, n)[None]  # strongly ordered scores
    g = torch.Generator().manual_seed(2)
    counts = torch.zeros(n)
    for _ in range(draws):
        counts[sample(scores, k, 1e3, g)[0]] += 1
    freq = counts / draws  # uniform: each neuron kept with probability k/n = 0.25
    assert (freq - k / n).abs().max() < 0.04


def test_sampling_default_temperature_prefers_high_scores() -> None:
    n, k = 100, 20
    scores = torch.linspace(0.0, 1.0, n)[None]
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(n)
    for _ in range(500):
        counts[sample(scores, k, 0.05, g)[0]] += 1
    assert counts[-20:].sum() > counts[:50].sum() * 10  # mass on the top, but not only top-k
    assert counts[: n - k].sum() > 0  # still explores beyond the top k


def test_rank_normalisation_ignores_an_outlier_that_max_normalisation_follows() -> None:
    from satrun.sat.selection import normalized

    n, k = 100, 20
    scores = torch.linspace(0.0, 1.0, n)
    scores[-1] = 1000.0  # one outlier neuron: under max, every other score is near 0
    assert normalized(scores[None], "rank")[0].tolist() == pytest.approx([i / (n - 1) for i in range(n)])
    counts = {how: torch.zeros(n) for how in ("max", "rank")}
    g = torch.Generator().manual_seed(4)
    for _ in range(300):
        for how in counts:
            counts[how][sample(scores[None], k, 0.05, g, normalize=how)[0]] += 1
    top = slice(n - k, n)
    assert counts["rank"][top].sum() > 0.6 * 300 * k  # the highest scores are mostly kept
    assert counts["max"][top].sum() < 0.4 * 300 * k  # apart from the outlier, almost uniform
    with pytest.raises(ValueError, match="normalize"):
        normalized(scores[None], "mean")


def test_kept_channel_counts_are_multiples_of_64_on_cuda_by_default_and_exact_on_cpu() -> None:
    """Llama-2-7B's 11008 channels at the ladder's rungs: cuBLAS keeps its fastest bf16 kernels
    only for aligned sizes, so CUDA rounds by default; CPU keeps the exact rate."""
    from satrun.sat.settings import SelectorConfig

    default = SelectorConfig()
    rungs = (0.4, 0.3, 0.2, 0.1)
    assert [kept_count(11008, r, default.align_on("cpu")) for r in rungs] == [6605, 7706, 8806, 9907]
    on_gpu = [kept_count(11008, r, default.align_on("cuda")) for r in rungs]
    assert all(k % 64 == 0 for k in on_gpu) and on_gpu == [6592, 7680, 8832, 9920]
    assert SelectorConfig(align=1).align_on("cuda") == 1  # a set value is kept
