"""Robust aggregation (core/robust.py): median, trimmed mean, Krum, Multi-Krum and Bulyan against
Flower's own `flwr.server.strategy.aggregate` on the same inputs; the same rules over partial
ownership (head rows, renamed layers) by hand; norm clipping; a real run; bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import (
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from fedprune.config import ConfigError, load_config
from fedprune.core.aggregate import owned_mean
from fedprune.core.robust import (
    Combine,
    bulyan_select,
    clip,
    krum_scores,
    krum_select,
    owner_statistic,
    update_norm,
)
from fedprune.core.update import ClientUpdate
from fedprune.sim import runner

GEN = torch.Generator().manual_seed(0)
X = {"a": torch.randn(3, 4, generator=GEN, dtype=torch.float64),
     "b": torch.randn(5, generator=GEN, dtype=torch.float64)}
# six clients, dense updates; client 4 is an outlier (scaled by 50)
UPDATES = [ClientUpdate(c, {k: torch.randn(v.shape, generator=GEN, dtype=torch.float64)
                            * (50.0 if c == 4 else 1.0) for k, v in X.items()}, 10 + c, 0.1)
           for c in range(6)]


def flower_results(updates):
    """Flower's input: (parameters x + Δ as numpy arrays in key order, num_examples)."""
    return [([(X[k] + u.delta[k]).numpy() for k in X], u.num_examples) for u in updates]


def assert_state_equals(state, arrays):
    for k, arr in zip(X, arrays, strict=True):
        np.testing.assert_allclose(state[k].numpy(), arr, rtol=0, atol=1e-12)


def test_median_equals_flowers():
    ours = owned_mean(X, UPDATES, combine=Combine("median"))
    assert_state_equals(ours, aggregate_median(flower_results(UPDATES)))
    odd = UPDATES[:5]
    assert_state_equals(owned_mean(X, odd, combine=Combine("median")),
                        aggregate_median(flower_results(odd)))


@pytest.mark.parametrize("trim", [0.0, 0.2, 0.34])
def test_trimmed_mean_equals_flowers(trim):
    ours = owned_mean(X, UPDATES, combine=Combine("trimmed_mean", trim=trim))
    assert_state_equals(ours, aggregate_trimmed_avg(flower_results(UPDATES), trim))


@pytest.mark.parametrize("f, keep", [(1, 1), (1, 3), (2, 2)])
def test_krum_and_multikrum_equal_flowers(f, keep):
    chosen = krum_select(UPDATES, f, keep)
    assert 4 not in [u.client_id for u in chosen]  # the outlier is never chosen
    ours = owned_mean(X, chosen)  # the |D_c|-weighted mean of the chosen, as Flower's
    theirs = aggregate_krum(flower_results(UPDATES), f, 0 if keep == 1 else keep)
    assert_state_equals(ours, theirs)


def test_multikrum_then_median_is_flowers_median_of_the_kept():
    """robust_then='median': Multi-Krum's choice (f = 1, keep 4 of 6: the outlier 4 and one
    more out), then the coordinate-wise median of those — Flower's median of the same four."""
    chosen = krum_select(UPDATES, 1, 4)
    assert len(chosen) == 4 and 4 not in [u.client_id for u in chosen]
    assert_state_equals(owned_mean(X, chosen, combine=Combine("median")),
                        aggregate_median(flower_results(chosen)))
    cfg = load_config(None, ["federation.clients_per_round=5", "federation.num_clients=5",
                             "federation.robust='multikrum'", "federation.robust_f=1",
                             "federation.robust_then='median'"])
    assert cfg.federation.robust_then == "median"


def many_updates(n, outliers):
    """n dense updates (float64, shapes of X); the ``outliers`` far off in both directions."""
    gen = torch.Generator().manual_seed(n)
    return [ClientUpdate(c, {k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
                             * (30.0 * (-1) ** c if c in outliers else 1.0)
                             for k, v in X.items()}, 10 + c, 0.1) for c in range(n)]


@pytest.mark.parametrize("n, f", [(7, 1), (10, 1), (11, 2), (15, 3)])
def test_bulyan_equals_flowers(n, f):
    ups = many_updates(n, outliers=set(range(1, 2 * f + 1, 2)) | {n - 1})
    chosen = bulyan_select(ups, f)
    assert len(chosen) == n - 2 * f
    ours = owned_mean(X, chosen, combine=Combine("bulyan", f=f))
    theirs = aggregate_bulyan(flower_results(ups), f, aggregate_krum, to_keep=0)
    assert_state_equals(ours, theirs)


def test_bulyan_by_hand():
    """Five scalar updates 0, 1, 2, 3, 100, f = 1 (the bound 4f + 3 is the config's, not
    the function's). Squared distances to the n - f - 2 = 2 nearest: scores 5, 2, 2, 5,
    97² + 98², pick 1 (tie with 2: smaller id); over {0, 2, 3, 4} the 1 nearest: 4, 1, 1,
    97², pick 2; over {0, 3, 4}: 9, 9, 97², pick 0. θ = n - 2f = 3 chosen {0, 1, 2}; their
    median 1 and the β = θ - 2f = 1 value nearest it: 1."""
    x = {"w": torch.zeros(1, dtype=torch.float64)}
    ups = [ClientUpdate(c, {"w": torch.tensor([v], dtype=torch.float64)}, 1, 0.1)
           for c, v in enumerate([0.0, 1.0, 2.0, 3.0, 100.0])]
    chosen = bulyan_select(ups, 1)
    assert [u.client_id for u in chosen] == [0, 1, 2]
    assert owned_mean(x, chosen, combine=Combine("bulyan", f=1))["w"].item() == 1.0
    # f = 0: every update picked, the mean of all k nearest the median = the plain mean
    assert owned_mean(x, ups, combine=Combine("bulyan", f=0))["w"].item() == 106.0 / 5


def test_rules_over_partial_ownership_by_hand():
    """Row weights as AoH's: client 0 owns rows 0, 1; client 1 rows 1, 2; client 2 rows 1, 2
    (its layer renamed onto 'w'); row 3 is owned by nobody."""
    x = {"w": torch.zeros(4, 1, dtype=torch.float64)}
    rows = [[1, 1, 0, 0], [0, 1, 1, 0], [0, 2, 3, 0]]
    values = [[1.0, 2.0, 9.0, 9.0], [9.0, 4.0, 5.0, 9.0], [9.0, 10.0, 7.0, 9.0]]
    ups = [ClientUpdate(c, {"l": torch.tensor(v, dtype=torch.float64).view(4, 1)}, 1, 0.1,
                        weights={"l": torch.tensor(r, dtype=torch.float64).view(4, 1)},
                        keymap={"l": "w"}) for c, (r, v) in enumerate(zip(rows, values, strict=True))]
    median = owned_mean(x, ups, combine=Combine("median"))["w"].flatten().tolist()
    assert median == [1.0, 4.0, 6.0, 0.0]  # owners {0}, {0,1,2}, {1,2}, none (kept)
    trimmed = owned_mean(x, ups, combine=Combine("trimmed_mean", trim=0.34))
    assert trimmed["w"].flatten().tolist() == [1.0, 4.0, 6.0, 0.0]  # cut 1 of 3, 0 of 2
    # Bulyan's combine, f = 1: beta = k - 2 = 1 of 3 owners (the median itself: 4); of 2
    # owners also 1 (at least one): the nearer to their median 6 — a tie 5 / 7, the smaller
    bulyan = owned_mean(x, ups, combine=Combine("bulyan", f=1))["w"].flatten().tolist()
    assert bulyan == [1.0, 4.0, 5.0, 0.0]
    # the weights decide ownership only: importance 2 vs 3 does not tilt the median
    # Krum over the coordinates both clients own: d(0,1) = (2-4)^2 = 4, d(0,2) = 64,
    # d(1,2) = 36 + 4 = 40; n - f - 2 = 1 nearest: scores 4, 4, 40
    assert krum_scores(ups, f=0) == [4.0, 4.0, 40.0]
    assert [u.client_id for u in krum_select(ups, 0, 1)] == [0]  # tie: smaller id


def test_owner_statistic_of_no_owner_is_zero():
    d = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    own = torch.tensor([[True, False], [True, False]])
    assert owner_statistic(d, own, Combine("median")).tolist() == [2.0, 0.0]


def test_clip_by_hand():
    u = ClientUpdate(0, {"w": torch.tensor([3.0, 4.0, 12.0])}, 1, 0.1,
                     weights={"w": torch.tensor([1.0, 1.0, 0.0])})  # last entry not owned
    assert update_norm(u) == pytest.approx(5.0)
    clipped = clip(u, 1.0)
    assert clipped.delta["w"].tolist() == pytest.approx([0.6, 0.8, 2.4])
    assert u.delta["w"].tolist() == [3.0, 4.0, 12.0]  # input untouched
    assert clip(u, 10.0) is u


SMALL = ["data.max_samples=160", "data.max_length=48", "federation.num_clients=4",
         "federation.clients_per_round=3", "federation.batch_size=16",
         "federation.eval_batch_size=64", "method.name='aoh'", "method.aoh.sparsity=0.5",
         "method.aoh.importance_samples=8", "federation.rounds=1"]


def test_multikrum_median_and_bulyan_runs(tmp_path):
    def run(name, *extra):
        cfg = load_config(None, [*SMALL, f"data.cache_dir='{tmp_path / 'cache'}'", *extra])
        out = runner.run(cfg, tmp_path / name, progress=False)
        return json.loads((out / "metrics.jsonl").read_text())

    rec = run("mk", "federation.robust='multikrum'", "federation.robust_keep=2")
    assert len(rec["aggregated"]) == 2 and set(rec["aggregated"]) < set(rec["selected"])
    assert run("med", "federation.robust='median'", "federation.clip_norm=0.5")["accuracy"] > 0
    rec = run("bulyan", "federation.robust='bulyan'", "federation.robust_f=1",
              "federation.num_clients=7", "federation.clients_per_round=7")
    assert len(rec["aggregated"]) == 5 and rec["accuracy"] > 0  # theta = n - 2f


@pytest.mark.parametrize("bad, pattern", [
    ("federation.robust_trim=0.5", "federation.robust_trim"),
    ("federation.robust='krum'", r"krum needs federation.clients_per_round >= 2 f \+ 3 = 3"),
    ("federation.clip_norm=-1", "federation.clip_norm"),
    ("federation.robust='mode'", "federation.robust"),
    ("federation.robust_then='median'", r"robust_then.*needs federation.robust = 'multikrum'"),
    ("federation.robust_then='mode'", "federation.robust_then"),
    ("federation.robust='bulyan'", r"bulyan needs f >= 1 and .* >= 4 f \+ 3 = 3"),
    ("federation.robust='bulyan' federation.robust_f=1", r">= 4 f \+ 3 = 7 .* got f = 1 and 2"),
])
def test_bad_options_name_the_option(bad, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, bad.split())


def test_cap_shares_by_hand():
    from fedprune.core.robust import cap_shares

    w = torch.tensor([[8.0, 5.0, 0.0], [1.0, 4.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # column 0, cap 0.5: 8 is cut to t = 0.5 (t + 2) = 2; column 1, cap 0.5: 5 to t = 5
    # (already 0.5 of 10); column 2: one owner cannot be capped, it keeps its weight
    assert cap_shares(w, 0.5).tolist() == [[2.0, 5.0, 0.0], [1.0, 4.0, 1.0], [1.0, 1.0, 0.0],
                                           [0.0, 0.0, 0.0]]
    # cap 0.4: column 1 cuts 5 and 4 to t = 0.4 (2 t + 1), t = 2
    assert cap_shares(w, 0.4)[:, 1].tolist() == [2.0, 2.0, 1.0, 0.0]
    # cap 0.3 < 1/3 with 3 owners: infeasible, the owners weigh the same
    assert cap_shares(w, 0.3)[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_aoh_share_cap_and_alpha_normalisation_bound_a_poisoner(tmp_path):
    """A poisoner claims confidence 1 on every head, two honest clients 0.1-0.2 on theirs:
    uncapped it holds ~3/4 of each head's weight; with share_cap 0.5 exactly half, and with
    normalize_alpha its uniform claim counts like anyone's uniform claim."""
    from fedprune.methods import METHODS
    from fedprune.methods.base import LocalResult
    from fedprune.methods.heads import ALPHA

    def make(*extra):
        cfg = load_config(None, ["data.max_samples=64", "method.name='aoh'",
                                 "method.aoh.sparsity=0.0", *extra,
                                 f"data.cache_dir='{tmp_path / 'cache'}'"])
        return METHODS["aoh"](cfg, fed)

    fed = METHODS["aoh"].world(load_config(None, ["data.max_samples=64",
                                                  f"data.cache_dir='{tmp_path / 'cache'}'"]))
    gen = torch.Generator().manual_seed(0)

    def updates(m):
        out = []
        for cid, level in ((0, None), (1, 0.1), (2, 0.2)):
            alpha = {p + ALPHA: torch.ones(n) if level is None else
                     level + 0.05 * torch.rand(n, generator=gen) for p, n in m.n_heads.items()}
            res = LocalResult({k: torch.zeros_like(v) for k, v in fed.initial.items()}, 0.1, 4,
                              alpha)
            out.append(m.from_wire(ClientUpdate(cid, m.wire_tensors(res), 4, 0.1)))
        return out

    def poisoner_share(m, ups):
        key = next(iter(m.key_dim))
        w = torch.stack([torch.as_tensor(u.weight(key)).expand(m.key_shape[key]) for u in ups])
        return (w[0] / w.sum(0)).flatten()

    plain = make()
    assert float(poisoner_share(plain, updates(plain)).min()) > 0.7  # 1 / (1 + ~0.12 + ~0.22)
    capped = make("method.aoh.share_cap=0.5")
    share = poisoner_share(capped, capped.capped(updates(capped)))
    assert torch.allclose(share, torch.full_like(share, 0.5), atol=1e-9)
    normal = make("method.aoh.normalize_alpha=true")
    assert float(poisoner_share(normal, updates(normal)).max()) < 0.45
