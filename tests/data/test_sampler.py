"""The training sampler shares each epoch among processes in global steps; the evaluation
sampler shares a split without padding."""

from __future__ import annotations

import pytest

from imgclf.data.dataset import EpochSampler, ShareSampler


def _epoch(size: int, world: int, batch: int, accumulate: int, epoch: int = 0, skip: int = 0) -> list[list[int]]:
    shares = []
    for rank in range(world):
        sampler = EpochSampler(size, seed=5, rank=rank, world_size=world, batch_size=batch, accumulate=accumulate)
        sampler.set_epoch(epoch, skip)
        shares.append([index for _, index in sampler])
    return shares


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_are_disjoint_and_take_whole_global_steps(world):
    size, batch = 103, 4
    shares = _epoch(size, world, batch, accumulate=2)
    taken = [i for share in shares for i in share]
    assert len(taken) == len(set(taken))  # disjoint, no image twice in an epoch
    steps = size // (batch * 2 * world)
    assert all(len(share) == steps * batch * 2 for share in shares)  # DDP needs equal steps
    assert size - len(taken) < batch * 2 * world  # only the tail short of one global step is left


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_image_is_trained_on_over_a_few_epochs(world):
    seen = {i for epoch in range(8) for share in _epoch(50, world, 4, 1, epoch) for i in share}
    assert seen == set(range(50))  # the tail left out differs per epoch


def test_two_ranks_see_what_one_process_accumulating_two_sees_step_by_step():
    one = _epoch(64, 1, 4, accumulate=2)[0]
    two = _epoch(64, 2, 4, accumulate=1)
    for step in range(64 // 8):
        micro = one[step * 8 : (step + 1) * 8]
        assert two[0][step * 4 : (step + 1) * 4] == micro[:4] and two[1][step * 4 : (step + 1) * 4] == micro[4:]


def test_skipping_steps_resumes_the_same_epoch_with_another_world_size():
    full = _epoch(96, 2, 4, 1, epoch=3)
    first_steps = {i for share in full for i in share[: 3 * 4]}
    rest = _epoch(96, 1, 4, 2, epoch=3, skip=3)[0]  # same global batch of 8, one process
    assert first_steps.isdisjoint(rest) and len(first_steps) + len(rest) == 96


def test_data_smaller_than_a_global_batch_is_one_step_shared_evenly():
    shares = _epoch(7, 2, 8, 1)
    assert [len(s) for s in shares] == [3, 3] and set(shares[0]).isdisjoint(shares[1])
    assert EpochSampler(7, 0, world_size=2, batch_size=8).steps() == 1


@pytest.mark.parametrize("size,world", [(341, 2), (341, 3), (10, 3), (2, 3), (0, 2)])
def test_evaluation_shares_cover_every_image_once_in_order(size, world):
    shares = [list(ShareSampler(size, rank, world)) for rank in range(world)]
    assert [i for share in shares for i in share] == list(range(size))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
