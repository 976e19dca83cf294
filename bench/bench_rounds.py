"""Seconds per round, peak RSS and bytes per client: fedprune's runner against a plain loop.

The plain loop is the lower bound: the same federated computation (same selection, same
client batches, same optimizer, data-size weighted mean, evaluation every round) written as a
bare torch loop with no serialization, validation, checkpointing or logging. Each measurement
runs in its own process so that peak RSS is its own.

    python bench/bench_rounds.py                      # 10/2, 100/10, 1000/20; 3 rounds each
    python bench/bench_rounds.py --grid 10:2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def overrides(c: int, k: int, rounds: int) -> list[str]:
    return ["model.name=minilm", "data.dataset=bbc_news", "data.max_length=128",
            f"federation.num_clients={c}", f"federation.clients_per_round={k}",
            f"federation.rounds={rounds}", "run.seed=0"]


def bench_fedprune(c: int, k: int, rounds: int) -> dict:
    from fedprune.config import load_config
    from fedprune.report.metrics import read_metrics
    from fedprune.sim.runner import run

    cfg = load_config(None, overrides(c, k, rounds))
    with tempfile.TemporaryDirectory() as tmp:
        records = read_metrics(run(cfg, Path(tmp) / "run", progress=False))
    return {"sec_per_round": [r["wall_s"] for r in records],
            "accuracy": records[-1]["accuracy"],
            "bytes_up_per_client": records[-1]["bytes_up"][0],
            "bytes_down_per_client": records[-1]["bytes_down"][0]}


def bench_plain(c: int, k: int, rounds: int) -> dict:
    """The same job as a bare loop over the shared model (fedprune's data and model set-up)."""
    from fedprune.client.train import evaluate
    from fedprune.config import load_config
    from fedprune.core.selection import History, random_selection
    from fedprune.sim.runner import client_seed
    from fedprune.sim.setup import build

    cfg = load_config(None, overrides(c, k, rounds))
    fed, fc = build(cfg), cfg.federation
    params = fed.params
    glob = {n: p.detach().clone() for n, p in params.items()}
    times, acc = [], None
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        acc_delta = {n: torch.zeros_like(v, dtype=torch.float64) for n, v in glob.items()}
        total = 0
        for cid in random_selection(rnd, History(np.ones(c)), k, cfg.run.seed):
            idx = torch.as_tensor(fed.client_indices[cid], dtype=torch.long)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(glob[n])
            seed = client_seed(cfg.run.seed, rnd, cid)
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            opt = torch.optim.AdamW(list(params.values()), lr=fc.lr)
            fed.model.train()
            order = idx[torch.randperm(len(idx), generator=gen)].tolist()
            for s in range(0, len(order), fc.batch_size):
                batch = fed.collate([fed.train_rows[i] for i in order[s:s + fc.batch_size]])
                fed.model(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for n, p in params.items():
                    acc_delta[n] += (p.detach() - glob[n]).double() * len(idx)
            total += len(idx)
        for n in glob:
            glob[n] = (glob[n].double() + acc_delta[n] / total).float()
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(glob[n])
        acc = evaluate(fed.model, fed.val_rows, fed.collate, fc.eval_batch_size)["accuracy"]
        times.append(time.perf_counter() - t0)
    return {"sec_per_round": times, "accuracy": acc}


def child(mode: str, c: int, k: int, rounds: int) -> None:
    result = (bench_fedprune if mode == "fedprune" else bench_plain)(c, k, rounds)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", nargs="+", default=["10:2", "100:10", "1000:20"],
                    help="C:K pairs (total clients : clients per round)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per measurement")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "C", "K", "ROUNDS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, c, k, r = args.child
        return child(mode, int(c), int(k), int(r))

    rows = []
    for item in args.grid:
        c, k = map(int, item.split(":"))
        row = {"clients": c, "per_round": k}
        for mode in ("plain", "fedprune"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(c), str(k),
                                  str(args.rounds)], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            steady = res["sec_per_round"][1:] or res["sec_per_round"]  # round 1 warms up
            res["sec_per_round_steady"] = sum(steady) / len(steady)
            row[mode] = res
        row["overhead"] = (row["fedprune"]["sec_per_round_steady"]
                           / row["plain"]["sec_per_round_steady"] - 1)
        rows.append(row)
        print(f"C={c:5d} K={k:3d}  plain {row['plain']['sec_per_round_steady']:6.2f} s/round  "
              f"fedprune {row['fedprune']['sec_per_round_steady']:6.2f} s/round  "
              f"overhead {100 * row['overhead']:+5.1f} %  "
              f"RSS {row['fedprune']['peak_rss_mb']:.0f} MB (plain "
              f"{row['plain']['peak_rss_mb']:.0f})  "
              f"up {row['fedprune']['bytes_up_per_client'] / 1e6:.2f} MB/client", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rounds.json").write_text(json.dumps(
        {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows},
        indent=2))


if __name__ == "__main__":
    main()
