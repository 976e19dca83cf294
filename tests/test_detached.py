"""AoH's `detached` mode (`headview.detached_heads`): every head computes in the forward — the
full model's output — but no gradient passes through a pruned head, so the backward's q/k/v/o
input-gradient matmuls shrink to the kept heads. Checked on tiny models of every family
against the full model (forward), against hooks that detach the same features on the full
model (gradients), against FlopCounterMode (`core.accounting`'s ``grad_heads``), and in an
AoH client round on the real MiniLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import transformers as tf
from test_heads import FAMILIES, IDS, random_keep, run, with_lora
from test_peft import assert_only_kept_heads_travel
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from fedprune.config import ConfigError, MethodConfig, PeftConfig, load_config
from fedprune.core.accounting import train_ops
from fedprune.methods import METHODS, build_method
from fedprune.structure import ModelStructure, describe
from fedprune.structure.headmap import head_units, unit_mask
from fedprune.structure.headview import detached_heads
from fedprune.structure.model import model_arch, trainable_parameters


def features(heads: torch.Tensor, offset: int, head_dim: int, size: int) -> torch.Tensor:
    """bool [size]: the features offset + h * d ... of the heads set in ``heads``."""
    mask = torch.zeros(size, dtype=torch.bool)
    for h in heads.nonzero().flatten().tolist():
        mask[offset + h * head_dim: offset + (h + 1) * head_dim] = True
    return mask


def out_features(module: torch.nn.Module) -> int:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.nf if isinstance(base, Conv1D) else base.out_features


@contextmanager
def detached_by_hooks(model: torch.nn.Module, s: ModelStructure,
                      keep: dict[str, torch.Tensor]) -> Iterator[None]:
    """The reference: on the full model, every pruned head's q/k/v output features and o input
    features replaced by their detached values (forward unchanged, no gradient through them)."""
    rows: dict[str, torch.Tensor] = {}
    hooks = []
    for a in s.attention:
        heads = keep[a.path]
        groups = heads.reshape(a.n_kv_heads, a.group_size).any(dim=1)
        for name, mask in (("q", heads), ("k", groups), ("v", groups)):
            proj = getattr(a, name)
            size = out_features(model.get_submodule(proj.module))
            part = features(mask, proj.offset, a.head_dim, size)
            rows[proj.module] = rows.get(proj.module, torch.zeros(size, dtype=torch.bool)) | part
        cols = features(heads, 0, a.head_dim, a.n_heads * a.head_dim)
        hooks.append(model.get_submodule(a.o.module).register_forward_pre_hook(
            lambda _m, args, c=cols: (torch.where(c, args[0], args[0].detach()), *args[1:])))
    for path, mask in rows.items():
        hooks.append(model.get_submodule(path).register_forward_hook(
            lambda _m, _a, out, m=mask: torch.where(m, out, out.detach())))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def grad_of(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


def loss(model: torch.nn.Module) -> torch.Tensor:
    logits = run(model)
    return logits.float().pow(2).mean()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_is_the_full_models_and_gradients_those_of_detached_heads(family):
    """Inside `detached_heads`: the same logits as the full model; the gradient of every
    trainable equals that of the full model whose pruned heads' q/k/v outputs and context
    are detached by hooks (under GQA a KV head is kept with any head of its group); the
    pruned heads' q/k/v LoRA B rows get exactly zero."""
    model = FAMILIES[family]()
    s = describe(model)
    keep = random_keep(s, 0)
    params = trainable_parameters(model)
    with torch.no_grad():
        full = run(model)
    with detached_by_hooks(model, s, keep):
        loss(model).backward()
    reference = {k: grad_of(p).clone() for k, p in params.items()}
    model.zero_grad(set_to_none=True)
    with detached_heads(model, s, keep):
        with torch.no_grad():
            inside = run(model)
        loss(model).backward()
    grads = {k: grad_of(p) for k, p in params.items()}
    torch.testing.assert_close(inside, full, atol=1e-5, rtol=1e-5)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, reference[key], atol=1e-6, rtol=1e-5)
    masks = unit_mask(head_units(params, s), keep, params)
    for key, mask in masks.items():  # q/k/v's B rows (o's A columns read the context)
        if "lora_B" in key:
            assert not grads[key][~mask].any(), key
            assert not mask.any() or grads[key][mask].abs().sum() > 0, key
    with torch.no_grad():  # restored: the hooks are gone
        torch.testing.assert_close(run(model), full, atol=0, rtol=0)


def eager(model: torch.nn.Module) -> torch.nn.Module:
    (model.get_base_model() if hasattr(model, "get_base_model") else model) \
        .set_attn_implementation("eager")
    return model.train()


def counted_model(family: str) -> torch.nn.Module:
    """A tiny LoRA model of ``family`` in eager attention (FlopCounterMode sees its products);
    GPT-2 with Conv1D's fan-in-fan-out LoRA; BERT's classifier trains."""
    raw = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                           n_positions=32)) if family == "gpt2" else None
    model = eager(with_lora(raw, fan_in_fan_out=True) if raw is not None else
                  FAMILIES[family]())
    if family == "bert":  # the classifier trains, as peft's modules_to_save makes it
        model.get_base_model().classifier.requires_grad_(True)
    return model


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "bart", "t5"])
def test_analytic_ops_equal_flop_counter(family):
    """One training step with detached heads: `train_ops` with ``grad_heads`` = the kept
    (query, KV) heads counts exactly FlopCounterMode's matmul FLOPs (forward every head;
    backward the kept heads' projection input gradients, LoRA whole; GQA groups, GPT-2's
    fused q/k/v, cross-attention): fewer than adapter mode's, more than structural mode's."""
    model = counted_model(family)
    s = describe(model)
    keep = random_keep(s, 1)
    arch = model_arch(model, PeftConfig(method="lora", r=4))
    counter = FlopCounterMode(display=False)
    with detached_heads(model, s, keep), counter:
        out = model(input_ids=IDS, decoder_input_ids=IDS[:, :5]) if family in ("t5", "bart") \
            else model(input_ids=IDS)
        out.logits.float().pow(2).mean().backward()
    every = [a.n_heads for a in s.attention]
    grads = [(int(keep[a.path].sum()), int(keep[a.path].view(a.n_kv_heads, -1).any(1).sum()))
             for a in s.attention]
    shape = (2, 7, 5) if family in ("t5", "bart") else (2, 7)
    detached = train_ops(arch, every, [shape], grad_heads=grads)
    assert detached == counter.get_total_flops()
    structural = train_ops(arch, [h for h, _ in grads], [shape])
    assert structural < detached < train_ops(arch, every, [shape])


def test_aoh_detached_round_on_minilm(minilm_world):
    """AoH at 75 %, mode 'detached', on the real MiniLM: 18 of 72 heads kept; only their slices
    move and travel; analytic OPs below adapter mode's, measured FLOPs equal to them within
    0.1 %."""
    cfg, fed = minilm_world
    results = {}
    for mode in ("adapter", "detached"):
        section = METHODS["aoh"].Config(sparsity=0.75, importance_samples=16, mode=mode)
        run_cfg = dataclasses.replace(
            cfg, method=MethodConfig("aoh", {"aoh": section}),
            run=dataclasses.replace(cfg.run, count_flops=True))
        METHODS["aoh"].check(run_cfg)
        m = build_method(run_cfg, fed)
        results[mode] = res = m.local({k: v.clone() for k, v in fed.initial.items()}, 0, seed=3)
        keep = assert_only_kept_heads_travel(m, res, run_cfg, fed, client_id=0)
        assert sum(int(k.sum()) for k in keep.values()) == 18
    detached, adapter = results["detached"].metrics, results["adapter"].metrics
    assert detached["train_ops"] < adapter["train_ops"]
    assert detached["train_ops"] == pytest.approx(detached["train_flops_measured"], rel=1e-3)


def test_detached_needs_lora_and_importance_before_and_allows_scaffold():
    def check(*overrides):
        cfg = load_config(None, ["method.name='aoh'", "method.aoh.mode='detached'",
                                 *overrides])
        METHODS["aoh"].check(cfg)

    check()
    check("federation.scaffold=true")  # fixed-shape trainables, unlike mode 'structural'
    with pytest.raises(ConfigError, match=r"`method.aoh.mode` = 'detached' with "
                                          r"`peft.method` = 'ia3'"):
        check("peft.method='ia3'")
    with pytest.raises(ConfigError, match=r"'after' needs method.aoh.mode='adapter': detached"):
        check("method.aoh.importance='after'")
    with pytest.raises(ConfigError, match=r"`method.aoh.head_params` = 'B' with mode "
                                          r"'detached'.*within q, k, v"):
        check("method.aoh.head_params='B'")
    check("method.aoh.head_params='B'", "peft.target_modules=['q', 'v']")  # o trains nothing
