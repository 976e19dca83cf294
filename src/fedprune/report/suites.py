"""Suite reports: markdown tables and PNG figures over a suite's run directories."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from safetensors.torch import load_file

from fedprune.report.metrics import read_metrics
from fedprune.report.plots import rounds_axis, save_figure
from fedprune.report.summary import rounds_to_target, summarize


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _row(label: str, run_dir: Path) -> dict[str, Any]:
    s = summarize(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    return {"label": label, "cfg": cfg, **s}


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (header, key, format spec)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for _, k, f in columns) + " |")
    return "\n".join(lines)


COLUMNS = [("variant", "label", ""), ("final acc", "final_accuracy", ".4f"),
           ("best acc", "best_accuracy", ".4f"), ("round at target", "round_at_target", ""),
           ("s to target", "seconds_to_target", ",.0f"),
           ("KiB up / client", "kib_up", ",.1f"), ("analytic GOPs / client", "gops", ",.2f"),
           ("measured GFLOPs / client", "gflops", ",.2f"),
           ("heads trained", "heads_trained", ".3f"), ("s / round", "seconds_per_round", ".1f")]


def _enrich(row: dict[str, Any]) -> dict[str, Any]:
    row["kib_up"] = row["bytes_up_per_client"] / 1024
    ops, flops = row["train_ops_per_client"], row["train_flops_measured_per_client"]
    row["gops"] = None if ops is None else ops / 1e9
    row["gflops"] = None if flops is None else flops / 1e9
    return row


def _rows(suite_dir: Path, variants) -> list[dict[str, Any]]:
    return [_enrich(_row(v.label, suite_dir / v.label)) for v in variants]


def _header(title: str, rows: list[dict[str, Any]], peft: str | None = None) -> list[str]:
    """Title and set-up line (``peft``: what clients train, if not the first row's)."""
    cfg = rows[0]["cfg"]
    f, d, pc = cfg["federation"], cfg["data"], cfg["peft"]
    peft = peft or (f"LoRA r={pc['r']}" if pc.get("method", "lora") == "lora" else
                    f"peft.method {pc['method']}")
    setup = (f"Model `{cfg['model']['name']}`, data `{d['dataset']}` (max_samples "
             f"{d['max_samples'] or 'all'}, max_length {d['max_length']}), {f['num_clients']} "
             f"clients, {f['clients_per_round']} per round, {f['rounds']} rounds, {peft}, "
             f"{_seeds_phrase(rows)}. Target accuracy "
             f"{rows[0]['target']}. Bytes are measured on the serialized payloads; analytic "
             f"OPs from core/accounting.py, measured FLOPs by torch FlopCounterMode.")
    return [f"# {title}", "", setup, ""]


def _seeds_phrase(rows: list[dict[str, Any]]) -> str:
    """'seed 0' or 'seeds 0, 1, 2': the seeds the rows were run at."""
    seeds = sorted({r["cfg"]["run"]["seed"] for r in rows})
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def _curves(suite_dir: Path, variants, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        recs = [r for r in read_metrics(suite_dir / v.label) if r.get("accuracy") is not None]
        ax.plot([r["round"] for r in recs], [r["accuracy"] for r in recs], marker=".",
                label=v.label)
    ax.set(xlabel="round", ylabel="validation accuracy", title=title)
    rounds_axis(ax)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _against(rows: list[dict], base: str, labels: tuple[str, ...], title: str) -> list[str]:
    """Upload, OPs and accuracy of the rows whose label starts with one of ``labels`` against
    the row labelled ``base`` (nothing when it has not run)."""
    ref = next((r for r in rows if r["label"] == base), None)
    lines = [f"- {r['label']}: upload {ref['kib_up'] / r['kib_up']:.2f}x smaller"
             + (f", analytic training OPs {ref['gops'] / r['gops']:.2f}x smaller"
                if r["gops"] else "")
             + (f", measured FLOPs {ref['gflops'] / r['gflops']:.2f}x smaller"
                if r["gflops"] else "")
             + f", accuracy {100 * (r['final_accuracy'] - ref['final_accuracy']):+.1f} points"
             for r in rows if ref is not None and r is not ref and r["label"].startswith(labels)]
    return [title, *lines, ""] if lines else []


def ablation_report(suite_dir: Path, variants) -> Path:
    rows = _rows(suite_dir, variants)
    _curves(suite_dir, variants, suite_dir / "accuracy_curves.png",
            "Ablation: accuracy over rounds (Fig. 3)")
    text = [*_header("Ablation (paper Table 1)", rows), _table(rows, COLUMNS), "",
            *_against(rows, "B1-fedavg", ("",), "Against B1 (FedAvg):"),
            *_against(rows, "AoH-loss-sel", ("AoH-loss-sel-",),
                      "Against AoH's adapter mode (AoH-loss-sel):"),
            "![accuracy curves](accuracy_curves.png)", ""]
    return _write(suite_dir, text)


def _seed_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by label without its ``-s<seed>`` suffix, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["label"].rsplit("-s", 1)[0], []).append(r)
    return groups


def _finished(suite_dir: Path, variants) -> list:
    return [v for v in variants if (suite_dir / v.label / "global.safetensors").is_file()]


def sparsity_report(suite_dir: Path, variants) -> Path:
    """Fig. 4: per mode and sparsity, mean ± sd over the seeds run of final accuracy and
    rounds to target; upload, analytic OPs and heads trained; the three against sparsity."""
    rows = _rows(suite_dir, _finished(suite_dir, variants))
    if not rows:
        return _write(suite_dir, ["# Sparsity sweep (paper Fig. 4)", "", "No finished run yet."])
    points = {}  # (mode, sparsity) -> rows over seeds
    for rs in _seed_groups(rows).values():
        options = rs[0]["cfg"]["method"]["aoh"]
        points[(options["mode"], options["sparsity"])] = rs
    table = [("| mode | sparsity | seeds | final acc | round at target | KiB up / client | "
              "analytic GOPs / client | heads trained |"), "|---|---|---|---|---|---|---|---|"]
    for (mode, sp), rs in sorted(points.items()):
        reached = [r["round_at_target"] for r in rs if r["round_at_target"] is not None]
        table.append(
            f"| {mode} | {sp:.2f} | {len(rs)} | "
            f"{mean_sd([r['final_accuracy'] for r in rs], '.4f')} | "
            f"{mean_sd(reached, '.1f')} ({len(reached)}/{len(rs)} reached) | "
            f"{np.mean([r['kib_up'] for r in rs]):,.1f} | "
            f"{mean_sd([r['gops'] for r in rs if r['gops'] is not None], ',.2f')} | "
            f"{mean_sd([r['heads_trained'] for r in rs if r['heads_trained'] is not None], '.3f')} |")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for mode in ("adapter", "structural"):
        # sparsity 0 prunes nothing: the structural curve starts from the adapter run
        if not any(m == mode and sp > 0 for m, sp in points):
            continue  # a mode is plotted only where it has runs of its own
        sel = sorted((sp, rs) for (m, sp), rs in points.items() if m == mode or sp == 0)
        xs = [100 * sp for sp, _ in sel]
        for ax, key, label in zip(axes, ("final_accuracy", "kib_up", "gops"),
                                  ("final accuracy (mean ± sd over seeds)",
                                   "KiB up / client / round",
                                   "analytic training GOPs / client / round"), strict=True):
            vals = [[r[key] for r in rs if r[key] is not None] for _, rs in sel]
            ax.errorbar(xs, [np.mean(v) if v else np.nan for v in vals],
                        yerr=[_stats(v)[1] if v else 0.0 for v in vals], marker="o", capsize=3,
                        label=mode)
            ax.set(xlabel="head sparsity (%)", ylabel=label)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("AoH against sparsity (Fig. 4)")
    save_figure(fig, suite_dir / "sparsity.png")
    text = [*_header("Sparsity sweep (paper Fig. 4)", rows), *table, "",
            "![sparsity](sparsity.png)", "", _table(rows, COLUMNS), ""]
    return _write(suite_dir, text)


def noniid_report(suite_dir: Path, variants) -> Path:
    """Table 5 / Fig. 5: per partition, FedAvg's and AoH's final accuracy (mean ± sd over the
    seeds run) and AoH − FedAvg paired by seed; two clients' head importance over rounds."""
    rows = _rows(suite_dir, _finished(suite_dir, variants))
    if not rows:
        return _write(suite_dir, ["# Non-IID (paper Table 5, Fig. 5)", "", "No finished run yet."])
    acc = {r["label"]: r["final_accuracy"] for r in rows}
    keys = [tuple(label.rsplit("-s", 1)[0].split("-", 1)) + (label.rsplit("-s", 1)[1],)
            for label in acc]  # (method, partition, seed)
    parts = list(dict.fromkeys(k[1] for k in keys))
    table = ["| partition | seeds | FedAvg acc | AoH acc | AoH − FedAvg (points, paired) |",
             "|---|---|---|---|---|"]
    for p in parts:
        seeds = [k[2] for k in keys if k[:2] == ("AoH", p) and ("FedAvg", p, k[2]) in keys]
        fa = [acc[f"FedAvg-{p}-s{s}"] for s in seeds]
        ao = [acc[f"AoH-{p}-s{s}"] for s in seeds]
        diff = [100 * (a - f) for a, f in zip(ao, fa, strict=True)]
        table.append(f"| {p} | {len(seeds)} | {mean_sd(fa, '.4f')} | {mean_sd(ao, '.4f')} | "
                     f"{mean_sd(diff, '+.1f')} |")
    aoh = {p: [f"AoH-{p}-s{k[2]}" for k in keys if k[:2] == ("AoH", p)] for p in parts}
    dist = _importance_figure(suite_dir, {p: labels for p, labels in aoh.items() if labels})
    text = [*_header("Non-IID (paper Table 5, Fig. 5)", rows), *table, "",
            ("Head importance (Eq. 6) of the two lowest-numbered clients that hold data (0 and "
             "1 unless a partition left one empty) on the global model every round, and "
             "the Euclidean distance between them (mean over rounds and seeds): "
             + ", ".join(f"{p} {d:.3f}" for p, d in dist.items())), "",
            "![importance](importance.png)", "", _table(rows, COLUMNS), ""]
    return _write(suite_dir, text)


def _observed_alpha(run_dir: Path) -> dict[str, np.ndarray]:
    """The two observed clients' ids -> [n_heads, rounds] importance logged by the suite's
    observer, in client-id order."""
    recs = [r for r in read_metrics(run_dir) if "observed" in r]
    return {c: np.array([r["observed"]["alpha"][c] for r in recs]).T
            for c in recs[0]["observed"]["alpha"]}


def _importance_figure(suite_dir: Path, runs: dict[str, list[str]]) -> dict[str, float]:
    """Heatmaps of the two observed clients (first run of the first and the last partition
    of `runs`: partition -> AoH run labels) and their distance; returns the mean distance
    over rounds and runs for every partition."""
    alpha = {p: [_observed_alpha(suite_dir / label) for label in labels]
             for p, labels in runs.items()}
    dist = {p: [np.linalg.norm(np.subtract(*a.values()), axis=0) for a in runs_alpha]
            for p, runs_alpha in alpha.items()}
    parts = list(runs)
    shown = [parts[0], parts[-1]]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    vmax = max(a.max() for p in shown for a in alpha[p][0].values())
    for row, part in enumerate(shown):
        for col, c in enumerate(alpha[part][0]):
            heads, rounds = alpha[part][0][c].shape
            im = axes[row, col].imshow(alpha[part][0][c], aspect="auto", vmin=0, vmax=vmax,
                                       cmap="viridis", interpolation="nearest",
                                       extent=(0.5, rounds + 0.5, heads - 0.5, -0.5))
            axes[row, col].set(title=f"{runs[part][0]}: client {c}", xlabel="round",
                               ylabel="head (layer-major)")
            fig.colorbar(im, ax=axes[row, col])
        for label, d in zip(runs[part], dist[part], strict=True):
            axes[row, 2].plot(range(1, len(d) + 1), d, marker=".", label=label)
        axes[row, 2].set(title=f"{part}: ||alpha_a - alpha_b|| of the two clients",
                         xlabel="round")
        axes[row, 2].grid(alpha=0.3)
        axes[row, 2].legend(fontsize=7)
    fig.suptitle("Head importance over rounds, IID vs non-IID (Fig. 5)")
    save_figure(fig, suite_dir / "importance.png", dpi=100)
    return {p: float(np.mean([d.mean() for d in ds])) for p, ds in dist.items()}


def _write(suite_dir: Path, lines: list[str]) -> Path:
    path = suite_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _fedspallm_row(suite_dir: Path, v) -> dict[str, Any] | None:
    """One variant's figures, from its run (metrics) or its reference.json; None if absent."""
    run_dir = suite_dir / v.label
    if not (run_dir / "config.json").is_file():
        return None
    cfg = json.loads((run_dir / "config.json").read_text())
    o = cfg["method"].get("fedspallm", {})
    row = {"label": v.label, "clients": o.get("pool_clients") or cfg["federation"]["num_clients"],
           "pruner": o.get("pruner")}
    if v.kind != "dense":
        row.update(target_sparsity=o.get("sparsity"), pattern=o.get("pattern"))
    if v.kind != "run":
        if not (run_dir / "reference.json").is_file():
            return None
        ref = json.loads((run_dir / "reference.json").read_text())
        return {**row, "perplexity": ref["perplexity"], "worst": ref.get("worst_perplexity"),
                "sparsity": ref["sparsity"], "prune_s": ref.get("prune_s")}
    if not (run_dir / "global.safetensors").is_file():
        return None
    recs = read_metrics(run_dir)
    last = next(r for r in reversed(recs) if r.get("perplexity") is not None)
    clients = [m for r in recs for m in r["client_metrics"].values()]
    ups = [b for r in recs for b in r["bytes_up"]]
    downs = [b for r in recs for b in r["bytes_down"]]
    final = load_file(run_dir / "global.safetensors")
    pruned = [float((w == 0).float().mean()) for w in final.values() if (w == 0).any()]
    return {**row, "perplexity": last["perplexity"], "sparsity": last["sparsity"],
            "matrix_s": f"{min(pruned):.4f}–{max(pruned):.4f} ({len(pruned)})" if pruned
            else "–",
            "kib_up": np.mean(ups) / 1024, "kib_down": np.mean(downs) / 1024,
            "prune_s": np.mean([m["prune_s"] for m in clients]) if clients else None,
            "seconds": np.mean([r["wall_s"] for r in recs])}


FEDSPALLM_COLUMNS = [("variant", "label", ""), ("clients", "clients", ""),
                     ("pattern", "pattern", ""), ("target s", "target_sparsity", ".2f"),
                     ("achieved s (all Linears)", "sparsity", ".4f"),
                     ("s per pruned matrix (n)", "matrix_s", ""),
                     ("perplexity", "perplexity", ",.2f"), ("worst client", "worst", ",.2f"),
                     ("KiB up / client", "kib_up", ",.0f"), ("KiB down / client", "kib_down",
                                                             ",.0f"),
                     ("prune s / client", "prune_s", ".1f"), ("s / round", "seconds", ".1f")]


def fedspallm_report(suite_dir: Path, variants) -> Path:
    rows = [r for v in variants if (r := _fedspallm_row(suite_dir, v)) is not None]
    by = {r["label"]: r for r in rows}
    lines = ["# FedSpaLLM against its baselines", "",
             ("Perplexity of the global (or reference) model on the held-out test parts of the "
             "bundled books; sparsity over every decoder Linear weight (the matrices no client "
             "sampled stay dense, so 'achieved s' can be below the target); bytes measured on "
             "the payloads. `dense`: no pruning; `l0`: FedSpaLLM (l0 mean + mask expansion); "
             "`fedavg`: plain mean of the pruned weights; `fedavg_reprune`: that mean, then "
             "magnitude re-pruning; `centralized`: one client with every client's calibration "
             "text; `alone`: each client prunes every layer on its own text (mean and worst "
             "over the clients' models)."), "", _table(rows, FEDSPALLM_COLUMNS), ""]
    for tag in sorted({r["label"].rsplit("-", 1)[0] for r in rows if "-" in r["label"]}):
        get = {agg: by.get(f"{tag}-{agg}") for agg in ("l0", "fedavg_reprune", "centralized")}
        if all(get.values()):
            lines.append(f"- {tag}: l0 {get['l0']['perplexity']:.2f} vs FedAvg + re-prune "
                         f"{get['fedavg_reprune']['perplexity']:.2f} at equal sparsity; "
                         f"centralized {get['centralized']['perplexity']:.2f}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for agg, marker in (("l0", "o"), ("fedavg_reprune", "s"), ("centralized", "^"),
                        ("fedavg", "x")):
        pts = sorted((r["sparsity"], r["perplexity"]) for r in rows
                     if r["label"].endswith(f"-{agg}") and r["label"].startswith("C4-s"))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=agg)
    if "dense" in by:
        ax.axhline(by["dense"]["perplexity"], color="grey", linestyle="--", label="dense")
    ax.set(xlabel="achieved sparsity (all decoder Linears)", ylabel="perplexity (held out)",
           yscale="log",
           title=f"FedSpaLLM, 4 clients, {rows[-1]['pruner'] if rows else '?'}, unstructured")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, suite_dir / "perplexity_sparsity.png")
    lines += ["", "![perplexity against sparsity](perplexity_sparsity.png)", ""]
    return _write(suite_dir, lines)


REPORTS = {"ablation": ablation_report, "sparsity": sparsity_report, "noniid": noniid_report,
           "fedspallm": fedspallm_report}


# --- PruFed ----------------------------------------------------------------------------------

FED, EXCL, CENTRAL, ALONE, UNTUNED, ONE_DEPTH = ("federated", "exclusive", "centralized",
                                                 "alone", "untuned", "one-depth")
ROLE_TITLES = {FED: "PruFed (HeteAgg)", EXCL: "exclusive", CENTRAL: "centralized",
               ALONE: "alone (mean)", "alone_worst": "alone (worst)", UNTUNED: "untuned",
               ONE_DEPTH: "one-depth federation"}
SCORES = ("rougeL", "exact_match")  # the generation score of bbc_headline / bbc_category


def _prufed_role(kind: str, o: dict) -> str:
    """A variant's role, read from its config: references by kind; pooled = centralized;
    exclusive; one tier for every client = a one-depth federation; else PruFed."""
    if kind == "alone":
        return ALONE
    if kind == "dense":
        return UNTUNED
    if o.get("pool_clients"):
        return CENTRAL
    if o["aggregation"] == "exclusive":
        return EXCL
    return ONE_DEPTH if len(o["tier_keep"]) == 1 else FED


def _prufed_entries(suite_dir: Path, v) -> list[dict[str, Any]]:
    """One entry per tier model of a finished variant: task, seed, strategy ("full" for a
    full-depth-only variant), role, keep, perplexity, score (and the worst client's for
    "alone"), round at target (PruFed)."""
    run_dir = suite_dir / v.label
    cfg = json.loads((run_dir / "config.json").read_text())
    o = cfg["method"]["prufed"]
    role = _prufed_role(v.kind, o)
    keeps, strategies = o["tier_keep"], o["tier_strategy"]
    # the federation's strategy: its smallest tier's (a lone full-depth tier: "full")
    strategy = strategies[keeps.index(min(keeps))] if min(keeps) < 1 else "full"
    if v.kind == "run":
        if not (run_dir / "global.safetensors").is_file():
            return []
        recs = read_metrics(run_dir)
        values = next(r for r in reversed(recs) if r.get("perplexity") is not None)
    else:
        if not (run_dir / "reference.json").is_file():
            return []
        recs, values = [], json.loads((run_dir / "reference.json").read_text())
    target = cfg["run"]["target_metric"]
    out = []
    for t, keep in enumerate(keeps):
        score = next((s for s in SCORES if values.get(f"{s}_tier{t}") is not None), None)
        entry = {"label": v.label, "task": o["task"], "seed": cfg["run"]["seed"],
                 "strategy": strategy, "role": role, "keep": keep,
                 "perplexity": values[f"perplexity_tier{t}"], "score_name": score,
                 "score": values.get(f"{score}_tier{t}") if score else None,
                 "round_at_target": rounds_to_target(recs, f"perplexity_tier{t}", target,
                                                     False) if recs else None,
                 "rounds": cfg["federation"]["rounds"]}
        out.append(entry)
        if role == ALONE:
            out.append({**entry, "role": "alone_worst",
                        "perplexity": values[f"worst_perplexity_tier{t}"],
                        "score": values.get(f"worst_{score}_tier{t}") if score else None})
    return out


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def mean_sd(values: Sequence[float], spec: str) -> str:
    """'mean ± sd' over seeds ('mean' for one seed, '–' for none)."""
    if not values:
        return "–"
    m, sd = _stats(values)
    return format(m, spec) if len(values) == 1 else f"{format(m, spec)} ± {format(sd, spec)}"


class PruFedResults:
    """The suite's tier models, indexed by (task, strategy, keep, role) -> {seed: entry}.
    Strategy-independent rows (centralized and the one-depth federation at full depth)
    answer for every strategy."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = entries
        self.cells: dict[tuple, dict[int, dict]] = {}
        for e in entries:
            self.cells.setdefault((e["task"], e["strategy"], e["keep"], e["role"]), {})[
                e["seed"]] = e
        self.tasks = list(dict.fromkeys(e["task"] for e in entries))
        self.strategies = list(dict.fromkeys(e["strategy"] for e in entries
                                             if e["strategy"] != "full"))
        self.keeps = sorted({e["keep"] for e in entries if e["keep"] < 1}, reverse=True)
        self.seeds = sorted({e["seed"] for e in entries})

    def get(self, task: str, strategy: str, keep: float, role: str) -> dict[int, dict]:
        cell = self.cells.get((task, strategy, keep, role))
        if cell is None and keep == 1.0:
            cell = self.cells.get((task, "full", keep, role))
        return cell or {}

    def values(self, task, strategy, keep, role, metric="perplexity") -> list[float]:
        cell = self.get(task, strategy, keep, role)
        return [cell[s][metric] for s in sorted(cell) if cell[s][metric] is not None]

    def compare(self, task, strategy, keep, role, metric="perplexity", higher=False
                ) -> str | None:
        """PruFed's tier model against a counterpart, paired by seed: 'beats' when the mean
        difference favours PruFed by more than the sd of the paired differences (any margin
        with one seed), 'matches' within it, else 'worse'; None without a common seed."""
        fed = self.get(task, strategy, keep, FED)
        other = self.get(task, strategy, keep, role)
        seeds = [s for s in sorted(fed) if s in other and fed[s][metric] is not None
                 and other[s][metric] is not None]
        if not seeds:
            return None
        sign = 1 if higher else -1  # > 0: PruFed better
        m, sd = _stats([sign * (fed[s][metric] - other[s][metric]) for s in seeds])
        return "beats" if m > sd else ("matches" if m >= -sd else "worse")


def _prufed_table(res: PruFedResults, task: str, metric: str, spec: str) -> list[str]:
    keeps = [*res.keeps, 1.0]
    roles = [FED, EXCL, CENTRAL, ALONE, "alone_worst", UNTUNED, ONE_DEPTH]
    head = ["strategy", "keep", *(ROLE_TITLES[r] for r in roles)]
    if metric == "perplexity":
        head += ["rounds to target (reached)", "vs centralized", "vs alone"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    higher = metric != "perplexity"
    for strategy in res.strategies:
        for keep in keeps:
            cells = [mean_sd(res.values(task, strategy, keep, r, metric), spec) for r in roles]
            if metric == "perplexity":
                fed = res.get(task, strategy, keep, FED)
                hit = [fed[s]["round_at_target"] for s in sorted(fed)
                       if fed[s]["round_at_target"] is not None]
                cells.append(f"{np.mean(hit):.1f} ({len(hit)}/{len(fed)})" if hit
                             else f"– (0/{len(fed)})")
                cells += [res.compare(task, strategy, keep, r, metric, higher) or "–"
                          for r in (CENTRAL, ALONE)]
            lines.append(f"| {strategy} | {keep:g} | " + " | ".join(cells) + " |")
    return lines


def prufed_best_strategy(res: PruFedResults, metric: str = "perplexity",
                         tasks: Sequence[str] | None = None
                         ) -> tuple[str | None, dict[str, float]]:
    """The strategy whose PruFed tier models are best on average over the pruned tiers and
    ``tasks`` (default: all; seeds averaged per cell first; perplexity through its log, i.e.
    a geometric mean); only strategies with every (task, tier) cell count. Returns (best,
    strategy -> its average)."""
    higher = metric != "perplexity"
    avg = {}
    for strategy in res.strategies:
        cells = [res.values(t, strategy, k, FED, metric) for t in (tasks or res.tasks)
                 for k in res.keeps]
        if not cells or not all(cells):
            continue
        per = [np.mean(np.log(c)) if not higher else np.mean(c) for c in cells]
        avg[strategy] = float(np.exp(np.mean(per))) if not higher else float(np.mean(per))
    if not avg:
        return None, avg
    best = (max if higher else min)(avg, key=avg.get)
    return best, avg


def _prufed_figures(res: PruFedResults, suite_dir: Path) -> None:
    keeps = [*res.keeps, 1.0]
    xs = np.arange(len(res.strategies))
    fig, axes = plt.subplots(1, len(res.tasks), figsize=(6.5 * len(res.tasks), 4.5),
                             squeeze=False)
    width = 0.8 / len(keeps)
    for ax, task in zip(axes[0], res.tasks, strict=True):
        for i, keep in enumerate(keeps):
            stats = [(_stats(v) if (v := res.values(task, s, keep, FED)) else (np.nan, 0.0))
                     for s in res.strategies]
            ax.bar(xs + (i - (len(keeps) - 1) / 2) * width, [m for m, _ in stats], width,
                   yerr=[sd for _, sd in stats], capsize=2, label=f"keep {keep:g}")
        ax.set_xticks(xs, res.strategies, rotation=30, ha="right")
        ax.set(yscale="log", ylabel="response perplexity (PruFed tier model)", title=task)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle("PruFed: perplexity per layer-dropping strategy and tier (mean ± sd over "
                 "seeds)")
    save_figure(fig, suite_dir / "prufed_strategies.png")

    roles = [(FED, "o"), (CENTRAL, "^"), (ALONE, "s"), (EXCL, "x"), (UNTUNED, "v")]
    fig, axes = plt.subplots(len(res.tasks), len(keeps), squeeze=False,
                             figsize=(4.2 * len(keeps), 3.8 * len(res.tasks)))
    for row, task in enumerate(res.tasks):
        for col, keep in enumerate(keeps):
            ax = axes[row, col]
            for j, (role, marker) in enumerate(roles):
                stats = [(_stats(v) if (v := res.values(task, s, keep, role)) else
                          (np.nan, 0.0)) for s in res.strategies]
                ax.errorbar(xs + (j - 2) * 0.08, [m for m, _ in stats],
                            yerr=[sd for _, sd in stats], marker=marker, linestyle="",
                            capsize=2, label=ROLE_TITLES[role])
            ax.set_xticks(xs, res.strategies, rotation=30, ha="right", fontsize=7)
            ax.set(yscale="log", title=f"{task}, keep {keep:g}", ylabel="perplexity")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("PruFed tier models against their non-federated counterparts")
    save_figure(fig, suite_dir / "prufed_counterparts.png", dpi=100)


def prufed_report(suite_dir: Path, variants) -> Path:
    entries = [e for v in variants for e in _prufed_entries(suite_dir, v)]
    res = PruFedResults(entries)
    first = json.loads((suite_dir / variants[0].label / "config.json").read_text())
    f, o = first["federation"], first["method"]["prufed"]
    lines = ["# PruFed: layer-dropping strategies and tiers against the baselines", "",
             (f"Model `{first['model']['name']}`, LoRA r={first['peft']['r']}, {f['rounds']} "
              f"rounds, {o['samples']} samples per client, max_length {o['max_length']}, "
              f"{o['eval_samples']} validation rows (response perplexity; ROUGE-L / exact "
              f"match on {o['generate_samples']} greedy answers). Seeds {res.seeds}; cells "
              f"are mean ± sd over them. Variants finished: {len({e['label'] for e in entries})}"
              f" of {len(variants)}."), "",
             ("Rows: the tier model of keep ratio r (r = 1: the full-depth tier) in a "
              "federation of four equal tiers (1, 0.75, 0.5, 0.25) whose pruned tiers use the "
              "strategy. Columns: **PruFed** (HeteAgg over all tiers); **exclusive** (each "
              "tier federated only within itself); **centralized** (one client with every "
              "client's samples, that tier's model); **alone** (each client only on its own "
              "samples, same rounds x local epochs; mean and worst client of the tier); "
              "**untuned** (the dropped model before any tuning); **one-depth federation** "
              "(every client at that depth: the smallest tier, or full depth). 'vs' columns: "
              "PruFed beats / matches / is worse than the counterpart (paired by seed: the "
              "mean difference against the sd of the differences). Rounds to target: first "
              "round whose tier perplexity reaches run.target_metric (mean over the seeds that "
              "reached it)."), ""]
    best, avg = prufed_best_strategy(res)
    best_s, avg_s = prufed_best_strategy(res, "score")
    if best is not None:
        ranking = ", ".join(f"{s} {avg[s]:,.2f}" for s in sorted(avg, key=avg.get))
        lines.append(f"- **Best strategy on average over the pruned tiers and tasks: {best}** "
                     f"(geometric-mean response perplexity of the PruFed tier models: "
                     f"{ranking}).")
    if best_s is not None:
        ranking = ", ".join(f"{s} {avg_s[s]:.3f}" for s in sorted(avg_s, key=avg_s.get,
                                                                  reverse=True))
        lines.append(f"- By the generation score (ROUGE-L / exact match, mean): **{best_s}** "
                     f"({ranking}).")
    if best is not None and "top-alternate" in avg:
        lines.append("- The poster's claim (top-alternate best on average): "
                     + ("holds here." if best == "top-alternate" else f"not reproduced here "
                        f"(best: {best})."))
    per_task = {t: prufed_best_strategy(res, tasks=(t,))[0] for t in res.tasks}
    if len(res.tasks) > 1 and None not in per_task.values():
        lines.append("- Best strategy per task (perplexity): "
                     + ", ".join(f"{t}: **{s}**" for t, s in per_task.items())
                     + " — the poster's claim that it depends on the task: "
                     + ("holds here." if len(set(per_task.values())) > 1 else "not here."))
    for role, name in ((CENTRAL, "centralized"), (ALONE, "alone (mean client)"),
                       (EXCL, "exclusive (federated within the tier only)")):
        parts, all_ok, total = [], 0, 0
        for keep in [*res.keeps, 1.0]:
            verdicts = [(t, s, res.compare(t, s, keep, role)) for t in res.tasks
                        for s in res.strategies]
            verdicts = [x for x in verdicts if x[2] is not None]
            ok = [x for x in verdicts if x[2] != "worse"]
            all_ok, total = all_ok + len(ok), total + len(verdicts)
            if verdicts:
                worse = ", ".join(f"{t}/{s}" for t, s, x in verdicts if x == "worse")
                parts.append(f"keep {keep:g}: {len(ok)}/{len(verdicts)}"
                             + (f" (worse: {worse})" if worse else ""))
        if total:
            lines.append(f"- PruFed tier models match or beat **{name}** (perplexity) in "
                         f"{all_ok}/{total} (task, strategy, tier) cells: " + "; ".join(parts))
    lines.append("")
    for task in res.tasks:
        score = next((e["score_name"] for e in entries if e["task"] == task
                      and e["score_name"]), None)
        lines += [f"## {task}: response perplexity", "",
                  *_prufed_table(res, task, "perplexity", ",.2f"), ""]
        if score:
            lines += [f"## {task}: {score}", "", *_prufed_table(res, task, "score", ".3f"), ""]
    if entries:
        _prufed_figures(res, suite_dir)
        lines += ["![perplexity per strategy and tier](prufed_strategies.png)", "",
                  "![PruFed against its counterparts](prufed_counterparts.png)", ""]
    return _write(suite_dir, lines)


REPORTS["prufed"] = prufed_report


def _optimizer_label(label: str) -> tuple[str, str, int, str]:
    """(method, partition, seed, option) of an optimizers-suite label."""
    method, part, seed, option = label.split("-")
    return method, part, int(seed.removeprefix("s")), option


def optimizers_report(suite_dir: Path, variants) -> Path:
    """Issue 18's table: final accuracy (mean ± sd over the seeds run) of each option per
    method and partition, its gain over FedAvg (points, mean over seeds of the paired
    difference), upload KiB per client; and accuracy curves (mean over seeds)."""
    done = [v for v in variants if (suite_dir / v.label / "global.safetensors").is_file()]
    if not done:
        return _write(suite_dir, ["# Server optimizers and client corrections", "",
                                  "No finished variant yet."])
    rows = {v.label: _enrich(_row(v.label, suite_dir / v.label)) for v in done}
    keys = [_optimizer_label(v.label) for v in done]
    methods = list(dict.fromkeys(k[0] for k in keys))
    parts = list(dict.fromkeys(k[1] for k in keys))
    options = list(dict.fromkeys(k[3] for k in keys))
    seeds = sorted({k[2] for k in keys})
    acc = {k: rows[v.label]["final_accuracy"] for k, v in zip(keys, done, strict=True)}
    kib = {k: rows[v.label]["kib_up"] for k, v in zip(keys, done, strict=True)}

    def cell(m: str, p: str, o: str) -> str:
        vals = [acc[(m, p, s, o)] for s in seeds if (m, p, s, o) in acc]
        gains = [100 * (acc[(m, p, s, o)] - acc[(m, p, s, "fedavg")]) for s in seeds
                 if (m, p, s, o) in acc and (m, p, s, "fedavg") in acc]
        text = mean_sd(vals, ".3f")
        if o == "fedavg" or not gains:
            return text
        m, sd = _stats(gains)
        return f"{text} ({m:+.1f}" + (f" ± {sd:.1f})" if len(gains) > 1 else ")")

    table = ["| method | partition | " + " | ".join(options) + " |",
             "|---|---|" + "---|" * len(options)]
    table += [f"| {m} | {p} | " + " | ".join(cell(m, p, o) for o in options) + " |"
              for m in methods for p in parts]
    def kib_of(m: str, scaffold: bool) -> str:
        vals = [v for k, v in kib.items() if k[0] == m and (k[3] == "scaffold") == scaffold]
        return f"{np.mean(vals):,.1f}" if vals else "–"

    bytes_line = "; ".join(f"{m} {kib_of(m, False)} (SCAFFOLD {kib_of(m, True)})"
                           for m in methods)
    best = []
    for p in parts:
        gains = {o: np.mean([100 * (acc[("AoH", p, s, o)] - acc[("AoH", p, s, "fedavg")])
                             for s in seeds if ("AoH", p, s, o) in acc
                             and ("AoH", p, s, "fedavg") in acc] or [np.nan])
                 for o in options if o != "fedavg"}
        gains = {o: g for o, g in gains.items() if not np.isnan(g)}
        if gains:
            o = max(gains, key=gains.get)
            best.append(f"- AoH on {p}: best option {o}, {gains[o]:+.1f} points over FedAvg"
                        if gains[o] > 0 else
                        f"- AoH on {p}: no option beats FedAvg (closest: {o}, "
                        f"{gains[o]:+.1f} points)")
    _optimizer_curves(suite_dir, keys, done, methods, parts, options)
    first = next(iter(rows.values()))
    text = [*_header("Server optimizers and client corrections (issue 18)", [first]),
            (f"Seeds run: {', '.join(map(str, seeds))}. Cells: final validation accuracy "
             "(mean ± sd over seeds), in brackets the gain over FedAvg on the same method, "
             "partition and seed, in points (mean ± sd of the paired differences)."), "",
            *table, "", *best, "",
            f"Upload per client (KiB, measured payloads): {bytes_line}.", "",
            "![accuracy curves](optimizer_curves.png)", ""]
    return _write(suite_dir, text)


def _optimizer_curves(suite_dir: Path, keys, done, methods, parts, options) -> None:
    fig, axes = plt.subplots(len(methods), len(parts), squeeze=False,
                             figsize=(4.2 * len(parts), 3.4 * len(methods)), sharey=True)
    for i, m in enumerate(methods):
        for j, p in enumerate(parts):
            ax = axes[i][j]
            for o in options:
                curves = [{r["round"]: r["accuracy"] for r in read_metrics(suite_dir / v.label)
                           if r.get("accuracy") is not None}
                          for k, v in zip(keys, done, strict=True) if k[:2] == (m, p)
                          and k[3] == o]
                # the rounds every seed evaluated (run.eval_every may differ), mean over seeds
                common = sorted(set.intersection(*map(set, curves))) if curves else []
                if common:
                    ax.plot(common, [np.mean([c[r] for c in curves]) for r in common],
                            marker=".", label=o)
            ax.set(title=f"{m}, {p}", xlabel="round", ylabel="accuracy" if j == 0 else None)
            rounds_axis(ax)
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, suite_dir / "optimizer_curves.png")


REPORTS["optimizers"] = optimizers_report


def table1_report(suite_dir: Path, variants) -> Path:
    """Paper Table 1 at the paper's scale: per row (method x selection), mean ± sd over the
    seeds run of final accuracy, rounds to target, upload per client and its ratio to B1,
    analytic training OPs per client, share of head units ever aggregated (head-pruned
    rows); accuracy curves (mean over seeds)."""
    done = _finished(suite_dir, variants)
    if not done:
        return _write(suite_dir, ["# Table 1 at the paper's scale", "", "No finished run yet."])
    rows = _rows(suite_dir, done)
    groups = _seed_groups(rows)
    b1 = groups.get("B1-random-sel")  # absent when only some rows ran (--only)
    b1_kib = float(np.mean([r["kib_up"] for r in b1])) if b1 else None
    table = [("| row | seeds | final acc | round at target | KiB up / client | vs B1 | "
             "analytic GOPs / client | heads trained |"), "|---|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        reached = [r["round_at_target"] for r in rs if r["round_at_target"] is not None]
        kib = float(np.mean([r["kib_up"] for r in rs]))
        gops = [r["gops"] for r in rs if r["gops"] is not None]
        trained = [r["heads_trained"] for r in rs if r["heads_trained"] is not None]
        table.append(f"| {name} | {len(rs)} | {mean_sd([r['final_accuracy'] for r in rs], '.4f')}"
                     f" | {mean_sd(reached, '.1f')} ({len(reached)}/{len(rs)} reached) | "
                     f"{kib:,.1f} | {f'{b1_kib / kib:.2f}x' if b1_kib else '–'} | "
                     f"{mean_sd(gops, ',.2f')} | {mean_sd(trained, '.3f')} |")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in groups.items():
        curves = [[(r["round"], r["accuracy"]) for r in read_metrics(suite_dir / x["label"])
                   if r.get("accuracy") is not None] for x in rs]
        n = min(len(c) for c in curves)
        ax.plot([c[0] for c in curves[0][:n]],
                np.mean([[a for _, a in c[:n]] for c in curves], axis=0), marker=".", label=name)
    ax.set(xlabel="round", ylabel="validation accuracy (mean over seeds)",
           title="Table 1 at the paper's scale (Fig. 3)")
    rounds_axis(ax)
    ax.legend(fontsize=8)
    save_figure(fig, suite_dir / "table1_curves.png")
    text = [*_header("Table 1 at the paper's scale (configs/paper_table1.toml)", rows),
            *table, "", "![accuracy curves](table1_curves.png)", "", _table(rows, COLUMNS), ""]
    return _write(suite_dir, text)


REPORTS["table1"] = table1_report


def robustness_report(suite_dir: Path, variants) -> Path:
    """Issue 15's table: final accuracy of FedAvg under each attack (rows) and robust rule
    (columns), points against the clean plain-mean run, and the two targets checked: scaling
    and sign flip break plain FedAvg (> 10 points lost); some rule stays within 3 points of
    clean under every attack."""
    done = {v.label: _row(v.label, suite_dir / v.label) for v in variants
            if (suite_dir / v.label / "global.safetensors").is_file()}
    if not done:
        return _write(suite_dir, ["# Robustness", "", "No finished run yet."])
    keys = [tuple(label.split("-")) for label in done]
    acc = {k: done["-".join(k)]["final_accuracy"] for k in keys}
    attacks = list(dict.fromkeys(k[1] for k in keys if k[0] == "FedAvg"))
    defences = list(dict.fromkeys(k[2] for k in keys if k[0] == "FedAvg"))
    clean = acc.get(("FedAvg", "clean", "mean"))
    table = ["| attack | " + " | ".join(defences) + " |", "|---|" + "---|" * len(defences)]
    for a in attacks:
        cells = []
        for d in defences:
            v = acc.get(("FedAvg", a, d))
            cells.append("–" if v is None else f"{v:.3f}" if clean is None
                         else f"{v:.3f} ({100 * (v - clean):+.1f})")
        table.append(f"| {a} | " + " | ".join(cells) + " |")
    lines = [*_header("Robustness: attacks against robust aggregation (issue 15)",
                      [next(iter(done.values()))]),
             "Cells: final accuracy, in brackets points against clean FedAvg (plain mean).", "",
             *table, ""]
    if clean is not None:
        broken = {a: acc.get(("FedAvg", a, "mean")) for a in ("scaling", "sign_flip")}
        lines.append("- scaling / sign flip break plain FedAvg (> 10 points): " + ", ".join(
            f"{a} {'yes' if v is not None and clean - v > 0.10 else 'no'}"
            for a, v in broken.items()))
        holds = [d for d in defences if all(
            acc.get(("FedAvg", a, d)) is not None and clean - acc[("FedAvg", a, d)] <= 0.03
            for a in attacks)]
        lines.append(f"- rules within 3 points of clean under every attack run: "
                     f"{', '.join(holds) or 'none'}")
    aoh = {k: v for k, v in acc.items() if k[0] == "AoH"}
    if aoh:
        lines += ["", "AoH (90 %) under importance inflation: " + ", ".join(
            f"{a} / {d} {v:.3f}" for (_, a, d), v in sorted(aoh.items()))]
    return _write(suite_dir, [*lines, ""])


REPORTS["robustness"] = robustness_report


def privacy_report(suite_dir: Path, variants) -> Path:
    """Issue 15 item 7: final accuracy of each method under DP-FedAvg against the (epsilon,
    delta) spent, points against the same method without DP; accuracy-vs-epsilon figure."""
    done = [_row(v.label, suite_dir / v.label) for v in variants
            if (suite_dir / v.label / "global.safetensors").is_file()]
    if not done:
        return _write(suite_dir, ["# Client-level differential privacy", "",
                                  "No finished run yet."])
    base = {r["label"].split("-")[0]: r["final_accuracy"] for r in done
            if r["label"].endswith("-nodp")}
    for r in done:
        dp = r["cfg"]["dp"]
        r["z"] = dp["noise_multiplier"] or None
        r["alpha_std"] = dp["alpha_std"] or None
        clean = base.get(r["label"].split("-")[0])
        r["points"] = (None if clean is None or r["final_accuracy"] is None
                       else 100 * (r["final_accuracy"] - clean))
    delta = done[0]["cfg"]["dp"]["delta"]
    table = _table(done, [("run", "label", ""), ("z", "z", ".2f"),
                          ("α noise std", "alpha_std", ".2f"),
                          (f"ε (δ = {delta:g})", "dp_epsilon", ".2f"),
                          ("final accuracy", "final_accuracy", ".3f"),
                          ("points vs no DP", "points", "+.1f")])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m in dict.fromkeys(r["label"].split("-")[0] for r in done):
        pts = sorted((r["dp_epsilon"], r["final_accuracy"]) for r in done
                     if r["label"].startswith(m + "-z") and "-a" not in r["label"]
                     and r["final_accuracy"] is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        if base.get(m) is not None:
            ax.axhline(base[m], linestyle=":", color=ax.lines[-1].get_color() if pts else None,
                       label=f"{m}, no DP")
    ax.set(xscale="log", xlabel=f"ε at δ = {delta:g}", ylabel="final accuracy")
    ax.legend(fontsize=7)
    save_figure(fig, suite_dir / "privacy.png")
    f = done[0]["cfg"]["federation"]
    clip = next((r["cfg"]["dp"]["clip_norm"] for r in done if r["cfg"]["dp"]["clip_norm"]), "–")
    return _write(suite_dir, [
        *_header("Client-level differential privacy: DP-FedAvg (issue 15)", done),
        (f"Poisson sampling q = {f['clients_per_round']}/{f['num_clients']} per round, "
         f"clipping C = {clip}, noise std z·C on the sum, "
         "divided by the expected K; ε from Opacus' RDP accountant after the last round. "
         "AoH's α noise is local (clients add it to their head scores before pruning) and "
         "is not in ε."), "", table, "", "![accuracy against epsilon](privacy.png)", ""])


REPORTS["privacy"] = privacy_report


CHANCE_MARGIN = 0.05  # "fallen to chance": final accuracy within 5 points of 1 / classes


def _accuracy_against_sparsity(ax, curves: dict[str, list[tuple[float, float]]],
                               chance: float | None, title: str) -> None:
    """One line per name through its (AoH sparsity, final accuracy) points, FedAvg at 0."""
    for name, points in curves.items():
        ax.plot([100 * s for s, _ in points], [a for _, a in points], marker="o", label=name)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set(xlabel="AoH head sparsity (%) (0 = FedAvg)", ylabel="final validation accuracy",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def peft_report(suite_dir: Path, variants) -> Path:
    """AoH Table 3: per PEFT method, FedAvg's seconds per local epoch, upload, OPs and
    accuracy; AoH's largest sparsity whose final accuracy stays more than CHANCE_MARGIN above
    chance, with its upload, OPs and accuracy; and accuracy against sparsity."""
    done = [v for v in variants if (suite_dir / v.label / "global.safetensors").is_file()]
    if not done:
        return _write(suite_dir, ["# PEFT methods", "", "No finished run yet."])
    rows = {v.label: _enrich(_row(v.label, suite_dir / v.label)) for v in done}
    first = next(iter(rows.values()))
    names = json.loads((suite_dir / first["label"] / "partition.json").read_text())[
        "label_names"]
    chance = 1 / len(names)
    methods = list(dict.fromkeys(v.label.split("-FedAvg")[0].split("-AoH")[0]
                                 for v in variants))
    table = [("| PEFT | FedAvg s / local epoch | FedAvg KiB up | FedAvg GOPs | FedAvg acc | "
              "AoH max sparsity | AoH KiB up | AoH GOPs | AoH acc |"), "|" + "---|" * 9]
    curves: dict[str, list[tuple[float, float]]] = {}  # (sparsity, accuracy); FedAvg at 0
    for m in methods:
        fed = rows.get(f"{m}-FedAvg")
        sweep = sorted(((r["cfg"]["method"]["aoh"]["sparsity"], r) for label, r in rows.items()
                        if label.startswith(f"{m}-AoH-")), key=lambda x: x[0])
        alive = [(s, r) for s, r in sweep if r["final_accuracy"] > chance + CHANCE_MARGIN]
        best = alive[-1] if alive else None
        cells = [_fmt(fed and fed["train_s_per_client"], ".2f"),
                 _fmt(fed and fed["kib_up"], ",.1f"), _fmt(fed and fed["gops"], ",.2f"),
                 _fmt(fed and fed["final_accuracy"], ".3f"),
                 "–" if best is None else f"{100 * best[0]:.0f} %",
                 *(_fmt(best and best[1][k], f) for k, f in
                   (("kib_up", ",.1f"), ("gops", ",.2f"), ("final_accuracy", ".3f")))]
        table.append(f"| {m} | " + " | ".join(cells) + " |")
        if sweep:
            curves[m] = [(0.0, fed["final_accuracy"])] if fed else []
            curves[m] += [(s, r["final_accuracy"]) for s, r in sweep]
    tried = sorted({r["cfg"]["method"]["aoh"]["sparsity"] for r in rows.values()
                    if r["cfg"]["method"]["name"] == "aoh"})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _accuracy_against_sparsity(ax, curves, chance, "PEFT methods under head pruning (AoH Table 3)")
    save_figure(fig, suite_dir / "peft.png")
    lines = [*_header("PEFT methods with FedAvg and AoH (paper Table 3)", [first],
                      peft="each PEFT method of the table"),
             (f"AoH max sparsity: the largest of {', '.join(f'{100 * s:.0f} %' for s in tried)}"
              f" whose final accuracy is more than {100 * CHANCE_MARGIN:.0f} points above "
              f"chance ({chance:.2f}); KiB up and GOPs are per client and round, GOPs analytic "
              f"(core/accounting.py). Learning rates per method: sim/suites.py."), "",
             *table, "", "![accuracy against sparsity](peft.png)", ""]
    return _write(suite_dir, lines)


REPORTS["peft"] = peft_report


# metric columns of each task of the tasks suite: (header, metrics.jsonl key)
TASK_COLUMNS = {"classification": (("accuracy", "accuracy"),),
                "headline": (("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL"),
                             ("perplexity", "perplexity"))}


def _last_scores(run_dir: Path, keys: Sequence[str]) -> dict[str, float | None]:
    """The metrics ``keys`` of the last evaluated round."""
    evaluated = [r for r in read_metrics(run_dir) if r.get(keys[0]) is not None]
    return {k: evaluated[-1].get(k) if evaluated else None for k in keys}


def tasks_report(suite_dir: Path, variants) -> Path:
    """AoH Table 2: FedAvg and AoH at 90 % per task and federation size — the task's final
    metrics, upload, analytic OPs and measured FLOPs per client and round, seconds per
    round — and a bar chart of each task's headline metric."""
    done = [v for v in variants if (suite_dir / v.label / "global.safetensors").is_file()]
    if not done:
        return _write(suite_dir, ["# Tasks", "", "No finished run yet."])
    lines = [("# FedAvg and AoH at 90 % on classification and headline generation (paper "
             "Table 2)"), "",
             ("Per client and round: KiB up measured on the serialized payloads, analytic GOPs "
             "(core/accounting.py) and GFLOPs measured by torch FlopCounterMode "
             "(forward and backward of the local steps). Final metrics on the validation split "
             "after the last round. AoH runs in `method.aoh.mode` = adapter (the default): "
             "pruned heads' slices are frozen and not sent, but the backbone computes every "
             "head, so its OPs are FedAvg's (`mode=structural` cuts them: suite sparsity)."), ""]
    fig, axes = plt.subplots(1, len(TASK_COLUMNS), figsize=(11, 4.2))
    for ax, (task, columns) in zip(np.atleast_1d(axes), TASK_COLUMNS.items(), strict=True):
        mine = [v for v in done if v.label.startswith(f"{task}-")]
        if not mine:
            ax.set_axis_off()
            continue
        cfg = json.loads((suite_dir / mine[0].label / "config.json").read_text())
        d, f = cfg["data"], cfg["federation"]
        lines += [f"## {task}", "",
                  (f"Model `{cfg['model']['name']}`, "
                   + (f"task `{d['task']}`" if d.get("task") else f"data `{d['dataset']}`")
                   + f" (max_samples {d['max_samples'] or 'all'}, max_length {d['max_length']}), "
                   f"{f['rounds']} rounds, LoRA r={cfg['peft']['r']}, lr {f['lr']:g}, batch "
                   f"{f['batch_size']}, seed {cfg['run']['seed']}."), "",
                  "| clients C / K | method | " + " | ".join(h for h, _ in columns)
                  + " | KiB up / client | GOPs / client | GFLOPs / client | s / round |",
                  "|" + "---|" * (len(columns) + 6)]
        settings = list(dict.fromkeys(v.label.split("-")[1] for v in mine))
        bars: dict[str, list[float]] = {"FedAvg": [], "AoH-s90": []}
        for setting in settings:
            for method, ys in bars.items():
                label = f"{task}-{setting}-{method}"
                if not any(v.label == label for v in mine):
                    ys.append(np.nan)
                    continue
                row = _enrich(_row(label, suite_dir / label))
                scores = _last_scores(suite_dir / label, [k for _, k in columns])
                c, k = row["cfg"]["federation"]["num_clients"], row["cfg"]["federation"][
                    "clients_per_round"]
                cells = [f"{c} / {k}", method.replace("-s90", " 90 %"),
                         *(_fmt(scores[key], ".4f" if key != "perplexity" else ",.2f")
                           for _, key in columns),
                         _fmt(row["kib_up"], ",.1f"), _fmt(row["gops"], ",.2f"),
                         _fmt(row["gflops"], ",.2f"), _fmt(row["seconds_per_round"], ".1f")]
                lines.append("| " + " | ".join(cells) + " |")
                ys.append(scores[columns[0][1]])  # the headline metric
        x = np.arange(len(settings))
        for i, (method, ys) in enumerate(bars.items()):
            ax.bar(x + (i - 0.5) * 0.38, ys, width=0.38, label=method.replace("-s90", " 90 %"))
        ax.set_xticks(x, [s.replace("C", "").replace("K", " / ") for s in settings])
        ax.set(xlabel="clients C / per round K", ylabel=f"final {columns[0][0]}", title=task)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        lines.append("")
    save_figure(fig, suite_dir / "tasks.png")
    lines += ["![final metric per task and federation size](tasks.png)", ""]
    return _write(suite_dir, lines)


REPORTS["tasks"] = tasks_report


def _metric_cell(row: dict[str, Any] | None, trained: bool) -> str:
    if row is None:
        return "–"
    return f"{row['metric']} {row['final_' + row['metric']]:.3f}" if trained else "untrained"


def backbones_report(suite_dir: Path, variants) -> Path:
    """AoH Table 4: per backbone, FedAvg's seconds per local epoch, upload, OPs and final
    metric; AoH's largest sparsity whose accuracy stays CHANCE_MARGIN above chance (trained
    backbones) with its upload, OPs and metric. Untrained backbones (random weights of the
    published sizes, one round) give bytes and OPs only."""
    done = [v for v in variants if (suite_dir / v.label / "global.safetensors").is_file()]
    if not done:
        return _write(suite_dir, ["# Backbones", "", "No finished run yet."])
    rows = {v.label: _enrich(_row(v.label, suite_dir / v.label)) for v in done}
    untrained = {v.label.rsplit("-", 1)[0] for v in variants if v.published}
    names = list(dict.fromkeys(v.label.split("-FedAvg")[0].split("-AoH")[0] for v in variants))
    table = [("| backbone | trained | task | FedAvg s / local epoch | FedAvg KiB up | FedAvg "
              "GOPs | FedAvg GFLOPs | FedAvg metric | AoH sparsity | AoH KiB up | AoH GFLOPs | "
              "AoH metric |"), "|" + "---|" * 12]
    uploads: list[tuple[str, float | None, float | None]] = []  # (backbone, FedAvg, AoH) KiB
    curves: dict[str, list[tuple[float, float]]] = {}  # trained: (sparsity, accuracy)
    chance = None
    for name in names:
        fed = rows.get(f"{name}-FedAvg")
        sweep = sorted(((r["cfg"]["method"]["aoh"]["sparsity"], r) for label, r in rows.items()
                        if label.startswith(f"{name}-AoH-")), key=lambda x: x[0])
        if not fed and not sweep:
            continue
        any_row = fed or sweep[0][1]
        d = any_row["cfg"]["data"]
        task = d.get("task") or f"{d['dataset']} (classification)"
        trained = name not in untrained
        if trained and any_row["metric"] == "accuracy":
            chance = 1 / len(json.loads((suite_dir / any_row["label"] / "partition.json")
                                        .read_text())["label_names"])
            alive = [(s, r) for s, r in sweep if r["final_accuracy"] > chance + CHANCE_MARGIN]
            best = alive[-1] if alive else None
            curves[name] = [(0.0, fed["final_accuracy"])] if fed else []
            curves[name] += [(s, r["final_accuracy"]) for s, r in sweep]
        else:  # untrained: the measured sparsity (90 %), for its bytes and OPs
            best = sweep[-1] if sweep else None

        cells = [name, "yes" if trained else "**no** (random weights)", task,
                 _fmt(fed and fed["train_s_per_client"], ".2f"),
                 _fmt(fed and fed["kib_up"], ",.1f"), _fmt(fed and fed["gops"], ",.2f"),
                 _fmt(fed and fed["gflops"], ",.2f"), _metric_cell(fed, trained),
                 "–" if best is None else f"{100 * best[0]:.0f} %",
                 _fmt(best and best[1]["kib_up"], ",.1f"), _fmt(best and best[1]["gflops"], ",.2f"),
                 _metric_cell(best and best[1], trained)]
        table.append("| " + " | ".join(cells) + " |")
        uploads.append((name + ("" if trained else "*"), fed and fed["kib_up"],
                        best and best[1]["kib_up"]))
    _backbones_figure(suite_dir / "backbones.png", uploads, curves, chance)
    first = next(iter(rows.values()))
    f = first["cfg"]["federation"]
    lines = ["# Backbones with FedAvg and AoH (paper Table 4)", "",
             (f"{f['num_clients']} clients, {f['clients_per_round']} per round, LoRA "
              f"r={first['cfg']['peft']['r']}; trained backbones {f['rounds']} round(s) on BBC "
              f"News categories. AoH sparsity of a trained backbone: the largest of those run "
              f"whose final accuracy is more than {100 * CHANCE_MARGIN:.0f} points above "
              f"chance. **Untrained** rows are random weights of the published sizes "
              f"(sim/published.py) run for one round: their bytes and OPs are the real "
              f"backbones', their metrics mean nothing. KiB up, GOPs (analytic) and "
              f"GFLOPs (FlopCounterMode) per client and round."), "", *table, "",
             "![upload per backbone and trained accuracy against sparsity](backbones.png)", ""]
    return _write(suite_dir, lines)


def _backbones_figure(path: Path, uploads, curves, chance: float | None) -> None:
    """Left: KiB up per client and round, FedAvg against AoH, per backbone (* untrained, log
    scale). Right: each trained backbone's final accuracy against AoH sparsity (0 = FedAvg)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(uploads))
    for i, label in enumerate(("FedAvg", "AoH")):
        left.bar(x + (i - 0.5) * 0.38, [np.nan if u[1 + i] is None else u[1 + i]
                                        for u in uploads], width=0.38,
                 label=label if label == "FedAvg" else "AoH at the table's sparsity")
    left.set_xticks(x, [u[0] for u in uploads], rotation=30, ha="right")
    left.set(yscale="log", ylabel="KiB up per client and round",
             title="upload (* = untrained, random weights)")
    left.grid(alpha=0.3, axis="y")
    left.legend(fontsize=8)
    _accuracy_against_sparsity(right, curves, chance, "trained backbones")
    save_figure(fig, path)


REPORTS["backbones"] = backbones_report
