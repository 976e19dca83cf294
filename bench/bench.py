"""fedprune against a plain float32 transformers + peft loop, and at this machine's ceilings.

One run measures, each in its own process (so that peak RSS is its own):

- ceilings: a 2048^3 matmul in float32 and bfloat16 (GFLOP/s); floor: the GEMMs of one
  16 x 128 MiniLM training step timed alone in the dtype ``model.compute_dtype=auto`` resolves
  to (the least a step can take); step: that whole training step (forward, backward, AdamW)
  as fedprune runs it and with the plain loop's settings (float32, transformers' SDPA and
  dropout): min / median ms and MFU;
- grid: the default job (MiniLM + BBC News, FedAvg, seeded random selection, evaluation every
  round) at C/K = 10/2, 100/10, 1000/20: the plain loop (transformers' SDPA attention and
  dropout, float32, a bare round loop with no serialization, validation, checkpoints or logs)
  against ``fedprune.sim.runner.run`` with its defaults; seconds per round, each phase's
  GFLOP/s and share of the ceiling of its dtype (MFU), peak RSS, accuracy after the rounds;
- smollm2: one LoRA instruction-tuning round on SmolLM2-135M-Instruct (article -> headline,
  chat template, loss on the answer only), plain float32 loop against fedprune's client code,
  then greedy generation of one batch of headlines (tokens/s, and whether both wrote the same);
- sweep: per-round time and peak RSS of fedprune at K = 10 for C = 10 ... 10,000 clients,
  each client holding the same number of examples (a seeded sample of the training set, so
  that only C changes); evaluation only after the last round, which is not timed;
- structural: one local epoch of AoH with 50 % and 90 % of MiniLM's heads removed
  (mode 'structural') against all heads, and mode 'detached' (pruned heads without
  gradient) and `top_layers` = 1 / 2 / 3 at 90 % (nothing below the top layers trains)
  against mode 'adapter': measured speedup and analytic FLOP reduction;
- prufed: one client's local epoch (`PruFed.local`) per device tier of configs/prufed.toml
  on SmolLM2-135M-Instruct, keeping 100 / 75 / 50 / 25 % of the 30 decoder layers
  (top-alternate), all on the same examples: measured speedup over full depth against the
  analytic training-FLOP ratio (`layer_drop_flop_ratio`: kept layers + LM head, above k / L).

Every figure names the machine it was measured on: the results file holds
``fedprune.environment.environment()`` (versions, CPU model, SIMD features, threads, the auto
compute dtype) as ``environment`` and, per part, as ``measured_on[part]`` with the date, the
part's wall time and sizes; the first printed line says the same. Results of different CPU
kinds never overwrite each other: they go to ``bench/results/bench-<CPU model>-<best SIMD>.json``
(e.g. ``bench-amd-epyc-avx2.json``); ``bench/results/bench.json`` holds the README's figures,
measured on the 2-core AMX CPU before files named their CPU.

What the machine lacks is skipped, with the reason under ``skipped`` (and in the part): a bf16
GEMM without AVX512-BF16 or AMX is emulated (~100x slower than float32), so there the bf16
ceiling is not measured and the floor is timed in float32 (what ``auto`` resolves to); MFU is
always taken against the ceiling of the dtype a figure was computed in.

Sizes fit the machine (``--sizes`` overrides): "full" where bf16 runs natively (the sizes of
the README's figures), "lean" where everything runs in float32. Expected minutes per part:

    part        full: 2-core AMX CPU              lean: 2-core AVX2 AMD EPYC
    ceilings    0.2  float32 + bf16               0.1  float32 only
    floor       0.2  bf16, 5 trials x 5 reps      0.3  float32, 3 trials x 3 reps
    step        0.8  20 timed steps per mode      1.5  10 timed steps per mode
    grid        5.5  3 rounds (2-3 timed)         9.0  2 rounds (round 2 timed)
    smollm2     2.5  2 clients x 16 examples      2.5  2 clients x 4 examples (1 step each)
    sweep       1.8  16 ex./client, 5 rounds      2.5  4 ex./client, 4 rounds (2-3 timed)
    structural  0.8  2 timed epochs after one     1.8  1 timed epoch after a 16-example
                     warm-up epoch                     warm-up pass
    prufed      2.5  4 tiers x 32 examples,       3.0  4 tiers x 4 examples (1 step),
                     2 timed epochs each               2 timed epochs each
    total       ~15                               ~21

The "full" column is the README's ~12-minute run split by its recorded figures; the "lean"
column is extrapolated (FLOPs at the efficiencies seen) from parts timed on the AMD EPYC while
it was shared with other jobs, which swung its speed up to 7x (float32 ceiling 59-75 GFLOP/s,
a plain float32 step 3.4-8 s, a 4-example local epoch 1-7 s): ``measured_on[part].wall_s`` of
a run on a quiet machine is the figure to trust. The prufed row is an estimate from its FLOPs
(not yet timed on either machine while quiet; its one lean run took 8.9 min with the AMD EPYC's
2 cores shared by ~10 busy processes, at 9-14 GFLOP/s). In both, the one evaluation pass's FLOPs
are counted once per mode (they depend on the model and validation rows, not on C or K) and
the sweep's untimed last-round evaluation uses 64 validation rows.

    python bench/bench.py                 # everything; writes bench/results/bench-<CPU>.json
    python bench/bench.py --only ceilings floor step
    python bench/bench.py --only grid --grid 10:2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
PLAIN = ["model.compute_dtype=float32", "model.attn_implementation=sdpa"]
PARTS = ("ceilings", "floor", "step", "grid", "smollm2", "sweep", "structural", "prufed")
# Sizes per machine class (see the module docstring): "full" where bf16 runs natively (the
# sizes of the README's AMX figures), "lean" where everything runs in float32 (AVX2 only).
SIZES = {
    "full": {"floor": {"reps": 5, "trials": 5}, "step": {"steps": 20}, "grid": {"rounds": 3},
             "smollm2": {"clients": 2, "examples": 16}, "sweep": {"per_client": 16, "rounds": 5},
             "structural": {"reps": 2, "warm": 0},
             "prufed": {"examples": 32, "reps": 2, "warm": 8}},
    "lean": {"floor": {"reps": 3, "trials": 3}, "step": {"steps": 10}, "grid": {"rounds": 2},
             "smollm2": {"clients": 2, "examples": 4}, "sweep": {"per_client": 4, "rounds": 4},
             "structural": {"reps": 1, "warm": 16},
             "prufed": {"examples": 4, "reps": 2, "warm": 2}},
}
# expected minutes per part with the default sizes: "full" on the 2-core AMX CPU of the README
# figures, "lean" on the 2-core AVX2 AMD EPYC (see the module docstring for their basis)
MINUTES = {
    "full": {"ceilings": 0.2, "floor": 0.2, "step": 0.8, "grid": 5.5, "smollm2": 2.5,
             "sweep": 1.8, "structural": 0.8, "prufed": 2.5},
    "lean": {"ceilings": 0.1, "floor": 0.3, "step": 1.5, "grid": 9.0, "smollm2": 2.5,
             "sweep": 2.5, "structural": 1.8, "prufed": 3.0},
}


def machine_tag(env: dict) -> str:
    """'AMD EPYC' + AVX2 -> 'amd-epyc-avx2'; 'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz'
    with AMX -> 'intel-xeon-platinum-8481c-amx': the CPU kind a results file belongs to."""
    cpu = env["cpu"]
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", cpu["model"].lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or cpu["machine"]
    best = next((f for f in ("amx", "avx512_bf16", "avx512", "avx2") if cpu.get(f)),
                cpu["capability"].lower())
    return f"{slug}-{re.sub(r'[^a-z0-9]+', '', best)}"


def bf16_missing(env: dict) -> str | None:
    """Why bf16 GEMMs cannot be timed here (torch emulates them, ~100x slower than float32,
    without AVX512-BF16 or AMX), or None where they run natively."""
    cpu = env["cpu"]
    if cpu["avx512_bf16"] or cpu["amx"]:
        return None
    return f"bf16 GEMMs need AVX512-BF16 or AMX; this CPU ({cpu['model']}) has neither"


def describe(env: dict) -> str:
    cpu, v = env["cpu"], env["versions"]
    simd = ", ".join(f"{f} {'yes' if cpu[f] else 'no'}"
                     for f in ("avx2", "avx512", "avx512_bf16", "amx"))
    return (f"{cpu['model']} ({cpu['machine']}, capability {cpu['capability']}; {simd}), "
            f"{env['threads']} threads, auto compute dtype {env['auto_compute_dtype']}; "
            + ", ".join(f"{k} {v[k]}" for k in v))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ceiling(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def child_ceilings(*dtypes: str) -> dict:
    """Matmul ceilings (GFLOP/s) of the named dtypes (float32, bfloat16)."""
    out: dict = {"threads": torch.get_num_threads()}
    for name in dtypes:
        out[f"{name}_gflops"] = ceiling(getattr(torch, name))
    return out


def child_floor(dtype: str = "bfloat16", batch: int = 16, seq: int = 128, reps: int = 5,
                trials: int = 5) -> dict:
    """The GEMMs of one MiniLM + LoRA training step timed alone in ``dtype``: per layer the
    q/k/v/o and FFN projections and the two attention products, forward and input-gradient
    backward (the frozen weights need no weight gradient): a lower bound on a step's time.
    Min and median over trials that each allocate their operands afresh."""
    t, h, f, heads, d, layers = batch * seq, 384, 1536, 12, 32, 6
    bf = getattr(torch, dtype)

    def trial() -> float:
        x, w, up, down, hid = (torch.randn(*s, dtype=bf) for s in
                               [(t, h), (h, h), (h, f), (f, h), (t, f)])
        q, kt, p, v = (torch.randn(*s, dtype=bf) for s in
                       [(batch * heads, seq, d), (batch * heads, d, seq),
                        (batch * heads, seq, seq), (batch * heads, seq, d)])

        def layer() -> None:  # each product freed at once (kept alive, they cost ~60 % more)
            for _ in range(4):
                x @ w
                x @ w.T
            x @ up
            hid @ down
            hid @ up.T
            x @ down.T
            for _ in range(3):
                torch.bmm(q, kt)
                torch.bmm(p, v)

        for _ in range(3):
            layer()
        t0 = time.perf_counter()
        for _ in range(reps * layers):
            layer()
        return (time.perf_counter() - t0) / reps

    steps = sorted(trial() for _ in range(trials))
    flops = layers * (2 * t * (4 * h * h + 2 * h * f) * 2 + 3 * 2 * 2 * batch * heads * seq * seq * d)
    return {"dtype": dtype, "step_ms_min": 1e3 * steps[0],
            "step_ms_median": 1e3 * steps[len(steps) // 2], "gflop": flops / 1e9,
            "gflops_best": flops / steps[0] / 1e9}


def child_step(mode: str, steps: int = 20) -> dict:
    """One training step of the default job on 16 full-length (128-token) articles."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedprune.client.world import build

    cfg = job(10, 2, 1, *(PLAIN if mode == "plain" else []))
    fed = build(cfg)
    rows = [r for r in fed.train_rows if len(r["input_ids"]) == cfg.data.max_length][:16]
    batch = fed.collate(rows)
    fed.model.train()
    opt = torch.optim.AdamW(list(fed.params.values()), lr=cfg.federation.lr)

    def step() -> None:
        fed.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"step_ms_min": 1e3 * times[0], "step_ms_median": 1e3 * times[len(times) // 2],
            "gflop": counter.get_total_flops() / 1e9,
            "compute_dtype": str(fed.compute_dtype).removeprefix("torch.")}


# --- grid: the default job ----------------------------------------------------------------

def job(c: int, k: int, rounds: int, *extra: str):
    from fedprune.config import load_config
    return load_config(None, ["model.name=minilm", "data.dataset=bbc_news",
                              f"federation.num_clients={c}", f"federation.clients_per_round={k}",
                              f"federation.rounds={rounds}", "run.seed=0", *extra])


def count_eval_flops(fed, cfg) -> int:
    """FLOPs of one evaluation pass over the validation rows (counted, not timed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedprune.client.train import evaluate
    with FlopCounterMode(display=False) as counter:
        evaluate(fed.model, fed.val_rows, fed.collate, cfg.federation.eval_batch_size)
    return int(counter.get_total_flops())


def child_fedprune(c: int, k: int, rounds: int, eval_flops: int = 0) -> dict:
    """``eval_flops``: the FLOPs of one evaluation pass if already counted (they depend on the
    model and the validation rows only, not on C or K), else 0 to count them here."""
    from fedprune.client.world import build
    from fedprune.report.metrics import read_metrics
    from fedprune.sim.runner import run

    cfg = job(c, k, rounds)
    fed = build(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        records = read_metrics(run(cfg, Path(tmp) / "run", progress=False, fed=fed))
    steady = records[1:] or records  # round 1 warms up
    clients = [m for r in steady for m in r["client_metrics"].values()]
    train_s = sum(m["train_s"] for m in clients)
    eval_s = sum(r["eval_s"] for r in steady)
    eval_flops = eval_flops or count_eval_flops(fed, cfg)
    return {"sec_per_round": [r["wall_s"] for r in records],
            "accuracy": records[-1]["accuracy"],
            "train_s_per_round": train_s / len(steady), "eval_s_per_round": eval_s / len(steady),
            "train_gflops": sum(m["train_ops"] for m in clients) / train_s / 1e9,
            "eval_gflops": eval_flops * len(steady) / eval_s / 1e9, "eval_flops": eval_flops,
            "compute_dtype": str(fed.compute_dtype).removeprefix("torch."),
            "bytes_up_per_client": records[-1]["bytes_up"][0]}


def child_plain(c: int, k: int, rounds: int, eval_flops: int = 0) -> dict:
    """The same federated job as a bare loop over a plain float32 transformers + peft model
    (``eval_flops`` as in `child_fedprune`)."""
    from fedprune.client.train import evaluate
    from fedprune.client.world import build
    from fedprune.core.accounting import train_ops
    from fedprune.core.selection import History, random_selection
    from fedprune.sim.runner import client_seed
    from fedprune.structure.model import model_arch

    cfg = job(c, k, rounds, *PLAIN)
    fed, fc = build(cfg), cfg.federation
    arch = model_arch(fed.model, cfg.peft)
    heads = [arch.hidden // arch.head_dim] * arch.layers
    params = fed.params
    glob = {n: p.detach().clone() for n, p in params.items()}
    times, train_s, eval_s, ops, acc = [], [], [], [], None
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        acc_delta = {n: torch.zeros_like(v, dtype=torch.float64) for n, v in glob.items()}
        total, shapes = 0, []
        for cid in random_selection(rnd, History(np.ones(c)), k, cfg.run.seed):
            idx = torch.as_tensor(fed.client_indices[cid], dtype=torch.long)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(glob[n])
            seed = client_seed(cfg.run.seed, rnd, cid)
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            opt = torch.optim.AdamW(list(params.values()), lr=fc.lr)
            fed.model.train()
            order = idx[torch.randperm(len(idx), generator=gen)].tolist()
            for s in range(0, len(order), fc.batch_size):
                batch = fed.collate([fed.train_rows[i] for i in order[s:s + fc.batch_size]])
                shapes.append(tuple(batch["input_ids"].shape))
                fed.model(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for n, p in params.items():
                    acc_delta[n] += (p.detach() - glob[n]).double() * len(idx)
            total += len(idx)
        t_train = time.perf_counter()
        glob = {n: (v.double() + acc_delta[n] / total).float() for n, v in glob.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(glob[n])
        t_eval = time.perf_counter()
        acc = evaluate(fed.model, fed.val_rows, fed.collate, fc.eval_batch_size)["accuracy"]
        times.append(time.perf_counter() - t0)
        train_s.append(t_train - t0)
        eval_s.append(time.perf_counter() - t_eval)
        ops.append(train_ops(arch, heads, shapes))
    steady = slice(1, None) if rounds > 1 else slice(None)
    eval_flops = eval_flops or count_eval_flops(fed, cfg)
    return {"sec_per_round": times, "accuracy": acc,
            "train_s_per_round": float(np.mean(train_s[steady])),
            "eval_s_per_round": float(np.mean(eval_s[steady])),
            "train_gflops": sum(ops[steady]) / sum(train_s[steady]) / 1e9,
            "eval_gflops": eval_flops * len(eval_s[steady]) / sum(eval_s[steady]) / 1e9,
            "eval_flops": eval_flops, "compute_dtype": "float32"}


# --- SmolLM2: one LoRA instruction-tuning round -------------------------------------------

def child_smollm2(mode: str, clients: int = 2, examples: int = 16, batch: int = 4,
                  max_length: int = 256, max_new_tokens: int = 16) -> dict:
    """``clients`` clients each train one epoch on ``examples`` article -> headline pairs;
    then the trained model writes headlines for one batch of them (`smollm2_generation`)."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from fedprune.client.train import LocalTrainSpec, load_state, local_train, snapshot
    from fedprune.data import load_source
    from fedprune.structure.compute import attn_implementation, prepare_compute, resolve_dtype
    from fedprune.structure.model import apply_lora, load_backbone, resolve, trainable_parameters

    cache = Path.home() / ".cache" / "fedprune"
    dtype = torch.float32 if mode == "plain" else resolve_dtype("auto")
    attention = "sdpa" if mode == "plain" else "auto"
    tok = AutoTokenizer.from_pretrained(resolve("smollm2", cache))
    model = load_backbone("smollm2", task="causal_lm", num_labels=0,
                          attn_implementation=attn_implementation(attention), seed=0,
                          cache_dir=cache)
    model = apply_lora(model, task="causal_lm", r=16, alpha=32, dropout=0.05,
                       target_modules=list("qkvo"), seed=0)
    prepare_compute(model, dtype, attention)
    params = trainable_parameters(model)
    start = snapshot(params)
    ds = load_source("bbc_news", text_column="text", label_column="label").shuffle(seed=0)
    rows, questions = [], []
    for ex in ds.select(range(clients * examples)):
        article = ex["text"].split("\n", 1)[1].strip()
        article = tok.decode(tok(article, add_special_tokens=False)["input_ids"][:max_length - 80])
        questions.append(f"Write a headline for this article.\n\n{article}")
        prompt = tok.apply_chat_template([{"role": "user", "content": questions[-1]}],
                                         tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(ex["headline"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p_ids + a_ids, "labels": [-100] * len(p_ids) + a_ids})

    # right-padded input_ids / attention_mask, labels padded with -100
    collate = DataCollatorForSeq2Seq(tok, padding=True, return_tensors="pt")
    spec = LocalTrainSpec(1, batch, 2e-4)
    t0 = time.perf_counter()
    losses, flops, train_s = [], 0.0, 0.0
    for cid in range(clients):
        load_state(params, start)
        idx = list(range(cid * examples, (cid + 1) * examples))
        stats = local_train(model, params, rows, idx, collate, spec, seed=cid)
        losses.append(stats.loss)
        train_s += stats.seconds
    round_s = time.perf_counter() - t0
    # FLOPs of the same steps, counted once more (not timed)
    for cid in range(clients):
        load_state(params, start)
        idx = list(range(cid * examples, (cid + 1) * examples))
        flops += local_train(model, params, rows, idx, collate, spec, seed=cid,
                             count_flops=True).flops
    gen = smollm2_generation(mode, model, tok, questions[:batch], max_new_tokens)
    return {"round_s": round_s, "train_gflops": flops / train_s / 1e9,
            "mean_loss": float(np.mean(losses)), "tokens_per_client": sum(
                len(r["input_ids"]) for r in rows) / clients,
            "compute_dtype": str(dtype).removeprefix("torch."), **gen}


def smollm2_generation(mode: str, model, tok, questions: list[str], max_new_tokens: int
                       ) -> dict:
    """Greedy headlines for one batch of ``questions`` (a warm-up batch first): plain =
    transformers' ``generate`` on the chat-templated, left-padded batch; fedprune =
    `fedprune.data.tasks.generate` on the model as fedprune prepared it. New tokens are
    counted the same way in both (the answer's tokens + its end-of-turn token), so that
    tokens/s compare."""
    from fedprune.data.tasks import generate

    def plain() -> list[str]:
        ids = [tok.apply_chat_template([{"role": "user", "content": q}],
                                       add_generation_prompt=True) for q in questions]
        ids = [x["input_ids"] if not isinstance(x, list) else x for x in ids]
        enc = tok.pad([{"input_ids": x} for x in ids], return_tensors="pt", padding_side="left")
        with torch.no_grad():
            out = model.eval().generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                        num_beams=1, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def ours() -> list[str]:
        return generate(model, tok, questions, max_new_tokens, len(questions))

    answer = plain if mode == "plain" else ours
    answer()  # warm-up
    t0 = time.perf_counter()
    texts = answer()
    seconds = time.perf_counter() - t0
    tokens = sum(min(len(tok(t, add_special_tokens=False)["input_ids"]) + 1, max_new_tokens)
                 for t in texts)
    return {"generate_s": seconds, "generated_tokens": tokens,
            "generate_tokens_per_s": tokens / seconds, "answers": texts}


# --- sweep over C ---------------------------------------------------------------------------

def child_sweep(c: int, k: int = 10, per_client: int = 16, rounds: int = 5) -> dict:
    """Rounds 2 .. R-1 timed; round R evaluates (on 64 validation rows: it is not timed)."""
    from fedprune.client.world import build
    from fedprune.report.metrics import read_metrics
    from fedprune.sim.runner import run

    cfg = job(c, k, rounds, f"run.eval_every={rounds}")
    small = job(10, k, rounds)
    fed = build(small)  # data and model once; then C clients of `per_client` examples each
    rng = np.random.default_rng(0)
    n = len(fed.train_rows)
    fed.client_indices = [np.sort(rng.choice(n, per_client, replace=False)) for _ in range(c)]
    fed.val_rows = fed.val_rows[:64]
    with tempfile.TemporaryDirectory() as tmp:
        records = read_metrics(run(cfg, Path(tmp) / "run", progress=False, fed=fed))
    timed = [r["wall_s"] for r in records[1:-1]]  # not the warm-up nor the evaluated round
    return {"sec_per_round": timed, "mean_sec_per_round": float(np.mean(timed))}


# --- structural head pruning ------------------------------------------------------------------

def child_structural(reps: int = 2, warm: int = 0) -> dict:
    """Per sparsity: a warm-up pass (the whole epoch, or its first ``warm`` examples), then
    ``reps`` timed epochs (the fastest counts)."""
    from fedprune.client.train import load_state, local_train
    from fedprune.client.world import build
    from fedprune.core.accounting import train_ops
    from fedprune.methods import build_method
    from fedprune.methods.heads import eq7_keep, frozen_outside
    from fedprune.structure.headmap import structural_keep, unit_mask
    from fedprune.structure.headview import detached_grad_heads, detached_heads, structural_view

    cfg = job(10, 2, 1, "method.name=aoh", "method.aoh.mode=structural")
    fed = build(cfg)
    method = build_method(cfg, fed)
    idx = fed.client_indices[0]
    method.scores(fed.initial, idx, seed=0)  # warm-up
    t0 = time.perf_counter()
    scores = method.scores(fed.initial, idx, seed=0)
    out = {"importance_s": time.perf_counter() - t0,
           "importance_samples": cfg.method.own.importance_samples, "client_examples": len(idx)}
    def epoch(view, frozen=None) -> tuple[float, object]:
        """Fastest of ``reps`` local epochs after the warm-up one, each inside ``view()``
        (a context yielding the trainables): (seconds, the last epoch's stats)."""
        times = []
        for rep in range(reps + 1):  # the first pass warms up
            load_state(fed.params, fed.initial)
            with view() as params:
                stats = local_train(fed.model, params, fed.train_rows,
                                    idx[:warm] if rep == 0 and warm else idx, fed.collate,
                                    method.spec, seed=rep, frozen=frozen)
            times.append(stats.seconds)
        return min(times[1:]), stats

    @contextmanager
    def structural(keep):
        with structural_view(fed.model, method.structure, keep) as view:
            yield view.params

    @contextmanager
    def trained_only(params):
        with frozen_outside(fed.params, params):
            yield params

    @contextmanager
    def detached(keep):
        with detached_heads(fed.model, method.structure, keep):
            yield fed.params

    for sparsity in (0.0, 0.5, 0.9):
        keep = structural_keep(method.structure, eq7_keep(scores, sparsity, "layer"))
        seconds, stats = epoch(lambda k=keep: structural(k))
        heads = [int(keep[a.path].sum()) for a in method.structure.attention]
        out[str(sparsity)] = {"epoch_s": seconds, "heads": heads,
                              "train_ops": train_ops(method.arch, heads, stats.shapes)}
    # mode 'detached' against mode 'adapter' (both: pruned slices frozen, every head forward)
    every = [a.n_heads for a in method.structure.attention]
    for sparsity in (0.5, 0.9):
        keep = eq7_keep(scores, sparsity, "layer")
        frozen = {k: ~v for k, v in unit_mask(method.units, keep, fed.initial).items()}
        seconds, stats = epoch(lambda: nullcontext(fed.params), frozen)
        a = out[f"adapter-{sparsity}"] = {
            "epoch_s": seconds, "train_ops": train_ops(method.arch, every, stats.shapes)}
        seconds, stats = epoch(lambda k=keep: detached(k), frozen)
        d = out[f"detached-{sparsity}"] = {
            "epoch_s": seconds, "train_ops": train_ops(
                method.arch, every, stats.shapes, detached_grad_heads(method.structure, keep))}
        d["speedup_vs_adapter"] = a["epoch_s"] / d["epoch_s"]
        d["analytic_speedup_vs_adapter"] = a["train_ops"] / d["train_ops"]
    # `top_layers` K at 90 % against adapter mode: nothing below the top K layers trains
    for k in (1, 2, 3):
        top = build_method(job(10, 2, 1, "method.name=aoh", f"method.aoh.top_layers={k}"), fed)
        keep, params = top.kept(scores), top.trained_params()
        frozen = {key: ~v for key, v in unit_mask(top.units, keep, fed.initial).items()
                  if key in params}
        seconds, stats = epoch(lambda p=params: trained_only(p), frozen)
        t = out[f"top{k}-0.9"] = {"epoch_s": seconds, "train_ops": train_ops(
            top.arch, every, stats.shapes, frozen_layers=top.frozen_layers)}
        t["speedup_vs_adapter"] = out["adapter-0.9"]["epoch_s"] / t["epoch_s"]
        t["analytic_speedup_vs_adapter"] = out["adapter-0.9"]["train_ops"] / t["train_ops"]
    full = out["0.0"]
    out["importance_share_of_epoch"] = out["importance_s"] / full["epoch_s"]
    for s in ("0.5", "0.9"):
        r = out[s]
        r["speedup"] = full["epoch_s"] / r["epoch_s"]
        r["analytic_speedup"] = full["train_ops"] / r["train_ops"]
        r["ratio_to_analytic"] = r["speedup"] / r["analytic_speedup"]
        r["share_of_analytic_gain"] = (r["speedup"] - 1) / (r["analytic_speedup"] - 1)
    return out


# --- PruFed: one local epoch per device tier (layer-dropped views of SmolLM2) ----------------

def layer_drop_flop_ratio(arch, kept: int, num_layers: int,
                          batches: Sequence[tuple[int, int]]) -> float:
    """Training FLOPs (`core.accounting.train_ops`) of a view keeping ``kept`` of the
    ``num_layers`` decoder layers over those of the full-depth model, on the same batches
    (embeddings and LM head in both): above k / L, since the LM head's share does not shrink."""
    from fedprune.core.accounting import train_ops

    if not 1 <= kept <= num_layers:
        raise ValueError(f"kept must be in [1, {num_layers}], got {kept}")
    return (train_ops(arch, [arch.heads] * kept, batches)
            / train_ops(arch, [arch.heads] * num_layers, batches))


PRUFED_KEEP = (1.0, 0.75, 0.5, 0.25)


def child_prufed(examples: int = 32, reps: int = 2, warm: int = 8) -> dict:
    """configs/prufed.toml (SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o, BBC headlines,
    max_length 256, batch 8) with one tier per keep ratio in PRUFED_KEEP (top-alternate; 1.0
    keeps every layer): `PruFed.local` of one client per tier, every tier on the same
    ``examples`` training pairs (so the same batches). A warm-up pass (the whole epoch, or
    its first ``warm`` examples), then ``reps`` timed epochs per tier, the tiers taking turns
    within each pass (the fastest counts; `train_s`: the local steps only). Speedup vs the
    full-depth tier against `layer_drop_flop_ratio` on the recorded batch shapes."""
    from fedprune.config import load_config
    from fedprune.core.accounting import train_ops
    from fedprune.methods.prufed import PruFed

    n = len(PRUFED_KEEP)
    cfg = load_config(Path(__file__).parents[1] / "configs" / "prufed.toml", [
        f"method.prufed.tier_keep={list(PRUFED_KEEP)}",
        f"method.prufed.tier_strategy={['top-alternate'] * n}",
        f"method.prufed.tier_share={[1 / n] * n}", f"federation.num_clients={n}",
        f"federation.clients_per_round={n}", f"method.prufed.samples={examples}",
        "method.prufed.eval_samples=1", "method.prufed.generate_samples=0",
        "run.count_flops=false"])
    t0 = time.perf_counter()
    fed = PruFed.world(cfg)
    method = PruFed(cfg, fed)
    setup_s = time.perf_counter() - t0
    idx = fed.client_indices[0]
    shapes: list[tuple[int, int]] = []
    collate = fed.collate

    def recording(rows):  # the padded shape of every training batch
        batch = collate(rows)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    fed.collate = recording
    state = method.initial_state()
    num_layers = method.num_layers
    arch = method.arch
    out = {"model": cfg.model.name, "num_layers": num_layers, "examples": examples,
           "batch_size": cfg.federation.batch_size, "max_length": cfg.method.own.max_length,
           "lora_r": cfg.peft.r, "lora_targets": list(arch.lora_targets),
           "compute_dtype": str(fed.compute_dtype).removeprefix("torch."),
           "setup_s": setup_s, "tiers": {}}
    tiers = range(len(PRUFED_KEEP))
    times: dict[int, list[float]] = {t: [] for t in tiers}
    batches: dict[int, list[tuple[int, int]]] = {}
    losses: dict[int, float] = {}
    for rep in range(reps + 1):  # the first pass warms up; tiers interleaved per pass, so
        for tier in tiers:       # that a busy spell of a shared machine hits them alike
            cid = method.tier_of.index(tier)
            fed.client_indices[cid] = idx[:warm] if rep == 0 and warm else idx
            shapes.clear()
            res = method.local(method.downlink(state, cid, 1), cid, seed=rep)
            if rep:
                times[tier].append(res.metrics["train_s"])
                batches[tier], losses[tier] = list(shapes), res.loss
    for tier, keep in enumerate(PRUFED_KEEP):
        kept, shape = method.kept[tier], batches[tier]
        out["tiers"][str(keep)] = {
            "kept_layers": list(kept), "epoch_s": min(times[tier]), "epoch_s_all": times[tier],
            "loss": losses[tier], "batches": [list(s) for s in shape],
            "train_flops": train_ops(arch, [arch.heads] * len(kept), shape),
            "flop_ratio": layer_drop_flop_ratio(arch, len(kept), num_layers, shape),
            "layer_ratio": len(kept) / num_layers}
    full = out["tiers"]["1.0"]
    for row in out["tiers"].values():
        row["speedup"] = full["epoch_s"] / row["epoch_s"]
        row["analytic_speedup"] = 1 / row["flop_ratio"]
        row["ratio_to_analytic"] = row["speedup"] / row["analytic_speedup"]
    head = train_ops(arch, [], full["batches"])  # no layers: the LM head alone
    out["lm_head_share_of_full_flops"] = head / full["train_flops"]
    return out


CHILDREN = {
    "ceilings": child_ceilings, "floor": child_floor, "step": child_step, "plain": child_plain,
    "fedprune": child_fedprune,
    "smollm2": child_smollm2, "sweep": child_sweep, "structural": child_structural,
    "prufed": child_prufed,
}


def spawn(name: str, *args, **kwargs) -> dict:
    argv = [*map(str, args), *(f"{k}={v}" for k, v in kwargs.items())]
    out = subprocess.run([sys.executable, __file__, "--child", name, *argv],
                         check=False, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench child {name} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_arg(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                    help="parts to run (default: all)")
    ap.add_argument("--grid", nargs="+", default=["10:2", "100:10", "1000:20"],
                    help="C:K pairs of the grid (total clients : clients per round)")
    ap.add_argument("--sizes", choices=tuple(SIZES),
                    help="'full' (default where bf16 runs natively) or 'lean' (elsewhere)")
    ap.add_argument("--rounds", type=int, help="rounds per grid measurement (default: sizes')")
    ap.add_argument("--sweep", nargs="+", type=int, default=[10, 100, 1000, 10000],
                    help="values of C for the sweep at K = 10")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: bench/results/bench-<CPU kind>.json)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, *rest = args.child
        kwargs = dict(x.split("=", 1) for x in rest if "=" in x)
        result = CHILDREN[name](*[child_arg(x) for x in rest if "=" not in x],
                                **{k: child_arg(v) for k, v in kwargs.items()})
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    from fedprune.environment import environment

    env = environment()
    out = args.out or RESULTS / f"bench-{machine_tag(env)}.json"
    no_bf16 = bf16_missing(env)
    profile = args.sizes or ("lean" if no_bf16 else "full")
    size = {part: dict(v) for part, v in SIZES[profile].items()}
    if args.rounds:
        size["grid"]["rounds"] = args.rounds
    where = "the 2-core AVX2 AMD EPYC" if profile == "lean" else "the 2-core AMX CPU"
    print(f"bench on {describe(env)}", flush=True)
    print(f"sizes '{profile}', parts {' '.join(args.only)}: about "
          f"{sum(MINUTES[profile][p] for p in args.only):.1f} min with the default sizes on "
          f"{where}; results -> {out}", flush=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    theirs = results.get("environment")
    if results and (theirs is None or machine_tag(theirs) != machine_tag(env)):
        cpu = theirs["cpu"]["model"] if theirs else "a CPU it does not name"
        raise SystemExit(f"{out} holds results measured on {cpu}, not on this "
                         f"{env['cpu']['model']} ({machine_tag(env)}): pass another --out")
    results["environment"] = env  # of the latest run; measured_on names each part's
    measured_on, skipped = results.setdefault("measured_on", {}), results.setdefault("skipped", {})
    started = time.perf_counter()

    def save(part: str, t0: float) -> None:
        wall = time.perf_counter() - t0
        date = datetime.now(UTC).isoformat(timespec="seconds")
        extra = {"grid": {"points": args.grid}, "sweep": {"clients": args.sweep}}.get(part, {})
        measured_on[part] = {**env, "date": date, "wall_s": wall, "sizes_profile": profile,
                             "sizes": {**size.get(part, {}), **extra}}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"  [{part}: {wall / 60:.1f} min, {(time.perf_counter() - started) / 60:.1f} min "
              "so far]", flush=True)

    def skip(key: str, reason: str | None) -> None:
        if reason:
            skipped[key] = reason
            print(f"skipped {key}: {reason}", flush=True)
        else:
            skipped.pop(key, None)

    def peak(dtype: str) -> float | None:
        return results.get("ceilings", {}).get(f"{dtype}_gflops")

    def mfu(res: dict, key: str, dtype: str | None = None) -> float | None:
        top = peak(dtype or res["compute_dtype"])  # the ceiling of the dtype actually used
        return res[key] / top if top else None

    if "ceilings" in args.only:
        t0 = time.perf_counter()
        res = spawn("ceilings", "float32", *([] if no_bf16 else ["bfloat16"]))
        if no_bf16:
            res["skipped"] = {"bfloat16": no_bf16}
        skip("ceilings.bfloat16", no_bf16)
        results["ceilings"] = res
        print(f"ceilings (GFLOP/s, 2048^3 matmul, {res['threads']} threads): "
              + ", ".join(f"{d} {res[f'{d}_gflops']:.0f}" for d in ("float32", "bfloat16")
                          if f"{d}_gflops" in res), flush=True)
        save("ceilings", t0)
    if "floor" in args.only:
        t0 = time.perf_counter()
        dtype = env["auto_compute_dtype"]  # bfloat16 where it runs natively, else float32
        res = spawn("floor", dtype, **size["floor"])
        if no_bf16:
            res["skipped"] = {"bfloat16": no_bf16}
        skip("floor.bfloat16", no_bf16)
        res["mfu_best"] = mfu(res, "gflops_best", dtype)
        results["floor"] = res
        share = (f", {100 * res['mfu_best']:.0f} % of the {dtype} ceiling"
                 if res["mfu_best"] is not None else "")
        print(f"GEMM floor of a 16 x 128 MiniLM step ({dtype}): {res['step_ms_min']:.0f} ms min, "
              f"{res['step_ms_median']:.0f} ms median, {res['gflop']:.1f} GFLOP, "
              f"{res['gflops_best']:.0f} GFLOP/s{share}", flush=True)
        save("floor", t0)
    if "step" in args.only:
        t0 = time.perf_counter()
        results["step"] = {mode: spawn("step", mode, **size["step"])
                           for mode in ("plain", "fedprune")}
        for mode, r in results["step"].items():
            r["gflops"] = r["gflop"] / r["step_ms_median"] * 1e3
            r["mfu"] = mfu(r, "gflops")
            share = (f", MFU {100 * r['mfu']:.1f} % of the {r['compute_dtype']} ceiling (median)"
                     if r["mfu"] is not None else "")
            print(f"training step ({mode}, {r['compute_dtype']}): {r['step_ms_min']:.0f} ms min, "
                  f"{r['step_ms_median']:.0f} ms median, {r['gflop']:.1f} GFLOP{share}",
                  flush=True)
        save("step", t0)
    if "grid" in args.only:
        t0 = time.perf_counter()
        rows, counted = [], {}  # one evaluation pass's FLOPs per mode, counted once
        for item in args.grid:
            c, k = map(int, item.split(":"))
            row = {"clients": c, "per_round": k}
            for mode in ("plain", "fedprune"):
                res = spawn(mode, c, k, size["grid"]["rounds"], counted.get(mode, 0))
                counted[mode] = res["eval_flops"]
                steady = res["sec_per_round"][1:] or res["sec_per_round"]
                res["sec_per_round_steady"] = sum(steady) / len(steady)
                res["train_mfu"], res["eval_mfu"] = mfu(res, "train_gflops"), mfu(res, "eval_gflops")
                row[mode] = res
            row["speedup"] = (row["plain"]["sec_per_round_steady"]
                              / row["fedprune"]["sec_per_round_steady"])
            rows.append(row)
            p, f = row["plain"], row["fedprune"]
            print(f"C={c:5d} K={k:3d}  plain {p['sec_per_round_steady']:6.2f} s/round "
                  f"(train {p['train_gflops']:.0f} GFLOP/s)  fedprune "
                  f"{f['sec_per_round_steady']:6.2f} s/round (train {f['train_gflops']:.0f} "
                  f"GFLOP/s, {f['compute_dtype']})  speedup {row['speedup']:.2f}x  RSS plain / "
                  f"fedprune {p['peak_rss_mb']:.0f} / {f['peak_rss_mb']:.0f} MB  acc "
                  f"{p['accuracy']:.3f} / {f['accuracy']:.3f}", flush=True)
        results["grid"] = rows
        save("grid", t0)
    if "smollm2" in args.only:
        t0 = time.perf_counter()
        res = {mode: spawn("smollm2", mode, **size["smollm2"]) for mode in ("plain", "fedprune")}
        for r in res.values():
            r["train_mfu"] = mfu(r, "train_gflops")
        res["speedup"] = res["plain"]["round_s"] / res["fedprune"]["round_s"]
        res["generate_speedup"] = (res["fedprune"]["generate_tokens_per_s"]
                                   / res["plain"]["generate_tokens_per_s"])
        res["same_answers"] = res["plain"]["answers"] == res["fedprune"]["answers"]
        results["smollm2"] = res
        print(f"SmolLM2 round: plain {res['plain']['round_s']:.1f} s, fedprune "
              f"{res['fedprune']['round_s']:.1f} s ({res['fedprune']['compute_dtype']}, "
              f"{res['speedup']:.2f}x); generation plain "
              f"{res['plain']['generate_tokens_per_s']:.1f} tokens/s, fedprune "
              f"{res['fedprune']['generate_tokens_per_s']:.1f} tokens/s "
              f"({res['generate_speedup']:.2f}x, same answers: {res['same_answers']})",
              flush=True)
        save("smollm2", t0)
    if "sweep" in args.only:
        t0 = time.perf_counter()
        sweep = [{"clients": c, **spawn("sweep", c, **size["sweep"])} for c in args.sweep]
        base = sweep[0]
        for row in sweep:
            row["time_vs_first"] = row["mean_sec_per_round"] / base["mean_sec_per_round"]
            row["rss_vs_first"] = row["peak_rss_mb"] / base["peak_rss_mb"]
            print(f"sweep C={row['clients']:6d} K=10: {row['mean_sec_per_round']:.2f} s/round "
                  f"({row['time_vs_first']:.2f}x), peak RSS {row['peak_rss_mb']:.0f} MB "
                  f"({row['rss_vs_first']:.2f}x)", flush=True)
        results["sweep"] = sweep
        save("sweep", t0)
    if "structural" in args.only:
        t0 = time.perf_counter()
        results["structural"] = spawn("structural", **size["structural"])
        for s in ("0.5", "0.9"):
            r = results["structural"][s]
            print(f"structural {s}: epoch {r['epoch_s']:.2f} s, speedup {r['speedup']:.2f}x "
                  f"vs analytic {r['analytic_speedup']:.2f}x (ratio {r['ratio_to_analytic']:.2f}, "
                  f"{100 * r['share_of_analytic_gain']:.0f} % of the gain)", flush=True)
            a, d = results["structural"][f"adapter-{s}"], results["structural"][f"detached-{s}"]
            print(f"detached {s}: epoch {d['epoch_s']:.2f} s against adapter mode's "
                  f"{a['epoch_s']:.2f} s: {d['speedup_vs_adapter']:.2f}x vs analytic "
                  f"{d['analytic_speedup_vs_adapter']:.2f}x", flush=True)
        for k in (1, 2, 3):
            t = results["structural"][f"top{k}-0.9"]
            print(f"top_layers={k} 0.9: epoch {t['epoch_s']:.2f} s against adapter mode's: "
                  f"{t['speedup_vs_adapter']:.2f}x vs analytic "
                  f"{t['analytic_speedup_vs_adapter']:.2f}x", flush=True)
        save("structural", t0)
    if "prufed" in args.only:
        t0 = time.perf_counter()
        res = results["prufed"] = spawn("prufed", **size["prufed"])
        for keep, r in res["tiers"].items():
            print(f"prufed keep {keep} ({len(r['kept_layers'])}/{res['num_layers']} layers, "
                  f"{res['compute_dtype']}): epoch {r['epoch_s']:.2f} s, speedup "
                  f"{r['speedup']:.2f}x vs analytic {r['analytic_speedup']:.2f}x (FLOP ratio "
                  f"{r['flop_ratio']:.3f}, k/L {r['layer_ratio']:.3f}; measured / analytic "
                  f"{r['ratio_to_analytic']:.2f})", flush=True)
        save("prufed", t0)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min on {env['cpu']['model']} "
          f"({machine_tag(env)}): {out}", flush=True)


if __name__ == "__main__":
    main()
