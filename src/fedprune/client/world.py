"""The world every client of a run computes in, built once per process: tokenized data,
partitions and the one shared backbone (DESIGN.md "Performance rules")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig

from fedprune.client.train import snapshot
from fedprune.config import ConfigError, ExperimentConfig
from fedprune.core.update import State
from fedprune.data import load_source, pad_batch, partition, tokenize_cached, train_val_split
from fedprune.data.tasks import collator, load_task, tokenize_rows
from fedprune.structure.compute import (
    attn_implementation,
    prepare_compute,
    resolve_device,
    resolve_dtype,
)
from fedprune.structure.model import (
    apply_peft,
    load_backbone,
    load_tokenizer,
    resolve,
    trainable_parameters,
)


@dataclass
class Federation:
    """The shared, read-only world of a run: built once, used by every round."""

    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]  # live trainable tensors of the shared model
    initial: State                         # their initial values: the round-0 global state
    train_rows: list[dict]                 # tokenized training examples (unpadded)
    val_rows: list[dict]
    client_indices: list[np.ndarray]       # client id -> indices into train_rows
    label_names: list[str]
    collate: object                        # rows -> padded batch tensors
    special_ids: set[int]                  # not queries of the importance pass (Eq. 6)
    exclude_key_ids: set[int]              # not keys of the importance pass (SEP / EOS)
    compute_dtype: torch.dtype             # what model.compute_dtype resolved to


def cache_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.data.cache_dir or Path.home() / ".cache" / "fedprune").expanduser()


def load_data(cfg: ExperimentConfig, tokenizer) -> tuple[list[dict], list[dict], list[str]]:
    """Tokenized (train, validation) rows and the label names, tokenized once and cached."""
    d = cfg.data
    ds = load_source(d.dataset, text_column=d.text_column, label_column=d.label_column,
                     text_pair_column=d.text_pair_column or None)
    if d.max_samples:
        ds = ds.shuffle(seed=cfg.run.seed).select(range(min(d.max_samples, len(ds))))
    train, val = train_val_split(ds, d.val_fraction, seed=cfg.run.seed)
    names = train.features["label"].names
    rows = []
    for split in (train, val):
        tok = tokenize_cached(split, tokenizer, max_length=d.max_length, cache_dir=cache_dir(cfg))
        rows.append(tok.with_format(None).to_list())
    return rows[0], rows[1], names


def set_threads(cfg: ExperimentConfig) -> None:
    """torch threads: `run.num_threads`, else OMP_NUM_THREADS (the OpenMP convention, so a
    process sharing its cores, e.g. a test worker, can be told), else every core."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(cfg.run.num_threads or (int(omp) if omp.isdigit() else 0)
                          or os.cpu_count() or 1)


def build(cfg: ExperimentConfig, task: str = "classification") -> Federation:
    """The shared world of the methods that train what `peft.method` names: a classifier of
    `data.dataset`, or with `data.task` that generation task (`build_generation`)."""
    if task != "classification":
        raise NotImplementedError(f"`method.name` = {cfg.method.name!r} needs a {task!r} world, "
                                  "which its own class builds")
    if cfg.data.task:
        return build_generation(cfg)
    set_threads(cfg)
    tokenizer = load_tokenizer(resolve(cfg.model.name, cache_dir(cfg)))
    train_rows, val_rows, names = load_data(cfg, tokenizer)
    parts = client_parts(cfg, np.array([r["label"] for r in train_rows]))
    model, params, initial, device, dtype = trainable_backbone(cfg, "classification", len(names))
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
               tokenizer.bos_token_id, tokenizer.eos_token_id} - {None}
    exclude_keys = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
    return Federation(model, params, initial, train_rows, val_rows, parts, names,
                      partial(on_device, partial(pad_batch, tokenizer), device), special,
                      exclude_keys, dtype)


@dataclass
class GenerationWorld(Federation):
    """The world of a generation task: what evaluation needs beyond token rows."""

    tokenizer: Any
    task: str               # a key of data.tasks.TASKS: how answers are scored
    prompts: list[str]      # validation prompts answered by `generate`
    references: list[str]   # their reference responses


def build_generation(cfg: ExperimentConfig) -> GenerationWorld:
    """`data.task`'s prompt/response rows, tokenized once: instruction tuning (loss on the
    response tokens) of a decoder-only model, or seq2seq of an encoder-decoder one; dealt by
    `partition.scheme` over the rows' "label" (the BBC category) where they have one.

    Importance (AoH Eq. 6) on these rows: every prompt and response token that is not a
    special token (chat-template markers, BOS/EOS, padding) is a query; keys are the
    attended tokens but EOS/SEP. A causal model's first token attends only to itself."""
    d = cfg.data
    set_threads(cfg)
    path = resolve(cfg.model.name, cache_dir(cfg))
    tokenizer = load_tokenizer(path)
    kind = "seq2seq" if AutoConfig.from_pretrained(path).is_encoder_decoder else "causal_lm"
    ds = load_task(d.task)
    if d.max_samples:
        ds = ds.shuffle(seed=cfg.run.seed).select(range(min(d.max_samples, len(ds))))
    train, val = train_val_split(ds, d.val_fraction, seed=cfg.run.seed)
    if "label" in train.column_names:
        labels = np.array(train["label"])
    elif cfg.partition.scheme == "iid":
        labels = np.zeros(len(train), dtype=np.int64)
    else:
        raise ConfigError(f"`partition.scheme` = {cfg.partition.scheme!r}: task {d.task!r} "
                          f"has no labels to skew; use 'iid'")
    parts = client_parts(cfg, labels)
    rows = [tokenize_rows(split, tokenizer, kind, max_length=d.max_length,
                          max_target=d.max_new_tokens) for split in (train, val)]
    model, params, initial, device, dtype = trainable_backbone(cfg, kind, 0)
    collate = collator(tokenizer, model if kind == "seq2seq" else None)  # + decoder_input_ids
    shown = val.select(range(min(d.generate_samples, len(val))))
    return GenerationWorld(model, params, initial, rows[0], rows[1], parts, [],
                           partial(on_device, collate, device), set(tokenizer.all_special_ids),
                           {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}, dtype,
                           tokenizer, d.task, shown["prompt"], shown["response"])


def client_parts(cfg: ExperimentConfig, labels: np.ndarray) -> list[np.ndarray]:
    """Client id -> indices into the training rows, by `partition.scheme`."""
    p = cfg.partition
    return partition(labels, p.scheme, cfg.federation.num_clients, seed=cfg.run.seed,
                     alpha=p.alpha, shards_per_client=p.shards_per_client,
                     min_partition_size=p.min_partition_size)


def trainable_backbone(cfg: ExperimentConfig, kind: str, num_labels: int
                       ) -> tuple[torch.nn.Module, dict, State, torch.device, torch.dtype]:
    """The one backbone for task `kind` with `peft.method`'s trainables, on `run.device` in
    `model.compute_dtype`: (model, live trainables, their initial values, device, dtype)."""
    model = load_backbone(cfg.model.name, task=kind, num_labels=num_labels,
                          attn_implementation=attn_implementation(cfg.model.attn_implementation),
                          seed=cfg.run.seed, cache_dir=cache_dir(cfg))
    pc = cfg.peft
    model = apply_peft(model, method=pc.method, task=kind, r=pc.r, alpha=pc.alpha,
                       dropout=pc.dropout, target_modules=pc.target_modules,
                       num_virtual_tokens=pc.num_virtual_tokens, seed=cfg.run.seed)
    device = resolve_device(cfg.run.device)
    model.to(device)  # before prepare_compute: autocast follows the parameters' device
    dtype = resolve_dtype(cfg.model.compute_dtype, device)
    prepare_compute(model, dtype, cfg.model.attn_implementation)
    params = trainable_parameters(model)
    return model, params, snapshot(params), device, dtype  # snapshot: round 0, on the CPU


def on_device(collate, device: torch.device, rows: list[dict]) -> dict[str, torch.Tensor]:
    """``collate(rows)`` with every tensor on ``device`` (a no-op on the CPU)."""
    return {k: v.to(device) for k, v in collate(rows).items()}
