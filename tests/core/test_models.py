import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig

from workbench.core.arch import ARCH_SPECS, UnsupportedModelError, geometry, get_spec, layer_widths, spec_for_config
from workbench.core.models import anatomy, parameter_count
from workbench.core.testing import byte_tokenizer, tiny_config, tiny_model


def test_spec_and_geometry_per_family(family):
    m = tiny_model(family)
    spec = get_spec(m)
    assert spec.family == family
    geo = geometry(m.config)
    assert (geo.n_heads, geo.n_kv_heads, geo.head_dim, geo.gqa_ratio) == (6, 2, 16, 3)
    assert geo.qkv_bias == (family == "qwen2")
    layer = m.model.layers[0].self_attn
    assert (layer.q_proj.bias is not None) == geo.qkv_bias
    assert bool(spec.head_norms) == (family == "qwen3")
    assert layer_widths(m) == [(2, 96)] * 4


@pytest.mark.parametrize("kv", [6, 1])
def test_mha_and_mqa_variants(kv):
    m = tiny_model("llama", n_kv_heads=kv)
    assert layer_widths(m)[0] == (kv, 96)
    assert geometry(m.config).gqa_ratio == 6 // kv


def test_tiny_models_are_fresh_and_deterministic():
    a, b = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    assert a is not b
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb) and pa.data_ptr() != pb.data_ptr()


def test_unsupported_architecture_is_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'.*supported model types"):
        get_spec(gpt2)


def test_moe_config_is_refused_by_attribute():
    moe = MixtralConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                        intermediate_size=32, num_local_experts=4, vocab_size=50)
    with pytest.raises(UnsupportedModelError, match="model_type='mixtral'"):
        spec_for_config(moe)
    cfg = tiny_config("mistral")
    cfg.num_local_experts = 4  # a supported family carrying experts is caught by the attribute
    with pytest.raises(UnsupportedModelError, match="num_local_experts=4"):
        spec_for_config(cfg)


def test_fused_projection_is_refused_by_attribute():
    m = tiny_model("llama")
    attn = m.model.layers[0].self_attn
    del attn.q_proj  # a fused-qkv style module has no q_proj
    with pytest.raises(UnsupportedModelError, match="q_proj"):
        layer_widths(m)


def test_anatomy_counts_every_parameter(family):
    m = tiny_model(family)
    df = anatomy(m)
    per_layer = df.groupby("layer")["params"].sum()
    for i, layer in enumerate(m.model.layers):
        assert per_layer[i] == sum(p.numel() for p in layer.parameters())
    attn = df[df.block == "attn"].iloc[0]
    assert (attn.query_heads, attn.kv_heads) == (6, 2)
    assert df[df.block == "mlp"].mlp_width.tolist() == [96] * 4
    embed_and_head = parameter_count(m) - df.params.sum()
    assert embed_and_head == sum(p.numel() for n, p in m.named_parameters() if "layers" not in n)


def test_byte_tokenizer_round_trips():
    tok = byte_tokenizer()
    text = "def f(x):\n    return x ** 2  # é"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text


def test_registry_lists_the_four_families():
    assert set(ARCH_SPECS) == {"llama", "mistral", "qwen2", "qwen3"}
    with pytest.raises(ValueError, match="family='gpt2'"):
        tiny_config("gpt2")
