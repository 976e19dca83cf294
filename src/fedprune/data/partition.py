"""Split a training set among federated clients: IID, Dirichlet label skew, label shards.

The maths is flwr_datasets' partitioners; this module feeds them a small dataset of
(label, index) rows and reads each client's indices back through `load_partition`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import datasets
import numpy as np

from fedprune.data.sources import DataError

SCHEMES = ("iid", "dirichlet", "shards")


def partition(
    labels: np.ndarray,
    scheme: str,
    num_clients: int,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_partition_size: int = 1,
) -> list[np.ndarray]:
    """Return, for client ids 0..num_clients-1, the sorted int64 indices into the training set.

    - "iid": a seeded permutation cut into contiguous blocks; sizes differ by at most 1.
    - "dirichlet": per class, proportions ~ Dir(alpha) over clients (Hsu et al. 2019);
      redrawn (at most 10 times) until every client has `min_partition_size` samples.
    - "shards": sort by label, cut into num_clients * shards_per_client equal shards of
      floor(N / (num_clients * shards_per_client)) samples, deal them out at random
      (McMahan et al. 2017). flwr drops the remainder: N mod (num_clients *
      shards_per_client) samples belong to no client.
    Every other index appears exactly once. Same arguments -> same partition.
    """
    labels = _check_labels(labels)
    _check_args(scheme, num_clients, len(labels), seed, alpha, shards_per_client,
                min_partition_size)
    rows = datasets.Dataset.from_dict(
        {"label": labels, "index": np.arange(len(labels), dtype=np.int64)}
    )
    partitioner = _PARTITIONERS[scheme](
        int(num_clients), int(seed), float(alpha), int(shards_per_client),
        int(min_partition_size),
    )
    if scheme == "iid":  # IidPartitioner cuts contiguous blocks: shuffle first
        rows = rows.shuffle(seed=int(seed), keep_in_memory=True)
    partitioner.dataset = rows
    with warnings.catch_warnings():
        # flwr warns before each Dirichlet redraw; a final failure becomes a DataError.
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        # datasets' sort (shards) trips a pyarrow>=25 deprecation that users cannot act on.
        warnings.filterwarnings("ignore", message="Specifying null_placement")
        try:
            return [_indices(partitioner.load_partition(i)) for i in range(num_clients)]
        except ValueError as exc:
            raise DataError(_failure_message(scheme, num_clients, alpha,
                                             min_partition_size, exc)) from None


def partition_summary(
    parts: list[np.ndarray], labels: np.ndarray, num_classes: int
) -> dict:
    """Per-client sizes and label histograms (plain ints, JSON-serializable).

    "unassigned" counts training samples that no client holds (non-zero only for "shards").
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, num_classes={num_classes}), "
                        f"got range [{labels.min()}, {labels.max()}]")
    held = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
    return {
        "sizes": [len(p) for p in parts],
        "label_histograms": [
            np.bincount(labels[p], minlength=num_classes).astype(int).tolist() for p in parts
        ],
        "unassigned": int(len(labels) - len(held)),
    }


# --- flwr_datasets partitioners, one constructor per scheme -------------------------------


def _iid(num_clients: int, seed: int, alpha: float, shards: int, min_size: int):
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=num_clients)


def _dirichlet(num_clients: int, seed: int, alpha: float, shards: int, min_size: int):
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=alpha,
        min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed,
    )


def _shards(num_clients: int, seed: int, alpha: float, shards: int, min_size: int):
    from flwr_datasets.partitioner import ShardPartitioner

    return ShardPartitioner(
        num_partitions=num_clients, partition_by="label", num_shards_per_partition=shards,
        shuffle=True, seed=seed,
    )


# flwr_datasets is imported on use: its package import pulls in matplotlib (~0.4 s).
_PARTITIONERS: dict[str, Callable] = {"iid": _iid, "dirichlet": _dirichlet, "shards": _shards}


# --- validation ---------------------------------------------------------------------------


def _indices(part: datasets.Dataset) -> np.ndarray:
    return np.sort(np.asarray(part["index"], dtype=np.int64))


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"partition: labels must be a non-empty 1-D integer array, "
            f"got shape {labels.shape} dtype {labels.dtype}"
        )
    return labels.astype(np.int64)


def _check_args(
    scheme: str, num_clients: int, num_samples: int, seed: int, alpha: float,
    shards_per_client: int, min_partition_size: int,
) -> None:
    if scheme not in SCHEMES:
        raise DataError(f"`partition.scheme` must be one of {list(SCHEMES)}, got {scheme!r}")
    if not _is_int(num_clients) or not 1 <= num_clients <= num_samples:
        raise DataError(
            f"`federation.num_clients` (the federation size) must be an integer in "
            f"[1, {num_samples}] (the number of training samples), got {num_clients!r}"
        )
    if not _is_int(seed) or seed < 0:
        raise DataError(f"`run.seed` must be an integer >= 0, got {seed!r}")
    if not isinstance(alpha, int | float | np.number) or not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"`partition.alpha` (Dirichlet concentration) must be > 0, got {alpha!r}")
    if not _is_int(shards_per_client) or shards_per_client < 1:
        raise DataError(
            f"`partition.shards_per_client` must be an integer >= 1, got {shards_per_client!r}"
        )
    if scheme == "shards" and num_clients * shards_per_client > num_samples:
        raise DataError(
            f"`partition.shards_per_client`={shards_per_client} x `federation.num_clients`="
            f"{num_clients} shards exceed the {num_samples} training samples"
        )
    if not _is_int(min_partition_size) or min_partition_size < 0:
        raise DataError(
            f"`partition.min_partition_size` must be an integer >= 0, got {min_partition_size!r}"
        )


def _failure_message(
    scheme: str, num_clients: int, alpha: float, min_size: int, exc: ValueError
) -> str:
    if scheme == "dirichlet":
        return (
            f"Dirichlet partition with `partition.alpha`={alpha} gave some of the "
            f"{num_clients} clients fewer than `partition.min_partition_size`={min_size} "
            "samples in 10 draws; raise alpha, lower min_partition_size or use fewer "
            "clients (`federation.num_clients`)"
        )
    return f"`partition.scheme`={scheme!r} failed for {num_clients} clients: {exc}"
