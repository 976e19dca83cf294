"""PruFed layer-drop plans (core/layerdrop.py): hand-computed lists and synthetic hidden states
whose answers are known by construction."""

from __future__ import annotations

import math

import pytest
import torch

from fedprune.core.layerdrop import (
    STRATEGIES,
    LayerSimilarity,
    angular_distance_block,
    block_influence_drop,
    explicit,
    keep_count,
    plan_layers,
)

# L = 30: k = floor(r*30 + 1/2) = 23 (22.5 rounds up), 15, 8 (7.5 rounds up)
EXPECTED = {
    ("top", 0.75): [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                    21, 22],
    ("top", 0.5): [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
    ("top", 0.25): [0, 1, 2, 3, 4, 5, 6, 7],
    ("bottom", 0.75): [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
                       26, 27, 28, 29],
    ("bottom", 0.5): [15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
    ("bottom", 0.25): [22, 23, 24, 25, 26, 27, 28, 29],
    # first ceil(k/2), last floor(k/2): 12 + 11, 8 + 7, 4 + 4
    ("symmetric", 0.75): [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                          19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
    ("symmetric", 0.5): [0, 1, 2, 3, 4, 5, 6, 7, 23, 24, 25, 26, 27, 28, 29],
    ("symmetric", 0.25): [0, 1, 2, 3, 26, 27, 28, 29],
    # round_half_up(i * 29/22): i = 11 is 14.5 -> 15
    ("alternate", 0.75): [0, 1, 3, 4, 5, 7, 8, 9, 11, 12, 13, 15, 16, 17, 18, 20, 21, 22, 24,
                          25, 26, 28, 29],
    # round_half_up(i * 29/14): i = 7 is 14.5 -> 15
    ("alternate", 0.5): [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29],
    # round_half_up(i * 29/7) = 0, 4.14, 8.29, 12.43, 16.57, 20.71, 24.86, 29
    ("alternate", 0.25): [0, 4, 8, 12, 17, 21, 25, 29],
    # drop 7: 29, 27, 25, 23, 21, 19, 17
    ("top-alternate", 0.75): [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                              18, 20, 22, 24, 26, 28],
    # drop 15: every odd layer
    ("top-alternate", 0.5): [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28],
    # drop 22: the 15 odd layers, then 28, 26, 24, 22, 20, 18, 16
    ("top-alternate", 0.25): [0, 2, 4, 6, 8, 10, 12, 14],
}


def test_registry_has_the_five_rules():
    assert sorted(STRATEGIES) == ["alternate", "bottom", "symmetric", "top", "top-alternate"]


@pytest.mark.parametrize("name,ratio", sorted(EXPECTED))
def test_rule_based_lists_for_30_layers(name, ratio):
    kept = plan_layers(name, 30, ratio)
    assert kept == EXPECTED[name, ratio]
    assert len(kept) == keep_count(30, ratio)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_ratio_one_keeps_everything(name):
    assert STRATEGIES[name](30, 1.0) == list(range(30))
    assert STRATEGIES[name](1, 1) == [0]


def test_keep_count_rounds_half_up_exactly():
    assert [keep_count(30, r) for r in (0.75, 0.5, 0.25)] == [23, 15, 8]
    assert keep_count(10, 0.35) == 4   # 3.5 on the decimal 0.35 (the float is below 0.35)
    assert keep_count(30, 0.01) == 1   # 0.3 rounds to 0; at least one layer
    assert keep_count(4, 0.1) == 1


def test_small_odd_cases():
    assert plan_layers("symmetric", 5, 0.6) == [0, 1, 4]       # k = 3: extra one at the bottom
    assert plan_layers("top-alternate", 5, 0.4) == [1, 3]      # drop 4, 2, 0
    assert plan_layers("top-alternate", 5, 0.2) == [1]         # drop 4, 2, 0, then 3
    assert plan_layers("alternate", 5, 0.2) == [0]             # k = 1 keeps layer 0
    assert plan_layers("alternate", 5, 0.4) == [0, 4]


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), True])
def test_bad_keep_ratio(ratio):
    with pytest.raises(ValueError, match="keep ratio"):
        plan_layers("top", 30, ratio)


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(ValueError, match="middle.*known: alternate, bottom, symmetric, top"):
        plan_layers("middle", 30, 0.5)


def test_explicit():
    assert explicit([5, 1, 3], 6) == [1, 3, 5]
    for bad in ([], [1, 1], [6], [-1], [True], [1.0]):
        with pytest.raises(ValueError, match="explicit"):
            explicit(bad, 6)


# --- data-driven ----------------------------------------------------------------------------

THETA = [0.3, 0.05, 0.25, 0.06, 0.07, 0.4]  # rotation angle of each of L = 6 layers


def rotated_states(theta, tokens=5, seed=0):
    """h_{l+1} = scale_l * R(theta_l) h_l in 2-D, so cos(h_a, h_b) = cos(sum theta_a..b-1)
    for every token, whatever its start vector and the positive scales."""
    g = torch.Generator().manual_seed(seed)
    h = [torch.randn(tokens, 2, generator=g, dtype=torch.float64)]
    for t in theta:
        rot = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]],
                           dtype=torch.float64)
        h.append((h[-1] @ rot.T) * (0.5 + torch.rand(1, generator=g, dtype=torch.float64)))
    return h


def test_layer_similarity_matches_construction():
    sim = LayerSimilarity()
    sim.add_batch(rotated_states(THETA))
    for a in range(7):
        for b in range(7):
            angle = abs(sum(THETA[min(a, b):max(a, b)]))
            assert sim.angular_distance[a, b].item() == pytest.approx(angle / math.pi, abs=1e-5)
            assert sim.mean_cosine[a, b].item() == pytest.approx(math.cos(angle), abs=1e-6)
    expected_bi = torch.tensor([1 - math.cos(t) for t in THETA], dtype=torch.float64)
    assert torch.allclose(sim.block_influence, expected_bi, atol=1e-6)


def test_layer_similarity_streams_batches():
    states = rotated_states(THETA, tokens=6, seed=1)
    whole, parts = LayerSimilarity(), LayerSimilarity()
    whole.add_batch([h.reshape(2, 3, 2) for h in states])  # leading dims are tokens
    parts.add_batch([h[:2] for h in states])
    parts.add_batch([h[2:] for h in states])
    assert parts.tokens == whole.tokens == 6
    assert torch.allclose(parts.angular_distance, whole.angular_distance, atol=1e-12)
    assert torch.allclose(parts.mean_cosine, whole.mean_cosine, atol=1e-12)
    with pytest.raises(ValueError, match="hidden states"):
        parts.add_batch(states[:3])
    with pytest.raises(ValueError, match="add_batch"):
        _ = LayerSimilarity().mean_cosine


def test_angular_distance_block_on_synthetic_states():
    sim = LayerSimilarity()
    sim.add_batch(rotated_states(THETA))
    # k = 3, n = 3: d(l, l+3) * pi = 0.6, 0.36, 0.38, 0.53 -> l* = 1, drop layers 1, 2, 3
    assert angular_distance_block(sim.angular_distance, 0.5) == [0, 4, 5]
    # k = 5, n = 1: the smallest single angle is layer 1 (0.05)
    assert angular_distance_block(sim.angular_distance, 0.8) == [0, 2, 3, 4, 5]
    assert angular_distance_block(sim.angular_distance, 1.0) == [0, 1, 2, 3, 4, 5]


def test_angular_distance_block_tie_takes_first_block():
    d = torch.zeros(5, 5)
    d[0, 2], d[1, 3], d[2, 4] = 0.2, 0.1, 0.1  # L = 4, k = 2, n = 2
    assert angular_distance_block(d, 0.5) == [0, 3]


def test_block_influence_drop_on_synthetic_states():
    sim = LayerSimilarity()
    sim.add_batch(rotated_states(THETA))
    # lowest BI = smallest angles: layers 1 (0.05), 3 (0.06), 4 (0.07); not contiguous
    assert block_influence_drop(sim.block_influence, 0.5) == [0, 2, 5]


def test_block_influence_drop_tie_drops_deeper_layer():
    assert block_influence_drop(torch.tensor([0.5, 0.1, 0.1, 0.3]), 0.75) == [0, 1, 3]


def test_data_driven_errors():
    with pytest.raises(ValueError, match="distance"):
        angular_distance_block(torch.zeros(3, 4), 0.5)
    with pytest.raises(ValueError, match="finite"):
        block_influence_drop(torch.tensor([0.1, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="keep ratio"):
        block_influence_drop(torch.tensor([0.1, 0.2]), 0.0)
