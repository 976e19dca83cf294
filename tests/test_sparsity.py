"""FedSpaLLM server maths (core/sparsity.py) against hand-computed values."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fedprune.core.sparsity import (
    cover_layers,
    expand_mask,
    expand_nm,
    is_nm_sparse,
    l0_weights,
    layer_budget,
    nm_mask,
    sample_layers,
    sparsity_of,
    sparsity_summary,
)

# --- layer_budget ---------------------------------------------------------------------------


def test_layer_budget_hand_computed():
    # floor(60 * 1/4) + 1 = 16, 16; floor(60 * 2/4) + 1 = 31 -> capped at L = 30
    assert layer_budget([1, 1, 2], 30) == [16, 16, 30]
    assert layer_budget([1.0], 4) == [4]             # floor(8) + 1 = 9 -> 4
    assert layer_budget([1, 3], 8) == [5, 8]         # floor(16/4)+1 = 5, floor(48/4)+1 = 13 -> 8


def test_layer_budget_floor_is_exact():
    # 2*3*0.6/1.8 = 2 exactly, but in floats it is 1.9999999999999998 (floor 1)
    assert layer_budget([0.1, 0.6, 1.1], 3) == [1, 3, 3]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_layer_budget_rejects_bad_scores(bad):
    with pytest.raises(ValueError, match="resource score of client 1"):
        layer_budget([1.0, bad], 10)


def test_layer_budget_rejects_empty_and_bad_layers():
    with pytest.raises(ValueError):
        layer_budget([], 10)
    with pytest.raises(ValueError, match="num_layers"):
        layer_budget([1.0], 0)


# --- sample_layers --------------------------------------------------------------------------


def test_sample_layers_distinct_sorted_and_reproducible():
    a = sample_layers(7, 3, 2, 10, 30)
    assert a == sorted(set(a)) and len(a) == 10 and all(0 <= i < 30 for i in a)
    assert a == sample_layers(7, 3, 2, 10, 30)
    others = [sample_layers(8, 3, 2, 10, 30), sample_layers(7, 4, 2, 10, 30),
              sample_layers(7, 3, 5, 10, 30)]
    assert all(o != a for o in others)  # each of seed, round, client changes the draw
    assert sample_layers(0, 0, 0, 30, 30) == list(range(30))


def test_sample_layers_uniform():
    counts = Counter(i for c in range(2000) for i in sample_layers(1, 0, c, 3, 10))
    # each layer expected 2000 * 3/10 = 600 times, sd ~ 20
    assert all(abs(counts[i] - 600) < 100 for i in range(10))


@pytest.mark.parametrize("k", [0, 31])
def test_sample_layers_rejects_bad_budget(k):
    with pytest.raises(ValueError, match="layer budget"):
        sample_layers(0, 0, 0, k, 30)


def test_sample_layers_rejects_negative_seed():
    with pytest.raises(ValueError, match="seed"):
        sample_layers(-1, 0, 0, 2, 30)


# --- cover_layers ---------------------------------------------------------------------------


@pytest.mark.parametrize("budgets,num_layers", [([16, 16, 30], 30), ([3, 2, 1], 6),
                                                ([2, 2, 2, 2], 7), ([1] * 5, 5)])
def test_cover_layers_covers_with_exact_budgets(budgets, num_layers):
    for rnd in range(20):
        sets = cover_layers(11, rnd, budgets, num_layers)
        assert set().union(*sets) == set(range(num_layers))
        for s, k in zip(sets, budgets, strict=True):
            assert s == sorted(set(s)) and len(s) == k
        assert sets == cover_layers(11, rnd, budgets, num_layers)


def test_cover_layers_exact_partition_when_budgets_sum_to_L():
    sets = cover_layers(0, 0, [3, 2, 1], 6)
    assert sorted(i for s in sets for i in s) == list(range(6))  # disjoint


def test_cover_layers_marginal_is_uniform():
    counts = Counter(i for rnd in range(1000) for i in cover_layers(3, rnd, [2, 2, 1], 5)[0])
    # client 0 holds each layer with probability 2/5: 400 of 1000, sd ~ 15.5
    assert all(abs(counts[i] - 400) < 80 for i in range(5))


def test_cover_layers_errors():
    with pytest.raises(ValueError, match="sum of layer budgets"):
        cover_layers(0, 0, [2, 2], 5)
    with pytest.raises(ValueError, match="layer budget of client 1"):
        cover_layers(0, 0, [2, 6], 5)


# --- l0_weights -----------------------------------------------------------------------------


def test_l0_weights_and_l0_mean():
    assert torch.equal(l0_weights(torch.tensor([0.0, -1.5, 2.0, 0.0])),
                       torch.tensor([0.0, 1.0, 1.0, 0.0]))
    w1, w2 = torch.tensor([0.0, 2.0, 4.0]), torch.tensor([0.0, 0.0, 6.0])
    m1, m2 = l0_weights(w1), l0_weights(w2)
    mean = (m1 * w1 + m2 * w2) / (m1 + m2).clamp(min=1)
    assert torch.equal(mean, torch.tensor([0.0, 2.0, 5.0]))  # (0)/0 -> 0, 2/1, (4+6)/2


# --- expand_mask ----------------------------------------------------------------------------

W = torch.tensor([[0.0, 0.5, -0.2], [0.3, 0.1, 0.0]])
C = torch.tensor([[3, 2, 2], [1, 2, 0]])  # N = 3; entry 5 is 0 with C = 0 ("other reason")


def test_expand_mask_largest_count_then_smallest_magnitude():
    # k = ceil(0.5 * 6) = 3, already zero 2 (flat 0 and 5) -> zero 1 more: among C = 2
    # (flat 1, 2, 4) the smallest |W| is flat 4 (0.1)
    out = expand_mask(W, C, 3, 0.5)
    assert torch.equal(out, torch.tensor([[0.0, 0.5, -0.2], [0.3, 0.0, 0.0]]))
    # k = ceil(4.2) = 5 -> 3 more: flat 4 (0.1), 2 (0.2), 1 (0.5); flat 3 (C = 1) survives
    out = expand_mask(W, C, 3, 0.7)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]]))


def test_expand_mask_count_beats_magnitude():
    out = expand_mask(torch.tensor([0.9, 0.01]), torch.tensor([2, 1]), 3, 0.5)
    assert torch.equal(out, torch.tensor([0.0, 0.01]))


def test_expand_mask_equal_count_and_magnitude_ties_by_index():
    w = torch.tensor([0.2, -0.2, 0.2, 0.5])
    out = expand_mask(w, torch.tensor([1, 1, 1, 0]), 2, 0.5)  # k = 2
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.2, 0.5]))


def test_expand_mask_nothing_when_already_enough_zeros():
    w = torch.tensor([0.0, 0.0, 0.0, 0.4])
    out = expand_mask(w, torch.tensor([2, 2, 2, 1]), 2, 0.5)  # k = 2 <= 3 already zero
    assert torch.equal(out, w) and out is not w


def test_expand_mask_all_pruned():
    w = torch.zeros(2, 2)
    assert torch.equal(expand_mask(w, torch.full((2, 2), 4), 4, 0.5), w)


def test_expand_mask_exact_zero_count_and_no_mutation():
    g = torch.Generator().manual_seed(0)
    for n in range(1, 6):
        counts = torch.randint(0, n + 1, (16, 24), generator=g)
        w = torch.randn(16, 24, generator=g) * (counts < n)
        w[torch.rand(16, 24, generator=g) < 0.05] = 0  # zeros for other reasons
        before = w.clone()
        # k = ceil(s * 384): 38.4 -> 39, 115.2 -> 116, 192, 345.6 -> 346
        for s, k in ((0.1, 39), (0.3, 116), (0.5, 192), (0.9, 346)):
            out = expand_mask(w, counts, n, s)
            z = int((w == 0).sum())
            assert int((out == 0).sum()) == max(k, z)
            assert torch.equal(out[out != 0], w[out != 0])  # only zeroing, nothing else moves
        assert torch.equal(w, before)


def test_expand_mask_target_is_exact_decimal():
    # 0.55 * 100 = 55.00000000000001 in floats; the target is 55 zeros, not 56
    out = expand_mask(torch.arange(1.0, 101.0), torch.zeros(100, dtype=torch.long), 2, 0.55)
    assert int((out == 0).sum()) == 55 and torch.equal(out[55:], torch.arange(56.0, 101.0))


def test_expand_mask_non_contiguous_weight():
    out = expand_mask(W.T, C.T, 3, 0.5)  # the same entries, transposed
    assert torch.equal(out, torch.tensor([[0.0, 0.3], [0.5, 0.0], [-0.2, 0.0]]))


def test_expand_mask_keeps_dtype():
    w = torch.tensor([0.5, 0.25, 0.0, 1.0], dtype=torch.bfloat16)
    out = expand_mask(w, torch.tensor([0, 1, 2, 0]), 2, 0.5)
    assert out.dtype == torch.bfloat16 and out.tolist() == [0.5, 0.0, 0.0, 1.0]


# --- expand_nm ------------------------------------------------------------------------------

def test_expand_nm_votes_then_magnitude_per_group():
    w = torch.tensor([[0.5, -0.1, 0.3, 0.2, 0.0, 0.4, 0.0, 0.9],
                      [0.0, 0.7, 0.6, 0.8, 0.2, 0.2, 0.2, 0.2]])
    c = torch.tensor([[1, 1, 0, 2, 3, 1, 3, 0],
                      [3, 0, 0, 0, 1, 1, 1, 1]])
    out = expand_nm(w, c, 2, 4)
    assert torch.equal(out, torch.tensor([
        [0.5, 0.0, 0.3, 0.0,   # most votes (2) first, then the smaller |W| of the C = 1 tie
         0.0, 0.4, 0.0, 0.9],  # already two zeros: unchanged
        [0.0, 0.7, 0.0, 0.8,   # one zero; the next is the smallest |W| (all C = 0)
         0.0, 0.0, 0.2, 0.2]]))  # full tie: the earlier entries
    assert is_nm_sparse(out, 2, 4) and torch.equal(w[1, :4], torch.tensor([0.0, 0.7, 0.6, 0.8]))


def test_expand_nm_without_votes_is_magnitude_nm():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    out = expand_nm(w, torch.zeros(w.shape, dtype=torch.long), 2, 4)
    assert torch.equal(out, w * nm_mask(w.abs(), 2, 4))


def test_expand_nm_errors():
    with pytest.raises(ValueError, match="shape"):
        expand_nm(torch.ones(2, 4), torch.zeros(4, 2, dtype=torch.long), 2, 4)
    with pytest.raises(ValueError, match="N:M"):
        expand_nm(torch.ones(2, 6), torch.zeros(2, 6, dtype=torch.long), 2, 4)


def test_expand_mask_errors():
    with pytest.raises(ValueError, match="sparsity"):
        expand_mask(W, C, 3, 1.0)
    with pytest.raises(ValueError, match="shape"):
        expand_mask(W, C.T, 3, 0.5)
    with pytest.raises(ValueError, match="integer"):
        expand_mask(W, C.float(), 3, 0.5)
    with pytest.raises(ValueError, match=r"\[0, num_owners"):
        expand_mask(W, C, 2, 0.5)
    with pytest.raises(ValueError, match="every owner pruned"):
        expand_mask(torch.ones(2, 3), C, 3, 0.5)


# --- N:M masks and summaries ----------------------------------------------------------------


def test_nm_mask_two_four():
    scores = torch.tensor([[3.0, 1.0, 2.0, 4.0, 0.5, 0.5, 0.1, 9.0]])
    # group 1 prunes 1.0 and 2.0; group 2 prunes 0.1 and the earlier 0.5 (flat 4)
    expected = torch.tensor([[True, False, False, True, False, True, False, True]])
    assert torch.equal(nm_mask(scores, 2, 4), expected)


def test_nm_mask_shapes_and_pattern():
    scores = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    keep = nm_mask(scores, 1, 4)
    assert keep.shape == scores.shape and int((~keep).sum()) == 2 * 3 * 2
    assert is_nm_sparse(scores * keep, 1, 4) and not is_nm_sparse(scores * keep, 2, 4)
    assert is_nm_sparse(scores * nm_mask(scores, 3, 4), 3, 4)


@pytest.mark.parametrize("n,m,cols", [(2, 2, 4), (0, 4, 4), (2, 4, 6)])
def test_nm_mask_errors(n, m, cols):
    with pytest.raises(ValueError):
        nm_mask(torch.ones(2, cols), n, m)


def test_sparsity_of_and_summary():
    assert sparsity_of(torch.tensor([0.0, 1.0, 0.0, 2.0])) == 0.5
    s = sparsity_summary({"a": torch.tensor([0.0, 1.0, 0.0, 2.0]),
                          "b": torch.tensor([[0.0, 0.0], [0.0, 3.0]])})
    assert s.per_matrix == {"a": 0.5, "b": 0.75}
    assert (s.zeros, s.total, s.overall) == (5, 8, 0.625)
