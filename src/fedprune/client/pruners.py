"""FedSpaLLM's local one-shot pruners and the sequential layer-by-layer driver.

A client of FedSpaLLM (Bai et al., arXiv 2410.14852) prunes its sampled decoder layers with
a one-shot pruner calibrated on its private text, layer after layer, so that each layer's
calibration inputs come from the client's (already pruned) model below it:

- **SparseGPT** (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot", Alg. 1): Hessian H = 2/n · Σ x xᵀ of the layer's inputs,
  OBS reconstruction of the kept weights column by column from the upper Cholesky factor of
  H⁻¹, adaptive mask selection per block of columns.
- **Wanda** (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language
  Models", Eq. 1): score |W_ij| · ‖X_j‖₂, pruned per output row, no weight update.
- **Magnitude**: score |W_ij|, pruned per matrix, no weight update.

Each pruner is a statistics accumulator for one `nn.Linear` (as SparseGPT's `SparseGPT` and
Wanda's `WrappedGPT`): `add_batch(inp)` with the layer's inputs, then `prune(sparsity,
prunen, prunem, **options)` returns the pruned weight and the boolean keep mask; the layer
itself is not touched. `PRUNERS` maps the method names to the classes.

`prune_layers` is the driver: it captures the decoder layers' real call arguments (whatever
the model passes: rotary `position_embeddings`, the attention mask it built, position ids)
with a pre-hook on layer 0, then walks the layers in order, pruning every `nn.Linear` of a
requested layer from the same inputs and re-running the layer for the next one's inputs.

Conventions: weights are (out, in); pruning N:M means `prunen` of every `prunem`
consecutive input features of each row are zero; a keep mask is True where a weight stays.
Counts are k = round(s·n) (the originals use int(s·n), which float error can drop by one,
e.g. int(0.29·100) = 28); for N:M the sparsity must equal N/M.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from fedprune.core.threads import one_thread
from fedprune.report.progress import bar
from fedprune.structure.attention import describe

__all__ = [
    "PRUNERS",
    "HessianError",
    "LayerPruned",
    "Magnitude",
    "ModulePruned",
    "PruneReport",
    "Pruned",
    "Pruner",
    "SparseGPT",
    "Wanda",
    "prune_layers",
]

log = logging.getLogger("fedprune")

_DAMP_TRIES = 5  # Cholesky attempts, the dampening ×_DAMP_GROWTH after each failure
_DAMP_GROWTH = 10.0
_BATCH_KEYS = ("input_ids", "attention_mask")  # what the driver passes to the model


class Pruned(NamedTuple):
    """A pruned weight (the layer's dtype and (out, in) shape) and its keep mask (bool)."""

    weight: torch.Tensor
    mask: torch.Tensor


class HessianError(RuntimeError):
    """SparseGPT could not factorise the dampened Hessian, even after raising the dampening."""


# --- validation -----------------------------------------------------------------------------


def _check_pattern(sparsity: float, prunen: int, prunem: int) -> None:
    """ValueError unless `sparsity` is in (0, 1) and N:M is off (0:0) or consistent with it."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
        0 < sparsity < 1
    ):
        raise ValueError(f"sparsity must be in (0, 1); got {sparsity!r}")
    if (prunen, prunem) == (0, 0):
        return
    if not (isinstance(prunen, int) and isinstance(prunem, int) and 0 < prunen < prunem):
        raise ValueError(
            f"prunen and prunem must both be 0 (unstructured) or satisfy 0 < prunen < prunem; "
            f"got prunen={prunen!r}, prunem={prunem!r}"
        )
    if not math.isclose(sparsity, prunen / prunem, rel_tol=0, abs_tol=1e-9):
        raise ValueError(
            f"N:M pruning {prunen}:{prunem} makes sparsity {prunen / prunem:g}, but "
            f"sparsity={sparsity!r}; pass sparsity={prunen / prunem:g} or prunen=prunem=0"
        )


def _check_groups(n_in: int, prunem: int) -> None:
    if prunem and n_in % prunem:
        raise ValueError(f"N:M pruning needs in_features divisible by prunem; "
                         f"in_features={n_in}, prunem={prunem}")


# --- mask selection -------------------------------------------------------------------------


def _prune_smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask, True at the k smallest entries of each row of `score` (..., n).

    A stable sort, so ties go to the lowest index and the result is deterministic."""
    order = torch.sort(score, dim=-1, stable=True).indices[..., :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, True)


def _keep_per_matrix(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask (out, in) with exactly round(s·numel) entries pruned over the whole matrix."""
    pruned = _prune_smallest(score.flatten(), round(sparsity * score.numel()))
    return ~pruned.view_as(score)


def _keep_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask (out, in) with exactly round(s·in) entries pruned in every row."""
    return ~_prune_smallest(score, round(sparsity * score.shape[1]))


def _keep_n_of_m(score: torch.Tensor, prunen: int, prunem: int) -> torch.Tensor:
    """Keep mask (out, in): the `prunen` smallest of every `prunem` consecutive inputs pruned."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // prunem, prunem)  # (out, in/M, M)
    return ~_prune_smallest(groups, prunen).reshape(rows, cols)


def _select(score: torch.Tensor, sparsity: float, prunen: int, prunem: int,
            per_row: bool) -> torch.Tensor:
    if prunem:
        return _keep_n_of_m(score, prunen, prunem)
    return _keep_per_row(score, sparsity) if per_row else _keep_per_matrix(score, sparsity)


# --- accumulators ---------------------------------------------------------------------------


class Pruner:
    """Common interface of the one-shot pruners of one `nn.Linear` (weight (out, in)).

    `add_batch(inp)` takes the layer's inputs (..., in) of valid tokens; `prune(sparsity,
    prunen=0, prunem=0, **options)` returns `Pruned` without touching the layer. `options`
    names the keyword options `prune` accepts beyond the common ones; `needs_inputs` is False
    for pruners that ignore `add_batch` (the driver then skips the statistics pass).
    """

    options: ClassVar[tuple[str, ...]] = ()
    needs_inputs: ClassVar[bool] = True

    def __init__(self, layer: nn.Linear) -> None:
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{type(self).__name__} prunes nn.Linear, got {type(layer).__name__}")
        self.layer = layer
        self.nsamples = 0  # tokens seen

    def add_batch(self, inp: torch.Tensor) -> None:
        raise NotImplementedError

    def prune(self, sparsity: float, prunen: int = 0, prunem: int = 0) -> Pruned:
        raise NotImplementedError

    def _weight(self, sparsity: float, prunen: int, prunem: int) -> torch.Tensor:
        """The layer's weight as a float32 copy (out, in), after validating the pattern."""
        _check_pattern(sparsity, prunen, prunem)
        _check_groups(self.layer.in_features, prunem)
        return self.layer.weight.detach().to(torch.float32, copy=True)

    def _tokens(self, inp: torch.Tensor) -> torch.Tensor:
        """inp (..., in) -> (tokens, in) float32."""
        if inp.shape[-1] != self.layer.in_features:
            raise ValueError(f"inputs have {inp.shape[-1]} features; the layer takes "
                             f"{self.layer.in_features}")
        return inp.reshape(-1, inp.shape[-1]).to(torch.float32)


class Magnitude(Pruner):
    """Magnitude pruning: score |W_ij|, exactly round(s·numel) weights pruned per matrix
    (the baseline of Frantar & Alistarh 2023 and Sun et al. 2024); N:M per group of inputs.
    Needs no calibration inputs."""

    needs_inputs: ClassVar[bool] = False

    def add_batch(self, inp: torch.Tensor) -> None:
        """Nothing to accumulate (kept for the common interface)."""

    def prune(self, sparsity: float, prunen: int = 0, prunem: int = 0) -> Pruned:
        weight = self._weight(sparsity, prunen, prunem)  # (out, in)
        keep = _select(weight.abs(), sparsity, prunen, prunem, per_row=False)
        return Pruned(self.layer.weight.detach().masked_fill(~keep, 0), keep)


class Wanda(Pruner):
    """Wanda (Sun et al. 2024, Eq. 1): score S_ij = |W_ij| · ‖X_j‖₂, pruned per output row
    (exactly round(s·in) per row, the paper's per-output comparison group), or N:M; the kept
    weights are not changed.

    `scaler_row` (in,) is the running mean over tokens of x_j². The original divides the sum
    by the number of sequences instead; the two differ by a constant factor, which changes no
    choice.
    """

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__(layer)
        self.scaler_row = torch.zeros(layer.in_features, device=layer.weight.device)  # (in,)

    def add_batch(self, inp: torch.Tensor) -> None:
        x = self._tokens(inp)  # (tokens, in)
        n = x.shape[0]
        if n == 0:
            return
        self.scaler_row *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        self.scaler_row += x.square().sum(0) / self.nsamples

    def prune(self, sparsity: float, prunen: int = 0, prunem: int = 0) -> Pruned:
        weight = self._weight(sparsity, prunen, prunem)  # (out, in)
        score = weight.abs() * self.scaler_row.sqrt()[None, :]  # (out, in)
        keep = _select(score, sparsity, prunen, prunem, per_row=True)
        return Pruned(self.layer.weight.detach().masked_fill(~keep, 0), keep)


class SparseGPT(Pruner):
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1) for one `nn.Linear`.

    `H` (in, in) is the running mean 2/n · Σ x xᵀ over the n tokens seen, in float32 (the
    original counts sequences; a constant factor that changes nothing, the dampening being
    relative to mean(diag H)).

    `prune` follows the reference implementation: inputs that never fire (H_ii = 0) get
    H_ii = 1 and W_:i = 0; H += percdamp·mean(diag H)·I; U = the upper Cholesky factor of
    H⁻¹; columns are processed in blocks of `blocksize` with lazy OBS updates. The mask is
    chosen at the start of each block from the score w²/U_ii² over the whole block
    (rows × block columns), so rows may differ in sparsity; the block quotas are
    round(s·out·i₂) − round(s·out·i₁) for block [i₁, i₂), which makes **exactly
    round(s·out·in) weights of the matrix pruned**. With N:M, every group of `prunem`
    columns is chosen when the OBS sweep reaches it (`blocksize` must be a multiple of
    `prunem`), exactly `prunen` per group and row. Weights of dead inputs score 0, so they are
    pruned first; should a block hold more of them than its quota, the rest are 0 but kept.

    A Cholesky failure retries with the dampening ×10 (logged, up to 5 tries) and then raises
    HessianError; it never falls back to an identity Hessian.
    """

    options: ClassVar[tuple[str, ...]] = ("blocksize", "percdamp")

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__(layer)
        n_in = layer.in_features
        self.H = torch.zeros(n_in, n_in, device=layer.weight.device)  # (in, in) float32

    def add_batch(self, inp: torch.Tensor) -> None:
        x = self._tokens(inp)  # (tokens, in)
        n = x.shape[0]
        if n == 0:
            return
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        self.H.addmm_(x.T, x, alpha=2 / self.nsamples)  # += 2/n · Xᵀ X

    def prune(self, sparsity: float, prunen: int = 0, prunem: int = 0, *,
              blocksize: int = 128, percdamp: float = 0.01) -> Pruned:
        weight = self._weight(sparsity, prunen, prunem)  # (out, in)
        if not isinstance(blocksize, int) or blocksize <= 0 or (prunem and blocksize % prunem):
            raise ValueError(f"blocksize must be a positive int (a multiple of prunem for N:M); "
                             f"got blocksize={blocksize!r}, prunem={prunem}")
        if not percdamp > 0:
            raise ValueError(f"percdamp must be > 0; got {percdamp!r}")
        hessian = self.H.clone()  # (in, in); the accumulator stays reusable
        if not torch.isfinite(hessian).all():
            raise HessianError("SparseGPT: the Hessian has non-finite entries "
                               "(non-finite calibration inputs?)")
        dead = hessian.diagonal() == 0  # (in,) inputs that are always 0
        hessian[dead, dead] = 1
        weight[:, dead] = 0
        hinv = _inverse_cholesky(hessian, percdamp)  # (in, in) upper
        # transposed, so that a column of W (the unit of the OBS sweep) is a contiguous row:
        # its rank-1 updates run ~3x faster than on strided column views
        weight_t = weight.T.contiguous()  # (in, out)
        keep_t = torch.ones_like(weight_t, dtype=torch.bool)  # (in, out)
        rows, cols = weight.shape
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            quota = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            err_t = _obs_block(weight_t, hinv, keep_t, i1, i2, quota, prunen, prunem)  # (b, out)
            # lazy update of the later columns: W[:, i2:] -= Err · Hinv[i1:i2, i2:]
            weight_t[i2:].addmm_(hinv[i1:i2, i2:].T, err_t, alpha=-1)
        weight = weight_t.T.contiguous().to(self.layer.weight.dtype)  # (out, in)
        return Pruned(weight, keep_t.T.contiguous())


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (U ᵀU = (H + λI)⁻¹), λ = percdamp·mean(diag H),
    λ ×10 after each failed factorisation (logged); HessianError after `_DAMP_TRIES`."""
    mean_diag = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = percdamp
    for attempt in range(1, _DAMP_TRIES + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper
        if attempt < _DAMP_TRIES:
            log.warning("SparseGPT: Cholesky factorisation failed with dampening %.3g x "
                        "mean(diag H) (try %d of %d); retrying with %.3g", damp, attempt,
                        _DAMP_TRIES, damp * _DAMP_GROWTH)
        damp *= _DAMP_GROWTH
    raise HessianError(
        f"SparseGPT: the Hessian is not positive definite even with dampening "
        f"{damp / _DAMP_GROWTH:.3g} x mean(diag H) after {_DAMP_TRIES} tries; check the "
        f"calibration inputs or raise percdamp"
    )


def _obs_block(weight_t: torch.Tensor, hinv: torch.Tensor, keep_t: torch.Tensor, i1: int,
               i2: int, quota: int, prunen: int, prunem: int) -> torch.Tensor:
    """Prune columns [i1, i2) of W — rows of `weight_t` (in, out) — in place with sequential
    OBS updates inside the block (SparseGPT Alg. 1); writes the block's keep mask into
    `keep_t` (in, out); returns the scaled errors (b, out) for the lazy update."""
    block = weight_t[i1:i2].clone()  # (b, out): row j is column i1 + j of W
    hinv1 = hinv[i1:i2, i1:i2]  # (b, b) upper
    d = hinv1.diagonal()  # (b,)
    if prunem:
        pruned = torch.zeros_like(block, dtype=torch.bool)
    else:  # adaptive selection over the whole block (columns × rows of W), OBS score w²/d²
        score = block.square() / d.square()[:, None]  # (b, out)
        pruned = _prune_smallest(score.flatten(), quota).view_as(block)
    err = torch.zeros_like(block)  # (b, out)
    # the OBS sweep is a chain of small kernels (a rank-1 update of <= blocksize x out floats
    # per column: 14-85 us on one thread of an AMD EPYC for out = 576-11008); two threads on
    # shared cores made each 4.5-7.6 ms. Hessian, Cholesky and block updates keep the threads.
    with one_thread(block.device):
        for i in range(i2 - i1):
            if prunem and i % prunem == 0:  # the group's choice sees the updates so far
                group = block[i:i + prunem].square() / d[i:i + prunem].square()[:, None]
                pruned[i:i + prunem] = _prune_smallest(group.T, prunen).T  # group: (M, out)
            w = block[i]  # (out,)
            q = w.masked_fill(pruned[i], 0)
            err[i] = (w - q) / d[i]
            block[i + 1:].addr_(hinv1[i, i + 1:], err[i], alpha=-1)  # OBS update, later columns
            block[i] = q  # exactly 0 where pruned
    weight_t[i1:i2] = block
    keep_t[i1:i2] = ~pruned
    return err


PRUNERS: dict[str, type[Pruner]] = {"sparsegpt": SparseGPT, "wanda": Wanda,
                                    "magnitude": Magnitude}


# --- reports --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModulePruned:
    """One pruned `nn.Linear`: keep mask (out, in) bool, achieved sparsity (fraction of
    pruned weights) and its seconds accumulating statistics and solving `prune`."""

    mask: torch.Tensor
    sparsity: float
    stats_s: float
    solve_s: float


@dataclass(frozen=True)
class LayerPruned:
    """One pruned decoder layer: its modules by full module path and its time split
    (forward = the layer's forward passes without the statistics hooks' time)."""

    index: int
    path: str
    modules: dict[str, ModulePruned]
    forward_s: float
    stats_s: float
    solve_s: float

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights over all the layer's Linear weights."""
        pruned = sum(int((~m.mask).sum()) for m in self.modules.values())
        return pruned / sum(m.mask.numel() for m in self.modules.values())


@dataclass(frozen=True)
class PruneReport:
    """What `prune_layers` did: per requested layer index, and the total forward seconds
    (capture of the layer-0 inputs and every layer run, requested or not)."""

    method: str
    sparsity: float
    layers: dict[int, LayerPruned]
    forward_s: float

    def masks(self) -> dict[str, torch.Tensor]:
        """Keep masks keyed by parameter path (`<module>.weight`), as in the state dict."""
        return {f"{path}.weight": m.mask for layer in self.layers.values()
                for path, m in layer.modules.items()}

    @property
    def stats_s(self) -> float:
        return sum(layer.stats_s for layer in self.layers.values())

    @property
    def solve_s(self) -> float:
        return sum(layer.solve_s for layer in self.layers.values())


# --- the sequential driver ------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the capture hook to end the model's forward at decoder layer 0."""


@dataclass
class _Call:
    """One calibration batch at a decoder layer: its hidden states (B, T, d), the other call
    arguments exactly as the model passed them to layer 0, and the valid-token mask (B·T,)."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]
    valid: torch.Tensor | None


def prune_layers(
    model: nn.Module,
    layer_indices: Iterable[int],
    batches: Iterable[Mapping[str, torch.Tensor]],
    method: str = "sparsegpt",
    sparsity: float = 0.5,
    prunen: int = 0,
    prunem: int = 0,
    options: Mapping[str, Any] | None = None,
) -> PruneReport:
    """Prune the `nn.Linear` weights of the chosen decoder layers in place, sequentially.

    The sequential one-shot procedure of SparseGPT (Frantar & Alistarh 2023, §3) and Wanda
    (Sun et al. 2024, §3) as FedSpaLLM's clients run it on their sampled layers: the inputs
    of decoder layer 0 are captured from the model's own forward (`batches`: mappings with
    `input_ids` (B, T) and optionally `attention_mask` (B, T); other keys are not used), then
    layers 0 … max(layer_indices) run in order. A requested layer is run with statistics
    hooks on every `nn.Linear` inside it, each is pruned from those same inputs (`method` in
    `PRUNERS`, `options` = that pruner's extra options, e.g. SparseGPT's `blocksize`,
    `percdamp`), and the layer is re-run so that the next layer sees the pruned layer's
    outputs. Padding tokens (attention_mask 0) do not enter the statistics. Norms, biases,
    embeddings and the LM head are never touched. Runs under `torch.no_grad()` in eval mode
    (the training flag is restored on return); statistics and solves in float32. Magnitude
    pruning needs no statistics, so it runs no forward at all.

    Every argument is checked before a weight changes (ValueError naming it); a HessianError
    of SparseGPT leaves the layers pruned before it as they are.
    """
    pruner = _pruner_class(method, options or {})
    _check_pattern(sparsity, prunen, prunem)
    paths = _decoder_layers(model)
    wanted = _check_indices(layer_indices, len(paths))
    batches = _check_batches(batches)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            calls: list[_Call] = []  # stays empty for magnitude: no statistics, no forward
            forward_s = 0.0
            if pruner.needs_inputs:
                t0 = time.perf_counter()
                calls = _capture(model, model.get_submodule(paths[0]), batches)
                forward_s = time.perf_counter() - t0
            layers: dict[int, LayerPruned] = {}
            for index in bar(range(max(wanted) + 1), f"{method}: decoder layers", unit="layer"):
                layer = model.get_submodule(paths[index])
                if index in wanted:
                    pruned = _prune_layer(layer, index, paths[index], calls, pruner,
                                          sparsity, prunen, prunem, options or {})
                    forward_s += pruned.forward_s
                t0 = time.perf_counter()
                _advance(layer, calls)
                seconds = time.perf_counter() - t0 if calls else 0.0
                forward_s += seconds
                if index in wanted:  # the output pass counts towards the layer's forward
                    layers[index] = replace(pruned, forward_s=pruned.forward_s + seconds)
    finally:
        model.train(was_training)
    return PruneReport(method, sparsity, layers, forward_s)


def _pruner_class(method: str, options: Mapping[str, Any]) -> type[Pruner]:
    if method not in PRUNERS:
        raise ValueError(f"method must be one of {', '.join(PRUNERS)}; got {method!r}")
    cls = PRUNERS[method]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; "
                         f"it takes {list(cls.options) or 'none'}")
    return cls


def _decoder_layers(model: nn.Module) -> tuple[str, ...]:
    """Module paths of the decoder layers of a decoder-only model, in order."""
    stacks = describe(model).layers
    if "decoder" not in stacks or "encoder" in stacks:
        raise ValueError(f"prune_layers needs a decoder-only model; {type(model).__name__} "
                         f"has layer stacks {sorted(stacks) or 'none'}")
    return stacks["decoder"]


def _check_indices(layer_indices: Iterable[int], n_layers: int) -> set[int]:
    wanted = list(layer_indices)
    if not wanted:
        raise ValueError("layer_indices must name at least one decoder layer")
    for i in wanted:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers:
            raise ValueError(f"layer index {i!r} out of range: the model has {n_layers} "
                             f"decoder layers (0..{n_layers - 1})")
    return set(wanted)


def _check_batches(batches: Iterable[Mapping[str, torch.Tensor]]) -> list[dict]:
    found = [{k: b[k] for k in _BATCH_KEYS if k in b} for b in batches]
    if not found:
        raise ValueError("the calibration set is empty: pass at least one batch")
    for i, batch in enumerate(found):
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"calibration batch {i}: `input_ids` must be a non-empty "
                             f"(batch, tokens) tensor")
        mask = batch.get("attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"calibration batch {i}: `attention_mask` {tuple(mask.shape)} "
                             f"does not match `input_ids` {tuple(ids.shape)}")
    return found


def _capture(model: nn.Module, layer0: nn.Module, batches: list[dict]) -> list[_Call]:
    """Decoder layer 0's call arguments per batch, recorded by a pre-hook that stops the
    forward there: the rest is replayed to every layer as the model would pass it."""
    calls: list[_Call] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        calls.append(_Call(hidden, rest, kwargs, None))
        raise _Stop

    device = next(model.parameters()).device
    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            try:
                model(**batch, use_cache=False)
            except _Stop:
                pass
            else:
                raise RuntimeError("the model's forward did not call its decoder layer 0")
            mask = batch.get("attention_mask")
            calls[-1].valid = None if mask is None else mask.reshape(-1).bool()
    finally:
        handle.remove()
    return calls


def _run(layer: nn.Module, call: _Call) -> torch.Tensor:
    out = layer(call.hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers 5 layers return a tensor


def _advance(layer: nn.Module, calls: list[_Call]) -> None:
    """Replace every batch's hidden states by the layer's outputs (the next layer's inputs)."""
    for call in calls:
        call.hidden = _run(layer, call)


def _prune_layer(layer: nn.Module, index: int, path: str, calls: list[_Call],
                 pruner: type[Pruner], sparsity: float, prunen: int, prunem: int,
                 options: Mapping[str, Any]) -> LayerPruned:
    """Accumulate statistics of every Linear of `layer` on all batches, then prune each."""
    linears = {f"{path}.{name}": m for name, m in layer.named_modules()
               if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"decoder layer {path!r} has no nn.Linear modules to prune")
    for name, module in linears.items():  # before any weight changes
        try:
            _check_groups(module.in_features, prunem)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    accumulators = {name: pruner(m) for name, m in linears.items()}
    stats_s = dict.fromkeys(linears, 0.0)
    forward_s = 0.0
    if pruner.needs_inputs:
        t0 = time.perf_counter()
        _collect(layer, linears, accumulators, calls, stats_s)
        forward_s = time.perf_counter() - t0 - sum(stats_s.values())
    modules = {}
    for name, module in linears.items():
        t0 = time.perf_counter()
        weight, keep = accumulators[name].prune(sparsity, prunen, prunem, **options)
        module.weight.copy_(weight)
        solve_s = time.perf_counter() - t0
        modules[name] = ModulePruned(keep, int((~keep).sum()) / keep.numel(), stats_s[name],
                                     solve_s)
        del accumulators[name]  # free the Hessian
    return LayerPruned(index, path, modules, forward_s, sum(stats_s.values()),
                       sum(m.solve_s for m in modules.values()))


def _collect(layer: nn.Module, linears: dict[str, nn.Linear],
             accumulators: dict[str, Pruner], calls: list[_Call],
             stats_s: dict[str, float]) -> None:
    """Run `layer` on every batch with forward hooks that feed each Linear's valid-token
    inputs to its accumulator (timed into `stats_s`)."""
    current: list[_Call] = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            t0 = time.perf_counter()
            x = inputs[0].reshape(-1, inputs[0].shape[-1])  # (B·T, in)
            valid = current[0].valid
            accumulators[name].add_batch(x if valid is None else x[valid])
            stats_s[name] += time.perf_counter() - t0
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    try:
        for call in calls:
            current[:] = [call]
            _run(layer, call)
    finally:
        for handle in handles:
            handle.remove()
