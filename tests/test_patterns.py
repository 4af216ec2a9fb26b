import math

import pytest
import torch

from sparsecraft import ConfigError, TargetError
from sparsecraft.patterns import NM, Block, Rows, Unstructured, num_to_prune, parse_pattern


def test_rounding_rule_is_nearest_with_halves_up():
    assert num_to_prune(0.5, 11) == 6  # 5.5 -> 6
    assert num_to_prune(0.7, 10) == 7  # 7.000000000000001 stays 7
    assert num_to_prune(0.25, 10) == 3  # 2.5 -> 3
    assert num_to_prune(0.24, 10) == 2
    assert num_to_prune(0.0, 10) == 0


@pytest.mark.parametrize("shape", [(7, 13), (32, 16), (8, 4, 3, 3)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.95])
def test_unstructured_exact_count_and_lowest_scores(shape, sparsity):
    torch.manual_seed(1)
    scores = torch.rand(shape)
    keep = Unstructured().keep_mask(scores, sparsity)
    k = math.floor(sparsity * scores.numel() + 0.5)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert int((~keep).sum()) == k
    if 0 < k < scores.numel():  # every pruned score <= every kept score
        assert scores[~keep].max() <= scores[keep].min()


def test_unstructured_ties_prune_lower_index_first():
    scores = torch.ones(10)
    keep = Unstructured().keep_mask(scores, 0.3)
    assert keep.tolist() == [False] * 3 + [True] * 7
    again = Unstructured().keep_mask(scores, 0.3)
    assert torch.equal(keep, again)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (1, 8), (2, 8), (3, 5)])
def test_nm_every_group_keeps_exactly_n_largest(n, m):
    torch.manual_seed(2)
    scores = torch.rand(6, 4 * m)
    pat = NM(n, m)
    keep = pat.keep_mask(scores)
    groups_keep = keep.reshape(-1, m)
    groups = scores.reshape(-1, m)
    assert (groups_keep.sum(1) == n).all()
    for g, k in zip(groups, groups_keep):
        assert set(torch.topk(g, n).indices.tolist()) == set(k.nonzero().flatten().tolist())
    assert pat.is_valid(keep)
    assert int(keep.sum()) * m == keep.numel() * n


def test_nm_conv_groups_run_over_in_channels_times_kernel():
    torch.manual_seed(3)
    scores = torch.rand(8, 3, 2, 2)  # reduction size 12, divisible by 4
    keep = NM(2, 4).keep_mask(scores)
    assert (keep.reshape(8, 12).reshape(-1, 4).sum(1) == 2).all()


def test_nm_ties_deterministic():
    keep = NM(2, 4).keep_mask(torch.ones(1, 8))
    assert keep.tolist() == [[False, False, True, True, False, False, True, True]]


def test_nm_shape_mismatch_names_layer():
    with pytest.raises(TargetError, match="layer 'fc.weight'.*divisible by M=4"):
        NM(2, 4).keep_mask(torch.rand(4, 10), layer="fc.weight")


@pytest.mark.parametrize("spec", ["4:4", "0:4", "5:4", "2:1"])
def test_nm_bad_n_m(spec):
    with pytest.raises(ConfigError, match="1 <= N < M"):
        parse_pattern(spec)


def test_block_prunes_whole_lowest_blocks():
    torch.manual_seed(4)
    scores = torch.rand(8, 12)
    scores[0:2, 0:3] = 0.0  # clearly the lowest block
    pat = Block(2, 3)
    keep = pat.keep_mask(scores, 0.25)  # 16 blocks -> prune 4
    assert pat.is_valid(keep)
    assert int((~keep).sum()) == 4 * 6
    assert not keep[0:2, 0:3].any()


def test_block_mismatch():
    with pytest.raises(TargetError, match="block 3x3 does not tile"):
        Block(3, 3).keep_mask(torch.rand(8, 8), 0.5, layer="x")


def test_rows_prunes_rows_with_lowest_sums_conv():
    scores = torch.rand(6, 2, 3, 3) + 1
    scores[4] = 0.01
    scores[1] = 0.02
    keep = Rows().keep_mask(scores, 2 / 6)
    assert Rows().is_valid(keep)
    assert not keep[4].any() and not keep[1].any()
    assert keep[[0, 2, 3, 5]].all()


def test_parse_pattern_spellings():
    assert parse_pattern("unstructured") == Unstructured()
    assert parse_pattern("2:4") == NM(2, 4)
    assert parse_pattern("block:4x2") == Block(4, 2)
    assert parse_pattern("filters") == Rows()
    with pytest.raises(ConfigError, match="unknown pattern 'zigzag'"):
        parse_pattern("zigzag")


@pytest.mark.parametrize("seed", range(5))
def test_selection_equals_stable_sort_with_many_ties(seed):
    from sparsecraft.patterns import _prune_lowest

    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 7, (503,), generator=gen).float()  # heavy ties
    for k in (0, 1, 50, 251, 502, 503):
        expected = torch.ones(503, dtype=torch.bool)
        expected[torch.sort(scores, stable=True).indices[:k]] = False
        assert torch.equal(_prune_lowest(scores, k), expected), k
