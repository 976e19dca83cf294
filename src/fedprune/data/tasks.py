"""The task layer: task kinds, prompt/response encoding, greedy generation, metrics, a registry.

Kinds (`KINDS`): "classification" (text -> label id; encoded by `fedprune.data.tokenize`),
"causal_lm" (instruction tuning of a decoder-only LM: loss on the response tokens only) and
"seq2seq" (encoder-decoder such as T5 / BART: source -> target).

Generation tasks come as rows with "prompt" and "response" strings (plus "label" where the
source has classes, so the label-skew partitions still apply); `tokenize_rows` turns them into
token rows for `collator`, `generate` answers prompts, and the task's `score` compares the
answers with the references. Prose tasks come as plain text for `texts.token_blocks` and
`response_perplexity`.

Metric scale: ROUGE F-measures and exact match are fractions in [0, 1] (not x100).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import datasets
import torch
from rouge_score import rouge_scorer
from transformers import DataCollatorForSeq2Seq

from fedprune.data.sources import DataError, load_source
from fedprune.data.texts import PARTS, book_names, book_part

KINDS = ("classification", "causal_lm", "seq2seq")
IGNORE_INDEX = -100  # label value that torch's cross_entropy and HF losses skip
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# --- metrics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A reported number and the direction in which it improves."""

    name: str
    higher_is_better: bool
    description: str

    def better(self, a: float, b: float) -> bool:
        """True when value `a` is strictly better than value `b`."""
        return a > b if self.higher_is_better else a < b


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", True, "fraction of argmax class predictions equal to the label"),
    "exact_match": Metric(
        "exact_match", True, "fraction of generated answers equal to the reference after "
        "`normalize_answer`"),
    "rouge1": Metric("rouge1", True, "mean ROUGE-1 F-measure (Porter stemming), 0-1"),
    "rouge2": Metric("rouge2", True, "mean ROUGE-2 F-measure (Porter stemming), 0-1"),
    "rougeL": Metric("rougeL", True, "mean ROUGE-L (sentence-level LCS) F-measure, 0-1"),
    "perplexity": Metric(
        "perplexity", False, "exp(mean token NLL) over the scored tokens (labels != -100)"),
}


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over examples, each in [0, 1] (Lin 2004; rouge-score with
    its default tokenizer: lowercase, non-alphanumerics dropped, Porter stemming)."""
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # score(target, prediction): reference first
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: total / len(predictions) for key, total in totals.items()}


def normalize_answer(text: str, *, first_word: bool = False) -> str:
    """Lowercase, every Unicode punctuation character removed, whitespace collapsed and
    stripped; with `first_word`, only the first remaining word (category answers: "Sports.
    It is about..." -> "sports"). Articles are kept (unlike SQuAD's normalisation).

    Written here: no installed library offers this normalisation (rouge-score's tokenizer
    also drops non-ASCII letters)."""
    kept = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    words = kept.split()
    return (words[0] if words else "") if first_word else " ".join(words)


def exact_match(prediction: str, reference: str, *, first_word: bool = False) -> bool:
    """Whether the two strings are equal after `normalize_answer` (same `first_word` for both)."""
    return normalize_answer(prediction, first_word=first_word) == normalize_answer(
        reference, first_word=first_word)


def exact_match_accuracy(
    predictions: Sequence[str], references: Sequence[str], *, first_word: bool = False
) -> float:
    """Fraction in [0, 1] of `exact_match` pairs."""
    _check_pairs(predictions, references)
    hits = sum(exact_match(p, r, first_word=first_word)
               for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise DataError(f"metrics need as many predictions as references, at least one; got "
                        f"{len(predictions)} predictions and {len(references)} references")


class NLLSum:
    """Running sum of token negative log-likelihoods over the positions whose label is not
    -100; `perplexity` = exp(sum / count) (float64 accumulators)."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0

    def add_batch(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits [B, T, V] aligned with labels [B, T] (position t predicts labels[:, t])."""
        self.nll += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
            reduction="sum").item()
        self.tokens += int((labels != IGNORE_INDEX).sum())

    def perplexity(self) -> float:
        if self.tokens == 0:
            raise DataError("perplexity: no scored tokens (every label is -100)")
        return math.exp(self.nll / self.tokens)


def response_perplexity(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
                        ) -> float:
    """exp(mean NLL) over every response token (labels != -100) of `batches` (from `collator`).

    Token NLLs are summed over all batches before dividing, so the result does not depend on
    how the rows were batched. Decoder-only models: logits at t predict labels at t + 1 (the
    shift HF's causal-LM loss applies); encoder-decoder models: logits align with labels.
    """
    nll = NLLSum()
    shift = not getattr(model.config, "is_encoder_decoder", False)
    device = next(model.parameters()).device
    with _evaluating(model), torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"]
            if shift:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                logits, labels = logits[:, :-1], labels[:, 1:]  # [B, T-1, V], [B, T-1]
            else:  # the model builds its decoder inputs from the labels (shifted right)
                logits = model(**batch).logits  # [B, T_target, V]
            nll.add_batch(logits, labels)
    return nll.perplexity()


@contextmanager
def _evaluating(model: torch.nn.Module):
    """model.eval() inside the block (no dropout), the caller's train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --- encoding -----------------------------------------------------------------------------


def has_chat_template(tokenizer: Any) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template (else the plain format)."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, prompt: str, max_length: int | None = None) -> list[int]:
    """Token ids that ask the model for a response: the chat template's user turn plus its
    generation prompt (``add_generation_prompt=True``), or plain ``[bos] prompt "\\n"``.

    With `max_length`, the prompt text is cut at its end until the ids fit; the template's
    own tokens are never cut.
    """
    return _fit_prompt(tokenizer, prompt, max_length)[1]


def tokenize_instruction(
    tokenizer: Any, prompt: str, response: str, max_length: int
) -> dict[str, list[int]]:
    """One instruction-tuning row: input_ids = prompt ids + response ids, labels -100 on the
    prompt (loss on the response only).

    Chat template: the ids of [user: prompt, assistant: response]; the prompt part is the
    template applied to the user turn alone with ``add_generation_prompt=True``, which must
    be a prefix of the whole (checked), so the response tokens are exactly the tail. Tokens the
    template appends after the end-of-turn token (eos; SmolLM2: "\\n" after <|im_end|>) stay
    in the input with label -100. Without a template: ``[bos] prompt "\\n"`` then
    ``response [eos]`` (eos, else sep), tokenized apart so the boundary is exact.

    Longer than `max_length`: the prompt text is cut first (at its end, keeping the template
    and the instruction at its start); only if the bare template plus the response still do
    not fit is the response cut, at its end. Its start is always kept.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"`max_length` must be an integer >= 2, got {max_length!r}")
    p_ids, tail, scored = _encode_pair(tokenizer, prompt, response)
    if len(p_ids) + len(tail) > max_length:
        budget = max(max_length - len(tail), len(_prompt_only(tokenizer, "")))
        cut, _ = _fit_prompt(tokenizer, prompt, budget)
        p_ids, tail, scored = _encode_pair(tokenizer, cut, response)
        if len(p_ids) >= max_length:
            raise DataError(f"`max_length`={max_length} leaves no room for the response: the "
                            f"prompt template alone has {len(p_ids)} tokens")
        tail = tail[:max_length - len(p_ids)]
        scored = min(scored, len(tail))
    labels = [IGNORE_INDEX] * len(p_ids) + tail[:scored] + [IGNORE_INDEX] * (len(tail) - scored)
    ids = p_ids + tail
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_seq2seq(
    tokenizer: Any, source: str, target: str, max_source: int, max_target: int
) -> dict[str, list[int]]:
    """One encoder-decoder row: the source ids (truncated to `max_source`) and labels = the
    target ids from ``text_target=`` (truncated to `max_target`; the tokenizer's own special
    tokens, e.g. T5's </s>). The model builds decoder inputs from the labels itself."""
    for name, value in (("max_source", max_source), ("max_target", max_target)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"`{name}` must be an integer >= 1, got {value!r}")
    # Two calls: one call with text_target would truncate both sides to the same max_length.
    enc = tokenizer(source, truncation=True, max_length=max_source, return_token_type_ids=False,
                    verbose=False)
    labels = tokenizer(text_target=target, truncation=True, max_length=max_target,
                       return_token_type_ids=False, verbose=False)["input_ids"]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": labels}


def tokenize_rows(
    ds: datasets.Dataset, tokenizer: Any, kind: str, *, max_length: int,
    max_target: int | None = None,
) -> list[dict[str, list[int]]]:
    """Token rows of a generation dataset ("prompt", "response" columns), in its row order.

    causal_lm: `tokenize_instruction(..., max_length)`; seq2seq: `tokenize_seq2seq` with
    max_source = `max_length` and `max_target` (required). Only token columns are kept:
    `DataCollatorForSeq2Seq` would take a "label" column for the labels.
    """
    missing = [c for c in ("prompt", "response") if c not in ds.column_names]
    if missing:
        raise DataError(f"tokenize_rows: no {missing} column; available: {ds.column_names}")
    if kind == "causal_lm":
        encode = partial(tokenize_instruction, tokenizer, max_length=max_length)
    elif kind == "seq2seq":
        if max_target is None:
            raise DataError("tokenize_rows: kind 'seq2seq' needs `max_target`")
        encode = partial(tokenize_seq2seq, tokenizer, max_source=max_length,
                         max_target=max_target)
    else:
        raise DataError(f"tokenize_rows: unknown generation kind {kind!r}; allowed: "
                        f"['causal_lm', 'seq2seq'] (classification: fedprune.data.tokenize)")
    return [encode(p, r) for p, r in zip(ds["prompt"], ds["response"], strict=True)]


def collator(tokenizer: Any, model: Any = None) -> DataCollatorForSeq2Seq:
    """Pads a list of token rows to the longest one: input_ids with the pad token,
    attention_mask with 0, labels with -100, on the tokenizer's padding side; with an
    encoder-decoder `model`, also its decoder_input_ids (the labels shifted right), which the
    importance pass needs as the decoder's queries.

    transformers' DataCollatorForSeq2Seq does exactly this for both kinds (it pads "labels"
    itself, which tokenizer.pad cannot), so there is no hand-written collate.
    """
    _require_pad(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, model=model, padding="longest",
                                  label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def _require_pad(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad "
                        "token; set one explicitly (e.g. tokenizer.pad_token = "
                        "tokenizer.eos_token) before batching")


def _prompt_only(tokenizer: Any, prompt: str) -> list[int]:
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True,
            tokenize=True, return_dict=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _plain_ids(tokenizer, prompt + "\n")


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _encode_pair(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int], int]:
    """(prompt ids, response ids, how many leading response ids are scored)."""
    p_ids = _prompt_only(tokenizer, prompt)
    if has_chat_template(tokenizer):
        # The template has no {% generation %} markers (return_assistant_tokens_mask needs
        # them), so the response is found as the tail after the generation prompt.
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=True, return_dict=False)
        if full[:len(p_ids)] != p_ids:
            raise DataError(f"chat template of {getattr(tokenizer, 'name_or_path', '')!r}: the "
                            "generation prompt is not a prefix of the full conversation, so "
                            "the response tokens cannot be located")
        tail = full[len(p_ids):]
        eos = tokenizer.eos_token_id
        ends = [i for i, t in enumerate(tail) if t == eos]
        return p_ids, tail, (ends[-1] + 1 if ends else len(tail))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a "
                        "chat template nor an eos/sep token to end a response")
    tail = _plain_ids(tokenizer, response) + [eos]
    return p_ids, tail, len(tail)


def _fit_prompt(tokenizer: Any, prompt: str, max_length: int | None) -> tuple[str, list[int]]:
    """(prompt text, its prompt ids) with the text cut at its end until the ids fit
    `max_length`. Re-rendering decoded text can merge tokens differently, hence the loop."""
    ids = _prompt_only(tokenizer, prompt)
    if max_length is None or len(ids) <= max_length:
        return prompt, ids
    content = _plain_ids(tokenizer, prompt)
    keep = min(len(content), max_length - (len(ids) - len(content)))  # minus template tokens
    while keep > 0:
        text = tokenizer.decode(content[:keep])
        ids = _prompt_only(tokenizer, text)
        if len(ids) <= max_length:
            return text, ids
        keep -= len(ids) - max_length
    ids = _prompt_only(tokenizer, "")
    if len(ids) > max_length:
        raise DataError(f"`max_length`={max_length} is shorter than the bare prompt template "
                        f"({len(ids)} tokens)")
    return "", ids


# --- generation ---------------------------------------------------------------------------


def generate(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
    batch_size: int, *, max_prompt_length: int | None = None,
) -> list[str]:
    """Greedy answers to `prompts`, decoded without special tokens, in the order of `prompts`.

    Decoder-only: `prompt_ids` (chat template with generation prompt, or plain), left-padded
    so every row's last prompt token sits at the same position, and only the new tokens are
    decoded. Encoder-decoder: the tokenized prompts (right-padded) go to ``model.generate``.
    Prompts are batched in order of length to waste little padding.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise DataError(f"`max_new_tokens` and `batch_size` must be >= 1, got {max_new_tokens} "
                        f"and {batch_size}")
    _require_pad(tokenizer)
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    if seq2seq:
        ids = [tokenizer(p, truncation=max_prompt_length is not None,
                         max_length=max_prompt_length, verbose=False)["input_ids"]
               for p in prompts]
    else:
        ids = [prompt_ids(tokenizer, p, max_prompt_length) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    answers: dict[int, str] = {}
    with _evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            enc = tokenizer.pad([{"input_ids": ids[i]} for i in chunk], return_tensors="pt",
                                padding_side="right" if seq2seq else "left").to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, pad_token_id=tokenizer.pad_token_id)
            # decoder-only output = [prompt | new tokens]; encoder-decoder = decoder ids only
            new = out if seq2seq else out[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            answers.update({i: t.strip() for i, t in zip(chunk, texts, strict=True)})
    return [answers[i] for i in range(len(ids))]


# --- bundled tasks ------------------------------------------------------------------------

HEADLINE_INSTRUCTION = "Write a headline for this BBC News article."
CATEGORY_INSTRUCTION = ("Which category does this BBC News article belong to? Answer with one "
                        "word: {names}.")
XLSUM_INSTRUCTION = "Summarize this news article in one sentence."
E2E_INSTRUCTION = "Describe this restaurant in one or two sentences, using all its attributes."


def _article_body(article: str) -> str:
    """A BBC article without its first line (the headline)."""
    parts = article.split("\n", 1)
    return parts[1].strip() if len(parts) == 2 else ""


def bbc_headline_rows(split: str = "train") -> datasets.Dataset:
    """BBC News article body -> its headline (2,225 rows; "label" = the category)."""
    ds = load_source("bbc_news", split=split)
    return ds.map(
        lambda ex: {"prompt": f"{HEADLINE_INSTRUCTION}\n\n{_article_body(ex['text'])}",
                    "response": ex["headline"]},
        remove_columns=["text", "headline"], desc="bbc_headline")


def bbc_category_rows(split: str = "train") -> datasets.Dataset:
    """BBC News article body -> its category word (the class name, e.g. "sports")."""
    ds = load_source("bbc_news", split=split)
    names = ds.features["label"].names
    instruction = CATEGORY_INSTRUCTION.format(names=", ".join(names[:-1]) + " or " + names[-1])
    return ds.map(
        lambda ex: {"prompt": f"{instruction}\n\n{_article_body(ex['text'])}",
                    "response": names[ex["label"]]},
        remove_columns=["text", "headline"], desc="bbc_category")


def prose_rows(split: str = "test") -> datasets.Dataset:
    """One row per bundled book: "book" and "text" = that book's `split` part (texts.PARTS)."""
    if split not in PARTS:
        raise DataError(f"task 'prose': unknown split {split!r}; allowed: {list(PARTS)}")
    names = book_names()
    return datasets.Dataset.from_dict(
        {"book": names, "text": [book_part(n, split) for n in names]})


def _hub_generation_rows(source: str, instruction: str, split: str) -> datasets.Dataset:
    """A hub dataset's standard "text"/"target" columns as prompt/response rows."""
    ds = load_source(source, split=split)
    return ds.map(lambda ex: {"prompt": f"{instruction}\n\n{ex['text']}",
                              "response": ex["target"]},
                  remove_columns=["text", "target"], desc=source)


@dataclass(frozen=True)
class TaskSpec:
    """A task: which model kinds run it, how its rows are built, how it is scored.

    `build(split)` returns the rows: "text" + "label" (classification), "prompt" + "response"
    (generation) or "book" + "text" (prose). `score(predictions, references)` turns generated
    answers into metric values (None where the metric needs the model: accuracy, perplexity).
    `metrics` are keys of `METRICS`, the first being the headline one.
    """

    name: str
    kinds: tuple[str, ...]
    metrics: tuple[str, ...]
    splits: tuple[str, ...]
    build: Callable[[str], datasets.Dataset]
    score: Callable[[Sequence[str], Sequence[str]], dict[str, float]] | None
    description: str

    def __post_init__(self) -> None:
        assert set(self.kinds) <= set(KINDS), self.kinds
        assert self.metrics and set(self.metrics) <= set(METRICS), self.metrics


def _exact_match_first_word(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    return {"exact_match": exact_match_accuracy(preds, refs, first_word=True)}


_HUB_SPLITS = ("train", "validation", "test")
_GENERATION = ("causal_lm", "seq2seq")

TASKS: dict[str, TaskSpec] = {
    "bbc_news": TaskSpec(
        "bbc_news", ("classification",), ("accuracy",), ("train",),
        lambda split: load_source("bbc_news", split=split), None,
        "BBC News category classification (bundled)"),
    "austen_books": TaskSpec(
        "austen_books", ("classification",), ("accuracy",), ("train",),
        lambda split: load_source("austen_books", split=split), None,
        "which of four Austen novels a 50-word passage comes from (bundled)"),
    "bbc_headline": TaskSpec(
        "bbc_headline", _GENERATION, ROUGE_TYPES, ("train",), bbc_headline_rows, rouge,
        "BBC News article body -> headline (bundled)"),
    "bbc_category": TaskSpec(
        "bbc_category", _GENERATION, ("exact_match",), ("train",), bbc_category_rows,
        _exact_match_first_word, "BBC News article -> generated category word (bundled)"),
    "prose": TaskSpec(
        "prose", ("causal_lm",), ("perplexity",), tuple(PARTS), prose_rows, None,
        "perplexity on the bundled Austen novels (fedprune.data.texts)"),
    "xlsum": TaskSpec(
        "xlsum", _GENERATION, ROUGE_TYPES, _HUB_SPLITS,
        partial(_hub_generation_rows, "xlsum", XLSUM_INSTRUCTION), rouge,
        "XL-Sum English article -> one-sentence summary (hub)"),
    "e2e_nlg": TaskSpec(
        "e2e_nlg", _GENERATION, ROUGE_TYPES, _HUB_SPLITS,
        partial(_hub_generation_rows, "e2e_nlg", E2E_INSTRUCTION), rouge,
        "E2E NLG meaning representation -> restaurant description (hub)"),
}


def load_task(name: str, split: str | None = None) -> datasets.Dataset:
    """The rows of task `name` (a key of `TASKS`) for `split` (default: its first split)."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    spec = TASKS[name]
    split = spec.splits[0] if split is None else split
    if split not in spec.splits:
        raise DataError(f"task {name!r}: unknown split {split!r}; allowed: {list(spec.splits)}")
    return spec.build(split)


def generation_metrics(
    model: torch.nn.Module, tokenizer: Any, batches: Iterable[Mapping[str, torch.Tensor]],
    prompts: Sequence[str], references: Sequence[str], task: str, *, max_new_tokens: int,
    batch_size: int, max_prompt_length: int | None = None,
) -> dict[str, float]:
    """A generation model's validation metrics: the perplexity of the responses in `batches`
    and, when there are `prompts`, task `task`'s score of the greedy answers to them."""
    out = {"perplexity": response_perplexity(model, batches)}
    if prompts:
        answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                           max_prompt_length=max_prompt_length)
        out.update(TASKS[task].score(answers, references))
    return out
