"""AoH's `top_layers` K: heads are kept only in the top K layers and nothing below them trains
or travels, so autograd stops at the lowest trained layer while the forward stays the full
model's. Checked against FlopCounterMode (`core.accounting`'s ``frozen_layers``), against
adapter mode with the same coordinates frozen by gradient masks (the trained values), and in
AoH client rounds on the real MiniLM (what is kept, sent and decoded)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_detached import counted_model
from test_heads import FAMILIES, IDS
from test_peft import assert_only_kept_heads_travel
from torch.utils.flop_counter import FlopCounterMode

from fedprune.client.train import local_train, snapshot
from fedprune.config import ConfigError, MethodConfig, PeftConfig, load_config
from fedprune.core.accounting import train_ops
from fedprune.methods import METHODS, build_method
from fedprune.methods.heads import eq7_keep, frozen_outside
from fedprune.structure import describe
from fedprune.structure.headmap import unit_mask
from fedprune.structure.model import model_arch, trainable_parameters


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_analytic_ops_equal_flop_counter(family):
    """One step with the first layer's LoRA frozen (`frozen_outside`): `train_ops` with
    ``frozen_layers`` = 1 counts exactly FlopCounterMode's matmul FLOPs (the frozen layer's
    forward with its LoRA, no backward below the second layer), fewer than with every layer
    training; the frozen layer gets no gradient at all."""
    model = counted_model(family)
    s = describe(model)
    (layers,) = s.layers.values()
    assert len(layers) == 2
    params = trainable_parameters(model)
    below = {k for k in params if k.startswith(layers[0] + ".")}
    assert below and len(below) < len(params)
    trained = {k: p for k, p in params.items() if k not in below}
    counter = FlopCounterMode(display=False)
    with frozen_outside(params, trained), counter:
        model(input_ids=IDS).logits.float().pow(2).mean().backward()
    assert all(params[k].requires_grad for k in params)  # restored
    assert all(params[k].grad is None for k in below)
    assert all(trained[k].grad is not None for k in trained)
    arch = model_arch(model, PeftConfig(method="lora", r=4))
    every = [a.n_heads for a in s.attention]
    top = train_ops(arch, every, [(2, 7)], frozen_layers=1)
    assert top == counter.get_total_flops()
    assert top < train_ops(arch, every, [(2, 7)])
    with pytest.raises(ValueError, match="single-stack"):
        train_ops(model_arch(FAMILIES["t5"](), PeftConfig(method="lora", r=4)),
                  [a.n_heads for a in describe(FAMILIES["t5"]()).attention], [(2, 7, 5)],
                  frozen_layers=1)


def aoh(cfg, fed, **options):
    section = METHODS["aoh"].Config(importance_samples=16, **options)
    run_cfg = dataclasses.replace(cfg, method=MethodConfig("aoh", {"aoh": section}),
                                  run=dataclasses.replace(cfg.run, count_flops=True))
    METHODS["aoh"].check(run_cfg)
    return run_cfg, build_method(run_cfg, fed)


def test_kept_heads_lie_in_the_top_layers_as_many_as_without(minilm_world):
    """MiniLM (6 layers x 12 heads), K = 2: global scope keeps the same number of heads as
    Eq. 7 over all 72 (here 18 at 75 %), the 18 best-scoring of the top 24; layer scope keeps
    each top layer's quantile and nothing below; with more kept than the band holds, all of
    the band."""
    cfg, fed = minilm_world
    scores = {a.path: torch.rand(a.n_heads, generator=torch.Generator().manual_seed(i))
              for i, a in enumerate(describe(fed.model).attention)}
    _, m = aoh(cfg, fed, sparsity=0.75, top_layers=2)
    band = {a.path for a in m.structure.attention if a.layer >= 4}
    assert m.band == band and m.frozen_layers == 4
    keep = m.kept(scores)
    assert sum(int(k.sum()) for k in keep.values()) == 18
    assert not any(keep[p].any() for p in scores if p not in band)
    top = torch.cat([scores[p] for p in sorted(band)])
    assert sorted(torch.cat([scores[p][keep[p]] for p in sorted(band)]).tolist()) == \
        sorted(top.topk(18).values.tolist())
    _, m = aoh(cfg, fed, sparsity=0.75, top_layers=2, scope="layer")
    keep, per_layer = m.kept(scores), eq7_keep(scores, 0.75, "layer")
    for p in scores:
        assert torch.equal(keep[p], per_layer[p] if p in band else torch.zeros(12, dtype=bool))
    _, m = aoh(cfg, fed, sparsity=0.5, top_layers=1)  # 36 kept over all > 12 in the band
    assert sum(int(k.sum()) for k in m.kept(scores).values()) == 12


@pytest.mark.parametrize("importance", ["before", "after"])
def test_top_layers_round_on_minilm(minilm_world, importance):
    """AoH at 90 %, K = 2, on the real MiniLM: 8 of 72 heads kept, all in layers 4-5; the
    kept slices equal adapter mode's with everything below layer 4 frozen by gradient masks
    (the same forward, exact gradients of what trains); below layer 4 nothing moves and only
    the head-mapped tensors travel (with no rows); analytic OPs = measured FLOPs, fewer than
    adapter mode's."""
    cfg, fed = minilm_world
    start = {k: v.clone() for k, v in fed.initial.items()}
    run_cfg, m = aoh(cfg, fed, sparsity=0.9, top_layers=2, importance=importance)
    res = m.local(start, 0, seed=3)
    keep = assert_only_kept_heads_travel(m, res, run_cfg, fed, client_id=0)
    assert sum(int(k.sum()) for k in keep.values()) == 8
    assert all(a.layer >= 4 for a in m.structure.attention if keep[a.path].any())
    below = {k for k in fed.initial if ".layer.0." in k or ".layer.1." in k
             or ".layer.2." in k or ".layer.3." in k}
    assert m.untrained == below
    assert set(res.delta) == set(fed.initial) - (below - set(m.key_dim))
    assert all(not res.delta[k].any() for k in below & set(res.delta))
    assert set(m.decode(m.encode(res), client_id=0).delta) == set(res.delta)
    # the reference: every parameter trains, all of `below` masked (and, scoring before,
    # the pruned slices)
    masks = unit_mask(m.units, keep, start)
    frozen = {k: torch.ones_like(v, dtype=bool) for k, v in start.items() if k in below}
    if importance == "before":
        frozen |= {k: ~v for k, v in masks.items() if k not in below}
    for k, v in start.items():
        fed.params[k].data.copy_(v)
    local_train(fed.model, fed.params, fed.train_rows, fed.client_indices[0], fed.collate,
                m.spec, 3, frozen=frozen)
    reference = snapshot(fed.params)
    for k, d in res.delta.items():
        want = (reference[k] - start[k]) * masks.get(k, 1)
        torch.testing.assert_close(d, want, atol=0, rtol=0, msg=k)
    ops = res.metrics
    assert ops["train_ops"] == pytest.approx(ops["train_flops_measured"], rel=1e-3)
    _, adapter = aoh(cfg, fed, sparsity=0.9, importance=importance)
    assert ops["train_ops"] < 0.8 * adapter.local(start, 0, seed=3).metrics["train_ops"]


def test_top_layers_is_refused_where_it_cannot_work(minilm_world):
    def check(*overrides):
        METHODS["aoh"].check(load_config(None, ["method.name='aoh'", *overrides]))

    check("method.aoh.top_layers=2")
    with pytest.raises(ConfigError, match=r"`method.aoh.top_layers`.*must be >= 0"):
        check("method.aoh.top_layers=-1")
    with pytest.raises(ConfigError, match=r"`method.aoh.top_layers`.*needs mode 'adapter'"):
        check("method.aoh.top_layers=2", "method.aoh.mode='structural'")
    with pytest.raises(ConfigError, match=r"`method.aoh.top_layers` with `peft.method` = "
                                          r"'ia3'"):
        check("method.aoh.top_layers=2", "peft.method='ia3'")
    with pytest.raises(ConfigError, match=r"`method.aoh.top_layers` = 2 sends nothing.*"
                                          r"SCAFFOLD"):
        check("method.aoh.top_layers=2", "federation.scaffold=true")
    cfg, fed = minilm_world
    with pytest.raises(ConfigError, match=r"`method.aoh.top_layers` = 7: the model has 6 "
                                          r"layers"):
        aoh(cfg, fed, top_layers=7)
