"""The tokenizer of an exported GGUF file: carried unchanged from a source GGUF file, or written from a HF fast
tokenizer (byte-level BPE or SentencePiece-style), with llama.cpp's name for its pre-tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

# Pre-tokenizer patterns llama.cpp knows by name, recognised in a HF tokenizer (pre_tokenizer_name).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501


class ExportError(ValueError):
    """The model (or its tokenizer) cannot be written as a GGUF file llama.cpp would run correctly."""


def copy_gguf_tokenizer(writer, source: Path, n_vocab: int) -> None:
    import gguf  # deferred: only exports need the GGUF reader

    reader = gguf.GGUFReader(source)
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ExportError(f"{source} has no tokenizer (no tokenizer.ggml.tokens); pass a HF tokenizer instead")
    if len(tokens.data) != n_vocab:
        raise ExportError(f"{source}'s tokenizer has {len(tokens.data)} tokens but the model's embedding has "
                          f"{n_vocab} rows; they must match")
    for key, f in fields.items():
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for an HF pre-tokenizer it knows (its split regex decides how text is cut)."""
    text = json.dumps(pre or {})
    if json.dumps(_LLAMA3_SPLIT)[1:-1] in text:
        return "llama-bpe"
    if json.dumps(_QWEN2_SPLIT)[1:-1] in text:
        return "qwen2"
    steps = (pre or {}).get("pretokenizers") or [pre or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    return "default"


def write_hf_tokenizer(writer, tokenizer, n_vocab: int) -> list[str]:
    """Write a byte-level BPE HF tokenizer as llama.cpp's `gpt2` tokenizer; return notes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; pass tokenizer_gguf= "
                          "a GGUF file whose tokenizer to carry over")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise ExportError(f"tokenizer model {model.get('type')!r} (byte-level: {byte_level}) is not supported; only "
                          "byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen style) are written from HF; pass "
                          "tokenizer_gguf= a GGUF file whose tokenizer to carry over")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has only "
                          f"{n_vocab} rows")
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):  # ids the tokenizer never produces are padding, as llama.cpp's converter writes them
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(4)  # user-defined
        elif tok in added:
            tokens.append(tok)
            types.append(3 if added[tok].get("special") else 4)  # control / user-defined
        else:
            tokens.append(tok)
            types.append(1)  # normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # GGUF has no empty arrays, and llama.cpp refuses a gpt2 tokenizer without the merges key
        raise ExportError("the BPE tokenizer has no merges; llama.cpp's gpt2 tokenizer needs at least one "
                          "(pass tokenizer_gguf= a GGUF file whose tokenizer to carry over)")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    return [] if pre != "default" else ["the tokenizer's pre-tokenizer is not one llama.cpp names; llama.cpp will "
                                        "split text with its default rules (token ids fed directly are unaffected)"]


