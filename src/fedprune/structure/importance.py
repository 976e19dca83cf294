"""Attention-head importance of AoH (Eq. 6), captured with our own forward hooks.

α_h = mean over a client's samples of ( mean over the sample's valid query tokens of
( max over valid keys of head h's softmax attention probability ) ) — the "confidence" of
Voita et al. (2019). Valid queries: not padding and not special (CLS/SEP/BOS/EOS/PAD, the
tokenizer's `all_special_ids`); valid keys: not padding and not EOS/SEP (`exclude_key_ids`).
The softmax row is not renormalised after excluding keys; causal masking is the model's own
(masked keys have probability 0). A sample without a valid query token contributes nothing.

Where the probabilities come from (transformers 5.23, eager attention): every supported
family's attention module — the structure's `AttentionModule.path` — returns them in its
forward output *whatever* `output_attentions` says (`output_attentions=True` only switches on
transformers' own `capture_outputs` hooks, which keep all layers' maps until the forward ends);
with SDPA/flash the slot is None. BERT/RoBERTa `attention` passes on `attention.self`'s
(output, probs); DistilBERT `attention`, GPT-2 `attn`, Llama `self_attn` and BART
`self_attn`/`encoder_attn` return (output, probs); T5 `SelfAttention`/`EncDecAttention` return
(output, position_bias, probs). So the pass runs with `output_attentions=False` and
`use_cache=False`, and a hook on each attention module reduces its (B, H, Tq, Tk) map to
per-head sums at once: only one layer's map is alive at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from fedprune.report.progress import bar
from fedprune.structure import prefix
from fedprune.structure.attention import AttentionModule, ModelStructure, StructureError
from fedprune.structure.compute import PROBS_ATTENTION

__all__ = ["ImportanceAccumulator", "head_importance"]

# family -> index of the (B, H, Tq, Tk) probabilities in its attention module's output tuple
_PROBS_INDEX: dict[str, int] = {
    "bert": 1, "roberta": 1, "distilbert": 1, "gpt2": 1, "llama": 1, "bart": 1, "t5": 2,
}
# batch keys that are not model inputs of the importance pass
_DROPPED_KEYS = frozenset({"labels", "label", "label_ids"})


# --- accumulator ----------------------------------------------------------------------------


class ImportanceAccumulator:
    """Running Eq. 6 confidence of one attention module's heads (SparseGPT/Wanda style).

    `add_batch` reduces a batch's probabilities to per-sample, per-head values and adds them
    to a running sum; `finalize` returns the mean over the samples that had a valid query.
    """

    def __init__(self, n_heads: int) -> None:
        self.n_heads = n_heads
        self.total = torch.zeros(n_heads, dtype=torch.float64)  # (H,): sum over samples
        self.samples = torch.zeros((), dtype=torch.int64)  # samples that contributed

    def add_batch(
        self, probs: torch.Tensor, query_valid: torch.Tensor, key_valid: torch.Tensor
    ) -> None:
        """Add one batch: probs (B, H, Tq, Tk), query_valid (B, Tq) bool, key_valid (B, Tk) bool."""
        (batch, n_query), (key_batch, n_key) = query_valid.shape, key_valid.shape
        if probs.shape != (batch, self.n_heads, n_query, n_key) or key_batch != batch:
            raise ValueError(
                f"probabilities {tuple(probs.shape)} do not match {self.n_heads} heads, "
                f"query mask {tuple(query_valid.shape)} and key mask {tuple(key_valid.shape)}"
            )
        # max over valid keys, no renormalisation: excluded keys count as probability 0
        confidence = probs.masked_fill(~key_valid[:, None, None, :], 0).amax(-1).float()
        confidence = torch.where(query_valid[:, None, :], confidence, 0)  # (B, H, Tq)
        n_valid = query_valid.sum(-1)  # (B,)
        per_sample = confidence.sum(-1) / n_valid.clamp(min=1)[:, None]  # (B, H)
        contributes = n_valid > 0  # a sample without a valid query adds nothing
        # stays on the probabilities' device: no host sync per layer
        self.total = self.total.to(probs.device) + per_sample[contributes].sum(0).double()
        self.samples = self.samples.to(probs.device) + contributes.sum()

    def finalize(self) -> torch.Tensor:
        """α (H,) float32 on the CPU; ValueError when no sample had a valid query token."""
        if int(self.samples) == 0:
            raise ValueError("no sample with a valid (non-special, non-padding) query token")
        return (self.total / self.samples).float().cpu()


# --- public functions -----------------------------------------------------------------------


def head_importance(
    model: torch.nn.Module,
    structure: ModelStructure,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    special_ids: set[int],
    exclude_key_ids: set[int],
) -> dict[str, torch.Tensor]:
    """AoH Eq. 6 head importance α of every attention module of `structure`.

    `batches` yields model inputs: input_ids and attention_mask (optional token_type_ids); an
    encoder-decoder model also needs decoder_input_ids (optional decoder_attention_mask; a
    missing mask means all ones). Label keys are dropped. Queries of an encoder (self)
    attention are the input tokens, of a decoder attention the decoder tokens (the input tokens
    for a decoder-only model); keys of a cross-attention are the encoder's tokens.

    Runs under no_grad in eval mode with eager attention, and restores the attention
    implementation, each module's train/eval mode and the hooks afterwards, also on errors.
    Returns attention path -> α (n_heads,) float32 on the CPU (query heads; a KV unit under GQA weighs its group's max: methods/heads.py).
    """
    accumulators = {a.path: ImportanceAccumulator(a.n_heads) for a in structure.attention}
    current: dict[str, _Masks] = {}  # stack -> masks of the batch being run
    device = next(model.parameters()).device
    with _eager_eval(model), _hooks(model, structure, accumulators, current), torch.no_grad():
        for batch in bar(batches, "head importance", unit="batch"):
            inputs = {k: v.to(device) for k, v in batch.items() if k not in _DROPPED_KEYS}
            current.clear()
            current.update(_stream_masks(inputs, structure, special_ids, exclude_key_ids))
            model(**inputs, output_attentions=False, use_cache=False)
    return {path: acc.finalize() for path, acc in accumulators.items()}


# --- masks ----------------------------------------------------------------------------------


class _Masks(NamedTuple):
    """Token validity of one token stream: query (B, T) and key (B, T), bool."""

    query: torch.Tensor
    key: torch.Tensor


def _token_masks(
    ids: torch.Tensor, mask: torch.Tensor | None, special_ids: set[int], exclude_key_ids: set[int]
) -> _Masks:
    """Queries: attended and not special; keys: attended and not in `exclude_key_ids`."""
    attended = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()

    def isin(values: set[int]) -> torch.Tensor:
        return torch.isin(ids, torch.tensor(sorted(values), dtype=ids.dtype, device=ids.device))

    return _Masks(attended & ~isin(special_ids), attended & ~isin(exclude_key_ids))


def _stream_masks(
    inputs: Mapping[str, torch.Tensor],
    structure: ModelStructure,
    special_ids: set[int],
    exclude_key_ids: set[int],
) -> dict[str, _Masks]:
    """stack -> masks of its tokens: input_ids, or decoder_input_ids for an enc-dec decoder."""
    if "input_ids" not in inputs:
        raise ValueError("head_importance needs `input_ids` in every batch (token ids decide "
                         "which queries and keys are special)")
    source = _token_masks(
        inputs["input_ids"], inputs.get("attention_mask"), special_ids, exclude_key_ids
    )
    if not _is_encoder_decoder(structure):
        return dict.fromkeys(structure.layers, source)
    if "decoder_input_ids" not in inputs:
        raise ValueError(f"head_importance on a {structure.family!r} encoder-decoder model "
                         "needs `decoder_input_ids` in every batch")
    target = _token_masks(
        inputs["decoder_input_ids"], inputs.get("decoder_attention_mask"),
        special_ids, exclude_key_ids,
    )
    return {"encoder": source, "decoder": target}


def _is_encoder_decoder(structure: ModelStructure) -> bool:
    return {"encoder", "decoder"} <= set(structure.layers)


def _module_masks(
    attn: AttentionModule, streams: Mapping[str, _Masks], n_query: int, n_key: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_valid, key_valid) of one module: cross-attention keys are the encoder's tokens.
    Positions beyond the input tokens are peft's virtual tokens (prompt tuning's soft prompt),
    which peft prepends: never queries (they are not the client's text), always keys (every
    token attends to them)."""
    keys = streams[attn.stack] if attn.kind == "self" else streams["encoder"]
    query, key = streams[attn.stack].query, keys.key
    if n_query > query.shape[1]:
        query = torch.nn.functional.pad(query, (n_query - query.shape[1], 0), value=False)
    if n_key > key.shape[1]:
        key = torch.nn.functional.pad(key, (n_key - key.shape[1], 0), value=True)
    return query, key


# --- hooks and model state ------------------------------------------------------------------


@contextmanager
def _hooks(
    model: torch.nn.Module,
    structure: ModelStructure,
    accumulators: Mapping[str, ImportanceAccumulator],
    current: Mapping[str, _Masks],
) -> Iterator[None]:
    """Forward hooks that feed each attention module's probabilities to its accumulator."""
    index = _PROBS_INDEX[structure.family]
    for attn in structure.attention:
        if attn.kind == "cross" and not _is_encoder_decoder(structure):
            raise ValueError(
                f"{attn.path}: cross-attention over external encoder states is not supported "
                "(their tokens are unknown, so keys cannot be masked)"
            )

    def hook_for(attn: AttentionModule) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            probs = output[index] if isinstance(output, tuple) and len(output) > index else None
            if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
                raise StructureError(
                    f"{attn.path} returned no (B, H, Tq, Tk) attention probabilities at output "
                    f"index {index}; is eager attention active for this model?"
                )
            masks = _module_masks(attn, current, probs.shape[2], probs.shape[3])
            accumulators[attn.path].add_batch(probs, *masks)

        return hook

    handles = [
        model.get_submodule(attn.path).register_forward_hook(hook_for(attn))
        for attn in structure.attention
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _eager_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and eager attention for the block; both restored exactly afterwards (an
    encoder with our prefixes: fedprune's eager maths, since transformers' would drop them).

    transformers 5 keeps the implementation in `config._attn_implementation` of the model and
    of each sub-model (T5 stacks hold copies); `set_attn_implementation` switches all of them,
    and the saved per-config values are written back on exit.
    """
    hf_model = _transformers_model(model)
    configs = {id(m.config): m.config for m in hf_model.modules() if isinstance(m, PreTrainedModel)}
    saved_impl = [(c, c._attn_implementation_internal) for c in configs.values()]
    saved_mode = [(m, m.training) for m in model.modules()]
    try:
        hf_model.set_attn_implementation(
            PROBS_ATTENTION if getattr(model, prefix.FLAG, False) else "eager")
        model.eval()
        yield
    finally:
        for config, impl in saved_impl:
            config._attn_implementation_internal = impl
        for module, training in saved_mode:
            module.training = training


def _transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The outermost transformers model in `model` (itself, or the one inside a peft wrapper)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(f"{type(model).__name__} holds no transformers PreTrainedModel")
