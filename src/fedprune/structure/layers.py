"""Layer views: the one shared decoder computing only some of its layers (PruFed).

PruFed (Bhansali et al., DESIGN "Method C") gives each device tier a layer-dropped model: the
decoder layers with global indices `kept` (ascending). `layer_view` makes the **one** backbone
compute exactly that model for the duration of a `with` block, through patch.py:

* the layer `ModuleList` is replaced by a new `ModuleList` of the very same layer modules
  (no copies: the kept layers' weights and adapters are the shared ones);
* `config.num_hidden_layers` becomes k = len(kept) (transformers 5.24's `LlamaModel.forward`
  runs `self.layers[: config.num_hidden_layers]`, `DynamicCache(config=...)` makes one cache
  layer per `config.per_layer_config`, whose length is `num_hidden_layers`), and
  `config.layer_types`, where the config has one, keeps the kept layers' entries;
* every `layer_idx` inside the kept layers (the attention module's index into the KV cache)
  is renumbered 0..k-1, so `generate` with a KV cache works inside the view.

Inside the view the model's parameter paths carry **local** layer indices: `named_parameters`,
`state_dict` and peft's `get_peft_model_state_dict` show `...layers.{i}...` for the i-th kept
layer, and the dropped layers' parameters do not appear at all. Adapters are named by global
layer outside the view (HeteAgg); `LayerView.to_global` / `to_local` (or `layer_key_map`)
translate between the two.

`layer_io` captures the hidden states between decoder layers (h_0 .. h_L) for the data-driven
layer-dropping strategies (Gromov et al.'s angular distance, ShortGPT's Block Influence).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor, nn

from fedprune.structure.attention import describe
from fedprune.structure.patch import Patcher, patched

__all__ = ["LayerView", "decoder_layers", "layer_io", "layer_key_map", "layer_view"]

# families whose decoder forward, cache and config `layer_view` has been checked against
# (transformers 5.24: `LlamaModel.forward`, `DynamicCache`, `LlamaAttention.layer_idx`)
_LAYER_VIEW_FAMILIES = frozenset({"llama"})
_ACTIVE = "_fedprune_layer_view"  # flag on the module owning the layer list (not re-entrant)


# --- the decoder's layer list ---------------------------------------------------------------


@dataclass(frozen=True)
class _Stack:
    """The decoder layer list: its owner module (e.g. `LlamaModel`), the attribute holding the
    `ModuleList`, and the `ModuleList`'s path in the model (parameter paths start with it)."""

    owner: nn.Module
    attr: str
    path: str

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.owner, self.attr)


def _decoder_stack(model: nn.Module) -> _Stack:
    """The decoder-only model's layer list, found by `attention.describe` (asserted)."""
    structure = describe(model)
    if structure.family not in _LAYER_VIEW_FAMILIES or "encoder" in structure.layers:
        raise NotImplementedError(f"layer views support the decoder-only families "
                                  f"{sorted(_LAYER_VIEW_FAMILIES)}; got {structure.family!r}")
    paths = structure.layers["decoder"]  # e.g. ("model.layers.0", ..., "model.layers.29")
    list_path = paths[0].rpartition(".")[0]
    owner_path, _, attr = list_path.rpartition(".")
    stack = _Stack(model.get_submodule(owner_path), attr, list_path)
    layers = stack.layers
    assert isinstance(layers, nn.ModuleList), f"{list_path} is a {type(layers).__name__}"
    assert all(p == f"{list_path}.{i}" for i, p in enumerate(paths)), "layers not in one list"
    assert len(layers) == len(paths) == stack.owner.config.num_hidden_layers, (
        f"{list_path} holds {len(layers)} layers, config.num_hidden_layers is "
        f"{stack.owner.config.num_hidden_layers}"
    )
    return stack


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, module list) of a decoder-only model's layers, e.g. `("model.layers", ...)`;
    under peft `"base_model.model.model.layers"`. Parameter paths of layer i start with
    `f"{path}.{i}."`."""
    stack = _decoder_stack(model)
    return stack.path, stack.layers


def _check_kept(kept: Sequence[int], n_layers: int) -> tuple[int, ...]:
    """`kept` as a tuple of ints; ValueError unless non-empty, ascending, unique, in range."""
    out = tuple(int(i) for i in kept)
    if not out:
        raise ValueError("kept: at least one layer must be kept")
    if any(b <= a for a, b in pairwise(out)):
        raise ValueError(f"kept must be ascending and unique; got {list(out)}")
    if out[0] < 0 or out[-1] >= n_layers:
        raise ValueError(f"kept must lie in 0..{n_layers - 1} (the model has {n_layers} "
                         f"layers); got {list(out)}")
    return out


# --- local <-> global parameter paths -------------------------------------------------------


def _split(key: str, path: str) -> tuple[int, str] | None:
    """`f"{path}.{i}{rest}"` -> (i, rest) with rest starting with "."; None for a key outside
    the layer list."""
    prefix = path + "."
    if not key.startswith(prefix):
        return None
    index, dot, rest = key[len(prefix):].partition(".")
    if not index.isdigit() or not dot:
        return None
    return int(index), dot + rest


def layer_key_map(keys: Iterable[str], kept: Sequence[int], path: str) -> dict[str, str]:
    """Local -> global parameter path for each of `keys` (paths inside a layer view).

    `path` is the layer list's path (`LayerView.path`, `decoder_layers`). A key
    `f"{path}.{i}.rest"` maps to `f"{path}.{kept[i]}.rest"`; keys outside the layer list
    (embeddings, final norm, task head) map to themselves. Invert with
    `{g: l for l, g in layer_key_map(...).items()}` (a bijection: `kept` is unique), or use
    `LayerView.to_local`, which also drops the entries of dropped layers.
    """
    kept = tuple(kept)
    out = {}
    for key in keys:
        split = _split(key, path)
        if split is None:
            out[key] = key
            continue
        local, rest = split
        if local >= len(kept):
            raise ValueError(f"{key!r}: layer {local} is not in a view of {len(kept)} layers")
        out[key] = f"{path}.{kept[local]}{rest}"
    return out


@dataclass(frozen=True)
class LayerView:
    """What `layer_view` yields: the kept global layer indices and the layer list's path."""

    kept: tuple[int, ...]
    path: str

    def to_global(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A state keyed by the view's local paths, re-keyed by global layer (same tensors)."""
        names = layer_key_map(state, self.kept, self.path)
        return {names[k]: v for k, v in state.items()}

    def to_local(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The part of a globally keyed state that the view holds, keyed by local paths
        (same tensors): kept layers' entries and entries outside the layer list; entries of
        dropped layers are left out."""
        local = {g: i for i, g in enumerate(self.kept)}
        out = {}
        for key, value in state.items():
            split = _split(key, self.path)
            if split is None:
                out[key] = value
            elif split[0] in local:
                out[f"{self.path}.{local[split[0]]}{split[1]}"] = value
        return out


# --- the view -------------------------------------------------------------------------------


@contextmanager
def layer_view(model: nn.Module, kept: Sequence[int]) -> Iterator[LayerView]:
    """Make `model` compute only the decoder layers `kept` (ascending global indices) for the
    `with` block (PruFed's layer-dropped client model, DESIGN "Method C").

    `model`: a decoder-only model of a supported family (Llama: SmolLM2), plain or
    peft-wrapped. Inside the block the model is exactly the k-layer model made of the kept
    layers in order (same modules, renumbered `layer_idx`, k-layer config); forward, backward
    and `generate` with a KV cache work. On exit, also on an exception, everything is restored:
    the original `ModuleList` object, config values and `layer_idx`s. Training inside the view
    changes the shared kept layers in place (their adapters are the model's own Parameters).
    Not re-entrant: RuntimeError when a layer view is already active on the model.
    """
    stack = _decoder_stack(model)
    if getattr(stack.owner, _ACTIVE, False):
        raise RuntimeError("layer_view is already active on this model (not re-entrant)")
    layers = stack.layers
    kept = _check_kept(kept, len(layers))
    config = stack.owner.config
    if getattr(config, "is_heterogeneous", False):  # per-layer overrides are keyed by layer
        raise NotImplementedError("layer_view does not support heterogeneous per-layer configs")
    with patched() as patcher:
        patcher.set(stack.owner, _ACTIVE, True)
        patcher.set(stack.owner, stack.attr, nn.ModuleList([layers[i] for i in kept]))
        if getattr(config, "layer_types", None) is not None:
            patcher.set(config, "layer_types", [config.layer_types[i] for i in kept])
        patcher.set(config, "num_hidden_layers", len(kept))
        for local, index in enumerate(kept):
            _renumber(patcher, layers[index], local, f"{stack.path}.{index}")
        yield LayerView(kept, stack.path)


def _renumber(patcher: Patcher, layer: nn.Module, local: int, path: str) -> None:
    """Set every int `layer_idx` inside one decoder layer (the attention module's index into
    the KV cache) to its position in the view."""
    modules = [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    if not modules:
        raise AttributeError(f"{path}: no module with an int `layer_idx` to renumber")
    for module in modules:
        patcher.set(module, "layer_idx", local)


# --- hidden states between layers -----------------------------------------------------------


@torch.no_grad()
def layer_io(model: nn.Module, batches: Iterable[Mapping[str, Tensor]],
             max_tokens: int = 4096) -> list[Tensor]:
    """Hidden states between the decoder layers: [h_0, ..., h_L], each float32 [tokens, d].

    h_l is the input of layer l (h_0: the embeddings) and h_L the output of the last layer,
    before the final norm (which is why `output_hidden_states` is not used: its last entry
    is after the norm). Captured with forward hooks on the layers while the decoder body
    (the layer list's owner, e.g. `LlamaModel`: no LM head) runs on each batch's `input_ids`
    [B, T] and `attention_mask` [B, T] (optional); padding positions are removed. Stops after
    `max_tokens` real tokens (memory: (L+1) * max_tokens * d * 4 bytes; SmolLM2 at 4096
    tokens: 290 MB). Layer i's output is layer i+1's input: block l maps h_l to h_{l+1}
    (angular distance / Block Influence of Gromov et al. and ShortGPT). Call with dropout off
    (`model.eval()`).
    """
    stack = _decoder_stack(model)
    layers = stack.layers
    device = next(model.parameters()).device
    states: list[list[Tensor]] = [[] for _ in range(len(layers) + 1)]
    current: dict[str, Tensor] = {}  # the batch's keep mask, bool [B, T]

    def keep(hidden: Tensor) -> Tensor:  # (B, T, d) -> (n, d) real tokens, float32
        return hidden[current["mask"]].float()

    def before(index: int) -> Callable[..., None]:  # records h_index, the input of layer index
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            states[index].append(keep(args[0] if args else kwargs["hidden_states"]))
        return hook

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Tensor | tuple) -> None:
        states[-1].append(keep(output[0] if isinstance(output, tuple) else output))

    handles = [layer.register_forward_pre_hook(before(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(after, with_kwargs=True))
    try:
        seen = 0
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            current["mask"] = mask.bool()
            stack.owner(input_ids=ids, attention_mask=mask, use_cache=False)
            seen += int(current["mask"].sum())
            if seen >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
    if not states[0]:
        raise ValueError("layer_io: `batches` is empty")
    return [torch.cat(h)[:max_tokens] for h in states]


def layer_linears(model: nn.Module) -> dict[str, tuple[int, nn.Linear]]:
    """Every `nn.Linear` inside a decoder layer (Llama: q, k, v, o, gate, up, down), keyed by
    its weight's parameter path, with its layer index — what FedSpaLLM prunes. Norms,
    biases, embeddings and the (tied) LM head are not in it."""
    path, layers = decoder_layers(model)
    return {f"{path}.{i}.{name}.weight": (i, module)
            for i, layer in enumerate(layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
