"""The model a benchmark runs on: `tiny` (a random 8-layer GQA Llama), `default` (SmolLM2) or a path/hub id."""
import torch

from workbench.testing import byte_tokenizer, tiny_model
from workbench.checkpoints import load_model
from workbench.data import CalibrationConfig


def add_model_args(ap) -> None:
    ap.add_argument("--model", default="default", help="tiny | default | a directory, .gguf file or hub id")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")


def bench_model(args):
    if args.model == "tiny":
        model = tiny_model("llama", n_layers=8, hidden=256, n_heads=8, n_kv_heads=2, head_dim=32, intermediate=768)
        return model.to(device=args.device, dtype=getattr(torch, args.dtype)), byte_tokenizer()
    return load_model(None if args.model == "default" else args.model, dtype=args.dtype, device=args.device)


def add_calibration_args(ap, samples: int = 64) -> None:
    ap.add_argument("--samples", type=int, default=samples, help="calibration samples")
    ap.add_argument("--seq-len", type=int, default=128)


def calibration(args, num_samples: int | None = None) -> CalibrationConfig:
    """The calibration setting of `--samples` / `--seq-len` (or another sample count at the same length)."""
    return CalibrationConfig(num_samples=num_samples or args.samples, seq_len=args.seq_len)
