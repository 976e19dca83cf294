"""Typed configuration: the single source of truth for every option.

An experiment is a TOML file whose tables mirror the dataclasses below (``[model]``,
``[peft]``, ``[data]``, ``[partition]``, ``[federation]``, ``[method]``, ``[run]``,
``[tracking]``), plus ``section.key=value`` overrides from the command line. ``[method]``
names the method; each method's own options live in its section ``[method.<name>]``, a
dataclass defined in the method's file (`fedprune.methods`), so adding a method edits nothing
here. Every field carries its help text in ``metadata["help"]``; the CLI lists them, so the
docs cannot drift from the code.
Validation errors name the option (``federation.clients_per_round``) and the allowed values.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its help text (and allowed values, checked on construction)."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {
        "default": default}
    return field(metadata={"help": help, "choices": choices}, **kw)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"`{key}`: {msg}")


class _Section:
    """Base for config sections: type and choice checks from the field metadata."""

    _name = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self._name}.{f.name}"
            value = getattr(self, f.name)
            _check_type(key, value, hints[f.name])
            if f.metadata.get("choices") and value not in f.metadata["choices"]:
                allowed = ", ".join(repr(c) for c in f.metadata["choices"])
                raise ConfigError(f"`{key}` = {value!r} is not allowed; choose one of {allowed}")
        self.validate()

    def validate(self) -> None:
        """Range checks between fields; overridden by sections that need them."""


def _check_type(key: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        _check(isinstance(value, list), key, f"must be a list, got {value!r}")
        for i, v in enumerate(value):
            _check_type(f"{key}[{i}]", v, item)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"must be a number, got {value!r}")
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, key, f"must be an integer, got {value!r}")
    else:
        _check(isinstance(value, hint), key, f"must be {hint.__name__}, got {value!r}")


@dataclass
class ModelConfig(_Section):
    _name = "model"
    name: str = opt("minilm", "Backbone: 'minilm' (bundled all-MiniLM-L6-v2), 'smollm2' (bundled "
                    "SmolLM2-135M-Instruct), a local model folder, or a Hugging Face hub name.")
    compute_dtype: str = opt("auto", "Precision of the frozen backbone's compute: 'auto' = "
                             "bfloat16 where the CPU has AVX512-BF16 or AMX, else float32. "
                             "Trainable tensors, optimizer state, updates and aggregation are "
                             "always float32.",
                             ("auto", "float32", "bfloat16"))
    attn_implementation: str = opt("auto", "Attention path: 'auto' = eager maths with fast "
                                   "dropout masks when training on a CPU (faster than SDPA's "
                                   "backward there), SDPA otherwise; 'eager' / 'sdpa' = "
                                   "transformers' own.", ("auto", "eager", "sdpa"))


PEFT_METHODS = ("lora", "ia3", "prompt", "prefix", "full")


@dataclass
class PeftConfig(_Section):
    _name = "peft"
    method: str = opt("lora", "What clients train, via the peft library: 'lora' (low-rank "
                      "adapters on `peft.target_modules`), 'ia3' (learned scalings of keys, "
                      "values and the FFN's intermediate activations, Liu et al. 2022), "
                      "'prompt' (`peft.num_virtual_tokens` soft-prompt embeddings, Lester et "
                      "al. 2021), 'prefix' (`peft.num_virtual_tokens` key/value prefixes in "
                      "every layer, without reparameterisation: P-tuning v2, Liu et al. 2022; "
                      "classifiers (added by fedprune's attention: model.attn_implementation "
                      "'auto'), decoder-only models on a data.task (peft's cache) and "
                      "encoder-decoders on a data.task (peft's cache: the decoder's "
                      "self-attention only)), 'full' "
                      "(every backbone weight: full fine-tuning). A "
                      "classifier's head is trained with each.", PEFT_METHODS)
    r: int = opt(16, "LoRA rank.")
    alpha: float = opt(32.0, "LoRA scaling alpha (the update is scaled by alpha / r).")
    dropout: float = opt(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] = opt(["q", "k", "v", "o"], "Modules that get LoRA: 'q', 'k', "
                                    "'v', 'o' name the attention projections of any supported "
                                    "family; other names are passed to peft as they are.")
    num_virtual_tokens: int = opt(20, "Prompt / prefix tuning: number of virtual tokens "
                                  "(soft-prompt embeddings prepended to every input, "
                                  "initialised from random vocabulary embeddings; or key/value "
                                  "prefixes of every layer).")
    prompt_head_chunks: bool = opt(False, "Prompt tuning has no head map (its embeddings feed "
                                   "every head). true = the AoH paper's reading: the prompt's "
                                   "hidden dimension d is split into H chunks of d/H columns, "
                                   "chunk h owned by head h of the first attention layer (its "
                                   "importance, its pruning). Needed for head-pruned methods "
                                   "with peft.method = 'prompt'.")

    def validate(self) -> None:
        _check(self.r >= 1, "peft.r", f"must be >= 1, got {self.r}")
        _check(self.alpha > 0, "peft.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, "peft.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "peft.target_modules", "must not be empty")
        _check(self.num_virtual_tokens >= 1, "peft.num_virtual_tokens",
               f"must be >= 1, got {self.num_virtual_tokens}")
        _check(not self.prompt_head_chunks or self.method == "prompt", "peft.prompt_head_chunks",
               f"splits prompt-tuning embeddings; peft.method is {self.method!r}")


@dataclass
class DataConfig(_Section):
    _name = "data"
    dataset: str = opt("bbc_news", "'bbc_news' (bundled: 2,225 articles, 5 categories), "
                       "'austen_books' (bundled: 50-word passages of four Austen novels, "
                       "which novel, 4 balanced classes), a paper dataset ('mnli', "
                       "'20newsgroups', 'xlsum', 'e2e_nlg'; online only), a local .csv/.json/"
                       ".jsonl/.txt file, or a hub dataset name.")
    text_column: str = opt("text", "Column holding the input text.")
    text_pair_column: str = opt("", "Optional second text column (e.g. the hypothesis in MNLI).")
    label_column: str = opt("label", "Column holding the class label.")
    val_fraction: float = opt(0.2, "Fraction of the data held out as the fixed validation split.")
    max_length: int = opt(128, "Maximum tokens per example (longer inputs are truncated).")
    max_samples: int = opt(0, "Use only the first N examples (after shuffling); 0 = all.")
    cache_dir: str = opt("", "Tokenization cache folder; empty = ~/.cache/fedprune.")
    task: str = opt("", "A generation task trained instead of classifying data.dataset: "
                    "'bbc_headline' (article -> headline, ROUGE), 'bbc_category' (article -> "
                    "category word, exact match; both bundled), 'xlsum', 'e2e_nlg' (hub, "
                    "online). A decoder-only model learns it as instruction tuning (loss on "
                    "the response tokens), an encoder-decoder one as seq2seq. Empty = "
                    "classification. (PruFed names its task in method.prufed.task.)",
                    ("", "bbc_headline", "bbc_category", "xlsum", "e2e_nlg"))
    max_new_tokens: int = opt(24, "Generation tasks: tokens generated per validation prompt, "
                              "and the longest seq2seq target.")
    generate_samples: int = opt(16, "Generation tasks: validation prompts answered by greedy "
                                "decoding at each evaluation for the task's metric (perplexity "
                                "uses every validation row).")

    def validate(self) -> None:
        _check(0 < self.val_fraction < 1, "data.val_fraction",
               f"must be in (0, 1), got {self.val_fraction}")
        _check(self.max_new_tokens >= 1, "data.max_new_tokens",
               f"must be >= 1, got {self.max_new_tokens}")
        _check(self.generate_samples >= 1, "data.generate_samples",
               f"must be >= 1, got {self.generate_samples}")
        _check(self.max_length >= 8, "data.max_length", f"must be >= 8, got {self.max_length}")
        _check(self.max_samples >= 0, "data.max_samples", f"must be >= 0, got {self.max_samples}")


@dataclass
class PartitionConfig(_Section):
    _name = "partition"
    scheme: str = opt("iid", "How training data is split over clients (flwr-datasets "
                      "partitioners).", ("iid", "dirichlet", "shards"))
    alpha: float = opt(0.5, "Dirichlet concentration over labels (smaller = more skewed).")
    shards_per_client: int = opt(2, "Label-sorted shards per client for scheme 'shards'.")
    min_partition_size: int = opt(1, "Smallest client dataset the Dirichlet sampler accepts; "
                                  "0 lets clients without data exist (never selected).")

    def validate(self) -> None:
        _check(self.alpha > 0, "partition.alpha", f"must be > 0, got {self.alpha}")
        _check(self.shards_per_client >= 1, "partition.shards_per_client",
               f"must be >= 1, got {self.shards_per_client}")
        _check(self.min_partition_size >= 0, "partition.min_partition_size",
               f"must be >= 0, got {self.min_partition_size}")


@dataclass
class FederationConfig(_Section):
    _name = "federation"
    num_clients: int = opt(10, "Total number of clients C.")
    clients_per_round: int = opt(2, "Clients selected per round K.")
    rounds: int = opt(20, "Communication rounds R.")
    local_epochs: int = opt(1, "Local epochs per selected client.")
    batch_size: int = opt(16, "Local training batch size.")
    eval_batch_size: int = opt(64, "Batch size of the global evaluation.")
    lr: float = opt(1e-3, "Client learning rate.")
    optimizer: str = opt("adamw", "Client optimizer (fresh state every round).",
                         ("adamw", "sgd"))
    weight_decay: float = opt(0.0, "Client optimizer weight decay.")
    group_by_length: bool = opt(False, "Group each client's batches by length (transformers' "
                                "length-grouped sampler) so that little padding is computed; "
                                "batches are always padded only to their longest row.")
    prox_mu: float = opt(0.0, "FedProx (Li et al. 2020): clients add mu/2·||w - w_global||^2 "
                         "over the tensors they train (pruned heads excluded); 0 = off.")
    scaffold: bool = opt(False, "SCAFFOLD (Karimireddy et al. 2020, option II): clients "
                         "correct every local step by the server's minus their own control "
                         "variate and send its change beside the update (bytes counted); "
                         "each client's control variate is kept on its side "
                         "(client/scaffold.py).")
    server_lr: float = opt(1.0, "Server learning rate eta applied to the aggregated update "
                           "(the step of every server_optimizer).")
    server_optimizer: str = opt("fedavg", "Server optimizer on the pseudo-gradient (mean "
                                "model - global model, over the coordinates clients owned; "
                                "core.server_opt): 'fedavg' (x + eta·delta), 'fedavgm' "
                                "(server momentum server_beta1), 'fedadagrad', 'fedyogi', "
                                "'fedadam' (Reddi et al. 2021). Coordinates nobody owned keep "
                                "their weight and moments.",
                                ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam"))
    server_beta1: float = opt(0.9, "Momentum beta1 of the server optimizer, in [0, 1).")
    server_beta2: float = opt(0.99, "Second-moment beta2 of fedadam / fedyogi, in [0, 1).")
    server_tau: float = opt(1e-3, "Adaptivity tau > 0 of fedadagrad / fedyogi / fedadam "
                            "(x + eta·m / (sqrt(v) + tau)).")
    server_bias_correction: bool = opt(False, "Adam-style bias correction of the adaptive "
                                       "server optimizers' step (Flower's FedAdam does it; "
                                       "Reddi et al. do not).")
    robust: str = opt("none", "Byzantine-robust aggregation over each coordinate's owners "
                      "(core.robust): 'median' / 'trimmed_mean' (unweighted, in place of the "
                      "method's weighted mean), 'krum' / 'multikrum' (choose the updates the "
                      "method then averages with its own weights), 'bulyan' (El Mhamdi et "
                      "al. 2018: n - 2f updates chosen by Krum one at a time, then per "
                      "coordinate the mean of the n - 4f values nearest the median).",
                      ("none", "median", "trimmed_mean", "krum", "multikrum", "bulyan"))
    robust_trim: float = opt(0.1, "trimmed_mean: fraction of each coordinate's owners cut at "
                             "each end, in [0, 0.5).")
    robust_f: int = opt(0, "krum / multikrum / bulyan: number of attackers f assumed among "
                        "a round's updates (Krum scores sum the n - f - 2 nearest).")
    robust_keep: int = opt(0, "multikrum: updates kept; 0 = n - f.")
    robust_then: str = opt("mean", "multikrum: how the kept updates are combined — 'mean' "
                           "(the method's weighted mean), 'median' or 'trimmed_mean' "
                           "(robust_trim) over each coordinate's owners among them.",
                           ("mean", "median", "trimmed_mean"))
    clip_norm: float = opt(0.0, "Server-side clipping of each client's update to this L2 norm "
                           "(before any robust rule); 0 = off.")
    selection: str = opt("random", "Client selection: 'random' (K distinct, uniformly); "
                         "'poisson' (each client independently with probability K / C: "
                         "DP-FedAvg's sampling, so K per round on average); 'loss' (AoH Eq. 9: "
                         "top-K by last local loss minus global validation loss, never-seen "
                         "clients first); 'pow-d' (Power-of-Choice, Cho et al. 2022, rpow-d "
                         "variant: d candidates drawn by data size, the K with highest last "
                         "loss).", ("random", "poisson", "loss", "pow-d"))
    pow_d: int = opt(0, "Candidates d of 'pow-d'; 0 = 2 * clients_per_round.")
    min_valid_updates: int = opt(1, "Fewer valid client updates than this leave the global "
                                 "model unchanged for the round (0: never, e.g. DP-FedAvg's "
                                 "noise-only rounds when poisson selection drew nobody).")

    def validate(self) -> None:
        _check(self.num_clients >= 1, "federation.num_clients",
               f"must be >= 1, got {self.num_clients}")
        _check(1 <= self.clients_per_round <= self.num_clients, "federation.clients_per_round",
               f"must be in [1, federation.num_clients={self.num_clients}], "
               f"got {self.clients_per_round}")
        for key in ("rounds", "local_epochs", "batch_size", "eval_batch_size"):
            _check(getattr(self, key) >= 1, f"federation.{key}",
                   f"must be >= 1, got {getattr(self, key)}")
        _check(self.lr > 0, "federation.lr", f"must be > 0, got {self.lr}")
        _check(self.server_lr > 0, "federation.server_lr", f"must be > 0, got {self.server_lr}")
        for key in ("server_beta1", "server_beta2"):
            _check(0 <= getattr(self, key) < 1, f"federation.{key}",
                   f"must be in [0, 1), got {getattr(self, key)}")
        _check(self.prox_mu >= 0, "federation.prox_mu", f"must be >= 0, got {self.prox_mu}")
        _check(self.server_tau > 0, "federation.server_tau",
               f"must be > 0, got {self.server_tau}")
        _check(0 <= self.robust_trim < 0.5, "federation.robust_trim",
               f"must be in [0, 0.5), got {self.robust_trim}")
        _check(self.robust_f >= 0, "federation.robust_f", f"must be >= 0, got {self.robust_f}")
        if self.robust in ("krum", "multikrum"):
            _check(self.clients_per_round >= 2 * self.robust_f + 3, "federation.robust_f",
                   f"{self.robust} needs federation.clients_per_round >= 2 f + 3 = "
                   f"{2 * self.robust_f + 3}, got {self.clients_per_round}")
        if self.robust == "bulyan":
            _check(self.robust_f >= 1 and self.clients_per_round >= 4 * self.robust_f + 3,
                   "federation.robust_f",
                   f"bulyan needs f >= 1 and federation.clients_per_round >= 4 f + 3 = "
                   f"{4 * self.robust_f + 3} (El Mhamdi et al.; Flower's check), got f = "
                   f"{self.robust_f} and {self.clients_per_round}")
        _check(self.robust_then == "mean" or self.robust == "multikrum",
               "federation.robust_then", f"{self.robust_then!r} combines Multi-Krum's kept "
               f"updates: needs federation.robust = 'multikrum', got {self.robust!r}")
        _check(0 <= self.robust_keep <= self.clients_per_round, "federation.robust_keep",
               f"must be in [0, federation.clients_per_round], got {self.robust_keep}")
        _check(self.clip_norm >= 0, "federation.clip_norm",
               f"must be >= 0 (0 = off), got {self.clip_norm}")
        _check(self.weight_decay >= 0, "federation.weight_decay",
               f"must be >= 0, got {self.weight_decay}")
        _check(self.pow_d == 0 or self.clients_per_round <= self.pow_d <= self.num_clients,
               "federation.pow_d", f"must be 0 or in [federation.clients_per_round, "
               f"federation.num_clients], got {self.pow_d}")
        _check(0 <= self.min_valid_updates <= self.clients_per_round,
               "federation.min_valid_updates",
               f"must be in [0, federation.clients_per_round={self.clients_per_round}], "
               f"got {self.min_valid_updates}")


class MethodOptions(_Section):
    """Base of a method's own config section ``[method.<name>]``: each method file defines
    one (a dataclass with `opt` fields) and names it as its ``Method.Config``."""

    def require(self, cond: bool, key: str, msg: str) -> None:
        """ConfigError naming the option ``method.<name>.<key>`` unless ``cond``."""
        _check(cond, f"{self._name}.{key}", msg)


@dataclass
class MethodConfig:
    """``[method]``: which method runs (``name``) and the sections ``[method.<name>]`` of the
    methods given (the chosen one always; others are checked but not used)."""

    name: str = "fedavg"
    options: dict[str, MethodOptions] = field(default_factory=dict)

    def __post_init__(self) -> None:
        registry = method_configs()
        if self.name not in registry:
            allowed = ", ".join(repr(n) for n in registry)
            raise ConfigError(f"`method.name` = {self.name!r} is not allowed; choose one of "
                              f"{allowed}")
        if self.name not in self.options:
            self.options = {**self.options, self.name: registry[self.name]()}

    @property
    def own(self) -> MethodOptions:
        """The chosen method's section."""
        return self.options[self.name]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name,
                **{n: dataclasses.asdict(o) for n, o in sorted(self.options.items())}}


def method_configs() -> dict[str, type[MethodOptions]]:
    """method name -> its config section class, from the method registry."""
    from fedprune.methods import METHODS  # the registry imports torch: only when needed

    return {name: m.Config for name, m in METHODS.items()}


def _method_from_dict(table: dict[str, Any], source: str) -> MethodConfig:
    registry = method_configs()
    options = {}
    for key, value in table.items():
        if key == "name":
            continue
        if key in registry:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [method.{key}] must be a table")
            options[key] = _section(registry[key], value, f"method.{key}", source)
            continue
        homes = [f"`method.{n}.{key}`" for n, cls in registry.items()
                 if key in {f.name for f in dataclasses.fields(cls)}]
        if homes:
            raise ConfigError(f"{source}: `method.{key}` is an option of a method's own "
                              f"section now: {' or '.join(homes)}")
        raise ConfigError(f"{source}: unknown option `method.{key}`; [method] takes `name` "
                          f"and the sections {', '.join(f'[method.{n}]' for n in registry)}")
    return MethodConfig(table.get("name", "fedavg"), options)


@dataclass
class RunConfig(_Section):
    _name = "run"
    seed: int = opt(0, "Seed of model init, data split, partition, selection and training.")
    out_dir: str = opt("runs", "Folder under which each run gets its own directory.")
    name: str = opt("", "Run directory name; empty = <method>-<dataset>-seed<seed>.")
    num_threads: int = opt(0, "torch threads; 0 = OMP_NUM_THREADS if set, else all cores.")
    target_metric: float = opt(0.85, "Report the first round whose task metric reaches this.")
    eval_every: int = opt(1, "Evaluate the global model every N rounds (and after the last).")
    count_flops: bool = opt(False, "Measure every local step's FLOPs with torch's "
                            "FlopCounterMode (next to the analytic count; under "
                            "`model.attn_implementation=sdpa` it misses the attention "
                            "products on a CPU).")
    device: str = opt("auto", "Where the backbone computes (training, importance pass, "
                      "evaluation): 'auto' (CUDA when torch sees a GPU, else the CPU), 'cpu', "
                      "'cuda' or 'cuda:<i>'. Trainable tensors, updates, aggregation and "
                      "checkpoints stay float32 on the CPU, so a run started on a GPU resumes "
                      "on a CPU. FedSpaLLM and PruFed compute on the CPU so far.")

    def validate(self) -> None:
        _check(self.num_threads >= 0, "run.num_threads", f"must be >= 0, got {self.num_threads}")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "run.device",
               f"must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}")
        _check(self.eval_every >= 1, "run.eval_every", f"must be >= 1, got {self.eval_every}")


@dataclass
class TrackingConfig(_Section):
    _name = "tracking"
    tensorboard: bool = opt(False, "Write TensorBoard event files (per-round metrics, the "
                            "resolved config, the metric plot) to <run dir>/tensorboard; "
                            "needs the `tracking` extra (pip install 'fedprune[tracking]').")
    mlflow: bool = opt(False, "Log to MLflow (offline, no server): per-round metrics, the "
                       "resolved config as params, the final artefacts; needs the `tracking` "
                       "extra (mlflow-skinny).")
    mlflow_uri: str = opt("", "MLflow tracking URI; empty = a local file store at "
                          "<run dir>/mlruns.")
    mlflow_experiment: str = opt("fedprune", "MLflow experiment the run is logged under "
                                 "(created when missing).")

    def validate(self) -> None:
        _check(self.mlflow_experiment.strip() != "", "tracking.mlflow_experiment",
               "must not be empty")


@dataclass
class FaultsConfig(_Section):
    _name = "faults"
    crash: float = opt(0.0, "Probability that a selected client raises in its local work "
                       "(drawn per run seed, round and client): it is dropped, with the reason "
                       "in metrics.jsonl.")
    hang: float = opt(0.0, "Probability that a selected client hangs past the round's "
                      "deadline: dropped (in process at once; on a SuperNode it sleeps "
                      "faults.hang_s, so the ServerApp's reply-timeout drops it).")
    silent: float = opt(0.0, "Probability that a selected client returns nothing.")
    garbled: float = opt(0.0, "Probability that a selected client trains but sends its "
                         "payload cut in half: the server rejects it, with the reason in "
                         "metrics.jsonl.")
    hang_s: float = opt(0.0, "Seconds a hanging SuperNode sleeps before replying nothing.")

    def validate(self) -> None:
        for key in ("crash", "hang", "silent", "garbled"):
            _check(0 <= getattr(self, key) <= 1, f"faults.{key}",
                   f"must be in [0, 1], got {getattr(self, key)}")
        total = self.crash + self.hang + self.silent + self.garbled
        _check(total <= 1, "faults", f"crash + hang + silent + garbled must be <= 1, got {total}")
        _check(self.hang_s >= 0, "faults.hang_s", f"must be >= 0, got {self.hang_s}")

    @property
    def any(self) -> bool:
        return self.crash + self.hang + self.silent + self.garbled > 0


@dataclass
class AttackConfig(_Section):
    _name = "attack"
    kind: str = opt("none", "What the malicious clients send (client/attacks.py): 'sign_flip' "
                    "(-Δ), 'scaling' (scale·Δ), 'noise' (Δ + N(0, noise_std²)), 'alie' (mean - "
                    "z·std of the honest updates), 'ipm' (-scale·mean of the honest updates), "
                    "'label_flip' (trains on labels K-1-y), 'alpha_inflation' (AoH: head "
                    "weight 1 on every kept head). alie / ipm: in-process simulator only.",
                    ("none", "sign_flip", "scaling", "noise", "alie", "ipm", "label_flip",
                     "alpha_inflation"))
    fraction: float = opt(0.2, "Share of the clients that are malicious (drawn once per run "
                          "seed).")
    scale: float = opt(10.0, "scaling: factor on Δ; ipm: ε of -ε·mean.")
    noise_std: float = opt(0.01, "noise: standard deviation of the added Gaussian noise.")
    alie_z: float = opt(0.0, "alie: z; 0 = Baruch et al.'s z from the round's n and the "
                        "number of attackers.")

    def validate(self) -> None:
        _check(0 <= self.fraction <= 1, "attack.fraction",
               f"must be in [0, 1], got {self.fraction}")
        _check(self.scale > 0, "attack.scale", f"must be > 0, got {self.scale}")
        _check(self.noise_std >= 0, "attack.noise_std", f"must be >= 0, got {self.noise_std}")
        _check(self.alie_z >= 0, "attack.alie_z", f"must be >= 0, got {self.alie_z}")


@dataclass
class DPConfig(_Section):
    _name = "dp"
    noise_multiplier: float = opt(0.0, "Client-level DP (DP-FedAvg, McMahan et al. 2018; "
                                  "core/privacy.py): Gaussian noise of std z·dp.clip_norm on "
                                  "the sum of the clipped updates, divided by K; z = this, "
                                  "0 = off. Needs federation.selection 'random' or 'poisson'; "
                                  "(epsilon, delta) per round in metrics.jsonl (Opacus' RDP "
                                  "accountant).")
    clip_norm: float = opt(0.0, "L2 bound C on each client's whole update (server side, over "
                           "the coordinates it owns): the sensitivity of the noised sum; "
                           "required with dp.noise_multiplier, meaningless without.")
    delta: float = opt(1e-5, "delta of the reported (epsilon, delta).")
    alpha_std: float = opt(0.0, "Std of Gaussian noise each client adds to its head scores "
                           "(AoH's alpha, B2's draws) before pruning and sending, then "
                           "clamped to [0, 1]: hides the importance fingerprint from the "
                           "server; local, not part of the reported epsilon. 0 = off.")

    def validate(self) -> None:
        _check(self.noise_multiplier >= 0, "dp.noise_multiplier",
               f"must be >= 0 (0 = off), got {self.noise_multiplier}")
        _check(self.clip_norm >= 0, "dp.clip_norm", f"must be > 0, got {self.clip_norm}")
        _check(self.on == (self.clip_norm > 0), "dp.clip_norm",
               "set it (> 0) together with dp.noise_multiplier" if self.on else
               "does nothing without dp.noise_multiplier (clipping alone: federation.clip_norm)")
        _check(0 < self.delta < 1, "dp.delta", f"must be in (0, 1), got {self.delta}")
        _check(self.alpha_std >= 0, "dp.alpha_std", f"must be >= 0, got {self.alpha_std}")

    @property
    def on(self) -> bool:
        return self.noise_multiplier > 0


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "peft": PeftConfig, "data": DataConfig, "partition": PartitionConfig,
    "federation": FederationConfig, "run": RunConfig, "tracking": TrackingConfig,
    "faults": FaultsConfig, "attack": AttackConfig, "dp": DPConfig,
}


@dataclass
class ExperimentConfig:
    """A whole experiment: one instance of every section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    dp: DPConfig = field(default_factory=DPConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: (getattr(self, f.name).to_dict() if f.name == "method"
                         else dataclasses.asdict(getattr(self, f.name)))
                for f in dataclasses.fields(self)}


def _section(cls: type[_Section], table: dict[str, Any], name: str, source: str) -> _Section:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{source}: unknown option `{name}.{key}`; options of "
                              f"[{name}] are {', '.join(sorted(known)) or 'none'}")
    return cls(**table)


def from_dict(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Build and validate a config from nested tables; unknown sections or keys are errors."""
    sections: dict[str, Any] = {}
    for name, table in raw.items():
        if name not in SECTIONS and name != "method":
            raise ConfigError(f"{source}: unknown section [{name}]; sections are "
                              f"{', '.join([*SECTIONS, 'method'])}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        sections[name] = (_method_from_dict(table, source) if name == "method"
                          else _section(SECTIONS[name], table, name, source))
    return ExperimentConfig(**sections)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'federation.rounds=5' -> (['federation', 'rounds'], 5); 'method.aoh.sparsity=0.9' ->
    (['method', 'aoh', 'sparsity'], 0.9). Values are TOML; bare words are strings."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return [part.strip() for part in key.split(".")], value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a TOML experiment file (or start from defaults) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
        source = str(path)
    for item in overrides:
        path, value = parse_override(item)
        table = raw
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {item!r}: `{part}` is not a table")
        table[path[-1]] = value
    return from_dict(raw, source)


def options_help() -> str:
    """Every option with its default and help text, for `--help` and `fedprune options`."""
    lines = []
    for name, cls in SECTIONS.items():
        lines += _section_help(name, cls)
        if name == "federation":  # [method] and its sections, in the usual order
            names = ", ".join(repr(n) for n in method_configs())
            lines += ["[method]", (f"  method.name = 'fedavg': Federated method (one of: "
                                   f"{names}); its options are in [method.<name>].")]
            for method, options in method_configs().items():
                lines += _section_help(f"method.{method}", options)
    return "\n".join(lines)


def _section_help(name: str, cls: type[_Section]) -> list[str]:
    lines = [f"[{name}]"]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        choices = f.metadata.get("choices")
        extra = f" (one of: {', '.join(map(str, choices))})" if choices else ""
        lines.append(f"  {name}.{f.name} = {default!r}: {f.metadata['help']}{extra}")
    if len(lines) == 1:
        lines.append("  (no options)")
    return lines
