"""Patch / restore: temporary sub-model views of the one shared backbone, restored exactly.

A client that computes only part of the model (fewer attention heads, fewer layers, pruned
weights) must not get a copy of the backbone (DESIGN "Performance rules": one frozen backbone
per process). Instead, a view changes the shared model in place for the duration of a `with`
block and puts back, on exit and also on an exception, the very objects that were there:

    with patched() as patcher:
        patcher.set(model.model, "layers", nn.ModuleList(kept_layers))
        patcher.set(model.config, "num_hidden_layers", len(kept_layers))
        ...  # forward / backward / generate on the view
    # model.model.layers is the original ModuleList object again

Heads (headview.py) use it now; layers (layers.py) and pruned weights next. Only the
objects passed to `Patcher.set` change, so the caller decides what a view shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

__all__ = ["Patcher", "base_layer", "bias_only", "patched"]

_ABSENT = object()  # marks an attribute that did not exist before `set`


class Patcher:
    """Sets attributes (parameters, submodules, plain attributes, instance `forward`s) and
    undoes every change in reverse order, restoring the very objects that were there before
    (or deleting what did not exist)."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []  # (object, attribute, previous value)

    def set(self, obj: Any, name: str, value: Any) -> None:
        """`setattr(obj, name, value)`, remembering the previous value. `forward` is set as an
        instance attribute (shadowing the class method), so restoring removes it again."""
        if name == "forward":
            self._undo.append((obj, name, obj.__dict__.get(name, _ABSENT)))
            obj.__dict__[name] = value
        else:
            self._undo.append((obj, name, getattr(obj, name, _ABSENT)))
            setattr(obj, name, value)

    def restore(self) -> None:
        """Undo every `set`, last first. Idempotent: a second call does nothing."""
        while self._undo:
            obj, name, old = self._undo.pop()
            if name == "forward":
                if old is _ABSENT:
                    del obj.__dict__[name]
                else:
                    obj.__dict__[name] = old
            elif old is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


@contextmanager
def patched() -> Iterator[Patcher]:
    """A `Patcher` whose changes are undone when the block exits, also on an exception
    (including one raised while the view is being set up)."""
    patcher = Patcher()
    try:
        yield patcher
    finally:
        patcher.restore()


def base_layer(module: nn.Module) -> nn.Module:
    """The Linear / Conv1D under a peft wrapper (the module itself when not wrapped)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if not isinstance(base, nn.Linear | Conv1D):
        raise NotImplementedError(f"expected a Linear or Conv1D projection; "
                                  f"found {type(base).__name__}")
    return base


def bias_only(base: Conv1D) -> Callable[[Tensor], Tensor]:
    """A forward for a Conv1D with zero input features: its output is its bias, (*, nf)."""

    def forward(x: Tensor) -> Tensor:
        return base.bias.expand(*x.shape[:-1], base.nf).contiguous()

    return forward
