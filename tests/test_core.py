"""Selection and update validation against hand-computed values."""

import dataclasses
import math

import numpy as np
import pytest
import torch

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


def test_selection_registry_serves_every_configured_policy():
    from fedprune.config import FederationConfig

    choices = next(f.metadata["choices"] for f in dataclasses.fields(FederationConfig)
                   if f.name == "selection")
    assert set(choices) == set(SELECTORS)
    for name in choices:  # poisson: K on average (its law: test_privacy.py)
        picked = SELECTORS[name](1, hist(20), 4, 0)
        assert len(set(picked)) == len(picked) and picked == sorted(picked)
        assert len(picked) == 4 or name == "poisson"


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
    # K=1 of d=2 candidates: the higher-loss one, so client 3 (lowest loss) never wins, and
    # over many rounds each of 4, 5, 6 does
    picks = {power_of_choice(r, h, 1, seed=0, d=2)[0] for r in range(1, 201)}
    assert picks == {4, 5, 6}


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




@pytest.mark.parametrize("update,reason", [
    (ClientUpdate(3, {"w": torch.zeros(2, 2)}, 5, 1.0, weights={"w": -1.0}), ">= 0"),
    (ClientUpdate(3, {"w": torch.zeros(2, 2)}, 5, 1.0,
                  weights={"w": torch.tensor([[math.nan], [1.0]])}), "finite"),
    (ClientUpdate(3, {"w": torch.zeros(2, 2)}, 5, 1.0, weights={"w": torch.ones(3, 1)}),
     "do not broadcast"),
    (ClientUpdate(3, {"w": torch.zeros(2, 2)}, 5, 1.0, weights={"w": torch.ones(2, 2, 2)}),
     "do not broadcast"),
    (ClientUpdate(3, {"w": torch.zeros(2, 2)}, 5, 1.0, weights={"v": 1.0}), "does not hold"),
    (ClientUpdate(3, {"l.0": torch.zeros(2, 2)}, 5, 1.0, keymap={"l.0": "l.7"}),
     "unknown tensor 'l.7'"),
])
def test_validate_update_rejects_bad_weights_and_keys(update, reason):
    with pytest.raises(InvalidUpdate, match=f"client 3: .*{reason}"):
        validate_update(update, REF)


def test_validate_update_checks_num_examples_against_the_server():
    u = ClientUpdate(2, {"w": torch.ones(2, 2)}, 7, 0.1)
    validate_update(u, REF, num_examples=7)
    with pytest.raises(InvalidUpdate, match="client 2: num_examples=7 but the server knows 6"):
        validate_update(u, REF, num_examples=6)
    renamed = ClientUpdate(2, {"l.0": torch.ones(2, 2)}, 7, 0.1, keymap={"l.0": "w"},
                           weights={"l.0": torch.ones(2, 1)})
    validate_update(renamed, REF, num_examples=7)
