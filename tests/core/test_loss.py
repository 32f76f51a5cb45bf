"""The one loss loop agrees with transformers' own loss, and every user of it gets the same number."""
import math

import pytest
import torch

from workbench.core.loss import summed_nll, token_batches
from workbench.core.testing import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_summed_nll_is_transformers_loss_with_ignored_labels(family):
    model = tiny_model(family, n_layers=2)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not learned
    total, count = summed_nll(model, [{"input_ids": ids, "labels": labels}])
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels, use_cache=False).loss
    assert count == int((labels[:, 1:] != -100).sum())
    assert total / count == pytest.approx(float(ref), rel=1e-5)


def test_perplexity_removal_loss_and_xy_points_share_the_loop():
    from workbench.analysis.distribution import held_out_ppl
    from workbench.evaluation.evaluate import window_nll
    from workbench.plans.plan import Plan
    from workbench.scoring.removal import mean_loss

    model = tiny_model("llama", n_layers=2)
    ids = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(2))
    total, count = summed_nll(model, token_batches(ids, 2))
    assert window_nll(model, ids, batch_size=3, progress=False).tolist() == pytest.approx([total, count])
    assert mean_loss(model, ids, 2) == total / count  # the same batches: the same number
    assert mean_loss(model, ids, 4) == pytest.approx(total / count, rel=1e-6)  # other batches: float32 logits
    empty = Plan.from_units([(2, 96), (2, 96)], {})
    assert held_out_ppl(model, empty, ids, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-12)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size=0"):
        list(token_batches(torch.zeros(2, 4, dtype=torch.long), 0))


def test_a_run_reads_every_weight_once_for_its_cache_keys(monkeypatch):
    """Inside `fingerprint_once` the fingerprint is computed once (a run's calibration, per-layer measures,
    selection and model card); outside, every call reads the weights again, so a changed model gets a new key."""
    import workbench.core.cache as cache

    calls = []
    real = cache._fingerprint
    monkeypatch.setattr(cache, "_fingerprint", lambda m: calls.append(1) or real(m))
    model = tiny_model("llama", n_layers=2)
    with cache.fingerprint_once(model):
        first = cache.model_fingerprint(model)
        with cache.fingerprint_once(model):  # nested: still the same one
            assert cache.make_key(model=model) == cache.make_key(model=model)
        assert cache.model_fingerprint(model) == first
    assert len(calls) == 1
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert cache.model_fingerprint(model) != first and len(calls) == 2
