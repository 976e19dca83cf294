"""Attention modules and layer stacks of Hugging Face models, derived from config and asserted.

This is the only place in fedprune that knows model families. Each family is one declarative
table (`_FAMILIES`): a regex per layer stack over module paths, and per attention block its
path inside the layer, the child names of its q/k/v/o projections and the config attributes
that give its head counts. `describe` reads the config, finds the layer blocks in
`model.named_modules()`, and asserts every projection's (in, out) features against
`n_heads * head_dim`, `n_kv_heads * head_dim` and the hidden size (nanoGPT-style asserted
mapping), so a wrong table or an unexpected checkpoint fails loudly instead of mapping heads to
the wrong rows.

Paths are matched by suffix, so base models (`encoder.layer.0`), task models
(`bert.encoder.layer.0`) and peft-wrapped models (`base_model.model.bert.encoder.layer.0`) all
work; the paths returned are full paths of the model that was passed in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

__all__ = [
    "SUPPORTED_FAMILIES",
    "AttentionModule",
    "ModelStructure",
    "Projection",
    "StructureError",
    "UnsupportedModelError",
    "describe",
    "features",
    "projection_names",
]


# --- public types ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """One of q/k/v/o of an attention module.

    `offset` is the first output feature of this projection inside a fused module (GPT-2
    `c_attn` = [q | k | v]: q at 0, k at H*d, v at 2*H*d); 0 for a module of its own.
    """

    module: str
    offset: int = 0


@dataclass(frozen=True)
class AttentionModule:
    """An attention block: its place in the model, its head geometry and its projections.

    q has out = n_heads * head_dim; k and v have out = n_kv_heads * head_dim (GQA when
    n_kv_heads < n_heads: query head h uses KV head h // group_size); o has
    in = n_heads * head_dim. Head h owns q/k/v output features
    `offset + h*head_dim : offset + (h+1)*head_dim` and o input features of the same range.
    """

    path: str
    layer: int
    stack: str  # "encoder" | "decoder"
    kind: str  # "self" | "cross"
    n_heads: int
    n_kv_heads: int
    head_dim: int
    q: Projection
    k: Projection
    v: Projection
    o: Projection

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 unless GQA)."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class ModelStructure:
    """Attention modules (encoder layers, then decoder self/cross by layer) and layer stacks.

    `layers` maps each stack present in the model ("encoder" and/or "decoder") to the module
    paths of its layer blocks in order; a decoder-only model has only "decoder".
    """

    family: str
    attention: tuple[AttentionModule, ...]
    layers: dict[str, tuple[str, ...]]

    @property
    def transposed(self) -> bool:
        """Projection weights stored [in, out] (GPT-2's Conv1D), not nn.Linear's [out, in]
        (peft's `fan_in_fan_out`)."""
        return self.family == "gpt2"

    @property
    def prefixed(self) -> tuple[AttentionModule, ...]:
        """The attention modules prefix tuning gives keys and values, in order: every
        self-attention of a one-stack model; an encoder-decoder's decoder self-attention
        only (peft 0.21 hands its seq2seq prefix to the decoder's self-attention cache and
        empties the cross-attention one; the encoder gets none)."""
        two = len(self.layers) == 2
        return tuple(a for a in self.attention
                     if a.kind == "self" and (not two or a.stack == "decoder"))


class UnsupportedModelError(ValueError):
    """The model's `config.model_type` is not one of the supported families."""


class StructureError(ValueError):
    """The model does not have the modules or shapes its family table and config promise."""


# --- family tables --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proj:
    """A projection: its path relative to the attention module and, when fused, the blocks
    ("q" = n_heads*head_dim wide, "kv" = n_kv_heads*head_dim wide) that precede it."""

    child: str
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Attn:
    """One attention block per layer of `stack`, at `<layer path>.<path>`."""

    stack: str
    kind: str
    path: str
    q: _Proj
    k: _Proj
    v: _Proj
    o: _Proj
    heads: str  # config attribute: query heads
    kv_heads: str | None = None  # config attribute: KV heads (GQA); None = heads
    head_dim: str | None = None  # config attribute; None (or a None value) = hidden // heads
    when: str | None = None  # config flag that must be true for this block to exist


@dataclass(frozen=True)
class _Family:
    hidden: str  # config attribute: model width (in of q/k/v, out of o)
    stacks: dict[str, str]  # stack -> regex of a layer block path suffix; group 1 = index
    attention: tuple[_Attn, ...]


def _separate(q: str, k: str, v: str, o: str) -> dict[str, _Proj]:
    """Four projections, each its own module."""
    return {"q": _Proj(q), "k": _Proj(k), "v": _Proj(v), "o": _Proj(o)}


_BERT_SELF = _separate("self.query", "self.key", "self.value", "output.dense")
_BERT = _Family(
    hidden="hidden_size",
    stacks={"encoder": r"encoder\.layer\.(\d+)"},
    attention=(
        _Attn("encoder", "self", "attention", **_BERT_SELF, heads="num_attention_heads"),
        # BERT used as a decoder (is_decoder + add_cross_attention) keeps its one stack,
        # named after its module path.
        _Attn(
            "encoder", "cross", "crossattention", **_BERT_SELF,
            heads="num_attention_heads", when="add_cross_attention",
        ),
    ),
)

_FAMILIES: dict[str, _Family] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": _Family(
        hidden="dim",
        stacks={"encoder": r"transformer\.layer\.(\d+)"},
        attention=(
            _Attn(
                "encoder", "self", "attention",
                **_separate("q_lin", "k_lin", "v_lin", "out_lin"), heads="n_heads",
            ),
        ),
    ),
    "gpt2": _Family(
        hidden="n_embd",
        stacks={"decoder": r"h\.(\d+)"},
        attention=(
            # c_attn: Conv1D(nx=E, nf=3E), output split [q | k | v]
            _Attn(
                "decoder", "self", "attn",
                q=_Proj("c_attn"), k=_Proj("c_attn", ("q",)), v=_Proj("c_attn", ("q", "kv")),
                o=_Proj("c_proj"), heads="n_head",
            ),
            # q_attn: Conv1D(E, E); c_attn: Conv1D(nx=E, nf=2E), output split [k | v]
            _Attn(
                "decoder", "cross", "crossattention",
                q=_Proj("q_attn"), k=_Proj("c_attn"), v=_Proj("c_attn", ("kv",)),
                o=_Proj("c_proj"), heads="n_head", when="add_cross_attention",
            ),
        ),
    ),
    "llama": _Family(
        hidden="hidden_size",
        stacks={"decoder": r"layers\.(\d+)"},
        attention=(
            _Attn(
                "decoder", "self", "self_attn",
                **_separate("q_proj", "k_proj", "v_proj", "o_proj"),
                heads="num_attention_heads", kv_heads="num_key_value_heads", head_dim="head_dim",
            ),
        ),
    ),
    "t5": _Family(
        hidden="d_model",  # inner width num_heads * d_kv may differ from d_model
        stacks={"encoder": r"encoder\.block\.(\d+)", "decoder": r"decoder\.block\.(\d+)"},
        attention=(
            _Attn(
                "encoder", "self", "layer.0.SelfAttention", **_separate("q", "k", "v", "o"),
                heads="num_heads", head_dim="d_kv",
            ),
            _Attn(
                "decoder", "self", "layer.0.SelfAttention", **_separate("q", "k", "v", "o"),
                heads="num_heads", head_dim="d_kv",
            ),
            _Attn(
                "decoder", "cross", "layer.1.EncDecAttention", **_separate("q", "k", "v", "o"),
                heads="num_heads", head_dim="d_kv",
            ),
        ),
    ),
    "bart": _Family(
        hidden="d_model",
        stacks={"encoder": r"encoder\.layers\.(\d+)", "decoder": r"decoder\.layers\.(\d+)"},
        attention=(
            _Attn(
                "encoder", "self", "self_attn",
                **_separate("q_proj", "k_proj", "v_proj", "out_proj"),
                heads="encoder_attention_heads",
            ),
            _Attn(
                "decoder", "self", "self_attn",
                **_separate("q_proj", "k_proj", "v_proj", "out_proj"),
                heads="decoder_attention_heads",
            ),
            _Attn(
                "decoder", "cross", "encoder_attn",
                **_separate("q_proj", "k_proj", "v_proj", "out_proj"),
                heads="decoder_attention_heads",
            ),
        ),
    ),
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

_STACK_ORDER = {"encoder": 0, "decoder": 1}
_KIND_ORDER = {"self": 0, "cross": 1}


# --- public functions -----------------------------------------------------------------------


def features(module: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a transformers Conv1D or a peft wrapper of one.

    Conv1D stores its weight as [in, out] (transposed w.r.t. Linear's [out, in]); peft tuner
    layers (LoRA, IA3, ...) keep the original module as `.base_layer`.
    """
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    raise TypeError(f"not a Linear or Conv1D projection: {type(module).__name__}")


def describe(model: torch.nn.Module) -> ModelStructure:
    """The attention modules and layer stacks of `model`, derived from its config and asserted.

    Works for base, task-head and peft-wrapped models. Raises UnsupportedModelError for an
    unknown `config.model_type` and StructureError when a module is missing or a projection's
    (in, out) features differ from what the config implies.
    """
    config = _config(model)
    family = config.model_type
    table = _FAMILIES[family]
    hidden = _config_int(config, table.hidden)
    layers = _find_layers(model, table)
    attention = [
        _attention(model, config, spec, hidden, index, layer_path)
        for spec in table.attention
        if spec.when is None or getattr(config, spec.when, False)
        for index, layer_path in enumerate(layers.get(spec.stack, ()))
    ]
    if not attention:
        raise StructureError(
            f"no attention modules found in {type(model).__name__} (family {family!r}); "
            f"expected layer blocks matching {table.stacks}"
        )
    attention.sort(key=lambda a: (_STACK_ORDER[a.stack], a.layer, _KIND_ORDER[a.kind]))
    return ModelStructure(family=family, attention=tuple(attention), layers=layers)


def projection_names(structure: ModelStructure, which: str = "qkvo") -> list[str]:
    """Full module paths of the chosen projections ("q", "k", "v", "o" in any combination).

    Deduplicated in order (GPT-2's fused c_attn holds q, k and v); usable directly as peft
    `LoraConfig(target_modules=...)` for the model that was described.
    """
    if not which or set(which) - set("qkvo"):
        raise ValueError(f"`which` must be a non-empty combination of q, k, v, o; got {which!r}")
    names = (getattr(attn, p).module for attn in structure.attention for p in which)
    return list(dict.fromkeys(names))


# --- helpers --------------------------------------------------------------------------------


def _config(model: torch.nn.Module) -> Any:
    """The model's transformers config, checked to name a supported family."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} ({type(model).__name__}); "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return config


def _config_int(config: Any, attr: str) -> int:
    value = getattr(config, attr, None)
    if not isinstance(value, int) or value <= 0:
        raise StructureError(f"config.{attr} must be a positive int for {config.model_type!r}; "
                             f"found {value!r}")
    return value


def _find_layers(model: torch.nn.Module, table: _Family) -> dict[str, tuple[str, ...]]:
    """stack -> layer block paths ordered by index; indices must be exactly 0..n-1."""
    found: dict[str, dict[int, str]] = {}
    for stack, pattern in table.stacks.items():
        regex = re.compile(rf"(?:.*\.)?{pattern}")
        for path, _ in model.named_modules():
            match = regex.fullmatch(path)
            if match is None:
                continue
            index = int(match.group(1))
            if index in found.setdefault(stack, {}):
                raise StructureError(
                    f"two {stack} layer blocks with index {index}: "
                    f"{found[stack][index]!r} and {path!r}"
                )
            found[stack][index] = path
    for stack, by_index in found.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise StructureError(f"{stack} layer indices are not 0..n-1: {sorted(by_index)}")
    return {stack: tuple(ix[i] for i in range(len(ix))) for stack, ix in found.items()}


def _head_dim(config: Any, spec: _Attn, hidden: int, n_heads: int) -> int:
    """config.<head_dim> when the family has one and it is set, else hidden // n_heads."""
    if spec.head_dim is not None and getattr(config, spec.head_dim, None) is not None:
        return _config_int(config, spec.head_dim)
    if hidden % n_heads:
        raise StructureError(f"hidden size {hidden} is not divisible by {n_heads} heads")
    return hidden // n_heads


def _attention(
    model: torch.nn.Module, config: Any, spec: _Attn, hidden: int, layer: int, layer_path: str
) -> AttentionModule:
    """The attention block `spec` of one layer, with its projection shapes asserted."""
    path = f"{layer_path}.{spec.path}"
    try:
        model.get_submodule(path)
    except AttributeError:
        raise StructureError(f"{path}: {spec.stack} {spec.kind}-attention not found") from None
    n_heads = _config_int(config, spec.heads)
    n_kv_heads = _config_int(config, spec.kv_heads) if spec.kv_heads else n_heads
    if n_heads % n_kv_heads:
        raise StructureError(f"{path}: {n_heads} query heads, not a multiple of {n_kv_heads} KV")
    head_dim = _head_dim(config, spec, hidden, n_heads)
    block = {"q": n_heads * head_dim, "kv": n_kv_heads * head_dim}
    projections = {
        name: Projection(f"{path}.{p.child}", sum(block[b] for b in p.after))
        for name, p in (("q", spec.q), ("k", spec.k), ("v", spec.v), ("o", spec.o))
    }
    attn = AttentionModule(
        path, layer, spec.stack, spec.kind, n_heads, n_kv_heads, head_dim, **projections
    )
    _check_shapes(model, attn, hidden)
    return attn


def _check_shapes(model: torch.nn.Module, attn: AttentionModule, hidden: int) -> None:
    """Assert q/k/v: hidden -> their widths (tiling a fused module exactly); o: H*d -> hidden."""
    width = {"q": attn.n_heads * attn.head_dim, "k": attn.n_kv_heads * attn.head_dim}
    width["v"] = width["k"]
    slices: dict[str, list[tuple[int, int]]] = {}  # module -> [(offset, width)] it holds
    for name in "qkv":
        proj = getattr(attn, name)
        slices.setdefault(proj.module, []).append((proj.offset, width[name]))
    for module, parts in slices.items():
        parts.sort()
        starts = [sum(w for _, w in parts[:i]) for i in range(len(parts))]
        if [offset for offset, _ in parts] != starts:
            raise StructureError(f"{module}: fused slices {parts} do not tile its output")
        _expect(model, module, (hidden, sum(w for _, w in parts)))
    _expect(model, attn.o.module, (width["q"], hidden))


def _expect(model: torch.nn.Module, path: str, expected: tuple[int, int]) -> None:
    """Raise StructureError unless module `path` exists with (in, out) features `expected`."""
    try:
        found = features(model.get_submodule(path))
    except AttributeError:
        raise StructureError(
            f"{path}: projection not found; expected (in, out) features {expected}"
        ) from None
    except TypeError as err:
        raise StructureError(f"{path}: {err}; expected (in, out) features {expected}") from None
    if found != expected:
        raise StructureError(f"{path}: expected (in, out) features {expected}, found {found}")
