"""fedprune on a real Flower federation: a SuperLink and SuperNodes as processes on 127.0.0.1
(TLS with certificates made here + SuperNode authentication, and --insecure), AoH on the real
MiniLM with a tiny BBC subset. Parity with the in-process runner (after a killed and resumed
ServerApp; also on Flower's simulation engine, via `flwr run` and via `run_simulation`),
refused keys and CAs, and the pieces that need no processes. FedSpaLLM, PruFed and killed
SuperNodes: test_flower_e2e.py; the process helpers: flower_helpers.py."""

from __future__ import annotations

import logging
import os
import signal
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tomli_w

pytest.importorskip("flwr")

from flower_helpers import (
    AOH,
    ROOT,
    assert_same_run,
    federation,
    flwr,
    flwr_run,
    free_port,
    make_tls,
    records,
    run_config,
    start_flwr_run,
    tiny,
    wait_for,
)
from flwr.app import ConfigRecord, RecordDict

from fedprune.config import ConfigError, load_config
from fedprune.flower import client_app, strategy
from fedprune.flower.client_app import partition_id
from fedprune.flower.server_app import server_app
from fedprune.flower.settings import FlowerSettings
from fedprune.flower.wire import pack, unpack
from fedprune.sim import runner


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process run (`fedprune.sim.runner`) of the tiny 2-client AoH experiment that
    every 2-client Flower run below must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    overrides = tiny(tmp, 2)
    cfg = load_config(AOH, overrides)
    return SimpleNamespace(overrides=overrides, cfg=cfg,
                           run_dir=runner.run(cfg, tmp / "in-process", progress=False))


# --- TLS + SuperNode auth, 2 SuperNodes: parity with the in-process runner --------------------

def _serverapps() -> list[int]:
    """pids of the running ServerApp processes (`flwr-serverapp`, started by the SuperExec)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"flwr-serverapp" in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except OSError:
            continue
    return out


def refuse_strangers(fed, tmp: Path) -> dict[str, tuple[int, str]]:
    """On a TLS + SuperNode-auth federation, start a SuperNode whose key was never registered
    and one that trusts another CA; wait for both to exit. name -> (exit code, log)."""
    other, mine = make_tls(tmp / "other", 1), tmp / "tls"  # another CA and key
    port = tomllib.loads((Path(fed.env["FLWR_HOME"]) / "config.toml").read_text())[
        "superlink"]["test"]["address"].rsplit(":", 1)[1]
    for name, ca, key in (("unregistered", mine / "ca.crt", other["node0"]),
                          ("wrong-ca", other["ca"], mine / "node0")):
        fed.procs.start(name, "flower-supernode", "--root-certificates", str(ca),
                        "--auth-supernode-private-key", str(key), "--superlink",
                        f"127.0.0.1:{port}", "--port", str(free_port()),
                        "--node-config", "partition-id=0 num-partitions=1")
    for name in ("unregistered", "wrong-ca"):
        wait_for(lambda n=name: fed.procs.roots[n].poll() is not None, f"{name} to exit")
    return {n: (fed.procs.roots[n].returncode, fed.procs.log(n))
            for n in ("unregistered", "wrong-ca")}


def kill_serverapp(flwr_run_proc) -> list[int]:
    """SIGKILL every ServerApp process and the `flwr run` that streams its log (the stream
    would wait ~1 min for the SuperLink to notice); returns the killed pids."""
    killed = _serverapps()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    flwr_run_proc.kill()
    flwr_run_proc.wait()
    return killed


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory, reference):
    """The 2-client experiment on a TLS + SuperNode-auth federation, with two crashes (issue
    15 item 3 on Flower): the ServerApp process is SIGKILLed inside round 1 (a seeded random
    moment after the run directory is set up, while the SuperNodes load and train), then,
    after a `flwr run` with `resume=true` (nothing checkpointed: it starts over), as soon as
    round 1 is checkpointed; a third `flwr run` with `resume=true` continues the run directory
    on the same SuperNodes. The tests below check that the result is the uninterrupted
    in-process run's. Then, on the same federation, two SuperNodes that must be refused try
    to join."""
    tmp = tmp_path_factory.mktemp("flower-tls")
    run_dir = tmp / "flower-run"
    moment = np.random.default_rng(15).uniform(0.0, 0.5)  # s after partition.json
    config = [run_config(reference.overrides, run_dir)]
    resume = [config[0] + " resume=true"]
    with federation(tmp, 2, tls=True) as fed:
        first = start_flwr_run(fed, config, name="first")
        wait_for(lambda: (run_dir / "partition.json").is_file(), "the run directory",
                 timeout=300)
        time.sleep(moment)
        killed = kill_serverapp(first)
        assert killed and records(run_dir) == [], "the ServerApp was not killed in round 1"
        second = start_flwr_run(fed, resume, name="second")
        # the checkpoint is written (atomically) after round 1's metrics line
        wait_for(lambda: (run_dir / "checkpoint.safetensors").is_file(),
                 "round 1 to be checkpointed", timeout=300)
        killed = kill_serverapp(second)
        assert killed and len(records(run_dir)) == 1, "the ServerApp was not killed in round 2"
        assert not (run_dir / "global.safetensors").is_file()
        log = flwr_run(fed, resume)
        refused = refuse_strangers(fed, tmp)
        listed = flwr(fed.env, tmp, "supernode", "ls", "test")
        nodes = [fed.procs.log(f"supernode{i}") for i in range(2)]
    assert (run_dir / "global.safetensors").is_file(), log[-4000:]
    return SimpleNamespace(run_dir=run_dir, log=log, refused=refused, listed=listed,
                           nodes=nodes)


def test_flower_run_writes_the_runner_artifacts(flower_run):
    recs = records(flower_run.run_dir)
    assert [r["round"] for r in recs] == [1, 2]
    size = (flower_run.run_dir / "global.safetensors").stat().st_size
    for r in recs:
        assert r["selected"] == [0, 1] and r["dropped"] == [] and r["rejected"] == []
        assert 0 <= r["accuracy"] <= 1 and r["eval_loss"] > 0
        # down: the serialized global state; up: AoH sends the kept heads' slices only
        assert r["bytes_down"] == [size, size] and all(0 < b < size for b in r["bytes_up"])
        # Flower's framing (record headers, the experiment text down) adds a little
        for wire, payload, slack in (("wire_bytes_down", "bytes_down", 8192),
                                     ("wire_bytes_up", "bytes_up", 2048)):
            assert all(0 < w - b < slack for w, b in zip(r[wire], r[payload]))
    for name in ("config.json", "config.toml", "partition.json", "metrics.csv", "accuracy.png",
                 "report.md", "checkpoint.safetensors"):
        assert (flower_run.run_dir / name).is_file(), name
    assert "fedprune INFO: round 2:" in flower_run.log  # the resumed ServerApp's
    assert "fedprune INFO: round 1:" not in flower_run.log  # round 1 was not redone


def test_flower_run_equals_the_in_process_run(flower_run, reference):
    assert_same_run(reference, flower_run.run_dir)


def test_unregistered_key_and_wrong_ca_are_refused(flower_run):
    """Under TLS + SuperNode authentication, a SuperNode whose key was never registered and one
    that trusts another CA both exit with Flower's connection error (code 305) and a message
    saying why; only the two registered SuperNodes are listed by the SuperLink."""
    code, log = flower_run.refused["unregistered"]
    assert code == 1 and "Exit Code: 305" in log and "Failed to activate SuperNode" in log
    code, log = flower_run.refused["wrong-ca"]
    assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in log
    ids = [node.split("SuperNode ID: ")[1].split()[0] for node in flower_run.nodes]
    assert flower_run.listed.count("online") == 2 and all(i in flower_run.listed for i in ids)


# --- Flower's simulation engine (Ray): the same apps, 2 virtual SuperNodes --------------------

def test_flwr_run_on_the_simulation_engine_equals_the_in_process_run(reference, tmp_path):
    """`flwr run` on a `--simulation` SuperLink: the virtual SuperNodes get partition-id /
    num-partitions from Flower, one Ray actor (1 CPU) each."""
    pytest.importorskip("ray")
    run_dir = tmp_path / "sim-run"
    with federation(tmp_path, 0, tls=False, simulation=True) as fed:
        log = flwr_run(fed, [run_config(reference.overrides, run_dir)], "--federation-config",
                       "num-supernodes=2 client-resources-num-cpus=1")
    assert (run_dir / "global.safetensors").is_file(), log[-4000:]
    assert_same_run(reference, run_dir)


def test_run_simulation_python_api_equals_the_in_process_run(reference, tmp_path, monkeypatch):
    """`flwr.simulation.run_simulation` in this process (it starts Ray and shuts it down);
    the ServerApp gets its run config from `server_app` (resume on Flower: `flower_run`)."""
    ray = pytest.importorskip("ray")
    from flwr.simulation import run_simulation

    monkeypatch.delenv("PYTHONPATH", raising=False)  # Ray sets it for its workers: restored
    log = logging.getLogger("fedprune")  # the ServerApp adds a handler: restored
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "level", log.level)
    run_dir = tmp_path / "sim-run"
    app = server_app({"experiment": str(AOH), "overrides": "; ".join(reference.overrides),
                      "run-dir": str(run_dir)})
    run_simulation(server_app=app, client_app=client_app.app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert not ray.is_initialized()
    assert_same_run(reference, run_dir)


# --- pieces without processes -----------------------------------------------------------------

class FakeGrid:
    """Accepts every message; client 0 replies (and sends a duplicate right after), client 1
    answers with an error, client 2 never replies."""

    def push_messages(self, messages):
        for i, m in enumerate(messages):
            m.metadata.message_id = f"m{i}"
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        replies = {"m0": SimpleNamespace(has_error=lambda: False),
                   "m1": SimpleNamespace(has_error=lambda: True,
                                         error=SimpleNamespace(code=2, reason="boom"))}
        out = []
        for mid in ids:
            if mid in replies:
                out.append(replies[mid])
                out[-1].metadata = SimpleNamespace(reply_to_message_id=mid)
        if "m0" in ids:  # a second reply to the same message: must not replace the first
            out.append(SimpleNamespace(has_error=lambda: False, duplicate=True,
                                       metadata=SimpleNamespace(reply_to_message_id="m0")))
        return out


def test_exchange_drops_late_and_failed_clients(monkeypatch):
    monkeypatch.setattr(strategy, "POLL_S", 0.01)
    msgs = {c: SimpleNamespace(metadata=SimpleNamespace(message_id=""), content=RecordDict(
        {"x": pack(b"abc")})) for c in (3, 5, 7)}
    t0 = time.monotonic()
    out = strategy.exchange(FakeGrid(), msgs, timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    assert set(out.replies) == {3} and not hasattr(out.replies[3], "duplicate")
    assert out.failed == {5: "error 2: boom", 7: "no reply within 0.3 s"}
    assert all(b > 3 for b in out.sent_bytes.values())


def test_payload_bytes_travel_unchanged():
    blob = bytes(range(256)) * 50_000  # > one 5 MB Flower array chunk
    record = pack(blob)
    assert unpack(record) == blob
    with pytest.raises(ValueError, match="payload"):
        unpack(ConfigRecord({"payload": b"x"}))


def test_settings_come_from_the_run_config_declared_in_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    defaults = FlowerSettings.from_run_config(declared["config"])
    assert defaults == FlowerSettings()  # pyproject and the dataclass agree on defaults
    s = FlowerSettings.from_run_config({"experiment": str(AOH), "reply-timeout": 5,
                                        "overrides": "federation.rounds=3;\nmethod.aoh.sparsity=0.5"})
    assert s.reply_timeout == 5.0 and s.override_list() == ["federation.rounds=3",
                                                            "method.aoh.sparsity=0.5"]
    cfg = s.load()
    assert cfg == load_config(AOH, ["federation.rounds=3", "method.aoh.sparsity=0.5"])
    relative = FlowerSettings(experiment="configs/aoh.toml")
    assert relative.experiment_path(Path("/app")) == Path("/app/configs/aoh.toml")
    assert relative.load(ROOT) == load_config(AOH)
    assert s.experiment_path(Path("/app")) == AOH  # absolute: a file on the SuperLink machine
    with pytest.raises(ConfigError, match="reply-timeout"):
        FlowerSettings(reply_timeout=0)
    with pytest.raises(ConfigError, match="federation.clients_per_round"):
        FlowerSettings(overrides="federation.clients_per_round=99").load()
    with pytest.raises(ConfigError, match="run-dirr"):  # run_simulation: checked by us
        server_app({"run-dirr": "/tmp/x"})


def test_client_checks_its_partition_against_the_experiment():
    node = SimpleNamespace(node_config={"partition-id": 1, "num-partitions": 3})
    assert partition_id(node, 3) == 1
    with pytest.raises(ValueError, match="num-partitions=3.*num_clients=4"):
        partition_id(node, 4)
    with pytest.raises(ValueError, match="--node-config"):
        partition_id(SimpleNamespace(node_config={}), 3)
    with pytest.raises(ValueError, match="partition-id=5"):
        partition_id(SimpleNamespace(node_config={"partition-id": 5, "num-partitions": 3}), 3)


def test_supernode_device_overrides_run_device_and_is_checked():
    """A SuperNode's node config `device` replaces `run.device` before anything is built; a
    bad one names the node config and the option."""
    experiment = tomli_w.dumps(load_config(AOH).to_dict())
    client_app.federation.cache_clear()
    with pytest.raises(ConfigError, match=r"node config device='gpu0': `run.device`"):
        client_app.federation(experiment, "gpu0")
