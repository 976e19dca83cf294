"""fedprune on a real Flower federation: a SuperLink and SuperNodes as processes on 127.0.0.1
(TLS with certificates made here + SuperNode authentication, and --insecure), AoH on the real
MiniLM with a tiny BBC subset. Parity with the in-process runner (after a killed and resumed
ServerApp; also on Flower's simulation engine, via `flwr run` and via `run_simulation`), a
SuperNode killed mid-round and one sending garbage, refused keys and CAs, and the pieces that
need no processes."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, RecordDict

from fedprune.client.faults import injected_fault
from fedprune.config import ConfigError, load_config
from fedprune.flower import client_app, strategy
from fedprune.flower.client_app import partition_id
from fedprune.flower.server_app import server_app
from fedprune.flower.settings import FlowerSettings
from fedprune.flower.wire import pack, unpack
from fedprune.sim import runner

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this venv
AOH = ROOT / "configs" / "aoh.toml"
TINY = ["data.max_samples=96", "data.max_length=32", "federation.rounds=2",
        "federation.batch_size=16", "federation.eval_batch_size=64", "run.num_threads=1"]
FLOWER_ONLY = {"dropped", "dropped_reasons", "wire_bytes_up", "wire_bytes_down"}


def tiny(tmp: Path, clients: int) -> list[str]:
    return [*TINY, f"federation.num_clients={clients}", f"federation.clients_per_round={clients}",
            f'data.cache_dir="{tmp / "cache"}"']


# --- processes --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every live process (the start time guards against
    pid reuse; zombies are dead already)."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                table[int(d.name)] = (int(fields[1]), fields[19])
    return table


class Processes:
    """Processes this test started and, transitively, theirs (SuperExec, ServerApp, ClientApp
    processes): remembered while alive, ended by pid at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.roots: dict[str, subprocess.Popen] = {}
        self.seen: set[tuple[int, str]] = set()

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as out:
            proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env)
        self.roots[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def remember(self) -> None:
        table = _proc_table()
        todo = [p.pid for p in self.roots.values()]
        while todo:
            pid = todo.pop()
            if pid in table:
                self.seen.add((pid, table[pid][1]))
                todo += [c for c, (ppid, _) in table.items() if ppid == pid]

    def kill(self, name: str) -> None:
        """SIGKILL one root (a crash: no goodbye to the SuperLink); its children are still
        ended at cleanup."""
        self.remember()
        self.roots[name].kill()
        self.roots[name].wait()

    def stop_all(self) -> None:
        self.remember()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            table = _proc_table()
            alive = [pid for pid, start in self.seen if table.get(pid, (0, None))[1] == start]
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while alive and time.monotonic() < deadline:
                table = _proc_table()
                alive = [p for p, s in self.seen if table.get(p, (0, None))[1] == s]
                time.sleep(0.2)
        for proc in self.roots.values():
            proc.wait(timeout=10)


def wait_for(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(0.2)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- TLS certificates and SuperNode keys --------------------------------------------------------

def make_tls(out: Path, nodes: int) -> dict[str, Path]:
    """A CA, a SuperLink certificate for 127.0.0.1 signed by it, and one OpenSSH ECDSA key
    pair per SuperNode (SuperNode authentication)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    out.mkdir(parents=True, exist_ok=True)

    def cert(subject: str, key, issuer, issuer_key, *extensions):
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1)))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(issuer_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprune test CA")])
    ca = cert("fedprune test CA", ca_key, ca_name, ca_key,
              (x509.BasicConstraints(ca=True, path_length=None), True))
    key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.DNSName("localhost")])
    server = cert("127.0.0.1", key, ca.subject, ca_key, (san, False))
    files = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["cert"].write_bytes(server.public_bytes(pem))
    files["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    for i in range(nodes):
        k = ec.generate_private_key(ec.SECP384R1())
        (out / f"node{i}").write_bytes(k.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        (out / f"node{i}.pub").write_bytes(k.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
        files[f"node{i}"] = out / f"node{i}"
    return files


# --- a federation on 127.0.0.1 ------------------------------------------------------------------

@contextmanager
def federation(tmp: Path, nodes: int, *, tls: bool, simulation: bool = False):
    """SuperLink + ``nodes`` SuperNodes (partition-id i of ``nodes``); always torn down.
    ``simulation``: the SuperLink runs Flower's simulation engine (pass ``nodes=0``).

    Nothing leaves 127.0.0.1: runtime dependency installation (`uv sync`), telemetry and
    Flower's update check (a POST to api.flower.ai at every process start) are off."""
    home, port = tmp / "flwr-home", free_port()
    home.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1"}
    procs = Processes(env, tmp)
    files = make_tls(tmp / "tls", nodes) if tls else {}
    connection = {"address": f"127.0.0.1:{port}"}
    connection |= {"root-certificates": str(files["ca"])} if tls else {"insecure": True}
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": "test", "test": connection}}))
    link = ["--ssl-certfile", str(files["cert"]), "--ssl-keyfile", str(files["key"]),
            "--ssl-ca-certfile", str(files["ca"]), "--enable-supernode-auth"] if tls \
        else ["--insecure"]
    link += ["--simulation"] if simulation else []
    try:
        procs.start("superlink", "flower-superlink", *link, "--host", "127.0.0.1",
                    "--port", str(port), "--disable-runtime-dependency-installation")
        wait_for(lambda: listening(port), "the SuperLink to listen")
        for i in range(nodes):
            node = ["--insecure"]
            if tls:  # SuperNode authentication: register the public key, sign with the private
                flwr(env, tmp, "supernode", "register", f"{files[f'node{i}']}.pub", "test")
                node = ["--root-certificates", str(files["ca"]),
                        "--auth-supernode-private-key", str(files[f"node{i}"])]
            procs.start(f"supernode{i}", "flower-supernode", *node,
                        "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                        "--node-config", f"partition-id={i} num-partitions={nodes} "
                        f"state-dir='{tmp / f'node{i}-state'}'")
        yield SimpleNamespace(env=env, tmp=tmp, procs=procs)
    finally:
        procs.stop_all()


def flwr(env: dict, tmp: Path, *args: str, timeout: float = 60) -> str:
    res = subprocess.run([str(BIN / "flwr"), *args], check=False, env=env, cwd=tmp,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"flwr {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def start_flwr_run(fed, run_config: list[str], *args: str, name: str = "flwr-run"
                   ) -> subprocess.Popen:
    """`flwr run <repo> test --stream --run-config ... *args`, logging to <name>.log."""
    with open(fed.tmp / f"{name}.log", "w") as out:
        proc = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), "test", "--stream",
                                 *[a for c in run_config for a in ("--run-config", c)], *args],
                                env=fed.env, cwd=fed.tmp, stdout=out, stderr=subprocess.STDOUT)
    fed.procs.roots[name] = proc
    return proc


def flwr_run(fed, run_config: list[str], *args: str, name: str = "flwr-run",
             timeout: float = 400) -> str:
    """`start_flwr_run`, blocking until the ServerApp ends."""
    proc = start_flwr_run(fed, run_config, *args, name=name)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish in {timeout} s:\n{fed.procs.log(name)[-4000:]}")
    return fed.procs.log(name)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_config(overrides: list[str], run_dir: Path) -> str:
    """A `--run-config` for the tiny 2-client AoH experiment; the relative experiment path is
    read from the app Flower shipped (the FAB)."""
    return (f"experiment='configs/aoh.toml' overrides='{'; '.join(overrides)}' "
            f"run-dir='{run_dir}' reply-timeout=240.0 connect-timeout=120.0")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process run (`fedprune.sim.runner`) of the tiny 2-client AoH experiment that
    every 2-client Flower run below must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    overrides = tiny(tmp, 2)
    cfg = load_config(AOH, overrides)
    return SimpleNamespace(overrides=overrides, cfg=cfg,
                           run_dir=runner.run(cfg, tmp / "in-process", progress=False))


def assert_same_run(reference, run_dir: Path) -> None:
    """Same config, final global state (within 1e-6) and per-round records as the in-process
    run, but for timings (keys ending in `_s`; their digits also travel in `bytes_up`) and the
    Flower-only fields."""
    assert load_config(run_dir / "config.toml") == reference.cfg
    a = load_file(reference.run_dir / "global.safetensors")
    b = load_file(run_dir / "global.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, diff
    for sim, net in zip(records(reference.run_dir), records(run_dir), strict=True):
        same = {k for k in sim if not k.endswith("_s")} - {"client_metrics", "bytes_up"}
        assert {k: sim[k] for k in same} == {k: net[k] for k in same}
        assert set(net) - set(sim) == FLOWER_ONLY
        for cid, m in sim["client_metrics"].items():  # all but timings
            assert {k: v for k, v in m.items() if not k.endswith("_s")} == \
                {k: v for k, v in net["client_metrics"][cid].items() if not k.endswith("_s")}
            # the payload carries the metrics as text: timings' digits change bytes_up a little
            i, timings = sim["selected"].index(int(cid)), sum(k.endswith("_s") for k in m)
            assert abs(sim["bytes_up"][i] - net["bytes_up"][i]) <= 24 * timings


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


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory, reference):
    """The 2-client experiment on a TLS + SuperNode-auth federation, with a crash: the
    ServerApp process is SIGKILLed as soon as round 1 is checkpointed, and a second `flwr run`
    with `resume=true` continues the run directory on the same SuperNodes (issue 15 item 3 on
    Flower). The tests below check that the result is the uninterrupted in-process run's.
    Then, on the same federation, two SuperNodes that must be refused try to join."""
    tmp = tmp_path_factory.mktemp("flower-tls")
    run_dir = tmp / "flower-run"
    with federation(tmp, 2, tls=True) as fed:
        first = start_flwr_run(fed, [run_config(reference.overrides, run_dir)], name="first")
        # the checkpoint is written (atomically) after round 1's metrics line
        wait_for(lambda: (run_dir / "checkpoint.safetensors").is_file(),
                 "round 1 to be checkpointed", timeout=300)
        killed = _serverapps()
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        first.kill()  # its log stream would wait for the SuperLink to notice (~1 min)
        first.wait()
        assert killed and len(records(run_dir)) == 1, "the ServerApp was not killed in round 2"
        assert not (run_dir / "global.safetensors").is_file()
        log = flwr_run(fed, [run_config(reference.overrides, run_dir) + " resume=true"])
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


# --- FedSpaLLM on real SuperLink / SuperNodes (tiny Llama, 2 clients) ------------------------

def test_fedspallm_on_supernodes_equals_the_in_process_run(tiny_llama, tmp_path):
    """The FedSpaLLM strategy is the same loop: sampled layers go down with the model's
    changed matrices, sparse pruned layers come up, the server's l0 mean + expansion gives the
    in-process result."""
    overrides = [f'model.name="{tiny_llama}"', "method.name=fedspallm",
                 "federation.num_clients=2", "federation.clients_per_round=2",
                 "federation.rounds=2", "method.fedspallm.samples=4",
                 "method.fedspallm.seq_len=32", "method.fedspallm.eval_samples=4",
                 "run.num_threads=1"]
    cfg = load_config(None, overrides)
    reference = SimpleNamespace(cfg=cfg, run_dir=runner.run(cfg, tmp_path / "in-process",
                                                            progress=False))
    run_dir = tmp_path / "flower-run"
    with federation(tmp_path, 2, tls=False) as fed:
        log = flwr_run(fed, [(f"overrides='{'; '.join(overrides)}' run-dir='{run_dir}' "
                             "reply-timeout=240.0 connect-timeout=120.0")])
    assert (run_dir / "global.safetensors").is_file(), log[-4000:]
    assert_same_run(reference, run_dir)
    recs = records(run_dir)
    assert recs[0]["bytes_down"][0] < 200 < recs[1]["bytes_down"][0]  # round 2 sends changes
    assert all(r["train_loss"] is None and r["perplexity"] > 1 for r in recs)


# --- PruFed on real SuperLink / SuperNodes (tiny Llama, 2 tiers, 2 clients) -------------------

def test_prufed_tiers_with_scaffold_on_supernodes_equal_the_in_process_run(tiny_llama,
                                                                            tmp_path):
    """Two tiers whose replies hold different keys: client 0 (full depth) sends the adapters
    of the 4 layers, client 1 (top-alternate, half depth) those of its 2 view layers, named
    0 / 1 locally and renamed to global 0 / 2 by the server (HeteAgg); with SCAFFOLD, each
    SuperNode keeps its control variate in its own state-dir and the changes travel in the
    same local names. The same loop gives the in-process result, and the half-depth client's
    uplink is smaller."""
    from fedprune.methods.prufed import PruFed

    overrides = [f'model.name="{tiny_llama}"', "method.name=prufed",
                 "federation.num_clients=2", "federation.clients_per_round=2",
                 "federation.rounds=2", "federation.batch_size=2", "federation.lr=0.01",
                 "method.prufed.tier_keep=[1.0, 0.5]",
                 'method.prufed.tier_strategy=["top", "top-alternate"]',
                 "method.prufed.tier_share=[0.5, 0.5]", "method.prufed.samples=2",
                 "method.prufed.max_length=48", "method.prufed.eval_samples=2",
                 "method.prufed.generate_samples=1", "method.prufed.max_new_tokens=2",
                 "run.num_threads=1", "federation.scaffold=true"]
    cfg = load_config(None, overrides)
    fed = PruFed.world(cfg)
    method = PruFed(cfg, fed)
    # independent of the run: the two tiers' plans and the keys their replies carry
    assert method.kept == [(0, 1, 2, 3), (0, 2)] and method.tier_of == [0, 1]
    full, half = (set(method.local_keys[t]) for t in (0, 1))
    assert len(half) == len(full) // 2 and half < full  # local names of view layers 0, 1
    assert {method.local_keys[1][k] for k in half} == {
        k for k in fed.initial if ".layers.0." in k or ".layers.2." in k}
    reference = SimpleNamespace(cfg=cfg, run_dir=runner.run(cfg, tmp_path / "in-process",
                                                            progress=False, fed=fed))
    run_dir = tmp_path / "flower-run"
    (tmp_path / "run-config.toml").write_text(tomli_w.dumps({
        "overrides": "; ".join(overrides), "run-dir": str(run_dir),
        "reply-timeout": 240.0, "connect-timeout": 120.0}))
    with federation(tmp_path, 2, tls=False) as fed_:
        log = flwr_run(fed_, [str(tmp_path / "run-config.toml")])
    assert (run_dir / "global.safetensors").is_file(), log[-4000:]
    assert_same_run(reference, run_dir)
    initial = fed.initial
    final = load_file(run_dir / "global.safetensors")
    moved = {int(k.split(".layers.")[1].split(".")[0]) for k in final
             if "lora_B" in k and not torch.equal(final[k], initial[k])}
    assert moved == {0, 1, 2, 3}
    # each SuperNode's c_i, under its run id, in its local names: round 2 read round 1's
    run_id = (run_dir / "run_id").read_text()
    for node, layers in ((0, 4), (1, 2)):
        kept = sorted((tmp_path / f"node{node}-state" / run_id).iterdir())
        assert [p.name for p in kept] == [f"{node}.r1.safetensors", f"{node}.r2.safetensors"]
        assert len(load_file(kept[-1])) == layers * len(full) // 4
    recs = records(run_dir)
    # the ServerApp's round line shows the method's own metrics (perplexity, ROUGE)
    line = next(x for x in log.splitlines() if x.startswith("fedprune INFO: round 2: {"))
    shown = json.loads(line.split(": ", 2)[2])
    assert shown["perplexity"] == recs[1]["perplexity"] and "rougeL" in shown
    for r in recs:
        assert r["selected"] == [0, 1] and r["dropped"] == [] and r["rejected"] == []
        assert r["client_metrics"]["1"]["layers"] == 2.0
        # half the adapters: about half the payload each way (the metadata text is shared)
        for key in ("bytes_up", "wire_bytes_up", "bytes_down", "wire_bytes_down"):
            full_b, half_b = r[key]
            assert 0.4 * full_b < half_b < 0.6 * full_b, (key, r[key])


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


# --- --insecure, 3 SuperNodes, one killed mid-round ------------------------------------------

def test_supernode_killed_mid_round_is_dropped_and_the_run_goes_on(tmp_path):
    """Client 2's SuperNode is killed in round 1; in round 2 client 0's SuperNode sends a
    garbled payload (faults.garbled: its draw for (seed 0, round 2, client 0) is 0.029, every
    other draw of these rounds is above 0.1). Each is dropped / rejected alone, with its
    reason; the run goes on."""
    overrides = [*tiny(tmp_path, 3), "faults.garbled=0.1"]
    faults = load_config(AOH, overrides).faults
    assert [injected_fault(faults, 0, r, c) for r in (1, 2) for c in range(3)] == \
        [None, None, None, "garbled", None, None]
    run_dir = tmp_path / "flower-run"
    (tmp_path / "run-config.toml").write_text(tomli_w.dumps({
        "experiment": str(AOH), "overrides": "; ".join(overrides), "run-dir": str(run_dir),
        "reply-timeout": 240.0, "connect-timeout": 120.0}))
    with federation(tmp_path, 3, tls=False) as fed:
        def crash_on_first_train() -> None:  # the kill lands while client 2 trains
            wait_for(lambda: "Receiving: train" in fed.procs.log("supernode2"),
                     "client 2 to receive its round-1 message", timeout=300)
            time.sleep(1.0)
            fed.procs.kill("supernode2")

        killer = threading.Thread(target=crash_on_first_train, daemon=True)
        killer.start()
        log = flwr_run(fed, [str(tmp_path / "run-config.toml")])
        killer.join(timeout=1)
        node2 = fed.procs.log("supernode2")
    assert "Sending: train" not in node2, "client 2 replied before the kill: no fault injected"
    r1, r2 = records(run_dir)
    assert r1["selected"] == [0, 1, 2] and r1["dropped"] == [2] and r1["rejected"] == []
    assert r1["bytes_up"][2] == 0 and r1["bytes_down"][2] > 0 and r1["accuracy"] is not None
    assert set(r1["client_metrics"]) == {"0", "1"}
    # the next round runs with the survivors; the dead node gets nothing, the garbled
    # update of client 0 is rejected by the ServerApp, client 1's is aggregated
    assert r2["dropped"] == [2] and set(r2["client_metrics"]) == {"1"}
    assert r2["rejected"] == [0] and "payload" in r2["rejected_reasons"]["0"]
    assert r2["bytes_down"][2] == 0 and r2["accuracy"] is not None
    assert "dropped client 2" in log
    final = load_file(run_dir / "global.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


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
