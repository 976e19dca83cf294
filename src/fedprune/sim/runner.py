"""The one seeded round loop, in process or over Flower.

`run` is the whole federation, top to bottom: selection, per-client downlinks, local work
through a *transport*, decode + validate + aggregate in client-id order, evaluation, the
metrics record and the checkpoint. The transport is the only thing that differs between
runtimes: `InProcess` calls the method on the one shared backbone here; the Flower
strategy (fedprune.flower.strategy) passes one that sends messages to SuperNodes.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tomli_w
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fedprune.client.attacks import COLLUSIVE, collude, malicious
from fedprune.client.faults import REASONS, garble, injected_fault
from fedprune.client.payload import decode, encode
from fedprune.client.scaffold import SERVER as CONTROL_PREFIX
from fedprune.client.scaffold import ControlStore, control_step, server_control, with_control
from fedprune.client.work import client_round
from fedprune.client.world import Federation
from fedprune.config import ConfigError, ExperimentConfig, FederationConfig, from_dict
from fedprune.core.aggregate import ownership
from fedprune.core.privacy import NOISE_STREAM, dp_mean, epsilon
from fedprune.core.robust import FILTERS, bulyan_select, clip, krum_select
from fedprune.core.selection import SELECTORS, History, round_rng
from fedprune.core.server_opt import PREFIX as OPT_PREFIX
from fedprune.core.server_opt import ServerOpt, server_step
from fedprune.core.update import ClientUpdate, InvalidUpdate, State, validate_update
from fedprune.data import DataError, partition_summary
from fedprune.environment import environment
from fedprune.methods import METHODS, Method
from fedprune.report.metrics import append_metrics, read_metrics, truncate_metrics, write_csv
from fedprune.report.plots import plot_metric
from fedprune.report.summary import write_report
from fedprune.report.tracking import log_final, log_round
from fedprune.sim.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger("fedprune")


# --- server state and transports --------------------------------------------------------


@dataclass(frozen=True)
class ServerState:
    """What the server carries from round to round (checkpointed with the global state):
    the last finished round, each client's L_c at its last aggregated participation and the
    global validation loss L_g after the last evaluation (Eq. 9's inputs)."""

    round: int = 0
    client_loss: dict[int, float] = field(default_factory=dict)
    global_loss: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "global_loss": self.global_loss,
                "client_loss": {str(c): v for c, v in sorted(self.client_loss.items())}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ServerState:
        return cls(int(raw["round"]), {int(c): float(v) for c, v in raw["client_loss"].items()},
                   raw["global_loss"])


@dataclass
class Exchange:
    """One round's traffic with the selected clients: encoded updates by client id, which
    clients received their downlink, and transport-specific record fields (Flower: dropped
    clients with their reasons logged, wire bytes)."""

    replies: dict[int, bytes] = field(default_factory=dict)
    sent: set[int] = field(default_factory=set)
    record: dict[str, Any] = field(default_factory=dict)


class Transport(Protocol):
    def connect(self, num_clients: int) -> None:
        """Reach every client before round 1 (Flower: learn which SuperNode is which)."""

    def train(self, rnd: int, downlinks: dict[int, bytes]) -> Exchange:
        """Deliver each selected client its downlink; collect their encoded updates."""

    def report(self, record: dict[str, Any]) -> None:
        """Show a finished round (a log line, a progress bar)."""


def client_seed(seed: int, rnd: int, client_id: int) -> int:
    """Seed of one client's local work in one round: independent of every other client."""
    return int(np.random.SeedSequence([seed, rnd, client_id]).generate_state(1)[0])


class InProcess:
    """Every client on this process's one backbone, in client-id order; their SCAFFOLD
    control variates (when on) in ``store``."""

    def __init__(self, method: Method, seed: int, bar: tqdm | None = None,
                 store: ControlStore | None = None) -> None:
        self.method, self.seed, self.bar, self.store = method, seed, bar, store

    def connect(self, num_clients: int) -> None:
        pass

    def train(self, rnd: int, downlinks: dict[int, bytes]) -> Exchange:
        """Each client's update; clients with an injected fault (``[faults]``) are dropped
        with their reason, as the Flower transport drops failed SuperNodes; simulated
        colluding attackers (``[attack]`` alie / ipm) answer last, from the honest updates."""
        cfg = self.method.cfg
        results, dropped, garbled = {}, {}, set()
        for cid, blob in sorted(downlinks.items()):
            fault = injected_fault(cfg.faults, self.seed, rnd, cid)
            if fault == "garbled":  # trains; its payload is cut below
                garbled.add(cid)
            elif fault in REASONS:
                dropped[cid] = REASONS[fault]
                log.warning("round %d: dropped client %d: %s", rnd, cid, dropped[cid])
                continue
            results[cid] = client_round(self.method, decode(blob), cid,
                                        client_seed(self.seed, rnd, cid), rnd, self.store)
        if cfg.attack.kind in COLLUSIVE:  # ALIE / IPM read the round's honest updates
            bad = malicious(cfg.attack, cfg.federation.num_clients, self.seed) & set(results)
            honest = [r for c, r in results.items() if c not in bad]
            results |= {c: collude(cfg.attack, honest, results[c], len(bad)) for c in bad}
        replies = {cid: self.method.encode(r) for cid, r in results.items()}
        replies |= {cid: garble(replies[cid]) for cid in garbled}
        record = ({"dropped": sorted(dropped),
                   "dropped_reasons": {str(c): r for c, r in sorted(dropped.items())}}
                  if cfg.faults.any else {})
        return Exchange(replies, sent=set(downlinks), record=record)

    def report(self, record: dict[str, Any]) -> None:
        target = self.method.target
        if self.bar is not None and record.get(target) is not None:
            shown = {target: record[target], "loss": record.get("eval_loss")}
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None})


# --- run directory ----------------------------------------------------------------------


def default_run_dir(cfg: ExperimentConfig) -> Path:
    name = cfg.run.name or (f"{cfg.method.name}-{cfg.data.task or Path(cfg.data.dataset).stem}"
                           f"-seed{cfg.run.seed}")
    return Path(cfg.run.out_dir) / name


def run_id(run_dir: Path) -> str:
    """The run's id (``run_dir/run_id``, made at first use): what names the clients' own
    per-run state on SuperNodes, so a resumed run finds it and a new run starts clean."""
    path = Path(run_dir) / "run_id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex)
    return path.read_text().strip()


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> None:
    """Create the run directory with the resolved config; never overwrite another run."""
    config_path = run_dir / "config.json"
    if resume:
        if not config_path.is_file():
            raise ConfigError(f"--resume: {run_dir} holds no run (no config.json)")
        # through the one parser: options added since the run started had their defaults then
        saved = from_dict(json.loads(config_path.read_text()),
                          source=f"--resume: {config_path}").to_dict()
        saved["federation"]["rounds"] = cfg.federation.rounds  # extending a run is allowed
        saved["tracking"] = cfg.to_dict()["tracking"]  # trackers are not the experiment
        if saved != cfg.to_dict():
            diff = sorted(f"{s}.{k}" for s, t in cfg.to_dict().items() for k, v in t.items()
                          if saved.get(s, {}).get(k) != v)
            raise ConfigError(f"--resume: the config differs from the one {run_dir} was "
                              f"started with in {', '.join(diff)}")
    elif (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run: pass --resume to "
                          f"continue it, or choose another `run.name` or --out")
    existed = run_dir.exists()
    try:
        if not resume:  # a new run: clients' state (SCAFFOLD's c_i here, on SuperNodes by
            # run id) starts from 0
            shutil.rmtree(run_dir / "clients", ignore_errors=True)
            (run_dir / "run_id").unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(cfg.to_dict(), indent=2))
        (run_dir / "config.toml").write_text(tomli_w.dumps(cfg.to_dict()))
    except OSError as e:
        if not existed:  # leave nothing half-written behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise ConfigError(f"cannot write the run directory {run_dir} ({e.strerror or e}); "
                          f"choose another `run.out_dir` / `run.name` or --out") from None


def write_environment(fed: Federation, run_dir: Path) -> None:
    """environment.json: versions, the CPU and what 'auto' settings resolved to here."""
    device = next(fed.model.parameters()).device
    env = {**environment(), "threads": torch.get_num_threads(),
           "compute_dtype": str(fed.compute_dtype).removeprefix("torch."),
           "device": str(device),
           **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})}
    (run_dir / "environment.json").write_text(json.dumps(env, indent=1))
    log.info("compute: %s on %s, %d threads on %s", env["compute_dtype"],
             env.get("gpu", "the CPU"), env["threads"], env["cpu"]["model"])


def write_partition(fed: Federation, run_dir: Path) -> None:
    """partition.json: per-client sizes (and label histograms when the rows have labels)."""
    if fed.label_names:
        labels = np.array([r["label"] for r in fed.train_rows])
        summary = partition_summary(fed.client_indices, labels, len(fed.label_names))
        summary["label_names"] = fed.label_names
    else:
        summary = {"sizes": [len(ix) for ix in fed.client_indices]}
    (run_dir / "partition.json").write_text(json.dumps(summary))
    sizes = summary["sizes"]
    log.info("partition: %d clients, sizes min %d / mean %.1f / max %d; validation %d examples",
             len(sizes), min(sizes), sum(sizes) / len(sizes), max(sizes), len(fed.val_rows))


def initial_state(method: Method, run_dir: Path, resume: bool
                  ) -> tuple[State, ServerState, State]:
    """Round-0 global, server and server-optimizer state, or the last checkpoint's when
    resuming (the server optimizer's and SCAFFOLD's tensors are stored beside the global
    state, keys prefixed ``server_opt::`` / ``scaffold::``); metrics of rounds after the
    checkpoint are dropped (they are redone)."""
    state, server, moments = method.initial_state(), ServerState(), {}
    if resume and (ckpt := load_checkpoint(run_dir)) is not None:
        server = ServerState.from_json(ckpt[1])
        ours = (OPT_PREFIX, CONTROL_PREFIX)
        state = {k: v for k, v in ckpt[0].items() if not k.startswith(ours)}
        moments = {k: v for k, v in ckpt[0].items() if k.startswith(ours)}
    truncate_metrics(run_dir, server.round)
    return state, server, moments


# --- the steps of a round ---------------------------------------------------------------


def select_clients(cfg: ExperimentConfig, sizes: np.ndarray, server: ServerState,
                   rnd: int) -> list[int]:
    """This round's client ids by the configured policy (``SELECTORS``) over the history the
    server holds: |D_c|, each client's last L_c, the last global loss L_g (Eq. 9). A client
    with no training examples is never selected: the policy sees only the clients that hold
    data, renumbered 0..n-1 (the identity when all do), and its choice is mapped back."""
    fc = cfg.federation
    options = {"d": fc.pow_d} if fc.selection == "pow-d" else {}
    ids = np.flatnonzero(sizes)
    position = np.full(len(sizes), -1)
    position[ids] = np.arange(len(ids))
    loss = {int(position[c]): v for c, v in server.client_loss.items() if position[c] >= 0}
    history = History(sizes[ids], loss, server.global_loss)
    chosen = SELECTORS[fc.selection](rnd, history, fc.clients_per_round, cfg.run.seed,
                                     **options)
    return [int(ids[j]) for j in chosen]


def eligible_clients(cfg: ExperimentConfig, sizes: np.ndarray) -> int:
    """How many clients hold training examples (the population selection draws from);
    DataError when fewer than `federation.clients_per_round`."""
    held = int(np.count_nonzero(sizes))
    if held < len(sizes):
        log.warning("%d of %d clients hold no training examples (partition.scheme=%r); they "
                    "are never selected", len(sizes) - held, len(sizes), cfg.partition.scheme)
    if held < cfg.federation.clients_per_round:
        raise DataError(f"only {held} of {len(sizes)} clients hold training examples "
                        f"(partition.scheme={cfg.partition.scheme!r}, "
                        f"min_partition_size={cfg.partition.min_partition_size}), fewer than "
                        f"`federation.clients_per_round` = {cfg.federation.clients_per_round}")
    return held


def downlink(method: Method, fc: FederationConfig, state: State, moments: State, cid: int,
             rnd: int) -> bytes:
    """What client ``cid`` receives: its part of the global state (``Method.downlink``)
    and, with SCAFFOLD, the same part of the server's control variate c."""
    mine = method.downlink(state, cid, rnd)
    if fc.scaffold:
        mine = with_control(mine, method.downlink(server_control(state, moments), cid, rnd))
    return encode(mine)


def decode_updates(method: Method, state: State, replies: dict[int, bytes],
                   sizes: np.ndarray, rnd: int, scaffold: bool = False
                   ) -> tuple[list[ClientUpdate], dict[int, str]]:
    """Decode and validate every reply in client-id order (so nothing depends on arrival
    order); a bad one is rejected alone, with its reason. |D_c| must be what the server
    knows of the client's partition; with ``scaffold`` a control-variate change must come
    with each tensor. Returns (valid updates, client id -> reason)."""
    valid, rejected = [], {}
    for cid, blob in sorted(replies.items()):
        try:
            update = method.decode(blob, cid)
            validate_update(update, state, num_examples=int(sizes[cid]), control=scaffold,
                            rnd=rnd)
            valid.append(update)
        except InvalidUpdate as e:
            log.warning("round %d: rejected update: %s", rnd, e)
            rejected[cid] = str(e)
    return valid, rejected


def server_update(method: Method, cfg: ExperimentConfig, state: State,
                  valid: list[ClientUpdate], moments: State, rnd: int) -> tuple[State, State]:
    """The method's aggregate with ``server_lr`` (fedavg), or that aggregate with step 1 as
    the proposal of a server optimizer over the coordinates the updates own (its state
    ``moments`` keyed ``server_opt::{m,v,t}::<key>``); with SCAFFOLD, the server control
    variate steps too (``scaffold::<key>``). With [dp], DP-FedAvg's noised mean
    (`core.privacy`) takes the method's aggregate's place and every coordinate counts as
    owned (the noise is everywhere). Returns (global state, moments)."""
    fc, dp = cfg.federation, cfg.dp
    if fc.scaffold:
        moments = control_step(moments, state, valid, fc.num_clients)
    aggregate = (partial(dp_mean, clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier,
                         expected_clients=fc.clients_per_round,
                         rng=round_rng(cfg.run.seed, rnd, NOISE_STREAM))
                 if dp.on else method.aggregate)
    if fc.server_optimizer == "fedavg":
        return aggregate(state, valid, server_lr=fc.server_lr), moments
    opt = ServerOpt(fc.server_optimizer, fc.server_lr, fc.server_beta1, fc.server_beta2,
                    fc.server_tau, fc.server_bias_correction)
    owned = ({k: torch.tensor(True) for k in state} if dp.on
             else ownership(state, valid))  # before aggregate: some methods reuse the deltas
    proposed = aggregate(state, valid, server_lr=1.0)
    inner = {k.removeprefix(OPT_PREFIX): v for k, v in moments.items()
             if k.startswith(OPT_PREFIX)}
    stepped, inner = server_step(opt, state, proposed, owned, inner)
    others = {k: v for k, v in moments.items() if not k.startswith(OPT_PREFIX)}
    return method.project(proposed, stepped), {**others, **{OPT_PREFIX + k: v
                                                            for k, v in inner.items()}}


def robust_updates(fc: FederationConfig, valid: list[ClientUpdate]) -> list[ClientUpdate]:
    """The updates the server aggregates: each clipped to ``clip_norm`` (when set), then
    Krum's / Multi-Krum's / Bulyan's choice among them (``robust``; `core.robust`)."""
    out = [clip(u, fc.clip_norm) for u in valid] if fc.clip_norm else list(valid)
    if fc.robust == "bulyan":
        out = bulyan_select(out, fc.robust_f)
    elif fc.robust in FILTERS:
        keep = 1 if fc.robust == "krum" else fc.robust_keep or max(1, len(out) - fc.robust_f)
        out = krum_select(out, fc.robust_f, keep)
    return out


def after_training(server: ServerState, valid: list[ClientUpdate]) -> ServerState:
    """Each aggregated client's L_c becomes its last loss (Eq. 9)."""
    return replace(server, client_loss={**server.client_loss, **{
        u.client_id: u.loss for u in valid if u.loss is not None}})


def evaluate_global(method: Method, cfg: ExperimentConfig, state: State, rnd: int
                    ) -> dict[str, float | None]:
    """The method's validation metrics on evaluation rounds (every ``run.eval_every`` and
    the last), with their seconds, None on the others; its server metrics every round."""
    scores: dict[str, float | None] = {**dict.fromkeys(method.metrics),
                                       **method.server_metrics(state)}
    scores["eval_s"] = 0.0
    if rnd % cfg.run.eval_every == 0 or rnd == cfg.federation.rounds:
        t0 = time.perf_counter()
        scores.update(method.evaluate(state))
        scores["eval_s"] = time.perf_counter() - t0
    return scores


def round_record(rnd: int, selected: list[int], rejected: dict[int, str],
                 valid: list[ClientUpdate], scores: dict, exchange: Exchange,
                 downlinks: dict[int, bytes]) -> dict:
    """One metrics.jsonl line (without wall time): train loss is the |D_c|-weighted mean L_c
    over the valid updates that trained (None when there are none); bytes are per selected
    client, measured on the payloads (0 for what was not sent or did not come back)."""
    trained = [u for u in valid if u.loss is not None]
    n = sum(u.num_examples for u in trained)
    return {
        "round": rnd, "selected": selected, "rejected": sorted(rejected),
        "rejected_reasons": {str(c): rejected[c] for c in sorted(rejected)},
        "train_loss": sum(u.loss * u.num_examples for u in trained) / n if n else None,
        **scores,
        "bytes_up": [len(exchange.replies.get(c, b"")) for c in selected],
        "bytes_down": [len(downlinks[c]) if c in exchange.sent else 0 for c in selected],
        "client_metrics": {str(u.client_id): u.metrics for u in valid},
    }


def finish_run(method: Method, cfg: ExperimentConfig, run_dir: Path, state: State) -> Path:
    """Final artifacts: global.safetensors, metrics.csv, the metric plot, resources.json
    (peak RSS of this process), report.md."""
    save_file({k: v.contiguous() for k, v in state.items()}, run_dir / "global.safetensors")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    (run_dir / "resources.json").write_text(json.dumps({"peak_rss_mb": peak_kib / 1024}))
    records = read_metrics(run_dir)
    write_csv(run_dir, records)
    plot_metric(records, run_dir / f"{method.target}.png", metric=method.target,
                title=run_dir.name, target=cfg.run.target_metric)
    write_report(run_dir)
    log_final(cfg, run_dir)  # [tracking]: final artefacts
    return run_dir


Observer = Callable[[int, State, Method], dict]


# --- the loop ---------------------------------------------------------------------------


def run(cfg: ExperimentConfig, run_dir: Path | None = None, *, resume: bool = False,
        progress: bool = True, observe: Observer | None = None, fed: Federation | None = None,
        transport: Callable[[Method], Transport] | None = None) -> Path:
    """Run (or resume) a federated experiment; returns the run directory.

    ``transport(method)`` makes the transport (default: `InProcess`). ``observe(round,
    global state, method)``, if given, is called after each round's aggregation; what it
    returns is logged under "observed" (e.g. two clients' importance). ``fed``: an already
    built federation for ``cfg`` (the benchmark reshapes clients' data).
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    kind = METHODS[cfg.method.name]
    kind.check(cfg)  # before anything is written or loaded
    prepare_run_dir(cfg, run_dir, resume)
    fed = kind.world(cfg) if fed is None else fed
    sizes = np.array([len(ix) for ix in fed.client_indices])
    held = eligible_clients(cfg, sizes)
    write_environment(fed, run_dir)
    write_partition(fed, run_dir)
    fc = cfg.federation
    method = kind(cfg, fed)
    state, server, moments = initial_state(method, run_dir, resume)
    bar = tqdm(range(server.round + 1, fc.rounds + 1), total=fc.rounds, initial=server.round,
               desc="rounds", disable=not progress)
    store = ControlStore(run_dir / "clients") if fc.scaffold else None  # clients' c_i
    link = (transport(method) if transport is not None
            else InProcess(method, cfg.run.seed, bar, store))
    link.connect(fc.num_clients)

    for rnd in bar:
        t0 = time.perf_counter()
        # --- SELECTION ---
        selected = select_clients(cfg, sizes, server, rnd)

        # --- LOCAL WORK: each selected client gets its downlink, returns an update ---
        method.plan(rnd, selected)
        downlinks = {cid: downlink(method, fc, state, moments, cid, rnd) for cid in selected}
        exchange = link.train(rnd, downlinks)

        # --- AGGREGATION of the valid updates, in client-id order ---
        valid, rejected = decode_updates(method, state, exchange.replies, sizes, rnd,
                                         fc.scaffold)
        aggregated = robust_updates(fc, valid)
        if len(valid) >= fc.min_valid_updates:
            state, moments = server_update(method, cfg, state, aggregated, moments, rnd)
            server = after_training(server, valid)
        else:
            log.warning("round %d: %d valid updates < federation.min_valid_updates=%d; global "
                        "model unchanged", rnd, len(valid), fc.min_valid_updates)

        # --- EVALUATION of the global model ---
        scores = evaluate_global(method, cfg, state, rnd)
        if scores.get("eval_loss") is not None:
            server = replace(server, global_loss=scores["eval_loss"])

        # --- RECORD and CHECKPOINT ---
        record = round_record(rnd, selected, rejected, valid, scores, exchange,
                              downlinks)
        if fc.robust in FILTERS:
            record["aggregated"] = [u.client_id for u in aggregated]
        if cfg.dp.on:  # privacy spent after this round's release
            record["dp_epsilon"] = epsilon(cfg.dp.noise_multiplier,
                                           fc.clients_per_round / held, rnd,
                                           cfg.dp.delta)
        record.update(exchange.record)
        record["wall_s"] = time.perf_counter() - t0
        if observe is not None:
            record["observed"] = observe(rnd, state, method)
        append_metrics(run_dir, record)
        log_round(cfg, run_dir, record)  # [tracking]: TensorBoard / MLflow
        server = replace(server, round=rnd)
        save_checkpoint(run_dir, {**state, **moments}, server.to_json())
        link.report(record)

    return finish_run(method, cfg, run_dir, state)
