"""FedSpaLLM's client pruning cost: one-shot pruning of all of SmolLM2-135M-Instruct's layers.

Runs `fedprune.client.pruners.prune_layers` (SparseGPT by default) over the 30 decoder layers
of the bundled SmolLM2 with N calibration sequences x T tokens and prints one JSON line: wall
seconds, the split forward / statistics (Hessian) / solve (OBS), peak RSS, the achieved
sparsity, perplexity on held-out text before and after, and the CPU model and thread count.

Calibration text is the "calibration" part of a book that ships inside fedprune
(`fedprune.data.texts`, default Austen's Emma), cut into consecutive blocks; perplexity is
measured on blocks of the same book's "test" part, which calibration never sees. Not run by
the tests.

    python bench/prune.py                      # 128 x 256 tokens, SparseGPT, 50 %
    python bench/prune.py --sequences 16       # a quick check
    python bench/prune.py --method wanda --prunen 2 --prunem 4 --sparsity 0.5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedprune.client.pruners import PRUNERS, prune_layers
from fedprune.data.texts import book_names, book_part, token_blocks
from fedprune.structure.model import smollm2_path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    """lscpu's "Model name" (every figure names its CPU)."""
    try:
        out = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines()
             if line.startswith("Model name:")]
    return names[0] if names else "unknown"


def perplexity(model, blocks: torch.Tensor) -> float:
    """exp of the mean next-token loss over the (blocks, tokens) held-out ids."""
    with torch.no_grad():
        losses = [model(b[None], labels=b[None], use_cache=False).loss for b in blocks]
    return torch.exp(torch.stack(losses).mean()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=128, help="calibration sequences")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--method", choices=sorted(PRUNERS), default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--prunen", type=int, default=0)
    parser.add_argument("--prunem", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--book", choices=book_names(), default="austen_emma")
    parser.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks for ppl")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fedprune")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = smollm2_path(args.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = token_blocks(tokenizer, book_part(args.book, "calibration"), args.tokens,
                       args.sequences)  # (sequences, tokens)
    batches = [{"input_ids": b} for b in ids.split(args.batch_size)]
    held_out = token_blocks(tokenizer, book_part(args.book, "test"), args.tokens,
                            args.eval_blocks)
    ppl_dense = perplexity(model, held_out)
    rss_loaded = peak_rss_mb()
    n_layers = model.config.num_hidden_layers

    t0 = time.perf_counter()
    report = prune_layers(model, range(n_layers), batches, args.method, args.sparsity,
                          args.prunen, args.prunem)
    wall = time.perf_counter() - t0

    masks = report.masks()
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    print(json.dumps({
        "bench": "prune", "model": "SmolLM2-135M-Instruct", "layers": n_layers,
        "method": args.method, "sparsity": args.sparsity, "nm": f"{args.prunen}:{args.prunem}",
        "sequences": args.sequences, "tokens": args.tokens, "batch_size": args.batch_size,
        "calibration": f"{args.book} calibration part", "eval_blocks": args.eval_blocks,
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "wall_s": round(wall, 2), "forward_s": round(report.forward_s, 2),
        "hessian_s": round(report.stats_s, 2), "solve_s": round(report.solve_s, 2),
        "s_per_layer": round(wall / n_layers, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_load_mb": round(rss_loaded, 1),
        "achieved_sparsity": pruned / total,
        "ppl_heldout_dense": round(ppl_dense, 3),
        "ppl_heldout_pruned": round(perplexity(model, held_out), 3),
    }))


if __name__ == "__main__":
    main()
