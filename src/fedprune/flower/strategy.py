"""The fedprune round loop over a Flower Grid.

`FedpruneStrategy.start` is `fedprune.sim.runner.run` with the local step moved to the
SuperNodes: it calls the runner's own helpers (selection registry, decode + validate +
aggregate in client-id order, global evaluation, metrics record, checkpoint, final report),
so the two runtimes cannot drift apart. What the network adds:

- client ids: a SuperNode's `partition-id`; learned once by a query to every node before the
  first round, because Eq. 9 selects client ids before anyone trains;
- a reply timeout: a selected client whose reply does not come in time, comes back as an
  error (node gone, ClientApp raised) or is never sent (node offline) is *dropped* — logged
  with its reason and listed under `dropped` in metrics.jsonl. It is not aggregated and its
  L_c is not updated, like a `rejected` update.

Flower's own `flwr.serverapp.strategy.Strategy.start` is not reused: it aggregates
ArrayRecords itself, evaluates at round 0 and on clients, and has no place for the selection
history or measured payload bytes; the runner's loop is the reference here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomli_w
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedprune.client.payload import encode
from fedprune.config import ExperimentConfig
from fedprune.flower.settings import FlowerSettings
from fedprune.flower.wire import CONFIG, UPDATE, train_content, unpack, wire_size
from fedprune.methods import build_method
from fedprune.report.metrics import append_metrics
from fedprune.sim.checkpoint import save_checkpoint
from fedprune.sim.runner import (
    aggregate_payloads,
    default_run_dir,
    evaluate_global,
    finish_run,
    initial_server_state,
    prepare_run_dir,
    round_record,
    select_clients,
    write_environment,
    write_partition,
)
from fedprune.sim.setup import build

log = logging.getLogger("fedprune")
POLL_S = 1.0  # seconds between two pulls of replies from the SuperLink


@dataclass
class Exchange:
    """Outcome of sending one message per client: replies, failures, wire bytes."""

    replies: dict[int, Message] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # client id -> reason
    sent_bytes: dict[int, int] = field(default_factory=dict)


def exchange(grid: Grid, messages: dict[int, Message], timeout: float) -> Exchange:
    """Push one message per client id, pull replies until all came or ``timeout`` passed.

    Messages are matched by id (the grid sets it on push), never by sender, so an error the
    SuperLink answers on a node's behalf (node unavailable, message expired) is attributed.
    """
    out = Exchange(sent_bytes={c: wire_size(m.content) for c, m in messages.items()})
    accepted = set(grid.push_messages(list(messages.values()))) if messages else set()
    pending = {}
    for cid, msg in messages.items():
        if msg.metadata.message_id in accepted:
            pending[msg.metadata.message_id] = cid
        else:
            out.failed[cid] = "the SuperLink did not accept the message"
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            cid = pending.pop(reply.metadata.reply_to_message_id, None)
            if cid is None:
                continue
            if reply.has_error():
                out.failed[cid] = f"error {reply.error.code}: {reply.error.reason}"
            else:
                out.replies[cid] = reply
        if pending and time.monotonic() >= deadline:
            break
        if pending:
            time.sleep(POLL_S)
    out.failed.update({cid: f"no reply within {timeout:g} s" for cid in pending.values()})
    return out


def discover_clients(grid: Grid, num_clients: int, settings: FlowerSettings) -> dict[int, int]:
    """client id -> node id for every partition, asking each online node once which
    partition it holds; waits up to ``connect-timeout`` for all to be online."""
    nodes: dict[int, int] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + settings.connect_timeout
    while len(nodes) < num_clients:
        new = sorted(set(grid.get_node_ids()) - asked)
        ask = {n: Message(RecordDict({CONFIG: ConfigRecord({"num-clients": num_clients})}), n,
                          MessageType.QUERY, ttl=settings.reply_timeout) for n in new}
        result = exchange(grid, ask, min(settings.reply_timeout,
                                         max(deadline - time.monotonic(), POLL_S)))
        for node, reason in result.failed.items():
            if reason.startswith("error"):  # the ClientApp refused: misconfigured node
                raise RuntimeError(f"SuperNode {node} cannot serve this run: {reason}")
        for node, reply in result.replies.items():
            pid = int(reply.content[CONFIG]["partition-id"])
            if pid in nodes and nodes[pid] != node:
                raise RuntimeError(f"SuperNodes {nodes[pid]} and {node} both claim "
                                   f"partition-id={pid}")
            nodes[pid] = node
        asked |= set(result.replies)
        if len(nodes) < num_clients and time.monotonic() >= deadline:
            missing = sorted(set(range(num_clients)) - set(nodes))
            raise RuntimeError(f"no SuperNode with partition-id in {missing} came online within "
                               f"connect-timeout={settings.connect_timeout:g} s "
                               f"({len(nodes)} of federation.num_clients={num_clients} found)")
        if len(nodes) < num_clients:
            time.sleep(POLL_S)
    log.info("federation: client id -> SuperNode %s", nodes)
    return nodes


class FedpruneStrategy:
    """Runs one fedprune experiment on the SuperNodes a Grid reaches (see module doc)."""

    def __init__(self, cfg: ExperimentConfig, settings: FlowerSettings) -> None:
        self.cfg = cfg
        self.settings = settings
        # every train message carries the resolved experiment: clients need no config file
        self.experiment = tomli_w.dumps(cfg.to_dict())

    def start(self, grid: Grid) -> Path:
        """The round loop of `fedprune.sim.runner.run`; returns the run directory."""
        cfg, fc, settings = self.cfg, self.cfg.federation, self.settings
        run_dir = Path(settings.run_dir) if settings.run_dir else default_run_dir(cfg)
        prepare_run_dir(cfg, run_dir, settings.resume)
        fed = build(cfg)
        write_environment(fed, run_dir)
        write_partition(fed, run_dir)
        method = build_method(cfg, fed)
        state, server = initial_server_state(fed, run_dir, settings.resume)
        sizes = np.array([len(ix) for ix in fed.client_indices])
        nodes = discover_clients(grid, fc.num_clients, settings)

        for rnd in range(server["round"] + 1, fc.rounds + 1):
            t0 = time.perf_counter()
            # --- SELECTION ---
            selected = select_clients(cfg, sizes, server, rnd)

            # --- LOCAL TRAINING on the selected SuperNodes ---
            down = encode(state)
            result = self.train_round(grid, nodes, selected, down, rnd)
            blobs = {c: unpack(r.content[UPDATE]) for c, r in result.replies.items()
                     if UPDATE in r.content}
            for cid in sorted(set(selected) - set(blobs)):
                log.warning("round %d: dropped client %d: %s", rnd, cid,
                            result.failed.get(cid, "reply without an update record"))

            # --- AGGREGATION of the valid updates, in client-id order ---
            state, valid, rejected = aggregate_payloads(method, state, blobs, server, cfg, rnd)

            # --- EVALUATION of the global model ---
            scores = evaluate_global(cfg, fed, state, rnd, server)
            sent = [c for c in selected if c in result.sent_bytes]
            record = round_record(rnd, selected, rejected, valid, scores,
                                  [len(blobs.get(c, b"")) for c in selected],
                                  [len(down) if c in sent else 0 for c in selected])
            record["dropped"] = sorted(set(selected) - set(blobs))
            record["wire_bytes_up"] = [wire_size(result.replies[c].content)
                                       if c in result.replies else 0 for c in selected]
            record["wire_bytes_down"] = [result.sent_bytes.get(c, 0) for c in selected]
            record["wall_s"] = time.perf_counter() - t0
            append_metrics(run_dir, record)
            server["round"] = rnd
            save_checkpoint(run_dir, state, server)
            log.info("round %d: %s", rnd, json.dumps({k: record[k] for k in (
                "selected", "dropped", "rejected", "train_loss", "eval_loss", "accuracy")}))

        return finish_run(cfg, run_dir, state)

    def train_round(self, grid: Grid, nodes: dict[int, int], selected: list[int],
                    down: bytes, rnd: int) -> Exchange:
        """Send the global state to the selected clients whose node is online; wait for
        their updates. Clients whose node is offline get no message and count as failed."""
        online = set(grid.get_node_ids())
        messages = {
            cid: Message(train_content(down, {"round": rnd, "client-id": cid,
                                              "experiment": self.experiment}),
                         nodes[cid], MessageType.TRAIN, ttl=self.settings.reply_timeout,
                         group_id=str(rnd))
            for cid in selected if nodes[cid] in online}
        log.info("round %d: training on clients %s", rnd, sorted(messages))
        result = exchange(grid, messages, self.settings.reply_timeout)
        result.failed.update({c: f"SuperNode {nodes[c]} is offline"
                              for c in selected if c not in messages})
        return result
