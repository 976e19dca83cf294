"""The one aggregation rule (`core.aggregate.owned_mean`) against hand-computed values, for
every kind of weight: scalar |D_c| (Eq. 5), per-row / per-column head weights (Eq. 8, B2),
element masks (l0) and renamed keys (layers)."""

import pytest
import torch

from fedprune.core.aggregate import owned_mean
from fedprune.core.update import ClientUpdate


def upd(cid, n, weights=None, keymap=None, **delta):
    return ClientUpdate(cid, {k: torch.tensor(v) for k, v in delta.items()}, n, 0.5,
                        weights=weights or {}, keymap=keymap or {})


def test_eq5_scalar_data_size_weights():
    g = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    u = [upd(0, 1, a=[1.0, 0.0], b=[3.0]), upd(1, 3, a=[-1.0, 4.0], b=[1.0])]
    out = owned_mean(g, u)
    # a: 1 + (1*1 + 3*-1)/4 = 0.5 ; 2 + (0 + 12)/4 = 5 ; b: (3 + 3)/4 = 1.5
    assert out["a"].tolist() == [0.5, 5.0] and out["b"].tolist() == [1.5]


def test_server_lr_and_a_key_nobody_holds():
    g = {"a": torch.tensor([1.0]), "b": torch.tensor([7.0])}
    out = owned_mean(g, [upd(0, 2, a=[2.0]), upd(1, 2, a=[4.0])], server_lr=0.5)
    assert out["a"].item() == 1.0 + 0.5 * 3.0
    assert out["b"].item() == 7.0  # no client sent b: it does not move
    zero = owned_mean(g, [upd(0, 2, a=[2.0])], empty="zero")
    assert zero["b"].item() == 7.0  # "zero" is for pruned coordinates, not for absent keys


def test_does_not_mutate_and_is_order_independent():
    g = {"a": torch.randn(4, 3)}
    u = [ClientUpdate(i, {"a": torch.randn(4, 3)}, i + 1, 1.0,
                      weights={"a": torch.rand(4, 1)}) for i in range(5)]
    before, d0 = g["a"].clone(), u[0].delta["a"].clone()
    a, b = owned_mean(g, u, eps=1e-8), owned_mean(g, list(reversed(u)), eps=1e-8)
    assert torch.equal(a["a"], b["a"]) and a["a"] is not g["a"]
    assert torch.equal(g["a"], before) and torch.equal(u[0].delta["a"], d0)


def test_eq8_head_rows_and_columns_with_importance_and_eq5_elsewhere():
    # "B" [4, 1]: head 0 = rows 0:2, head 1 = rows 2:4 ; "o" [1, 4]: columns likewise;
    # client 0 kept head 0 only (alpha 0.2), client 1 kept both (alpha 0.6, 0.5)
    g = {"B": torch.zeros(4, 1), "o": torch.zeros(1, 4), "A": torch.zeros(2)}
    rows = lambda a, b: torch.tensor([[a], [a], [b], [b]])
    cols = lambda a, b: torch.tensor([[a, a, b, b]])
    u0 = ClientUpdate(0, {"B": rows(1.0, 0.0), "o": cols(2.0, 0.0), "A": torch.tensor([1.0, 0.0])},
                      1, 0.1, weights={"B": rows(0.2, 0.0), "o": cols(0.2, 0.0)})
    u1 = ClientUpdate(1, {"B": rows(3.0, 4.0), "o": cols(6.0, 8.0), "A": torch.tensor([5.0, 4.0])},
                      3, 0.1, weights={"B": rows(0.6, 0.5), "o": cols(0.6, 0.5)})
    out = owned_mean(g, [u1, u0], eps={"B": 1e-8, "o": 1e-8})
    # head 0: (0.2*1 + 0.6*3)/0.8 = 2.5 ; o: (0.2*2 + 0.6*6)/0.8 = 5
    # head 1: only client 1 -> 0.5*4/0.5 = 4 ; o: 8
    assert torch.allclose(out["B"].flatten(), torch.tensor([2.5, 2.5, 4.0, 4.0]), atol=1e-6)
    assert torch.allclose(out["o"].flatten(), torch.tensor([5.0, 5.0, 8.0, 8.0]), atol=1e-6)
    # A is not head-mapped: data-size mean (1*1 + 3*5)/4 = 4, (0 + 12)/4 = 3
    assert out["A"].tolist() == [4.0, 3.0]


def test_head_no_client_kept_does_not_move_with_server_lr_and_eps():
    g = {"B": torch.arange(4.0).reshape(4, 1)}
    u = ClientUpdate(5, {"B": torch.full((4, 1), 2.0)}, 2, 0.3,
                     weights={"B": torch.tensor([[1.0], [1.0], [0.0], [0.0]])})
    out = owned_mean(g, [u], server_lr=0.5, eps=1.0)
    # head 0: g + 0.5 * (1*2 / (1 + eps=1)) = g + 0.5 ; head 1 (nobody kept it): untouched
    assert out["B"].flatten().tolist() == [0.5, 1.5, 2.0, 3.0]


def test_b2_masked_data_size_mean():
    # weights |D_c| * kept, eps 0 -> mean over the clients that kept the head
    g = {"B": torch.zeros(4, 1)}
    keep0 = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    u0 = ClientUpdate(0, {"B": torch.ones(4, 1)}, 1, 0.0, weights={"B": 1 * keep0})
    u1 = ClientUpdate(1, {"B": torch.full((4, 1), 4.0)}, 3, 0.0, weights={"B": torch.full((4, 1), 3.0)})
    out = owned_mean(g, [u0, u1])
    # rows 0-1: (1*1 + 3*4)/4 = 3.25 ; rows 2-3: only client 1: 4
    assert out["B"].flatten().tolist() == [3.25, 3.25, 4.0, 4.0]


def test_l0_element_masks_with_empty_zero():
    # FedSpaLLM: W[j] = sum_i M_i[j] W_i[j] / sum_i M_i[j]; 0 where every owner pruned j.
    # As deltas from g: W_i - g, weights M_i = (W_i != 0)
    g = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    w0 = torch.tensor([[2.0, 0.0, 4.0, 0.0]])
    w1 = torch.tensor([[4.0, 3.0, 0.0, 0.0]])
    u = [ClientUpdate(c, {"W": w - g}, 10, 0.0, weights={"W": (w != 0).float()})
         for c, w in ((0, w0), (1, w1))]
    out = owned_mean({"W": g}, u, empty="zero")
    assert out["W"].tolist() == [[3.0, 3.0, 4.0, 0.0]]
    keep = owned_mean({"W": g}, u, empty="keep")
    assert keep["W"].tolist() == [[3.0, 3.0, 4.0, 1.0]]


def test_layers_renamed_from_local_to_global_keys():
    # HeteAgg: client 0 holds global layers 0, 2 (as its local 0, 1); client 1 holds 0, 1, 2
    g = {f"l.{i}": torch.zeros(1) for i in range(4)}
    u0 = upd(0, 1, keymap={"l.0": "l.0", "l.1": "l.2"}, **{"l.0": [4.0], "l.1": [8.0]})
    u1 = upd(1, 3, **{"l.0": [0.0], "l.1": [2.0], "l.2": [4.0]})
    out = owned_mean(g, [u0, u1])
    # l.0: (1*4 + 3*0)/4 = 1 ; l.1: client 1 only: 2 ; l.2: (1*8 + 3*4)/4 = 5 ; l.3: nobody
    assert [out[f"l.{i}"].item() for i in range(4)] == [1.0, 2.0, 5.0, 0.0]


def test_float64_accumulation():
    g = {"a": torch.tensor([0.0])}
    u = [upd(c, 1, a=[v]) for c, v in enumerate((1e8, 1.0, -1e8))]
    # float32 running sums would lose the 1.0: (1e8 + 1) - 1e8 = 0 in float32
    assert owned_mean(g, u)["a"].item() == pytest.approx(1.0 / 3)
