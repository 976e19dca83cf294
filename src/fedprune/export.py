"""`fedprune export`: a run's final global model as folders the Hugging Face stack loads.

The global state of a run (``global.safetensors``) is keyed by fedprune's parameter paths,
which are the live model's own names: the peft model's for LoRA runs, the transformers
model's for FedSpaLLM. Export therefore rebuilds the run's world from its resolved config
(float32: the exported weights never pass through the bf16 compute copy), loads the state
into it with the same `load_state` the round loop uses, and lets the libraries write their
own formats:

* ``fedavg`` / ``random_heads`` / ``aoh``: a peft adapter folder (``PeftModel.save_pretrained``:
  adapter_config.json + adapter_model.safetensors with the LoRA tensors and the trained task
  head as modules_to_save), loadable by ``PeftModel.from_pretrained(base, OUT_DIR)``. Head
  pruning is per client and round during local training only; the server's global state is
  full-shaped and is evaluated with every head, so it is exported whole.
* ``fedspallm``: a full transformers model folder (the causal LM with the aggregated pruned
  decoder Linear weights, zeros stored densely) + tokenizer, ``AutoModelForCausalLM``-loadable.
* ``prufed``: one folder per tier (``tier<t>``): the tier's kept decoder layers only
  (config.num_hidden_layers = their count, renumbered 0..k-1) with the tier's adapters merged
  into the weights (peft ``merge_and_unload`` inside `structure.layers.layer_view`), a plain
  transformers model; plus ``full`` when no tier keeps every layer.

Every folder gets a model card README.md: method, base model, data, final metrics of the run's
metrics.jsonl, bytes and the resolved config.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import tomli_w
from safetensors.torch import load_file

from fedprune.client.train import load_state
from fedprune.client.world import GenerationWorld, cache_dir
from fedprune.config import ConfigError, ExperimentConfig, from_dict
from fedprune.core.update import State
from fedprune.methods import METHODS
from fedprune.report.metrics import read_metrics
from fedprune.structure import prefix
from fedprune.structure.layers import layer_view
from fedprune.structure.model import load_tokenizer, resolve, trainable_parameters


class ExportError(ValueError):
    """A run directory cannot be exported: a missing file, a method without an exporter, an
    output folder in the way, or a global state that does not fit the configured model."""


@dataclass(frozen=True)
class Run:
    """What export reads of a run directory."""

    path: Path
    cfg: ExperimentConfig
    state: State
    records: list[dict[str, Any]]


@dataclass
class Card:
    """One exported folder and what its model card says beyond the run's own figures."""

    folder: Path
    kind: str                                  # e.g. "peft LoRA adapter"
    metrics: dict[str, float]                  # final metrics of this model
    notes: list[str] = field(default_factory=list)
    load: str = ""                             # Python that loads it; FOLDER = its path


# --- reading a run --------------------------------------------------------------------------


def read_config(run_dir: Path) -> ExperimentConfig:
    """The run's resolved config: config.json, else config.toml; errors name the file."""
    for name, parse in (("config.json", json.loads), ("config.toml", tomllib.loads)):
        path = run_dir / name
        if path.is_file():
            try:
                return from_dict(parse(path.read_text()), source=str(path))
            except (ConfigError, ValueError) as e:
                raise ExportError(f"{path}: {e}") from None
    raise ExportError(f"{run_dir}: no config.json or config.toml; is it a run directory?")


def read_run(run_dir: Path) -> Run:
    """Config, final global state and metrics of a finished run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    cfg = read_config(run_dir)
    weights = run_dir / "global.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights} does not exist: the run has not finished (resume it "
                          f"with `fedprune run {run_dir / 'config.toml'} --out {run_dir} "
                          f"--resume`)")
    return Run(run_dir, cfg, load_file(weights), read_metrics(run_dir))


def export_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The run's config with float32 compute: the world export rebuilds keeps the
    pretrained weights at full precision."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                              compute_dtype="float32"))


def load_into(params: dict[str, Any], state: State, run: Run) -> None:
    """`load_state` after checking that ``state`` names exactly the model's tensors, with
    their shapes (a state of another model is an error naming the run)."""
    missing, extra = set(params) - set(state), set(state) - set(params)
    wrong = [k for k in set(params) & set(state) if params[k].shape != state[k].shape]
    if missing or extra or wrong:
        example = sorted(missing)[:1] + sorted(extra)[:1] + sorted(wrong)[:1]
        raise ExportError(f"{run.path / 'global.safetensors'} does not fit the model its config "
                          f"builds ({len(missing)} tensors missing, {len(extra)} unknown, "
                          f"{len(wrong)} of another shape, e.g. {example})")
    load_state(params, state)


# --- final figures --------------------------------------------------------------------------


def final_record(run: Run) -> dict[str, Any]:
    """The last record holding the method's target metric ({} when none does)."""
    target = METHODS[run.cfg.method.name].scoring(run.cfg.data.task)[1]
    return next((r for r in reversed(run.records) if r.get(target) is not None), {})


def scalar_metrics(record: dict[str, Any], suffix: str = "") -> dict[str, float]:
    """Numeric metrics of a record (not round or timings); with ``suffix`` (PruFed's
    "_tier1") only those ending in it, without it only the unsuffixed ones."""
    skip = {"round", "wall_s", "eval_s"}
    out = {}
    for key, value in record.items():
        if key in skip or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if suffix and key.endswith(suffix):
            out[key.removesuffix(suffix)] = float(value)
        elif not suffix and "_tier" not in key:
            out[key] = float(value)
    return out


# --- exporters: (run, output folder) -> cards -----------------------------------------------

CAUSAL_LM = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             "model = AutoModelForCausalLM.from_pretrained(FOLDER)\n"
             "tokenizer = AutoTokenizer.from_pretrained(FOLDER)")


PEFT_KINDS = {"lora": ("LoRA", "LoRA tensors"), "ia3": ("IA3", "IA3 scaling vectors"),
              "prompt": ("prompt tuning", "prompt-tuning embeddings"),
              "prefix": ("prefix tuning", "prefix key/value embeddings")}  # (name, what it saves)


AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification",
                "causal_lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM"}


def export_peft(run: Run, out: Path) -> list[Card]:
    """FedAvg / B2 / AoH runs (a classifier, or a `data.task` generation model): the rebuilt
    model with the global state loaded writes itself — a peft adapter folder (LoRA, IA3,
    prompt tuning), or under full fine-tuning a whole transformers model."""
    cfg = export_config(run.cfg)
    fed = METHODS[cfg.method.name].world(cfg)
    load_into(fed.params, run.state, run)
    task = ("classification" if not isinstance(fed, GenerationWorld) else
            "seq2seq" if fed.model.config.is_encoder_decoder else "causal_lm")
    auto = AUTO_CLASSES[task]
    labels = dict(enumerate(fed.label_names))
    full = cfg.peft.method == "full"
    if full and labels:  # the folder is the model: its config names the labels
        fed.model.config.id2label = labels
        fed.model.config.label2id = {v: k for k, v in labels.items()}
    fed.model.save_pretrained(out)  # peft: adapter_config.json + adapter_model.safetensors
    load_tokenizer(resolve(cfg.model.name, cache_dir(cfg))).save_pretrained(out)
    head = " and the trained classification head (peft modules_to_save)" if labels else ""
    notes = [*([f"Labels (id -> name): {labels}."] if labels else
               [(f"Generation task `{cfg.data.task}` ({task}): prompts as fedprune built "
                 f"them (fedprune.data.tasks), greedy decoding.")]),
             "Every weight of the final global model (full fine-tuning), float32." if full else
             f"{PEFT_KINDS[cfg.peft.method][1]}{head} of the final global model, float32."]
    if cfg.method.name in ("aoh", "random_heads"):
        o = cfg.method.own
        notes.append(f"Head pruning (sparsity {o.sparsity}, mode {o.mode}) acted per client and "
                     f"round during local training only; the server's global model, evaluated "
                     f"by fedprune with every attention head, is exported whole (no slices "
                     f"zeroed): it computes what the run's metrics measured.")
    if full:
        load = (f"from transformers import {auto}, AutoTokenizer\n\n"
                f"model = {auto}.from_pretrained(FOLDER).eval()\n"
                f"tokenizer = AutoTokenizer.from_pretrained(FOLDER)")
        kind = "transformers model (full fine-tuning)"
    else:
        base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        extra = f", num_labels={len(labels)}, id2label={labels}" if labels else ""
        ours = getattr(fed.model, prefix.FLAG, False)  # the prefix runs in our attention
        attention = ", attn_implementation='fedprune'" if ours else ""
        load = "\n".join([
            "from peft import PeftModel",
            f"from transformers import {auto}, AutoTokenizer",
            *(["from fedprune.structure import describe  # registers 'fedprune' attention",
               "from fedprune.structure.prefix import install"] if ours else []), "",
            f"base = {auto}.from_pretrained(", f"    {base!r}{extra}{attention})",
            "model = PeftModel.from_pretrained(base, FOLDER).eval()",
            *(["install(model, describe(model))"] if ours else []),
            "tokenizer = AutoTokenizer.from_pretrained(FOLDER)"])
        if ours:
            notes.append("peft 0.21 cannot run prefix tuning on a sequence classifier (it "
                         "passes the prefix as past_key_values, which this forward does not "
                         "declare): fedprune's attention adds the prefixes, so the code below "
                         "needs fedprune installed.")
        kind = f"peft {PEFT_KINDS[cfg.peft.method][0]} adapter"
    return [Card(out, kind, scalar_metrics(final_record(run)), notes, load)]


def export_pruned(run: Run, out: Path) -> list[Card]:
    """FedSpaLLM: the causal LM with the aggregated pruned decoder weights loaded."""
    cfg = export_config(run.cfg)
    fed = METHODS[cfg.method.name].world(cfg)
    load_into(fed.params, run.state, run)
    fed.model.save_pretrained(out)
    load_tokenizer(resolve(cfg.model.name, cache_dir(cfg))).save_pretrained(out)
    shares = [float((w == 0).float().mean()) for w in run.state.values()]
    pruned = [s for s in shares if s > 0]
    zeros = sum(int((w == 0).sum()) for w in run.state.values())
    total = sum(w.numel() for w in run.state.values())
    o = cfg.method.own
    notes = [f"Pruned with {o.pruner} at target sparsity {o.sparsity} ({o.pattern}); "
             f"{zeros:,} of {total:,} decoder Linear weights are zero ({zeros / total:.4f}); "
             f"{len(pruned)} of {len(shares)} matrices pruned"
             + (f", {min(pruned):.4f}–{max(pruned):.4f} zeros each" if pruned else "")
             + " (layers no client sampled stay dense).",
             ("Zeros are stored densely (float32 safetensors): the folder is as large as the "
             "dense model; sparse kernels or compression are what turn them into savings.")]
    return [Card(out, "transformers causal LM (pruned)", scalar_metrics(final_record(run)),
                 notes, CAUSAL_LM)]


def save_layer_model(model: Any, kept: tuple[int, ...], values: State, out: Path) -> None:
    """Save the model of decoder layers ``kept`` with LoRA values ``values`` (global keys)
    merged in, as a plain transformers folder. Works on a copy: the shared model keeps its
    adapters."""
    model = copy.deepcopy(model)
    load_state(trainable_parameters(model), values)
    with layer_view(model, kept):  # config.num_hidden_layers = len(kept), layers renumbered
        merged = model.merge_and_unload()
        merged.save_pretrained(out)


def export_tiers(run: Run, out: Path) -> list[Card]:
    """PruFed: per tier its kept layers with its adapters merged (the model its metrics
    were measured on: `PruFed.evaluate`), and the full-depth model when no tier is one."""
    cfg = export_config(run.cfg)
    kind = METHODS[cfg.method.name]
    fed = kind.world(cfg)
    method = kind(cfg, fed)
    if set(run.state) != set(method.initial_state()):
        raise ExportError(f"{run.path / 'global.safetensors'} does not hold the adapters the "
                          f"config's tiers need")
    tokenizer = fed.tokenizer
    record = final_record(run)
    models = [(f"tier{t}", kept, {key: run.state[method.state_keys[t][local]]
                                  for local, key in method.local_keys[t].items()},
               scalar_metrics(record, f"_tier{t}")) for t, kept in enumerate(method.kept)]
    every = tuple(range(method.num_layers))
    if every not in method.kept:
        models.append(("full", every, method.full_values(run.state), scalar_metrics(record)))
    cards = []
    for name, kept, values, metrics in models:
        folder = out / name
        save_layer_model(fed.model, kept, values, folder)
        tokenizer.save_pretrained(folder)
        notes = [(f"Decoder layers {list(kept)} of the base model's {method.num_layers} "
                 f"(global indices), renumbered 0..{len(kept) - 1}; config.num_hidden_layers "
                 f"= {len(kept)}."),
                 (f"LoRA (r={cfg.peft.r}, alpha={cfg.peft.alpha}, on {cfg.peft.target_modules}) "
                 f"merged into the weights (peft merge_and_unload); float32.")]
        kind = f"{name}: transformers causal LM, {len(kept)} of {method.num_layers} layers"
        cards.append(Card(folder, kind, metrics, notes, CAUSAL_LM))
    return cards


EXPORTERS: dict[str, Callable[[Run, Path], list[Card]]] = {
    "fedavg": export_peft, "random_heads": export_peft, "aoh": export_peft,
    "fedspallm": export_pruned, "prufed": export_tiers,
}


# --- model card -----------------------------------------------------------------------------


def _data_line(cfg: ExperimentConfig) -> str:
    name, o = cfg.method.name, cfg.method.own
    if name == "fedspallm":
        return (f"calibration text `{o.calibration}` ({o.samples} sequences of {o.seq_len} "
                f"tokens per client); perplexity on {o.eval_samples} held-out sequences of "
                f"the bundled books' test parts")
    if name == "prufed":
        return (f"instruction task `{o.task}` ({o.samples} examples per client, "
                f"{o.eval_samples} held out)")
    d = cfg.data
    return (f"`{d.task or d.dataset}` (max_samples {d.max_samples or 'all'}, max_length {d.max_length}, "
            f"validation fraction {d.val_fraction}), partition `{cfg.partition.scheme}`")


def _bytes(folder: Path) -> tuple[int, list[str]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "README.md")
    return sum(p.stat().st_size for p in files), [f"`{p.name}` {p.stat().st_size:,}"
                                                   for p in files]


def model_card(run: Run, card: Card, folder: Path) -> str:
    """README.md of an exported folder (``folder``: where it will live)."""
    cfg, records = run.cfg, run.records
    f = cfg.federation
    total, files = _bytes(card.folder)
    rnd = final_record(run).get("round")
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in card.metrics.items()) or "none recorded"
    ups = [b for r in records for b in r.get("bytes_up", [])]
    downs = [b for r in records for b in r.get("bytes_down", [])]
    traffic = (f"- communication of the run: {mean(ups):,.0f} bytes up and {mean(downs):,.0f} "
               f"down per selected client and round; {sum(ups) + sum(downs):,} in all"
               if ups else "- communication of the run: not recorded")
    own = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg.method.own).items())
    where = resolve_name(cfg)
    env = run.path / "environment.json"
    dtype = json.loads(env.read_text()).get("compute_dtype") if env.is_file() else None
    notes = list(card.notes)
    if dtype not in (None, "float32"):
        notes.append(f"The run computed in {dtype} (its metrics above); the exported float32 "
                     f"weights can score slightly differently.")
    lines = [
        f"# `{run.path.name}`: {card.kind}", "",
        f"Exported by `fedprune export` from the run directory `{run.path.resolve()}`.", "",
        f"- method: **{cfg.method.name}**" + (f" (`[method.{cfg.method.name}]` {own})"
                                               if own else ""),
        f"- base model: `{cfg.model.name}`" + (f" (`{where}`)" if where != cfg.model.name
                                               else ""),
        f"- data / task: {_data_line(cfg)}",
        (f"- federation: {f.num_clients} clients, {f.clients_per_round} per round, "
        f"{records[-1]['round'] if records else 0} of {f.rounds} rounds, seed {cfg.run.seed}"),
        f"- final metrics (round {rnd}, from metrics.jsonl): {metrics}",
        f"- files ({total:,} bytes): {', '.join(files)}",
        traffic, *[f"- {n}" for n in notes], "",
        "## Load", "", "```python", f"FOLDER = {str(folder.resolve())!r}", card.load, "```",
        "",
        "## Resolved config of the run", "", "```toml", tomli_w.dumps(cfg.to_dict()).strip(),
        "```", "",
    ]
    return "\n".join(lines)


def resolve_name(cfg: ExperimentConfig) -> str:
    """Where `model.name` resolved on this machine (bundled models: their folder)."""
    try:
        return resolve(cfg.model.name, cache_dir(cfg))
    except Exception:  # noqa: BLE001 - only shown in the card
        return cfg.model.name


# --- the command ----------------------------------------------------------------------------


def readable(folder: Path) -> None:
    """Files the libraries wrote through private temp files (mode 0600) get the usual mode
    (0666 less the umask), so that an export can be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def check_output(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"output folder {out_dir} exists and is not empty; choose a new one")


def export_run(run_dir: Path, out_dir: Path) -> list[Path]:
    """Export run ``run_dir`` into ``out_dir`` (new or empty); returns the model folders.
    Written into a temporary sibling folder and renamed at the end, so a failed export
    leaves nothing behind."""
    out_dir = Path(out_dir)
    check_output(out_dir)
    run = read_run(Path(run_dir))
    exporter = EXPORTERS.get(run.cfg.method.name)
    if exporter is None:
        raise ExportError(f"{run.path}: method {run.cfg.method.name!r} has no exporter; "
                          f"exportable: {', '.join(EXPORTERS)}")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cards = exporter(run, tmp)
        final = [out_dir / card.folder.relative_to(tmp) for card in cards]
        for card, folder in zip(cards, final, strict=True):
            (card.folder / "README.md").write_text(model_card(run, card, folder))
        readable(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
