"""Human-readable summaries of a run directory."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from fedprune.report.metrics import read_metrics


def rounds_to_target(records: list[dict[str, Any]], metric: str, target: float,
                     higher_is_better: bool = True) -> int | None:
    """First round whose metric reaches ``target``: at least it when higher is better (e.g.
    accuracy), at most it when lower is (perplexity). None if never."""
    def reached(value: float | None) -> bool:
        return value is not None and (value >= target if higher_is_better else value <= target)

    return next((r["round"] for r in records if reached(r.get(metric))), None)


def seconds_to_target(records: list[dict[str, Any]], round_at_target: int | None
                      ) -> float | None:
    """Wall seconds until the target was reached: the rounds up to ``round_at_target``
    (what a user waits for, next to seconds per round); None if never."""
    if round_at_target is None:
        return None
    return sum(r["wall_s"] for r in records if r["round"] <= round_at_target)


def method_metric(config: dict[str, Any]) -> tuple[str, bool]:
    """(target metric, higher is better) of a run's resolved ``config`` (its method and
    data.task)."""
    from fedprune.methods import METHODS

    metrics, target = METHODS[config["method"]["name"]].scoring(
        config.get("data", {}).get("task", ""))
    return target, metrics[target]


def summarize(run_dir: Path) -> dict[str, Any]:
    """Key figures of a finished or partial run."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl with any round; is it a run "
                                f"directory?")
    config = json.loads((run_dir / "config.json").read_text())
    target = config["run"]["target_metric"]
    metric, higher = method_metric(config)
    evaluated = [r for r in records if r.get(metric) is not None]
    last = evaluated[-1] if evaluated else {}
    best = max if higher else min
    at_target = rounds_to_target(records, metric, target, higher)
    env_path, res_path = run_dir / "environment.json", run_dir / "resources.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    return {
        "compute_dtype": env.get("compute_dtype"), "threads": env.get("threads"),
        "cpu": env.get("cpu", {}).get("model"), "peak_rss_mb": res.get("peak_rss_mb"),
        "run": run_dir.name, "method": config["method"]["name"],
        "rounds": records[-1]["round"], "metric": metric,
        f"final_{metric}": last.get(metric),
        f"best_{metric}": best((r[metric] for r in evaluated), default=None),
        "final_eval_loss": last.get("eval_loss"), "target": target,
        "round_at_target": at_target,
        "seconds_to_target": seconds_to_target(records, at_target),
        "bytes_up_per_client": mean(b for r in records for b in r["bytes_up"]),
        "bytes_down_per_client": mean(b for r in records for b in r["bytes_down"]),
        "seconds_per_round": mean(r["wall_s"] for r in records),
        "train_ops_per_client": _client_mean(records, "train_ops"),
        "train_flops_measured_per_client": _client_mean(records, "train_flops_measured"),
        "train_s_per_client": _client_mean(records, "train_s"),
        "importance_s_per_client": _client_mean(records, "score_s"),
        "eval_s": mean(r["eval_s"] for r in evaluated) if evaluated and "eval_s" in last
        else None,
        "pad_fraction": _client_mean(records, "pad_fraction"),
        **({"dp_epsilon": records[-1]["dp_epsilon"], "dp_delta": config["dp"]["delta"]}
           if "dp_epsilon" in records[-1] else {}),  # client-level DP spent (core/privacy)
        "heads_trained": records[-1].get("heads_trained"),  # head-pruned methods
    }


def _client_mean(records: list[dict[str, Any]], key: str) -> float | None:
    """Mean over rounds and selected clients of a per-client metric (None if never logged)."""
    values = [m[key] for r in records for m in r.get("client_metrics", {}).values() if key in m]
    return mean(values) if values else None


def markdown_table(records: list[dict[str, Any]], metric: str | None = None) -> str:
    """One row per round: the per-round view written to report.md."""
    metric = metric or "accuracy"
    head = f"| round | selected | train loss | eval loss | {metric} | KiB up/client | s |"
    lines = [head, "|" + "---|" * 7]
    for r in records:
        cells = ["" if r.get(k) is None else f"{r[k]:.4f}"
                 for k in ("train_loss", "eval_loss", metric)]
        up = mean(r["bytes_up"]) / 1024 if r["bytes_up"] else 0
        lines.append(f"| {r['round']} | {' '.join(map(str, r['selected']))} | "
                     f"{' | '.join(cells)} | {up:.1f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def _phases(s: dict[str, Any]) -> str:
    """Where a round's time goes, per selected client and per evaluation."""
    parts = [(s["train_s_per_client"], "local training {:.2f} s per client"),
             (s["importance_s_per_client"], "importance pass {:.2f} s per client"),
             (s["eval_s"], "evaluation {:.2f} s")]
    text = ", ".join(label.format(v) for v, label in parts if v is not None)
    pad = s["pad_fraction"]
    return text + (f"; {100 * pad:.1f} % of the trained positions were padding"
                   if pad is not None else "")


def write_report(run_dir: Path) -> Path:
    """report.md: summary, plot and per-round table."""
    run_dir = Path(run_dir)
    s = summarize(run_dir)
    metric = s["metric"]
    reached = (f"round {s['round_at_target']}, after {s['seconds_to_target']:.1f} s"
               if s["round_at_target"] is not None else "not reached")
    final, best = s[f"final_{metric}"], s[f"best_{metric}"]
    text = "\n".join([
        f"# Run `{s['run']}`", "",
        f"- method: **{s['method']}**, rounds: {s['rounds']}",
        (f"- final validation {metric}: **{final:.4f}** (best {best:.4f}), final validation "
         f"loss {s['final_eval_loss']:.4f}" if final is not None
         else f"- no evaluation of {metric} yet"),
        f"- {metric} target {s['target']}: {reached}",
        (f"- bytes per selected client and round: up {s['bytes_up_per_client']:,.0f}, "
         f"down {s['bytes_down_per_client']:,.0f}"),
        f"- seconds per round: {s['seconds_per_round']:.1f} ({_phases(s)})",
        (f"- compute: {s['compute_dtype'] or '?'} on {s['threads'] or '?'} threads of "
         f"{s['cpu'] or '?'}; peak RSS " + (f"{s['peak_rss_mb']:,.0f} MB" if s["peak_rss_mb"]
                                            else "?")),
        *([(f"- client-level DP (DP-FedAvg): (ε, δ) = ({s['dp_epsilon']:.3g}, {s['dp_delta']:g})"
           " after the last round (Opacus RDP accountant)")] if "dp_epsilon" in s else []),
        *([(f"- head units ever trained and aggregated: {100 * s['heads_trained']:.1f} % (the "
            f"rest of the head-mapped slices are still at their initial values)")]
          if s["heads_trained"] is not None else []), "",
        f"![{metric} and loss]({metric}.png)", "",
        markdown_table(read_metrics(run_dir), metric), "",
    ])
    path = run_dir / "report.md"
    path.write_text(text)
    return path
