"""Tiny random Hugging Face Llama checkpoints (and a tokenizer) written to temporary folders."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROPE_VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    # Small original context so that positions < 256 reach the scaled regimes.
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def tiny_llama_config(
    *,
    num_kv_heads: int = 4,
    tie: bool = False,
    rope: str = "default",
    attention_bias: bool = False,
    vocab_size: int = 300,
    num_layers: int = 2,
) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
        attention_bias=attention_bias,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # Larger than Llama's 0.02 so attention is peaked and position-dependent:
        # otherwise a wrong RoPE would barely change the logits.
        initializer_range=0.15,
    )
    if ROPE_VARIANTS[rope] is not None:
        kwargs["rope_parameters"] = dict(ROPE_VARIANTS[rope], rope_theta=10_000.0)
    return LlamaConfig(**kwargs)


def save_tiny_llama(
    directory: Path,
    config: LlamaConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so their loading is tested
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                parameter.uniform_(0.5, 1.5)
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.02)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


def save_tiny_tokenizer(directory: Path, corpus: list[str], vocab_size: int = 300) -> None:
    """A byte-level BPE tokenizer trained in memory on `corpus` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.save_pretrained(directory)
