"""One intra-op thread for a block of small kernels (the caller's thread count restored)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread(device: torch.device | None = None) -> Iterator[None]:
    """Run the block on one intra-op CPU thread (nothing changes for a non-CPU ``device``).

    For chains of small kernels (SparseGPT's OBS sweep, small SVDs) an OpenMP region each
    gains nothing, and on an oversubscribed CPU (2 cores shared by several processes) the
    threads' spin-waits make each kernel many times slower."""
    if device is not None and device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
