"""Processes of a Flower federation on 127.0.0.1 for the Flower tests: SuperLink, SuperNodes
(TLS certificates made here, or --insecure), `flwr run`, and the parity check against the
in-process runner."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w
from safetensors.torch import load_file

from fedprune.config import load_config

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


