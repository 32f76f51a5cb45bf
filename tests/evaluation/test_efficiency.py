import pytest
import torch

from workbench.core.arch import layer_widths
from workbench.core.models import parameter_count
from workbench.evaluation.efficiency import (
    EfficiencyConfig,
    compare,
    kv_cache_bytes_per_token,
    kv_heads_per_layer,
    measure,
    parameter_breakdown,
)
from workbench.plans.plan import Plan
from workbench.surgery.checkpoints import save_pruned
from workbench.surgery.prune import apply_plan

SMALL = EfficiencyConfig(prompt_len=12, new_tokens=3, warmup=1, repeats=2)


def test_parameters_and_kv_cache_match_the_shapes(make_model, family, tmp_path):
    model = make_model(family, n_layers=3)  # 2 KV heads of head_dim 16 per layer, float32
    plan = Plan.from_units(layer_widths(model), {"attn": {0: [0], 2: [0, 1]}, "mlp": {1: list(range(30))}})
    apply_plan(model, plan)
    assert kv_heads_per_layer(model) == [1, 2, 0]
    assert kv_cache_bytes_per_token(model) == 2 * (1 + 2 + 0) * 16 * 4
    assert kv_cache_bytes_per_token(model, torch.bfloat16) == 2 * 3 * 16 * 2
    parts = parameter_breakdown(model)
    assert parts["total"] == parameter_count(model)
    assert parts["embeddings"] + parts["attn"] + parts["mlp"] + parts["norms"] == parts["total"]
    q, k = model.model.layers[1].self_attn.q_proj, model.model.layers[1].self_attn.k_proj
    assert parts["mlp"] == sum(p.numel() for l in model.model.layers for p in l.mlp.parameters())
    assert parts["attn"] >= q.weight.numel() + k.weight.numel()
    save_pruned(model, tmp_path / "ckpt")
    rec = measure(model, SMALL, checkpoint_dir=tmp_path / "ckpt")
    assert rec["kv_cache_bytes_measured"] == rec["kv_cache_bytes_per_token"] * rec["kv_cache_tokens"]
    assert rec["checkpoint_bytes"] > rec["weight_bytes"] * 0.9
    assert rec["prefill_ms"] > 0 and rec["decode_tokens_per_s"] > 0
    assert rec["peak_memory_kind"] == "process_peak_rss" and rec["peak_memory_bytes"] > rec["weight_bytes"]


def test_compare_puts_models_side_by_side(make_model):
    dense, pruned = make_model("qwen3"), make_model("qwen3")
    apply_plan(pruned, Plan.from_units(layer_widths(pruned), {"mlp": {i: list(range(48)) for i in range(4)}}))
    table = compare({"dense": dense, "pruned": pruned}, SMALL)
    assert list(table.columns) == ["dense", "pruned"]
    assert table.loc["params_mlp", "pruned"] == table.loc["params_mlp", "dense"] // 2
    assert table.loc["kv_cache_bytes_per_token", "pruned"] == table.loc["kv_cache_bytes_per_token", "dense"]


@pytest.mark.parametrize("kw", [dict(prompt_len=0), dict(repeats=0), dict(warmup=-1)])
def test_bad_settings_are_errors(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        EfficiencyConfig(**kw)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_static_cache_decoding_gives_the_loop_s_tokens_on_pruned_models(make_model, family):
    """transformers' static-cache `generate` (compiled by transformers on CUDA) on per-layer KV heads, emptied
    blocks (layer 0's attention included) and a removed layer: the same greedy tokens as our loop (float32)."""
    from workbench.evaluation.efficiency import greedy_tokens

    model = make_model(family, n_layers=5)
    plan = Plan.from_units(layer_widths(model), {"attn": {0: [0, 1], 2: [1], 3: [0, 1]},
                                                 "mlp": {1: list(range(96)), 3: list(range(96)), 4: list(range(40))}})
    apply_plan(model, plan)  # layer 3 removed
    prompt = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    loop = greedy_tokens(model, prompt, 12)
    assert loop.shape == (2, 12)
    assert torch.equal(greedy_tokens(model, prompt, 12, decode="static"), loop)
    rec = measure(model, EfficiencyConfig(prompt_len=12, new_tokens=3, warmup=1, repeats=2, decode="static"))
    assert rec["decode_ms_per_token"] >= 0 and rec["prefill_ms"] > 0 and rec["cfg_decode"] == "static"
    with pytest.raises(ValueError, match="decode='compiled'"):
        EfficiencyConfig(decode="compiled")
