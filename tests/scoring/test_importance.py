import pytest
import torch

from workbench.core.testing import tiny_model
from workbench.scoring.importance import (
    compute_importance,
    importance_cached,
    load_importance,
    save_importance,
)
from workbench.scoring.methods import IMPORTANCE_METHODS, available_methods

HD, RATIO = 16, 3


def _unit_slices(layer, block, u):
    """Explicit (param, index) pairs owned by unit u, written out by hand."""
    a, m = layer.self_attn, layer.mlp
    if block == "attn":
        q = slice(u * RATIO * HD, (u + 1) * RATIO * HD)
        kv = slice(u * HD, (u + 1) * HD)
        out = [(a.q_proj.weight, (q, slice(None))), (a.k_proj.weight, (kv, slice(None))),
               (a.v_proj.weight, (kv, slice(None))), (a.o_proj.weight, (slice(None), q))]
        if a.q_proj.bias is not None:
            out += [(a.q_proj.bias, (q,)), (a.k_proj.bias, (kv,)), (a.v_proj.bias, (kv,))]
        return out
    return [(m.gate_proj.weight, (u, slice(None))), (m.up_proj.weight, (u, slice(None))),
            (m.down_proj.weight, (slice(None), u))]


def test_importance_matches_hand_computation(family):
    torch.manual_seed(0)
    samples = torch.randint(0, 256, (4, 16))
    model = tiny_model(family, n_layers=2)
    imp = compute_importance(model, samples, batch_size=2, progress=False)

    ref = tiny_model(family, n_layers=2)
    grads = []  # per batch: {param: grad}
    for start in (0, 2):
        ref.zero_grad()
        b = samples[start:start + 2]
        ref(input_ids=b, labels=b).loss.backward()
        grads.append({p: p.grad.clone() for p in ref.parameters() if p.grad is not None})
    inputs = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, a, k=k: inputs.setdefault(k, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(ref.model.layers)
             for k, mod in [((i, "q"), layer.self_attn.q_proj), ((i, "o"), layer.self_attn.o_proj),
                            ((i, "gate"), layer.mlp.gate_proj), ((i, "down"), layer.mlp.down_proj)]]
    with torch.no_grad():
        ref(samples)
    for h in hooks:
        h.remove()
    xnorm = {k: torch.cat(v).norm(dim=0) for k, v in inputs.items()}

    taylor, taylor2, wanda, mag = (imp.scores(m) for m in ("taylor", "taylor2", "wanda", "magnitude"))
    for i, layer in enumerate(ref.model.layers):
        for block, n in (("attn", 2), ("mlp", 96)):
            for u in range(0, n, max(1, n // 7)):
                t1 = t2 = w_sum = wa = 0.0
                for p, idx in _unit_slices(layer, block, u):
                    w = p.detach()[idx]
                    per_batch = [(w * g[p][idx]) for g in grads]
                    t1 += sum(pb.abs().sum() for pb in per_batch) / 2
                    t2 += 0.5 * (w ** 2 * sum(g[p][idx] ** 2 for g in grads) / 2).sum()
                    w_sum += w.abs().sum()
                    if p.ndim == 2:
                        feed = {"q_proj": "q", "k_proj": "q", "v_proj": "q", "o_proj": "o", "gate_proj": "gate",
                                "up_proj": "gate", "down_proj": "down"}
                        name = next(n_ for n_, mod in layer.named_modules() if getattr(mod, "weight", None) is p)
                        xn = xnorm[(i, feed[name.split(".")[-1]])]
                        wa += (p.detach().abs() * xn[None, :])[idx].sum()
                torch.testing.assert_close(taylor[block][i][u], torch.tensor(float(t1)), rtol=1e-4, atol=1e-9)
                torch.testing.assert_close(taylor2[block][i][u], torch.tensor(float(t1 + t2)), rtol=1e-4, atol=1e-9)
                torch.testing.assert_close(mag[block][i][u], torch.tensor(float(w_sum)), rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(wanda[block][i][u], torch.tensor(float(wa)), rtol=1e-4, atol=1e-7)


def test_pass_leaves_model_untouched():
    model = tiny_model("llama", n_layers=2)
    before = {n: p.clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    compute_importance(model, torch.randint(0, 256, (2, 8)), progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None and p.requires_grad == flags[n] for n, p in model.named_parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_grad_stats_cover_every_module():
    model = tiny_model("qwen2", n_layers=2)
    imp = compute_importance(model, torch.randint(0, 256, (2, 8)), progress=False)
    gs = imp.grad_stats
    assert len(gs) == 2 * (7 + 3)  # q,k,v weights+biases and o; gate, up, down
    assert (gs.abs_sum > 0).all() and (gs.max_abs > 0).all() and (gs.numel > 0).all()


def test_nonfinite_gradients_name_the_module():
    model = tiny_model("llama", n_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"batch 0: the first inf/NaN output comes from layer 1 mlp\.up_proj"):
        compute_importance(model, torch.randint(0, 256, (2, 8)), progress=False)
    assert not any(m._forward_hooks for m in model.modules())


def test_nonfinite_gradient_stats_name_the_modules():
    from workbench.scoring.importance import _check_finite

    stats = torch.ones(3, 4, dtype=torch.float64)
    stats[2, 1] = float("inf")
    keys = [(0, "attn", "q.weight"), (0, "mlp", "up.weight"), (5, "mlp", "down.weight")]
    with pytest.raises(FloatingPointError, match=r"1 module\(s\): layer 5 mlp\.down\.weight"):
        _check_finite(stats, keys)


def test_unknown_method_lists_the_registry():
    imp = compute_importance(tiny_model("llama", n_layers=1), torch.randint(0, 256, (2, 8)), progress=False)
    with pytest.raises(ValueError, match="'fancy'.*taylor"):
        imp.scores("fancy")
    assert set(IMPORTANCE_METHODS) >= {"taylor", "taylor2", "wanda", "magnitude"}


def test_cache_round_trip_and_memo(tmp_path, monkeypatch):
    model = tiny_model("llama", n_layers=2)
    samples = torch.randint(0, 256, (2, 8))
    a = importance_cached(model, samples, cache=tmp_path, progress=False)
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1 and a.key in files[0].name
    b = load_importance(files[0])
    for m in available_methods(a):
        for blk in ("attn", "mlp"):
            for x, y in zip(a.scores(m)[blk], b.scores(m)[blk]):
                assert torch.equal(x, y)
    monkeypatch.setattr("workbench.scoring.importance.compute_importance",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert importance_cached(model, samples, cache=tmp_path, progress=False) is a
    monkeypatch.setattr("workbench.core.cache._MEMORY", {})
    c = importance_cached(model, samples, cache=tmp_path, progress=False)  # from disk, no pass
    assert c.key == a.key
    save_importance(c, tmp_path / "x.pt")
    assert not list(tmp_path.rglob(".*tmp"))


# ----------------------------------------------------------------------------------------------
# Second-order Taylor: the per-sequence Fisher, the second-order-only score, both terms in the diagnosis


def test_per_sequence_fisher_matches_hand_computation(family):
    torch.manual_seed(1)
    samples = torch.randint(0, 256, (5, 12))  # batches of 2, 2, 1
    batch = compute_importance(tiny_model(family, n_layers=2), samples, batch_size=2, progress=False)
    seq = compute_importance(tiny_model(family, n_layers=2), samples, batch_size=2, fisher="sequence", progress=False)
    ref = tiny_model(family, n_layers=2)
    grads = []
    for s in samples:
        ref.zero_grad()
        ref(input_ids=s[None], labels=s[None]).loss.backward()
        grads.append({p: p.grad.clone() for p in ref.parameters() if p.grad is not None})
    assert seq.acc.sequences == 5 and batch.acc.fisher_seq is None
    for i, layer in enumerate(ref.model.layers):
        for block, n in (("attn", 2), ("mlp", 96)):
            # everything the batch pass has is the same: .grad still sums to the batch-mean gradient
            for name in ("first", "fisher", "wanda", "fluctuation"):
                torch.testing.assert_close(getattr(seq.acc, name)[block][i], getattr(batch.acc, name)[block][i],
                                           rtol=1e-4, atol=1e-9)
            for u in range(0, n, max(1, n // 5)):
                expect = sum(float(((p.detach()[idx] * g[p][idx]) ** 2).sum())
                             for g in grads for p, idx in _unit_slices(layer, block, u))
                torch.testing.assert_close(seq.acc.fisher_seq[block][i][u], torch.tensor(expect), rtol=1e-4, atol=1e-12)
    obd = seq.scores("fisher_seq")["mlp"][0]
    torch.testing.assert_close(obd, 0.5 * seq.acc.fisher_seq["mlp"][0] / 5)
    torch.testing.assert_close(seq.scores("taylor2_seq")["mlp"][0], seq.scores("taylor")["mlp"][0] + obd)


def test_batches_of_one_make_both_fishers_equal():
    samples = torch.randint(0, 256, (3, 10))
    imp = compute_importance(tiny_model("llama", n_layers=1), samples, batch_size=1, fisher="sequence", progress=False)
    for block in ("attn", "mlp"):
        torch.testing.assert_close(imp.acc.fisher_seq[block][0], imp.acc.fisher[block][0], rtol=1e-5, atol=1e-12)


def test_sequence_methods_need_the_sequence_pass():
    imp = compute_importance(tiny_model("llama", n_layers=1), torch.randint(0, 256, (2, 8)), progress=False)
    with pytest.raises(ValueError, match="fisher='sequence'"):
        imp.scores("taylor2_seq")
    assert "taylor2_seq" not in available_methods(imp) and "taylor" in available_methods(imp)
    with pytest.raises(ValueError, match="fisher='per_token'.*batch.*sequence"):
        compute_importance(tiny_model("llama", n_layers=1), torch.randint(0, 256, (2, 8)), fisher="per_token")
    from workbench.data.text import CalibrationConfig
    with pytest.raises(ValueError, match="fisher='x'"):
        CalibrationConfig(fisher="x")


def test_sequence_pass_is_cached_apart_and_round_trips(tmp_path):
    model = tiny_model("llama", n_layers=1)
    samples = torch.randint(0, 256, (2, 8))
    a = importance_cached(model, samples, cache=tmp_path, progress=False)
    b = importance_cached(model, samples, fisher="sequence", cache=tmp_path, progress=False)
    assert a.key != b.key and b.acc.fisher_seq is not None
    c = load_importance(next(p for p in tmp_path.rglob("*.pt") if b.key in p.name))
    assert c.acc.sequences == 2
    assert torch.equal(c.scores("fisher_seq")["mlp"][0], b.scores("fisher_seq")["mlp"][0])


def test_taylor_terms_show_both_terms_per_block():
    from workbench.analysis.diagnosis import taylor_terms
    samples = torch.randint(0, 256, (4, 10))
    batch = taylor_terms(compute_importance(tiny_model("mistral", n_layers=2), samples, progress=False))
    seq = taylor_terms(compute_importance(tiny_model("mistral", n_layers=2), samples, batch_size=2, fisher="sequence",
                                          progress=False))
    assert list(seq[["layer", "block"]].itertuples(index=False, name=None)) == [(0, "attn"), (0, "mlp"), (1, "attn"),
                                                                                (1, "mlp")]
    assert batch.second_seq.isna().all() and seq.second_seq.notna().all()
    assert (seq.first > 0).all() and (seq.second_batch > 0).all()
    torch.testing.assert_close(torch.tensor(seq.batch_over_first.to_numpy()),
                               torch.tensor((seq.second_batch / seq.first).to_numpy()))
    # E_s[g_s²] >= (E_s g_s)² elementwise, so the per-sequence term is never below the batch-mean one (batch = 2)
    assert (seq.second_seq >= seq.second_batch * (1 - 1e-5)).all()


def test_global_plan_from_wanda_warns_and_wanda_sp_does_not():
    import warnings

    from workbench.baselines.registry import make_plan
    from workbench.plans.normalize import ScoringConfig
    from workbench.plans.rescore import Rescorer
    from workbench.plans.selection import Budget, SelectionConfig
    model = tiny_model("qwen3", n_layers=3)
    imp = compute_importance(model, torch.randint(0, 256, (2, 8)), progress=False)
    r = Rescorer(imp, Budget.of(model))
    with pytest.warns(UserWarning, match="'wanda' is not comparable across layers.*wanda_sp"):
        r.plan(ScoringConfig(method="wanda"), SelectionConfig(ratio=0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r.plan(ScoringConfig(method="wanda", normalization="zscore", level="block"), SelectionConfig(ratio=0.2))
        r.plan(ScoringConfig(method="taylor"), SelectionConfig(ratio=0.2))
        make_plan("wanda_sp", r, 0.2)


# ----------------------------------------------------------------------------------------------
# At scale: the per-parameter reduction, gradients freed during backward, checkpointing, dispatched models


def _same_importance(a, b, rtol=1e-6):
    for name in ("first", "fisher", "magnitude", "wanda", "fluctuation"):
        for block in ("attn", "mlp"):
            for x, y in zip(getattr(a.acc, name)[block], getattr(b.acc, name)[block], strict=True):
                torch.testing.assert_close(x, y, rtol=rtol, atol=1e-30, msg=f"{name} {block}")
    cols = ["abs_sum", "sq_sum", "max_abs", "zeros"]
    torch.testing.assert_close(torch.tensor(a.grad_stats[cols].to_numpy()), torch.tensor(b.grad_stats[cols].to_numpy()),
                               rtol=rtol, atol=0)
    assert (a.acc.batches, a.acc.tokens) == (b.acc.batches, b.acc.tokens)


@pytest.mark.parametrize("shape,axis", [((96, 40), 0), ((40, 96), 1), ((96,), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_param_terms_match_a_float64_reduction(shape, axis, dtype):
    from workbench.scoring.hooks import param_terms

    torch.manual_seed(0)
    w, g = torch.randn(shape).to(dtype), (torch.randn(shape) * 1e-3).to(dtype)
    g.view(-1)[::7] = 0
    first, fisher, stats = param_terms(w, g.clone(), axis, 8)
    prod = w.double() * g.double()
    rows = prod if prod.ndim == 1 else prod.transpose(0, axis)
    ref_first = rows.abs().reshape(8, -1).sum(1)
    ref_fisher = rows.square().reshape(8, -1).sum(1)
    torch.testing.assert_close(first.double(), ref_first, rtol=1e-6, atol=0)
    torch.testing.assert_close(fisher.double(), ref_fisher, rtol=1e-6, atol=0)
    gd = g.double()
    torch.testing.assert_close(stats.double(), torch.stack([gd.abs().sum(), gd.square().sum(), gd.abs().max(),
                                                            (gd == 0).sum().double()]), rtol=1e-6, atol=0)


def test_each_gradient_is_reduced_and_freed_during_backward():
    """When layer 0's query weight gets its gradient (one of the last in backward), the later layers' gradients
    are already reduced and gone: the gradients of the prunable weights never all live at once."""
    from workbench.core.units import block_params, iter_blocks

    model = tiny_model("llama", n_layers=4)
    params = [up.param for _, b, parts in iter_blocks(model) for up in block_params(parts, b)]
    alive = []
    q0 = model.model.layers[0].self_attn.q_proj.weight
    handle = q0.register_post_accumulate_grad_hook(lambda _p: alive.append(sum(p.grad is not None for p in params)))
    try:
        compute_importance(model, torch.randint(0, 256, (4, 12)), batch_size=2, progress=False)
    finally:
        handle.remove()
    assert len(alive) == 2 and max(alive) <= 4 < len(params) == 28
    assert all(p.grad is None and not p._post_accumulate_grad_hooks for p in model.parameters())


@pytest.mark.parametrize("fisher", ["batch", "sequence"])
def test_gradient_checkpointing_gives_the_same_importance(family, fisher):
    samples = torch.randint(0, 256, (4, 12))
    plain = compute_importance(tiny_model(family, n_layers=2), samples, batch_size=2, fisher=fisher, progress=False)
    model = tiny_model(family, n_layers=2)
    calls = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    ckpt = compute_importance(model, samples, batch_size=2, fisher=fisher, gradient_checkpointing=True, progress=False)
    handle.remove()
    forwards = 2 if fisher == "batch" else 4
    assert len(calls) == 2 * forwards  # each layer ran again during backward: checkpointing was on
    _same_importance(plain, ckpt)  # ... and the Wanda / FLAP input sums did not count the recomputation
    if fisher == "sequence":
        for block in ("attn", "mlp"):
            for x, y in zip(plain.acc.fisher_seq[block], ckpt.acc.fisher_seq[block], strict=True):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
    layers = model.model.layers
    assert not any(layer.training or layer.gradient_checkpointing for layer in layers)
    assert not any("_gradient_checkpointing_func" in layer.__dict__ for layer in layers)


def test_importance_through_accelerate_dispatch_hooks():
    """A model dispatched by accelerate (what `device_map` installs: hooks moving inputs to each block's device)
    gives the same importance, with and without checkpointing; the hooks of the pass and accelerate's coexist."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    samples = torch.randint(0, 256, (4, 12))
    plain = compute_importance(tiny_model("qwen2", n_layers=3), samples, batch_size=2, progress=False)
    model = tiny_model("qwen2", n_layers=3)
    modules = [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]
    for m in modules:
        add_hook_to_module(m, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    for ckpt in (False, True):
        _same_importance(plain, compute_importance(model, samples, batch_size=2, gradient_checkpointing=ckpt,
                                                   progress=False))
    for m in modules:
        remove_hook_from_module(m)


@pytest.mark.slow
def test_compiled_accumulation_matches_eager():
    import shutil
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    samples = torch.randint(0, 256, (4, 12))
    eager = compute_importance(tiny_model("qwen2", n_layers=2), samples, batch_size=2, progress=False)
    compiled = compute_importance(tiny_model("qwen2", n_layers=2), samples, batch_size=2, accumulation="compiled",
                                  progress=False)
    _same_importance(eager, compiled)


def test_bad_accumulation_and_checkpointing_settings_are_refused():
    from workbench.data.text import CalibrationConfig
    with pytest.raises(ValueError, match="accumulation='fused'.*eager.*compiled"):
        compute_importance(tiny_model("llama", n_layers=1), torch.randint(0, 256, (2, 8)), accumulation="fused")
    with pytest.raises(ValueError, match="accumulation='triton'"):
        CalibrationConfig(accumulation="triton")
    with pytest.raises(TypeError, match="gradient_checkpointing='yes'"):
        CalibrationConfig(gradient_checkpointing="yes")


def test_device_auto_loads_dispatched_models_that_score_the_same(tmp_path, tokenizer):
    """`device="auto"` (accelerate's device_map) for a model folder and a pruned checkpoint; on a machine without
    GPUs everything lands on the CPU, and the importance pass gives what it gives on the undispatched model."""
    from workbench.plans.plan import Plan
    from workbench.surgery.checkpoints import load_model, load_pruned, save_pruned
    from workbench.surgery.prune import apply_plan

    model = tiny_model("mistral", n_layers=2)
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    auto, _ = load_model(tmp_path / "dense", device="auto")
    assert auto.hf_device_map and set(auto.hf_device_map.values()) <= {"cpu", 0, "cuda:0"}
    samples = torch.randint(0, 256, (4, 12))
    _same_importance(compute_importance(model, samples, batch_size=2, progress=False),
                     compute_importance(auto, samples, batch_size=2, progress=False))
    apply_plan(model, Plan(removed={"attn": [[0], []], "mlp": [[1, 2], list(range(10))]}, widths=[(2, 96)] * 2))
    save_pruned(model, tmp_path / "pruned")
    pruned = load_pruned(tmp_path / "pruned", device="auto")
    assert pruned.hf_device_map
    _same_importance(compute_importance(model, samples, batch_size=2, progress=False),
                     compute_importance(pruned, samples, batch_size=2, progress=False))


def test_checkpointing_and_accumulation_share_the_plain_cache_entry(tmp_path, tokenizer):
    """They do not change the scores, so a run file that turns them on reads the plain pass's cache entry."""
    from workbench.data.text import CalibrationConfig
    from workbench.runs.pipeline import calibrate

    model = tiny_model("llama", n_layers=2)
    plain = CalibrationConfig(num_samples=4, seq_len=16, batch_size=2)
    _, a = calibrate(model, tokenizer, plain, progress=False)
    checkpointed = CalibrationConfig(num_samples=4, seq_len=16, batch_size=2, gradient_checkpointing=True)
    _, b = calibrate(model, tokenizer, checkpointed, progress=False)
    assert a.key == b.key and b.calibration["gradient_checkpointing"] is False  # served from the first pass


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_flap_and_wanda_sp_statistics_are_what_their_code_computes(family):
    """FLAP's statistic recomputed as its code does (An et al., 2024: a forward hook on o_proj / down_proj that
    keeps each input column's mean and variance, WIFV = variance × squared weight-column norm, squared for
    attention; each layer's columns standardized with the unbiased std; a head group's columns averaged)."""
    model = tiny_model(family, n_layers=2)
    samples = torch.randint(0, 256, (4, 12))
    imp = compute_importance(model, samples, batch_size=2, progress=False)
    inputs: dict = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, k=(i, b): inputs.setdefault(k, []).append(inp[0].detach()))
             for i, layer in enumerate(model.model.layers)
             for b, m in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj))]
    with torch.no_grad():
        model(input_ids=samples)
    for h in hooks:
        h.remove()
    for (i, block), xs in inputs.items():
        x = torch.cat(xs).reshape(-1, xs[0].shape[-1]).double()
        w = (model.model.layers[i].self_attn.o_proj if block == "attn" else model.model.layers[i].mlp.down_proj).weight
        wifv = x.var(0, unbiased=False) * w.detach().double().square().sum(0)
        metric = wifv.square() if block == "attn" else wifv
        z = (metric - metric.mean()) / metric.std()
        n = imp.acc.flap[block][i].numel()
        torch.testing.assert_close(imp.scores("flap")[block][i].double(), z.reshape(n, -1).mean(1), rtol=1e-4, atol=1e-6)
        # Wanda-sp as its code scores units: |W|·sqrt(Σ x²) of the output projection, the row mean, per unit's columns
        wanda_sp = (w.detach().double().abs() * x.square().sum(0).sqrt()).mean(0).reshape(n, -1).sum(1)
        torch.testing.assert_close(imp.scores("wanda_sp")[block][i].double(), wanda_sp, rtol=1e-4, atol=1e-9)
