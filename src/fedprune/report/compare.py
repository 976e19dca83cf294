"""`fedprune compare`: several run directories side by side.

Reads each run's resolved config (config.json) and per-round metrics (metrics.jsonl); the
config keys whose values differ between the runs become columns, and runs whose configs
differ only by ``run.seed`` form one group, reported as mean ± sample standard deviation
(ddof 1) over its seeds. Figures per run: every numeric metric of its last evaluated round
(accuracy, perplexity, ROUGE, ... whatever the method logs), the first round reaching
``run.target_metric`` and the wall seconds up to it, bytes per selected client and round,
all bytes of the run, analytic training OPs per client and round, seconds per round. Writes a
markdown table (compare.md) and one PNG (compare.png) of the metric curves on shared axes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedprune.report.metrics import read_metrics
from fedprune.report.plots import rounds_axis, save_figure
from fedprune.report.summary import method_metric, rounds_to_target

SEED = "run.seed"
BOOKKEEPING = ("run.name", "run.out_dir", "data.cache_dir", "tracking.")  # not the experiment
NOT_METRICS = {"round", "wall_s", "eval_s"}


class CompareError(ValueError):
    """A path given to `fedprune compare` is not a run directory with metrics."""


@dataclass(frozen=True)
class RunFigures:
    """What compare reads of one run directory."""

    path: Path
    config: dict[str, Any]                 # flat "section.key" -> value
    metric: str                            # the method's target metric
    final: dict[str, float]                # numeric metrics of the last evaluated round
    curves: dict[str, dict[int, float]]    # metric -> round -> value
    figures: dict[str, float | None]       # round_at_target, bytes, OPs, seconds


def flat_config(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config tables -> {"section.key": value} (``method.aoh.sparsity``)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_figures(run_dir: Path) -> RunFigures:
    """Config, final metrics, curves and cost figures of one run (partial runs too)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    records = read_metrics(run_dir)
    if not config_path.is_file() or not records:
        missing = "config.json" if not config_path.is_file() else "metrics.jsonl with a round"
        raise CompareError(f"{run_dir}: no {missing}; is it a run directory?")
    raw = json.loads(config_path.read_text())
    try:
        metric, higher = method_metric(raw)
    except KeyError:
        raise CompareError(f"{config_path}: unknown method {raw['method'].get('name')!r}") from None
    evaluated = [r for r in records if r.get(metric) is not None]
    last = evaluated[-1] if evaluated else {}
    final = {k: float(v) for k, v in last.items() if k not in NOT_METRICS and _number(v)}
    curves: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if k not in NOT_METRICS and _number(v):
                curves.setdefault(k, {})[int(r["round"])] = float(v)
    at = rounds_to_target(records, metric, raw["run"]["target_metric"], higher)
    ups = [b for r in records for b in r["bytes_up"]]
    downs = [b for r in records for b in r["bytes_down"]]
    ops = [m["train_ops"] for r in records for m in r.get("client_metrics", {}).values()
           if "train_ops" in m]
    figures = {
        "round_at_target": at,
        "seconds_to_target": (sum(r["wall_s"] for r in records if r["round"] <= at)
                              if at is not None else None),
        "bytes_up": mean(ups) if ups else None,
        "bytes_down": mean(downs) if downs else None,
        "bytes_total": float(sum(ups) + sum(downs)),
        "gops": mean(ops) / 1e9 if ops else None,
        "seconds_per_round": mean(r["wall_s"] for r in records),
    }
    return RunFigures(run_dir, flat_config(raw), metric, final, curves, figures)


def _experiment(config: dict[str, Any]) -> dict[str, Any]:
    """The keys that define the experiment (no bookkeeping such as the run name)."""
    return {k: v for k, v in config.items() if not k.startswith(BOOKKEEPING)}


def group_by_seed(runs: Sequence[RunFigures]) -> list[list[RunFigures]]:
    """Runs whose experiment configs are equal but for ``run.seed``, in order of first
    appearance."""
    groups: dict[str, list[RunFigures]] = {}
    for run in runs:
        key = json.dumps({k: v for k, v in _experiment(run.config).items() if k != SEED},
                         sort_keys=True)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def differences(runs: Sequence[RunFigures]) -> list[str]:
    """Experiment keys (``run.seed`` aside) whose values are not the same in every run."""
    configs = [_experiment(r.config) for r in runs]
    keys = sorted({k for c in configs for k in c} - {SEED})
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return mean(values), (stdev(values) if len(values) > 1 else None)


@dataclass
class Cell:
    """One figure of a group: mean ± sd over the runs that have it (n of total)."""

    mean: float | None
    sd: float | None
    n: int
    total: int

    def text(self, spec: str) -> str:
        if self.mean is None:
            return "–"
        out = format(self.mean, spec)
        if self.sd is not None:
            out += f" ± {format(self.sd, spec)}"
        return out + (f" ({self.n}/{self.total})" if self.n < self.total else "")


def cell(values: Sequence[float | None]) -> Cell:
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return Cell(None, None, 0, len(values))
    m, sd = mean_sd(present)
    return Cell(m, sd, len(present), len(values))


FIGURES = [("round at target", "round_at_target", ".3g"),
           ("s to target", "seconds_to_target", ".1f"),
           ("bytes up / client", "bytes_up", ",.0f"),
           ("bytes down / client", "bytes_down", ",.0f"),
           ("bytes in all", "bytes_total", ",.0f"),
           ("GOPs / client", "gops", ".2f"),
           ("s / round", "seconds_per_round", ".1f")]


@dataclass
class Comparison:
    """The table (headers and formatted rows, one per group), the cells behind it, and the
    files written."""

    headers: list[str]
    rows: list[list[str]]
    groups: list[dict[str, Any]] = field(default_factory=list)  # label, runs, seeds, cells
    markdown: Path | None = None
    figure: Path | None = None


def metric_columns(runs: Sequence[RunFigures]) -> list[str]:
    """Final-metric columns: the target metrics first (in run order), then the rest."""
    targets = list(dict.fromkeys(r.metric for r in runs))
    rest = sorted({k for r in runs for k in r.final} - set(targets))
    return targets + rest


def _value(value: Any) -> str:
    """A config value as a cell: strings bare, everything else as JSON (lists, true)."""
    return value if isinstance(value, str) else json.dumps(value)


def _label(group: list[RunFigures], keys: list[str]) -> str:
    config = group[0].config
    return ", ".join(f"{k}={_value(config.get(k))}" for k in keys) or group[0].path.name


def build(runs: Sequence[RunFigures]) -> Comparison:
    """The comparison table of ``runs``: one row per seed group."""
    groups, keys, metrics = group_by_seed(runs), differences(runs), metric_columns(runs)
    seeds = len({json.dumps(r.config.get(SEED)) for r in runs}) > 1
    headers = ["runs", *(["seeds"] if seeds else []), *keys, *metrics,
               *(h for h, _, _ in FIGURES)]
    out = Comparison(headers, [])
    for group in groups:
        cells = {m: cell([r.final.get(m) for r in group]) for m in metrics}
        cells.update({k: cell([r.figures[k] for r in group]) for _, k, _ in FIGURES})
        row = [", ".join(r.path.name for r in group)]
        if seeds:
            row.append(" ".join(str(r.config.get(SEED)) for r in group))
        row += [_value(group[0].config.get(k)) for k in keys]
        row += [cells[m].text(".4f") for m in metrics]
        row += [cells[k].text(spec) for _, k, spec in FIGURES]
        out.rows.append(row)
        out.groups.append({"label": _label(group, keys), "runs": [r.path for r in group],
                           "seeds": [r.config.get(SEED) for r in group], "cells": cells})
    return out


def markdown(comparison: Comparison, runs: Sequence[RunFigures], figure: str) -> str:
    head = "| " + " | ".join(comparison.headers) + " |"
    lines = [f"# Comparing {len(runs)} runs", "",
             "Runs: " + ", ".join(f"`{r.path}`" for r in runs) + ".", "",
             ("Columns after `runs` are the config keys whose values differ between the runs, "
              "then each run's final metrics (its last evaluated round), the first round "
              "reaching `run.target_metric` and the wall seconds up to it, bytes per selected "
              "client and round (measured on the payloads), all bytes of the run, analytic "
              "training GOPs per client and round and seconds per round. Runs that differ "
              "only by `run.seed` share a row: mean ± sample standard deviation over their "
              "seeds; (k/n): only k of the n runs have the figure (e.g. reached the target)."),
             "", head, "|" + "---|" * len(comparison.headers)]
    lines += ["| " + " | ".join(row) + " |" for row in comparison.rows]
    lines += ["", f"![metric curves]({figure})", ""]
    return "\n".join(lines)


def plot_curves(comparison: Comparison, runs: Sequence[RunFigures], path: Path) -> Path:
    """One panel per target metric (and validation loss, when every run logs it): each
    group's mean over its seeds by round, with a ±sd band for groups of several runs."""
    by_path = {r.path: r for r in runs}
    panels = list(dict.fromkeys(r.metric for r in runs))
    if "eval_loss" not in panels and all("eval_loss" in r.curves for r in runs):
        panels.append("eval_loss")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        for group in comparison.groups:
            curves = [by_path[p].curves.get(metric, {}) for p in group["runs"]]
            rounds = sorted(set.intersection(*(set(c) for c in curves)))
            if not rounds:
                continue
            stats = [mean_sd([c[rnd] for c in curves]) for rnd in rounds]
            means = [m for m, _ in stats]
            seeds = f" (mean of {len(curves)} seeds)" if len(curves) > 1 else ""
            ax.plot(rounds, means, marker=".", label=group["label"] + seeds)
            if len(curves) > 1:
                ax.fill_between(rounds, [m - sd for m, sd in stats],
                                [m + sd for m, sd in stats], alpha=0.2)
        ax.set(xlabel="round", ylabel=metric, title=metric)
        rounds_axis(ax)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def compare_runs(run_dirs: Sequence[Path], out_dir: Path) -> Comparison:
    """Compare ``run_dirs``; writes out_dir/compare.md and out_dir/compare.png."""
    if not run_dirs:
        raise CompareError("give at least one run directory")
    runs = [run_figures(Path(d)) for d in run_dirs]
    comparison = build(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison.figure = plot_curves(comparison, runs, out_dir / "compare.png")
    comparison.markdown = out_dir / "compare.md"
    comparison.markdown.write_text(markdown(comparison, runs, comparison.figure.name))
    return comparison
