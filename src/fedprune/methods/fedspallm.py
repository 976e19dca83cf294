"""FedSpaLLM (Bai et al., arXiv 2410.14852): federated pruning of an LLM.

Each round the server samples k_i = floor(2L r_i / sum_j r_j) + 1 of the L decoder layers for
client i (resource score r_i), uniformly without replacement. The client prunes only those
layers of the received model on its private calibration text with a one-shot pruner
(SparseGPT, Wanda or magnitude: `client.pruners`, the usual sequential pass) and sends their
pruned Linear weights, sparse-encoded. The server takes, per weight, the l0-norm mean over
the clients that sampled its layer (W[j] = sum_i M_i[j] W_i[j] / sum_i M_i[j], 0 where all
of them pruned j: `owned_mean` with element masks and empty="zero"), then expands the mask
to the exact target sparsity (`core.sparsity.expand_mask`; for N:M patterns `expand_nm`
restores N zeros in every group of M by the same votes-then-magnitude rule, our reading:
the paper expands unstructured masks only). Layers no client
sampled keep their value. R = 1 is the paper's one-shot setting; R > 1 re-prunes the global
model. Baselines in the same runner: `aggregation = "fedavg"` (naive mean of the pruned
weights: lower real sparsity) and "fedavg_reprune" (that mean, then magnitude re-pruning to s).

No official code exists; DESIGN.md "Method B" says how we read the paper. The public
reproduction also averages and expands LayerNorm tensors: we touch only decoder Linears.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedprune.client.pruners import PRUNERS, prune_layers
from fedprune.client.world import Federation, cache_dir, set_threads
from fedprune.config import ConfigError, MethodOptions, opt
from fedprune.core.aggregate import owned_mean
from fedprune.core.sparsity import (
    cover_layers,
    expand_mask,
    expand_nm,
    layer_budget,
    sample_layers,
)
from fedprune.core.update import ClientUpdate, InvalidUpdate, State
from fedprune.data.tasks import response_perplexity
from fedprune.data.texts import calibration_blocks, test_blocks
from fedprune.methods.base import LocalResult, Method
from fedprune.structure.attention import describe
from fedprune.structure.layers import layer_linears
from fedprune.structure.model import load_backbone, load_tokenizer, resolve

LAYERS = "::layers"    # downlink key: int64 [k] the layers the client prunes this round
VALUES = "::values"    # wire suffix: the kept weights of a matrix, float32 [kept]
MASK = "::mask"        # wire suffix: its keep mask, np.packbits of the flat bool [numel]


@dataclass
class FedSpaLLMConfig(MethodOptions):
    _name = "method.fedspallm"
    pruner: str = opt("sparsegpt", "Local one-shot pruner.", tuple(PRUNERS))
    sparsity: float = opt(0.5, "Target sparsity s of every pruned weight matrix, in (0, 1).")
    pattern: str = opt("unstructured", "'unstructured', or 'N:M' (e.g. '2:4': N of every M "
                       "consecutive input weights pruned; needs sparsity = N/M).")
    aggregation: str = opt("l0", "'l0': per-weight mean over the clients that kept it, 0 "
                           "where all pruned it (FedSpaLLM); 'fedavg': plain mean of the "
                           "pruned weights (baseline, lower real sparsity); 'fedavg_reprune': "
                           "that mean, then magnitude pruning back to s (baseline).",
                           ("l0", "fedavg", "fedavg_reprune"))
    expand: bool = opt(True, "Adaptive mask expansion after the l0 mean: exactly ceil(s·d) "
                       "zeros per matrix, most-pruned weights first, ties by smaller |W|; "
                       "for N:M, the same rule inside every group of M so that the global "
                       "model is N:M-sparse again (false: the l0 mean as is).")
    resource_scores: list[float] = opt([], "Resource score r_i > 0 of every client (length "
                                       "federation.num_clients); empty = resource_spread.")
    resource_spread: float = opt(0.0, "Without resource_scores: r_c = 1 + spread·(2c/(C-1) "
                                 "- 1), evenly from 1 - spread to 1 + spread; in [0, 1).")
    cover: bool = opt(False, "Deal the layers so that the round's clients cover every layer "
                      "(needs sum k_i >= L); otherwise each client samples independently.")
    calibration: str = opt("books", "Each client's calibration text: 'books' (the bundled "
                           "Austen books' calibration parts, IID), 'book' (one book per "
                           "client), 'bbc' (BBC News, one category per client), or a text "
                           "file path (IID).")
    samples: int = opt(16, "Calibration sequences per client.")
    pool_clients: int = opt(0, "0: every client calibrates on its own text. N > 0: the "
                            "centralized reference of an N-client federation — its one "
                            "client (federation.num_clients = 1) holds all N clients' "
                            "calibration sequences.")
    seq_len: int = opt(128, "Tokens per calibration and evaluation sequence.")
    eval_samples: int = opt(16, "Held-out sequences for perplexity (the books' test parts, "
                            "never used for calibration).")
    batch_size: int = opt(8, "Sequences per forward pass (pruning and evaluation).")

    def validate(self) -> None:
        check = self.require
        check(0 < self.sparsity < 1, "sparsity", f"must be in (0, 1), got {self.sparsity}")
        n, m = self.nm
        if m:
            check(0 < n < m, "pattern", f"N:M needs 0 < N < M, got {self.pattern!r}")
            check(math.isclose(self.sparsity, n / m), "sparsity",
                  f"pattern {self.pattern!r} prunes {n}/{m} = {n / m:g} of the weights; "
                  f"set sparsity = {n / m:g} (got {self.sparsity})")
        for i, r in enumerate(self.resource_scores):
            check(math.isfinite(r) and r > 0, "resource_scores",
                  f"resource score of client {i} must be > 0 and finite, got {r}")
        check(0 <= self.resource_spread < 1, "resource_spread",
              f"must be in [0, 1), got {self.resource_spread}")
        check(self.pool_clients >= 0, "pool_clients", f"must be >= 0, got {self.pool_clients}")
        for key in ("samples", "seq_len", "eval_samples", "batch_size"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")

    @property
    def nm(self) -> tuple[int, int]:
        """(N, M) of an N:M pattern, (0, 0) when unstructured."""
        if self.pattern == "unstructured":
            return 0, 0
        try:
            n, m = (int(x) for x in self.pattern.split(":"))
        except ValueError:
            raise ConfigError(f"`method.fedspallm.pattern`: 'unstructured' or 'N:M' with "
                              f"integers, got {self.pattern!r}") from None
        return n, m


def pack(weight: torch.Tensor, keep: torch.Tensor) -> State:
    """Sparse encoding of a pruned matrix: kept values + bit-packed mask (1 bit / weight)."""
    bits = np.packbits(keep.flatten().numpy())
    return {VALUES: weight[keep].contiguous(), MASK: torch.from_numpy(bits)}


def unpack(values: torch.Tensor, bits: torch.Tensor, shape: torch.Size
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack`: (dense weight, keep mask); ValueError when the parts disagree."""
    n = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.shape != ((n + 7) // 8,):
        raise ValueError(f"mask must be uint8 [{(n + 7) // 8}], got {bits.dtype} "
                         f"{list(bits.shape)}")
    keep = torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool)).view(shape)
    if values.dim() != 1 or values.numel() != int(keep.sum()):
        raise ValueError(f"{int(keep.sum())} kept weights in the mask, {values.numel()} values")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[keep] = values
    return dense, keep


def resource_scores(options: FedSpaLLMConfig, num_clients: int) -> list[float]:
    """r_c of every client: the explicit list, or the spread around 1."""
    if options.resource_scores:
        if len(options.resource_scores) != num_clients:
            raise ConfigError(f"`method.fedspallm.resource_scores` has "
                              f"{len(options.resource_scores)} entries; "
                              f"federation.num_clients = {num_clients}")
        return list(options.resource_scores)
    s = options.resource_spread
    return [1 + s * (2 * c / (num_clients - 1) - 1) if num_clients > 1 else 1.0
            for c in range(num_clients)]


class FedSpaLLM(Method):
    """Clients prune their sampled decoder layers; the server takes the l0 mean per weight
    and expands the mask. The global state is every decoder Linear weight."""

    name = "fedspallm"
    Config = FedSpaLLMConfig
    task = "causal_lm"
    adapter = None
    metrics: ClassVar[dict[str, bool]] = {"perplexity": False}
    gpu: ClassVar[bool] = False  # its pruners and world run on the CPU (run.device)
    target = "perplexity"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.federation.prox_mu:
            raise ConfigError(f"`federation.prox_mu` = {cfg.federation.prox_mu}: FedSpaLLM's "
                              f"clients prune, they do not train; set it to 0")
        if cfg.federation.clip_norm:
            raise ConfigError(f"`federation.clip_norm` = {cfg.federation.clip_norm}: "
                              f"FedSpaLLM's clients send pruned weights, not updates whose "
                              f"norm could be clipped; set it to 0")

    @classmethod
    def world(cls, cfg) -> Federation:
        """The one causal LM (frozen, eval mode), each client's calibration blocks as its
        rows, and held-out test blocks for perplexity."""
        o: FedSpaLLMConfig = cfg.method.own
        set_threads(cfg)
        cache = cache_dir(cfg)
        tokenizer = load_tokenizer(resolve(cfg.model.name, cache))
        model = load_backbone(cfg.model.name, task="causal_lm", num_labels=0,
                              attn_implementation="sdpa", seed=cfg.run.seed, cache_dir=cache)
        if "decoder" not in describe(model).layers or "encoder" in describe(model).layers:
            raise ConfigError(f"`model.name` = {cfg.model.name!r}: FedSpaLLM prunes the decoder "
                              f"layers of a decoder-only model; this model has "
                              f"{sorted(describe(model).layers)} layers")
        model.eval().requires_grad_(False)
        n = o.pool_clients or cfg.federation.num_clients
        if o.pool_clients and cfg.federation.num_clients != 1:
            raise ConfigError(f"`method.fedspallm.pool_clients` = {o.pool_clients} pools "
                              f"every client's text into one: federation.num_clients must be "
                              f"1, got {cfg.federation.num_clients}")
        clients = calibration_blocks(tokenizer, o.calibration, n, o.samples, o.seq_len,
                                     cfg.run.seed)
        rows = [{"input_ids": b} for blocks in clients for b in blocks]
        per = len(rows) // cfg.federation.num_clients
        indices = [np.arange(c * per, (c + 1) * per) for c in range(cfg.federation.num_clients)]
        val = [{"input_ids": b} for b in test_blocks(tokenizer, o.eval_samples, o.seq_len)]
        weights = {k: m.weight for k, (_, m) in layer_linears(model).items()}
        initial = {k: w.detach().clone() for k, w in weights.items()}
        return Federation(model, weights, initial, rows, val, indices, [],
                          lambda rows: {"input_ids": torch.stack([r["input_ids"] for r in rows])},
                          set(), set(), torch.float32)

    def __init__(self, cfg, fed) -> None:
        super().__init__(cfg, fed)
        o = self.options
        self.layer_of = {k: i for k, (i, _) in layer_linears(fed.model).items()}
        self.num_layers = len(set(self.layer_of.values()))
        scores = resource_scores(o, cfg.federation.num_clients)
        self.budget = layer_budget(scores, self.num_layers)
        self.prunen, self.prunem = o.nm
        self.sampled: dict[int, list[int]] = {}  # this round: client id -> its layers

    # --- server -> client ---
    def plan(self, rnd: int, selected: list[int]) -> None:
        """Each selected client's layers this round (seeded per run, round, client)."""
        seed = self.cfg.run.seed
        if self.options.cover:
            budgets = [self.budget[c] for c in selected]
            if sum(budgets) < self.num_layers:
                raise ConfigError(f"`method.fedspallm.cover`: the round's clients prune "
                                  f"{sum(budgets)} layers in all, fewer than the model's "
                                  f"{self.num_layers}; raise federation.clients_per_round")
            dealt = cover_layers(seed, rnd, budgets, self.num_layers)
            self.sampled = dict(zip(selected, dealt, strict=True))
        else:
            self.sampled = {c: sample_layers(seed, rnd, c, self.budget[c], self.num_layers)
                            for c in selected}

    def downlink(self, state: State, client_id: int, rnd: int) -> State:
        """The client's layers to prune and every matrix that differs from the pretrained
        model it holds, sparse-encoded (round 1 of a one-shot run: nothing but the layers)."""
        out = {LAYERS: torch.tensor(self.sampled[client_id], dtype=torch.int64)}
        for key, value in self.changed(state).items():
            out.update({key + s: t for s, t in pack(value, value != 0).items()})
        return out

    def changed(self, state: State) -> State:
        """The matrices of ``state`` that differ from the pretrained model every client and
        the shared backbone hold."""
        return {k: v for k, v in state.items() if not torch.equal(v, self.fed.initial[k])}

    # --- client side ---
    def local(self, start: State, client_id: int, seed: int) -> LocalResult:
        fed, o = self.fed, self.options
        received = self._received(start)
        layers = start[LAYERS].tolist()
        t0 = time.perf_counter()
        try:
            self._load(received)
            rows = [fed.train_rows[i] for i in fed.client_indices[client_id]]
            batches = [fed.collate(rows[s:s + o.batch_size])
                       for s in range(0, len(rows), o.batch_size)]
            report = prune_layers(fed.model, layers, batches, o.pruner, o.sparsity,
                                  self.prunen, self.prunem)
            masks = report.masks()
            pruned = {k: fed.params[k].detach().clone() for k in masks}
        finally:
            self._load({k: fed.initial[k] for k in {*received, *self.layer_keys(layers)}})
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        metrics = {"prune_s": time.perf_counter() - t0, "forward_s": report.forward_s,
                   "stats_s": report.stats_s, "solve_s": report.solve_s,
                   "layers": float(len(layers)), "sparsity": 1 - kept / total}
        return LocalResult(pruned, None, len(rows), masks, metrics)

    def layer_keys(self, layers: list[int]) -> list[str]:
        wanted = set(layers)
        return [k for k, i in self.layer_of.items() if i in wanted]

    def _received(self, start: State) -> State:
        return {k.removesuffix(VALUES): unpack(start[k], start[k.removesuffix(VALUES) + MASK],
                                               self.fed.initial[k.removesuffix(VALUES)].shape)[0]
                for k in start if k.endswith(VALUES)}

    def _load(self, weights: State) -> None:
        with torch.no_grad():
            for key, value in weights.items():
                self.fed.params[key].copy_(value)

    def wire_tensors(self, result: LocalResult) -> State:
        """Per pruned matrix its kept values and bit-packed mask."""
        return {k + s: t for k, w in result.delta.items()
                for s, t in pack(w, result.extra[k]).items()}

    # --- server side ---
    def from_wire(self, update: ClientUpdate) -> ClientUpdate:
        """Sparse matrices -> dense pruned weights W_i (in ``delta``) and their keep masks as
        the element weights M_i; only the layers the client was asked to prune."""
        cid, wire = update.client_id, update.delta
        expected = set(self.layer_keys(self.sampled.get(cid, [])))
        keys = {k.removesuffix(VALUES) for k in wire if k.endswith(VALUES)}
        if keys != expected or len(wire) != 2 * len(keys):
            raise InvalidUpdate(f"client {cid}: sent {sorted(keys)[:3]}... ({len(keys)} "
                                f"matrices, {len(wire)} tensors), expected the "
                                f"{len(expected)} matrices of layers {self.sampled.get(cid)}")
        weights, masks = {}, {}
        for key in sorted(keys):
            try:
                weights[key], masks[key] = unpack(wire[key + VALUES], wire[key + MASK],
                                                  self.fed.initial[key].shape)
            except ValueError as e:
                raise InvalidUpdate(f"client {cid}: {key!r}: {e}") from None
        update.delta, update.weights = weights, masks
        return update

    def expected_keys(self, client_id: int) -> set[str]:
        """Nothing beyond what `from_wire` checks: exactly the client's sampled layers."""
        return set()

    def aggregate(self, state: State, updates: list[ClientUpdate], server_lr: float) -> State:
        """l0 mean (+ expansion) or a baseline, on deltas W_i - g (computed in place on the
        decoded copies, one matrix per client at a time)."""
        o = self.options
        for u in updates:
            for key, w in u.delta.items():
                w.sub_(state[key])
        if o.aggregation == "l0":
            new = owned_mean(state, updates, server_lr, empty="zero", combine=self.combine)
        else:  # baselines: every owner's pruned weights weigh |D_i|
            new = owned_mean(state, [ClientUpdate(u.client_id, u.delta, u.num_examples, u.loss)
                                     for u in updates], server_lr, combine=self.combine)
        owned = sorted({k for u in updates for k in u.delta})
        for key in owned:
            holders = [u for u in updates if key in u.delta]
            if o.aggregation == "l0" and o.expand:
                kept = sum(u.weights[key].to(torch.int64) for u in holders)
                new[key] = self.expand(new[key], len(holders) - kept, len(holders))
            elif o.aggregation == "fedavg_reprune":  # magnitude pruning to s (or N:M)
                zeros = torch.zeros(new[key].shape, dtype=torch.int64)
                new[key] = self.expand(new[key], zeros, 1)
        return new

    def project(self, proposed: State, stepped: State) -> State:
        """A server optimizer moves only the kept weights: what the aggregate pruned stays 0."""
        return {k: torch.where(proposed[k] == 0, proposed[k], v) for k, v in stepped.items()}

    def expand(self, weight: torch.Tensor, pruned: torch.Tensor, owners: int) -> torch.Tensor:
        """Mask expansion of one aggregated matrix to the target: ceil(s·d) zeros, or N zeros
        in every group of M."""
        if self.prunem:
            return expand_nm(weight, pruned, self.prunen, self.prunem)
        return expand_mask(weight, pruned, owners, self.options.sparsity)

    def evaluate(self, state: State) -> dict[str, float]:
        """Perplexity of the global model on the held-out blocks, and its sparsity (share of
        zeros over every decoder Linear weight)."""
        fed, o = self.fed, self.options
        changed = self.changed(state)
        try:
            self._load(changed)
            batches = [{"input_ids": b, "labels": b} for b in (
                torch.stack([r["input_ids"] for r in fed.val_rows[s:s + o.batch_size]])
                for s in range(0, len(fed.val_rows), o.batch_size))]
            ppl = response_perplexity(fed.model, batches)
        finally:
            self._load({k: fed.initial[k] for k in changed})
        zeros = sum(int((v == 0).sum()) for v in state.values())
        return {"perplexity": ppl, "eval_loss": math.log(ppl),
                "sparsity": zeros / sum(v.numel() for v in state.values())}
