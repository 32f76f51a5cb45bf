"""GGUF export, proven in llama.cpp itself: its logits and greedy tokens equal the workbench model's."""
import json

import gguf
import numpy as np
import pytest
import torch

from workbench.core.arch import decoder_layers, get_spec, layer_widths
from workbench.core.testing import byte_tokenizer, tiny_model
from workbench.deploy import gguf as gguf_export
from workbench.deploy import llamacpp
from workbench.deploy.gguf import export_gguf, gguf_layout
from workbench.deploy.gguf_tokenizer import ExportError
from workbench.plans.plan import Plan
from workbench.runs.cli import main
from workbench.surgery.checkpoints import save_pruned
from workbench.surgery.prune import add_output_bias, apply_plan

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama.cpp binding not installed (make setup)")
PROMPT = list(range(3, 60))
PLAN_KINDS = ("dense", "uniform", "uniform_bias", "per_layer_mlp", "per_layer", "per_layer_bias", "first_attn_empty")
QWEN2_KINDS = ("dense", "uniform", "uniform_bias", "per_layer_mlp")  # the rest prune Qwen2's biased attention


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _model(family: str, kind: str, **kw):
    """A tiny model pruned by a plan of `kind`: per-layer widths, an emptied attention, an emptied MLP and a
    removed layer (+ output biases on emptied blocks, as reconstruction / FLAP leave them)."""
    if family == "qwen2" and kind in (*QWEN2_KINDS, "uniform_attn"):
        kw.setdefault("hidden", 96)  # llama.cpp's qwen2 needs query width = hidden
    m = tiny_model(family, n_layers=5, n_heads=6, n_kv_heads=3, **kw)
    w = layer_widths(m)
    if kind in ("uniform", "uniform_bias"):  # llama.cpp's qwen2 keeps every query head: MLP-only plans
        attn = {} if family == "qwen2" else {i: [1] for i in range(5)}
        apply_plan(m, Plan.from_units(w, {"attn": attn, "mlp": {i: list(range(20)) for i in range(5)}}))
    elif kind == "uniform_attn":
        apply_plan(m, Plan.from_units(w, {"attn": {i: [1] for i in range(5)}}))
    elif kind in ("per_layer", "per_layer_bias"):
        apply_plan(m, Plan.from_units(w, {
            "attn": {0: [1], 1: [0, 1, 2], 3: [0, 1, 2], 4: [2]},
            "mlp": {0: list(range(10)), 2: list(range(96)), 3: list(range(96)), 4: list(range(50))},
        }, settings=dict(method="taylor"), selected_params=100, denominator=400))
    elif kind == "per_layer_mlp":  # attention whole, MLP widths per layer, one MLP emptied
        apply_plan(m, Plan.from_units(w, {"mlp": {0: list(range(10)), 2: list(range(96)), 4: list(range(50))}}))
    elif kind == "first_attn_empty":  # llama.cpp needs heads in layer 0: written as a zero-weight group
        apply_plan(m, Plan.from_units(w, {"attn": {0: [0, 1, 2], 2: [1]}, "mlp": {1: list(range(30))}}))
    if kind == "uniform_bias":  # reconstruction leaves output biases on kept blocks of every layer
        spec, hidden = get_spec(m), m.config.hidden_size
        torch.manual_seed(4)
        for layer in decoder_layers(m):
            for block in ("attn", "mlp"):
                with torch.no_grad():
                    add_output_bias(layer, spec, block, hidden).normal_(0, 0.1)
    if kind == "per_layer_bias":
        spec, hidden = get_spec(m), m.config.hidden_size
        torch.manual_seed(3)
        for i, block in ((1, "attn"), (2, "mlp"), (0, "mlp"), (0, "attn")):
            with torch.no_grad():
                add_output_bias(decoder_layers(m)[i], spec, block, hidden).normal_(0, 0.1)
    return m


def _hf_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


# Per-layer Qwen2 (q/k/v biases) is refused, and Qwen3 is written but this llama.cpp build predates it:
# both are covered below.
RUNNABLE = [(f, k) for f in ("llama", "mistral", "qwen2") for k in PLAN_KINDS
            if f != "qwen2" or k in QWEN2_KINDS]


@needs_llamacpp
@pytest.mark.parametrize("family,kind", RUNNABLE)
def test_llamacpp_computes_what_the_pruned_model_computes_f32(family, kind, tok, tmp_path):
    m = _model(family, kind)
    report = export_gguf(m, tmp_path / "m.gguf", dtype="f32", tokenizer=tok)
    # Qwen2 with reconstruction biases goes to deci too: llama.cpp's qwen2 has no output biases
    own = kind in ("dense", "uniform") or (kind == "uniform_bias" and family != "qwen2")
    assert report.arch == ({"qwen2": "qwen2"}.get(family, "llama") if own else "deci")
    assert report.n_layers == len(decoder_layers(m))
    with llamacpp.loaded(report.path, n_ctx=128, n_threads=2, kv_type="f32") as lm:
        got = lm.logits(PROMPT)
        assert np.abs(got - _hf_logits(m, PROMPT)).max() <= 1e-4
        new = lm.greedy(PROMPT[:6], 16)
        text = "the thin path through the hills"
        assert lm.tokenize(text) == tok(text)["input_ids"]
    with torch.no_grad():
        hf = m.generate(torch.tensor([PROMPT[:6]]), max_new_tokens=16, do_sample=False, pad_token_id=257)
    assert new == hf[0, 6:].tolist()


@needs_llamacpp
@pytest.mark.parametrize("dtype,agree", [("f16", 0.99), ("q8_0", 0.9)])
def test_half_and_q8_exports_keep_the_top_token(dtype, agree, tok, tmp_path):
    m = _model("llama", "per_layer", hidden=96)  # rows of 96: q8_0's blocks of 32 fit the attention matrices
    report = export_gguf(m, tmp_path / "m.gguf", dtype=dtype, tokenizer=tok)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(report.path).tensors}
    assert types["blk.0.attn_q.weight"] == dtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    # MLP widths (86, 96, stub, 46) are padded with zero channels to multiples of 32, so with q8_0 even the
    # down projections (rows of n_ff) are quantized
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(4)} == {dtype.upper()}
    ids = [int(i) for i in torch.randint(0, 258, (120,), generator=torch.Generator().manual_seed(0))]
    with llamacpp.loaded(report.path, n_ctx=128, n_threads=2) as lm:
        got = lm.logits(ids)
    same = (got.argmax(1) == _hf_logits(m, ids).argmax(1)).mean()
    assert same >= agree, f"{dtype}: top-1 agrees on {same:.1%} of positions"


@needs_llamacpp
def test_compare_scores_every_text_it_is_given(tok, tmp_path):
    m = _model("llama", "per_layer")
    report = export_gguf(m, tmp_path / "m.gguf", dtype="f32", tokenizer=tok)
    gen = torch.Generator().manual_seed(1)
    windows = [[int(i) for i in torch.randint(3, 258, (40,), generator=gen)] for _ in range(2)]
    other = [[int(i) for i in torch.randint(3, 258, (60,), generator=gen)] for _ in range(3)]
    table = llamacpp.compare({"m": report.path}, windows, prompt_len=16, n_new=4, repeats=1, n_threads=2,
                             extra_windows={"other": other})
    with llamacpp.loaded(report.path, n_ctx=64, n_threads=2) as lm:
        assert table.loc["m", "ppl"] == pytest.approx(llamacpp.perplexity(lm, windows), rel=1e-6)
        assert table.loc["m", "ppl_other"] == pytest.approx(llamacpp.perplexity(lm, other), rel=1e-6)
    assert table.loc["m", "ppl_other"] != table.loc["m", "ppl"]
    with pytest.raises(ValueError, match="extra_windows\\['none'\\] holds no window"):
        llamacpp.compare({"m": report.path}, windows, prompt_len=16, extra_windows={"none": []})


def test_layout_says_what_each_layer_becomes():
    m = _model("llama", "per_layer_bias")
    layout = gguf_layout(m)
    assert layout.arch == "deci"
    # layers after removing layer 3: attn groups 2, 0(+bias stub: 1), 3, 2; MLP 86, 96, 0 (stub: 1), 46
    assert layout.n_head_kv == (2, 1, 3, 2) and layout.n_head == (4, 2, 6, 4)
    assert layout.n_ff == (86, 96, 1, 46)
    assert gguf_layout(m, ff_multiple=32).n_ff == (96, 96, 32, 64)  # zero channels pad what export writes
    assert layout.attn_stub == (False, True, False, False) and layout.mlp_stub == (False, False, True, False)
    plain = _model("llama", "per_layer")
    assert gguf_layout(plain).n_head_kv == (2, 0, 3, 2)  # emptied attention without a constant: zero heads
    first = gguf_layout(_model("llama", "first_attn_empty"))
    assert first.n_head_kv[0] == 1 and first.attn_stub[0] and not any(first.attn_stub[1:])


def test_qwen3_uniform_is_written_as_qwen3_with_its_head_norms(tok, tmp_path):
    m = _model("qwen3", "uniform")
    report = export_gguf(m, tmp_path / "q3.gguf", dtype="f32", tokenizer=tok)
    reader = gguf.GGUFReader(report.path)
    assert reader.fields["general.architecture"].contents() == "qwen3"
    tensors = {t.name: t for t in reader.tensors}
    attn = decoder_layers(m)[0].self_attn
    assert np.array_equal(tensors["blk.0.attn_q_norm.weight"].data, attn.q_norm.weight.detach().numpy())
    # qwen3 uses llama.cpp's NeoX rotary layout: q rows are written as they are, not permuted
    assert np.array_equal(tensors["blk.0.attn_q.weight"].data, attn.q_proj.weight.detach().numpy())
    assert reader.fields["qwen3.attention.head_count_kv"].contents() == 2


@pytest.mark.parametrize("family,kind,match", [
    ("qwen3", "per_layer", "no per-head q/k norms"),
    ("qwen2", "per_layer", "q/k/v biases only at the full width"),
    ("qwen2", "uniform_attn", "query width = hidden"),
])
def test_refusals_name_what_llamacpp_cannot_express(family, kind, match, tok, tmp_path):
    m = _model(family, kind)
    with pytest.raises(ExportError, match=match):
        export_gguf(m, tmp_path / "m.gguf", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_are_refused_and_leave_no_file(tok, tmp_path, monkeypatch):
    m = _model("llama", "per_layer")
    with pytest.raises(ExportError, match=r"dtype='q4'.*allowed"):
        export_gguf(m, tmp_path / "m.gguf", dtype="q4", tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_gguf(m, tmp_path / "missing" / "m.gguf", tokenizer=tok)
    with pytest.raises(ExportError, match=r"pad_ff_to=16 .*multiple of 32 for q8_0"):
        export_gguf(m, tmp_path / "m.gguf", dtype="q8_0", pad_ff_to=16, tokenizer=tok)
    with pytest.raises(ExportError, match="must end in .gguf"):
        export_gguf(m, tmp_path / "m.bin", tokenizer=tok)
    with pytest.raises(ExportError, match="no tokenizer"):
        export_gguf(m, tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="no merges"):
        export_gguf(m, tmp_path / "m.gguf", tokenizer=byte_tokenizer(merge_th=False))
    existing = tmp_path / "keep.gguf"
    existing.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_gguf(m, existing, tokenizer=tok)
    assert existing.read_bytes() == b"user data"

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_export, "_add_tensor", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(m, existing, tokenizer=tok, overwrite=True)
    assert existing.read_bytes() == b"user data"  # the old file stays until a complete new one replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.gguf"]


@needs_llamacpp
def test_checkpoint_folder_exports_from_the_cli_with_plan_and_carried_tokenizer(tok, tmp_path):
    m = _model("llama", "per_layer")
    plan = Plan.from_units(layer_widths(tiny_model("llama", n_layers=5, n_heads=6, n_kv_heads=3)), {},
                           settings=dict(baseline="flap", ratio_of="prunable"), selected_params=120, denominator=400)
    ckpt = save_pruned(m, tmp_path / "ckpt", tokenizer=tok, plan=plan)
    out = tmp_path / "out.gguf"
    assert main(["export-gguf", str(ckpt), str(out), "--dtype", "f32"]) == 0
    assert main(["export-gguf", str(ckpt), str(out)]) == 2  # exists, no --overwrite
    fields = gguf.GGUFReader(out).fields
    assert fields["prune_workbench.method"].contents() == "flap"
    assert "flap, 30.0% of 400 attention + MLP parameters removed" in fields["general.description"].contents()
    with llamacpp.loaded(out, n_ctx=128, n_threads=2, kv_type="f32") as lm:
        assert np.abs(lm.logits(PROMPT) - _hf_logits(m, PROMPT)).max() <= 1e-4

    # a model read from a GGUF file carries that file's tokenizer unchanged (config.gguf_source)
    m.config.gguf_source = str(out)
    again = export_gguf(m, tmp_path / "again.gguf", dtype="f16")
    assert again.tokenizer_source == "carried over from out.gguf"
    a, b = gguf.GGUFReader(out).fields, gguf.GGUFReader(again.path).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre"):
        assert a[key].contents() == b[key].contents()
    small = tiny_model("llama", vocab_size=300)
    small.config.gguf_source = str(out)
    with pytest.raises(ExportError, match="260 tokens but the model's embedding has 300 rows"):
        export_gguf(small, tmp_path / "small.gguf")


def test_a_gguf_model_is_converted_once_then_read_from_the_cache(tok, tmp_path):
    """GGUF in → de-quantized once into data_cache/converted/ (keyed by the file's SHA-256) → later loads read it."""
    from workbench.core.paths import data_cache
    from workbench.surgery.checkpoints import load_model

    m = tiny_model("llama", n_layers=2)
    path = export_gguf(m, tmp_path / "tiny.gguf", dtype="f32", tokenizer=tok).path
    first, tok1 = load_model(path)
    converted = list(data_cache("converted").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("tiny-")
    again, tok2 = load_model(path)
    plain, _ = load_model(path, convert_cache=False)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = m(ids).logits
        assert torch.equal(first(ids).logits, again(ids).logits) and torch.equal(plain(ids).logits, again(ids).logits)
        assert (again(ids).logits - ref).abs().max() < 1e-4  # GGUF round trip of our own export
    assert again.config.gguf_source == str(path.resolve()) and tok2("the thin")["input_ids"] == tok1("the thin")["input_ids"]
    # another file (other content) gets its own entry; a damaged entry is converted again
    weights = next(converted[0].glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    repaired, _ = load_model(path)
    with torch.no_grad():
        assert torch.equal(repaired(ids).logits, first(ids).logits)
    assert len(list(data_cache("converted").iterdir())) == 1


@pytest.mark.parametrize("damage", ["config.json", "tokenizer.json", "checksums.json"])
def test_a_damaged_conversion_cache_is_converted_again(tok, tmp_path, damage):
    """The README promises a re-conversion for any damaged file of the cache, not a raw OSError / JSONDecodeError."""
    from workbench.core.paths import data_cache
    from workbench.surgery.checkpoints import load_model

    path = export_gguf(tiny_model("llama", n_layers=2), tmp_path / "tiny.gguf", dtype="f32", tokenizer=tok).path
    first, _ = load_model(path)
    (folder,) = list(data_cache("converted").iterdir())
    (folder / damage).write_text("{ damaged")
    again, tok2 = load_model(path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, first(ids).logits)
    assert tok2("the thin")["input_ids"] and json.loads((folder / damage).read_text())


@pytest.mark.parametrize("family, kw", [
    ("mistral", dict(sliding_window=64)),
    ("qwen2", dict(hidden=96, use_sliding_window=True, sliding_window=64, max_window_layers=0)),
])
def test_a_sliding_window_is_refused_not_dropped(family, kw, tok, tmp_path):
    """llama.cpp differed by up to 8.7 in the logits past the window when the window was silently dropped."""
    m = tiny_model(family, n_layers=2, n_heads=6, n_kv_heads=3, **kw)
    assert gguf_export.active_sliding_window(m.config) == 64
    with pytest.raises(ExportError, match=r"sliding window of 64 tokens .* sliding_window=None"):
        export_gguf(m, tmp_path / "m.gguf", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []
    assert gguf_export.active_sliding_window(tiny_model("mistral").config) is None  # window >= context: no effect


def test_a_llama_with_qkv_biases_and_fewer_query_heads_is_refused(tok, tmp_path):
    m = _model("llama", "uniform_attn", attention_bias=True)
    with pytest.raises(ExportError, match="llama architecture with q/k/v biases needs query width = hidden"):
        export_gguf(m, tmp_path / "m.gguf", tokenizer=tok)


def test_metadata_names_a_global_plan_s_method_and_its_denominator():
    from workbench.deploy.gguf import _plan_summary

    def _plan_label(plan):  # the one label of a plan, as GGUF metadata writes it
        return plan.provenance.description
    plan = Plan.from_units([(2, 8)], {}, selected_params=25, denominator=100,
                           settings=dict(ratio=0.25, ratio_of="total", score_column="final_score",
                                         scoring=dict(method="taylor", normalization="minmax", level="block")))
    assert _plan_label(plan) == "global taylor (minmax/block)"
    assert _plan_summary(plan) == "pruned by prune-workbench: global taylor (minmax/block), 25.0% of all 100 " \
                                  "parameters removed"


@needs_llamacpp
def test_export_sources_without_what_they_need_are_named(tok, tmp_path, capsys):
    m = _model("llama", "per_layer")
    # a checkpoint saved without a tokenizer: refused with the way out; --tokenizer supplies one
    bare = save_pruned(m, tmp_path / "bare")
    assert main(["export-gguf", str(bare), str(tmp_path / "a.gguf")]) == 2
    assert "saved without one" in capsys.readouterr().err
    tok.save_pretrained(tmp_path / "tok")
    assert main(["export-gguf", str(bare), str(tmp_path / "a.gguf"), "--tokenizer", str(tmp_path / "tok")]) == 0
    # the source GGUF moved away: the checkpoint's own tokenizer is used, and a note says so
    src = export_gguf(m, tmp_path / "src.gguf", dtype="f32", tokenizer=tok).path
    m.config.gguf_source = str(src)
    ckpt = save_pruned(m, tmp_path / "ckpt", tokenizer=tok)
    src.rename(tmp_path / "moved.gguf")
    report = export_gguf(ckpt, tmp_path / "b.gguf", dtype="f32")
    assert report.tokenizer_source.startswith("written from the HF tokenizer")
    assert any("source GGUF" in n and "is gone" in n for n in report.notes)
    # an experiment run with save_model: false
    (tmp_path / "exp" / "evaluation").mkdir(parents=True)
    assert main(["export-gguf", str(tmp_path / "exp"), str(tmp_path / "c.gguf")]) == 2
    assert "has no saved model (it ran with save_model: false)" in capsys.readouterr().err
