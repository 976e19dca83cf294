"""Client-level DP (core/privacy.py, issue 15 item 7): DP-FedAvg's clipped, fixed-denominator
mean by hand; its noise scale statistically; the sensitivity bound; the accountant against
the exact Gaussian-mechanism privacy curve; Poisson selection's law; head-score noise; the
options DP refuses; a real run with ε in its metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv
from safetensors.torch import load_file

from fedprune.config import ConfigError, load_config
from fedprune.core.privacy import dp_mean, epsilon
from fedprune.core.selection import SELECTORS, History
from fedprune.core.update import ClientUpdate
from fedprune.methods import METHODS
from fedprune.methods.heads import HeadPruning
from fedprune.sim import runner

X = {"a": torch.zeros(2, 2, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}


def test_dp_mean_by_hand_without_noise():
    # client 0: ||Δ|| = sqrt(9 + 16) = 5 -> clipped to C = 2.5 (scale 1/2); weight |D_c| -> 1
    # client 1: head weights [[0.5], [0]] on "a" (row 1 not owned), norm 1 < C: unscaled
    u0 = ClientUpdate(0, {"a": torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)},
                      40, 0.1)
    u1 = ClientUpdate(1, {"a": torch.tensor([[0.6, 0.8], [0.0, 0.0]], dtype=torch.float64),
                          "b": torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)}, 7, 0.2,
                      weights={"a": torch.tensor([[0.5], [0.0]], dtype=torch.float64)})
    out = dp_mean(X, [u1, u0], clip_norm=2.5, noise_multiplier=0.0, expected_clients=4,
                  rng=np.random.default_rng(0), server_lr=2.0)
    # a = 2 * (1 * [[1.5, 0], [0, 2]] + [[0.5], [0]] * [[0.6, 0.8], [0, 0]]) / 4
    assert out["a"].flatten().tolist() == pytest.approx([0.9, 0.2, 0.0, 1.0])
    assert out["b"].tolist() == [0.0, 0.0, 0.0]
    assert u0.delta["a"][1, 1] == 4.0  # inputs untouched


def test_one_client_moves_the_noiseless_sum_by_at_most_c():
    rng = np.random.default_rng(1)
    others = [ClientUpdate(c, {"a": torch.from_numpy(rng.normal(size=(2, 2)))}, 5, 0.1)
              for c in range(3)]
    huge = ClientUpdate(9, {"a": torch.full((2, 2), 1e6, dtype=torch.float64)}, 10**6, 0.1)
    kw = {"clip_norm": 0.7, "noise_multiplier": 0.0, "expected_clients": 3,
          "rng": np.random.default_rng(0)}
    gap = dp_mean(X, [*others, huge], **kw)["a"] - dp_mean(X, others, **kw)["a"]
    assert float(gap.norm()) == pytest.approx(0.7 / 3)


def test_noise_scale_is_z_c_over_m_on_every_coordinate():
    """Noise on a key nobody sent: mean 0 and std z C lr / m over 200,000 draws (the sample
    std's standard error is std / sqrt(2 n) = 0.16 %; the bound is 1 %); a new round's
    generator draws other noise."""
    big = {"w": torch.zeros(200_000, dtype=torch.float64), **X}
    u = ClientUpdate(0, {"a": torch.ones(2, 2, dtype=torch.float64)}, 3, 0.1)
    kw = {"clip_norm": 0.5, "noise_multiplier": 1.3, "expected_clients": 4, "server_lr": 2.0}
    w = dp_mean(big, [u], rng=np.random.default_rng([0, 1, 2]), **kw)["w"]
    std = compute_stdv(1.3, 0.5, 4) * 2.0  # Flower's DP-FedAvg noise std z C / m, times eta
    assert abs(float(w.mean())) < 5 * std / math.sqrt(w.numel())
    assert float(w.std()) == pytest.approx(std, rel=0.01)
    again = dp_mean(big, [u], rng=np.random.default_rng([0, 1, 2]), **kw)["w"]
    other = dp_mean(big, [u], rng=np.random.default_rng([0, 2, 2]), **kw)["w"]
    assert torch.equal(w, again)
    assert abs(float(np.corrcoef(w.numpy(), other.numpy())[0, 1])) < 0.02


def test_clipped_mean_equals_flowers_server_side_fixed_clipping():
    """Flower's DifferentialPrivacyServerSideFixedClipping (its functions on the same inputs):
    each client's model clipped around the global one, then FedAvg; with equal |D_c| and
    m = the clients that answered, that is our fixed-denominator mean."""
    rng = np.random.default_rng(4)
    updates = [ClientUpdate(c, {k: torch.from_numpy(rng.normal(size=v.shape) * (c + 1))
                                for k, v in X.items()}, 20, 0.1) for c in range(3)]
    ours = dp_mean(X, updates, clip_norm=1.5, noise_multiplier=0.0, expected_clients=3,
                   rng=np.random.default_rng(0))
    flower = []
    for u in updates:
        params = [(X[k] + u.delta[k]).numpy() for k in X]
        compute_clip_model_update(params, [X[k].numpy() for k in X], 1.5)
        flower.append(params)
    for i, k in enumerate(X):
        np.testing.assert_allclose(ours[k].numpy(), np.mean([p[i] for p in flower], axis=0),
                                   rtol=0, atol=1e-12)


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism of sensitivity / std = mu at delta (Balle &
    Wang 2018: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)), by bisection.
    T releases with noise multiplier z compose to mu = sqrt(T) / z."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def d(e: float) -> float:
        return phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z, rounds", [(1.0, 1), (2.0, 10), (4.0, 100)])
def test_accountant_bounds_the_exact_curve_without_subsampling(z, rounds):
    """q = 1: RDP's epsilon is an upper bound of the exact one and within 40 % of it."""
    exact = exact_gaussian_epsilon(math.sqrt(rounds) / z, 1e-5)
    assert exact <= epsilon(z, 1.0, rounds, 1e-5) <= 1.4 * exact


def test_accountant_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0 and epsilon(0.0, 0.1, 3, 1e-5) == math.inf
    e = epsilon(1.0, 0.1, 20, 1e-5)
    assert e < epsilon(1.0, 0.1, 40, 1e-5) and e > epsilon(2.0, 0.1, 20, 1e-5)
    assert e < epsilon(1.0, 1.0, 20, 1e-5)


def test_poisson_selection_law():
    """Each of 50 clients in a round with probability 10 / 50, independently of the others:
    over 2,000 rounds, the counts' mean and variance are those of Binomial(50, 0.2) and every
    client's frequency is 0.2 (4.5 standard errors)."""
    pick = SELECTORS["poisson"]
    history = History(np.ones(50))
    rounds = [pick(r, history, 10, 3) for r in range(1, 2001)]
    counts = np.array([len(s) for s in rounds])
    assert abs(counts.mean() - 10) < 4.5 * math.sqrt(8 / 2000)
    assert counts.var() == pytest.approx(8, rel=0.15)
    freq = np.bincount(np.concatenate(rounds), minlength=50) / 2000
    assert np.abs(freq - 0.2).max() < 4.5 * math.sqrt(0.16 / 2000)
    assert all(s == sorted(set(s)) for s in rounds) and pick(7, history, 10, 3) == rounds[6]


class _Scores:  # what `HeadPruning.noised` reads of a method: its config
    def __init__(self, std: float):
        self.cfg = load_config(None, [f"dp.alpha_std={std}"])


def test_head_score_noise():
    scores = {"l0": torch.full((4000,), 0.5), "l1": torch.tensor([0.0, 1.0])}
    assert HeadPruning.noised(_Scores(0.0), scores, 11) is scores
    noised = HeadPruning.noised(_Scores(0.05), scores, 11)
    diff = (noised["l0"] - 0.5).double()
    assert float(diff.std()) == pytest.approx(0.05, rel=0.05) and abs(float(diff.mean())) < 0.004
    assert noised["l0"].dtype == torch.float32
    assert 0.0 <= float(noised["l1"].min()) and float(noised["l1"].max()) <= 1.0
    assert torch.equal(HeadPruning.noised(_Scores(0.05), scores, 11)["l0"], noised["l0"])
    assert not torch.equal(HeadPruning.noised(_Scores(0.05), scores, 12)["l0"], noised["l0"])


@pytest.mark.parametrize("extra, pattern", [
    (["method.name='aoh'", "federation.selection='loss'"],
     "federation.selection = 'loss' reads the clients' private"),
    (["federation.scaffold=true"], "SCAFFOLD's control variates"),
    (["federation.robust='median'"], "federation.robust = 'median'"),
    (["federation.clip_norm=1"], "set federation.clip_norm = 0"),
    (["method.name='fedspallm'"], "pruned weights"),
])
def test_dp_refuses_what_it_cannot_cover(extra, pattern):
    cfg = load_config(None, ["dp.noise_multiplier=1.0", "dp.clip_norm=1.0", *extra])
    with pytest.raises(ConfigError, match=r"`dp.noise_multiplier` = 1.0 with `method.name`"):
        METHODS[cfg.method.name].check(cfg)
    with pytest.raises(ConfigError, match=pattern):
        METHODS[cfg.method.name].check(cfg)


@pytest.mark.parametrize("bad, option", [
    ("dp.noise_multiplier=-1", "dp.noise_multiplier"), ("dp.clip_norm=-1", "dp.clip_norm"),
    ("dp.noise_multiplier=1", "dp.clip_norm`: set it"),
    ("dp.clip_norm=1", "dp.clip_norm`: does nothing without dp.noise_multiplier"),
    ("dp.delta=1", "dp.delta"), ("dp.alpha_std=-0.1", "dp.alpha_std"),
    ("federation.min_valid_updates=-1", "federation.min_valid_updates"),
])
def test_bad_dp_options_name_the_option(bad, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        load_config(None, [bad])


def test_dp_run_reports_epsilon_and_resumes_bit_identically(tmp_path):
    """AoH with random selection under DP-FedAvg and head-score noise on MiniLM, 2 rounds:
    epsilon after each round is the accountant's for q = K / C; a run stopped after round 1
    and resumed ends with the same global state (the noise is seeded by run seed and round)."""
    base = ["data.max_samples=96", "data.max_length=32", "federation.num_clients=4",
            "federation.clients_per_round=2", "federation.rounds=2", "method.name='aoh'",
            "method.aoh.sparsity=0.5", "method.aoh.importance_samples=8",
            "federation.selection='random'", "dp.noise_multiplier=0.8", "dp.clip_norm=0.5",
            "dp.alpha_std=0.05", "run.eval_every=2", f"data.cache_dir='{tmp_path / 'c'}'"]
    fed = METHODS["aoh"].world(load_config(None, base))
    out = runner.run(load_config(None, base), tmp_path / "full", progress=False, fed=fed)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["dp_epsilon"] for r in records] == [epsilon(0.8, 0.5, r, 1e-5) for r in (1, 2)]
    assert records[-1]["accuracy"] is not None
    half = runner.run(load_config(None, [*base, "federation.rounds=1"]), tmp_path / "half",
                      progress=False, fed=fed)
    resumed = runner.run(load_config(None, base), half, resume=True, progress=False, fed=fed)
    a, b = load_file(out / "global.safetensors"), load_file(resumed / "global.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
