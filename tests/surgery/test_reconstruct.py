"""Closed-form reconstruction: exact where the pruned block can represent the dense output, streaming sums equal
one batch, finite on ill-conditioned inputs, better than plain pruning, exact after save and reload."""
import copy

import pytest
import torch

from workbench.core.arch import BLOCKS, decoder_layers, get_spec, layer_parts, layer_widths
from workbench.core.testing import TINY_FAMILIES, tiny_model
from workbench.plans.plan import Plan, random_plan
from workbench.scoring.refit import NormalEquations, solve_ridge
from workbench.surgery.checkpoints import load_pruned, loads_with_plain_transformers, save_pruned
from workbench.surgery.prune import apply_plan
from workbench.surgery.reconstruct import (
    MODES,
    ReconstructConfig,
    _kept_columns,
    apply_reconstruction,
    cv_errors,
    reconstruct,
    solve_reconstruction,
)


def _samples(n=8, seq=24, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _duplicate_units(model, layer: int, src: dict, dst: dict) -> None:
    """Make unit dst[b] of `layer` compute exactly what unit src[b] computes (its input rows copied)."""
    spec = get_spec(model)
    parts = layer_parts(decoder_layers(model, spec)[layer], spec)
    hd = model.config.head_dim
    r = model.config.num_attention_heads // model.config.num_key_value_heads
    with torch.no_grad():
        if "attn" in src:
            s, d = src["attn"], dst["attn"]
            for proj, per in ((parts.q, r * hd), (parts.k, hd), (parts.v, hd)):
                proj.weight[d * per:(d + 1) * per] = proj.weight[s * per:(s + 1) * per]
                if proj.bias is not None:
                    proj.bias[d * per:(d + 1) * per] = proj.bias[s * per:(s + 1) * per]
        if "mlp" in src:
            for proj in (parts.gate, parts.up):
                proj.weight[dst["mlp"]] = proj.weight[src["mlp"]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_exact_recovery_when_removed_units_duplicate_kept_ones(family, mode):
    """Removed groups/channels that compute what kept ones compute: the kept columns can carry their output."""
    dense = tiny_model(family, n_layers=3, seed=1)
    for layer in range(3):
        _duplicate_units(dense, layer, {"attn": 0, "mlp": 3}, {"attn": 1, "mlp": 7})
    plan = Plan.from_units(layer_widths(dense), {"attn": {i: [1] for i in range(3)}, "mlp": {i: [7] for i in range(3)}})
    pruned = copy.deepcopy(dense)
    apply_plan(pruned, plan)
    ids = _samples()
    before = (_logits(pruned, ids) - _logits(dense, ids)).abs().max().item()
    reconstruct(dense, pruned, plan, ids, ReconstructConfig(mode=mode, damping=0.0, bias=False), cache=False,
                progress=False)
    after = (_logits(pruned, ids) - _logits(dense, ids)).abs().max().item()
    assert before > 1e-2
    assert after < 1e-4, (before, after)


def test_batches_of_one_equal_one_batch():
    x = torch.randn(5, 7, 12, generator=torch.Generator().manual_seed(0))
    one, many = NormalEquations(12), NormalEquations(12)
    one.add(x)
    for sample in x:
        for token in sample:
            many.add(token[None])
    assert many.tokens == one.tokens == 35
    torch.testing.assert_close(many.gram, one.gram, rtol=1e-6, atol=1e-6)


def test_the_result_does_not_depend_on_the_batch_size():
    dense = tiny_model("llama", n_layers=3, seed=2)
    plan = random_plan(layer_widths(dense), 0.4, seed=3, empty_blocks=1)
    ids, out = _samples(6), []
    for batch_size in (1, 6):
        pruned = copy.deepcopy(dense)
        apply_plan(pruned, plan)
        reconstruct(dense, pruned, plan, ids, ReconstructConfig(batch_size=batch_size), cache=False, progress=False)
        out.append(_logits(pruned, ids))
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)


def test_duplicate_channels_stay_finite_with_damping():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    x = torch.cat([x, x[:, :3]], dim=1)  # three duplicated inputs: a singular Gram matrix
    ne = NormalEquations(9)
    ne.add(x)
    w = torch.randn(4, 9)
    sol = ne.solve(w, None, torch.arange(9), damping=0.01)
    assert torch.isfinite(sol["weight"]).all() and torch.isfinite(sol["bias"]).all()
    pred, y = x @ sol["weight"].T + sol["bias"], x @ w.T
    assert (pred - y).norm() / y.norm() < 0.02  # the duplicated inputs share the weight; the output is kept


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True])
def test_bad_damping_is_an_error(bad):
    with pytest.raises(ValueError, match="damping"):
        ReconstructConfig(damping=bad)
    with pytest.raises(ValueError, match="damping"):
        solve_ridge(torch.eye(3, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64), bad, False)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="greedy"), "mode='greedy'.*allowed"),
    (dict(blocks=("attn", "embed")), "blocks="),
    (dict(blocks="mlp"), "blocks="),
    (dict(num_samples=0), "num_samples=0"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(bias=False, weights=False), "fits nothing"),
    (dict(toward="up"), "toward='up' is not allowed"),
])
def test_bad_settings_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        ReconstructConfig(**kw)


def test_wrong_models_are_refused():
    dense = tiny_model("llama", n_layers=2)
    plan = random_plan(layer_widths(dense), 0.3)
    with pytest.raises(ValueError, match="copy of `dense` with the plan applied"):
        reconstruct(dense, dense, plan, _samples(), cache=False, progress=False)
    other = tiny_model("llama", n_layers=3)
    with pytest.raises(ValueError, match="not made for `dense`"):
        reconstruct(other, copy.deepcopy(other), plan, _samples(), cache=False, progress=False)


@pytest.mark.parametrize("mode", MODES)
def test_reconstruction_lowers_the_loss_of_a_random_plan(mode):
    """On held-out tokens: reconstructed output closer to the dense output than plain pruning, with removed
    layers and emptied blocks in the plan (random weights: the removed units' outputs are mostly noise the kept
    ones cannot carry, so the gain is small; on SmolLM2 PPL falls from 35.4 to 27.9)."""
    dense = tiny_model("llama", n_layers=4, seed=4)
    plan = random_plan(layer_widths(dense), 0.3, seed=5, empty_blocks=2, remove_layers=1)
    pruned = copy.deepcopy(dense)
    apply_plan(pruned, plan)
    held_out = _samples(4, seed=9)
    err = lambda m: (_logits(m, held_out) - _logits(dense, held_out)).pow(2).mean().item()  # noqa: E731
    before = err(pruned)
    rec = reconstruct(dense, pruned, plan, _samples(32, 32), ReconstructConfig(mode=mode), cache=False,
                      progress=False)
    assert err(pruned) < 0.97 * before
    assert {(i, b) for i, b in rec.solutions} == {(i, b) for b in BLOCKS for i in range(4)
                                                  if plan.removed[b][i] and i not in plan.removed_layers()}


@pytest.mark.parametrize("mode", MODES)
def test_a_ridge_toward_the_dense_weights_stays_near_them(mode):
    dense = tiny_model("llama", n_layers=3, seed=4)
    plan = random_plan(layer_widths(dense), 0.3, seed=5)
    held_out = _samples(4, seed=9)
    err = lambda m: (_logits(m, held_out) - _logits(dense, held_out)).pow(2).mean().item()  # noqa: E731
    plain = copy.deepcopy(dense)
    apply_plan(plain, plan)
    kept = {n: p.detach().clone() for n, p in plain.named_parameters() if n.endswith(("o_proj.weight", "down_proj.weight"))}
    moved, errors = {}, {}
    for toward in ("zero", "dense"):
        pruned = copy.deepcopy(plain)
        reconstruct(dense, pruned, plan, _samples(32, 32), ReconstructConfig(mode=mode, damping=1.0, toward=toward),
                    cache=False, progress=False)
        params = dict(pruned.named_parameters())
        moved[toward] = sum(float((params[n].detach() - w).norm()) for n, w in kept.items())
        errors[toward] = err(pruned)
    assert moved["dense"] < 0.5 * moved["zero"]  # a strong plain ridge shrinks the weights; this one keeps them
    assert errors["dense"] < err(plain)


def test_bias_only_is_flap_compensation():
    """weights=False keeps the kept columns and moves the removed units' mean output into the bias."""
    dense = tiny_model("llama", n_layers=2, seed=6)
    plan = random_plan(layer_widths(dense), 0.5, seed=1)
    pruned = copy.deepcopy(dense)
    apply_plan(pruned, plan)
    kept_before = [p.clone() for n, p in pruned.named_parameters() if "o_proj" in n or "down_proj" in n]
    reconstruct(dense, pruned, plan, _samples(), ReconstructConfig(weights=False, mode="one_shot"), cache=False,
                progress=False)
    kept_after = [p for n, p in pruned.named_parameters() if ("o_proj" in n or "down_proj" in n) and "bias" not in n]
    assert all(torch.equal(a, b) for a, b in zip(kept_before, kept_after))
    spec = get_spec(pruned)
    assert all(layer_parts(layer, spec).down.bias is not None for layer in decoder_layers(pruned, spec))


def test_cached_solutions_apply_without_a_pass(tmp_path):
    dense = tiny_model("mistral", n_layers=3, seed=7)
    plan = random_plan(layer_widths(dense), 0.3, seed=2, empty_blocks=1)
    ids, models = _samples(), []
    for _ in range(2):
        pruned = copy.deepcopy(dense)
        apply_plan(pruned, plan)
        rec = reconstruct(dense, pruned, plan, ids, cache=tmp_path, progress=False)
        models.append(pruned)
    assert torch.equal(_logits(models[0], ids), _logits(models[1], ids))
    again = copy.deepcopy(dense)
    apply_plan(again, plan)
    apply_reconstruction(again, plan, rec)
    assert torch.equal(_logits(again, ids), _logits(models[0], ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_reconstructed_model_reloads_exactly(tmp_path, family, dtype):
    dense = tiny_model(family, n_layers=3, seed=8)
    plan = random_plan(layer_widths(dense), 0.3, seed=4, empty_blocks=2)
    pruned = copy.deepcopy(dense)
    apply_plan(pruned, plan)
    reconstruct(dense, pruned, plan, _samples(), cache=False, progress=False)
    for p in pruned.parameters():  # parameters only: the rotary inv_freq stays float32, as from_pretrained keeps it
        p.data = p.data.to(dtype)
    save_pruned(pruned, tmp_path / "rec", plan=plan)
    again = load_pruned(tmp_path / "rec", dtype=dtype)
    ids = _samples(2, 40, seed=3)
    assert torch.equal(_logits(pruned, ids), _logits(again, ids))
    with torch.no_grad():  # cached decoding agrees with the full pass after reload
        out = again(input_ids=ids[:, :-1], use_cache=True)
        step = again(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert (step.float() - _logits(again, ids)[:, -1].float()).abs().max() < tol
    assert not loads_with_plain_transformers(again.config)  # biases a plain model would not create


@pytest.mark.slow
def test_pipeline_prunes_in_place_and_reconstructs(tmp_path):
    """`prune_and_reconstruct` on the dense model itself equals reconstructing a pruned copy; run_pruning saves
    the reconstructed model and it reloads exactly."""
    from workbench.core.experiments import Experiment
    from workbench.core.testing import byte_tokenizer
    from workbench.data.text import CalibrationConfig
    from workbench.plans.selection import SelectionConfig
    from workbench.runs.pipeline import PruneRunConfig, run_pruning
    from workbench.surgery.reconstruct import prune_and_reconstruct

    dense = tiny_model("qwen3", n_layers=3, seed=3)
    plan = random_plan(layer_widths(dense), 0.3, seed=1, empty_blocks=1)
    ids = _samples()
    copy_model = copy.deepcopy(dense)
    apply_plan(copy_model, plan)
    reconstruct(dense, copy_model, plan, ids, cache=False, progress=False)
    in_place = copy.deepcopy(dense)
    report, rec = prune_and_reconstruct(in_place, plan, ids, ReconstructConfig(), progress=False)
    assert rec is not None and report.params_after < report.params_before
    assert torch.equal(_logits(in_place, ids), _logits(copy_model, ids))

    exp = Experiment.create("rec", base=tmp_path)
    cfg = PruneRunConfig(calibration=CalibrationConfig(num_samples=4, seq_len=32, batch_size=2),
                         selection=SelectionConfig(ratio=0.2), eval_seq_len=32, eval_windows=4,
                         reconstruction=ReconstructConfig())
    record = run_pruning(tiny_model("llama", n_layers=3), byte_tokenizer(), cfg, exp, log=lambda *_: None,
                         progress=False)
    assert record["reload_max_abs_diff"] == 0.0
    assert exp.read_json("config.json")["run"]["reconstruction"]["mode"] == "one_shot"


def test_saving_leaves_the_live_model_s_fingerprint_and_cache_keys_alone(tmp_path):
    """transformers' save_pretrained writes `architectures` into the live config; a saved model keeps the cache
    keys it had before (the saved file still names its architecture)."""
    import json

    from workbench.core.cache import model_fingerprint
    from workbench.surgery.checkpoints import save_pruned

    model = tiny_model("qwen2", n_layers=2)
    before = model_fingerprint(model)
    save_pruned(model, tmp_path / "ckpt")
    assert model_fingerprint(model) == before
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


# ----------------------------------------------------------------------------------------------
# Each block's ridge chosen by cross-validation (cv_folds)


def _explicit_refit(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, toward: str,
                    damping: float, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Ridge re-fit of the kept columns (and an undamped bias) from the activations themselves, by least squares on
    the rows [x_kept, 1] plus √(λ·s)·e_j pseudo-rows, s the mean of Σ x_j² over all columns (bias=False: no
    constant column; the returned bias is 0, the change of a kept bias)."""
    s = float(x.square().sum(0).mean())
    ones = torch.ones(len(x), int(bias), dtype=x.dtype)
    rows = torch.cat([x[:, kept], ones], dim=1)
    pseudo = torch.cat([(damping * s) ** 0.5 * torch.eye(len(kept), dtype=x.dtype),
                        torch.zeros(len(kept), int(bias), dtype=x.dtype)], dim=1)
    target = (damping * s) ** 0.5 * (weight[:, kept].T if toward == "dense" else torch.zeros(len(kept), len(y.T),
                                                                                            dtype=x.dtype))
    sol = torch.linalg.lstsq(torch.cat([rows, pseudo]), torch.cat([y, target])).solution
    return (sol[:-1].T, sol[-1]) if bias else (sol.T, 0.0)


@pytest.mark.parametrize("bias", [True, False])
def test_cv_errors_are_the_held_out_errors_of_explicit_refits(bias):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(7, 7, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, 7, generator=g, dtype=torch.float64) @ mix + 0.3 for n in (15, 11, 13)]
    weight, b_dense = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, generator=g,
                                                                                       dtype=torch.float64)
    folds = [NormalEquations(7) for _ in xs]
    for ne, x in zip(folds, xs):
        ne.add(x)
    kept = torch.tensor([0, 2, 3, 6])
    ridges = (("zero", 1e-4), ("zero", 0.3), ("dense", 0.05), ("dense", 2.0))
    got = cv_errors(folds, weight, b_dense, kept, ridges, fit_bias=bias)
    assert list(got) == list(ridges)
    for toward, damping in ridges:
        want = 0.0
        for k, x_out in enumerate(xs):
            x_in = torch.cat([x for j, x in enumerate(xs) if j != k])
            y_in = x_in @ weight.T + (b_dense if bias else 0)  # without a fitted bias the kept b cancels
            w, b = _explicit_refit(x_in, y_in, weight, kept, toward, damping, bias)
            want += float(((x_out @ weight.T + (b_dense if bias else 0)) - (x_out[:, kept] @ w.T + b)).square().sum())
        assert got[(toward, damping)] == pytest.approx(want, rel=1e-7), (toward, damping)
    assert len({round(v, 6) for v in got.values()}) == len(ridges)  # the ridges do differ here


@pytest.mark.parametrize("mode", MODES)
def test_one_ridge_to_choose_from_is_the_fixed_ridge(mode):
    """Cross-validation's folds sum to the Gram of all tokens: with one candidate it re-fits as the fixed ridge."""
    dense = tiny_model("llama", n_layers=3, seed=2)
    plan = random_plan(layer_widths(dense), 0.4, seed=3, empty_blocks=1)
    ids = _samples(8)
    cv = solve_reconstruction(dense, plan, ids, ReconstructConfig(mode=mode, batch_size=2, cv_folds=3,
                                                                  cv_ridges=(("dense", 0.1),)), cache=False,
                              progress=False)
    fixed = solve_reconstruction(dense, plan, ids, ReconstructConfig(mode=mode, batch_size=2, damping=0.1,
                                                                     toward="dense"), cache=False, progress=False)
    assert cv.solutions.keys() == fixed.solutions.keys() and cv.solutions
    emptied = 0
    for key, sol in cv.solutions.items():
        torch.testing.assert_close(sol["bias"], fixed.solutions[key]["bias"], rtol=1e-5, atol=1e-6)
        if sol["weight"] is None:  # an emptied block: its mean output only, no ridge to choose
            emptied += 1
            assert fixed.solutions[key]["weight"] is None and "ridge" not in sol
            continue
        torch.testing.assert_close(sol["weight"], fixed.solutions[key]["weight"], rtol=1e-5, atol=1e-6)
        assert (sol["ridge"]["toward"], sol["ridge"]["damping"], sol["ridge"]["cv_error"]) == ("dense", 0.1, 1.0)
    assert emptied == 1 and not any("ridge" in sol for sol in fixed.solutions.values())


def test_each_block_takes_the_ridge_of_its_lowest_held_out_error():
    """Batch n is in fold n mod K; each block's choice is the minimum of `cv_errors` over those folds, and its
    re-fit is the fixed re-fit with that ridge on all tokens."""
    from workbench.scoring.refit import gram_sums

    dense = tiny_model("mistral", n_layers=2, seed=4)
    plan = random_plan(layer_widths(dense), 0.5, seed=5)
    ids = _samples(12, seq=16)
    ridges = (("zero", 1e-4), ("zero", 1.0), ("dense", 0.01), ("dense", 1.0), ("dense", 30.0))
    cfg = ReconstructConfig(batch_size=3, cv_folds=2, cv_ridges=ridges)
    rec = solve_reconstruction(dense, plan, ids, cfg, cache=False, progress=False)
    folds: list[dict] = [{}, {}]
    with torch.no_grad():
        for n, s in enumerate(range(0, 12, 3)):
            with gram_sums(dense, BLOCKS, lambda *_: True, into=folds[n % 2]):
                dense(input_ids=ids[s:s + 3], use_cache=False)
    spec = get_spec(dense)
    chosen = set()
    for (i, block), sol in rec.solutions.items():
        proj = layer_parts(decoder_layers(dense, spec)[i], spec).out_proj(block)
        kept = _kept_columns(plan, i, block, proj.in_features)
        errors = cv_errors([f[i, block] for f in folds], proj.weight, proj.bias, kept, ridges)
        best = min(errors, key=lambda r: errors[r])
        assert (sol["ridge"]["toward"], sol["ridge"]["damping"]) == best
        assert sol["ridge"]["cv_error"] == pytest.approx(errors[best] / errors[("zero", 1e-4)])
        alone = solve_reconstruction(dense, plan, ids, ReconstructConfig(batch_size=3, damping=best[1], toward=best[0]),
                                     cache=False, progress=False).solutions[(i, block)]
        torch.testing.assert_close(sol["weight"], alone["weight"], rtol=1e-5, atol=1e-6)
        chosen.add(best)
    summary = rec.summary()
    assert summary["ridge"] == dict(cv_folds=2, cv_ridges=[list(r) for r in ridges])
    assert len(summary["chosen_ridges"]) == len(rec.solutions) and rec.ridge_counts()
    assert len(chosen) > 1, chosen  # the blocks do not all choose alike: the choice is per block


@pytest.mark.parametrize("kw, match", [
    (dict(cv_folds=1), "cv_folds=1 must be 0"),
    (dict(cv_folds=-2), "cv_folds=-2"),
    (dict(cv_folds=True), "cv_folds=True"),
    (dict(cv_folds=4, weights=False), "fits only the bias"),
    (dict(cv_folds=4, damping=0.1), "damping=0.1 / toward='zero' would not be used"),
    (dict(cv_folds=4, toward="dense"), "would not be used"),
    (dict(cv_ridges=()), "non-empty list"),
    (dict(cv_ridges=(("up", 0.1),)), "toward one of"),
    (dict(cv_ridges=(("dense", -1.0),)), "λ a finite number >= 0"),
    (dict(cv_ridges=(("dense", float("nan")),)), "λ a finite number"),
    (dict(cv_ridges=(("dense", 0.1), ("dense", 0.1))), "twice"),
])
def test_bad_cross_validation_settings_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        ReconstructConfig(**kw)


def test_more_folds_than_batches_are_refused_before_any_pass():
    dense = tiny_model("llama", n_layers=2)
    plan = random_plan(layer_widths(dense), 0.3)
    with pytest.raises(ValueError, match=r"cv_folds=4 needs at least 4 calibration batches \(the folds are "
                                         r"batches\), but 8 samples in batches of batch_size=4 make 2"):
        solve_reconstruction(dense, plan, _samples(8), ReconstructConfig(cv_folds=4, batch_size=4), cache=False,
                             progress=False)


def test_the_fixed_ridge_keeps_its_cache_key():
    from dataclasses import asdict

    from workbench.core.cache import make_key

    dense = tiny_model("llama", n_layers=2)
    plan = random_plan(layer_widths(dense), 0.3)
    ids = _samples(4)
    rec = solve_reconstruction(dense, plan, ids, ReconstructConfig(), cache=False, progress=False)
    old = {k: v for k, v in asdict(ReconstructConfig()).items() if k not in ("toward", "cv_folds", "cv_ridges")}
    assert rec.key == make_key(model=dense, data=ids, settings=dict(plan=plan.removed, **old))
    cv = solve_reconstruction(dense, plan, ids, ReconstructConfig(cv_folds=2, batch_size=2), cache=False,
                              progress=False)
    assert cv.key != rec.key


@pytest.mark.parametrize("cv_folds", [0, 2])
def test_one_shot_replays_the_layers_that_do_not_fit_with_one_layer_s_grams_at_a_time(monkeypatch, cv_folds):
    """With too little free memory for every block's Gram matrices at once, the one-shot re-fit keeps the first
    layers' from its dense pass and replays the others one layer at a time: the same solutions (and ridges), and
    never more than one layer's matrices beyond the held ones."""
    import importlib
    import weakref

    rec_mod = importlib.import_module("workbench.surgery.reconstruct")  # the module (the package exports a function)

    dense = tiny_model("qwen2", n_layers=4, seed=6)
    plan = random_plan(layer_widths(dense), 0.4, seed=7, empty_blocks=1, remove_layers=1)
    ids = _samples(8)
    cfg = ReconstructConfig(batch_size=2, cv_folds=cv_folds)
    everything = solve_reconstruction(dense, plan, ids, cfg, cache=False, progress=False)
    spec, k = get_spec(dense), max(cv_folds, 1)
    layers = decoder_layers(dense, spec)
    first = min(i for i, _ in everything.solutions)
    first_bytes = sum(8 * k * (layer_parts(layers[i], spec).out_proj(b).in_features + 1) ** 2
                      for i, b in everything.solutions if i == first)
    alive: weakref.WeakSet = weakref.WeakSet()
    most = [0]
    init = NormalEquations.__init__

    def counted(self, *args, **kwargs):
        init(self, *args, **kwargs)
        alive.add(self)
        most[0] = max(most[0], len(alive))

    monkeypatch.setattr(NormalEquations, "__init__", counted)
    per_layer = 2 * k + 1  # two blocks' folds and, while one is solved, their sum
    for free, held in ((0, set()), (2 * first_bytes, {first})):
        monkeypatch.setattr(rec_mod, "free_bytes", lambda device, free=free: free)
        assert rec_mod.held_layers(dense, spec, list(everything.solutions), k, free // 2) == held
        most[0] = 0
        replayed = solve_reconstruction(dense, plan, ids, cfg, cache=False, progress=False)
        assert list(replayed.solutions) == list(everything.solutions)
        for key, sol in everything.solutions.items():
            for part in ("weight", "bias"):
                if sol[part] is None:
                    assert replayed.solutions[key][part] is None
                else:
                    torch.testing.assert_close(replayed.solutions[key][part], sol[part], rtol=1e-5, atol=1e-6)
            assert replayed.solutions[key].get("ridge", {}).get("damping") == sol.get("ridge", {}).get("damping")
        held_count = sum(2 * k for i, _ in everything.solutions if i in held)
        assert 0 < most[0] <= held_count + per_layer, (most[0], held_count)
