"""Every update is checked (issue 15, item 1): a real AoH run on MiniLM with bad updates mixed
in — non-finite values, wrong shapes and dtypes, missing and extra keys, bad head weights,
wrong |D_c|, stale or unnamed rounds, truncated or foreign payloads — ends bit-identical to a clean run
without those clients, and each rejection is in metrics.jsonl with client id and reason."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, load_file, save

from fedprune.config import load_config
from fedprune.methods.base import _metadata
from fedprune.methods.heads import ALPHA
from fedprune.sim import runner

CLIENTS = 17  # one round, every client trains: 14 tampered, 3 honest


def _edit(blob: bytes, change) -> bytes:
    """Decode a payload, let ``change(tensors, meta)`` edit it in place, encode again."""
    tensors, meta = load(blob), dict(_metadata(blob))
    change(tensors, meta)
    return save(tensors, metadata=meta)


def _first(tensors, suffix=""):
    return next(k for k in sorted(tensors) if k.endswith(suffix) and ALPHA not in k)


def _set(key_of, value):
    def change(t, m):
        k = key_of(t)
        t[k] = t[k].clone()
        t[k].view(-1)[0] = value
    return change


def _alpha(value):
    def change(t, m):
        k = _first_alpha(t)
        t[k] = t[k].clone()
        t[k][t[k].argmax()] = value
    return change


def _first_alpha(t):
    return next(k for k in sorted(t) if k.endswith(ALPHA))


def _meta(key, value):
    def change(t, m):
        m[key] = value
    return change


def _shape(t, m):
    k = _first(t, "modules_to_save.default.weight")
    t[k] = t[k][:-1].clone()


def _dtype(t, m):
    k = _first(t, "modules_to_save.default.weight")
    t[k] = t[k].double()


def _missing(t, m):
    del t[_first(t, "modules_to_save.default.bias")]


def _extra(t, m):
    t["bogus.weight"] = torch.zeros(2)


# (edit of an honest payload, the reason the server must give)
BAD = {
    1: (lambda b: _edit(b, _set(_first, float("nan"))), "non-finite values"),
    2: (lambda b: _edit(b, _set(_first, float("-inf"))), "non-finite values"),
    3: (lambda b: _edit(b, _shape), "has shape"),
    4: (lambda b: _edit(b, _dtype), "has dtype torch.float64"),
    5: (lambda b: _edit(b, _missing), "missing"),
    6: (lambda b: _edit(b, _extra), "unknown tensor 'bogus.weight'"),
    7: (lambda b: _edit(b, _alpha(-0.5)), "head weights must be finite and in [0, 1]"),
    8: (lambda b: _edit(b, _alpha(float("nan"))), "head weights must be finite and in [0, 1]"),
    9: (lambda b: _edit(b, _alpha(1e6)), "head weights must be finite and in [0, 1]"),
    10: (lambda b: _edit(b, _meta("num_examples", "0")), "num_examples must be a positive"),
    11: (lambda b: _edit(b, _meta("num_examples", "80")), "but the server knows"),
    12: (lambda b: b[: len(b) // 2], "malformed payload"),
    13: (lambda b: b"this is not a safetensors file", "malformed payload"),
}
BAD[14] = (lambda b: _edit(b, _meta("round", "0")), "update for round 0, this is round 1")
BAD[15] = (lambda b: _edit(b, lambda t, m: m.pop("round")), "update for round None")


class Tampered(runner.InProcess):
    """The in-process transport, with the replies of the bad clients replaced (``drop``:
    removed instead, the clean run without them)."""

    def __init__(self, method, seed, drop: bool):
        super().__init__(method, seed)
        self.drop = drop

    def train(self, rnd, downlinks):
        ex = super().train(rnd, downlinks)
        for cid, (bad, _) in BAD.items():
            ex.replies[cid] = bad(ex.replies[cid])
            if self.drop:
                ex.replies.pop(cid)
        return ex


def test_bad_updates_are_rejected_alone_with_reasons_and_change_nothing(tmp_path):
    cfg = load_config(None, [
        "data.max_samples=192", "data.max_length=32", f"federation.num_clients={CLIENTS}",
        f"federation.clients_per_round={CLIENTS}", "federation.rounds=1",
        "federation.batch_size=8", "method.name='aoh'", "method.aoh.sparsity=0.5",
        "method.aoh.importance_samples=4", f"data.cache_dir='{tmp_path / 'cache'}'"])
    fed = runner.METHODS["aoh"].world(cfg)

    def run(name, drop):
        return runner.run(cfg, tmp_path / name, progress=False, fed=fed,
                          transport=lambda m: Tampered(m, cfg.run.seed, drop))

    attacked, clean = run("attacked", False), run("clean", True)
    a, b = load_file(attacked / "global.safetensors"), load_file(clean / "global.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], fed.initial[k]) for k in a)  # the honest ones moved it
    (rec,) = [json.loads(x) for x in (attacked / "metrics.jsonl").read_text().splitlines()]
    assert rec["rejected"] == sorted(BAD)
    for cid, (_, want) in BAD.items():
        reason = rec["rejected_reasons"][str(cid)]
        assert reason.startswith(f"client {cid}: ") and want in reason, (cid, reason)
    # accuracy and loss are the clean run's
    (ref,) = [json.loads(x) for x in (clean / "metrics.jsonl").read_text().splitlines()]
    assert (rec["accuracy"], rec["train_loss"]) == (ref["accuracy"], ref["train_loss"])
