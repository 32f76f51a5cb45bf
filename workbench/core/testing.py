"""Tiny random models and a byte tokenizer: real Hugging Face objects that build in milliseconds offline.

Used by the test suite, the notebooks' smoke mode and the benchmarks' `tiny` model.
"""
from __future__ import annotations

import torch
from torch import nn

from workbench.core.arch import ARCH_SPECS

TINY_FAMILIES = tuple(ARCH_SPECS)
BYTE_VOCAB = 258  # 256 byte tokens + <s> + </s>


def tiny_config(
    family: str = "llama",
    *,
    n_layers: int = 4,
    hidden: int = 48,
    n_heads: int = 6,
    n_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate: int = 96,
    vocab_size: int = 260,
    **extra,
):
    """A small config of a supported family with GQA by default (n_kv_heads=n_heads: MHA, 1: MQA).

    `vocab_size` must cover the byte tokenizer's 258 tokens (ids 256/257 are <s> and </s>).
    """
    import transformers  # deferred: transformers loads in seconds

    if vocab_size < BYTE_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is below {BYTE_VOCAB}: the byte tokenizer's ids 0–257 "
                         f"(256 bytes, <s>=256, </s>=257) must all exist; use vocab_size >= {BYTE_VOCAB}")

    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    if family not in classes:
        raise ValueError(f"family={family!r} is not supported; allowed: {sorted(classes)}")
    cls = getattr(transformers, classes[family])
    extra.setdefault("tie_word_embeddings", False)
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
        **extra,
    )


def tiny_model(family: str = "llama", *, seed: int = 0, **config_kwargs) -> nn.Module:
    """A freshly built, randomly initialised tiny causal LM (float32, eval mode), in milliseconds."""
    from transformers import AutoModelForCausalLM  # deferred: transformers loads in seconds

    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init makes weights tiny; widen them a little so outputs depend visibly on every unit.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    model.config.name_or_path = f"tiny-{family}"
    return model.eval()


def byte_tokenizer(merge_th: bool = True):
    """A real HF fast tokenizer over raw bytes (256 tokens + <s> + </s>, + "th"), for tiny models offline.

    The one BPE merge ("t" + "h" → id 258) makes it a tokenizer llama.cpp accepts (its byte-level BPE
    needs at least one merge), so tiny models export to GGUF; tiny models' vocab_size (260) covers it.
    `merge_th=False` gives the pure byte tokenizer (ids 0–257).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
    )  # deferred: tokenizers loads only for the tiny test tokenizer
    from transformers import PreTrainedTokenizerFast  # deferred: transformers loads in seconds

    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    # ByteLevel.alphabet() is unordered; map it to the 256 byte values in a fixed order.
    alphabet = sorted(byte_vocab)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = 256, 257
    merges = []
    if merge_th:
        vocab["th"], merges = 258, [("t", "h")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    return fast
