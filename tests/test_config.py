"""Config: TOML + overrides, and every bad-config path gives an error naming the option."""

import dataclasses

import pytest

from fedprune.config import (
    SECTIONS,
    ConfigError,
    ExperimentConfig,
    from_dict,
    load_config,
    options_help,
)
from fedprune.methods import METHODS

ROOT = __import__("pathlib").Path(__file__).parents[1]


def test_default_config_file_loads():
    cfg = load_config(ROOT / "configs" / "fedavg.toml")
    assert cfg.model.name == "minilm" and cfg.peft.r == 16
    assert cfg.federation.num_clients == 10 and cfg.federation.clients_per_round == 2


def test_overrides_typed():
    cfg = load_config(None, ["federation.rounds=3", "peft.alpha=8", "model.name=gpt2",
                             'peft.target_modules=["q","v"]', "federation.lr=0.01"])
    assert cfg.federation.rounds == 3 and cfg.peft.alpha == 8
    assert cfg.model.name == "gpt2" and cfg.peft.target_modules == ["q", "v"]
    assert cfg.federation.lr == 0.01


@pytest.mark.parametrize("override,pattern", [
    ("federation.clients_per_round=11", r"`federation.clients_per_round`.*\[1, federation"),
    ("federation.num_clients=0", "`federation.num_clients`"),
    ("federation.rounds=0", "`federation.rounds`"),
    ("federation.lr=-1", "`federation.lr`"),
    ("federation.server_lr=0", "`federation.server_lr`"),
    ("federation.optimizer=adam", r"`federation.optimizer` = 'adam' is not allowed.*'adamw', 'sgd'"),
    ("federation.selection=best", "`federation.selection`.*'random'"),
    ("federation.min_valid_updates=3", "`federation.min_valid_updates`"),
    ("federation.batch_size=2.5", "`federation.batch_size`.*integer"),
    ("federation.rounds=true", "`federation.rounds`.*integer"),
    ("peft.r=0", "`peft.r`"),
    ("peft.dropout=1.0", "`peft.dropout`"),
    ("peft.method=adapters", "`peft.method` = 'adapters' is not allowed.*'prefix'"),
    ("peft.num_virtual_tokens=0", "`peft.num_virtual_tokens`"),
    ("peft.target_modules=[]", "`peft.target_modules`"),
    ("peft.target_modules=q", "`peft.target_modules`.*list"),
    ("data.val_fraction=1.5", "`data.val_fraction`"),
    ("data.max_length=2", "`data.max_length`"),
    ("partition.scheme=zipf", "`partition.scheme`.*'iid', 'dirichlet', 'shards'"),
    ("partition.alpha=0", "`partition.alpha`"),
    ("method.name=fedprox", ("`method.name` = 'fedprox' is not allowed; choose one of 'aoh', "
                            "'fedavg', 'fedspallm', 'prufed', 'random_heads'")),
    ("model.attn_implementation=flash", "`model.attn_implementation`"),
    ("run.seed=x", "`run.seed`.*integer"),
    ("federation.roundz=3", "unknown option `federation.roundz`.*rounds"),
    ("fed.rounds=3", r"unknown section \[fed\]"),
    ("rounds=3", "section.key=value"),
])
def test_bad_config_names_option(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml.*does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 2")
    with pytest.raises(ConfigError, match="bad.toml.*not valid TOML"):
        load_config(bad)


def test_every_option_documented():
    text = options_help()
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata["help"]
            assert f"{name}.{f.name} = " in text
    assert set(SECTIONS) | {"method"} == {f.name for f in dataclasses.fields(ExperimentConfig)}
    for name, method in METHODS.items():  # every method's own section, from the registry
        assert f"[method.{name}]" in text
        for f in dataclasses.fields(method.Config):
            assert f.metadata["help"] and f"method.{name}.{f.name} = " in text
    assert f"one of: {', '.join(repr(n) for n in METHODS)}" in text


def test_method_sections():
    cfg = load_config(ROOT / "configs" / "aoh.toml", ["method.aoh.sparsity=0.5"])
    assert cfg.method.name == "aoh" and cfg.method.own.sparsity == 0.5
    assert cfg.method.own.mode == "adapter" and cfg.method.own.importance_samples == 64
    assert set(cfg.method.options) == {"aoh"}
    plain = load_config(None)
    assert plain.method.name == "fedavg" and set(plain.method.options) == {"fedavg"}
    # another method's section is checked and kept, not used
    mixed = load_config(None, ["method.aoh.importance_samples=8"])
    assert mixed.method.name == "fedavg" and mixed.method.options["aoh"].importance_samples == 8
    assert mixed.to_dict()["method"] == {"name": "fedavg", "aoh": dataclasses.asdict(
        mixed.method.options["aoh"]), "fedavg": {}}
    assert from_dict(mixed.to_dict()) == mixed


@pytest.mark.parametrize("override,pattern", [
    ("method.sparsity=0.5",
     (r"`method.sparsity` is an option of a method's own section now: `method.aoh.sparsity` "
     r"or `method.fedspallm.sparsity` or `method.random_heads.sparsity`")),
    ("method.importance=after", r"`method.aoh.importance`$"),
    ("method.color=3", r"unknown option `method.color`.*\[method.aoh\]"),
    ("method.aoh.sparsity=1.0", r"`method.aoh.sparsity`: must be in \[0, 1\)"),
    ("method.random_heads.sparsity=-0.1", r"`method.random_heads.sparsity`"),
    ("method.aoh.speed=3", r"unknown option `method.aoh.speed`; options of \[method.aoh\]"),
    ("method.fedavg.x=1", r"unknown option `method.fedavg.x`; options of \[method.fedavg\] are none"),
    ("method.aoh.mode=fast", r"`method.aoh.mode` = 'fast' is not allowed"),
    ("method.aoh.importance_samples=-1", r"`method.aoh.importance_samples`"),
])
def test_method_section_errors_name_the_option(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, ["method.name=aoh", override])


def test_structural_after_is_refused():
    with pytest.raises(ConfigError, match="`method.aoh.importance`: 'after' needs"):
        load_config(None, ["method.name=aoh", "method.aoh.mode=structural",
                           "method.aoh.importance=after"])
