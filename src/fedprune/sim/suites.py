"""Experiment suites: the paper's ablation, sparsity sweep and non-IID study as sets of runs
over one base config, each finished with a markdown report and plots (report/suites.py).

A suite directory holds one run directory per variant; a finished variant is reused and an
interrupted one resumed, so re-running a suite only does the missing work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from fedprune.config import ExperimentConfig, load_config
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


def ablation() -> list[Variant]:
    """Paper Table 1: B1, B2, AoH x random / loss selection at 90 % sparsity, plus AoH with
    structural pruning (measured compute)."""
    s = ("method.aoh.sparsity=0.9",)
    return [
        Variant("B1-fedavg", ("method.name='fedavg'", "federation.selection='random'")),
        Variant("B2-random-heads", ("method.name='random_heads'",
                                    "federation.selection='random'",
                                    "method.random_heads.sparsity=0.9")),
        Variant("AoH-random-sel", ("method.name='aoh'", "federation.selection='random'", *s)),
        Variant("AoH-loss-sel", (*AOH, *s)),
        Variant("AoH-loss-sel-structural", (*AOH, *s, "method.aoh.mode='structural'")),
    ]


def sparsity() -> list[Variant]:
    """Paper Fig. 4: AoH (loss selection) at s = 0, 50, 70, 90, 95 %, both pruning modes."""
    return [Variant(f"AoH-{mode}-s{round(100 * s):02d}",
                    (*AOH, f"method.aoh.sparsity={s}", f"method.aoh.mode='{mode}'"))
            for mode in ("adapter", "structural") for s in (0.0, 0.5, 0.7, 0.9, 0.95)]


PARTITIONS = {"iid": ("partition.scheme='iid'",),
              **{f"dir{a}": ("partition.scheme='dirichlet'", f"partition.alpha={a}")
                 for a in (2.0, 0.5, 0.1)}}


def noniid() -> list[Variant]:
    """Paper Table 5 and Fig. 5: FedAvg and AoH on IID and Dirichlet(2.0, 0.5, 0.1) data."""
    return [Variant(f"{method}-{part}", (*extra, *p), observe=method == "AoH")
            for part, p in PARTITIONS.items()
            for method, extra in (("FedAvg", ("method.name='fedavg'",)),
                                  ("AoH", (*AOH, "method.aoh.sparsity=0.9")))]


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


SUITES: dict[str, Callable[[], list[Variant]]] = {
    "ablation": ablation, "sparsity": sparsity, "noniid": noniid, "fedspallm": fedspallm}
BASES = {"ablation": Path("configs/suite.toml"), "sparsity": Path("configs/suite.toml"),
         "noniid": Path("configs/suite.toml"), "fedspallm": Path("configs/fedspallm.toml")}
SMOKES = {"fedspallm": FEDSPALLM_SMOKE}


OBSERVED_CLIENTS = (0, 1)


def observe_importance(rnd: int, state, method) -> dict:
    """Eq. 6 importance of clients 0 and 1 on the current global model (before pruning)."""
    fed = method.fed
    out = {}
    for cid in OBSERVED_CLIENTS:
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


def run_reference(cfg: ExperimentConfig, run_dir: Path, kind: str) -> None:
    """FedSpaLLM's non-federated references, written to ``run_dir/reference.json``:
    "dense" — the unpruned model's perplexity; "alone" — every client prunes all layers on
    its own calibration text, and each client's model is evaluated (mean and worst)."""
    from fedprune.methods import METHODS

    kind_cls = METHODS[cfg.method.name]
    fed = kind_cls.world(cfg)
    method = kind_cls(cfg, fed)
    initial = method.initial_state()
    if kind == "dense":
        result = method.evaluate(initial)
    else:
        ppl, spars, prune_s = [], [], []
        all_layers = list(range(method.num_layers))
        for cid in range(cfg.federation.num_clients):
            method.sampled = {cid: all_layers}
            local = method.local(method.downlink(initial, cid, 1), cid, seed=cid)
            scores = method.evaluate({**initial, **local.delta})
            ppl.append(scores["perplexity"])
            spars.append(scores["sparsity"])
            prune_s.append(local.metrics["prune_s"])
        result = {"perplexities": ppl, "perplexity": sum(ppl) / len(ppl),
                  "worst_perplexity": max(ppl), "sparsity": sum(spars) / len(spars),
                  "prune_s": sum(prune_s) / len(prune_s)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (run_dir / "reference.json").write_text(json.dumps({"kind": kind, **result}, indent=1))


def run_suite(name: str, base: Path | None, overrides: list[str], out: Path, *,
              smoke: bool = False, progress: bool = True, only: str = "*") -> Path:
    """Run every variant of suite ``name`` (labels matching ``only``) into ``out``/<variant>
    and write the report."""
    from fedprune.report.suites import REPORTS

    base = BASES[name] if base is None else base
    variants = [v for v in SUITES[name]() if fnmatch(v.label, only)]
    for i, v in enumerate(variants, 1):
        run_dir = out / v.label
        done = run_dir / ("global.safetensors" if v.kind == "run" else "reference.json")
        if done.is_file():
            continue  # finished earlier
        if progress:
            print(f"[{name} {i}/{len(variants)}] {v.label}", flush=True)
        cfg = variant_config(base, overrides, v, SMOKES.get(name, SMOKE) if smoke else ())
        if v.kind != "run":
            run_reference(cfg, run_dir, v.kind)
            continue
        observer: Observer | None = observe_importance if v.observe else None
        run(cfg, run_dir, resume=(run_dir / "metrics.jsonl").is_file(), progress=progress,
            observe=observer)
    done = [v for v in SUITES[name]() if (out / v.label / "config.json").is_file()]
    return REPORTS[name](out, done)  # every variant run so far, also by earlier calls
