"""Every PEFT method (`peft.method`: LoRA, IA3, prompt tuning, full fine-tuning) through peft:
its head map on tiny models of every family (a head's slices change only that head's
context), the prompt-chunk option, head importance under soft prompts, OPs against
FlopCounterMode and an AoH client round on the real MiniLM and on a decoder with a
classification head (tiny GQA Llama), and the config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf
from test_heads import RAW, changed_heads, context, perturb
from torch.utils.flop_counter import FlopCounterMode

from fedprune.client.train import batch_shape
from fedprune.client.world import build
from fedprune.config import ConfigError, MethodConfig, PeftConfig, load_config
from fedprune.core.accounting import train_ops
from fedprune.methods import METHODS, build_method
from fedprune.methods.heads import ALPHA
from fedprune.structure import describe
from fedprune.structure.headmap import HeadSlice, head_units
from fedprune.structure.importance import head_importance
from fedprune.structure.model import apply_peft, model_arch, trainable_parameters

TASK = {"bert": "classification", "distilbert": "classification", "roberta": "classification",
        "gpt2": "causal_lm", "llama": "causal_lm", "t5": "seq2seq", "bart": "seq2seq"}


def wrapped(family: str, method: str, raw: torch.nn.Module | None = None, **kw
            ) -> torch.nn.Module:
    model = apply_peft(raw or RAW[family](), method=method, task=TASK[family], seed=0, **kw)
    if method == "ia3":  # IA3 starts at ones; move off them so that every head differs
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.uniform_(0.5, 1.5)
    return model.eval()


# --- head map per method x family -----------------------------------------------------------


@pytest.mark.parametrize("method", ["ia3", "full"])
@pytest.mark.parametrize("family", list(RAW))
def test_a_heads_slices_change_only_that_heads_context(family, method):
    """In every attention module kind (self, GPT-2's and the enc-dec models' cross), for a
    query unit and a KV unit: perturbing its slices changes the context (o's input) of its
    own heads only — the KV unit's whole query group under GQA."""
    model = wrapped(family, method)
    s = describe(model)
    params = trainable_parameters(model)
    units = head_units(params, s)
    seen = set()
    for index, attn in enumerate(s.attention):
        if (attn.stack, attn.kind) in seen:
            continue
        seen.add((attn.stack, attn.kind))
        capture = context(model, s, index)
        for kind in ("query", "kv"):
            unit = next((u for u in units if u.path == attn.path and u.kind == kind
                         and u.index == 1), None)
            if unit is None:  # IA3 scales k and v only: no query slices (but GPT-2's fused
                # self-attention c_attn holds q as well)
                assert method == "ia3" and kind == "query"
                assert family != "gpt2" or attn.kind == "cross"
                continue
            before = capture()
            perturb(model, unit, seed=index)
            assert changed_heads(before, capture(), attn.head_dim) == list(unit.query_heads)


def test_prefix_kv_heads_change_only_their_query_groups():
    """Prefix tuning (P-tuning v2) on the tiny GQA Llama (2 layers, 6 query / 2 KV heads of
    8): KV head g's key and value prefix columns of layer l change only layer l's context of
    g's query group; the slices by hand from peft's [T_p, L * 2 * KV * d] layout."""
    model = wrapped("llama", "prefix", num_virtual_tokens=3)
    s = describe(model)
    params = trainable_parameters(model)
    (key,) = params
    assert params[key].shape == (3, 2 * 2 * 2 * 8)
    units = head_units(params, s, prefix=True)
    assert len(units) == 2 * 2 and {u.kind for u in units} == {"kv"}
    u = next(u for u in units if u.path == s.attention[1].path and u.index == 1)
    assert u.slices == (HeadSlice(key, 1, 40, 48), HeadSlice(key, 1, 56, 64))
    assert u.query_heads == (3, 4, 5)
    assert_units_change_only_their_heads(model, s, units)


def assert_units_change_only_their_heads(model, s, units, forward=None) -> None:
    """Perturbing each unit's slices changes the context of its own query heads only (of its
    attention module; ``forward`` as in `test_heads.context`)."""
    for index, attn in enumerate(s.attention):
        capture = context(model, s, index, forward)
        for unit in (u for u in units if u.path == attn.path):
            before = capture()
            perturb(model, unit, seed=index)
            assert changed_heads(before, capture(), attn.head_dim) == list(unit.query_heads)


def test_ia3_and_full_slices_by_hand():
    """MiniLM-shaped BERT (12 heads of 4, hidden 48): IA3's [48, 1] k / v scalings by rows of
    4; full fine-tuning's q weight and bias rows, o weight columns; FFN scalings, o's rows and
    the embeddings are shared."""
    p = "base_model.model.bert.encoder.layer.0.attention."
    model = wrapped("bert", "ia3")
    ia3 = head_units(trainable_parameters(model), describe(model))
    kv3 = next(u for u in ia3 if u.kind == "kv" and u.index == 3)
    assert kv3.slices == (HeadSlice(f"{p}self.key.ia3_l.default", 0, 12, 16),
                          HeadSlice(f"{p}self.value.ia3_l.default", 0, 12, 16))
    assert {u.kind for u in ia3} == {"kv"} and len(ia3) == 24
    model = wrapped("bert", "full")
    full = head_units(trainable_parameters(model), describe(model))
    p = "bert.encoder.layer.1.attention."
    q5 = next(u for u in full if u.kind == "query" and u.index == 5 and "layer.1" in u.path)
    assert q5.slices == (HeadSlice(f"{p}self.query.weight", 0, 20, 24),
                         HeadSlice(f"{p}self.query.bias", 0, 20, 24),
                         HeadSlice(f"{p}output.dense.weight", 1, 20, 24))
    mapped = {sl.key for u in full for sl in u.slices}
    assert len(mapped) == 2 * 7 and "bert.embeddings.word_embeddings.weight" not in mapped
    # GPT-2's Conv1D weights are [in, out]: q/k/v rows are columns, o columns are rows
    model = wrapped("gpt2", "full")
    g = head_units(trainable_parameters(model), describe(model))
    kv2 = next(u for u in g if u.kind == "kv" and u.index == 2 and ".h.0.attn" in u.path)
    assert kv2.slices[0] == HeadSlice("transformer.h.0.attn.c_attn.weight", 1, 48, 56)
    q2 = next(u for u in g if u.kind == "query" and u.index == 2 and ".h.0.attn" in u.path)
    assert HeadSlice("transformer.h.0.attn.c_proj.weight", 0, 16, 24) in q2.slices


def test_prompt_chunks_only_on_request():
    """Prompt tuning's [T_p, d] embeddings: shared by default; with prompt_chunks column chunk
    h (d / H wide) is query head h of the first attention module."""
    model = wrapped("bert", "prompt", num_virtual_tokens=5)
    s, params = describe(model), trainable_parameters(model)
    assert head_units(params, s) == []
    units = head_units(params, s, prompt_chunks=True)
    key = "prompt_encoder.default.embedding.weight"
    assert params[key].shape == (5, 48)
    assert [(u.path, u.kind, u.index) for u in units] == \
        [(s.attention[0].path, "query", h) for h in range(12)]
    assert units[7].slices == (HeadSlice(key, 1, 28, 32),)


# --- importance under soft prompts ----------------------------------------------------------


def test_importance_ignores_virtual_queries_and_keeps_virtual_keys():
    """With T_p = 3 soft-prompt tokens prepended by peft, each layer's probabilities are
    (B, H, 3 + T, 3 + T): the Eq. 6 confidence averages the real, non-special queries' max over
    keys (virtual keys included, SEP excluded), checked against the probabilities captured
    here."""
    model = wrapped("bert", "prompt", num_virtual_tokens=3)
    s = describe(model)
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    got = head_importance(model, s, [{"input_ids": ids, "attention_mask": mask}],
                          special_ids={0, 1, 2}, exclude_key_ids={2})
    probs = []
    handle = model.get_submodule(s.attention[1].path).register_forward_hook(
        lambda _m, _a, out: probs.append(out[1]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    p = probs[0]  # (2, 12, 8, 8)
    assert p.shape == (2, 12, 8, 8)
    real_keys = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    keys = torch.cat([torch.ones(2, 3, dtype=torch.bool), real_keys], 1)
    queries = [[3 + 1, 3 + 2, 3 + 3], [3 + 1, 3 + 2]]  # tokens 5 6 7 and 8 9
    want = torch.stack([p[b][:, queries[b]].masked_fill(~keys[b][None, None], 0).amax(-1)
                        .mean(-1) for b in range(2)]).mean(0)
    torch.testing.assert_close(got[s.attention[1].path], want.float(), atol=1e-6, rtol=1e-5)


# --- analytic OPs per method x family --------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "full"])
@pytest.mark.parametrize("family", list(RAW))
def test_analytic_ops_of_every_family_equal_flop_counter(family, method):
    """One training step (forward + backward) of each tiny model: `core.accounting` counts
    exactly the matmul FLOPs FlopCounterMode does — encoder-decoders with their decoder
    length and cross-attention, prompt tuning's virtual tokens, GQA, GPT-2's fused q/k/v
    projection. Eager attention: torch counts no attention products under the CPU's SDPA
    kernel."""
    # GPT-2 without the cross-attention RAW's has (it would run only beside an encoder)
    raw = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                           n_positions=32)) if family == "gpt2" else None
    model = wrapped(family, method, raw, num_virtual_tokens=3).train()
    (model.get_base_model() if hasattr(model, "get_base_model") else model) \
        .set_attn_implementation("eager")
    arch = model_arch(model, PeftConfig(method=method, num_virtual_tokens=3))
    torch.manual_seed(0)
    b, t, t_dec = 2, 7, 5
    batch = {"input_ids": torch.randint(3, 90, (b, t)), "attention_mask": torch.ones(b, t)}
    if TASK[family] == "seq2seq":
        batch |= {"labels": torch.randint(3, 90, (b, t_dec)),
                  "decoder_input_ids": torch.randint(3, 90, (b, t_dec))}
    else:
        batch["labels"] = torch.randint(3, 90, (b, t)) if TASK[family] == "causal_lm" \
            else torch.tensor([0, 1])
    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch).loss.backward()
    heads = [a.n_heads for a in describe(model).attention]
    shape = (b, t, t_dec) if TASK[family] == "seq2seq" else (b, t)
    assert train_ops(arch, heads, [shape]) == counter.get_total_flops()


# --- the real MiniLM: OPs and an AoH client round per method -------------------------------


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, tiny_llama):
    """(model, peft.method) -> (cfg, world): "minilm" (the real one) or "llama" (a tiny
    random GQA Llama with the SmolLM2 tokenizer: a decoder with a classification head)."""
    cache, out = tmp_path_factory.mktemp("cache"), {}

    def world(method: str, model: str = "minilm"):
        if (model, method) not in out:
            extra = ["peft.prompt_head_chunks=true"] if method == "prompt" else []
            name = "minilm" if model == "minilm" else str(tiny_llama)
            cfg = load_config(None, [f"model.name='{name}'", "data.max_samples=120",
                                     "data.max_length=32", "federation.num_clients=3",
                                     f"data.cache_dir='{cache}'", "peft.num_virtual_tokens=8",
                                     f"peft.method='{method}'", *extra,
                                     *(["model.attn_implementation=eager"]  # counted products
                                       if method != "prefix" else [])])
            out[model, method] = cfg, build(cfg)
        return out[model, method]
    return world


@pytest.mark.parametrize("model,method", [("minilm", "ia3"), ("minilm", "prompt"),
                                          ("minilm", "full"), ("llama", "lora"),
                                          ("llama", "ia3"), ("llama", "prompt"),
                                          ("llama", "prefix"), ("llama", "full")])
def test_analytic_ops_match_flop_counter(worlds, model, method):
    """One training step's matmul FLOPs by `core.accounting` equal FlopCounterMode's (the
    tiny Llama classifier: exactly; the real MiniLM: within 0.1 %)."""
    cfg, fed = worlds(method, model)
    assert_ops_match_flop_counter(build_method(cfg, fed), fed,
                                  rel=1e-3 if model == "minilm" else 1e-12)


def assert_ops_match_flop_counter(m, fed, rel: float) -> None:
    """`m.arch`'s analytic OPs of one training step on 8 rows of ``fed`` against
    FlopCounterMode's count of that step."""
    batch = fed.collate([fed.train_rows[i] for i in range(8)])
    counter = FlopCounterMode(display=False)
    with counter:
        fed.model(**batch).loss.backward()
    fed.model.zero_grad(set_to_none=True)
    heads = [a.n_heads for a in m.structure.attention]
    analytic = train_ops(m.arch, heads, [batch_shape(batch)])
    assert analytic == pytest.approx(counter.get_total_flops(), rel=rel)


@pytest.mark.parametrize("model,method", [("minilm", "ia3"), ("minilm", "prompt"),
                                          ("minilm", "full"), ("llama", "lora"),
                                          ("llama", "ia3"), ("llama", "prefix")])
def test_aoh_trains_and_sends_only_kept_heads(worlds, model, method):
    """AoH at 75 % (MiniLM: 18 of 72 heads kept; under prompt chunks, which only layer 0's
    12 heads own, 3 of those 12; the tiny Llama classifier: 4 of 16, under GQA): the kept
    heads' slices move and travel, the pruned ones do not; the payload is smaller than the
    dense one and decodes to the same delta."""
    cfg, fed = worlds(method, model)
    section = METHODS["aoh"].Config(sparsity=0.75, importance_samples=16)
    cfg = dataclasses.replace(cfg, method=MethodConfig("aoh", {"aoh": section}))
    METHODS["aoh"].check(cfg)
    m = build_method(cfg, fed)
    res = m.local({k: v.clone() for k, v in fed.initial.items()}, 0, seed=3)
    assert m.units
    keep = assert_only_kept_heads_travel(m, res, cfg, fed, client_id=0)
    kept = 3 if method == "prompt" else {"minilm": 18, "llama": 4}[model]
    assert sum(int(k.sum()) for k in keep.values()) == kept


def assert_only_kept_heads_travel(m, res, cfg, fed, client_id: int) -> dict[str, torch.Tensor]:
    """A head-pruning client's result ``res``: the kept heads' slices moved, the pruned ones
    did not; its payload is smaller than FedAvg's dense one and decodes to the same delta.
    Returns attention path -> kept query heads (bool)."""
    keep = {p.removesuffix(ALPHA): w > 0 for p, w in res.extra.items()}
    for unit in m.units:
        kept = bool(keep[unit.path][list(unit.query_heads)].any())
        for sl in unit.slices:
            moved = res.delta[sl.key].narrow(sl.dim, sl.start, sl.stop - sl.start).abs().sum()
            assert (moved > 0) == kept, (unit.path, unit.kind, unit.index, sl)
    blob = m.encode(res)
    dense = build_method(dataclasses.replace(cfg, method=MethodConfig("fedavg", {})), fed)
    assert len(blob) < len(dense.encode(res))
    update = m.decode(blob, client_id=client_id)
    for k, v in res.delta.items():
        assert torch.equal(update.delta[k], v), k
    return keep


# --- config errors ----------------------------------------------------------------------


def test_methods_without_a_head_map_or_view_are_refused():
    def check(*overrides):
        cfg = load_config(None, list(overrides))
        METHODS[cfg.method.name].check(cfg)

    with pytest.raises(ConfigError, match=r"`peft.method` = 'prompt'.*peft.prompt_head_chunks"):
        check("method.name='aoh'", "peft.method='prompt'")
    check("method.name='aoh'", "peft.method='prompt'", "peft.prompt_head_chunks=true")
    check("method.name='fedavg'", "peft.method='prompt'")  # no head map needed
    with pytest.raises(ConfigError, match=r"`method.aoh.mode` = 'structural' with "
                                          r"`peft.method` = 'ia3'"):
        check("method.name='aoh'", "method.aoh.mode='structural'", "peft.method='ia3'")
    with pytest.raises(ConfigError, match=r"`peft.method` = 'full' with `method.name` = "
                                          r"'prufed'.*lora only"):
        check("method.name='prufed'", "peft.method='full'")
    check("method.name='aoh'", "peft.method='prefix'")  # classifiers too (test_prefix)
    check("method.name='aoh'", "peft.method='prefix'", "data.task='bbc_headline'")
    with pytest.raises(ConfigError, match=r"`peft.prompt_head_chunks`.*'lora'"):
        load_config(None, ["peft.prompt_head_chunks=true"])
