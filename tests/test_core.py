"""Aggregation, selection and update validation against hand-computed values."""

import math

import pytest
import torch

from fedprune.core.aggregate import AGGREGATORS, fedavg
from fedprune.core.selection import SELECTORS, random_selection
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


@pytest.mark.parametrize("c,k", [(10, 2), (100, 10), (10_000, 20), (5, 5)])
def test_random_selection(c, k):
    s = random_selection(3, c, k, seed=7)
    assert len(s) == k == len(set(s)) and s == sorted(s) and all(0 <= i < c for i in s)
    assert s == random_selection(3, c, k, seed=7)


def test_random_selection_varies_with_round_and_seed_and_is_roughly_uniform():
    counts = [0] * 10
    for r in range(1, 2001):
        for cid in random_selection(r, 10, 2, seed=0):
            counts[cid] += 1
    assert all(abs(c - 400) < 80 for c in counts)  # expected 2000*2/10 = 400
    assert random_selection(1, 1000, 5, 0) != random_selection(2, 1000, 5, 0)
    assert random_selection(1, 1000, 5, 0) != random_selection(1, 1000, 5, 1)


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
