"""The fedprune round loop over a Flower Grid.

`FedpruneStrategy.start` is `fedprune.sim.runner.run` itself with a `FlowerTransport`: the
local step goes to the SuperNodes, everything else (selection, decode + validate + aggregate
in client-id order, evaluation, metrics, checkpoints, report) is the same code, so the two
runtimes cannot drift apart. What the network adds:

- client ids: a SuperNode's `partition-id`; learned once by a query to every node before the
  first round, because Eq. 9 selects client ids before anyone trains;
- a reply timeout: a selected client whose reply does not come in time, comes back as an
  error (node gone, ClientApp raised) or is never sent (node offline) is *dropped* — logged
  with its reason and listed under `dropped` in metrics.jsonl. It is not aggregated and its
  L_c is not updated, like a `rejected` update.

Flower's own `flwr.serverapp.strategy.Strategy.start` is not reused: it aggregates
ArrayRecords itself, evaluates at round 0 and on clients, and has no place for the selection
history or measured payload bytes; fedprune's loop is the reference here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedprune.client.attacks import COLLUSIVE
from fedprune.config import ConfigError, ExperimentConfig
from fedprune.flower.settings import FlowerSettings
from fedprune.flower.wire import CONFIG, UPDATE, train_content, unpack, wire_size
from fedprune.sim import runner

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


class FlowerTransport:
    """`runner.Transport` over a Grid: one TRAIN message per selected client's SuperNode."""

    def __init__(self, grid: Grid, settings: FlowerSettings, experiment: str,
                 metrics: tuple[str, ...] = ("eval_loss", "accuracy"), run_id: str = "") -> None:
        self.grid, self.settings, self.experiment = grid, settings, experiment
        self.run_id = run_id  # names the SuperNodes' per-run state (SCAFFOLD's c_i)
        self.metrics = metrics  # the method's validation metrics, shown in the round log
        self.nodes: dict[int, int] = {}

    def connect(self, num_clients: int) -> None:
        self.nodes = discover_clients(self.grid, num_clients, self.settings)

    def train(self, rnd: int, downlinks: dict[int, bytes]) -> runner.Exchange:
        """Send each selected client whose node is online its downlink; wait for updates.
        Clients whose node is offline get no message and count as failed (dropped)."""
        online = set(self.grid.get_node_ids())
        messages = {
            cid: Message(train_content(blob, {"round": rnd, "client-id": cid,
                                              "experiment": self.experiment,
                                              "run-id": self.run_id}),
                         self.nodes[cid], MessageType.TRAIN, ttl=self.settings.reply_timeout,
                         group_id=str(rnd))
            for cid, blob in downlinks.items() if self.nodes[cid] in online}
        log.info("round %d: training on clients %s", rnd, sorted(messages))
        result = exchange(self.grid, messages, self.settings.reply_timeout)
        result.failed.update({c: f"SuperNode {self.nodes[c]} is offline"
                              for c in downlinks if c not in messages})
        replies = {c: unpack(r.content[UPDATE]) for c, r in result.replies.items()
                   if UPDATE in r.content}
        dropped = sorted(set(downlinks) - set(replies))
        for cid in dropped:
            log.warning("round %d: dropped client %d: %s", rnd, cid,
                        result.failed.get(cid, "reply without an update record"))
        selected = sorted(downlinks)
        record = {"dropped": dropped,
                  "dropped_reasons": {str(c): result.failed.get(c, "reply without an update "
                                                                  "record") for c in dropped},
                  "wire_bytes_up": [wire_size(result.replies[c].content)
                                    if c in result.replies else 0 for c in selected],
                  "wire_bytes_down": [result.sent_bytes.get(c, 0) for c in selected]}
        return runner.Exchange(replies, set(result.sent_bytes), record)

    def report(self, record: dict[str, Any]) -> None:
        keys = ("selected", "dropped", "rejected", "train_loss", *self.metrics)
        log.info("round %d: %s", record["round"], json.dumps({k: record.get(k) for k in keys}))


class FedpruneStrategy:
    """Runs one fedprune experiment on the SuperNodes a Grid reaches (see module doc)."""

    def __init__(self, cfg: ExperimentConfig, settings: FlowerSettings) -> None:
        if cfg.attack.kind in COLLUSIVE:
            raise ConfigError(f"`attack.kind` = {cfg.attack.kind!r} reads every honest update "
                              f"of a round: the in-process simulator only (`fedprune run`)")
        self.cfg = cfg
        self.settings = settings
        # every train message carries the resolved experiment: clients need no config file
        self.experiment = tomli_w.dumps(cfg.to_dict())

    def start(self, grid: Grid) -> Path:
        """`fedprune.sim.runner.run` over the Grid; returns the run directory."""
        settings = self.settings
        run_dir = Path(settings.run_dir) if settings.run_dir else runner.default_run_dir(self.cfg)
        return runner.run(self.cfg, run_dir, resume=settings.resume, progress=False,
                          transport=lambda method: FlowerTransport(  # after prepare_run_dir
                              grid, settings, self.experiment, tuple(method.metrics),
                              runner.run_id(run_dir)))
