"""The method contract, the wire format of client updates, and the registry.

A method is one file in this package: a `Method` subclass with its config section
(``Config``, the ``[method.<name>]`` table) that registers itself by subclassing. It says
what world it needs (``task``, ``adapter``), what each selected client receives
(``downlink``), computes (``local``) and sends (``encode`` / ``decode``), how the server
aggregates (``aggregate``: a weight builder over `core.aggregate.owned_mean`) and how the
global state is evaluated (``evaluate``, with each metric's direction). The round loop
(sim/runner.py), in process or over Flower, calls nothing else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

from safetensors.torch import load, save

from fedprune.client.scaffold import WIRE as CONTROL
from fedprune.client.train import (
    LocalTrainSpec,
    TrainStats,
    evaluate,
    length_batches,
    load_state,
)
from fedprune.client.world import Federation, GenerationWorld, build
from fedprune.config import PEFT_METHODS, ConfigError, MethodOptions
from fedprune.core.accounting import train_ops
from fedprune.core.robust import COMBINE, MEAN, Combine
from fedprune.core.update import ClientUpdate, InvalidUpdate, State
from fedprune.data.tasks import TASKS, generation_metrics
from fedprune.structure.attention import describe
from fedprune.structure.model import model_arch

if TYPE_CHECKING:
    from fedprune.config import ExperimentConfig

METHODS: dict[str, type[Method]] = {}


@dataclass
class LocalResult:
    """What a client computed in a round, before encoding."""

    delta: State                      # local - global, full-shaped
    loss: float | None                # mean local training loss L_c (None: no training)
    num_examples: int                 # |D_c|
    extra: State = field(default_factory=dict)  # method-specific tensors sent along (alpha)
    metrics: dict[str, float] = field(default_factory=dict)
    control: State = field(default_factory=dict)  # SCAFFOLD: Δc_i (client/scaffold.py)
    round: int | None = None                       # the round it answers (sent as metadata)


def _metadata(blob: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]).get("__metadata__") or {}


class Method:
    """A federated method. Subclasses register themselves under their ``name``."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodOptions]]
    # "classification": the shared world of `client.world.build` (a classifier of
    # data.dataset, or data.task's generation); another kind: the method builds its own
    task: ClassVar[str] = "classification"
    adapter: ClassVar[str | None] = "lora"  # what clients train (None: nothing)
    peft_methods: ClassVar[tuple[str, ...]] = PEFT_METHODS  # the `peft.method`s it can train
    gpu: ClassVar[bool] = True  # its world honours run.device (else: the CPU, always)
    head_weights: ClassVar[bool] = False  # clients send per-head weights (AoH, B2)
    # metric -> higher is better; `target` is the one run.target_metric applies to (on a
    # classifier; `scoring` gives them for data.task)
    metrics: ClassVar[dict[str, bool]] = {"eval_loss": False, "accuracy": True}
    target: ClassVar[str] = "accuracy"

    def __init_subclass__(cls) -> None:
        if "name" in cls.__dict__:  # concrete methods only, not shared bases
            METHODS[cls.name] = cls

    @classmethod
    def world(cls, cfg: ExperimentConfig) -> Federation:
        """The data and the one backbone this method's clients compute on, built once per
        process (here: the task the class declares, what `peft.method` names)."""
        return build(cfg, task=cls.task)

    @classmethod
    def scoring(cls, data_task: str) -> tuple[dict[str, bool], str]:
        """(metric -> higher is better, target metric) of a run with `data.task` =
        `data_task`: a generation task scores response perplexity and its own metrics, the
        first of them the target."""
        if not data_task or cls.task != "classification":
            return cls.metrics, cls.target
        own = TASKS[data_task].metrics
        return {"eval_loss": False, "perplexity": False, **dict.fromkeys(own, True)}, own[0]

    def __init__(self, cfg: ExperimentConfig, fed: Federation) -> None:
        self.cfg = cfg
        self.metrics, self.target = self.scoring(cfg.data.task)
        self.options = cfg.method.own
        self.fed = fed
        f = cfg.federation
        self.spec = LocalTrainSpec(f.local_epochs, f.batch_size, f.lr, f.optimizer,
                                   f.weight_decay, f.group_by_length, f.prox_mu)
        self.structure = describe(fed.model)
        self.arch = model_arch(fed.model, cfg.peft)
        self.count_flops = cfg.run.count_flops
        # a robust combine rule in place of the weighted mean (core.robust): the rule's own,
        # or Multi-Krum's robust_then; MEAN otherwise
        rule = f.robust if f.robust in COMBINE else f.robust_then
        self.combine = Combine(rule, f.robust_trim, f.robust_f) if rule != "mean" else MEAN

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Refuse options this method cannot honour, before anything is loaded (the round
        loop and the ClientApp call it first)."""
        if cfg.data.task and cls.task != "classification":
            raise ConfigError(f"`data.task` = {cfg.data.task!r} with `method.name` = "
                              f"{cls.name!r}: it builds its own {cls.task} world (its task "
                              f"options are in [method.{cls.name}]); leave data.task empty")
        if cfg.peft.method == "prefix" and cls.task == "classification" and \
                not cfg.data.task and cfg.model.attn_implementation != "auto":
            raise ConfigError(f"`peft.method` = 'prefix' with `model.attn_implementation` = "
                              f"{cfg.model.attn_implementation!r}: a classifier's prefixes are "
                              f"added by fedprune's own attention (structure/prefix.py); set "
                              f"it to 'auto'")
        if cfg.data.task and cfg.attack.kind == "label_flip":
            raise ConfigError(f"`attack.kind` = 'label_flip' with `data.task` = "
                              f"{cfg.data.task!r}: label flipping needs a classification task")
        if cfg.federation.scaffold and (why := cls.scaffold_unsupported(cfg.method.own)):
            raise ConfigError(f"`federation.scaffold` = true with `method.name` = "
                              f"{cls.name!r}: {why}")
        kind = cfg.attack.kind
        if kind != "none" and (why := cls.attack_unsupported(kind)):
            raise ConfigError(f"`attack.kind` = {kind!r} with `method.name` = {cls.name!r}: "
                              f"{why}")
        if cls.adapter is not None and cfg.peft.method not in cls.peft_methods:
            raise ConfigError(f"`peft.method` = {cfg.peft.method!r} with `method.name` = "
                              f"{cls.name!r}: it trains {', '.join(cls.peft_methods)} only")
        if cfg.dp.on:
            cls.check_dp(cfg)
        if cfg.run.device.startswith("cuda") and not cls.gpu:
            raise ConfigError(f"`run.device` = {cfg.run.device!r} with `method.name` = "
                              f"{cls.name!r}: it computes on the CPU so far; use 'cpu' or "
                              f"'auto'")

    @classmethod
    def check_dp(cls, cfg: ExperimentConfig) -> None:
        """DP-FedAvg's guarantee needs data-independent sampling, one bounded contribution
        per client and nothing else released (core/privacy.py)."""
        fc = cfg.federation
        why = ("its clients send pruned weights, not bounded-sensitivity updates"
               if cls.adapter is None else
               f"federation.selection = {fc.selection!r} reads the clients' private losses; "
               "use 'random' or 'poisson'" if fc.selection not in ("random", "poisson") else
               "SCAFFOLD's control variates would be released without noise"
               if fc.scaffold else
               f"federation.robust = {fc.robust!r} changes the sensitivity the noise is "
               "sized for" if fc.robust != "none" else
               "dp.clip_norm is DP's clipping; set federation.clip_norm = 0"
               if fc.clip_norm else None)
        if why:
            raise ConfigError(f"`dp.noise_multiplier` = {cfg.dp.noise_multiplier} with "
                              f"`method.name` = {cls.name!r}: {why}")

    @classmethod
    def attack_unsupported(cls, kind: str) -> str | None:
        """Why the simulated attack ``kind`` cannot run with this method (None: it can)."""
        if cls.adapter is None:
            return "its clients send pruned weights, not trained updates to poison"
        if kind == "label_flip" and cls.task != "classification":
            return "label flipping needs a classification task"
        if kind == "alpha_inflation" and not cls.head_weights:
            return "its clients send no head weights to inflate"
        return None

    @classmethod
    def scaffold_unsupported(cls, options: MethodOptions) -> str | None:
        """Why SCAFFOLD cannot run with this method as configured (None: it can). Its
        control variates need trainables of one fixed shape per client, round after round."""
        if cls.adapter is None:
            return "its clients do not train; set `federation.scaffold` = false"
        return None

    def trained_mask(self, result: LocalResult) -> State:
        """Per key, a bool mask of the coordinates the client trained and sent (absent:
        all of them); SCAFFOLD leaves c_i unchanged elsewhere."""
        return {}

    def ops(self, heads_per_layer: list[int], stats: TrainStats,
            grad_heads: list[tuple[int, int]] | None = None, frozen_layers: int = 0
            ) -> dict[str, float]:
        """Client metrics of the local steps: wall time, padding share, analytic training OPs
        (where a formula exists; `train_ops`) and the FlopCounterMode measurement (when
        run.count_flops)."""
        out = {"train_s": stats.seconds, "pad_fraction": stats.pad_fraction}
        if self.arch:
            out["train_ops"] = train_ops(self.arch, heads_per_layer, stats.shapes, grad_heads,
                                         frozen_layers)
        if stats.flops is not None:
            out["train_flops_measured"] = stats.flops
        return out

    # --- server -> client ---
    def plan(self, rnd: int, selected: list[int]) -> None:
        """Server-side choices of a round, made once before any downlink (FedSpaLLM: each
        selected client's layers). Must depend only on (config, round, selected): a resumed
        run plans the same."""

    def initial_state(self) -> State:
        """The round-0 global state (here: the trainable tensors' initial values)."""
        return self.fed.initial

    def downlink(self, state: State, client_id: int, rnd: int) -> State:
        """What ``client_id`` receives of the global state in round ``rnd`` (here: all of
        it)."""
        return state

    # --- client side ---
    def local(self, start: State, client_id: int, seed: int) -> LocalResult:
        """Work from the received state ``start`` on client ``client_id``'s data."""
        raise NotImplementedError

    def encode(self, result: LocalResult) -> bytes:
        """The payload on the wire: tensors plus |D_c|, L_c and metrics as safetensors
        metadata, so measured bytes are everything a client sends."""
        meta = {"num_examples": str(result.num_examples), "metrics": json.dumps(result.metrics)}
        if result.loss is not None:
            meta["loss"] = repr(result.loss)
        if result.round is not None:
            meta["round"] = str(result.round)
        tensors = self.wire_tensors(result)
        if result.control:  # the same wire layout as the delta (e.g. kept heads' rows only)
            same = self.wire_tensors(replace(result, delta=result.control))
            tensors |= {CONTROL + k: same[k] for k in result.control if k in same}
        return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)

    def wire_tensors(self, result: LocalResult) -> State:
        return result.delta

    # --- server side ---
    def decode(self, blob: bytes, client_id: int) -> ClientUpdate:
        """Parse a payload; a malformed one raises InvalidUpdate naming the client."""
        try:
            tensors = load(blob)
            meta = _metadata(blob)
            control = {k.removeprefix(CONTROL): v for k, v in tensors.items()
                       if k.startswith(CONTROL)}
            wire = {k: v for k, v in tensors.items() if not k.startswith(CONTROL)}
            update = ClientUpdate(client_id, wire, int(meta["num_examples"]),
                                  float(meta["loss"]) if "loss" in meta else None,
                                  json.loads(meta.get("metrics", "{}")),
                                  round=int(meta["round"]) if "round" in meta else None)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's fault
            raise InvalidUpdate(f"client {client_id}: malformed payload ({e!r})") from None
        full = self.from_wire(update)
        missing = sorted(self.expected_keys(client_id) - set(full.delta))
        if missing:
            raise InvalidUpdate(f"client {client_id}: {len(missing)} tensor(s) missing, e.g. "
                                f"{missing[0]!r}")
        if control:  # Δc_i in the delta's wire layout: expanded by the same from_wire, with
            # the same side tensors (head weights) as the delta
            as_delta = ClientUpdate(client_id, {**wire, **control}, update.num_examples, None)
            full.control = {k: v for k, v in self.from_wire(as_delta).delta.items()
                            if k in control}
        return full

    def expected_keys(self, client_id: int) -> set[str]:
        """The (local) keys every update of ``client_id`` must hold; here: every trainable
        tensor (methods whose clients hold part of the state check it in ``from_wire``)."""
        return set(self.fed.initial)

    def from_wire(self, update: ClientUpdate) -> ClientUpdate:
        """Wire tensors -> full-shaped deltas and their aggregation weights (identity for
        dense methods: every tensor weighs |D_c|)."""
        return update

    def aggregate(self, state: State, updates: list[ClientUpdate], server_lr: float) -> State:
        raise NotImplementedError

    def project(self, proposed: State, stepped: State) -> State:
        """A server optimizer's step (``stepped``, from the aggregate ``proposed``) made valid
        for the method; default: any step is."""
        return stepped

    def server_metrics(self, state: State) -> dict[str, float]:
        """Figures of the global state logged every round next to the validation metrics
        (head-pruned methods: which heads the server has ever aggregated); none here."""
        return {}

    def evaluate(self, state: State) -> dict[str, float]:
        """The global model's validation metrics (the keys of ``metrics``): a classifier's
        loss and accuracy, or a generation task's response perplexity and score."""
        fed, bs = self.fed, self.cfg.federation.eval_batch_size
        load_state(fed.params, state)
        if not isinstance(fed, GenerationWorld):
            return evaluate(fed.model, fed.val_rows, fed.collate, bs)
        d = self.cfg.data
        out = generation_metrics(fed.model, fed.tokenizer,
                                 length_batches(fed.val_rows, fed.collate, bs), fed.prompts,
                                 fed.references, fed.task, max_new_tokens=d.max_new_tokens,
                                 batch_size=bs, max_prompt_length=d.max_length)
        return {"eval_loss": math.log(out["perplexity"]), **out}  # mean response-token NLL


def build_method(cfg: ExperimentConfig, fed: Federation) -> Method:
    return METHODS[cfg.method.name](cfg, fed)
