"""Tests for fedprune.client.pruners (FedSpaLLM's local one-shot pruners and their driver).

Expected values are worked out by hand in this file, or come from independent references:
SparseGPT's sequential OBS sweep redone in float64 from explicit sub-Hessian solves (no
Cholesky factor), a tiny random Llama's own forward (hooks on the full model), and the real
bundled SmolLM2 for the reconstruction-error ordering of the three methods.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

from fedprune.client.pruners import (
    PRUNERS,
    HessianError,
    Magnitude,
    SparseGPT,
    Wanda,
    prune_layers,
)
from fedprune.structure.model import smollm2_path

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linear(weight: list[list[float]] | torch.Tensor) -> nn.Linear:
    w = torch.as_tensor(weight, dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def random_case(rows: int, cols: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) * torch.linspace(0.2, 3.0, cols)  # (tokens, in)
    return linear(w), x


def fed(cls, layer: nn.Linear, x: torch.Tensor):
    pruner = cls(layer)
    pruner.add_batch(x)
    return pruner


# --- independent reference for SparseGPT ----------------------------------------------------


def sparsegpt_reference(w: torch.Tensor, x: torch.Tensor, sparsity: float, blocksize: int,
                        prunen: int = 0, prunem: int = 0, percdamp: float = 0.01):
    """SparseGPT's result in float64 without a Cholesky factor: U_jj² = [H_{F_j}⁻¹]_jj with
    F_j = {j, …, in-1}; pruning weight p of a row sets it to 0 and moves the later weights by
    the OBS optimum H_{>p,>p}⁻¹ H_{>p,p} w_p (earlier weights fixed), column after column."""
    w = w.double().clone()
    rows, cols = w.shape
    h = 2 * x.double().T @ x.double() / x.shape[0]
    h += percdamp * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    u2 = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)])  # (in,)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if not prunem:
            quota = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            score = (w[:, i1:i2] ** 2 / u2[i1:i2]).flatten()  # OBS: w² / [H_F⁻¹]_jj
            chosen = torch.sort(score, stable=True).indices[:quota]
            block = torch.ones(score.numel(), dtype=torch.bool)
            block[chosen] = False
            keep[:, i1:i2] = block.view(rows, i2 - i1)
        for j in range(i1, i2):
            for r in range(rows):
                if prunem and (j - i1) % prunem == 0:
                    group = w[r, j:j + prunem] ** 2 / u2[j:j + prunem]
                    keep[r, j + torch.sort(group, stable=True).indices[:prunen]] = False
                if not keep[r, j]:
                    if j + 1 < cols:
                        w[r, j + 1:] += torch.linalg.solve(h[j + 1:, j + 1:], h[j + 1:, j]) * w[r, j]
                    w[r, j] = 0
    return w, keep


# --- Wanda and magnitude by hand ------------------------------------------------------------


W_2x4 = [[1.0, -2.0, 3.0, -4.0],
         [4.0, 3.0, -2.0, 1.0]]
X_2x4 = torch.tensor([[1.0, 0.0, 2.0, 0.0],
                      [1.0, 1.0, 0.0, 0.0]])  # (tokens, in): ‖X_j‖² = 2, 1, 4, 0


def test_wanda_scores_and_mask_by_hand():
    pruner = fed(Wanda, linear(W_2x4), X_2x4)
    # running mean over the 2 tokens of x_j²
    assert torch.allclose(pruner.scaler_row, torch.tensor([1.0, 0.5, 2.0, 0.0]))
    # scores |W|·‖X_j‖ (up to the constant 1/√2): row 0 = √2, 2, 6, 0; row 1 = 4√2, 3, 4, 0
    # -> row 0 prunes inputs 3 and 0, row 1 prunes inputs 3 and 1
    weight, keep = pruner.prune(0.5)
    assert keep.tolist() == [[False, True, True, False], [True, False, True, False]]
    assert weight.tolist() == [[0.0, -2.0, 3.0, 0.0], [4.0, 0.0, -2.0, 0.0]]


def test_wanda_running_mean_over_batches_equals_one_batch():
    layer, x = random_case(3, 6, 10)
    one = fed(Wanda, layer, x)
    many = Wanda(layer)
    for part in (x[:1], x[1:7], x[7:].reshape(1, 3, 6)):  # 2-D and (B, T, in) batches
        many.add_batch(part)
    assert many.nsamples == 10
    assert torch.allclose(one.scaler_row, many.scaler_row)
    assert torch.allclose(one.scaler_row, x.square().mean(0))


def test_magnitude_per_matrix_by_hand():
    # |W| = 1 2 3 4 / 4 3 2 1: the four smallest are the 1s and 2s
    weight, keep = Magnitude(linear(W_2x4)).prune(0.5)
    assert keep.tolist() == [[False, False, True, True], [True, True, False, False]]
    assert weight.tolist() == [[0.0, 0.0, 3.0, -4.0], [4.0, 3.0, 0.0, 0.0]]


def test_pruners_return_the_layer_dtype_and_leave_the_layer_alone():
    layer, x = random_case(4, 8, 16)
    layer = layer.to(torch.bfloat16)
    before = layer.weight.detach().clone()
    for cls in PRUNERS.values():
        weight, keep = fed(cls, layer, x).prune(0.5)
        assert weight.dtype == torch.bfloat16 and weight.shape == (4, 8)
        assert keep.dtype == torch.bool and keep.shape == (4, 8)
        assert torch.equal(layer.weight, before)


# --- exact sparsity and N:M -----------------------------------------------------------------


def test_exact_counts_at_an_odd_shape():
    layer, x = random_case(7, 12, 40)  # numel 84; s = 0.3 -> 25.2 -> 25 per matrix, 3.6 -> 4 per row
    _, keep = fed(Magnitude, layer, x).prune(0.3)
    assert int((~keep).sum()) == 25
    _, keep = fed(Wanda, layer, x).prune(0.3)
    assert (~keep).sum(1).tolist() == [4] * 7
    # blocks of 5 columns: quotas round(0.3·7·i2) - round(0.3·7·i1) = 10, 11, 4 -> 25
    weight, keep = fed(SparseGPT, layer, x).prune(0.3, blocksize=5)
    assert int((~keep).sum()) == 25
    assert [int((~keep[:, i:i + 5]).sum()) for i in (0, 5, 10)] == [10, 11, 4]
    assert torch.equal(weight == 0, ~keep)


@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_n_of_m_pattern_holds_in_every_group(method, n, m):
    layer, x = random_case(6, 16, 48)
    weight, keep = fed(PRUNERS[method], layer, x).prune(n / m, n, m)
    pruned_per_group = (~keep).reshape(6, 16 // m, m).sum(-1)  # (out, in/M)
    assert torch.equal(pruned_per_group, torch.full_like(pruned_per_group, n))
    assert torch.equal(weight == 0, ~keep)


def test_pruners_reject_bad_patterns():
    layer, x = random_case(4, 6, 8)
    for cls in PRUNERS.values():
        pruner = fed(cls, layer, x)
        for bad in (0, 1, 1.5, -0.1):
            with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
                pruner.prune(bad)
        with pytest.raises(ValueError, match="sparsity=0.3"):
            pruner.prune(0.3, 1, 2)
        with pytest.raises(ValueError, match="0 < prunen < prunem"):
            pruner.prune(0.5, 2, 0)
        with pytest.raises(ValueError, match="in_features divisible by prunem"):
            pruner.prune(0.5, 2, 4)  # 6 inputs
    with pytest.raises(ValueError, match="blocksize"):
        fed(SparseGPT, *random_case(4, 8, 8)).prune(0.5, 2, 4, blocksize=6)


# --- SparseGPT against references -----------------------------------------------------------


@pytest.mark.parametrize("blocksize", [4, 6, 128])
def test_sparsegpt_matches_the_sequential_obs_reference(blocksize):
    layer, x = random_case(5, 16, 64, seed=1)
    weight, keep = fed(SparseGPT, layer, x).prune(0.5, blocksize=blocksize)
    want_w, want_keep = sparsegpt_reference(layer.weight.detach(), x, 0.5, blocksize)
    assert torch.equal(keep, want_keep)
    assert torch.allclose(weight.double(), want_w, atol=1e-4)


def test_sparsegpt_n_of_m_matches_the_sequential_obs_reference():
    layer, x = random_case(5, 16, 64, seed=2)
    weight, keep = fed(SparseGPT, layer, x).prune(0.5, 2, 4, blocksize=8)
    want_w, want_keep = sparsegpt_reference(layer.weight.detach(), x, 0.5, 8, 2, 4)
    assert torch.equal(keep, want_keep)
    assert torch.allclose(weight.double(), want_w, atol=1e-4)


def test_sparsegpt_with_an_identity_hessian_is_magnitude_pruning():
    # X = I: H = 2/n·I, so U is diagonal and constant: scores ∝ w², and no OBS update moves a
    # kept weight; with one block the choice is magnitude's over the whole matrix
    layer, _ = random_case(6, 10, 1)
    pruner = fed(SparseGPT, layer, torch.eye(10))
    weight, keep = pruner.prune(0.4, blocksize=128)
    want_w, want_keep = Magnitude(layer).prune(0.4)
    assert torch.equal(keep, want_keep)
    assert torch.allclose(weight, want_w)


def test_sparsegpt_prunes_dead_inputs_first():
    layer, x = random_case(4, 8, 32)
    x[:, [2, 5]] = 0  # inputs 2 and 5 never fire
    weight, keep = fed(SparseGPT, layer, x).prune(0.25)  # 8 of 32: exactly the dead columns
    assert (~keep).nonzero()[:, 1].unique().tolist() == [2, 5]
    assert torch.equal(weight == 0, ~keep)


def test_sparsegpt_cholesky_failure_raises_the_dampening_and_logs(caplog):
    pruner = SparseGPT(linear([[1.0, 2.0]]))
    pruner.H = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4 and -2: indefinite
    pruner.nsamples = 1
    with caplog.at_level(logging.WARNING, logger="fedprune"):
        weight, keep = pruner.prune(0.5)
    # dampening 0.01, 0.1 and 1 (x mean diag = 1) leave it indefinite; 10 works
    retries = [r for r in caplog.records if "Cholesky" in r.getMessage()]
    assert len(retries) == 3 and all(r.name == "fedprune" for r in retries)
    assert "retrying with 10" in retries[-1].getMessage()
    assert int((~keep).sum()) == 1 and torch.isfinite(weight).all()


def test_sparsegpt_gives_up_with_a_clear_error(caplog):
    pruner = SparseGPT(linear([[1.0, 2.0]]))
    pruner.H = torch.tensor([[1.0, 1e6], [1e6, 1.0]])  # needs a dampening of ~1e6
    pruner.nsamples = 1
    with caplog.at_level(logging.WARNING, logger="fedprune"), \
            pytest.raises(HessianError, match="not positive definite"):
        pruner.prune(0.5)
    assert len([r for r in caplog.records if "Cholesky" in r.getMessage()]) == 4


# --- the driver on a tiny random Llama ------------------------------------------------------


def tiny_llama(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
        attention_bias=True, mlp_bias=True,  # biases must stay untouched
    )).eval()


def tiny_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two batches; the second right-padded (attention_mask 0 on its last 5 tokens)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return [{"input_ids": torch.randint(0, 96, (3, 12), generator=g)},
            {"input_ids": torch.randint(0, 96, (2, 12), generator=g), "attention_mask": mask}]


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_driver_prunes_only_the_linear_weights_of_the_requested_layers(method):
    model = tiny_llama()
    model.train()  # the driver runs in eval mode and gives the flag back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_layers(model, [0, 2], tiny_batches(), method, 0.5)
    assert model.training
    after = model.state_dict()
    pruned = {f"model.layers.{i}.{name}.weight" for i in (0, 2) for name in LINEARS}
    for key, value in after.items():
        assert torch.equal(value, before[key]) == (key not in pruned), key
    masks = report.masks()
    assert set(masks) == pruned
    for key, keep in masks.items():
        assert keep.dtype == torch.bool and keep.shape == after[key].shape
        assert torch.equal(after[key] == 0, ~keep), key
        assert torch.equal(after[key][keep], before[key][keep]) == (method != "sparsegpt")
    assert set(report.layers) == {0, 2}
    for layer in report.layers.values():
        assert layer.sparsity == 0.5
        assert all(m.sparsity == 0.5 for m in layer.modules.values())
        assert layer.solve_s > 0
        # magnitude needs no statistics, hence no forward pass
        assert (layer.forward_s > 0) == (layer.stats_s > 0) == (method != "magnitude")
    assert (report.forward_s > 0) == (method != "magnitude")


def test_driver_statistics_are_the_models_own_layer_inputs():
    """The replayed call (rotary embeddings, padding mask, position ids) gives each Linear of
    layer 1 the inputs it sees in the model's own forward; padding tokens are left out."""
    model = tiny_llama()
    batches = tiny_batches()
    reference = {name: Wanda(model.get_submodule(f"model.layers.1.{name}")) for name in LINEARS}
    handles = []
    for name, pruner in reference.items():
        def hook(module, inputs, output, pruner=pruner):
            pruner.add_batch(inputs[0][valid])
        handles.append(model.get_submodule(f"model.layers.1.{name}").register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            model(**batch)
    for handle in handles:
        handle.remove()
    want = {f"model.layers.1.{name}.weight": p.prune(0.5).mask for name, p in reference.items()}
    report = prune_layers(model, [1], batches, "wanda", 0.5)
    assert report.masks().keys() == want.keys()
    for key, keep in report.masks().items():
        assert torch.equal(keep, want[key]), key


def test_driver_is_sequential():
    """Layer 2 is calibrated on the outputs of the already pruned layer 0: one call over
    [0, 2] equals a call over [0] followed by a call over [2]."""
    together, apart = tiny_llama(), tiny_llama()
    prune_layers(together, [2, 0], tiny_batches(), "sparsegpt", 0.5)
    prune_layers(apart, [0], tiny_batches(), "sparsegpt", 0.5)
    prune_layers(apart, [2], tiny_batches(), "sparsegpt", 0.5)
    for key, value in together.state_dict().items():
        assert torch.allclose(value, apart.state_dict()[key], atol=1e-6), key


def test_driver_n_of_m_and_options():
    model = tiny_llama()
    report = prune_layers(model, [1], tiny_batches(), "sparsegpt", 0.5, 2, 4,
                          options={"blocksize": 32, "percdamp": 0.05})
    for keep in report.masks().values():
        per_group = (~keep).reshape(keep.shape[0], -1, 4).sum(-1)
        assert torch.equal(per_group, torch.full_like(per_group, 2))


def test_driver_rejects_bad_input():
    model, batches = tiny_llama(), tiny_batches()
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
        prune_layers(model, [0], batches, "wanda", 1.0)
    with pytest.raises(ValueError, match="N:M pruning 2:4 makes sparsity 0.5"):
        prune_layers(model, [0], batches, "wanda", 0.6, 2, 4)
    with pytest.raises(ValueError, match="calibration set is empty"):
        prune_layers(model, [0], [], "wanda", 0.5)
    with pytest.raises(ValueError, match=r"layer index 3 out of range.*3 decoder layers"):
        prune_layers(model, [0, 3], batches, "wanda", 0.5)
    with pytest.raises(ValueError, match="layer_indices"):
        prune_layers(model, [], batches, "wanda", 0.5)
    with pytest.raises(ValueError, match="method must be one of sparsegpt, wanda, magnitude"):
        prune_layers(model, [0], batches, "obs", 0.5)
    with pytest.raises(ValueError, match="unknown option"):
        prune_layers(model, [0], batches, "wanda", 0.5, options={"blocksize": 64})
    with pytest.raises(ValueError, match="input_ids"):
        prune_layers(model, [0], [{"attention_mask": torch.ones(1, 4)}], "wanda", 0.5)
    bert = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=100))
    with pytest.raises(ValueError, match="decoder-only"):
        prune_layers(bert, [0], batches, "wanda", 0.5)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                       tiny_llama().model.layers[0].self_attn.q_proj.weight)  # untouched


# --- the real SmolLM2 -----------------------------------------------------------------------


SMOLLM2_LAYER = 4


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path(Path.home() / ".cache" / "fedprune")
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    text = " ".join((Path(__file__).parent / "data" / "emma_excerpt.txt").read_text().split())
    ids = tokenizer(" ".join([text] * 3), return_tensors="pt").input_ids[0]
    # 8 sequences x 128 tokens, each starting at a different place of the (repeated) excerpt
    ids = torch.stack([ids[i * 128:(i + 1) * 128] for i in range(8)])
    return model, [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}]


def test_smollm2_reconstruction_error_sparsegpt_below_wanda_below_magnitude(smollm2):
    model, batches = smollm2
    layer = model.model.layers[SMOLLM2_LAYER]
    modules = {name: layer.get_submodule(name) for name in LINEARS}
    dense = {name: m.weight.detach().clone() for name, m in modules.items()}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in LINEARS}
    handles = [m.register_forward_hook(
        lambda mod, inp, out, name=name: inputs[name].append(inp[0].reshape(-1, inp[0].shape[-1])))
        for name, m in modules.items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    x = {name: torch.cat(parts) for name, parts in inputs.items()}  # (tokens, in)

    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        t0 = time.perf_counter()
        report = prune_layers(model, [SMOLLM2_LAYER], batches, method, 0.5)
        seconds = time.perf_counter() - t0
        assert report.layers[SMOLLM2_LAYER].sparsity == pytest.approx(0.5, abs=1e-9)
        # Σ over the layer's Linear modules of ‖W X − Ŵ X‖_F on the layer's calibration inputs
        errors[method] = sum(
            torch.linalg.matrix_norm(x[name] @ (dense[name] - m.weight.detach()).T).item()
            for name, m in modules.items())
        print(f"{method}: reconstruction error {errors[method]:.2f} in {seconds:.1f} s")
        with torch.no_grad():
            for name, m in modules.items():
                m.weight.copy_(dense[name])
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]
