"""The in-process federation: one seeded round loop over one shared backbone."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tomli_w
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fedprune.client.payload import decode, encode
from fedprune.client.train import evaluate, load_state
from fedprune.config import ConfigError, ExperimentConfig
from fedprune.core.selection import SELECTORS, History
from fedprune.core.update import ClientUpdate, InvalidUpdate, State, validate_update
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


def write_environment(fed: Federation, run_dir: Path) -> None:
    """environment.json: what 'auto' settings resolved to on this machine."""
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "compute_dtype": str(fed.compute_dtype).removeprefix("torch.")}
    (run_dir / "environment.json").write_text(json.dumps(env))
    log.info("compute: %s, %d threads", env["compute_dtype"], env["threads"])


def write_partition(fed: Federation, run_dir: Path) -> None:
    labels = np.array([r["label"] for r in fed.train_rows])
    summary = partition_summary(fed.client_indices, labels, len(fed.label_names))
    summary["label_names"] = fed.label_names
    (run_dir / "partition.json").write_text(json.dumps(summary))
    sizes = summary["sizes"]
    log.info("partition: %d clients, sizes min %d / mean %.1f / max %d; validation %d examples",
             len(sizes), min(sizes), sum(sizes) / len(sizes), max(sizes), len(fed.val_rows))


Observer = Callable[[int, State, Method], dict]
ServerState = dict  # {"round": int, "client_loss": {str(cid): L_c}, "global_loss": L_g | None}


def initial_server_state(fed: Federation, run_dir: Path, resume: bool
                         ) -> tuple[State, ServerState]:
    """Round-0 global state and server state, or the last checkpoint's when resuming; metrics
    of rounds after the checkpoint are dropped (they are redone)."""
    state, server = fed.initial, {"round": 0, "client_loss": {}, "global_loss": None}
    if resume and (ckpt := load_checkpoint(run_dir)) is not None:
        state, server = ckpt
    truncate_metrics(run_dir, server["round"])
    return state, server


def select_clients(cfg: ExperimentConfig, sizes: np.ndarray, server: ServerState,
                   rnd: int) -> list[int]:
    """This round's client ids by the configured policy (``SELECTORS``) over the history the
    server holds: |D_c|, each client's last L_c, the last global loss L_g (Eq. 9)."""
    fc = cfg.federation
    history = History(sizes, {int(c): v for c, v in server["client_loss"].items()},
                      server["global_loss"])
    options = {"d": fc.pow_d} if fc.selection == "pow-d" else {}
    return SELECTORS[fc.selection](rnd, history, fc.clients_per_round, cfg.run.seed, **options)


def aggregate_payloads(method: Method, state: State, blobs: dict[int, bytes],
                       server: ServerState, cfg: ExperimentConfig, rnd: int
                       ) -> tuple[State, list[ClientUpdate], list[int]]:
    """Decode and validate every payload, in client-id order so the result does not depend on
    arrival order; reject a bad one alone (logged); aggregate the valid ones with the method's
    rule unless fewer than ``federation.min_valid_updates``. Each valid client's L_c goes into
    ``server["client_loss"]``. Returns (new state, valid updates, rejected client ids)."""
    fc = cfg.federation
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
    return state, valid, rejected


def evaluate_global(cfg: ExperimentConfig, fed: Federation, state: State, rnd: int,
                    server: ServerState) -> dict:
    """Validation loss and accuracy of the global model on evaluation rounds (every
    ``run.eval_every`` and the last); L_g is kept for the next round's selection."""
    scores = {"eval_loss": None, "accuracy": None, "eval_s": 0.0}
    if rnd % cfg.run.eval_every == 0 or rnd == cfg.federation.rounds:
        t0 = time.perf_counter()
        load_state(fed.params, state)
        scores = evaluate(fed.model, fed.val_rows, fed.collate, cfg.federation.eval_batch_size)
        scores["eval_s"] = time.perf_counter() - t0
        server["global_loss"] = scores["eval_loss"]
    return scores


def round_record(rnd: int, selected: list[int], rejected: list[int],
                 valid: list[ClientUpdate], scores: dict, bytes_up: list[int],
                 bytes_down: list[int]) -> dict:
    """One metrics.jsonl line (without wall time): train loss is the |D_c|-weighted mean L_c
    over the valid updates; bytes are per selected client, measured on the payloads."""
    n = sum(u.num_examples for u in valid) or 1
    return {
        "round": rnd, "selected": selected, "rejected": rejected,
        "train_loss": sum(u.loss * u.num_examples for u in valid) / n, **scores,
        "bytes_up": bytes_up, "bytes_down": bytes_down,
        "client_metrics": {str(u.client_id): u.metrics for u in valid},
    }


def finish_run(cfg: ExperimentConfig, run_dir: Path, state: State) -> Path:
    """Final artifacts: global.safetensors, metrics.csv, the accuracy plot, report.md."""
    save_file({k: v.contiguous() for k, v in state.items()}, run_dir / "global.safetensors")
    records = read_metrics(run_dir)
    write_csv(run_dir, records)
    plot_metric(records, run_dir / "accuracy.png", title=run_dir.name,
                target=cfg.run.target_metric)
    write_report(run_dir)
    return run_dir


def run(cfg: ExperimentConfig, run_dir: Path | None = None, *, resume: bool = False,
        progress: bool = True, observe: Observer | None = None,
        fed: Federation | None = None) -> Path:
    """Run (or resume) a federated experiment; returns the run directory.

    ``observe(round, global state, method)``, if given, is called after each round's
    aggregation; what it returns is logged under "observed" (e.g. two clients' importance).
    ``fed``: an already built federation for ``cfg`` (the benchmark reshapes clients' data).
    The Flower strategy (fedprune.flower.strategy) runs the same steps over the network.
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    prepare_run_dir(cfg, run_dir, resume)
    fed = build(cfg) if fed is None else fed
    write_environment(fed, run_dir)
    write_partition(fed, run_dir)
    fc = cfg.federation
    method = build_method(cfg, fed)
    state, server = initial_server_state(fed, run_dir, resume)
    sizes = np.array([len(ix) for ix in fed.client_indices])

    bar = tqdm(range(server["round"] + 1, fc.rounds + 1), total=fc.rounds,
               initial=server["round"], desc="rounds", disable=not progress)
    for rnd in bar:
        t0 = time.perf_counter()
        # --- SELECTION ---
        selected = select_clients(cfg, sizes, server, rnd)

        # --- LOCAL TRAINING: each client receives the serialized global state ---
        down = encode(state)
        blobs = {}
        for cid in selected:
            result = method.local(decode(down), fed.client_indices[cid],
                                  client_seed(cfg.run.seed, rnd, cid))
            blobs[cid] = method.encode(result)

        # --- AGGREGATION of the valid updates, in client-id order ---
        state, valid, rejected = aggregate_payloads(method, state, blobs, server, cfg, rnd)

        # --- EVALUATION of the global model ---
        scores = evaluate_global(cfg, fed, state, rnd, server)
        record = round_record(rnd, selected, rejected, valid, scores,
                              [len(blobs[c]) for c in selected], [len(down)] * len(selected))
        record["wall_s"] = time.perf_counter() - t0
        if observe is not None:
            record["observed"] = observe(rnd, state, method)
        append_metrics(run_dir, record)
        server["round"] = rnd
        save_checkpoint(run_dir, state, server)
        if scores["accuracy"] is not None:
            bar.set_postfix(acc=f"{scores['accuracy']:.3f}", loss=f"{scores['eval_loss']:.3f}")

    return finish_run(cfg, run_dir, state)
