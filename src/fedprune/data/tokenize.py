"""Tokenize once, cache on disk by content hash; pad each batch to its longest row."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from fedprune.data.sources import DataError

CACHE_VERSION = 1  # bump when the cached layout or the tokenization recipe changes
INPUT_COLUMNS = ("text", "text_pair")
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize_cached(
    ds: datasets.Dataset, tokenizer: Any, *, max_length: int, cache_dir: str | Path
) -> datasets.Dataset:
    """Tokenize "text" (and "text_pair") with truncation to `max_length`, no padding.

    The result (token columns + "label" when present, torch format) is saved under
    `cache_dir` keyed by `cache_key`; later calls with the same content load it from disk
    without calling the tokenizer.
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"`max_length` must be an integer >= 1, got {max_length!r}")
    if "text" not in ds.column_names:
        raise DataError(f"tokenize: no 'text' column; available columns: {ds.column_names}")
    key = cache_key(ds, tokenizer, max_length)
    path = Path(cache_dir) / f"tokenized-{key}"
    if not path.is_dir():
        _save_atomic(_tokenize(ds, tokenizer, max_length, key), path)
    out = datasets.load_from_disk(str(path))
    out.set_format("torch")
    return out


def cache_key(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> str:
    """sha256 of the rows' text/text_pair/label content, the tokenizer identity and max_length."""
    columns = [c for c in (*INPUT_COLUMNS, "label") if c in ds.column_names]
    meta = {
        "version": CACHE_VERSION,
        "tokenizer": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "max_length": max_length,
        "columns": columns,
        "rows": len(ds),
    }
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for batch in ds.select_columns(columns).iter(batch_size=1024):
        for column in columns:
            for value in batch[column]:
                data = str(value).encode()
                digest.update(len(data).to_bytes(8, "little"))  # length prefix: no collisions
                digest.update(data)
    return digest.hexdigest()[:32]


def pad_batch(tokenizer: Any, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad `rows` to the longest one; "label" comes back as "labels" (long), as HF models expect.

    Rows are read, never modified.
    """
    if not rows:
        raise DataError("pad_batch: empty batch")
    features = [{k: v for k, v in row.items() if k in TOKEN_COLUMNS} for row in rows]
    batch = dict(tokenizer.pad(features, padding="longest", return_tensors="pt"))
    label_key = next((k for k in ("label", "labels") if k in rows[0]), None)
    if label_key is not None:
        batch["labels"] = torch.tensor([int(row[label_key]) for row in rows], dtype=torch.long)
    return batch


def _tokenize(
    ds: datasets.Dataset, tokenizer: Any, max_length: int, key: str
) -> datasets.Dataset:
    has_pair = "text_pair" in ds.column_names

    def encode(batch: dict[str, list]) -> dict[str, list]:
        pair = batch["text_pair"] if has_pair else None
        return dict(tokenizer(batch["text"], pair, truncation=True, max_length=max_length))

    drop = [c for c in ds.column_names if c != "label"]
    # new_fingerprint: skip datasets' hashing of `encode` (it would pickle the tokenizer).
    return ds.map(
        encode, batched=True, remove_columns=drop, new_fingerprint=key,
        keep_in_memory=True, load_from_cache_file=False, desc="tokenize",
    )


def _save_atomic(ds: datasets.Dataset, path: Path) -> None:
    """Write to a temporary folder, then rename: a crash never leaves a half cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_dir():
            raise


def length_grouped_order(lengths: Sequence[int], batch_size: int,
                         generator: torch.Generator) -> list[int]:
    """transformers' length-grouped order (shuffle, then sort by length inside mega-batches of
    50 batches): positions into ``lengths``, so batches hold rows of similar length."""
    return get_length_grouped_indices(list(lengths), batch_size, generator=generator)
