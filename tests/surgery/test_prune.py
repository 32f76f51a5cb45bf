"""The core invariant: a physically pruned model computes what the dense model computes with the
same units zeroed; plus costs, depth pruning, KV cache and save/reload."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from workbench.core.arch import EmptyBlock, layer_widths
from workbench.core.models import anatomy, parameter_count
from workbench.core.testing import tiny_model
from workbench.plans.plan import Plan, random_plan
from workbench.plans.selection import unit_costs
from workbench.surgery.checkpoints import load_model, load_plan, load_pruned, loads_with_plain_transformers, save_pruned
from workbench.surgery.prune import apply_plan, mask_plan

PLANS = {
    "partial": dict(fraction=0.4),
    "emptied_blocks": dict(fraction=0.3, empty_blocks=2),
    "removed_layer": dict(fraction=0.3, empty_blocks=1, remove_layers=1),
}


def _pair(family, plan_kind, seed):
    dense = tiny_model(family, n_layers=4, seed=seed)
    plan = random_plan(layer_widths(dense), seed=seed, **PLANS[plan_kind])
    zeroed = copy.deepcopy(dense)
    mask_plan(zeroed, plan)
    report = apply_plan(dense, plan)
    return zeroed, dense, plan, report


@pytest.mark.parametrize("plan_kind", list(PLANS))
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_equals_zeroed_dense(family, plan_kind, seed):
    zeroed, pruned, plan, report = _pair(family, plan_kind, seed)
    x = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, zeroed(x).logits, rtol=0, atol=1e-5)
    if plan_kind == "removed_layer":
        assert len(pruned.model.layers) == 3 and pruned.config.num_hidden_layers == 3
        assert [l.self_attn.layer_idx for l in pruned.model.layers] == [0, 1, 2]
    assert report.params_after == parameter_count(pruned) < report.params_before


@pytest.mark.parametrize("plan_kind", list(PLANS))
def test_generate_with_kv_cache_matches(family, plan_kind):
    zeroed, pruned, _, _ = _pair(family, plan_kind, 0)
    prompt = torch.randint(0, 256, (2, 6))
    kw = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=257)
    assert torch.equal(pruned.generate(prompt, **kw), zeroed.generate(prompt, **kw))


def test_emptied_first_attention_keeps_cache_positions():
    """Layer 0's cache is what `get_seq_length` reads: an emptied layer-0 attention must still count."""
    dense = tiny_model("llama", n_layers=3)
    widths = layer_widths(dense)
    plan = Plan.from_units(widths, {"attn": {0: [0, 1]}, "mlp": {2: list(range(50))}})
    zeroed = copy.deepcopy(dense)
    mask_plan(zeroed, plan)
    apply_plan(dense, plan)
    assert isinstance(dense.model.layers[0].self_attn, EmptyBlock)
    prompt = torch.randint(0, 256, (1, 7))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=257)
    assert torch.equal(dense.generate(prompt, **kw), zeroed.generate(prompt, **kw))


def test_unit_cost_equals_numel_drop(family):
    model = tiny_model(family, n_layers=3)
    costs = unit_costs(model)
    removed = {"attn": {0: [1], 2: [0]}, "mlp": {0: [3, 7, 9], 1: list(range(40))}}
    plan = Plan.from_units(layer_widths(model), removed)
    before = parameter_count(model)
    apply_plan(model, plan)
    expected = 2 * costs["attn"][0] + 3 * costs["mlp"][0] + 40 * costs["mlp"][1]
    assert before - parameter_count(model) == expected
    # the attention unit's cost, by hand: q and o (3 heads × 16) and k, v (16) against hidden 48, plus biases
    bias = (3 * 16 + 2 * 16) if family == "qwen2" else 0
    assert costs["attn"][0] == 2 * 3 * 16 * 48 + 2 * 16 * 48 + bias
    assert costs["mlp"][0] == 3 * 48


def test_module_shapes_follow_the_plan():
    model = tiny_model("qwen3", n_layers=2)
    plan = Plan.from_units(layer_widths(model), {"attn": {1: [0]}, "mlp": {0: list(range(10))}})
    apply_plan(model, plan)
    a = model.model.layers[1].self_attn
    assert (a.q_proj.out_features, a.k_proj.out_features, a.o_proj.in_features) == (48, 16, 48)
    assert a.q_norm.weight.shape == (16,)  # per-head norms are shared and stay
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (86, 48)
    assert model.config.pruned_layers == [
        dict(num_attention_heads=6, num_key_value_heads=2, intermediate_size=86),
        dict(num_attention_heads=3, num_key_value_heads=1, intermediate_size=96),
    ]
    df = anatomy(model)
    assert df[df.block == "attn"].kv_heads.tolist() == [2, 1]


def test_plan_for_another_model_is_refused():
    a, b = tiny_model("llama", n_layers=2), tiny_model("llama", n_layers=3)
    with pytest.raises(ValueError, match="plan was made for layer widths"):
        apply_plan(b, random_plan(layer_widths(a), 0.2))


def test_save_reload_heterogeneous_is_exact(tmp_path, family, tokenizer):
    _, pruned, plan, report = _pair(family, "removed_layer", 3)
    out = save_pruned(pruned, tmp_path / "ck", tokenizer=tokenizer, plan=plan, report=report)
    assert not loads_with_plain_transformers(pruned.config)
    cfg = json.loads((out / "config.json").read_text())
    assert len(cfg["pruned_layers"]) == cfg["num_hidden_layers"] == 3
    reloaded, tok = load_model(out)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, pruned(x).logits)
    assert layer_widths(reloaded) == layer_widths(pruned)
    assert load_plan(out).removed == plan.removed
    assert tok("abc")["input_ids"] == tokenizer("abc")["input_ids"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_uniform_plan_loads_with_plain_transformers(tmp_path):
    model = tiny_model("llama", n_layers=3, n_heads=8, n_kv_heads=4, hidden=64)  # 2 groups of 2 heads left
    plan = Plan.from_units(layer_widths(model), {"attn": {i: [0, 3] for i in range(3)},
                                                 "mlp": {i: list(range(i, 96, 4)) for i in range(3)}})
    apply_plan(model, plan)
    save_pruned(model, tmp_path / "ck")
    assert loads_with_plain_transformers(model.config)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    ours = load_pruned(tmp_path / "ck")
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(plain(x).logits, model(x).logits)
        assert torch.equal(ours(x).logits, model(x).logits)


def test_tied_embeddings_survive_save_and_reload(tmp_path):
    model = tiny_model("llama", n_layers=2, tie_word_embeddings=True)
    apply_plan(model, random_plan(layer_widths(model), 0.3))
    save_pruned(model, tmp_path / "ck")
    reloaded = load_pruned(tmp_path / "ck")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
