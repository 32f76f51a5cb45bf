"""Reconstruction-aware scores: the greedy Optimal Brain Surgeon order agrees with explicit re-fits of every
prefix, the output Fisher is the summed NLL's squared output gradient, and the `refit` method makes plans that
take a prefix of each block's order, on every family, through the run files too."""
import pytest
import torch

from workbench.core.arch import BLOCKS, decoder_layers, get_spec, layer_parts
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


def _objective(ne: NormalEquations, w, b, f, kept_cols, damping):
    """The row-weighted ridge objective of the best re-fit on `kept_cols` (+ the constant), solved explicitly."""
    n = ne.gram.shape[0] - 1
    g_full = damped(ne.gram, damping, n)
    idx = torch.cat([torch.as_tensor(kept_cols, dtype=torch.long), torch.tensor([n])])
    w_aug = torch.cat([w.T, b[None]], 0)
    cross = ne.gram[idx] @ w_aug
    sol = torch.linalg.solve(g_full[idx][:, idx], cross)
    # Σ_r f_r (‖y_r − X̃_S w'_r‖² + λ'·‖w'_r‖² over the damped columns) = tr_f(W̃ᵀ G W̃) − tr_f(Cᵀ G̃_S⁻¹ C)
    total = (f * (w_aug * (ne.gram @ w_aug)).sum(0)).sum()
    return float(total - (f * (cross * sol).sum(0)).sum())


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_every_prefix_matches_an_explicit_refit(damping):
    x, w, b, f, ne = _block()
    order, marginal = removal_order(ne.gram, w, b, f, 12, damping=damping, steps=12)  # one channel at a time
    assert sorted(order.tolist()) == list(range(12))
    base = _objective(ne, w, b, f, list(range(12)), damping)
    for k in range(1, 12):
        kept = sorted(set(range(12)) - set(order[:k].tolist()))
        explicit = _objective(ne, w, b, f, kept, damping) - base
        assert float(marginal[:k].sum()) == pytest.approx(explicit, rel=1e-6, abs=1e-6 * abs(base) + 1e-9), k
    assert int(order[0]) == 3  # the reproducible column goes first
    # greedy: each step removes the unit whose own removal costs least at that point
    first = [_objective(ne, w, b, f, [c for c in range(12) if c != u], damping) for u in range(12)]
    assert int(order[0]) == min(range(12), key=first.__getitem__)


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
    with pytest.raises(ValueError, match="does not run data-parallel"):
        compute_importance(model, samples, refit=True, data_parallel=True, progress=False)
    with pytest.raises(TypeError, match="refit='yes' must be True or False"):
        CalibrationConfig(refit="yes")
    # cached apart from the plain pass
    with_refit = importance_cached(model, samples, cache=tmp_path, progress=False, refit=True)
    assert with_refit.key != plain.key and with_refit.acc.refit is not None


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
    capsys.readouterr()
    assert main(["run", str(run), "calibration.refit=false", "--name", "no", "--quiet"]) == 2
    assert "scoring.method=refit needs the re-fit scores of the calibration pass: set calibration.refit=true" in \
        capsys.readouterr().err
    assert not (tmp_path / "experiments" / "no").exists()


def test_the_refit_sweep_file_expands_to_valid_runs():
    from pathlib import Path

    from workbench.runs.sweep import expand, load_sweep
    runs = expand(load_sweep(Path(__file__).resolve().parents[2] / "configs" / "refit.yaml"))
    assert len(runs) == 8 and all(r.calibration.refit and r.reconstruction is not None for r in runs)
    assert {r.scoring.method for r in runs} == {"taylor", "refit"}


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
