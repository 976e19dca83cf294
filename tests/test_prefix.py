"""Prefix tuning (P-tuning v2) of sequence classifiers, whose prefixes fedprune's attention
adds (`structure.prefix`; peft 0.21 cannot feed their forward): the encoders' attention
against a computation by hand, the head map (GQA and GPT-2's fused projection included), the
importance pass over the prefix keys, OPs against FlopCounterMode, an AoH client round on the
real MiniLM, and the config error."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf
from test_heads import RAW
from test_peft import (
    assert_only_kept_heads_travel,
    assert_ops_match_flop_counter,
    assert_units_change_only_their_heads,
)
from torch.utils.flop_counter import FlopCounterMode

from fedprune.client.world import build
from fedprune.config import ConfigError, MethodConfig, PeftConfig, load_config
from fedprune.core.accounting import train_ops
from fedprune.methods import METHODS, build_method
from fedprune.structure import describe
from fedprune.structure.compute import ATTENTION
from fedprune.structure.headmap import HeadSlice, head_units
from fedprune.structure.importance import head_importance
from fedprune.structure.model import apply_peft, model_arch, trainable_parameters

ENCODERS = ("bert", "roberta", "distilbert")
DECODERS = {  # tiny decoder classifiers: Llama with GQA (6 query / 2 KV heads), GPT-2
    "llama": lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, num_labels=3, pad_token_id=0)),
    "gpt2": lambda: tf.GPT2ForSequenceClassification(tf.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32, num_labels=3,
        pad_token_id=0))}
CLASSIFIERS = (*ENCODERS, *DECODERS)
T_P = 3
IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 2], [1, 11, 12, 13, 2, 0, 0]])
MASK = (IDS != 0).long()


def classifier(family: str) -> torch.nn.Module:
    """A tiny random classifier of ``family`` with a random T_P-token prefix."""
    torch.manual_seed(0)
    raw = DECODERS[family]() if family in DECODERS else RAW[family]()
    raw.set_attn_implementation(ATTENTION)
    model = apply_peft(raw, method="prefix", task="classification", seed=0,
                       num_virtual_tokens=T_P)
    with torch.no_grad():
        prompt_weight(model).normal_(0, 1.0)
    return model.eval()


def prompt_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(p for n, p in trainable_parameters(model).items() if "prompt_encoder" in n)


@pytest.mark.parametrize("family", ENCODERS)
def test_attention_with_prefix_by_hand(family):
    """Layer 1's context (o's input) equals softmax(q [P_k; k]^T / sqrt(d) + mask) [P_v; v]
    computed by hand, P_k / P_v read from peft's [T_p, L * 2 * KV * d] embedding as
    [T_p, L, 2, KV, d]; padded keys masked, the prefix attended by every query."""
    model = classifier(family)
    s = describe(model)
    attn = s.attention[1]
    seen = {}
    hooks = [model.get_submodule(attn.q.module).register_forward_pre_hook(
                 lambda _m, a: seen.setdefault("x", a[0])),
             model.get_submodule(attn.o.module).register_forward_pre_hook(
                 lambda _m, a: seen.setdefault("ctx", a[0]))]
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
        for h in hooks:
            h.remove()
        b, t, heads, d = *IDS.shape, attn.n_heads, attn.head_dim

        def split(name: str) -> torch.Tensor:
            proj = model.get_submodule(getattr(attn, name).module)
            return proj(seen["x"]).view(b, t, heads, d).transpose(1, 2)

        q, k, v = split("q"), split("k"), split("v")
        table = prompt_weight(model).view(T_P, len(s.attention), 2, heads, d)[:, 1]
        pk, pv = (table[:, j].permute(1, 0, 2).expand(b, -1, -1, -1) for j in (0, 1))
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        keys_valid = torch.cat([torch.ones(b, T_P), MASK.float()], 1).bool()
        scores = (q @ k.transpose(2, 3)) / d ** 0.5
        scores = scores.masked_fill(~keys_valid[:, None, None, :], float("-inf"))
        expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, heads * d)
    torch.testing.assert_close(seen["ctx"], expected, atol=1e-5, rtol=1e-5)


def test_prefix_changes_the_logits_and_gets_gradients():
    """The prefix is live: another prefix gives other logits, and the loss's gradient reaches
    every layer's key and value columns."""
    model = classifier("bert")
    with torch.no_grad():
        before = model(input_ids=IDS, attention_mask=MASK).logits
        prompt_weight(model).mul_(0.5)
        assert not torch.allclose(before, model(input_ids=IDS, attention_mask=MASK).logits)
    model.train()
    model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1])).loss.backward()
    grad = prompt_weight(model).grad.view(T_P, 2 * 2, -1)
    assert (grad.abs().sum(dim=(0, 2)) > 0).all()


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_prefix_kv_heads_change_only_their_heads(family):
    """KV unit g of layer l (its key and value prefix columns) changes only the context of
    g's query heads in layer l (under GQA its group of 3); the slices by hand for BERT (12
    heads of 4, 2 layers: width 2 x 2 x 48)."""
    model = classifier(family)
    s = describe(model)
    units = head_units(trainable_parameters(model), s, prefix=True)
    assert len(units) == sum(a.n_kv_heads for a in s.attention)
    if family == "bert":
        key = next(n for n in trainable_parameters(model) if "prompt_encoder" in n)
        u = next(u for u in units if u.path == s.attention[1].path and u.index == 5)
        assert u.slices == (HeadSlice(key, 1, 96 + 20, 96 + 24), HeadSlice(key, 1, 144 + 20,
                                                                            144 + 24))
    assert_units_change_only_their_heads(
        model, s, units, lambda m: m(input_ids=IDS, attention_mask=MASK))


def test_importance_pass_sees_the_prefix_keys():
    """The importance pass runs fedprune's eager maths (transformers' eager attention would
    drop the prefix): its probabilities span T_p + t keys, and the prefix moves the scores."""
    model = classifier("bert")
    s = describe(model)
    shapes = []
    handle = model.get_submodule(s.attention[0].path).register_forward_hook(
        lambda _m, _a, out: shapes.append(tuple(out[1].shape)))
    batches = [{"input_ids": IDS, "attention_mask": MASK}]
    first = head_importance(model, s, batches, special_ids={0, 1, 2}, exclude_key_ids={2})
    handle.remove()
    assert shapes == [(2, 12, 7, T_P + 7)]
    with torch.no_grad():
        prompt_weight(model).mul_(3.0)
    second = head_importance(model, s, batches, special_ids={0, 1, 2}, exclude_key_ids={2})
    assert all(not torch.allclose(first[p], second[p]) for p in first)


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_analytic_ops_equal_flop_counter(family):
    """One training step: `core.accounting` counts exactly FlopCounterMode's matmul FLOPs,
    with T_p more keys and values in every attention and the prefix's own gradient."""
    model = classifier(family).train()
    arch = model_arch(model, PeftConfig(method="prefix", num_virtual_tokens=T_P))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1])).loss.backward()
    heads = [a.n_heads for a in describe(model).attention]
    assert train_ops(arch, heads, [tuple(IDS.shape)]) == counter.get_total_flops()


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    cfg = load_config(None, ["model.name='minilm'", "data.max_samples=120",
                             "data.max_length=32", "federation.num_clients=3",
                             f"data.cache_dir='{tmp_path_factory.mktemp('cache')}'",
                             "peft.num_virtual_tokens=8", "peft.method='prefix'"])
    return cfg, build(cfg)


def test_aoh_round_on_minilm(minilm):
    """AoH at 75 % on the real MiniLM with prefix tuning: 18 of 72 heads kept; the kept
    heads' prefix columns move and travel, the pruned ones do not; the analytic OPs match
    FlopCounterMode within 0.1 %."""
    cfg, fed = minilm
    section = METHODS["aoh"].Config(sparsity=0.75, importance_samples=16)
    cfg = dataclasses.replace(cfg, method=MethodConfig("aoh", {"aoh": section}))
    METHODS["aoh"].check(cfg)
    m = build_method(cfg, fed)
    res = m.local({k: v.clone() for k, v in fed.initial.items()}, 0, seed=3)
    keep = assert_only_kept_heads_travel(m, res, cfg, fed, client_id=0)
    assert sum(int(k.sum()) for k in keep.values()) == 18
    assert_ops_match_flop_counter(m, fed, rel=1e-3)


def test_prefix_needs_our_attention():
    def check(*overrides):
        cfg = load_config(None, ["peft.method='prefix'", *overrides])
        METHODS[cfg.method.name].check(cfg)

    check()
    check("method.name='aoh'")
    with pytest.raises(ConfigError, match=r"'prefix' with `model.attn_implementation` = "
                                          r"'sdpa'.*set it to 'auto'"):
        check("model.attn_implementation='sdpa'")
    check("model.attn_implementation='sdpa'", "data.task='bbc_headline'")  # peft's cache
