"""Progress bars for long work inside a run (SmolLM2's one-time conversion, the importance
pass, pruning layer by layer): off by default, so library calls and tests stay silent; the
CLI turns them on (`shown(True)`, off with --quiet). The round and suite bars are the
runner's and the suite's own."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_SHOWN: ContextVar[bool] = ContextVar("fedprune_progress", default=False)


@contextmanager
def shown(on: bool) -> Iterator[None]:
    """Show (or hide) the inner progress bars inside the block."""
    token = _SHOWN.set(on)
    try:
        yield
    finally:
        _SHOWN.reset(token)


def bar(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
        ) -> Iterable[T]:
    """``items`` with a transient tqdm bar when bars are shown, else ``items`` itself."""
    if not _SHOWN.get():
        return items
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


@contextmanager
def steps(desc: str, total: int) -> Iterator[Callable[[], None]]:
    """A bar of ``total`` named-by-position steps: the block calls the yielded ``done()``
    after each (a no-op when bars are hidden)."""
    if not _SHOWN.get():
        yield lambda: None
        return
    with tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True) as t:
        yield lambda: t.update(1)
