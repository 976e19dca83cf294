"""Head-pruning methods on the real MiniLM: Eq. 7, masked training, the kept-slice payload,
OPs accounting against FlopCounterMode."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedprune.client.world import build
from fedprune.config import MethodConfig, load_config
from fedprune.core.accounting import train_ops
from fedprune.core.update import InvalidUpdate
from fedprune.methods import METHODS, build_method
from fedprune.methods.heads import ALPHA, eq7_keep
from fedprune.structure.headview import structural_view


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config(None, ["data.max_samples=120", "data.max_length=32",
                             "federation.num_clients=3", f"data.cache_dir='{cache}'",
                             "model.attn_implementation=eager"])
    return cfg, build(cfg)


def method(fed, name="fedavg", **options):
    cfg, f = fed
    section = METHODS[name].Config(**options)
    return build_method(dataclasses.replace(cfg, method=MethodConfig(name, {name: section})), f)


def alpha(result):
    """attention path -> the head weights a LocalResult sends."""
    return {p.removesuffix(ALPHA): w for p, w in result.extra.items()}


def test_eq7_hand_computed():
    scores = {"a": torch.tensor([0.1, 0.5, 0.9, 0.3]), "b": torch.tensor([0.2, 0.8, 0.4, 0.6])}
    # global, s = 0.75 over 8 values: quantile at position 5.25 of the sorted
    # [.1 .2 .3 .4 .5 .6 .8 .9] = 0.6 + 0.25 * 0.2 = 0.65 -> keep 0.9 and 0.8
    g = eq7_keep(scores, 0.75, "global")
    assert g["a"].tolist() == [False, False, True, False]
    assert g["b"].tolist() == [False, True, False, False]
    # layer, s = 0.5: a -> median 0.4 keeps 0.5, 0.9; b -> 0.5 keeps 0.8, 0.6
    lay = eq7_keep(scores, 0.5, "layer")
    assert lay["a"].tolist() == [False, True, True, False]
    assert lay["b"].tolist() == [False, True, False, True]
    assert all(k.all() for k in eq7_keep(scores, 0.0, "global").values())


@pytest.mark.parametrize("name,mode", [("aoh", "adapter"), ("aoh", "structural"),
                                       ("random_heads", "adapter")])
def test_only_kept_slices_move_and_travel(fed, name, mode):
    m = method(fed, name=name, mode=mode, sparsity=0.75)
    f = fed[1]
    start = {k: v.clone() for k, v in f.initial.items()}
    res = m.local(start, 0, seed=3)
    keep = {p: w > 0 for p, w in alpha(res).items()}
    n_kept = sum(int(k.sum()) for k in keep.values())
    assert n_kept == 18  # 72 heads, s = 0.75: sorted positions >= 53.25 -> 18 heads
    for unit in m.units:
        kept = bool(keep[unit.path][list(unit.query_heads)].any())
        for s in unit.slices:
            moved = s_of(res.delta[s.key], s).abs().sum() > 0
            b_or_a = "lora_B" in s.key or "lora_A" in s.key
            assert b_or_a and (moved if kept else not moved), (unit, s)
    blob = m.encode(res)
    dense = method(fed, name="fedavg").encode(res)  # FedAvg payload of the same delta
    assert len(blob) < len(dense)
    update = m.decode(blob, client_id=7)
    assert update.client_id == 7 and update.num_examples == len(f.client_indices[0])
    for k, v in res.delta.items():
        assert torch.equal(update.delta[k], v), k
    for unit in m.units:  # each head slice weighs its unit's weight (0 when pruned)
        a = float(alpha(res)[unit.path][list(unit.query_heads)].max())
        want = 0.0 if a == 0 else (a if name == "aoh" else float(update.num_examples))
        for s in unit.slices:
            assert (s_of(update.weights[s.key].expand_as(update.delta[s.key]), s) == want).all()
    assert set(update.weights) == set(m.key_dim)  # every other tensor weighs |D_c|
    if name == "aoh":  # alpha of kept heads is a mean of max attention probabilities
        w = torch.cat(list(alpha(res).values()))
        assert ((w == 0) | ((w > 0) & (w <= 1))).all()


def s_of(t, s):
    return t.narrow(s.dim, s.start, s.stop - s.start)


def test_malformed_payloads_name_the_client(fed):
    m = method(fed, name="aoh")
    f = fed[1]
    res = m.local({k: v.clone() for k, v in f.initial.items()}, 1, seed=1)
    path = next(iter(res.extra))
    bad = dict(res.extra)
    bad[path] = -bad[path] - 1
    with pytest.raises(InvalidUpdate, match=r"client 4: .*finite and in \[0, 1\]"):
        m.decode(m.encode(type(res)(res.delta, 1.0, 5, bad)), 4)
    with pytest.raises(InvalidUpdate, match="client 4: malformed payload"):
        m.decode(b"garbage", 4)
    wire = m.wire_tensors(res)
    key = next(k for k in wire if "lora_B" in k and "query" in k)
    wire[key] = torch.zeros(wire[key].shape[0] + 32, wire[key].shape[1])
    from safetensors.torch import save
    blob = save(wire, metadata={"num_examples": "5", "loss": "1.0"})
    with pytest.raises(InvalidUpdate, match=f"client 4: '{key}' has shape"):
        m.decode(blob, 4)


@pytest.mark.parametrize("keep_frac", [1.0, 0.5, 0.1])
def test_analytic_ops_match_flop_counter(fed, keep_frac):
    m = method(fed, name="aoh")
    f = fed[1]
    batch = f.collate([f.train_rows[i] for i in range(8)])
    heads = []
    keep = {}
    gen = torch.Generator().manual_seed(0)
    for a in m.structure.attention:
        k = torch.zeros(a.n_heads, dtype=torch.bool)
        k[torch.randperm(a.n_heads, generator=gen)[:max(1, round(keep_frac * a.n_heads))]] = True
        keep[a.path] = k
        heads.append(int(k.sum()))
    counter = FlopCounterMode(display=False)
    with structural_view(f.model, m.structure, keep), counter:
        f.model(**batch).loss.backward()
    f.model.zero_grad(set_to_none=True)
    analytic = train_ops(m.arch, heads, [tuple(batch["input_ids"].shape)])
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.10)


def test_heads_trained_counts_the_union_of_kept_heads(fed):
    """After one AoH round of two clients at 90 %, `heads_trained` is the share of head units
    (MiniLM, LoRA on q/k/v/o: a query and a KV unit per head) of the heads either client
    kept — by hand from their head weights; 0 before any round; FedAvg logs none."""
    f = fed[1]
    m = method(fed, "aoh", sparsity=0.9, importance_samples=16)
    assert m.server_metrics(f.initial) == {"heads_trained": 0.0}
    results = {c: m.local({k: v.clone() for k, v in f.initial.items()}, c, seed=c)
               for c in (0, 1)}
    updates = [m.decode(m.encode(r), client_id=c) for c, r in results.items()]
    state = m.aggregate(f.initial, updates, 1.0)
    union = {(p, h) for r in results.values() for p, w in alpha(r).items()
             for h in (w > 0).nonzero().flatten().tolist()}
    assert len(union) > max(int((w > 0).sum()) for r in results.values()
                            for w in [torch.cat(list(alpha(r).values()))])  # they differ
    assert m.server_metrics(state) == {"heads_trained": 2 * len(union) / (2 * 72)}
    assert method(fed).server_metrics(state) == {}
