"""Experiment suites: the paper's ablation, sparsity sweep and non-IID study as sets of runs
over one base config, each finished with a markdown report and plots (report/suites.py).

A suite directory holds one run directory per variant; a finished variant is reused and an
interrupted one resumed, so re-running a suite only does the missing work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


SUITES: dict[str, Callable[[], list[Variant]]] = {
    "ablation": ablation, "sparsity": sparsity, "noniid": noniid}
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
                   smoke: bool) -> ExperimentConfig:
    """Base file, then the smoke sizes, then the user's overrides, then the variant's own
    options (they define the experiment, so nothing overrides them)."""
    return load_config(base, [*(SMOKE if smoke else ()), *overrides, *variant.overrides,
                              f"run.name='{variant.label}'"])


def run_suite(name: str, base: Path | None, overrides: list[str], out: Path, *,
              smoke: bool = False, progress: bool = True) -> Path:
    """Run every variant of suite ``name`` into ``out``/<variant> and write the report."""
    from fedprune.report.suites import REPORTS

    variants = SUITES[name]()
    for i, v in enumerate(variants, 1):
        run_dir = out / v.label
        if (run_dir / "global.safetensors").is_file():
            continue  # finished earlier
        if progress:
            print(f"[{name} {i}/{len(variants)}] {v.label}", flush=True)
        observer: Observer | None = observe_importance if v.observe else None
        run(variant_config(base, overrides, v, smoke), run_dir,
            resume=(run_dir / "metrics.jsonl").is_file(), progress=progress, observe=observer)
    return REPORTS[name](out, variants)
