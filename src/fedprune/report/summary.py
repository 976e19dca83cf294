"""Human-readable summaries of a run directory."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from fedprune.report.metrics import read_metrics


def rounds_to_target(records: list[dict[str, Any]], metric: str, target: float) -> int | None:
    """First round whose metric reaches ``target`` (None if never)."""
    return next((r["round"] for r in records if (r.get(metric) or -1) >= target), None)


def summarize(run_dir: Path) -> dict[str, Any]:
    """Key figures of a finished or partial run."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl with any round; is it a run "
                                f"directory?")
    config = json.loads((run_dir / "config.json").read_text())
    target = config["run"]["target_metric"]
    evaluated = [r for r in records if r.get("accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    env_path = run_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    return {
        "compute_dtype": env.get("compute_dtype"), "threads": env.get("threads"),
        "run": run_dir.name, "method": config["method"]["name"],
        "rounds": records[-1]["round"], "final_accuracy": last.get("accuracy"),
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "final_eval_loss": last.get("eval_loss"), "target": target,
        "round_at_target": rounds_to_target(records, "accuracy", target),
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
    }


def _client_mean(records: list[dict[str, Any]], key: str) -> float | None:
    """Mean over rounds and selected clients of a per-client metric (None if never logged)."""
    values = [m[key] for r in records for m in r.get("client_metrics", {}).values() if key in m]
    return mean(values) if values else None


def markdown_table(records: list[dict[str, Any]]) -> str:
    """One row per round: the per-round view written to report.md."""
    head = "| round | selected | train loss | eval loss | accuracy | KiB up/client | s |"
    lines = [head, "|" + "---|" * 7]
    for r in records:
        acc = "" if r.get("accuracy") is None else f"{r['accuracy']:.4f}"
        ev = "" if r.get("eval_loss") is None else f"{r['eval_loss']:.4f}"
        up = mean(r["bytes_up"]) / 1024 if r["bytes_up"] else 0
        lines.append(f"| {r['round']} | {' '.join(map(str, r['selected']))} | "
                     f"{r['train_loss']:.4f} | {ev} | {acc} | {up:.1f} | {r['wall_s']:.1f} |")
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
    reached = (f"round {s['round_at_target']}" if s["round_at_target"] is not None
               else "not reached")
    text = "\n".join([
        f"# Run `{s['run']}`", "",
        f"- method: **{s['method']}**, rounds: {s['rounds']}",
        (f"- final validation accuracy: **{s['final_accuracy']:.4f}** "
         f"(best {s['best_accuracy']:.4f}), final validation loss {s['final_eval_loss']:.4f}"),
        f"- accuracy target {s['target']}: {reached}",
        (f"- bytes per selected client and round: up {s['bytes_up_per_client']:,.0f}, "
         f"down {s['bytes_down_per_client']:,.0f}"),
        f"- seconds per round: {s['seconds_per_round']:.1f} ({_phases(s)})",
        f"- compute: {s['compute_dtype'] or '?'} on {s['threads'] or '?'} threads", "",
        "![accuracy and loss](accuracy.png)", "",
        markdown_table(read_metrics(run_dir)), "",
    ])
    path = run_dir / "report.md"
    path.write_text(text)
    return path
