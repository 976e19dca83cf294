"""PruFed (Bhansali, Jin, Lizzo, Heck: *PruFed: Federated Finetuning of Pruned LLMs*, poster;
DESIGN.md "Method C"): federated LoRA instruction tuning of layer-dropped models.

Clients belong to device tiers. Tier t keeps k_t = keep_count(L, r_t) of the L decoder layers,
chosen by a layer-dropping strategy (`core.layerdrop`: top, bottom, symmetric, alternate,
top-alternate, an explicit list, or the data-driven angular distance of Gromov et al. 2024 /
ShortGPT's Block Influence, computed once on calibration text). A client trains LoRA on a
temporary view of the **one** backbone over its kept layers (`structure.layers.layer_view`:
renumbered layers, restored exactly), loss on the response tokens only. It receives and sends
only the adapters of its kept layers (plus non-layer trainables), keyed by its local names;
the server renames them to global layers (`ClientUpdate.keymap`) and `owned_mean` is HeteAgg
(the poster's algorithm box; InclusiveFL's `HeteAgg`, FedRA, DepthFL): every adapter is the
|D_c|-weighted mean over the selected clients whose model holds its layer; a layer no
selected client holds keeps its value.

Variants (`method.prufed.aggregation`, `share_top`, `pool_clients`): "exclusive" federates
each tier only within itself (the "each tier alone" baseline: one adapter set per tier in the
global state, keys ``tier{t}::<global key>``); "heteagg_product" averages each LoRA module's
products B_c A_c over the same holders and refactors the mean to rank r by truncated SVD
(FlexLoRA-style, `core.lora`; the global state stays A / B); ``share_top = false`` keeps a
sub-model's top kept layer private to its tier (InclusiveFL: the small models' top layer is
not shared); ``pool_clients = N`` is the centralized reference: one client holding the N
clients' samples.

No official code exists; the readings are ours (DESIGN.md "Method C").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import numpy as np
import torch

from fedprune.client.train import length_batches, load_state, local_train, snapshot
from fedprune.client.world import GenerationWorld, cache_dir, set_threads
from fedprune.config import ConfigError, MethodOptions, opt
from fedprune.core.aggregate import owned_mean
from fedprune.core.layerdrop import (
    STRATEGIES,
    LayerSimilarity,
    angular_distance_block,
    block_influence_drop,
    explicit,
    keep_count,
    plan_layers,
)
from fedprune.core.lora import product_mean
from fedprune.core.update import ClientUpdate, InvalidUpdate, State
from fedprune.data.tasks import (
    bbc_category_rows,
    bbc_headline_rows,
    collator,
    generation_metrics,
    tokenize_instruction,
)
from fedprune.data.texts import calibration_blocks
from fedprune.methods.base import LocalResult, Method
from fedprune.structure.attention import describe
from fedprune.structure.compute import attn_implementation, prepare_compute, resolve_dtype
from fedprune.structure.layers import LayerView, decoder_layers, layer_io, layer_view
from fedprune.structure.model import (
    apply_lora,
    load_backbone,
    load_tokenizer,
    resolve,
    trainable_parameters,
)

EXPLICIT = "explicit"
PRIVATE = "tier{}::{}"  # global-state key of a tier-private tensor (exclusive, share_top=false)
ROWS = {"bbc_headline": bbc_headline_rows, "bbc_category": bbc_category_rows}


# --- DATA-DRIVEN STRATEGIES: (which tokens feed LayerSimilarity, the plan from it) -----------

@dataclass(frozen=True)
class DataDriven:
    last_token: bool  # Gromov et al. compare the last token of each sequence; ShortGPT all
    plan: Callable[[LayerSimilarity, float], list[int]]


DATA_DRIVEN = {
    "angular": DataDriven(True, lambda s, r: angular_distance_block(s.angular_distance, r)),
    "block_influence": DataDriven(False, lambda s, r: block_influence_drop(s.block_influence, r)),
}
ALL_STRATEGIES = (*STRATEGIES, EXPLICIT, *DATA_DRIVEN)


@dataclass
class PruFedConfig(MethodOptions):
    _name = "method.prufed"
    task: str = opt("bbc_headline", "Instruction task: 'bbc_headline' (article -> headline, "
                    "scored by ROUGE) or 'bbc_category' (article -> category word, exact "
                    "match).", ("bbc_headline", "bbc_category"))
    tier_keep: list[float] = opt([1.0, 0.5], "Keep ratio r of each device tier, in (0, 1]: "
                                 "the tier keeps round(r·L) decoder layers (half up, >= 1). "
                                 "An explicit tier's ratio must give its list's length.")
    tier_strategy: list[str] = opt(["top", "top-alternate"], "Layer-dropping strategy of "
                                   "each tier: " + ", ".join(STRATEGIES) + " (core.layerdrop: "
                                   "'top' drops the top layers, 'alternate' keeps evenly "
                                   "spaced layers incl. the first and last, 'top-alternate' "
                                   "drops L-1, L-3, ... then keeps dropping from the top), "
                                   "'explicit' (tier_layers), or data-driven 'angular' "
                                   "(Gromov et al.: drop the block of L-k layers whose input "
                                   "and output are closest, last tokens) / 'block_influence' "
                                   "(ShortGPT: drop the L-k lowest 1 - cos layers), computed "
                                   "once on the calibration text.")
    tier_layers: list[list[int]] = opt([], "Kept global layers of each 'explicit' tier: empty, "
                                       "or one list per tier ([] for the tiers that are not "
                                       "explicit).")
    tier_share: list[float] = opt([0.5, 0.5], "Share of the clients in each tier, >= 0, "
                                  "summing to 1: client c is in the tier whose cumulative "
                                  "share interval holds c / num_clients.")
    aggregation: str = opt("heteagg", "'heteagg' (default): every layer's adapters, A and B "
                           "each, averaged over the selected clients holding that layer (PruFed "
                           "HeteAgg, as InclusiveFL / FedRA: the poster's rule, and what the "
                           "clients' optimisers continue from); 'heteagg_product': per LoRA "
                           "module the |D_c|-weighted mean of the clients' products B_c A_c over "
                           "the same holders, refactored to rank r by truncated SVD (FlexLoRA, "
                           "arXiv 2402.11505; core/lora.py: the exact mean update where "
                           "mean(B)·mean(A) is not, but it re-bases A and B every round and "
                           "costs one SVD per module); 'exclusive': each tier federated only "
                           "within itself, one adapter set per tier (baseline; its full-depth "
                           "model takes each layer from the deepest tier holding it).",
                           ("heteagg", "heteagg_product", "exclusive"))
    share_top: bool = opt(True, "false: a sub-model's top kept layer stays private to its tier "
                          "(InclusiveFL); the full-depth model uses the shared copy.")
    samples: int = opt(16, "Training examples per client (IID, disjoint).")
    max_length: int = opt(256, "Tokens per training / evaluation example (the article is cut "
                          "first) and per calibration block.")
    eval_samples: int = opt(32, "Held-out validation examples for response perplexity.")
    generate_samples: int = opt(8, "Of those, the prompts answered greedily for ROUGE / exact "
                                "match (0 = no generation metrics).")
    max_new_tokens: int = opt(16, "Tokens generated per validation prompt.")
    batch_size: int = opt(8, "Examples per forward pass in evaluation, generation and "
                          "calibration (training: federation.batch_size).")
    calibration: str = opt("books", "Text of the data-driven strategies: 'books' (the bundled "
                           "Austen calibration parts), 'bbc', or a text file path "
                           "(data.texts.calibration_blocks).")
    calibration_samples: int = opt(8, "Calibration blocks of max_length tokens.")
    pool_clients: int = opt(0, "0: every client holds its own samples. N > 0: the centralized "
                            "reference of an N-client federation: its one client "
                            "(federation.num_clients = 1, one tier) holds the N clients' "
                            "samples, the same rows, and the same validation rows.")

    def validate(self) -> None:
        check = self.require
        n = len(self.tier_keep)
        check(n >= 1, "tier_keep", "needs at least one tier")
        for key in ("tier_strategy", "tier_share"):
            check(len(getattr(self, key)) == n, key, f"has {len(getattr(self, key))} "
                  f"entries; method.prufed.tier_keep has {n} (one per tier)")
        check(self.tier_layers == [] or len(self.tier_layers) == n, "tier_layers",
              f"must be empty or have one list per tier ({n}), got {len(self.tier_layers)}")
        for t, r in enumerate(self.tier_keep):
            check(0 < r <= 1, "tier_keep", f"keep ratio of tier {t} must be in (0, 1], got {r}")
        for t, s in enumerate(self.tier_strategy):
            check(s in ALL_STRATEGIES, "tier_strategy", f"tier {t}: unknown strategy {s!r}; "
                  f"choose one of {', '.join(map(repr, ALL_STRATEGIES))}")
            layers = self.tier_layers[t] if self.tier_layers else []
            if s == EXPLICIT:
                check(len(layers) > 0, "tier_layers", f"tier {t} is 'explicit': give its "
                      f"kept layers as tier_layers[{t}]")
                check(len(set(layers)) == len(layers), "tier_layers",
                      f"tier {t}: duplicate layers in {layers}")
                check(min(layers) >= 0, "tier_layers", f"tier {t}: layers must be >= 0, got "
                      f"{layers}")
            else:
                check(not layers, "tier_layers", f"tier {t} uses {s!r}, not 'explicit'; "
                      f"tier_layers[{t}] must be []")
        for t, s in enumerate(self.tier_share):
            check(s >= 0, "tier_share", f"share of tier {t} must be >= 0, got {s}")
        total = sum(self.tier_share)
        check(math.isclose(total, 1.0, abs_tol=1e-9), "tier_share",
              f"shares must sum to 1, got {self.tier_share} (sum {total:g})")
        check(self.pool_clients >= 0, "pool_clients", f"must be >= 0, got {self.pool_clients}")
        for key in ("samples", "eval_samples", "max_new_tokens", "batch_size",
                    "calibration_samples"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.max_length >= 16, "max_length", f"must be >= 16, got {self.max_length}")
        check(0 <= self.generate_samples <= self.eval_samples, "generate_samples",
              f"must be in [0, eval_samples={self.eval_samples}], got {self.generate_samples}")


def assign_tiers(shares: list[float], num_clients: int) -> list[int]:
    """Client c -> the tier t with S_{t-1} <= c / C < S_t (S_t: cumulative shares, exact on
    their decimal values, the last one set to 1)."""
    bounds = np.cumsum([Fraction(repr(float(s))) for s in shares]).tolist()
    bounds[-1] = Fraction(1)
    return [next(t for t, b in enumerate(bounds) if Fraction(c, num_clients) < b)
            for c in range(num_clients)]


def instruction_pairs(o: PruFedConfig, num_clients: int, seed: int
                      ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, validation) (prompt, response) pairs: a seeded permutation of the task's rows,
    the first eval_samples held out, the next num_clients * samples dealt in order."""
    ds = ROWS[o.task]()
    need = o.eval_samples + num_clients * o.samples
    if need > len(ds):
        raise ConfigError(f"`method.prufed.samples`: {num_clients} clients x {o.samples} + "
                          f"{o.eval_samples} eval_samples = {need} rows; task {o.task!r} "
                          f"has {len(ds)}")
    order = np.random.default_rng(seed).permutation(len(ds))[:need].tolist()
    rows = ds.select(order)
    pairs = list(zip(rows["prompt"], rows["response"], strict=True))
    return pairs[o.eval_samples:], pairs[:o.eval_samples]


class PruFed(Method):
    """Tiers train LoRA on layer-dropped views of the one backbone; HeteAgg per global layer.

    The global state holds one tensor per trainable adapter, keyed by global layer (shared),
    plus ``tier{t}::<key>`` copies of what a tier keeps private (exclusive mode: everything;
    share_top = false: a sub-model's top kept layer)."""

    name = "prufed"
    Config = PruFedConfig
    task = "causal_lm"
    gpu: ClassVar[bool] = False  # its tier views and world run on the CPU (run.device)
    peft_methods: ClassVar[tuple[str, ...]] = ("lora",)  # HeteAgg renames LoRA per layer
    metrics: ClassVar[dict[str, bool]] = {"perplexity": False, "eval_loss": False,
                                          "rougeL": True, "exact_match": True}
    target = "perplexity"

    @classmethod
    def world(cls, cfg) -> GenerationWorld:
        """The one causal LM with LoRA, the task's instruction rows (tokenized once, loss on
        the response) dealt IID, `samples` per client, and held-out validation rows."""
        o: PruFedConfig = cfg.method.own
        if cfg.partition.scheme != "iid":
            raise ConfigError(f"`partition.scheme` = {cfg.partition.scheme!r}: PruFed deals "
                              f"method.prufed.samples rows per client IID; use 'iid'")
        set_threads(cfg)
        cache = cache_dir(cfg)
        tokenizer = load_tokenizer(resolve(cfg.model.name, cache))
        model = load_backbone(cfg.model.name, task="causal_lm", num_labels=0,
                              attn_implementation=attn_implementation(
                                  cfg.model.attn_implementation),
                              seed=cfg.run.seed, cache_dir=cache)
        layers = describe(model).layers
        if "decoder" not in layers or "encoder" in layers:
            raise ConfigError(f"`model.name` = {cfg.model.name!r}: PruFed drops the decoder "
                              f"layers of a decoder-only model; this model has "
                              f"{sorted(layers)} layers")
        pc = cfg.peft
        model = apply_lora(model, task="causal_lm", r=pc.r, alpha=pc.alpha, dropout=pc.dropout,
                           target_modules=pc.target_modules, seed=cfg.run.seed)
        dtype = resolve_dtype(cfg.model.compute_dtype)
        prepare_compute(model, dtype, cfg.model.attn_implementation)
        model.eval()
        params = trainable_parameters(model)
        initial = {k: v.detach().clone() for k, v in params.items()}
        c = cfg.federation.num_clients
        if o.pool_clients and c != 1:
            raise ConfigError(f"`method.prufed.pool_clients` = {o.pool_clients} pools every "
                              f"client's samples into one: federation.num_clients must be 1, "
                              f"got {c}")
        train, val = instruction_pairs(o, o.pool_clients or c, cfg.run.seed)
        encode = [tokenize_instruction(tokenizer, p, r, o.max_length) for p, r in train + val]
        per = len(train) // c  # pooled: the one client holds all N * samples rows
        indices = [np.arange(i * per, (i + 1) * per) for i in range(c)]
        shown = val[:o.generate_samples]
        return GenerationWorld(model, params, initial, encode[:len(train)], encode[len(train):],
                               indices, [], collator(tokenizer), set(), set(), dtype, tokenizer,
                               o.task, [p for p, _ in shown], [r for _, r in shown])

    def __init__(self, cfg, fed: GenerationWorld) -> None:
        super().__init__(cfg, fed)
        o = self.options
        path, layers = decoder_layers(fed.model)
        self.num_layers = len(layers)
        self._similarity: dict[bool, LayerSimilarity] = {}
        self.kept = [self.tier_plan(t) for t in range(len(o.tier_keep))]
        self.tier_of = assign_tiers(o.tier_share, cfg.federation.num_clients)
        empty = sorted(set(range(len(self.kept))) - set(self.tier_of))
        if empty:
            raise ConfigError(f"`method.prufed.tier_share`: tier {empty[0]} gets none of the "
                              f"federation.num_clients={cfg.federation.num_clients} clients")
        server_opt = cfg.federation.server_optimizer
        if o.aggregation == "heteagg_product" and server_opt != "fedavg":
            raise ConfigError(f"`method.prufed.aggregation` = 'heteagg_product' re-bases A and "
                              f"B by an SVD every round, so their per-tensor differences are no "
                              f"pseudo-gradient for federation.server_optimizer = "
                              f"{server_opt!r}; use 'fedavg' (server_lr still applies, to the "
                              f"products)")
        self.views = [LayerView(kept, path) for kept in self.kept]
        # tier -> {local key inside its view -> global key}
        self.local_keys = [view.to_local({key: key for key in fed.params}) for view in self.views]
        self.state_keys = [{local: self.state_key(t, key) for local, key in keys.items()}
                           for t, keys in enumerate(self.local_keys)]
        order = sorted(range(len(self.kept)), key=lambda t: (-len(self.kept[t]), t))
        self.depth_order = order  # exclusive full-depth model: the deepest tier first
        # heteagg_product: the row length of each A at initialisation (LoRA's kaiming init,
        # ~ 1/sqrt(3)), kept as the floor of the refactored A rows (core.lora.refactor)
        self.a_norm = {self.state_key(t, key): float(fed.initial[key].norm(dim=1).mean())
                       for t, keys in enumerate(self.local_keys) for key in keys.values()
                       if ".lora_A." in key}
        self.val_batches = self._batches(fed.val_rows)

    # --- tiers -------------------------------------------------------------------------
    def tier_plan(self, t: int) -> tuple[int, ...]:
        """Kept global layers of tier t (ascending)."""
        o, n = self.options, self.num_layers
        r, strategy = o.tier_keep[t], o.tier_strategy[t]
        if strategy == EXPLICIT:
            try:
                kept = explicit(o.tier_layers[t], n)
            except ValueError as e:
                raise ConfigError(f"`method.prufed.tier_layers`: tier {t}: {e}") from None
            if keep_count(n, r) != len(kept):
                raise ConfigError(f"`method.prufed.tier_keep`: tier {t} keeps {len(kept)} of "
                                  f"{n} layers explicitly, but keep ratio {r} keeps "
                                  f"{keep_count(n, r)}; set it to {len(kept)}/{n} = "
                                  f"{len(kept) / n:g}")
            return tuple(kept)
        if strategy in DATA_DRIVEN:
            rule = DATA_DRIVEN[strategy]
            return tuple(rule.plan(self.similarity(rule.last_token), r))
        return tuple(plan_layers(strategy, n, r))

    def similarity(self, last_token: bool) -> LayerSimilarity:
        """LayerSimilarity of the initial model's hidden states h_0..h_L on the calibration
        blocks (all tokens, or each block's last), computed once."""
        if last_token not in self._similarity:
            fed, o = self.fed, self.options
            blocks = calibration_blocks(fed.tokenizer, o.calibration, 1, o.calibration_samples,
                                        o.max_length, self.cfg.run.seed)[0]  # [n, T]
            saved = snapshot(fed.params)
            load_state(fed.params, fed.initial)
            try:
                with torch.autocast("cpu", dtype=fed.compute_dtype,
                                    enabled=fed.compute_dtype != torch.float32):
                    hidden = layer_io(fed.model, [{"input_ids": blocks[s:s + o.batch_size]}
                                                  for s in range(0, len(blocks), o.batch_size)],
                                      max_tokens=blocks.numel())
            finally:
                load_state(fed.params, saved)
            n, length = blocks.shape
            sim = LayerSimilarity()
            # no padding: h is [n * T, d] in row order; the last token of block i is i*T + T-1
            sim.add_batch([h.view(n, length, -1)[:, -1] if last_token else h for h in hidden])
            self._similarity[last_token] = sim
        return self._similarity[last_token]

    def state_key(self, tier: int, key: str) -> str:
        """Where tier ``tier``'s copy of the global adapter ``key`` lives in the global state."""
        if self.options.aggregation == "exclusive":
            return PRIVATE.format(tier, key)
        kept = self.kept[tier]
        top = f"{self.views[tier].path}.{kept[-1]}."
        if not self.options.share_top and len(kept) < self.num_layers and key.startswith(top):
            return PRIVATE.format(tier, key)
        return key

    def _batches(self, rows: list[dict]) -> list[dict[str, torch.Tensor]]:
        return list(length_batches(rows, self.fed.collate, self.options.batch_size))

    @classmethod
    def attack_unsupported(cls, kind: str) -> str | None:
        if kind in ("alie", "ipm"):
            return ("the tiers send different layers, so there is no common honest mean to "
                    "collude around")
        return super().attack_unsupported(kind)

    @classmethod
    def scaffold_unsupported(cls, options) -> str | None:
        if options.aggregation == "heteagg_product":
            return ("`method.prufed.aggregation` = 'heteagg_product' re-bases every client's "
                    "LoRA factors by an SVD each round, so a control variate on them would "
                    "refer to a different basis every round; use 'heteagg' or 'exclusive'")
        return super().scaffold_unsupported(options)

    # --- server -> client ---
    def initial_state(self) -> State:
        """Shared adapters (heteagg) and every tier-private copy, at their initial values."""
        state = {} if self.options.aggregation == "exclusive" else dict(self.fed.initial)
        for t, keys in enumerate(self.local_keys):
            for local, key in keys.items():
                state.setdefault(self.state_keys[t][local], self.fed.initial[key].clone())
        return state

    def downlink(self, state: State, client_id: int, rnd: int) -> State:
        """Only the client's tier's adapters, keyed by its local (view) names."""
        return {local: state[key] for local, key in self.state_keys[self.tier_of[client_id]]
                .items()}

    # --- client side ---
    def local(self, start: State, client_id: int, seed: int) -> LocalResult:
        """LoRA instruction tuning inside the tier's layer view; the shared model's
        trainables and train/eval mode are restored afterwards."""
        fed = self.fed
        tier = self.tier_of[client_id]
        keys = self.local_keys[tier]
        if set(start) != set(keys):
            raise ValueError(f"client {client_id}: downlink holds {len(start)} tensors, tier "
                             f"{tier} needs its {len(keys)} adapters")
        params = {local: fed.params[key] for local, key in keys.items()}  # same Parameters
        saved, was_training = snapshot(params), fed.model.training
        indices = fed.client_indices[client_id]
        try:
            with layer_view(fed.model, self.kept[tier]):
                inside = trainable_parameters(fed.model)
                assert inside.keys() == params.keys() and all(
                    inside[k] is p for k, p in params.items()), "view parameter names"
                load_state(params, start)
                stats = local_train(fed.model, params, fed.train_rows, indices, fed.collate,
                                    self.spec, seed, count_flops=self.count_flops)
                trained = snapshot(params)
        finally:
            load_state(params, saved)
            fed.model.train(was_training)
        heads = [self.structure.attention[0].n_heads] * len(self.kept[tier])  # the view's
        metrics = {**self.ops(heads, stats), "tier": float(tier),
                   "layers": float(len(self.kept[tier]))}
        return LocalResult({k: trained[k] - start[k] for k in trained}, stats.loss,
                           len(indices), metrics=metrics)

    # --- server side ---
    def from_wire(self, update: ClientUpdate) -> ClientUpdate:
        """Local adapter names -> global-state keys (HeteAgg's renaming: the view's layer i
        is global layer kept[i]); anything else than the tier's adapters is rejected."""
        cid = update.client_id
        if not 0 <= cid < len(self.tier_of):
            raise InvalidUpdate(f"client {cid}: not a client of this federation")
        tier = self.tier_of[cid]
        expected = self.state_keys[tier]
        if set(update.delta) != set(expected):
            extra = sorted(set(update.delta) - set(expected))[:2]
            raise InvalidUpdate(f"client {cid}: sent {len(update.delta)} tensors ({extra} not "
                                f"expected), tier {tier} holds the {len(expected)} adapters "
                                f"of layers {list(self.kept[tier])}")
        update.keymap = dict(expected)
        return update

    def expected_keys(self, client_id: int) -> set[str]:
        """The adapters of the client's tier, by their local names."""
        return set(self.local_keys[self.tier_of[client_id]])

    def aggregate(self, state: State, updates: list[ClientUpdate], server_lr: float) -> State:
        """HeteAgg: per key, the |D_c|-weighted mean over the updates holding it (renamed by
        their keymaps); keys nobody sent keep their value. heteagg_product: per LoRA module
        the same mean of the products B_c A_c, refactored to rank r (core.lora)."""
        if self.options.aggregation == "heteagg_product":
            return product_mean(state, updates, server_lr, self.a_norm, self.combine)
        return owned_mean(state, updates, server_lr, combine=self.combine)

    def evaluate(self, state: State) -> dict[str, float]:
        """Per tier (its adapters on its kept layers) and for the full-depth model: response
        perplexity on the validation rows and the task's generation scores (ROUGE / exact
        match) on the first generate_samples prompts. Unsuffixed names are the full model's;
        eval_loss = log(its perplexity). Identical models are scored once."""
        full = (tuple(range(self.num_layers)), self.full_values(state))
        out, seen = {}, {}
        for tier, kept in enumerate(self.kept):
            scores = self._cached(seen, kept, self.tier_values(state, tier))
            out.update({f"{k}_tier{tier}": v for k, v in scores.items()})
        scores = self._cached(seen, *full)
        out.update(scores, eval_loss=math.log(scores["perplexity"]))
        return out

    def tier_values(self, state: State, tier: int) -> State:
        """Tier ``tier``'s adapters in ``state`` (its shared or private copies), by global
        key."""
        return {key: state[self.state_keys[tier][local]]
                for local, key in self.local_keys[tier].items()}

    def full_values(self, state: State) -> State:
        """The full-depth model's adapters by global key: the shared ones (heteagg,
        heteagg_product); in exclusive mode each from the deepest tier holding it, else its
        initial value."""
        if self.options.aggregation != "exclusive":
            return {key: state[key] for key in self.fed.params}
        values = {}
        for t in reversed(self.depth_order):  # deeper tiers overwrite
            values.update({key: state[self.state_keys[t][local]]
                           for local, key in self.local_keys[t].items()})
        return {key: values.get(key, self.fed.initial[key]) for key in self.fed.params}

    def _cached(self, seen: dict, kept: tuple[int, ...], values: State) -> dict[str, float]:
        ident = (kept, tuple(sorted((k, id(v)) for k, v in values.items())))
        if ident not in seen:
            seen[ident] = self.score(kept, values)
        return seen[ident]

    def score(self, kept: tuple[int, ...], values: State) -> dict[str, float]:
        """Metrics of the model made of layers ``kept`` with adapters ``values`` (global
        keys); the shared model's trainables are restored afterwards."""
        fed, o = self.fed, self.options
        saved = snapshot(fed.params)
        try:
            load_state(fed.params, values)
            with layer_view(fed.model, kept):
                return generation_metrics(fed.model, fed.tokenizer, self.val_batches,
                                          fed.prompts, fed.references, fed.task,
                                          max_new_tokens=o.max_new_tokens,
                                          batch_size=o.batch_size, max_prompt_length=o.max_length)
        finally:
            load_state(fed.params, saved)
