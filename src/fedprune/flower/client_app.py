"""The ClientApp: a SuperNode is one fedprune client, its partition id is the client id.

Start a SuperNode with ``--node-config 'partition-id=<c> num-partitions=<C>'`` (and
optionally ``state-dir=<folder>`` for its SCAFFOLD control variate, ``device=cuda:<i>`` for
the device its backbone computes on, overriding ``run.device``); Flower's simulation
engine sets the first two for its virtual SuperNodes. Each train message carries the
experiment the ServerApp resolved (fedprune TOML text), the round and the client id; the
handler builds the run's Federation (data partition, backbone, method) once per process (per
Ray actor in a simulation), runs `Method.local` from the received global state with the same
per-client seed as the in-process runner, and replies with `Method.encode` bytes.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedprune.config import ExperimentConfig, from_dict
from fedprune.flower.wire import CONFIG, STATE, reply_content, unpack

if TYPE_CHECKING:
    from fedprune.client.world import Federation
    from fedprune.methods import Method

app = ClientApp()


@lru_cache(maxsize=1)
def federation(experiment: str, device: str = "") -> tuple[ExperimentConfig, Federation, Method]:
    """Config, Federation and method of a run, built once per process (one backbone), on
    ``device`` (the SuperNode's node config ``device``) when given, else ``run.device``.

    torch / transformers are imported here, not at module level: under subprocess isolation
    every message is a fresh ClientApp process, and the query before round 1 needs none of
    them (it saves seconds per SuperNode)."""
    from fedprune.config import ConfigError
    from fedprune.methods import METHODS

    cfg = from_dict(tomllib.loads(experiment), source="experiment sent by the ServerApp")
    if device:
        try:
            cfg = replace(cfg, run=replace(cfg.run, device=device))
        except ConfigError as e:
            raise ConfigError(f"SuperNode node config device={device!r}: {e}") from None
    kind = METHODS[cfg.method.name]
    kind.check(cfg)
    fed = kind.world(cfg)
    return cfg, fed, kind(cfg, fed)


def partition_id(context: Context, num_clients: int) -> int:
    """This SuperNode's client id, checked against the federation's size."""
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("SuperNode needs --node-config 'partition-id=<c> num-partitions=<C>' "
                         f"(fedprune client id and federation.num_clients); got {dict(node)}")
    pid, n = int(node["partition-id"]), int(node["num-partitions"])
    if n != num_clients:
        raise ValueError(f"SuperNode num-partitions={n} but the experiment has "
                         f"federation.num_clients={num_clients} (simulation: run "
                         f"num-supernodes={num_clients})")
    if not 0 <= pid < n:
        raise ValueError(f"SuperNode partition-id={pid} is not in [0, {n})")
    return pid


def control_store(context: Context, cfg: ExperimentConfig, run_id: str):
    """Where this SuperNode keeps its SCAFFOLD control variate: node config ``state-dir``
    or the data cache, one folder per run (the ServerApp's run id; a resumed run keeps it)."""
    from fedprune.client.scaffold import ControlStore
    from fedprune.client.world import cache_dir

    if not cfg.federation.scaffold:
        return None
    if not run_id:
        raise ValueError("federation.scaffold needs the run id in the train message (a "
                         "ServerApp of this fedprune version sends it)")
    root = Path(str(context.node_config.get("state-dir", cache_dir(cfg) / "scaffold")))
    return ControlStore(root.expanduser() / run_id)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this SuperNode is (needed before Eq. 9 selection)."""
    pid = partition_id(context, int(msg.content[CONFIG]["num-clients"]))
    return Message(RecordDict({CONFIG: ConfigRecord({"partition-id": pid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One client's local round: `Method.local` from the received global state."""
    from fedprune.client.faults import ClientFault, garble, injected_fault
    from fedprune.client.payload import decode
    from fedprune.client.work import client_round
    from fedprune.sim.runner import client_seed

    config = msg.content[CONFIG]
    cfg, _, method = federation(str(config["experiment"]),
                                str(context.node_config.get("device", "")))
    cid, rnd = partition_id(context, cfg.federation.num_clients), int(config["round"])
    if cid != int(config["client-id"]):
        raise ValueError(f"message for client {config['client-id']} reached partition {cid}")
    fault = injected_fault(cfg.faults, cfg.run.seed, rnd, cid)
    if fault == "crash":
        raise ClientFault(f"client {cid}: injected crash in round {rnd}")
    if fault in ("hang", "silent"):  # hang: past the ServerApp's reply-timeout; no update
        time.sleep(cfg.faults.hang_s if fault == "hang" else 0.0)
        return Message(RecordDict({}), reply_to=msg)
    received = decode(unpack(msg.content[STATE]))
    result = client_round(method, received, cid, client_seed(cfg.run.seed, rnd, cid), rnd,
                          control_store(context, cfg, str(config.get("run-id", ""))))
    payload = method.encode(result)
    return Message(reply_content(garble(payload) if fault == "garbled" else payload),
                   reply_to=msg)
