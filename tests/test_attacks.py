"""Simulated attackers (client/attacks.py, ``[attack]``): who is malicious, each attack's
transform by hand, ALIE's z from the paper's formula, a real run where every client flips its
sign (the global step is exactly the clean one reversed), and methods that cannot take an
attack say why."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedprune.client.attacks import alie_z, collude, malicious, poison
from fedprune.config import AttackConfig, ConfigError, load_config
from fedprune.methods import METHODS
from fedprune.methods.base import LocalResult
from fedprune.sim import runner


def test_malicious_clients_are_a_seeded_fraction():
    attack = AttackConfig(kind="scaling", fraction=0.2)
    bad = malicious(attack, 20, seed=3)
    assert len(bad) == 4 and bad == malicious(attack, 20, seed=3)
    assert bad != malicious(attack, 20, seed=4)
    assert malicious(AttackConfig(), 20, seed=3) == frozenset()


def result(values, alpha=None):
    return LocalResult({"w": torch.tensor(values)}, 0.5, 8, alpha or {})


def test_own_attacks_by_hand():
    r = result([1.0, -2.0, 0.0])
    assert poison(AttackConfig(kind="sign_flip"), r, 0).delta["w"].tolist() == [-1.0, 2.0, 0.0]
    assert poison(AttackConfig(kind="scaling", scale=3.0), r, 0).delta["w"].tolist() == [
        3.0, -6.0, 0.0]
    noisy = poison(AttackConfig(kind="noise", noise_std=0.5), result([1.0] * 20000 + [0.0]), 0)
    added = noisy.delta["w"][:-1] - 1.0
    assert abs(float(added.std()) - 0.5) < 0.02 and noisy.delta["w"][-1] == 0  # unowned: 0
    alpha = {"l.attn::head_weights": torch.tensor([0.0, 0.3, 0.7])}
    inflated = poison(AttackConfig(kind="alpha_inflation"), result([1.0], alpha), 0)
    assert inflated.extra["l.attn::head_weights"].tolist() == [0.0, 1.0, 1.0]  # kept heads
    assert poison(AttackConfig(kind="label_flip"), r, 0) is r  # it poisons the data instead


def test_colluding_attacks_by_hand():
    honest = [result([1.0, 3.0, 0.0]), result([3.0, 5.0, 0.0])]  # mean [2, 4], std [1, 1]
    mine = result([9.0, 9.0, 0.0])
    alie = collude(AttackConfig(kind="alie", alie_z=1.5), honest, mine, attackers=1)
    assert alie.delta["w"].tolist() == [0.5, 2.5, 0.0]  # the unowned coordinate stays 0
    ipm = collude(AttackConfig(kind="ipm", scale=0.5), honest, mine, attackers=1)
    assert ipm.delta["w"].tolist() == [-1.0, -2.0, 0.0]
    # Baruch et al.: n = 10, m = 2 -> s = floor(10/2 + 1) - 2 = 4, z = Phi^-1(6/10)
    assert alie_z(10, 2) == pytest.approx(0.253347, abs=1e-6)


SMALL = ["data.max_samples=96", "data.max_length=32", "federation.num_clients=4",
         "federation.clients_per_round=4", "federation.rounds=1", "federation.batch_size=8",
         "method.name='fedavg'"]


def test_every_client_flipping_its_sign_reverses_the_global_step(tmp_path):
    def run(name, *extra):
        cfg = load_config(None, [*SMALL, f"data.cache_dir='{tmp_path / 'cache'}'", *extra])
        return load_file(runner.run(cfg, tmp_path / name, progress=False)
                         / "global.safetensors")

    initial = METHODS["fedavg"].world(load_config(None, [
        *SMALL, f"data.cache_dir='{tmp_path / 'cache'}'"])).initial
    clean = run("clean")
    flipped = run("flipped", "attack.kind='sign_flip'", "attack.fraction=1.0")
    for k in clean:
        assert torch.allclose(flipped[k] - initial[k], -(clean[k] - initial[k]), atol=1e-7), k
    assert any(not torch.equal(clean[k], initial[k]) for k in clean)
    labels = run("labels", "attack.kind='label_flip'", "attack.fraction=0.5")
    alie = run("alie", "attack.kind='alie'", "attack.fraction=0.5")
    for poisoned in (labels, alie):
        assert any(not torch.equal(poisoned[k], clean[k]) for k in clean)


@pytest.mark.parametrize("overrides, pattern", [
    (["method.name='fedavg'", "attack.kind='alpha_inflation'"],
     "'alpha_inflation' with `method.name` = 'fedavg': its clients send no head weights"),
    (["method.name='prufed'", "attack.kind='label_flip'"], "needs a classification task"),
    (["method.name='prufed'", "attack.kind='ipm'"], "no common honest mean"),
    (["method.name='fedspallm'", "attack.kind='scaling'"], "pruned weights"),
])
def test_methods_that_cannot_take_an_attack_say_why(overrides, pattern):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=pattern):
        METHODS[cfg.method.name].check(cfg)


def test_bad_attack_options_and_collusion_on_flower():
    from fedprune.flower.settings import FlowerSettings
    from fedprune.flower.strategy import FedpruneStrategy

    with pytest.raises(ConfigError, match=r"`attack.fraction`: must be in \[0, 1\]"):
        load_config(None, ["attack.fraction=1.5"])
    with pytest.raises(ConfigError, match="`attack.kind`"):
        load_config(None, ["attack.kind='backdoor'"])
    with pytest.raises(ConfigError, match="in-process simulator only"):
        FedpruneStrategy(load_config(None, ["attack.kind='alie'"]), FlowerSettings())
