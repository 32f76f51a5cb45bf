"""Reconstruction-aware scores: the greedy Optimal Brain Surgeon order agrees with explicit re-fits of every
prefix, the output Fisher is the summed NLL's squared output gradient, and the `refit` method makes plans that
take a prefix of each block's order, on every family, through the run files too."""
import pytest
import torch

from workbench.core.arch import BLOCKS, decoder_layers, get_spec, layer_parts
from workbench.core.cache import make_key
from workbench.core.testing import TINY_FAMILIES, tiny_model
from workbench.data.text import CalibrationConfig
from workbench.plans.normalize import ScoringConfig
from workbench.plans.plan import random_plan
from workbench.plans.rescore import Rescorer
from workbench.plans.selection import Budget, SelectionConfig
from workbench.scoring.importance import compute_importance, importance_cached
from workbench.scoring.methods import available_methods
from workbench.scoring.refit import NormalEquations, damped, pooled, removal_order
from workbench.surgery.prune import apply_plan


def _block(n_in=12, n_out=5, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) @ torch.randn(n_in, n_in, generator=g,
                                                                                   dtype=torch.float64)
    # a column the others nearly reproduce: removing it costs almost nothing
    x[:, 3] = 0.7 * x[:, 1] - 0.2 * x[:, 5] + 0.01 * torch.randn(tokens, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    b = torch.randn(n_out, generator=g, dtype=torch.float64)
    f = torch.rand(n_out, generator=g, dtype=torch.float64) + 0.1
    ne = NormalEquations(n_in)
    ne.gram += torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], 1).T @ \
        torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], 1)
    return x, w, b, f, ne


def _objective(ne: NormalEquations, w, b, f, kept_cols, damping, toward="zero"):
    """The row-weighted ridge objective of the best re-fit on `kept_cols` (+ the constant), solved explicitly,
    written out by brute force: the re-fitted weights from an explicit solve, then every term of the sum."""
    n = ne.gram.shape[0] - 1
    g_full = damped(ne.gram, damping, n)
    kept = torch.as_tensor(kept_cols, dtype=torch.long)
    idx = torch.cat([kept, torch.tensor([n])])
    w_aug = torch.cat([w.T, b[None]], 0)  # [n + 1, n_out]
    lam = torch.diagonal(g_full - ne.gram)  # λ·mean(diag G) on the input columns, 0 on the constant
    prior = w_aug if toward == "dense" else torch.zeros_like(w_aug)  # what the ridge pulls each weight toward
    # normal equations of  ‖X̃ W̃ − X̃_S W'‖² + Σ_{j∈S} λ_j ‖W'_j − prior_j‖²  (and λ_j ‖prior_j‖² for j removed)
    sol = torch.linalg.solve(g_full[idx][:, idx], ne.gram[idx] @ w_aug + lam[idx, None] * prior[idx])
    diff = torch.zeros_like(w_aug)
    diff[idx] = sol
    diff = w_aug - diff  # the change of every weight (removed ones: their whole value)
    fit = (diff * (ne.gram @ diff)).sum(0)  # Σ_tokens (y − y')² per output row
    ridge = (lam[:, None] * (torch.zeros_like(w_aug).index_copy(0, idx, sol) - prior).square())
    ridge[~torch.isin(torch.arange(n + 1), idx)] = (lam[:, None] * prior.square())[~torch.isin(torch.arange(n + 1), idx)]
    return float((f * (fit + ridge.sum(0))).sum())


@pytest.mark.parametrize("damping,toward", [(0.0, "zero"), (1e-2, "zero"), (1e-2, "dense"), (0.3, "dense")])
def test_every_prefix_matches_an_explicit_refit(damping, toward):
    x, w, b, f, ne = _block()
    order, marginal = removal_order(ne.gram, w, b, f, 12, damping=damping, steps=12, toward=toward)  # one at a time
    assert sorted(order.tolist()) == list(range(12))
    base = _objective(ne, w, b, f, list(range(12)), damping, toward)
    if toward == "dense":
        assert base == pytest.approx(0, abs=1e-9)  # toward the dense weights, keeping every unit costs nothing
    for k in range(1, 12):
        kept = sorted(set(range(12)) - set(order[:k].tolist()))
        explicit = _objective(ne, w, b, f, kept, damping, toward) - base
        assert float(marginal[:k].sum()) == pytest.approx(explicit, rel=1e-6, abs=1e-6 * abs(base) + 1e-9), k
    if damping <= 1e-2:  # (a strong pull toward the dense weights counts a removed column's own size too)
        assert int(order[0]) == 3  # the reproducible column goes first
    # greedy: each step removes the unit whose own removal costs least at that point
    first = [_objective(ne, w, b, f, [c for c in range(12) if c != u], damping, toward) for u in range(12)]
    assert int(order[0]) == min(range(12), key=first.__getitem__)


def test_the_ridge_toward_the_dense_weights_leaves_a_whole_block_as_it_was():
    x, w, b, f, ne = _block()
    every = torch.arange(12)
    same = ne.solve(w, b, every, damping=0.5, toward="dense")
    torch.testing.assert_close(same["weight"], w.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(same["bias"], b.float(), rtol=1e-5, atol=1e-5)
    shrunk = ne.solve(w, b, every, damping=0.5)  # plain ridge pulls the weights toward zero
    assert float(shrunk["weight"].norm()) < 0.99 * float(w.norm())
    # with a column removed, the re-fit is the explicit ridge-toward-dense solution
    kept = torch.tensor([c for c in range(12) if c != 5])
    got = ne.solve(w, b, kept, damping=0.5, toward="dense")
    g = damped(ne.gram, 0.5, 12)
    idx = torch.cat([kept, torch.tensor([12])])
    want = torch.linalg.solve(g[idx][:, idx], g[idx] @ torch.cat([w.T, b[None]], 0))
    torch.testing.assert_close(got["weight"], want[:-1].T.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="toward='up' is not allowed"):
        ne.solve(w, b, kept, damping=0.5, toward="up")
    with pytest.raises(ValueError, match="toward='up' is not allowed"):
        removal_order(ne.gram, w, b, f, 12, toward="up")


def test_batches_are_exact_at_their_ends_and_groups_of_columns():
    x, w, b, f, ne = _block(n_in=12)
    order, marginal = removal_order(ne.gram, w, b, f, 12, damping=0.0, steps=4)  # 3 channels per batch
    for k in (3, 6, 9):
        kept = sorted(set(range(12)) - set(order[:k].tolist()))
        assert float(marginal[:k].sum()) == pytest.approx(_objective(ne, w, b, f, kept, 0.0), rel=1e-6, abs=1e-8)
    # units of 4 consecutive columns (KV groups): removed one group at a time, exact at every prefix
    order, marginal = removal_order(ne.gram, w, b, f, 3, damping=1e-3)
    for k in (1, 2, 3):
        kept = [c for u in range(3) if u not in order[:k].tolist() for c in range(4 * u, 4 * u + 4)]
        assert float(marginal[:k].sum()) == pytest.approx(
            _objective(ne, w, b, f, kept, 1e-3) - _objective(ne, w, b, f, list(range(12)), 1e-3), rel=1e-6)
    with pytest.raises(ValueError, match="do not split into 5 units"):
        removal_order(ne.gram, w, b, f, 5)


def test_pooled_scores_rise_along_the_order():
    order = torch.tensor([4, 2, 0, 1, 3])
    marginal = torch.tensor([1.0, 5.0, 2.0, 2.0, 9.0])
    s = pooled(order, marginal)
    along = s[order]
    assert (along[1:] > along[:-1]).all()  # strictly rising: the lowest k scores are the first k of the order
    assert float(along.sum()) == pytest.approx(float(marginal.sum()), rel=1e-6)  # pooling keeps the total
    assert float(along[1]) == pytest.approx(3.0, rel=1e-6)  # 5, 2, 2 pooled


def test_output_fisher_is_the_summed_nll_squared_gradient():
    model = tiny_model("llama", n_layers=2, seed=3)
    samples = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(2))
    from workbench.scoring.hooks import terms_fn
    from workbench.scoring.importance import ImportancePass
    run = ImportancePass(model, per_sequence=False, terms=terms_fn("eager"), outputs=True)
    with run.hooks():
        run.batch(samples)
    got = run.checked_output_sums()
    # direct: the gradient of Σ NLL with respect to each o_proj / down_proj output
    spec = get_spec(model)
    outs = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        parts = layer_parts(layer, spec)
        for block in BLOCKS:
            def keep(_m, _a, y, key=(i, block)):
                y.retain_grad()
                outs[key] = y
            handles.append(parts.out_proj(block).register_forward_hook(keep))
    logits = model(input_ids=samples, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), samples[:, 1:].reshape(-1),
                                            reduction="sum")
    nll.backward()
    for h in handles:
        h.remove()
    for key, y in outs.items():
        assert torch.allclose(got[key].float(), y.grad.square().sum((0, 1)), rtol=1e-3, atol=1e-9), key


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_refit_plans_on_every_family_take_prefixes(family):
    model = tiny_model(family, n_layers=3, seed=4)
    samples = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    imp = compute_importance(model, samples, batch_size=4, refit=True, progress=False)
    assert "refit" in available_methods(imp)
    _, plan = Rescorer(imp, Budget.of(model)).plan(ScoringConfig(method="refit"), SelectionConfig(ratio=0.25))
    assert plan.achieved_ratio >= 0.25 and plan.provenance.method == "refit"
    for block in BLOCKS:
        for i, removed in enumerate(plan.removed[block]):
            by_order = torch.argsort(imp.acc.refit[block][i].double())  # the greedy order (strictly rising scores)
            assert sorted(removed) == sorted(by_order[: len(removed)].tolist()), (block, i)
            assert (imp.acc.refit[block][i] >= 0).all()


def test_refit_on_a_pruned_model_with_an_emptied_block():
    model = tiny_model("llama", n_layers=3, seed=4)
    plan = random_plan([(2, 96)] * 3, 0.25, seed=1, empty_blocks=1)
    apply_plan(model, plan)
    samples = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    imp = compute_importance(model, samples, batch_size=2, refit=True, progress=False)
    for block in BLOCKS:
        assert [len(t) for t in imp.acc.refit[block]] == [w[BLOCKS.index(block)] for w in imp.widths]


def test_refit_needs_its_pass_and_refuses_clearly(tmp_path):
    model = tiny_model("llama", n_layers=2, seed=4)
    samples = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    plain = importance_cached(model, samples, cache=tmp_path, progress=False)
    assert "refit" not in available_methods(plain)
    with pytest.raises(ValueError, match=r"needs the re-fit scores; calibrate with refit=True"):
        plain.scores("refit")
    with pytest.raises(TypeError, match="refit='yes' must be True or False"):
        CalibrationConfig(refit="yes")
    for bad, match in [(dict(refit_toward="up"), "refit_toward='up' is not allowed"),
                       (dict(refit_damping=-1.0), "refit_damping=-1.0 must be a finite number >= 0"),
                       (dict(refit_damping=float("nan")), "refit_damping=nan must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=match):
            CalibrationConfig(refit=True, **bad)
    # cached apart from the plain pass, and apart from another ridge; the default ridge keeps its earlier key
    with_refit = importance_cached(model, samples, cache=tmp_path, progress=False, refit=True)
    assert with_refit.key != plain.key and with_refit.acc.refit is not None
    assert with_refit.key == make_key(model=model, data=samples, settings=dict(batch_size=4, fisher="batch", refit=True))
    dense = importance_cached(model, samples, cache=tmp_path, progress=False, refit=True, refit_toward="dense",
                              refit_damping=0.1)
    assert dense.key != with_refit.key
    assert any(not torch.equal(a, b) for a, b in zip(dense.acc.refit["mlp"], with_refit.acc.refit["mlp"]))


def test_a_run_re_fits_with_the_ridge_its_scores_assumed(tokenizer):
    from workbench.runs.pipeline import PruneRunConfig, calibrate, make_run_plan
    from workbench.surgery.reconstruct import ReconstructConfig

    cal = CalibrationConfig(num_samples=4, seq_len=16, batch_size=2, refit=True, refit_toward="dense",
                            refit_damping=0.1)
    with pytest.raises(ValueError, match=r"scoring.method=refit scores units for a re-fit with damping=0.1, "
                                         r"toward='dense' .* but the reconstruction uses damping=0.0001, "
                                         r"toward='zero': set both the same"):
        PruneRunConfig(calibration=cal, scoring=ScoringConfig(method="refit"), reconstruction=ReconstructConfig())
    PruneRunConfig(calibration=cal, scoring=ScoringConfig(method="taylor"), reconstruction=ReconstructConfig())
    model = tiny_model("llama", n_layers=2, seed=4)
    samples, imp = calibrate(model, tokenizer, cal, progress=False)
    for cfg in (PruneRunConfig(calibration=cal, baseline="global_refit", selection=SelectionConfig(ratio=0.2)),
                PruneRunConfig(calibration=cal, scoring=ScoringConfig(method="refit"), selection=SelectionConfig(
                    ratio=0.2), reconstruction=ReconstructConfig(damping=0.1, toward="dense"))):
        _, _, compensation = make_run_plan(model, cfg, samples, imp, progress=False)
        assert (compensation.damping, compensation.toward) == (0.1, "dense")
    # or each block chooses its ridge by cross-validation, whatever ridge the scores assumed
    cfg = PruneRunConfig(calibration=cal, baseline="global_refit", selection=SelectionConfig(ratio=0.2),
                         reconstruction=ReconstructConfig(cv_folds=2, batch_size=2))
    assert make_run_plan(model, cfg, samples, imp, progress=False)[2].cv_folds == 2


@pytest.mark.slow
def test_a_run_file_prunes_by_the_refit_score_and_refuses_without_its_pass(tmp_path, capsys):
    import json

    from workbench.runs.cli import main
    run = tmp_path / "run.yaml"
    run.write_text("model: {name: tiny}\ncalibration: {num_samples: 4, seq_len: 32, batch_size: 2, refit: true}\n"
                   "scoring: {method: refit}\nselection: {ratio: 0.2}\nreconstruction: {mode: one_shot}\n"
                   "eval_windows: 4\neval_seq_len: 32\nsave_model: false\n")
    assert main(["run", str(run), "--name", "refit", "--quiet"]) == 0
    rec = json.loads((tmp_path / "experiments" / "refit" / "evaluation" / "perplexity.json").read_text())
    assert rec["plan"]["settings"]["method"] == "refit" and rec["report"]["ratio_total"] >= 0.2
    assert rec["reconstruction"]["ridge"] == dict(damping=1e-4, toward="zero") and rec["reconstruction"]["blocks"]
    capsys.readouterr()
    assert main(["run", str(run), "reconstruction.cv_folds=2", "--name", "few", "--quiet"]) == 2  # 4 samples: 1 batch
    assert "reconstruction: cv_folds=2 needs at least 2 calibration batches (the folds are batches), but 4 samples " \
           "in batches of batch_size=4 make 1" in capsys.readouterr().err
    assert not (tmp_path / "experiments" / "few").exists()
    assert main(["run", str(run), "reconstruction.cv_folds=2", "reconstruction.batch_size=2", "--name", "cv",
                 "--quiet"]) == 0
    cv = json.loads((tmp_path / "experiments" / "cv" / "evaluation" / "perplexity.json").read_text())["reconstruction"]
    assert cv["ridge"]["cv_folds"] == 2 and 0 < len(cv["chosen_ridges"]) <= cv["blocks"]  # emptied: no choice
    assert {tuple(r) for r in cv["ridge"]["cv_ridges"]} >= {(c["toward"], c["damping"]) for c in cv["chosen_ridges"]}
    capsys.readouterr()
    assert main(["run", str(run), "calibration.refit=false", "--name", "no", "--quiet"]) == 2
    assert "scoring.method=refit needs the re-fit scores of the calibration pass: set calibration.refit=true" in \
        capsys.readouterr().err
    assert not (tmp_path / "experiments" / "no").exists()


def test_the_refit_sweep_file_expands_to_valid_runs():
    from pathlib import Path

    from workbench.runs.config import ConfigError
    from workbench.runs.sweep import expand, load_sweep
    path = Path(__file__).resolve().parents[2] / "configs" / "refit.yaml"
    runs = expand(load_sweep(path))
    assert len(runs) == 8 and all(r.calibration.refit and r.reconstruction is not None for r in runs)
    assert {r.scoring.method for r in runs} == {"taylor", "refit"}
    # the ridge toward the dense weights, set for the scores and the re-fit alike (the file's second command)
    dense = expand(load_sweep(path, ["calibration.refit_toward=dense", "calibration.refit_damping=0.1",
                                     "reconstruction.toward=dense", "reconstruction.damping=0.1"]))
    assert all((r.reconstruction.toward, r.calibration.refit_damping) == ("dense", 0.1) for r in dense)
    with pytest.raises(ConfigError, match="scores units for a re-fit with damping=0.0001, toward='dense'"):
        expand(load_sweep(path, ["calibration.refit_toward=dense"]))  # a sweep cannot mix two ridges
    # the file's third command: each block's ridge by cross-validation, whatever the scores assumed
    cv = expand(load_sweep(path, ["reconstruction.cv_folds=4"]))
    assert len(cv) == 8 and all(r.reconstruction.cv_folds == 4 for r in cv)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_the_pass_records_the_inputs_a_forward_pass_of_its_own_would(family):
    """The importance pass records the layers' inputs for the replay; a separate forward pass gives the same scores."""
    from workbench.scoring.hooks import terms_fn
    from workbench.scoring.importance import ImportancePass
    from workbench.scoring.refit import refit_scores

    model = tiny_model(family, n_layers=3, seed=2)
    samples = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(5))
    imp = compute_importance(model, samples, batch_size=3, refit=True, progress=False)
    run = ImportancePass(model, per_sequence=False, terms=terms_fn("eager"), outputs=True)
    with run.hooks():
        for s in range(0, 6, 3):
            run.batch(samples[s : s + 3])
    model.zero_grad(set_to_none=True)
    assert len(run.recorded[0]) == 2 and all(len(c) == 3 for c in run.recorded[1])  # 2 batches, 3 layers each
    assert not any(h.requires_grad for h in run.recorded[0])
    alone, _ = refit_scores(model, samples, run.checked_output_sums(), run.n_tokens, batch_size=3, progress=False)
    for block in BLOCKS:
        for a, b in zip(imp.acc.refit[block], alone[block]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("fisher", ["batch", "sequence"])
def test_refit_scores_are_the_same_with_checkpointing_and_per_sequence_passes(fisher):
    model = tiny_model("qwen2", n_layers=3, seed=6)
    samples = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(3))
    plain = compute_importance(model, samples, batch_size=3, refit=True, progress=False)
    other = compute_importance(model, samples, batch_size=3, refit=True, progress=False, fisher=fisher,
                               gradient_checkpointing=True)
    for block in BLOCKS:
        for a, b in zip(plain.acc.refit[block], other.acc.refit[block]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
