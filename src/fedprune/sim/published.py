"""Random-weight models of published configurations (AoH Table 4's backbones) for the
accounting rows of `fedprune suite backbones`: upload bytes and OPs depend on the shapes only,
so an untrained model of the published sizes measures them offline. Their task metrics mean
nothing and are reported as untrained.

Sizes are the hub models' own (layers, width, heads, FFN); the vocabulary is the bundled
MiniLM tokenizer's (30,522 WordPiece ids, [CLS] / [SEP] / [PAD] as BOS / EOS / PAD), so the
embeddings and the LM heads differ from the hub models' (the frozen backbone, not what AoH
trains or sends)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from fedprune.structure.model import minilm_path

# name -> (config class, the published sizes beside the class defaults, task kind)
PUBLISHED: dict[str, tuple[str, dict, str]] = {
    "distilbert-base": ("DistilBertConfig", {}, "classification"),
    "roberta-base": ("RobertaConfig", {"max_position_embeddings": 514}, "classification"),
    "gpt2": ("GPT2Config", {}, "causal_lm"),
    "t5-small": ("T5Config", {}, "seq2seq"),
    "t5-base": ("T5Config", {"d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12},
                "seq2seq"),
    "bart-base": ("BartConfig", {"d_model": 768, "encoder_layers": 6, "decoder_layers": 6,
                                 "encoder_attention_heads": 12, "decoder_attention_heads": 12,
                                 "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072,
                                 "forced_eos_token_id": None}, "seq2seq"),
}
# classification: the bare encoder, as a hub checkpoint (the task head is made per run)
_AUTO = {"classification": tf.AutoModel,
         "causal_lm": tf.AutoModelForCausalLM, "seq2seq": tf.AutoModelForSeq2SeqLM}


def published_model(name: str, out: Path) -> Path:
    """``out`` holding model ``name`` of `PUBLISHED` (random weights, seed 0) with the MiniLM
    tokenizer; made once, reused after."""
    if (out / "config.json").is_file():
        return out
    kind_config, sizes, kind = PUBLISHED[name]
    tok = tf.AutoTokenizer.from_pretrained(minilm_path())
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
           "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id,
           "decoder_start_token_id": (tok.pad_token_id if name.startswith("t5")
                                      else tok.sep_token_id)}
    config = getattr(tf, kind_config)(**ids, **sizes)
    torch.manual_seed(0)
    _AUTO[kind].from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
