import json

import pytest
import torch

from workbench.core.arch import layer_widths
from workbench.core.testing import tiny_model
from workbench.plans.plan import Plan
from workbench.recovery.finetune import FinetuneConfig, finetune, instruction_examples, load_instructions, text_examples
from workbench.surgery.checkpoints import load_pruned, save_pruned
from workbench.surgery.prune import apply_plan


def _pruned_model(seed=0):
    """A tiny Llama pruned unevenly: layers of different widths and an emptied attention block."""
    model = tiny_model("llama", n_layers=3, seed=seed)
    plan = Plan.from_units(layer_widths(model), {"attn": {0: [1], 2: [0, 1]}, "mlp": {0: list(range(40)), 1: [3, 5]}})
    apply_plan(model, plan)
    return model, plan


def _cfg(**kw):
    base = dict(seq_len=32, batch_size=4, max_steps=6, warmup_steps=1, lr=5e-3, eval_every=3, save_every=100,
                val_fraction=0.02, lora_r=4)
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.slow
def test_lora_on_pruned_model_trains_merges_saves_and_reloads(tmp_path, tokenizer):
    model, plan = _pruned_model()
    widths_before = layer_widths(model)
    res = finetune(model, tokenizer, _cfg(max_steps=30, eval_every=10), tmp_path / "ckpt", progress=False,
                   log=lambda *_: None)
    assert res.completed and res.steps == 30 and len(res.history) == 30 and list(res.evals.step) == [0, 10, 20, 30]
    h = res.history.loss
    assert h.iloc[-5:].mean() < h.iloc[:5].mean() - 0.3, h.tolist()
    assert res.evals.eval_loss.iloc[-1] < res.evals.eval_loss.iloc[0]
    merged = res.model
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert layer_widths(merged) == widths_before
    assert res.trainable_params < sum(p.numel() for p in merged.parameters()) / 5
    save_pruned(merged, tmp_path / "model", tokenizer=tokenizer, plan=plan)
    reloaded = load_pruned(tmp_path / "model")
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, merged(x).logits)
    # training changed the weights the adapters sat on
    fresh, _ = _pruned_model()
    with torch.no_grad():
        assert not torch.equal(fresh(x).logits, merged(x).logits)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_stopped_run_resumes_bit_for_bit(tmp_path, tokenizer, method):
    quiet = dict(progress=False, log=lambda *_: None)
    cfg = _cfg(method=method, lora_dropout=0.1, grad_accum=2)
    straight = finetune(_pruned_model()[0], tokenizer, cfg, tmp_path / "a", **quiet)
    first = finetune(_pruned_model()[0], tokenizer, cfg, tmp_path / "b", stop_after=3, **quiet)
    assert not first.completed and first.steps == 3 and (tmp_path / "b" / "state.pt").exists()
    resumed = finetune(_pruned_model()[0], tokenizer, cfg, tmp_path / "b", **quiet)
    assert resumed.completed and resumed.steps == 6 and len(resumed.history) == 6
    assert resumed.history.loss.tolist() == straight.history.loss.tolist()
    assert resumed.evals.eval_loss.tolist() == straight.evals.eval_loss.tolist()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lr"):
        finetune(_pruned_model()[0], tokenizer, _cfg(method=method, lora_dropout=0.1, grad_accum=2, lr=1e-3),
                 tmp_path / "b", **quiet)


def test_instruction_data_masks_the_prompt(tmp_path, tokenizer):
    path = tmp_path / "inst.jsonl"
    recs = [dict(instruction=f"Add {i} and {i}.", input="" if i % 2 else "numbers", output=str(2 * i)) for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = load_instructions(str(path))
    assert records[3]["output"] == "6"
    data = instruction_examples(tokenizer, records, seq_len=400, train_on_inputs=False)
    learned = data.labels[3][data.labels[3] != -100].tolist()
    assert learned == tokenizer("6", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = int(data.attention_mask[3].sum())
    assert data.input_ids[3][n - 1] == tokenizer.eos_token_id and (data.labels[3][n:] == -100).all()
    full = instruction_examples(tokenizer, records, seq_len=400, train_on_inputs=True)
    assert (full.labels[0][: full.attention_mask[0].sum()] == full.input_ids[0][: full.attention_mask[0].sum()]).all()
    res = finetune(_pruned_model()[0], tokenizer, _cfg(data=str(path), seq_len=400, max_steps=2, val_fraction=0.2),
                   tmp_path / "ck", progress=False, log=lambda *_: None)
    assert res.completed and res.config["train_examples"] + res.config["val_examples"] == 12
    with pytest.raises(ValueError, match="fields"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "x"}) + "\n")
        load_instructions(str(bad))


def test_text_data_uses_the_calibration_part_only(tokenizer):
    from workbench.data.text import token_stream

    data = text_examples(tokenizer, "pydoc", 64)
    cal = token_stream(tokenizer, "pydoc", "calibration")
    assert torch.equal(data.input_ids.reshape(-1), cal[: data.input_ids.numel()])
    assert data.source == "pydoc:calibration"


@pytest.mark.parametrize("kw,match", [(dict(method="qlora"), "method='qlora'"), (dict(schedule="step"), "schedule"),
                                      (dict(warmup_steps=6), "warmup_steps=6"), (dict(max_grad_norm=0), "max_grad_norm"),
                                      (dict(val_fraction=1.0), "val_fraction")])
def test_bad_settings_are_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)
