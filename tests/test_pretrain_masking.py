"""Masking on the stage-3 grid: kept fractions, complementary partitions, block-wise upsampling."""

import pytest
import torch

from convmae_det.modeling.masking import (
    complementary_masking,
    num_kept_tokens,
    random_masking,
    upsample_visible,
)
from convmae_det.modeling.pretrain import build_pretrain_model


@pytest.mark.parametrize(
    "grid,ratio", [((14, 14), 0.75), ((4, 6), 0.5), ((3, 5), 0.8), ((2, 2), 0.0)]
)
def test_random_masking_keeps_exactly_the_kept_fraction_per_sample(grid, ratio):
    num = grid[0] * grid[1]
    keep = num_kept_tokens(num, ratio)
    assert keep == round(num * (1 - ratio))
    m = random_masking(torch.rand(5, num, generator=torch.Generator().manual_seed(0)), keep)
    (ids,), (mask,) = m.ids_keep, m.masks
    assert ids.shape == (5, keep)
    assert torch.equal((mask == 0).sum(1), torch.full((5,), keep))
    # the visible ids are exactly the zero positions of the mask, all distinct
    for b in range(5):
        assert set(ids[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    # ids_restore inverts the shuffle
    shuffle = torch.argsort(m.ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), torch.arange(num).expand(5, -1))


def test_masks_differ_between_samples():
    m = random_masking(torch.rand(4, 196, generator=torch.Generator().manual_seed(1)), 49)
    assert len({tuple(sorted(r.tolist())) for r in m.ids_keep[0]}) == 4


@pytest.mark.parametrize("ratio", [0.7, 0.33])
def test_ratio_with_fractional_kept_count_is_rejected(ratio):
    with pytest.raises(ValueError, match="kept count is an integer"):
        num_kept_tokens(196, ratio)


def test_complementary_masks_partition_the_grid():
    num, k = 196, 4
    m = complementary_masking(torch.rand(3, num, generator=torch.Generator().manual_seed(2)), k)
    assert m.num_subsets == k
    visible = torch.stack([1 - mask for mask in m.masks])  # (K, B, L)
    assert torch.equal(visible.sum(0), torch.ones(3, num))  # every token visible exactly once
    for j in range(k):
        assert m.ids_keep[j].shape == (3, num // k)
        assert torch.equal(visible[j].sum(1), torch.full((3,), num // k, dtype=visible.dtype))
    all_ids = torch.cat(m.ids_keep, dim=1).sort(dim=1).values
    assert torch.equal(all_ids, torch.arange(num).expand(3, -1))


def test_complementary_masks_need_a_divisible_grid():
    with pytest.raises(ValueError, match="complementary"):
        complementary_masking(torch.rand(1, 15), 4)


def test_stage_masks_are_exact_upsamplings_of_the_stage3_mask():
    model = build_pretrain_model("convmae_toy")
    imgs = torch.zeros(2, 3, 64, 96)
    masking = model.sample_masking(imgs)
    grid = model.token_grid(imgs)
    m1, m2 = model.stage_masks(masking, grid)
    assert m1.shape == (2, 1, 16, 24) and m2.shape == (2, 1, 8, 12)
    visible = (1 - masking.masks[0]).reshape(2, 1, 4, 6)
    # every 4x4 (stage 1) / 2x2 (stage 2) block equals its stage-3 token's visibility
    assert torch.equal(torch.nn.functional.max_pool2d(m1, 4), visible)
    assert torch.equal(-torch.nn.functional.max_pool2d(-m1, 4), visible)
    assert torch.equal(torch.nn.functional.avg_pool2d(m2, 2), visible)
    assert torch.equal(upsample_visible(masking.masks[0], grid, 1), visible)


def test_fastconvmae_stage_masks_are_complementary_at_every_stage():
    model = build_pretrain_model("fastconvmae_toy")
    imgs = torch.zeros(2, 3, 64, 64)
    m1, m2 = model.stage_masks(model.sample_masking(imgs), model.token_grid(imgs))
    assert len(m1) == len(m2) == 4
    assert torch.equal(sum(m1), torch.ones(2, 1, 16, 16))
    assert torch.equal(sum(m2), torch.ones(2, 1, 8, 8))
