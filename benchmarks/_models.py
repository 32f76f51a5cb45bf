"""The model a benchmark runs on: whatever the one loader reads (`tiny`: the random 4-layer Llama of smoke mode,
`default`: SmolLM2, a path, a hub id, `experiment:NAME`), or `--shape NAME`: a randomly initialised Llama of a real
model's shape (transformers' own init), built directly on the device in the asked dtype (`llama3-8b` in bf16 needs
a GPU with ≥ 40 GiB)."""
import torch

from workbench.core.testing import byte_tokenizer
from workbench.data.text import CalibrationConfig
from workbench.surgery.checkpoints import load_model

# name -> (layers, hidden, query heads, KV heads, head size, MLP channels, vocabulary, tied embeddings)
SHAPES = {
    "llama3-8b": (32, 4096, 32, 8, 128, 14_336, 128_256, False),  # Llama-3-8B / 3.1-8B
    "llama3-1b": (16, 2048, 32, 8, 64, 8192, 128_256, True),  # Llama-3.2-1B
    "small": (8, 512, 8, 2, 64, 1536, 32_000, False),  # a quick run on a CPU
}


def shape_model(name: str, device: str, dtype: str):
    """A random Llama of one of `SHAPES`, built on `device` in `dtype` (no float32 copy on the way)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name not in SHAPES:
        raise ValueError(f"--shape {name!r} is not known; allowed: {list(SHAPES)}")
    layers, hidden, heads, kv, hd, ff, vocab, tied = SHAPES[name]
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=hd, intermediate_size=ff, vocab_size=vocab,
                         tie_word_embeddings=tied, rope_theta=500_000.0, max_position_embeddings=8192,
                         bos_token_id=256, eos_token_id=257, pad_token_id=257)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.config.name_or_path = f"random-{name}"
    return model.eval()


def add_model_args(ap) -> None:
    ap.add_argument("--model", default="default", help="tiny | default | a directory, .gguf file, hub id or "
                                                       "experiment:NAME (the one loader)")
    ap.add_argument("--shape", default=None, choices=list(SHAPES),
                    help="instead of --model: a random Llama of this shape (token ids from the byte tokenizer)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")


def bench_model(args):
    """(model, tokenizer) of `--shape` (a random Llama of that shape, byte tokenizer) or `--model` (`load_model`)."""
    if getattr(args, "shape", None):
        return shape_model(args.shape, args.device, args.dtype), byte_tokenizer()
    return load_model(args.model, dtype=args.dtype, device=args.device)


def add_calibration_args(ap, samples: int = 64) -> None:
    ap.add_argument("--samples", type=int, default=samples, help="calibration samples")
    ap.add_argument("--seq-len", type=int, default=128)


def add_eval_args(ap, extra: tuple[str, ...] = ()) -> None:
    ap.add_argument("--extra-sources", nargs="*", default=list(extra),
                    help="more evaluation sources (their evaluation parts), e.g. jargon: out of the calibration domain")


def calibration(args, num_samples: int | None = None) -> CalibrationConfig:
    """The calibration setting of `--samples` / `--seq-len` (or another sample count at the same length)."""
    return CalibrationConfig(num_samples=num_samples or args.samples, seq_len=args.seq_len)


def bare_pass(model, samples, batch_size: int) -> None:
    """Forward + backward on the LM loss over `samples`, nothing accumulated: what the importance pass costs
    at the least (call inside `only_prunable_grads` for the same frozen parameters)."""
    device = model.get_input_embeddings().weight.device
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size].to(device)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)


def measured(fn, device):
    """(result, seconds, peak bytes) of one call, synchronised on CUDA (`PeakMemory`: allocator peak on a GPU,
    process RSS on a CPU)."""
    import time

    from workbench.evaluation.efficiency import PeakMemory

    device = torch.device(device)
    with PeakMemory(device) as mem:
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
    return out, seconds, mem.peak
