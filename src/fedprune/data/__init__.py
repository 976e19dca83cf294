"""Data: sources (bundled, hub, local files), tokenization cache, federated partitions."""

from fedprune.data.partition import SCHEMES, partition, partition_summary
from fedprune.data.sources import (
    BUNDLED,
    HUB_LOADERS,
    DataError,
    HubSpec,
    load_source,
    train_val_split,
)
from fedprune.data.tokenize import cache_key, length_grouped_order, pad_batch, tokenize_cached


def quiet_datasets() -> None:
    """No progress bars from datasets (the CLI shows its own)."""
    import datasets

    datasets.disable_progress_bars()


__all__ = [
    "BUNDLED",
    "HUB_LOADERS",
    "SCHEMES",
    "DataError",
    "HubSpec",
    "cache_key",
    "length_grouped_order",
    "load_source",
    "pad_batch",
    "partition",
    "partition_summary",
    "quiet_datasets",
    "tokenize_cached",
    "train_val_split",
]
