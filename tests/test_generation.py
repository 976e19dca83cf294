"""Generation tasks (`data.task`) for the shared-world methods: the causal-LM and seq2seq
worlds, AoH head pruning on them (self- and cross-attention), their metrics, a federated run,
and one AoH round with the real SmolLM2 on BBC headlines."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from test_peft import assert_only_kept_heads_travel, assert_ops_match_flop_counter

from fedprune.client.world import GenerationWorld, build
from fedprune.config import ConfigError, MethodConfig, load_config
from fedprune.data.tasks import generate, response_perplexity, rouge
from fedprune.methods import METHODS
from fedprune.methods.base import build_method
from fedprune.sim import runner
from fedprune.structure.model import minilm_path

# 40 BBC rows (32 train, 8 validation), 48 tokens, 4 clients
SMALL = ["data.max_samples=40", "data.max_length=48", "data.max_new_tokens=6",
         "data.generate_samples=3", "federation.num_clients=4", "federation.batch_size=4",
         "federation.eval_batch_size=8"]


# the generation worlds of `worlds`: two families under LoRA, three under prefix tuning
WORLDS = ["llama", "bart", "llama-prefix", "bart-prefix", "t5-prefix"]


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    """A random BART (encoder 2 x 4 heads, decoder 1 x 2 self + 2 cross heads, d_model 32)
    with the MiniLM tokenizer ([CLS] starts, [SEP] ends the decoder's text)."""
    out = tmp_path_factory.mktemp("tiny-bart")
    tok = tf.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    tf.BartForConditionalGeneration(tf.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        vocab_size=len(tok), max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.cls_token_id, forced_eos_token_id=None)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random T5 (encoder 2, decoder 1 layer, 4 heads of 8, relative position buckets)
    with the MiniLM tokenizer."""
    out = tmp_path_factory.mktemp("tiny-t5")
    tok = tf.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    tf.T5ForConditionalGeneration(tf.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.cls_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def worlds(tiny_llama, tiny_bart, tiny_t5, tmp_path_factory):
    """"llama" (a tiny GQA Llama with the SmolLM2 tokenizer: instruction tuning), "bart"
    (seq2seq), "<family>-prefix" (prefix tuning) -> (cfg, world) on bbc_headline, built
    once."""
    cache, out = tmp_path_factory.mktemp("cache"), {}

    def world(name: str):
        if name not in out:
            family, _, peft = name.partition("-")
            model = {"llama": tiny_llama, "bart": tiny_bart, "t5": tiny_t5}[family]
            cfg = load_config(None, [f"model.name='{model}'",
                                     "data.task='bbc_headline'", f"data.cache_dir='{cache}'",
                                     "partition.scheme='dirichlet'", "partition.alpha=0.3",
                                     f"peft.method='{peft or 'lora'}'",
                                     "peft.num_virtual_tokens=16", *SMALL])
            out[name] = cfg, build(cfg)
        return out[name]
    return world


def aoh(cfg, sparsity: float = 0.5):
    section = METHODS["aoh"].Config(sparsity=sparsity, importance_samples=8)
    return dataclasses.replace(cfg, method=MethodConfig("aoh", {"aoh": section}))


def test_causal_world_scores_the_responses_and_deals_rows_by_category(worlds):
    _, fed = worlds("llama")
    assert isinstance(fed, GenerationWorld) and fed.task == "bbc_headline"
    assert (len(fed.train_rows), len(fed.val_rows)) == (32, 8)
    tok = fed.tokenizer
    for row, reference in zip(fed.val_rows, fed.references, strict=False):
        scored = [i for i, label in zip(row["input_ids"], row["labels"], strict=True)
                  if label != -100]
        assert tok.decode(scored) == reference + "<|im_end|>"  # the headline and end of turn
        assert len(row["input_ids"]) <= 48
    assert len(fed.prompts) == 3 and fed.prompts[0].startswith("Write a headline")
    # every training row belongs to exactly one client (Dirichlet over the BBC categories)
    dealt = sorted(i for part in fed.client_indices for i in part.tolist())
    assert dealt == list(range(32)) and len({len(p) for p in fed.client_indices}) > 1
    # the chat template's markers are special: never queries of the importance pass
    assert {tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id} <= fed.special_ids
    metrics, target = METHODS["aoh"].scoring("bbc_headline")
    assert target == "rouge1" and metrics == {"eval_loss": False, "perplexity": False,
                                              "rouge1": True, "rouge2": True, "rougeL": True}
    assert METHODS["fedavg"].scoring("bbc_category")[1] == "exact_match"
    assert METHODS["aoh"].scoring("") == ({"eval_loss": False, "accuracy": True}, "accuracy")


@pytest.mark.parametrize("name", WORLDS)
def test_analytic_ops_of_a_generation_model_match_flop_counter(worlds, name):
    """Instruction tuning of the tiny Llama (LoRA on q/k/v/o; prefix tuning, whose layer 0
    computes no query gradient) and seq2seq BART (its decoder length and cross-attention):
    `core.accounting` counts exactly what FlopCounterMode does, the LM head included."""
    cfg, fed = worlds(name)
    m = build_method(cfg, fed)
    assert m.arch.lm_head and m.arch.outputs == len(fed.tokenizer)
    assert_ops_match_flop_counter(m, fed, rel=1e-12)


@pytest.mark.parametrize("name", WORLDS)
def test_aoh_prunes_heads_of_a_generation_model_and_sends_only_the_kept_ones(worlds, name):
    """AoH at 50 %: the kept heads' slices move and travel, the pruned ones do not — for the
    causal model's GQA self-attention (LoRA, and prefix tuning's per-KV-head prefixes, whose
    importance sees the prefix positions as keys) and the seq2seq model's encoder, decoder
    and cross attention (under prefix tuning its decoder self-attention only, the one peft's
    seq2seq prefix reaches: Eq. 7 ranks just those heads); the payload decodes to the same
    delta and is smaller."""
    cfg, fed = worlds(name)
    cfg = aoh(cfg)
    METHODS["aoh"].check(cfg)
    m = build_method(cfg, fed)
    # the client with the most rows: several steps, so LoRA's A (which starts beside B = 0
    # without a gradient) moves too
    cid = max(range(4), key=lambda c: len(fed.client_indices[c]))
    res = m.local({k: v.clone() for k, v in fed.initial.items()}, cid, seed=3)
    keep = assert_only_kept_heads_travel(m, res, cfg, fed, client_id=cid)
    attns = m.structure.attention
    mapped = ([a for a in attns if a.stack == "decoder" and a.kind == "self"]
              if name in ("bart-prefix", "t5-prefix") else attns)
    assert m.mapped == {a.path for a in mapped}  # cross heads are mapped but under a prefix
    total = sum(a.n_heads for a in mapped)
    assert sum(int(k.sum()) for k in keep.values()) == total // 2
    assert {a.kind for a in attns} == ({"self"} if name.startswith("llama") else {"self", "cross"})
    assert math.isfinite(res.loss) and res.metrics["kept_heads"] == total // 2


@pytest.mark.parametrize("name", WORLDS)
def test_evaluation_is_response_perplexity_and_rouge_of_greedy_answers(worlds, name):
    """The method's metrics equal the same quantities computed apart: perplexity over all
    validation rows batched one by one, ROUGE of `generate`'s answers to the shown prompts."""
    cfg, fed = worlds(name)
    m = build_method(cfg, fed)
    got = m.evaluate(fed.initial)
    assert set(got) == set(m.metrics)
    alone = [fed.collate([row]) for row in fed.val_rows]
    assert got["perplexity"] == pytest.approx(response_perplexity(fed.model, alone), rel=1e-4)
    assert got["eval_loss"] == pytest.approx(math.log(got["perplexity"]))
    answers = generate(fed.model, fed.tokenizer, fed.prompts, 6, 1, max_prompt_length=48)
    want = rouge(answers, fed.references)
    assert {k: got[k] for k in want} == pytest.approx(want)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_bart"])
def test_bfloat16_compute_generates(family, request, tmp_path):
    """`model.compute_dtype` = bfloat16 (what 'auto' picks on CPUs with AMX or AVX512-BF16):
    the frozen weights are bf16, and `generate` — whose decoding loop calls the inner model
    (and a seq2seq model's encoder), not the autocast forward — runs under autocast too."""
    cfg = load_config(None, [f"model.name='{request.getfixturevalue(family)}'",
                             "data.task='bbc_headline'", *SMALL, f"data.cache_dir='{tmp_path}'",
                             "model.compute_dtype='bfloat16'"])
    fed = build(cfg)
    assert any(p.dtype == torch.bfloat16 for p in fed.model.parameters())
    answers = generate(fed.model, fed.tokenizer, fed.prompts, 3, 2, max_prompt_length=48)
    assert len(answers) == len(fed.prompts) and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_bart"])
def test_a_federated_run_on_bbc_category_logs_exact_match_and_is_seeded(family, request,
                                                                        tmp_path):
    """Two AoH rounds of instruction tuning (Llama) or seq2seq (BART) through the round loop:
    the task's metrics per evaluation, its plot and report; the same seed, the same model."""
    model = request.getfixturevalue(family)

    def run(name: str):
        return runner.run(load_config(None, [
            f"model.name='{model}'", "data.task='bbc_category'", *SMALL,
            "data.max_new_tokens=3", "federation.rounds=2", "federation.clients_per_round=2",
            "method.name='aoh'", "method.aoh.sparsity=0.5", "federation.lr=0.01",
            f"run.out_dir='{tmp_path}'", f"run.name='{name}'"]), progress=False)

    run_dir = run("cat")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    last = records[-1]
    assert 0.0 <= last["exact_match"] <= 1.0 and last["perplexity"] > 1.0
    assert last["eval_loss"] == pytest.approx(math.log(last["perplexity"]))
    assert (run_dir / "exact_match.png").is_file()
    assert "exact_match" in (run_dir / "report.md").read_text()
    # the train loss is the response tokens' mean NLL: the scale of eval_loss
    assert abs(last["train_loss"] - records[0]["eval_loss"]) < 2.0
    again = run("again")
    assert (again / "global.safetensors").read_bytes() == \
        (run_dir / "global.safetensors").read_bytes()


@pytest.mark.parametrize("family, peft, auto", [
    ("tiny_llama", "lora", "AutoModelForCausalLM"),
    ("tiny_bart", "prefix", "AutoModelForSeq2SeqLM")])
def test_export_of_a_generation_run_is_a_peft_adapter(family, peft, auto, request, tmp_path):
    """`fedprune export` of an AoH run on headlines: a peft adapter (LoRA on the causal LM;
    prefix tuning on BART, whose decoder self-attention alone takes the prefix) on the
    task's Auto class whose logits are the run's global model's; the card names the task and
    that class."""
    from peft import PeftModel

    from fedprune.client.train import load_state
    from fedprune.export import export_run

    model = request.getfixturevalue(family)
    cfg = load_config(None, [f"model.name='{model}'", "data.task='bbc_headline'", *SMALL,
                             "federation.rounds=1", "federation.clients_per_round=2",
                             "method.name='aoh'", "method.aoh.sparsity=0.5",
                             f"peft.method='{peft}'", "peft.num_virtual_tokens=4",
                             "model.compute_dtype='float32'", f"run.out_dir='{tmp_path}'",
                             "run.name='head'"])
    run_dir = runner.run(cfg, progress=False)
    (out,) = export_run(run_dir, tmp_path / "adapter")
    card = (out / "README.md").read_text()
    assert "bbc_headline" in card and auto in card
    model = PeftModel.from_pretrained(getattr(tf, auto).from_pretrained(model), out).eval()
    fed = build(cfg)
    load_state(fed.params, load_file(run_dir / "global.safetensors"))
    assert any(not torch.equal(fed.params[k], v) for k, v in fed.initial.items())  # trained
    batch = fed.collate(fed.val_rows[:4])
    if peft == "lora":
        batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, fed.model.eval()(**batch).logits,
                                   rtol=1e-5, atol=1e-5)


def test_generation_task_config_errors():
    def check(*overrides):
        cfg = load_config(None, list(overrides))
        METHODS[cfg.method.name].check(cfg)

    with pytest.raises(ConfigError, match=r"`data.task` = 'bbc_headline' with `method.name` = "
                                          r"'prufed'.*method.prufed"):
        check("method.name='prufed'", "data.task='bbc_headline'")
    with pytest.raises(ConfigError, match=r"'label_flip' with `data.task`"):
        check("method.name='aoh'", "data.task='bbc_headline'", "attack.kind='label_flip'",
              "attack.fraction=0.5")
    with pytest.raises(ConfigError, match=r"`data.task` = 'summaries' is not allowed"):
        load_config(None, ["data.task='summaries'"])
    with pytest.raises(ConfigError, match=r"`data.generate_samples`: must be >= 1"):
        load_config(None, ["data.generate_samples=0"])


def test_aoh_round_with_smollm2_on_bbc_headlines(tmp_path):
    """The real SmolLM2-135M (GQA, 30 layers x 9 query heads): one AoH round at 90 % on
    headline generation, 2 clients x 10 articles; ROUGE on 2 generated headlines."""
    cfg = load_config(None, [
        "model.name='smollm2'", "data.task='bbc_headline'", "data.max_samples=25",
        "data.max_length=96", "data.max_new_tokens=8", "data.generate_samples=2",
        "federation.num_clients=2", "federation.clients_per_round=2", "federation.rounds=1",
        "federation.batch_size=4", "federation.eval_batch_size=4", "method.name='aoh'",
        "method.aoh.sparsity=0.9", "method.aoh.importance_samples=4",
        f"run.out_dir='{tmp_path}'", "run.name='smol'"])
    run_dir = runner.run(cfg, progress=False)
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                 .splitlines()]
    assert 0.0 <= record["rouge1"] <= 1.0 and 1.0 < record["perplexity"] < 1e4
    kept = [m["kept_heads"] for m in record["client_metrics"].values()]
    assert kept == [27.0, 27.0]  # 10 % of 270 query heads
    # LoRA r=16 on q, k, v, o of 30 layers (hidden 576, head 64, 3 KV heads): the shared
    # tensors (A of q / k / v, B of o: 16 x 576 each) travel whole, then 2 x 64 x 16 floats
    # per kept query head (q's B rows, o's A columns) and per kept KV head (k's, v's B rows)
    dense = sum(v.numel() * 4 for v in load_file(run_dir / "global.safetensors").values())
    assert dense == 30 * 4 * (4 * 16 * 576 + 2 * 64 * 16 * (9 + 3))
    shared, head = 30 * 4 * 4 * 16 * 576, 4 * 2 * 64 * 16
    for up in record["bytes_up"]:  # + between 1 and 27 KV heads, head weights and metadata
        assert shared + 28 * head < up < shared + 54 * head + 16_384, up
