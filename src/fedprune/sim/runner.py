"""The in-process federation: one seeded round loop over one shared backbone."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tomli_w
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fedprune.client.payload import decode, encode
from fedprune.client.train import evaluate, load_state
from fedprune.config import ConfigError, ExperimentConfig
from fedprune.core.selection import SELECTORS, History
from fedprune.core.update import InvalidUpdate, State, validate_update
from fedprune.data import partition_summary
from fedprune.methods import Method, build_method
from fedprune.report.metrics import append_metrics, read_metrics, truncate_metrics, write_csv
from fedprune.report.plots import plot_metric
from fedprune.report.summary import write_report
from fedprune.sim.checkpoint import load_checkpoint, save_checkpoint
from fedprune.sim.setup import Federation, build

log = logging.getLogger("fedprune")


def client_seed(seed: int, rnd: int, client_id: int) -> int:
    """Seed of one client's local work in one round: independent of every other client."""
    return int(np.random.SeedSequence([seed, rnd, client_id]).generate_state(1)[0])


def default_run_dir(cfg: ExperimentConfig) -> Path:
    name = cfg.run.name or f"{cfg.method.name}-{Path(cfg.data.dataset).stem}-seed{cfg.run.seed}"
    return Path(cfg.run.out_dir) / name


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> None:
    """Create the run directory with the resolved config; never overwrite another run."""
    config_path = run_dir / "config.json"
    if resume:
        if not config_path.is_file():
            raise ConfigError(f"--resume: {run_dir} holds no run (no config.json)")
        saved = json.loads(config_path.read_text())
        saved["federation"]["rounds"] = cfg.federation.rounds  # extending a run is allowed
        if saved != cfg.to_dict():
            diff = sorted(f"{s}.{k}" for s, t in cfg.to_dict().items() for k, v in t.items()
                          if saved.get(s, {}).get(k) != v)
            raise ConfigError(f"--resume: the config differs from the one {run_dir} was "
                              f"started with in {', '.join(diff)}")
    elif (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run: pass --resume to "
                          f"continue it, or choose another `run.name` or --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    (run_dir / "config.toml").write_text(tomli_w.dumps(cfg.to_dict()))


def write_partition(fed: Federation, run_dir: Path) -> None:
    labels = np.array([r["label"] for r in fed.train_rows])
    summary = partition_summary(fed.client_indices, labels, len(fed.label_names))
    summary["label_names"] = fed.label_names
    (run_dir / "partition.json").write_text(json.dumps(summary))
    sizes = summary["sizes"]
    log.info("partition: %d clients, sizes min %d / mean %.1f / max %d; validation %d examples",
             len(sizes), min(sizes), sum(sizes) / len(sizes), max(sizes), len(fed.val_rows))


Observer = Callable[[int, State, Method], dict]


def run(cfg: ExperimentConfig, run_dir: Path | None = None, *, resume: bool = False,
        progress: bool = True, observe: Observer | None = None) -> Path:
    """Run (or resume) a federated experiment; returns the run directory.

    ``observe(round, global state, method)``, if given, is called after each round's
    aggregation; what it returns is logged under "observed" (e.g. two clients' importance).
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    prepare_run_dir(cfg, run_dir, resume)
    fed = build(cfg)
    write_partition(fed, run_dir)
    fc = cfg.federation
    method = build_method(cfg, fed)
    select = SELECTORS[fc.selection]
    options = {"d": fc.pow_d} if fc.selection == "pow-d" else {}

    state, server = fed.initial, {"round": 0, "client_loss": {}, "global_loss": None}
    if resume and (ckpt := load_checkpoint(run_dir)) is not None:
        state, server = ckpt
    truncate_metrics(run_dir, server["round"])
    sizes = np.array([len(ix) for ix in fed.client_indices])

    bar = tqdm(range(server["round"] + 1, fc.rounds + 1), total=fc.rounds,
               initial=server["round"], desc="rounds", disable=not progress)
    for rnd in bar:
        t0 = time.perf_counter()
        # --- SELECTION ---
        history = History(sizes, {int(c): v for c, v in server["client_loss"].items()},
                          server["global_loss"])
        selected = select(rnd, history, fc.clients_per_round, cfg.run.seed, **options)

        # --- LOCAL TRAINING: each client receives the serialized global state ---
        down = encode(state)
        blobs = {}
        for cid in selected:
            result = method.local(decode(down), fed.client_indices[cid],
                                  client_seed(cfg.run.seed, rnd, cid))
            blobs[cid] = method.encode(result)

        # --- AGGREGATION of the valid updates, in client-id order ---
        valid, rejected = [], []
        for cid, blob in sorted(blobs.items()):
            try:
                update = method.decode(blob, cid)
                validate_update(update, state)
                valid.append(update)
                server["client_loss"][str(cid)] = update.loss
            except InvalidUpdate as e:
                log.warning("round %d: rejected update: %s", rnd, e)
                rejected.append(cid)
        if len(valid) >= fc.min_valid_updates:
            state = method.aggregate(state, valid, fc.server_lr)
        else:
            log.warning("round %d: %d valid updates < federation.min_valid_updates=%d; global "
                        "model unchanged", rnd, len(valid), fc.min_valid_updates)

        # --- EVALUATION of the global model ---
        scores = {"eval_loss": None, "accuracy": None}
        if rnd % cfg.run.eval_every == 0 or rnd == fc.rounds:
            load_state(fed.params, state)
            scores = evaluate(fed.model, fed.val_rows, fed.collate, fc.eval_batch_size)
            server["global_loss"] = scores["eval_loss"]
        n = sum(u.num_examples for u in valid) or 1
        record = {
            "round": rnd, "selected": selected, "rejected": rejected,
            "train_loss": sum(u.loss * u.num_examples for u in valid) / n, **scores,
            "bytes_up": [len(blobs[c]) for c in selected],
            "bytes_down": [len(down)] * len(selected),
            "client_metrics": {str(u.client_id): u.metrics for u in valid},
            "wall_s": time.perf_counter() - t0,
        }
        if observe is not None:
            record["observed"] = observe(rnd, state, method)
        append_metrics(run_dir, record)
        server["round"] = rnd
        save_checkpoint(run_dir, state, server)
        if scores["accuracy"] is not None:
            bar.set_postfix(acc=f"{scores['accuracy']:.3f}", loss=f"{scores['eval_loss']:.3f}")

    save_file({k: v.contiguous() for k, v in state.items()}, run_dir / "global.safetensors")
    records = read_metrics(run_dir)
    write_csv(run_dir, records)
    plot_metric(records, run_dir / "accuracy.png", title=run_dir.name,
                target=cfg.run.target_metric)
    write_report(run_dir)
    return run_dir
