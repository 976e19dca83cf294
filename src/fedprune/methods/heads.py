"""Shared machinery of the head-pruned methods (B2 `random_heads.py`, AoH `aoh.py`).

Both follow DESIGN.md Method A: per client and round a score per attention head, Eq. 7 keeps
the heads scoring at least the s-quantile (scope global or per layer), the client trains only
the kept heads' slices (mode `adapter`: pruned slices frozen; `structural`: pruned heads
removed from the forward and backward; `detached`: pruned heads computed without gradient)
and sends only those slices plus one weight per head.
The server turns the head weights into per-row / per-column aggregation weights of the
head-mapped tensors (`owned_mean`); every other tensor weighs |D_c| (Eq. 5).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedprune.client.train import load_state, local_train, snapshot
from fedprune.config import ConfigError, MethodOptions, opt
from fedprune.core.aggregate import owned_mean
from fedprune.core.robust import cap_shares
from fedprune.core.update import ClientUpdate, InvalidUpdate, State, Weight
from fedprune.methods.base import LocalResult, Method
from fedprune.structure.headmap import head_units, structural_keep, unit_mask
from fedprune.structure.headview import detached_grad_heads, detached_heads, structural_view

ALPHA_MAX = 1.0 + 1e-4  # head weights are mean max-softmax probabilities (B2: U(0, 1)):
# above 1 (with float32 rounding slack) no honest client sends them
ALPHA_NOISE_STREAM = 5  # np.random.default_rng([client seed, stream]) of dp.alpha_std
ALPHA = "::head_weights"  # wire key suffix: "<attention path>::head_weights" -> [n_heads]


@dataclass
class HeadPruningConfig(MethodOptions):
    sparsity: float = opt(0.9, "Head-pruning sparsity s: each client keeps the heads scoring "
                          "at least the s-quantile of its scores (Eq. 7).")
    scope: str = opt("global", "Quantile of Eq. 7 over all heads or within each layer.",
                     ("global", "layer"))
    mode: str = opt("adapter", "'adapter': pruned heads' PEFT slices frozen and not sent; "
                    "'structural': pruned heads removed from the local forward and backward; "
                    "'detached': pruned heads computed in the forward (exactly the full "
                    "model's, as in 'adapter') but without gradient, so the backward skips "
                    "their projections' input-gradient matmuls (LoRA only; the README "
                    "measures its accuracy cost).",
                    ("adapter", "structural", "detached"))
    head_params: str = opt("AB", "Which trainable coordinates are split by head (pruned, "
                           "sent and aggregated per head): 'AB' = q/k/v's output rows and o's "
                           "input columns (LoRA: B rows of q/k/v, A columns of o; full "
                           "fine-tuning: the weights' own); 'B' = the rows only (LoRA: the "
                           "paper's P = {B}, Sect. 3.1; o's A is then shared like q/k/v's A). "
                           "Same thing when nothing on o trains (LoRA on q and v, IA3).",
                           ("AB", "B"))
    top_layers: int = opt(0, "Only heads of the top K layers can be kept, and nothing below "
                          "them trains or is sent (their PEFT tensors stay frozen), so the "
                          "backward pass stops at the lowest of the K; the forward stays the "
                          "full model's. Eq. 7 ranks the K layers' heads and keeps as many "
                          "as over the whole model (at most all K layers' heads). 0 = every "
                          "layer. Mode 'adapter', LoRA, an encoder or a decoder.")
    share_cap: float = opt(1.0, "No client's share of any head's aggregation weight exceeds "
                           "this (water-filling over the head's owners each round, "
                           "core.robust.cap_shares; fewer than 1/cap owners weigh equally); "
                           "1 = off. Against importance-score poisoning.")

    def validate(self) -> None:
        self.require(0 <= self.sparsity < 1, "sparsity",
                     f"must be in [0, 1), got {self.sparsity}")
        self.require(0 < self.share_cap <= 1, "share_cap",
                     f"must be in (0, 1], got {self.share_cap}")
        self.require(self.top_layers >= 0, "top_layers",
                     f"must be >= 0 (0 = every layer), got {self.top_layers}")
        self.require(not (self.top_layers and self.mode != "adapter"), "top_layers",
                     f"needs mode 'adapter' (got {self.mode!r}): the layers below train "
                     f"nothing, the top ones train as in adapter mode")


def eq7_keep(scores: dict[str, torch.Tensor], sparsity: float, scope: str
             ) -> dict[str, torch.Tensor]:
    """Eq. 7: keep heads whose score is >= the s-quantile of the client's scores, over all
    heads (scope 'global') or within each attention module ('layer'). bool [n_heads] each."""
    if scope == "layer":
        return {p: a >= torch.quantile(a.double(), sparsity).to(a.dtype)
                for p, a in scores.items()}
    threshold = torch.quantile(torch.cat(list(scores.values())).double(), sparsity)
    return {p: a >= threshold.to(a.dtype) for p, a in scores.items()}


@contextmanager
def frozen_outside(every: dict[str, torch.nn.Parameter], trained: dict[str, torch.nn.Parameter]
                   ) -> Iterator[None]:
    """The parameters of ``every`` not in ``trained`` need no gradient while inside, so
    autograd records nothing below the lowest trained layer."""
    rest = [p for k, p in every.items() if k not in trained and p.requires_grad]
    for p in rest:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in rest:
            p.requires_grad_(True)


def kept_index(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices along ``dim`` of a mask (rows or columns of a matrix, or a vector's entries)
    that are kept."""
    other = [i for i in range(mask.dim()) if i != dim]
    return (mask.any(dim=other) if other else mask).nonzero().flatten()


class HeadPruning(Method):
    """Subclasses define ``scores`` (one per head) and ``unit_weight`` (the aggregation
    weight of a head's slices)."""

    importance = "before"  # when scores are computed; AoH makes it an option
    head_weights = True
    eps = 0.0  # of the head-mapped tensors' denominators (Eq. 8's epsilon for AoH)

    def __init__(self, cfg, fed) -> None:
        super().__init__(cfg, fed)
        self.units = head_units(fed.initial, self.structure, self.options.head_params,
                                prompt_chunks=cfg.peft.prompt_head_chunks,
                                prefix=cfg.peft.method == "prefix")
        self.key_dim = {s.key: s.dim for u in self.units for s in u.slices}
        # a head-mapped key's slice-weight shape: [out, 1] (rows) or [1, in] (columns)
        self.key_shape = {k: tuple(n if i == d else 1 for i, n in enumerate(fed.initial[k].shape))
                          for k, d in self.key_dim.items()}
        self.n_heads = {a.path: a.n_heads for a in self.structure.attention}
        self.mapped = {u.path for u in self.units}  # modules with trainable head slices
        self.frozen_layers, self.band, self.untrained = self._top_layers(fed)

    def _top_layers(self, fed) -> tuple[int, set[str], set[str]]:
        """`top_layers` K as (layers below the K, attention paths of the K, trainable keys
        below the K): everything below stays frozen, unsent and out of the backward."""
        k, stacks = self.options.top_layers, self.structure.layers
        if not k:
            return 0, set(self.n_heads), set()
        where = f"`method.{self.name}.top_layers` = {k}"
        if len(stacks) != 1:
            raise ConfigError(f"{where}: an encoder-decoder has no single stack of layers to "
                              "train the top of; use 0")
        (layers,) = stacks.values()
        if k > len(layers):
            raise ConfigError(f"{where}: the model has {len(layers)} layers")
        below = len(layers) - k
        band = {a.path for a in self.structure.attention if a.layer >= below}
        untrained = {key for key in fed.initial
                     if any(key.startswith(path + ".") for path in layers[:below])}
        return below, band, untrained

    def kept(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 7 over the heads that may train. Only modules with trainable head slices are
        ranked (prefix tuning on an encoder-decoder: the decoder's self-attention; prompt
        chunks: the first layer), the others keep nothing — so the sparsity is of the heads
        that train. With `top_layers`, heads below the band score -1 (below any score, all
        >= 0), so a global quantile keeps as many heads as without it, all in the band."""
        m = self.options
        ranked = {p: s if p in self.band else torch.full_like(s, -1.0)
                  for p, s in scores.items() if p in self.mapped}
        keep = eq7_keep(ranked, m.sparsity, m.scope)
        return {p: keep[p] & (p in self.band) if p in keep else torch.zeros_like(s, dtype=torch.bool)
                for p, s in scores.items()}

    def trained_params(self) -> dict[str, torch.nn.Parameter]:
        """The live parameters that train this round (all but those below `top_layers`)."""
        return {k: p for k, p in self.fed.params.items() if k not in self.untrained}

    def expected_keys(self, client_id: int) -> set[str]:
        """Every trainable tensor but the non-head-mapped ones below `top_layers` (never
        sent; the head-mapped ones arrive with no kept rows)."""
        return set(self.fed.initial) - (self.untrained - set(self.key_dim))

    # --- client side ---
    def scores(self, start: State, indices: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def local(self, start: State, client_id: int, seed: int) -> LocalResult:
        m, fed = self.options, self.fed
        indices = fed.client_indices[client_id]
        load_state(fed.params, start)
        t0 = time.perf_counter()
        scores = (self.noised(self.scores(start, indices, seed), seed)
                  if self.importance == "before" else None)
        score_s = time.perf_counter() - t0
        if m.mode == "structural":
            keep = structural_keep(self.structure, self.kept(scores))
            with structural_view(fed.model, self.structure, keep) as view:
                stats = local_train(fed.model, view.params, fed.train_rows, indices,
                                    fed.collate, self.spec, seed, count_flops=self.count_flops)
                local = view.scatter(start)
        elif scores is not None:  # adapter / detached mode: pruned slices frozen
            keep = self.kept(scores)
            params = self.trained_params()
            frozen = {k: ~v for k, v in unit_mask(self.units, keep, start).items()
                      if k in params}
            with (detached_heads(fed.model, self.structure, keep) if m.mode == "detached"
                  else frozen_outside(fed.params, params)):
                stats = local_train(fed.model, params, fed.train_rows, indices, fed.collate,
                                    self.spec, seed, frozen=frozen,
                                    count_flops=self.count_flops)
            local = snapshot(fed.params)
        else:  # importance after training: train everything (in the band), prune the upload
            params = self.trained_params()
            with frozen_outside(fed.params, params):
                stats = local_train(fed.model, params, fed.train_rows, indices, fed.collate,
                                    self.spec, seed, count_flops=self.count_flops)
            local = snapshot(fed.params)
            t0 = time.perf_counter()
            scores = self.noised(self.scores(local, indices, seed), seed)
            score_s = time.perf_counter() - t0
            keep = self.kept(scores)
        masks = unit_mask(self.units, keep, start)
        delta = {}
        for key, value in local.items():
            if key in self.untrained and key not in masks:
                continue  # below `top_layers`: never trained, never sent
            d = value - start[key]
            delta[key] = d * masks[key] if key in masks else d  # pruned slices send nothing
        alpha = {p + ALPHA: torch.where(keep[p], scores[p], 0.0).float() for p in scores}
        everything = [a.n_heads for a in self.structure.attention]
        ops = (self.ops([int(keep[a.path].sum()) for a in self.structure.attention], stats)
               if m.mode == "structural" else
               self.ops(everything, stats, detached_grad_heads(self.structure, keep))
               if m.mode == "detached" else
               self.ops(everything, stats, frozen_layers=self.frozen_layers))
        metrics = {"score_s": score_s, **ops,
                   "kept_heads": float(sum(int(k.sum()) for k in keep.values()))}
        return LocalResult(delta, stats.loss, len(indices), alpha, metrics)

    def noised(self, scores: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """The head scores plus N(0, dp.alpha_std^2) each, clamped to [0, 1] — before Eq. 7,
        so that the kept set is as noisy as the weights sent (identity when 0)."""
        std = self.cfg.dp.alpha_std
        if not std:
            return scores
        rng = np.random.default_rng([seed, ALPHA_NOISE_STREAM])
        return {p: (s.double() + torch.from_numpy(rng.normal(0.0, std, tuple(s.shape))))
                .clamp(0.0, 1.0).to(s.dtype) for p, s in scores.items()}

    @classmethod
    def check(cls, cfg) -> None:
        """A head map for what `peft.method` trains (DESIGN.md "Head map"), and the structural
        view only for LoRA."""
        super().check(cfg)
        pm, mode = cfg.peft.method, cfg.method.own.mode
        if pm == "prompt" and not cfg.peft.prompt_head_chunks:
            raise ConfigError(f"`method.name` = {cls.name!r} with `peft.method` = 'prompt': "
                              "prompt tuning has no head map to prune; set "
                              "`peft.prompt_head_chunks` = true for the AoH paper's d/H column "
                              "chunks, or choose another peft.method")
        if (mode != "adapter" and cfg.method.own.head_params == "B"
                and not (pm == "lora" and set(cfg.peft.target_modules) <= set("qkv"))):
            raise ConfigError(f"`method.{cls.name}.head_params` = 'B' with mode {mode!r}: that "
                              "mode slices pruned heads' o columns out of the trained tensors, "
                              "so o's LoRA A must be split by head ('AB'); 'B' works where "
                              "nothing on o trains (`peft.target_modules` within q, k, v)")
        if cfg.method.own.top_layers and pm != "lora":
            raise ConfigError(f"`method.{cls.name}.top_layers` with `peft.method` = {pm!r}: "
                              "implemented for LoRA only so far (prompts and prefixes sit "
                              "below every layer); use 0")
        if mode != "adapter" and pm != "lora":
            raise ConfigError(f"`method.{cls.name}.mode` = {mode!r} with `peft.method` = "
                              f"{pm!r}: mode {mode!r} is implemented for LoRA only so far; "
                              "use mode 'adapter'")

    @classmethod
    def scaffold_unsupported(cls, options) -> str | None:
        if options.mode == "structural":
            return (f"`method.{cls.name}.mode` = 'structural' trains each round's kept heads "
                    f"as smaller tensors, but SCAFFOLD's control variates need trainables of "
                    f"one fixed shape; use mode 'adapter'")
        if options.top_layers:
            return (f"`method.{cls.name}.top_layers` = {options.top_layers} sends nothing of "
                    f"the layers below, but SCAFFOLD's control variates cover every trainable "
                    f"tensor; use top_layers = 0")
        return super().scaffold_unsupported(options)

    def trained_mask(self, result: LocalResult) -> State:
        """The kept heads' slices (kept <=> head weight > 0)."""
        keep = {p[:-len(ALPHA)]: w > 0 for p, w in result.extra.items()}
        return unit_mask(self.units, keep, result.delta)

    def wire_tensors(self, result: LocalResult) -> State:
        """Non-head tensors whole; head-mapped tensors only their kept rows / columns (the
        server recovers which from the weights: kept <=> weight > 0); the head weights."""
        masks = self.trained_mask(result)
        out = {}
        for key, d in result.delta.items():
            dim = self.key_dim.get(key)
            out[key] = d if dim is None else d.index_select(dim, kept_index(masks[key], dim))
        return {**out, **result.extra}

    # --- server side ---
    def server_metrics(self, state: State) -> dict[str, float]:
        """``heads_trained``: the share of head units (one head's slices of the head-mapped
        tensors, `head_units`) whose global values have left their round-0 values — the heads
        some client has trained and the server aggregated (a unit no client keeps never moves).
        Derived from the state, so a resumed run logs the same."""
        initial = self.fed.initial
        moved = sum(any(not torch.equal(state[s.key].narrow(s.dim, s.start, s.stop - s.start),
                                        initial[s.key].narrow(s.dim, s.start, s.stop - s.start))
                        for s in unit.slices) for unit in self.units)
        return {"heads_trained": moved / len(self.units)}

    def from_wire(self, update: ClientUpdate) -> ClientUpdate:
        """Kept slices -> full-shaped deltas (zeros elsewhere); head weights -> per-row /
        per-column weights of the head-mapped tensors."""
        cid, tensors = update.client_id, dict(update.delta)
        alpha = {}
        for path, n in self.n_heads.items():
            w = tensors.pop(path + ALPHA, None)
            if w is None or w.shape != (n,) or w.dtype != torch.float32:
                raise InvalidUpdate(f"client {cid}: head weights of {path!r} missing or not "
                                    f"float32 [{n}]")
            alpha[path] = w
        if not all(torch.isfinite(w).all() and (w >= 0).all() and (w <= ALPHA_MAX).all()
                   for w in alpha.values()):
            raise InvalidUpdate(f"client {cid}: head weights must be finite and in [0, 1] "
                                f"(Eq. 6 confidences; B2's random scores)")
        reference = self.fed.initial
        masks = unit_mask(self.units, {p: w > 0 for p, w in alpha.items()}, reference)
        for key, dim in self.key_dim.items():
            if key not in tensors:
                raise InvalidUpdate(f"client {cid}: head-mapped tensor {key!r} missing")
            idx = kept_index(masks[key], dim)
            compact, shape = tensors[key], reference[key].shape
            want = tuple(len(idx) if i == dim else n for i, n in enumerate(shape))
            if tuple(compact.shape) != want:
                raise InvalidUpdate(f"client {cid}: {key!r} has shape {tuple(compact.shape)}, "
                                    f"expected {want} for its kept heads")
            tensors[key] = torch.zeros(shape, dtype=compact.dtype).index_copy_(dim, idx, compact)
        update.delta = tensors
        update.weights = self.slice_weights(alpha, update.num_examples)
        return update

    def unit_weight(self, alpha: float, num_examples: int) -> float:
        """Aggregation weight of a kept unit's slices from its head weight (> 0); a pruned
        unit (weight 0) always weighs 0."""
        raise NotImplementedError

    def slice_weights(self, alpha: dict[str, torch.Tensor], num_examples: int
                      ) -> dict[str, Weight]:
        """Per head-mapped tensor, a float64 weight vector along its head dim (shape [out, 1]
        for rows, [1, in] for columns): each unit's weight on its slices. A unit's head weight
        is the max over the query heads it serves (a KV unit under GQA: its group's max,
        DESIGN "Head map")."""
        shapes = self.fed.initial
        out: dict[str, Weight] = {}
        for unit in self.units:
            a = float(alpha[unit.path][list(unit.query_heads)].max())
            w = self.unit_weight(a, num_examples) if a > 0 else 0.0
            for s in unit.slices:
                if s.key not in out:
                    shape = [1] * shapes[s.key].dim()
                    shape[s.dim] = shapes[s.key].shape[s.dim]
                    out[s.key] = torch.zeros(shape, dtype=torch.float64)
                out[s.key].narrow(s.dim, s.start, s.stop - s.start).fill_(w)
        return out

    def aggregate(self, state: State, updates: list[ClientUpdate], server_lr: float) -> State:
        if self.options.share_cap < 1:
            updates = self.capped(updates)
        return owned_mean(state, updates, server_lr, eps={k: self.eps for k in self.key_dim},
                          combine=self.combine)

    def capped(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """The updates with every head-mapped tensor's slice weights lowered so that no
        client holds more than ``share_cap`` of any head's total weight this round."""
        ordered = sorted(updates, key=lambda u: u.client_id)
        weights = {k: cap_shares(torch.stack([torch.as_tensor(u.weight(k), dtype=torch.float64)
                                              .expand(self.key_shape[k]) for u in ordered]),
                                 self.options.share_cap) for k in self.key_dim}
        return [replace(u, weights={**u.weights, **{k: w[i] for k, w in weights.items()}})
                for i, u in enumerate(ordered)]
