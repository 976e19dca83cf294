"""Server optimizers (core/server_opt.py): hand-computed steps, lazy unowned coordinates,
Flower's own FedAvgM / FedAdagrad / FedYogi / FedAdam on the same inputs, and a real run that
resumes bit-identically."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from safetensors.torch import load_file

from fedprune.config import ConfigError, load_config
from fedprune.core.aggregate import owned_mean, ownership
from fedprune.core.server_opt import ServerOpt, server_step
from fedprune.core.update import ClientUpdate
from fedprune.sim import runner

X = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
ALL = {"w": torch.tensor([True, True])}


def step(name, proposed, moments=None, owned=ALL, **kw):
    opt = ServerOpt(name, lr=kw.pop("lr", 0.1), beta1=0.5, beta2=0.75, tau=0.25, **kw)
    return server_step(opt, X, {"w": torch.tensor(proposed, dtype=torch.float64)}, owned,
                       moments or {})


def test_fedadam_two_steps_by_hand():
    # delta = (0.5, -1): m = 0.5 * delta = (0.25, -0.5); v = 0.25 * delta^2 = (0.0625, 0.25)
    # x = x + 0.1 * m / (sqrt(v) + 0.25) = (1 + 0.1 * 0.25 / 0.5, 2 - 0.1 * 0.5 / 0.75)
    new, mom = step("fedadam", [1.5, 1.0])
    assert new["w"].tolist() == pytest.approx([1.05, 2 - 0.05 / 0.75])
    assert mom["m::w"].tolist() == [0.25, -0.5] and mom["v::w"].tolist() == [0.0625, 0.25]
    assert int(mom["t::w"]) == 1
    # second step from the same x with delta = (1, 0): m = (0.625, -0.25),
    # v = 0.75 v + 0.25 delta^2 = (0.296875, 0.1875)
    new, mom = step("fedadam", [2.0, 2.0], mom)
    m, v = np.array([0.625, -0.25]), np.array([0.296875, 0.1875])
    assert new["w"].tolist() == pytest.approx((np.array([1.0, 2.0]) + 0.1 * m / (
        np.sqrt(v) + 0.25)).tolist(), rel=1e-6)
    assert int(mom["t::w"]) == 2


def test_yogi_adagrad_avgm_first_and_second_moment_by_hand():
    _, mom = step("fedadagrad", [1.5, 1.0], {"m::w": torch.zeros(2), "v::w": torch.ones(2)})
    assert mom["v::w"].tolist() == [1.25, 2.0]  # v + delta^2
    _, mom = step("fedyogi", [1.5, 1.0], {"m::w": torch.zeros(2),
                                          "v::w": torch.tensor([1.0, 0.5])})
    # v - (1 - b2) d^2 sign(v - d^2): (1 - .25*.25*1, .5 - .25*1*sign(-.5)) = (0.9375, 0.75)
    assert mom["v::w"].tolist() == [0.9375, 0.75]
    new, mom = step("fedavgm", [1.5, 1.0], {"m::w": torch.tensor([2.0, 2.0]),
                                           "t::w": torch.tensor(1)}, lr=1.0)
    # m = 0.5 * m + delta = (1.5, 0); x + m
    assert mom["m::w"].tolist() == [1.5, 0.0] and new["w"].tolist() == [2.5, 2.0]


def test_bias_correction_scales_the_first_step():
    plain, _ = step("fedadam", [1.5, 1.0])
    corrected, _ = step("fedadam", [1.5, 1.0], bias_correction=True)
    scale = math.sqrt(1 - 0.75) / (1 - 0.5)  # t = 1
    assert ((corrected["w"] - X["w"]) / (plain["w"] - X["w"])).tolist() == pytest.approx(
        [scale, scale])


def test_unowned_coordinates_keep_weight_and_moments():
    moments = {"m::w": torch.tensor([0.5, 0.5]), "v::w": torch.tensor([1.0, 1.0]),
               "t::w": torch.tensor(3)}
    owned = {"w": torch.tensor([True, False])}
    # the proposal is x at an unowned coordinate of "keep" methods; FedSpaLLM's may be 0
    new, mom = step("fedadam", [1.5, 0.0], moments, owned)
    assert new["w"][1] == 0.0 and mom["m::w"][1] == 0.5 and mom["v::w"][1] == 1.0
    assert new["w"][0] != 1.5 and mom["m::w"][0] == 0.5 * 0.5 + 0.5 * 0.5
    new, mom = step("fedadam", [1.0, 2.0], moments, owned={})  # nobody owned "w"
    assert torch.equal(new["w"], X["w"]) and mom is not moments and mom == moments


def test_ownership_follows_weights_and_keymaps():
    state = {"a": torch.zeros(2, 3), "b": torch.zeros(2), "g.b": torch.zeros(2)}
    heads = ClientUpdate(0, {"a": torch.ones(2, 3)}, 5, 0.1,
                         weights={"a": torch.tensor([[1.0], [0.0]])})
    renamed = ClientUpdate(1, {"local.b": torch.ones(2)}, 5, 0.1, keymap={"local.b": "g.b"})
    owned = ownership(state, [heads, renamed])
    assert set(owned) == {"a", "g.b"}
    assert owned["a"].expand(2, 3).tolist() == [[True] * 3, [False] * 3]
    assert bool(owned["g.b"])


def fit_res(arrays, n):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {})


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedyogi", "fedadam"])
def test_equals_flowers_strategies(name):
    rng = np.random.default_rng(0)
    x0 = [rng.normal(size=(3, 4)), rng.normal(size=5)]
    kw = {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.9, "tau": 0.01}
    flower = {"fedavgm": lambda: FedAvgM(initial_parameters=ndarrays_to_parameters(x0),
                                         server_learning_rate=0.05, server_momentum=0.8),
              "fedadagrad": lambda: FedAdagrad(initial_parameters=ndarrays_to_parameters(x0),
                                               eta=0.05, tau=0.01),  # its beta_1 is 0
              "fedyogi": lambda: FedYogi(initial_parameters=ndarrays_to_parameters(x0), **kw),
              "fedadam": lambda: FedAdam(initial_parameters=ndarrays_to_parameters(x0),
                                         **kw)}[name]()
    opt = ServerOpt(name, lr=0.05, beta1=0.0 if name == "fedadagrad" else 0.8, beta2=0.9,
                    tau=0.01,
                    bias_correction=name == "fedadam")  # Flower's FedAdam corrects
    keys = ["k0", "k1"]
    state = {k: torch.tensor(a) for k, a in zip(keys, x0, strict=True)}
    moments, theirs = {}, x0
    for rnd in (1, 2):
        clients = [[a + rng.normal(scale=0.1, size=a.shape) for a in theirs] for _ in range(3)]
        sizes = [3, 5, 8]
        # FedAvgM takes the initial weights from the server's current parameters each round
        flower.initial_parameters = ndarrays_to_parameters(theirs)
        # Flower's FedAdam raises beta to server_round + 1: its round r is our step t = r + 1
        flower_round = rnd - 1 if name == "fedadam" else rnd
        out, _ = flower.aggregate_fit(flower_round, [(None, fit_res(c, n))
                                                     for c, n in zip(clients, sizes,
                                                                     strict=True)], [])
        theirs = parameters_to_ndarrays(out)
        updates = [ClientUpdate(i, {k: torch.tensor(a) - state[k] for k, a in zip(
            keys, c, strict=True)}, n, 0.0) for i, (c, n) in enumerate(zip(clients, sizes,
                                                                             strict=True))]
        proposed = owned_mean(state, updates)
        state, moments = server_step(opt, state, proposed, ownership(state, updates), moments)
        for k, a in zip(keys, theirs, strict=True):
            np.testing.assert_allclose(state[k].numpy(), a, rtol=1e-5, atol=1e-7)


def test_config_errors_name_the_option():
    for bad, key in (("federation.server_beta1=1.0", "server_beta1"),
                     ("federation.server_beta2=-0.1", "server_beta2"),
                     ("federation.server_tau=0", "server_tau"),
                     ("federation.server_optimizer='adam'", "server_optimizer")):
        with pytest.raises(ConfigError, match=f"federation.{key}"):
            load_config(None, [bad])


SMALL = ["data.max_samples=160", "data.max_length=48", "federation.num_clients=4",
         "federation.clients_per_round=2", "federation.batch_size=16",
         "federation.eval_batch_size=64", "federation.server_optimizer='fedadam'",
         "federation.server_lr=0.01"]


def test_fedadam_run_moves_and_resumes_bit_identically(tmp_path):
    method = "aoh"  # per-head weights: some coordinates are unowned in a round
    def cfg(rounds):
        return load_config(None, [*SMALL, f"data.cache_dir='{tmp_path / 'cache'}'",
                                  f"method.name='{method}'", f"federation.rounds={rounds}"])

    straight = runner.run(cfg(2), tmp_path / "s", progress=False)
    runner.run(cfg(1), tmp_path / "r", progress=False)
    resumed = runner.run(cfg(2), tmp_path / "r", resume=True, progress=False)
    a, b = load_file(straight / "global.safetensors"), load_file(resumed / "global.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("server_opt::") for k in a)
    plain = load_config(None, [*SMALL[:-2], f"data.cache_dir='{tmp_path / 'cache'}'",
                               f"method.name='{method}'", "federation.rounds=2"])
    fedavg = load_file(runner.run(plain, tmp_path / "p", progress=False) / "global.safetensors")
    assert any(not torch.equal(a[k], fedavg[k]) for k in a)  # the optimizer did something


class SumModel(torch.nn.Module):
    """loss = sum(w) for every batch: its gradient is 1, so FedProx's pull is visible."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"loss": self.w.sum() + 0 * input_ids.sum()})()


@pytest.mark.parametrize("mu, expected", [(0.0, -0.2), (2.0, -0.18)])
def test_fedprox_pull_by_hand(mu, expected):
    from fedprune.client.train import LocalTrainSpec, local_train

    model = SumModel()
    rows = [{"input_ids": torch.tensor([1]), "attention_mask": torch.tensor([1])}] * 2

    def collate(batch):
        return {k: torch.stack([r[k] for r in batch]) for k in batch[0]}

    params = {"w": model.w}
    spec = LocalTrainSpec(epochs=1, batch_size=1, lr=0.1, optimizer="sgd", prox_mu=mu)
    frozen = {"w": torch.tensor([False, True, False])}
    local_train(model, params, rows, [0, 1], collate, spec, seed=0, frozen=frozen)
    # step 1: grad 1 (w = w_start); step 2: grad 1 + mu * (-0.1); the frozen entry never moves
    assert model.w.detach().tolist() == pytest.approx([1 + expected, 2.0, 3 + expected])


def test_prox_mu_must_be_nonnegative():
    with pytest.raises(ConfigError, match="federation.prox_mu"):
        load_config(None, ["federation.prox_mu=-1"])
