import math
import pytest

import torch
import torch.nn.functional as F

from workbench.data import evaluation_windows
from workbench.evaluate import perplexity
from workbench.models import tiny_model


def test_perplexity_equals_exp_mean_token_nll(tokenizer):
    model = tiny_model("llama", vocab_size=260)
    res = perplexity(model, tokenizer, "pydoc", seq_len=32, max_windows=5, batch_size=2, progress=False)
    windows = evaluation_windows(tokenizer, "pydoc", 32, 5)
    nlls = []
    with torch.no_grad():
        for w in windows:  # one window at a time, token by token log-softmax
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nlls += [-logp[t, w[t + 1]].item() for t in range(31)]
    expected = math.exp(sum(nlls) / len(nlls))
    assert math.isclose(res.ppl, expected, rel_tol=1e-5)
    assert (res.windows, res.tokens, res.seq_len, res.split, res.source) == (5, 5 * 31, 32, "evaluation", "pydoc")
    assert res.model == "tiny-llama"


def test_perplexity_after_prunes_a_copy(tokenizer):
    from workbench.evaluate import perplexity_after
    from workbench.models import layer_widths, parameter_count, tiny_model
    from workbench.prune import apply_plan
    from workbench.selection import random_plan

    model = tiny_model("qwen2", n_layers=3)
    plan = random_plan(layer_widths(model), 0.4, seed=1, empty_blocks=1)
    before = parameter_count(model)
    got = perplexity_after(model, tokenizer, plan, seq_len=32, max_windows=3, progress=False)
    assert parameter_count(model) == before
    reference = tiny_model("qwen2", n_layers=3)
    apply_plan(reference, plan)
    want = perplexity(reference, tokenizer, seq_len=32, max_windows=3, progress=False)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-6)
