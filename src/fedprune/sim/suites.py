"""Experiment suites: the paper's ablation, sparsity sweep and non-IID study as sets of runs
over one base config, each finished with a markdown report and plots (report/suites.py).

A suite directory holds one run directory per variant; a finished variant is reused and an
interrupted one resumed, so re-running a suite only does the missing work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path

from tqdm.auto import tqdm

from fedprune.config import ExperimentConfig, load_config
from fedprune.sim.published import PUBLISHED, published_model
from fedprune.sim.runner import Observer, run

SMOKE = ("data.max_samples=96", "data.max_length=32", "federation.num_clients=4",
         "federation.rounds=2", "method.aoh.importance_samples=8", "federation.eval_batch_size=32")

AOH = ("method.name='aoh'", "federation.selection='loss'")


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]
    observe: bool = False  # log two clients' head importance every round (noniid)
    kind: str = "run"      # "run": a federated run; "alone" / "dense": see run_reference
    published: str = ""    # a `sim.published` model (random weights) the run uses


def ablation() -> list[Variant]:
    """Paper Table 1: B1, B2, AoH x random / loss selection at 90 % sparsity, plus AoH with
    structural pruning and with detached pruned heads (measured compute)."""
    s = ("method.aoh.sparsity=0.9",)
    return [
        Variant("B1-fedavg", ("method.name='fedavg'", "federation.selection='random'")),
        Variant("B2-random-heads", ("method.name='random_heads'",
                                    "federation.selection='random'",
                                    "method.random_heads.sparsity=0.9")),
        Variant("AoH-random-sel", ("method.name='aoh'", "federation.selection='random'", *s)),
        Variant("AoH-loss-sel", (*AOH, *s)),
        Variant("AoH-loss-sel-structural", (*AOH, *s, "method.aoh.mode='structural'")),
        Variant("AoH-loss-sel-detached", (*AOH, *s, "method.aoh.mode='detached'")),
        *(Variant(f"AoH-loss-sel-top{k}", (*AOH, *s, f"method.aoh.top_layers={k}"))
          for k in (1, 2, 3)),
    ]


def table1(seeds: tuple[int, ...] = (0, 1, 2)) -> list[Variant]:
    """Paper Table 1 at the paper's scale (configs/paper_table1.toml): B1, B2 and AoH, each
    with random and loss-based selection, per seed (labels ``<row>-<sel>-sel-s<seed>``)."""
    rows = {"B1": ("method.name='fedavg'",), "B2": ("method.name='random_heads'",),
            "AoH": ("method.name='aoh'",)}
    return [Variant(f"{row}-{sel}-sel-s{seed}", (*extra, f"federation.selection='{sel}'",
                                                 f"run.seed={seed}"))
            for seed in seeds for row, extra in rows.items() for sel in ("random", "loss")]


SWEEP_SEEDS = (0, 1, 2)


def sparsity(seeds: tuple[int, ...] = SWEEP_SEEDS) -> list[Variant]:
    """Paper Fig. 4: AoH (loss selection) at s = 0, 50, 70, 90, 95 % in adapter mode and at
    50 - 95 % in structural mode (at 0 it is the adapter run), per seed (labels
    ``AoH-<mode>-<s %>-s<seed>``). Structural pruning needs the kept heads before training,
    so its runs score heads before, whatever the base config says."""
    modes = {"adapter": (), "structural": ("method.aoh.mode='structural'",
                                           "method.aoh.importance='before'")}
    return [Variant(f"AoH-{mode}-{round(100 * s):02d}-s{seed}",
                    (*AOH, f"method.aoh.sparsity={s}", *extra, f"run.seed={seed}"))
            for seed in seeds for mode, extra in modes.items()
            for s in (0.0, 0.5, 0.7, 0.9, 0.95) if s or mode == "adapter"]


PARTITIONS = {"iid": ("partition.scheme='iid'",),
              **{f"dir{a}": ("partition.scheme='dirichlet'", f"partition.alpha={a}")
                 for a in (2.0, 0.5, 0.1)}}


def noniid(seeds: tuple[int, ...] = SWEEP_SEEDS) -> list[Variant]:
    """Paper Table 5 and Fig. 5: FedAvg and AoH on IID and Dirichlet(2.0, 0.5, 0.1) data, per
    seed (labels ``<method>-<partition>-s<seed>``)."""
    return [Variant(f"{method}-{part}-s{seed}", (*extra, *p, f"run.seed={seed}"),
                    observe=method == "AoH")
            for seed in seeds for part, p in PARTITIONS.items()
            for method, extra in (("FedAvg", ("method.name='fedavg'",)),
                                  ("AoH", (*AOH, "method.aoh.sparsity=0.9")))]


# issue 18: each server optimizer / client correction against plain FedAvg. Hyper-parameters
# fixed from the literature, not tuned here: FedAvgM η = 1, β1 = 0.9 (Hsu et al. 2019);
# FedAdagrad / FedYogi / FedAdam η = 1e-2, β1 = 0.9, β2 = 0.99, τ = 1e-3 (Reddi et al. 2021's
# defaults, the middle of their best-η range); FedProx μ = 0.1 (the middle of Li et al.'s
# grid); SCAFFOLD with η_g = 1.
OPTIMIZERS = {
    "fedavg": (),
    "fedavgm": ("federation.server_optimizer='fedavgm'", "federation.server_lr=1.0"),
    **{o: (f"federation.server_optimizer='{o}'", "federation.server_lr=0.01")
       for o in ("fedadagrad", "fedyogi", "fedadam")},
    "fedprox": ("federation.prox_mu=0.1",),
    "scaffold": ("federation.scaffold=true",)}
OPTIMIZER_METHODS = {"FedAvg": ("method.name='fedavg'",),
                     "AoH": (*AOH, "method.aoh.sparsity=0.9")}
OPTIMIZER_PARTITIONS = ("iid", "dir0.5", "dir0.1")
OPTIMIZER_SEEDS = (0, 1, 2)


def optimizers(seeds: tuple[int, ...] = OPTIMIZER_SEEDS) -> list[Variant]:
    """Issue 18: FedAvg-LoRA and AoH at 90 % with every option of `OPTIMIZERS`, on IID and
    Dirichlet 0.5 / 0.1 data, per seed (labels ``<method>-<partition>-s<seed>-<option>``).
    Seed-major, so that a partial run holds whole seeds."""
    return [Variant(f"{m}-{p}-s{seed}-{o}", (*extra, *PARTITIONS[p], *OPTIMIZERS[o],
                                            f"run.seed={seed}", "run.count_flops=false"))
            for seed in seeds for p in OPTIMIZER_PARTITIONS
            for m, extra in OPTIMIZER_METHODS.items() for o in OPTIMIZERS]


# issue 15: FedAvg-LoRA on 20 clients / 10 per round with 20 % attackers, every attack under
# every robust rule (f = 2 expected attackers per round; Multi-Krum keeps n - f = 8; trimmed
# mean cuts 20 % at each end; Bulyan's bound n >= 4f + 3 allows f = 1 of 10: Krum keeps 8,
# then per coordinate the mean of the 6 nearest the median; mkmedian / mktrimmed: Multi-Krum's
# 8, then their coordinate-wise median / mean of the middle 4), against the clean run; AoH
# with importance inflation, plain and with normalised, capped head weights. Scaling is by 100:
# by attack.scale's default 10 (also IPM's epsilon, so the default stays) plain FedAvg dips
# mid-run but ends within a point of clean: a scaled honest update is a longer step the right way.
ATTACKS = ("clean", "sign_flip", "scaling", "noise", "alie", "ipm", "label_flip")
ATTACK_OPTIONS = {"scaling": ("attack.scale=100.0",)}
DEFENCES = {"mean": (), "median": ("federation.robust='median'",),
            "trimmed": ("federation.robust='trimmed_mean'", "federation.robust_trim=0.2"),
            "krum": ("federation.robust='krum'", "federation.robust_f=2"),
            "multikrum": ("federation.robust='multikrum'", "federation.robust_f=2"),
            "bulyan": ("federation.robust='bulyan'", "federation.robust_f=1"),
            "mkmedian": ("federation.robust='multikrum'", "federation.robust_f=2",
                         "federation.robust_then='median'"),
            "mktrimmed": ("federation.robust='multikrum'", "federation.robust_f=2",
                          "federation.robust_then='trimmed_mean'", "federation.robust_trim=0.25")}
ROBUST_BASE = ("federation.num_clients=20", "federation.clients_per_round=10",
               "attack.fraction=0.2", "run.count_flops=false")


def robustness() -> list[Variant]:
    """Issue 15: labels ``<method>-<attack>-<defence>``."""
    def attack(a: str) -> tuple[str, ...]:
        return () if a == "clean" else (f"attack.kind='{a}'", *ATTACK_OPTIONS.get(a, ()))

    out = [Variant(f"FedAvg-{a}-{d}", (*ROBUST_BASE, "method.name='fedavg'", *attack(a), *o))
           for a in ATTACKS for d, o in DEFENCES.items()]
    capped = ("method.aoh.normalize_alpha=true", "method.aoh.share_cap=0.5")
    out += [Variant(f"AoH-{a}-{d}", (*ROBUST_BASE, *AOH, "method.aoh.sparsity=0.9",
                                     *attack(a), *o))
            for a in ("clean", "alpha_inflation") for d, o in (("mean", ()), ("capped", capped))]
    return out


# issue 15 item 7: DP-FedAvg's accuracy against epsilon — FedAvg-LoRA and AoH (90 %) on 20
# clients, Poisson sampling of 10 per round on average, clipping C = 0.5, noise multipliers
# z; AoH also with noise on its head scores (dp.alpha_std). No-DP runs are the reference.
PRIVACY_BASE = ("federation.num_clients=20", "federation.clients_per_round=10",
                "federation.selection='poisson'", "federation.min_valid_updates=0",
                "run.count_flops=false")
PRIVACY_CLIP = "dp.clip_norm=0.5"
PRIVACY_Z = (0.3, 0.6, 1.0, 2.0)


def privacy() -> list[Variant]:
    """Labels ``<method>-nodp`` and ``<method>-z<z>[-a<alpha_std>]``."""
    methods = {"FedAvg": ("method.name='fedavg'",),
               "AoH": ("method.name='aoh'", "method.aoh.sparsity=0.9")}
    out = []
    for m, extra in methods.items():
        out.append(Variant(f"{m}-nodp", (*PRIVACY_BASE, *extra)))
        out += [Variant(f"{m}-z{z}", (*PRIVACY_BASE, *extra, PRIVACY_CLIP,
                                      f"dp.noise_multiplier={z}")) for z in PRIVACY_Z]
    out += [Variant(f"AoH-z1.0-a{a}", (*PRIVACY_BASE, *methods["AoH"], PRIVACY_CLIP,
                                       "dp.noise_multiplier=1.0", f"dp.alpha_std={a}"))
            for a in (0.05, 0.2)]
    return out


# issue 13 item 6 (AoH Table 3): each PEFT method with FedAvg and with AoH at rising sparsity.
# Learning rates are the methods' usual ones, not tuned here: LoRA 1e-3 (the base), IA3 3e-3
# (Liu et al. 2022), prompt tuning 3e-2 (AdamW; Lester et al. used 0.3 with Adafactor),
# P-tuning v2 1e-2 (Liu et al. 2022 searched 5e-3 ... 1e-2 for BERT-sized encoders), full
# fine-tuning 5e-5 (BERT's fine-tuning range). Measured on AMD EPYC Zen 4 (bf16, one thread
# beside the tasks suite): the 21 runs take 27 min; peft, tasks and backbones together 35 min
# wall on 2 cores (66 process-minutes; README, "Tasks and backbones").
PEFT_VARIANTS = {"lora-r4": ("peft.r=4", "peft.alpha=8.0"),
                 "lora-r8": ("peft.r=8", "peft.alpha=16.0"),
                 "lora-r16": ("peft.r=16", "peft.alpha=32.0"),
                 "ia3": ("peft.method='ia3'", "federation.lr=3e-3"),
                 "prompt": ("peft.method='prompt'", "peft.prompt_head_chunks=true",
                            "federation.lr=3e-2"),
                 "prefix": ("peft.method='prefix'", "federation.lr=1e-2"),
                 "full": ("peft.method='full'", "federation.lr=5e-5")}
PEFT_SPARSITY = (0.5, 0.9)
# Evaluated after rounds 4, 8 and 12 only: evaluation is ~27 % of a MiniLM round, and the
# final accuracy (the last round is always evaluated) is what the tables report.
SUITE_EVAL_EVERY = "run.eval_every=4"


def peft(methods: tuple[str, ...] = tuple(PEFT_VARIANTS)) -> list[Variant]:
    """Labels ``<peft>-FedAvg`` and ``<peft>-AoH-s<percent>``."""
    out = []
    for m in methods:
        base = (*PEFT_VARIANTS[m], SUITE_EVAL_EVERY)
        out.append(Variant(f"{m}-FedAvg", (*base, "method.name='fedavg'")))
        out += [Variant(f"{m}-AoH-s{round(100 * s)}", (*base, *AOH, f"method.aoh.sparsity={s}"))
                for s in PEFT_SPARSITY]
    return out


# issue 13 item 6 (AoH Table 2): FedAvg and AoH at 90 % on classification and on headline
# generation, for (clients C, per round K) as the paper's 10/2, 100/2 and 1000/20.
TASK_CLIENTS = ((10, 2), (100, 2), (1000, 20))
TASK_WORLDS = {
    # MiniLM + BBC categories (the base file), every article: 1,000 clients hold >= 1 each
    "classification": ("data.max_samples=0",),
    # SmolLM2 + BBC headlines: 1,250 articles (1,000 train: 1,000 clients hold 1 each), 64
    # tokens (the article's start), 3 rounds, one final evaluation (perplexity of 250
    # headlines, ROUGE of 16 generated ones). At 10 clients one local epoch is 100 articles:
    # 3.6 TFLOPs, 79 s a round on one thread of a 2-core AMD EPYC Zen 4 in bf16 (beside a second
    # suite); the whole tasks suite 29 min.
    "headline": ("model.name='smollm2'", "data.task='bbc_headline'", "data.max_samples=1250",
                 "data.max_length=64", "federation.rounds=3", "run.eval_every=3",
                 "federation.batch_size=8", "federation.eval_batch_size=16",
                 "federation.lr=2e-3", "run.target_metric=0.3")}
TASK_SMOKE = {"classification": (),
              "headline": ("model.name='smollm2'", "data.task='bbc_headline'",
                           "data.max_samples=24", "data.max_length=48", "data.max_new_tokens=4",
                           "data.generate_samples=2", "federation.batch_size=4",
                           "federation.eval_batch_size=4")}


def tasks(clients: tuple[tuple[int, int], ...] = TASK_CLIENTS,
          worlds: dict[str, tuple[str, ...]] = TASK_WORLDS) -> list[Variant]:
    """Labels ``<task>-C<clients>K<per round>-FedAvg`` and ``...-AoH-s90``."""
    out = []
    for task, sizes in worlds.items():
        for c, k in clients:
            base = (*sizes, f"federation.num_clients={c}", f"federation.clients_per_round={k}")
            out += [Variant(f"{task}-C{c}K{k}-FedAvg", (*base, "method.name='fedavg'")),
                    Variant(f"{task}-C{c}K{k}-AoH-s90", (*base, *AOH, "method.aoh.sparsity=0.9"))]
    return out


# issue 13 item 6 (AoH Table 4): backbones at 100 clients / 2 per round, LoRA. Trained on BBC
# categories: MiniLM and SmolLM2 (a decoder with a classification head), FedAvg and AoH at
# 50 / 90 %, evaluated every 4 rounds. Untrained (`sim.published`: random weights of the
# published sizes): the paper's other families, FedAvg and AoH 90 % for one round, for bytes
# and OPs only. 10 process-minutes on AMD EPYC Zen 4 (bf16), SmolLM2's rows half of it.
BACKBONE_TRAINED = {"minilm": (), "smollm2": ("model.name='smollm2'",)}
BACKBONE_SPARSITY = (0.5, 0.9)
BACKBONE_CLIENTS = (100, 2)
_GENERATED = ("data.task='bbc_category'", "data.max_new_tokens=4", "data.generate_samples=4")
UNTRAINED_TASK = {"classification": (), "causal_lm": _GENERATED, "seq2seq": _GENERATED}


def backbones(trained: dict[str, tuple[str, ...]] = BACKBONE_TRAINED,
              sparsity: tuple[float, ...] = BACKBONE_SPARSITY,
              untrained: tuple[str, ...] = tuple(PUBLISHED),
              clients: tuple[int, int] = BACKBONE_CLIENTS) -> list[Variant]:
    """Labels ``<backbone>-FedAvg`` and ``<backbone>-AoH-s<percent>``."""
    size = (f"federation.num_clients={clients[0]}", f"federation.clients_per_round={clients[1]}")
    out = []
    for name, opts in trained.items():
        base = (*size, *opts, SUITE_EVAL_EVERY)
        out.append(Variant(f"{name}-FedAvg", (*base, "method.name='fedavg'")))
        out += [Variant(f"{name}-AoH-s{round(100 * s)}", (*base, *AOH, f"method.aoh.sparsity={s}"))
                for s in sparsity]
    for name in untrained:
        base = (*size, *UNTRAINED_TASK[PUBLISHED[name][2]], "federation.rounds=1")
        out += [Variant(f"{name}-FedAvg", (*base, "method.name='fedavg'"), published=name),
                Variant(f"{name}-AoH-s90", (*base, *AOH, "method.aoh.sparsity=0.9"),
                        published=name)]
    return out


FEDSPALLM_SMOKE = ("method.fedspallm.pruner='magnitude'", "method.fedspallm.samples=2",
                   "method.fedspallm.seq_len=32", "method.fedspallm.eval_samples=2")


def fedspallm() -> list[Variant]:
    """FedSpaLLM against its baselines (issue 12, FedPrLLM's comparison): for 4 and 8
    clients at 50 % unstructured and 2:4, the l0 mean with mask expansion, naive FedAvg of
    the pruned weights, FedAvg + magnitude re-pruning, centralized pruning on the pooled
    calibration data (one client holding all of it) and each client alone; a sparsity sweep
    (30 / 50 / 70 %) at 4 clients; the dense model. The federated runs deal the layers so
    that every layer is pruned (``cover``): all variants end at the same sparsity."""
    out = [Variant("dense", (), kind="dense")]
    settings = [(c, s, p) for c in (4, 8) for s, p in ((0.5, "unstructured"), (0.5, "2:4"))]
    settings += [(4, s, "unstructured") for s in (0.3, 0.7)]
    for clients, sparsity, pattern in settings:
        tag = f"C{clients}-" + ("2of4" if pattern == "2:4" else f"s{round(100 * sparsity)}")
        base = (f"federation.num_clients={clients}", f"federation.clients_per_round={clients}",
                "federation.rounds=1", "method.name='fedspallm'", "method.fedspallm.cover=true",
                f"method.fedspallm.sparsity={sparsity}", f"method.fedspallm.pattern='{pattern}'")
        for agg in ("l0", "fedavg", "fedavg_reprune"):
            out.append(Variant(f"{tag}-{agg}", (*base, f"method.fedspallm.aggregation='{agg}'")))
        pooled = ("federation.num_clients=1", "federation.clients_per_round=1",
                  f"method.fedspallm.pool_clients={clients}")
        out.append(Variant(f"{tag}-centralized", (*base, *pooled)))
        if sparsity == 0.5:
            out.append(Variant(f"{tag}-alone", base, kind="alone"))
    return out


PRUFED_STRATEGIES = ("top", "bottom", "symmetric", "alternate", "top-alternate", "angular",
                     "block_influence")
PRUFED_TASKS = ("bbc_headline", "bbc_category")
PRUFED_KEEP = (0.75, 0.5, 0.25)  # the pruned tiers, beside a full-depth tier
PRUFED_SEEDS = (0, 1, 2)
PRUFED_CLIENTS = 8               # two per tier, every client in every round
FULL = "full"                    # the "strategy" of the variants that drop no layer
# the roles of a variant, last in its label "<task>-s<seed>-<strategy>-<role>"
FEDERATED, EXCLUSIVE, ALONE, UNTUNED, SMALLEST = ("heteagg", "exclusive", "alone", "untuned",
                                                  "smallest")
CENTRAL = "central{}"            # central75 / central50 / central25 ; "full-central"
FULL_FED, FULL_CENTRAL = "fed", "central"
# response perplexity the tiers' models must reach for "rounds to target" (per task)
PRUFED_TARGETS = {"bbc_headline": 40.0, "bbc_category": 10.0}
MAX_NEW_TOKENS = {"bbc_headline": 12, "bbc_category": 3}  # a headline; one category word
LAST_ONLY = "run.eval_every=1000000"  # baselines: evaluated after the last round only
PRUFED_SMOKE = ("method.prufed.samples=2", "method.prufed.max_length=48",
                "method.prufed.eval_samples=2", "method.prufed.generate_samples=1",
                "method.prufed.batch_size=2",
                "method.prufed.calibration_samples=2", "federation.batch_size=2",
                "federation.rounds=1")


def prufed_label(task: str, seed: int, strategy: str, role: str) -> str:
    return f"{task}-s{seed}-{strategy}-{role}"


def parse_prufed_label(label: str) -> tuple[str, int, str, str]:
    """(task, seed, strategy, role) of a `prufed_label` (strategies may hold '-')."""
    task, seed, *strategy, role = label.split("-")
    return task, int(seed.removeprefix("s")), "-".join(strategy), role


def prufed(strategies: tuple[str, ...] = PRUFED_STRATEGIES, tasks: tuple[str, ...] = PRUFED_TASKS,
           seeds: tuple[int, ...] = PRUFED_SEEDS, clients: int = PRUFED_CLIENTS
           ) -> list[Variant]:
    """PruFed (issue 14): for every seed, task and layer-dropping strategy, one federation of
    four equal tiers — full depth and keep 0.75 / 0.5 / 0.25 by the strategy — with HeteAgg,
    against its baselines: each tier federated only within itself (exclusive); centralized
    LoRA on all clients' samples for each tier's model (one client, `pool_clients`); each
    client alone on its own samples for the same rounds x local epochs (reference kind
    "alone": mean and worst client per tier); the dropped models untuned (kind "dense": the
    initial state of every tier); every client at the smallest depth (one 0.25 tier). Per
    seed and task, strategy-independent: every client at full depth, and centralized at full
    depth.

    Every client trains in every round. Sizes: configs/prufed_suite.toml (8 clients x 4
    examples, 5 rounds, two local steps per round, max_length 64). Measured (SmolLM2-135M,
    bf16, one torch thread per process, two suite processes side by side on a 2-core AMD EPYC
    Zen 4 with AVX512-BF16): ~45 s per variant on average, ~75 s for a PruFed variant (4 tiers,
    evaluated every round), so one (task, seed) of 7 x 8 + 2 = 58 variants takes ~43 min and
    the whole suite (2 tasks x 3 seeds = 348 variants) took 2.4 h on two processes (`--only
    'bbc_headline-s0-*'` beside `--only 'bbc_category-s0-*'`, and so on). In float32
    on a loaded AVX2 EPYC (load 8-11) one PruFed variant took 884 s: there the suite takes
    about a day. The smoke path (`--smoke`: 2 strategies, 2 seeds, 4 clients, 1 round, tiny
    sizes) is 72 variants of seconds each.
    """
    tiers = (1.0, *PRUFED_KEEP)
    four = {s: (f"method.prufed.tier_keep={list(tiers)}",
                f"method.prufed.tier_strategy={['top'] + [s] * len(PRUFED_KEEP)}",
                f"method.prufed.tier_share={[1 / len(tiers)] * len(tiers)}")
            for s in (*strategies, FULL)}
    fed = (f"federation.num_clients={clients}", f"federation.clients_per_round={clients}")
    pooled = ("federation.num_clients=1", "federation.clients_per_round=1",
              f"method.prufed.pool_clients={clients}", LAST_ONLY)
    out = []
    for seed in seeds:
        for task in tasks:
            common = (f"method.prufed.task='{task}'", f"run.seed={seed}",
                      f"run.target_metric={PRUFED_TARGETS[task]}",
                      f"method.prufed.max_new_tokens={MAX_NEW_TOKENS[task]}")
            for s in strategies:
                roles = [(FEDERATED, (*fed, *four[s]), "run"),
                         (EXCLUSIVE, (*fed, *four[s], LAST_ONLY,
                                      "method.prufed.aggregation='exclusive'"), "run"),
                         *((CENTRAL.format(round(100 * k)), (*pooled, *_one_tier(k, s)), "run")
                           for k in PRUFED_KEEP),
                         (ALONE, (*fed, *four[s]), "alone"),
                         (UNTUNED, (*fed, *four[s]), "dense"),
                         (SMALLEST, (*fed, LAST_ONLY, *_one_tier(min(PRUFED_KEEP), s)), "run")]
                out += [Variant(prufed_label(task, seed, s, role), (*common, *extra), kind=kind)
                        for role, extra, kind in roles]
            out += [Variant(prufed_label(task, seed, FULL, FULL_FED),
                            (*common, *fed, LAST_ONLY, *_one_tier(1.0, "top"))),
                    Variant(prufed_label(task, seed, FULL, FULL_CENTRAL),
                            (*common, *pooled, *_one_tier(1.0, "top")))]
    return out


def _one_tier(keep: float, strategy: str) -> tuple[str, ...]:
    """Every client in one tier of keep ratio ``keep`` by ``strategy``."""
    return (f"method.prufed.tier_keep=[{keep}]", f"method.prufed.tier_strategy=['{strategy}']",
            "method.prufed.tier_share=[1.0]")


def prufed_smoke() -> list[Variant]:
    """The smoke path: two strategies, both tasks, two seeds, one client per tier."""
    return prufed(strategies=("top-alternate", "angular"), seeds=(0, 1), clients=4)


SUITES: dict[str, Callable[[], list[Variant]]] = {
    "ablation": ablation, "sparsity": sparsity, "noniid": noniid, "fedspallm": fedspallm,
    "prufed": prufed, "optimizers": optimizers, "table1": table1,
    "robustness": robustness, "privacy": privacy, "peft": peft, "tasks": tasks,
    "backbones": backbones}
BASES = {"ablation": Path("configs/suite.toml"), "sparsity": Path("configs/suite.toml"),
         "noniid": Path("configs/suite.toml"), "fedspallm": Path("configs/fedspallm.toml"),
         "prufed": Path("configs/prufed_suite.toml"), "optimizers": Path("configs/suite.toml"),
         "table1": Path("configs/paper_table1.toml"), "robustness": Path("configs/suite.toml"),
         "privacy": Path("configs/suite.toml"), "peft": Path("configs/suite.toml"),
         "tasks": Path("configs/suite.toml"), "backbones": Path("configs/suite.toml")}
SMOKES = {"fedspallm": FEDSPALLM_SMOKE, "prufed": PRUFED_SMOKE}
SMOKE_VARIANTS: dict[str, Callable[[], list[Variant]]] = {
    "prufed": prufed_smoke, "optimizers": lambda: optimizers(seeds=(0,)),
    "table1": lambda: table1(seeds=(0,)),
    "sparsity": lambda: sparsity(seeds=(0,)), "noniid": lambda: noniid(seeds=(0,)),
    "peft": lambda: [v for v in peft(("ia3", "prompt"))
                     if v.label in ("ia3-FedAvg", "ia3-AoH-s50", "prompt-AoH-s50")],
    "privacy": lambda: [v for v in privacy() if v.label in ("FedAvg-nodp", "AoH-z1.0-a0.05")],
    "tasks": lambda: tasks(((4, 2),), TASK_SMOKE),
    "backbones": lambda: backbones({"minilm": ()}, (0.9,), ("t5-small",), (4, 2))}


def observe_importance(rnd: int, state, method) -> dict:
    """Eq. 6 importance, on the current global model (before pruning), of the two
    lowest-numbered clients that hold data (0 and 1 unless a skewed partition left one
    empty), keyed by client id."""
    fed = method.fed
    observed = [c for c, ix in enumerate(fed.client_indices) if len(ix)][:2]
    out = {}
    for cid in observed:
        alpha = method.scores(state, fed.client_indices[cid], seed=cid)
        out[str(cid)] = [round(float(a), 6) for attn in method.structure.attention
                         for a in alpha[attn.path]]
    return {"alpha": out}


def variant_config(base: Path | None, overrides: list[str], variant: Variant,
                   smoke: tuple[str, ...] = ()) -> ExperimentConfig:
    """Base file, then the smoke sizes, then the user's overrides, then the variant's own
    options (they define the experiment, so nothing overrides them)."""
    return load_config(base, [*smoke, *overrides, *variant.overrides,
                              f"run.name='{variant.label}'"])


def _fedspallm_alone(cfg: ExperimentConfig, method, initial) -> dict:
    """Every client prunes all layers on its own calibration text, and each client's model
    is evaluated (mean and worst)."""
    ppl, spars, prune_s = [], [], []
    all_layers = list(range(method.num_layers))
    for cid in range(cfg.federation.num_clients):
        method.sampled = {cid: all_layers}
        local = method.local(method.downlink(initial, cid, 1), cid, seed=cid)
        scores = method.evaluate({**initial, **local.delta})
        ppl.append(scores["perplexity"])
        spars.append(scores["sparsity"])
        prune_s.append(local.metrics["prune_s"])
    return {"perplexities": ppl, "perplexity": sum(ppl) / len(ppl),
            "worst_perplexity": max(ppl), "sparsity": sum(spars) / len(spars),
            "prune_s": sum(prune_s) / len(prune_s)}


def _prufed_alone(cfg: ExperimentConfig, method, initial) -> dict:
    """Every client trains its tier's adapters on its own samples only, for the run's rounds
    (each round the same local epochs and the same per-(seed, round, client) seed as in the
    federation, the optimizer restarted as there), and its model (its tier's kept layers) is
    evaluated. Per tier t: every metric's mean over the tier's clients (``<m>_tier<t>``) and
    the worst client (``worst_<m>_tier<t>``)."""
    from fedprune.sim.runner import client_seed

    clients, train_s = [], 0.0
    for cid in range(cfg.federation.num_clients):
        tier = method.tier_of[cid]
        keys = method.state_keys[tier]
        state = dict(initial)
        for rnd in range(1, cfg.federation.rounds + 1):
            local = method.local(method.downlink(state, cid, rnd), cid,
                                 client_seed(cfg.run.seed, rnd, cid))
            train_s += local.metrics["train_s"]
            for name, delta in local.delta.items():
                state[keys[name]] = state[keys[name]] + delta
        scores = method.score(method.kept[tier], method.tier_values(state, tier))
        clients.append({"client": cid, "tier": tier, **scores})
    result: dict = {"clients": clients, "train_s": train_s}
    for tier in sorted({c["tier"] for c in clients}):
        mine = [c for c in clients if c["tier"] == tier]
        for metric, higher in method.metrics.items():
            values = [c[metric] for c in mine if c.get(metric) is not None]
            if values:
                result[f"{metric}_tier{tier}"] = sum(values) / len(values)
                result[f"worst_{metric}_tier{tier}"] = min(values) if higher else max(values)
    return result


ALONE_REFERENCES = {"fedspallm": _fedspallm_alone, "prufed": _prufed_alone}


def run_reference(cfg: ExperimentConfig, run_dir: Path, kind: str) -> None:
    """A method's non-federated references, written to ``run_dir/reference.json``:
    "dense" — the initial global state evaluated (FedSpaLLM: the unpruned model; PruFed:
    every tier's dropped model, untuned); "alone" — every client on its own data, each
    client's model evaluated (`ALONE_REFERENCES`: mean and worst)."""
    from fedprune.methods import METHODS

    kind_cls = METHODS[cfg.method.name]
    fed = kind_cls.world(cfg)
    method = kind_cls(cfg, fed)
    initial = method.initial_state()
    if kind == "dense":
        result = method.evaluate(initial)
    else:
        result = ALONE_REFERENCES[cfg.method.name](cfg, method, initial)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (run_dir / "reference.json").write_text(json.dumps({"kind": kind, **result}, indent=1))


def run_suite(name: str, base: Path | None, overrides: list[str], out: Path, *,
              smoke: bool = False, progress: bool = True, only: str = "*") -> Path:
    """Run every variant of suite ``name`` (labels matching ``only``: globs separated by
    commas) into ``out``/<variant> and write the report."""
    from fedprune.report.suites import REPORTS

    base = BASES[name] if base is None else base
    every = (SMOKE_VARIANTS.get(name, SUITES[name]) if smoke else SUITES[name])()
    variants = [v for v in every if any(fnmatch(v.label, g) for g in only.split(","))]
    todo = [v for v in variants if not (out / v.label / (
        "global.safetensors" if v.kind == "run" else "reference.json")).is_file()]
    # which variant, how many are left and the ETA (from the variants run so far)
    suite_bar = tqdm(todo, desc=f"suite {name}", unit="variant", disable=not progress,
                     initial=len(variants) - len(todo), total=len(variants), position=0)
    for v in suite_bar:
        suite_bar.set_postfix_str(v.label)
        run_dir = out / v.label
        if v.published:  # made once per suite directory
            path = published_model(v.published, out / "models" / v.published)
            v = replace(v, overrides=(*v.overrides, f"model.name='{path}'"))
        cfg = variant_config(base, overrides, v, SMOKES.get(name, SMOKE) if smoke else ())
        if v.kind != "run":
            run_reference(cfg, run_dir, v.kind)
            continue
        observer: Observer | None = observe_importance if v.observe else None
        run(cfg, run_dir, resume=(run_dir / "metrics.jsonl").is_file(), progress=progress,
            observe=observer)
    done = [v for v in every if (out / v.label / "config.json").is_file()]
    return REPORTS[name](out, done)  # every variant run so far, also by earlier calls
