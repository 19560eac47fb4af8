"""Which examples form each step: length-grouped order, token budgets (lit_cats.data.sampling)."""

from __future__ import annotations

import pytest
import torch

from lit_cats.data.sampling import LengthGroupedSampler, TokenBudgetBatchSampler


@pytest.fixture
def lengths() -> list[int]:
    return torch.randint(32, 257, (500,), generator=torch.Generator().manual_seed(1)).tolist()


def test_token_budget_batches_cover_every_example_once_within_budget(lengths):
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=2048, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in batches)
    assert len(sampler) == len(batches)
    # Full: on average a batch leaves less than one example's worth of room.
    assert sum(lengths) / len(batches) > 2048 - 257


def test_token_budget_order_is_fixed_per_epoch_and_changes_with_it(lengths):
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=2048, seed=3)
    batches = list(sampler)
    assert list(sampler) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_token_budget_shards_are_disjoint_and_equally_long(lengths):
    shards = [
        list(TokenBudgetBatchSampler(lengths, 2048, 3, num_replicas=2, rank=r)) for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1])
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}


def test_token_budget_refuses_an_example_longer_than_the_budget():
    with pytest.raises(ValueError, match="longest example"):
        TokenBudgetBatchSampler([10, 300], max_tokens=256)


def test_length_grouped_sampler_is_a_seeded_permutation_grouped_by_length():
    lengths = [
        int(x) for x in torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0))
    ]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    assert order == list(LengthGroupedSampler(lengths, batch_size=4, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != order
    first = [lengths[i] for i in order[:200]]  # one mega-batch: sorted, longest first
    assert first == sorted(first, reverse=True)
