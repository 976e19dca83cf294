"""Aggregation, selection and update validation against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from fedprune.core.aggregate import AGGREGATORS, fedavg
from fedprune.core.selection import (
    SELECTORS,
    History,
    loss_selection,
    power_of_choice,
    random_selection,
)
from fedprune.core.update import ClientUpdate, InvalidUpdate, validate_update


def upd(cid, n, **delta):
    return ClientUpdate(cid, {k: torch.tensor(v) for k, v in delta.items()}, n, 0.5)


def test_fedavg_hand_computed():
    g = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    u = [upd(0, 1, a=[1.0, 0.0], b=[3.0]), upd(1, 3, a=[-1.0, 4.0], b=[1.0])]
    out = fedavg(g, u, 1.0)
    # a: 1 + (1*1 + 3*-1)/4 = 0.5 ; 2 + (0 + 12)/4 = 5 ; b: (3 + 3)/4 = 1.5
    assert torch.allclose(out["a"], torch.tensor([0.5, 5.0]))
    assert torch.allclose(out["b"], torch.tensor([1.5]))


def test_fedavg_server_lr_and_missing_key():
    g = {"a": torch.tensor([1.0]), "b": torch.tensor([7.0])}
    u = [upd(0, 2, a=[2.0]), upd(1, 2, a=[4.0])]
    out = fedavg(g, u, 0.5)
    assert out["a"].item() == pytest.approx(1.0 + 0.5 * 3.0)
    assert out["b"].item() == 7.0  # no client sent b: it does not move


def test_fedavg_does_not_mutate_inputs_and_is_order_independent():
    g = {"a": torch.randn(4, 3)}
    u = [ClientUpdate(i, {"a": torch.randn(4, 3)}, i + 1, 1.0) for i in range(5)]
    before = {k: v.clone() for k, v in g.items()}
    d0 = u[0].delta["a"].clone()
    a = fedavg(g, u, 1.0)
    b = fedavg(g, list(reversed(u)), 1.0)
    assert torch.equal(a["a"], b["a"])
    assert torch.equal(g["a"], before["a"]) and torch.equal(u[0].delta["a"], d0)
    assert a["a"] is not g["a"]


def test_registry():
    assert AGGREGATORS["fedavg"] is fedavg
    assert SELECTORS["random"] is random_selection


def hist(c, **kw):
    return History(np.ones(c), **kw)


@pytest.mark.parametrize("c,k", [(10, 2), (100, 10), (10_000, 20), (5, 5)])
def test_random_selection(c, k):
    s = random_selection(3, hist(c), k, seed=7)
    assert len(s) == k == len(set(s)) and s == sorted(s) and all(0 <= i < c for i in s)
    assert s == random_selection(3, hist(c), k, seed=7)


def test_random_selection_varies_with_round_and_seed_and_is_roughly_uniform():
    counts = [0] * 10
    for r in range(1, 2001):
        for cid in random_selection(r, hist(10), 2, seed=0):
            counts[cid] += 1
    assert all(abs(c - 400) < 80 for c in counts)  # expected 2000*2/10 = 400
    assert random_selection(1, hist(1000), 5, 0) != random_selection(2, hist(1000), 5, 0)
    assert random_selection(1, hist(1000), 5, 0) != random_selection(1, hist(1000), 5, 1)


def test_eq9_loss_selection_hand_computed():
    # L_g = 1.0; seen clients 0..3 with L_c - L_g = 0.5, -0.2, 2.0, 0.1 ; 4 and 5 never seen
    h = hist(6, client_loss={0: 1.5, 1: 0.8, 2: 3.0, 3: 1.1}, global_loss=1.0)
    assert loss_selection(1, h, 2, seed=0) == [4, 5]        # never-seen first
    assert loss_selection(1, h, 3, seed=0) == [2, 4, 5]  # then the largest difference
    h.client_loss.update({4: 0.0, 5: 0.0})
    assert loss_selection(2, h, 2, seed=0) == [0, 2]        # 2.0 and 0.5


def test_eq9_ties_broken_by_seed():
    h = hist(50)  # nobody seen: all +inf, a seeded random tie-break
    picks = {tuple(loss_selection(1, h, 3, seed=s)) for s in range(10)}
    assert len(picks) > 5 and loss_selection(1, h, 3, 4) == loss_selection(1, h, 3, 4)


def test_power_of_choice_picks_highest_loss_among_candidates():
    sizes = np.array([0, 0, 0, 5, 5, 5, 5, 0], dtype=float)  # only 3..6 can be candidates
    h = History(sizes, client_loss={3: 0.1, 4: 2.0, 5: 0.5, 6: 3.0})
    assert power_of_choice(1, h, 2, seed=0, d=4) == [4, 6]
    got = power_of_choice(2, h, 1, seed=0, d=2)
    assert got[0] in (3, 4, 5, 6)


REF = {"w": torch.zeros(2, 2)}


@pytest.mark.parametrize("update,reason", [
    (ClientUpdate(3, {"w": torch.zeros(2, 2)}, 0, 1.0), "num_examples"),
    (ClientUpdate(3, {"w": torch.zeros(2, 2)}, 5, math.nan), "loss"),
    (ClientUpdate(3, {}, 5, 1.0), "empty"),
    (ClientUpdate(3, {"x": torch.zeros(2, 2)}, 5, 1.0), "unknown tensor 'x'"),
    (ClientUpdate(3, {"w": torch.zeros(3)}, 5, 1.0), "shape"),
    (ClientUpdate(3, {"w": torch.zeros(2, 2, dtype=torch.float64)}, 5, 1.0), "dtype"),
    (ClientUpdate(3, {"w": torch.tensor([[0.0, math.inf], [0, 0]])}, 5, 1.0), "non-finite"),
])
def test_validate_update_rejects(update, reason):
    with pytest.raises(InvalidUpdate, match=f"client 3: .*{reason}"):
        validate_update(update, REF)


def test_validate_update_accepts_partial():
    validate_update(ClientUpdate(0, {"w": torch.ones(2, 2)}, 1, 0.1), {**REF, "v": torch.ones(1)})


# --- blockwise (head) aggregation: DESIGN.md Eq. 8 -------------------------------------

from fedprune.core.blocks import Slice, block_mask, blockwise_mean

# tensor "B" [4, 1]: head 0 = rows 0:2, head 1 = rows 2:4 ; "o" [1, 4]: columns likewise
BLOCKS = [(Slice("B", 0, 0, 2), Slice("o", 1, 0, 2)), (Slice("B", 0, 2, 4), Slice("o", 1, 2, 4))]


def test_eq8_importance_weighted_per_head_and_eq5_elsewhere():
    g = {"B": torch.zeros(4, 1), "o": torch.zeros(1, 4), "A": torch.zeros(2)}
    # client 0 kept head 0 only (alpha 0.2), client 1 kept both (alpha 0.6, 0.5)
    u0 = ClientUpdate(0, {"B": torch.tensor([[1.0], [1.0], [0.0], [0.0]]),
                          "o": torch.tensor([[2.0, 2.0, 0.0, 0.0]]), "A": torch.tensor([1.0, 0.0])},
                      num_examples=1, loss=0.1)
    u1 = ClientUpdate(1, {"B": torch.tensor([[3.0], [3.0], [4.0], [4.0]]),
                          "o": torch.tensor([[6.0, 6.0, 8.0, 8.0]]), "A": torch.tensor([5.0, 4.0])},
                      num_examples=3, loss=0.1)
    w = torch.tensor([[0.2, 0.0], [0.6, 0.5]])
    out = blockwise_mean(g, [u1, u0], 1.0, BLOCKS, w[[1, 0]], eps=1e-8)
    # head 0: (0.2*1 + 0.6*3)/0.8 = 2.5 ; o: (0.2*2 + 0.6*6)/0.8 = 5
    # head 1: only client 1 -> 0.5*4/0.5 = 4 ; o: 8
    assert torch.allclose(out["B"].flatten(), torch.tensor([2.5, 2.5, 4.0, 4.0]), atol=1e-6)
    assert torch.allclose(out["o"].flatten(), torch.tensor([5.0, 5.0, 8.0, 8.0]), atol=1e-6)
    # A is not head-mapped: data-size mean (1*1 + 3*5)/4 = 4, (0 + 12)/4 = 3
    assert torch.allclose(out["A"], torch.tensor([4.0, 3.0]))


def test_head_no_client_kept_does_not_move_and_server_lr_eps():
    g = {"B": torch.arange(4.0).reshape(4, 1), "o": torch.ones(1, 4)}
    u = ClientUpdate(5, {"B": torch.full((4, 1), 2.0), "o": torch.full((1, 4), 2.0)}, 2, 0.3)
    out = blockwise_mean(g, [u], 0.5, BLOCKS, torch.tensor([[1.0, 0.0]]), eps=1.0)
    # head 0: 0.5 * 1*2 / (1 + eps=1) = 0.5 ; head 1 untouched
    assert torch.allclose(out["B"].flatten(), torch.tensor([0.5, 1.5, 2.0, 3.0]))
    assert torch.allclose(out["o"].flatten(), torch.tensor([1.5, 1.5, 1.0, 1.0]))
    assert torch.equal(g["B"].flatten(), torch.arange(4.0))  # input untouched


def test_masked_data_size_mean_is_blockwise_with_size_weights():
    # B2: weights |D_c| * kept, eps 0 -> mean over the clients that kept the head
    g = {"B": torch.zeros(4, 1), "o": torch.zeros(1, 4)}
    u0 = ClientUpdate(0, {"B": torch.ones(4, 1), "o": torch.ones(1, 4)}, 1, 0.0)
    u1 = ClientUpdate(1, {"B": torch.full((4, 1), 4.0), "o": torch.full((1, 4), 4.0)}, 3, 0.0)
    out = blockwise_mean(g, [u0, u1], 1.0, BLOCKS, torch.tensor([[1.0, 0.0], [3.0, 3.0]]), 0.0)
    assert torch.allclose(out["B"].flatten(), torch.tensor([3.25, 3.25, 4.0, 4.0]))


def test_block_mask():
    m = block_mask(BLOCKS, torch.tensor([False, True]), {"B": (4, 1), "o": (1, 4)})
    assert m["B"].flatten().tolist() == [False, False, True, True]
    assert m["o"].flatten().tolist() == [False, False, True, True]
