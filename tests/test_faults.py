"""Failure injection (client/faults.py, ``[faults]``): the draw, a real run that aggregates the
survivors exactly as a clean run without the failed clients, and a round below
``federation.min_valid_updates`` that leaves the global state unchanged byte for byte."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedprune.client.faults import REASONS, injected_fault
from fedprune.config import ConfigError, FaultsConfig, load_config
from fedprune.sim import runner

FAULTS = FaultsConfig(crash=0.2, hang=0.1, silent=0.15, garbled=0.1)


def test_draw_is_seeded_and_has_the_configured_rates():
    draws = [injected_fault(FAULTS, 3, r, c) for r in range(1, 201) for c in range(100)]
    n = len(draws)
    for kind, p in (("crash", 0.2), ("hang", 0.1), ("silent", 0.15), ("garbled", 0.1),
                    (None, 0.45)):
        share = draws.count(kind) / n
        assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / n), (kind, share)
    assert draws == [injected_fault(FAULTS, 3, r, c) for r in range(1, 201) for c in range(100)]
    assert injected_fault(FaultsConfig(), 3, 1, 1) is None


CLIENTS = 8


def cfg_of(tmp_path, *extra):
    return load_config(None, [
        "data.max_samples=160", "data.max_length=32", f"federation.num_clients={CLIENTS}",
        f"federation.clients_per_round={CLIENTS}", "federation.rounds=2",
        "federation.batch_size=8", "method.name='fedavg'", "run.seed=1",
        f"data.cache_dir='{tmp_path / 'cache'}'", *extra])


def failed(rnd):
    return {c: k for c in range(CLIENTS) if (k := injected_fault(FAULTS, 1, rnd, c))}


class Without(runner.InProcess):
    """The clean run: the same clients' replies simply removed."""

    def train(self, rnd, downlinks):
        ex = super().train(rnd, downlinks)
        for cid in failed(rnd):
            ex.replies.pop(cid)
        return ex


FAULTY = ("faults.crash=0.2", "faults.hang=0.1", "faults.silent=0.15", "faults.garbled=0.1")


def test_survivors_are_aggregated_as_without_the_failed_clients(tmp_path):
    assert all(0 < len(failed(r)) < CLIENTS for r in (1, 2))  # the seed makes both rounds mixed
    cfg = cfg_of(tmp_path, *FAULTY)
    fed = runner.METHODS["fedavg"].world(cfg)
    faulty = runner.run(cfg, tmp_path / "f", progress=False, fed=fed)
    clean = runner.run(cfg_of(tmp_path), tmp_path / "c", progress=False, fed=fed,
                       transport=lambda m: Without(m, 1))
    a, b = load_file(faulty / "global.safetensors"), load_file(clean / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    kinds = set()
    for line in (faulty / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        want = failed(rec["round"])
        kinds |= set(want.values())
        lost = {c: k for c, k in want.items() if k != "garbled"}   # dropped: nothing came
        garbled = sorted(c for c, k in want.items() if k == "garbled")  # rejected by the server
        assert rec["dropped"] == sorted(lost) and rec["rejected"] == garbled
        assert rec["dropped_reasons"] == {str(c): REASONS[k] for c, k in sorted(lost.items())}
        assert all("payload" in rec["rejected_reasons"][str(c)] for c in garbled)
        assert sorted(rec["client_metrics"]) == sorted(str(c) for c in range(CLIENTS)
                                                       if c not in want)
        assert [b for c, b in zip(rec["selected"], rec["bytes_up"], strict=True)
                if c in lost] == [0] * len(lost)
    assert kinds == {"crash", "hang", "silent", "garbled"}  # every kind was exercised


def test_below_min_valid_updates_the_state_is_unchanged(tmp_path):
    cfg = cfg_of(tmp_path, *FAULTY, f"federation.min_valid_updates={CLIENTS}")
    out = runner.run(cfg, tmp_path / "m", progress=False)
    final = (out / "global.safetensors").read_bytes()
    initial = runner.METHODS["fedavg"].world(cfg).initial
    state = load_file(out / "global.safetensors")
    assert all(torch.equal(state[k], initial[k]) for k in initial)
    # byte for byte: the checkpoint of round 2 holds the very tensors of round 0
    from safetensors.torch import save

    assert final == save({k: v.contiguous() for k, v in initial.items()})


@pytest.mark.parametrize("bad, pattern", [
    ("faults.crash=1.5", r"`faults.crash`: must be in \[0, 1\]"),
    ("faults.silent=-0.1", "`faults.silent`"),
    ("faults.hang_s=-1", "`faults.hang_s`"),
])
def test_bad_fault_options_name_the_option(bad, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [bad])


def test_fault_rates_must_sum_to_at_most_one():
    with pytest.raises(ConfigError, match="crash \\+ hang \\+ silent \\+ garbled must be <= 1"):
        load_config(None, ["faults.crash=0.6", "faults.hang=0.6"])


def test_unwritable_run_directory_is_a_clear_error_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = cfg_of(tmp_path, "federation.rounds=1", f"run.out_dir='{blocker}'")
    with pytest.raises(ConfigError, match="cannot write the run directory .*a-file"):
        runner.run(cfg, progress=False)
    assert blocker.read_text() == "not a folder"


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """ENOSPC while round 2's checkpoint is written: a CheckpointError naming the file, round
    1's checkpoint intact and no temp file left; --resume then ends as an uninterrupted run."""
    import errno
    import os

    from fedprune.sim import checkpoint

    cfg = cfg_of(tmp_path, "federation.clients_per_round=2")
    fed = runner.METHODS["fedavg"].world(cfg)
    straight = runner.run(cfg, tmp_path / "s", progress=False, fed=fed)
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    with pytest.raises(checkpoint.CheckpointError, match="could not write checkpoint .*No "
                                                          "space left.*previous checkpoint"):
        runner.run(cfg, tmp_path / "d", progress=False, fed=fed)
    assert not (tmp_path / "d" / "checkpoint.tmp").exists()
    assert checkpoint.load_checkpoint(tmp_path / "d")[1]["round"] == 1
    monkeypatch.setattr(checkpoint.os, "fsync", real)
    resumed = runner.run(cfg, tmp_path / "d", resume=True, progress=False, fed=fed)
    a, b = load_file(straight / "global.safetensors"), load_file(resumed / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]


# --- crash and resume ---------------------------------------------------------------------

def _records(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k not in ("wall_s", "eval_s",
                                                                 "client_metrics", "bytes_up")}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


KILL = ["data.max_samples=96", "data.max_length=32", "federation.num_clients=4",
        "federation.clients_per_round=2", "federation.rounds=8", "federation.batch_size=8",
        "method.name='aoh'", "method.aoh.importance_samples=4", "run.num_threads=1"]


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real `fedprune run` process killed with SIGKILL at a random moment (seeded) inside
    its rounds, then resumed: the final global state and every per-round record equal an
    uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import tomli_w

    cfg = load_config(None, [*KILL, f"data.cache_dir='{tmp_path / 'cache'}'"])
    reference = runner.run(cfg, tmp_path / "ref", progress=False)
    toml = tmp_path / "experiment.toml"
    toml.write_text(tomli_w.dumps(cfg.to_dict()))
    exe = Path(sys.executable).parent / "fedprune"
    run_dir, rng = tmp_path / "killed", np.random.default_rng(7)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    for attempt in range(2):
        cmd = [str(exe), "run", str(toml), "--out", str(run_dir), "--quiet"]
        if (run_dir / "config.json").is_file():
            cmd.append("--resume")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env)
        if attempt < 1:
            # past start-up (imports, model): kill inside the rounds, wherever it is
            while not (run_dir / "metrics.jsonl").is_file() and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(float(rng.uniform(0.0, 0.5)))  # rounds take longer than that
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=600)
        if attempt == 1:
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    assert kills >= 1  # the run really was interrupted
    a = load_file(reference / "global.safetensors")
    b = load_file(run_dir / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _records(run_dir) == _records(reference)


def test_torn_truncated_or_tampered_checkpoints_fall_back_to_the_previous(tmp_path, caplog):
    from fedprune.sim.checkpoint import CHECKPOINT, PREVIOUS, CheckpointError, load_checkpoint

    cfg = load_config(None, [*KILL[:-1], "federation.rounds=2",
                             f"data.cache_dir='{tmp_path / 'cache'}'"])
    straight = runner.run(cfg, tmp_path / "s", progress=False)
    good = (straight / CHECKPOINT).read_bytes()
    assert load_checkpoint(straight)[1]["round"] == 2
    assert load_checkpoint(straight) is not None and (straight / PREVIOUS).is_file()
    final = load_file(straight / "global.safetensors")
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]),
                         ("tampered", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
                         ("missing", None)):  # killed between the two renames
        work = tmp_path / name
        shutil.copytree(straight, work)
        if damage is None:
            (work / CHECKPOINT).unlink()
            (work / "checkpoint.tmp").write_bytes(good[:100])  # a torn temp file: ignored
        else:
            (work / CHECKPOINT).write_bytes(damage(good))
        assert load_checkpoint(work)[1]["round"] == 1, name  # the previous one
        if name == "tampered":  # resuming from it redoes round 2 bit-identically
            resumed = runner.run(cfg, work, resume=True, progress=False)
            again = load_file(resumed / "global.safetensors")
            assert all(torch.equal(final[k], again[k]) for k in final), name
    assert "does not match its content hash" in caplog.text
    # a checkpoint of an older fedprune (no hash in its metadata) is still resumed
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(straight / CHECKPOINT), "pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        server = f.metadata()["server"]
    (work / CHECKPOINT).write_bytes(save(old, metadata={"server": server}))
    assert load_checkpoint(work)[1]["round"] == 2 and "loaded unverified" in caplog.text
    (work / CHECKPOINT).write_bytes(b"junk")
    (work / PREVIOUS).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no sound checkpoint is left"):
        load_checkpoint(work)
