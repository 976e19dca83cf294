"""FlexLoRA-style aggregation (core/lora.py) on hand-computed tensors: the SVD refactorisation,
the weighted mean of the products over the owners (through owned_mean, renamed keys), modules
nobody holds, the server learning rate, and the zero product LoRA starts from."""

import math

import pytest
import torch

from fedprune.core.lora import lora_pairs, product_mean, refactor
from fedprune.core.update import ClientUpdate

A0, B0 = "m.layers.0.q.lora_A.default.weight", "m.layers.0.q.lora_B.default.weight"
A1, B1 = "m.layers.1.q.lora_A.default.weight", "m.layers.1.q.lora_B.default.weight"


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_lora_pairs_needs_both_halves():
    keys = [A0, B0, A1, "head.weight"]
    assert lora_pairs(keys) == {A0: B0}


def test_refactor_balanced_split_reproduces_a_low_rank_product():
    m = t([[3, 0, 0], [0, 0, 2]])  # singular values 3, 2; U = I, V = e1, e3 (up to signs)
    b, a = refactor(m, 2)
    torch.testing.assert_close(b @ a, m)
    r3, r2 = math.sqrt(3), math.sqrt(2)
    torch.testing.assert_close(b.abs(), t([[r3, 0], [0, r2]]))
    torch.testing.assert_close(a.abs(), t([[r3, 0, 0], [0, 0, r2]]))
    # rank 1: the best rank-1 approximation keeps the largest singular triple
    b, a = refactor(m, 1)
    assert b.shape == (2, 1) and a.shape == (1, 3)
    torch.testing.assert_close(b @ a, t([[3, 0, 0], [0, 0, 0]]))
    # a larger rank than the matrix allows: the extra components are zero
    b, a = refactor(m, 4)
    assert b.shape == (2, 4) and a.shape == (4, 3)
    torch.testing.assert_close(b @ a, m)
    assert torch.equal(b[:, 2:], torch.zeros(2, 2)) and torch.equal(a[2:], torch.zeros(2, 3))


def test_refactor_keeps_a_rows_alive_for_zero_singular_values():
    # LoRA starts with B = 0: the product is 0. Balanced split: A = 0 too (dead component)
    b, a = refactor(torch.zeros(2, 3), 2)
    assert torch.equal(a, torch.zeros(2, 3)) and torch.equal(b, torch.zeros(2, 2))
    # with a_norm, every A row keeps that length, orthogonal to the others, B stays 0
    b, a = refactor(torch.zeros(2, 3), 2, a_norm=0.5)
    assert torch.equal(b, torch.zeros(2, 2))
    torch.testing.assert_close(a @ a.T, 0.25 * torch.eye(2))
    # rank 1 < r = 2: S = [4, 0]; component 0 balanced (sqrt 4 = 2 > 0.5), component 1 alive
    m = t([[4, 0, 0], [0, 0, 0]])
    b, a = refactor(m, 2, a_norm=0.5)
    torch.testing.assert_close(b @ a, m)
    torch.testing.assert_close(b[:, 0].abs(), t([2, 0]))
    torch.testing.assert_close(a[0].abs(), t([2, 0, 0]))
    assert torch.equal(b[:, 1], torch.zeros(2))
    assert a[1].norm().item() == pytest.approx(0.5)
    # a small singular value (sqrt 0.01 = 0.1 < a_norm): A row of length 0.5, B carries 0.02
    m = t([[0.01, 0, 0], [0, 0, 0]])
    b, a = refactor(m, 1, a_norm=0.5)
    torch.testing.assert_close(b @ a, m)
    torch.testing.assert_close(b.abs(), t([[0.02], [0]]))
    torch.testing.assert_close(a.abs(), t([[0.5, 0, 0]]))


def _state():
    return {A0: t([[1, 0, 0]]), B0: t([[0], [0]]),          # r = 1, B = 0 as LoRA starts
            A1: t([[0, 1, 0]]), B1: t([[5], [6]]), "head.weight": t([1.0, 1.0])}


def _delta(state, key, target):
    return target - state[key]


def test_product_mean_hand_computed_with_renamed_keys_and_unheld_module():
    state = _state()
    # client 0 (|D| = 1) trained B0 A0 = [[2], [0]] [[2, 0, 0]] = [[4, 0, 0], [0, 0, 0]]
    # client 3 (|D| = 3) trained B0 A0 = [[0], [2]] [[0, 0, 1]] = [[0, 0, 0], [0, 0, 2]],
    # sent under local names "x.A" / "x.B" renamed by its keymap
    u0 = ClientUpdate(0, {A0: _delta(state, A0, t([[2, 0, 0]])),
                          B0: _delta(state, B0, t([[2], [0]])),
                          "head.weight": t([2.0, 0.0])}, 1, 0.1)
    u3 = ClientUpdate(3, {"x.A": _delta(state, A0, t([[0, 0, 1]])),
                          "x.B": _delta(state, B0, t([[0], [2]])),
                          "h": t([-2.0, 4.0])}, 3, 0.1,
                      keymap={"x.A": A0, "x.B": B0, "h": "head.weight"})
    new = product_mean(state, [u3, u0])
    # mean product (1 * [[4,0,0],[0,0,0]] + 3 * [[0,0,0],[0,0,2]]) / 4 = [[1,0,0],[0,0,1.5]];
    # rank 2 > r = 1: the best rank-1 approximation keeps the 1.5 component
    torch.testing.assert_close(new[B0] @ new[A0], t([[0, 0, 0], [0, 0, 1.5]]))
    s = math.sqrt(1.5)
    torch.testing.assert_close(new[B0].abs(), t([[0], [s]]))
    torch.testing.assert_close(new[A0].abs(), t([[0, 0, s]]))
    # separate means of A and B (HeteAgg) would give a different product
    b_mean, a_mean = (t([[2], [0]]) + 3 * t([[0], [2]])) / 4, (t([[2, 0, 0]]) + 3 * t([[0, 0, 1]])) / 4
    assert not torch.allclose(b_mean @ a_mean, new[B0] @ new[A0])
    # other keys: owned_mean as ever; module 1 held by nobody keeps its A and B
    torch.testing.assert_close(new["head.weight"], t([1.0, 1.0]) + (t([2.0, 0.0]) + 3 * t([
        -2.0, 4.0])) / 4)
    assert torch.equal(new[A1], state[A1]) and torch.equal(new[B1], state[B1])
    assert set(new) == set(state)
    assert torch.equal(state[B0], t([[0], [0]]))  # inputs untouched


def test_product_mean_reproduces_the_mean_product_when_its_rank_fits():
    gen = torch.Generator().manual_seed(0)
    out, inp, r = 5, 4, 3
    state = {A0: torch.randn(r, inp, generator=gen), B0: torch.zeros(out, r)}
    trained = [(torch.randn(out, r, generator=gen), torch.randn(r, inp, generator=gen))
               for _ in range(2)]
    # rank-1 client updates; two clients -> mean product of rank <= 2 <= r
    trained = [(b[:, :1].repeat(1, r) / r, a[:1].repeat(r, 1)) for b, a in trained]
    sizes = [2, 6]
    ups = [ClientUpdate(c, {A0: a - state[A0], B0: b - state[B0]}, n, None)
           for c, ((b, a), n) in enumerate(zip(trained, sizes, strict=True))]
    want = sum(n * (b @ a) for (b, a), n in zip(trained, sizes, strict=True)) / sum(sizes)
    new = product_mean(state, ups)
    torch.testing.assert_close(new[B0] @ new[A0], want, rtol=1e-5, atol=1e-6)
    # server learning rate 0.5: halfway from the old product (0: B = 0) to the mean
    new = product_mean(state, ups, server_lr=0.5, a_norm={A0: 1.0})
    torch.testing.assert_close(new[B0] @ new[A0], 0.5 * want, rtol=1e-5, atol=1e-6)
    assert (new[A0].norm(dim=1) >= 1.0 - 1e-5).all()  # a_norm: no A row shorter than 1


def test_product_mean_rejects_half_a_module():
    state = _state()
    with pytest.raises(ValueError, match="only one of the LoRA pair"):
        product_mean(state, [ClientUpdate(0, {A0: torch.zeros(1, 3)}, 1, None)])
