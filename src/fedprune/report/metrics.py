"""Per-round metrics log: one JSON object per line in metrics.jsonl, plus a CSV copy."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, last_round: int) -> None:
    """Drop records after ``last_round`` (a resumed run rewrites the rounds it redoes)."""
    kept = [r for r in read_metrics(run_dir) if r["round"] <= last_round]
    path = Path(run_dir) / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def write_csv(run_dir: Path, records: list[dict[str, Any]]) -> Path:
    """Scalar columns of every record (lists such as `selected` are joined with spaces)."""
    path = Path(run_dir) / "metrics.csv"
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in records:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v
                             for k, v in r.items()})
    return path
