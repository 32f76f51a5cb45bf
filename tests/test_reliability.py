"""What the workbench guarantees: exact reloads per dtype, correct cached decoding after any plan, resumes of
the same run only, plans checked against the model, content-keyed caches, no data lost, confined paths, and
errors that name the bad value."""
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from workbench.core.arch import layer_widths
from workbench.core.cache import make_key, model_fingerprint
from workbench.core.experiments import Experiment
from workbench.core.testing import byte_tokenizer, tiny_model
from workbench.data.text import CalibrationConfig
from workbench.plans.normalize import ScoringConfig
from workbench.plans.plan import Plan, random_plan
from workbench.plans.selection import SelectionConfig, build_table, select, unit_costs
from workbench.runs.pipeline import save_and_check
from workbench.scoring.importance import compute_importance, importance_cached
from workbench.surgery.checkpoints import CheckpointError, load_model, load_pruned, save_pruned
from workbench.surgery.prune import apply_plan, mask_plan


def _hf_folder(tmp_path, family="llama", **kw):
    """A tiny model saved the way the hub serves one (float32 safetensors + tokenizer)."""
    model = tiny_model(family, **kw)
    folder = tmp_path / f"hf-{family}"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- 1. dtypes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_reload_is_bit_exact_in_every_dtype(tmp_path, dtype):
    model, _ = load_model(_hf_folder(tmp_path, n_layers=3), dtype=dtype)
    plan = random_plan(layer_widths(model), 0.3, seed=1, empty_blocks=1)
    apply_plan(model, plan)
    save_pruned(model, tmp_path / "out", plan=plan)
    again = load_pruned(tmp_path / "out", dtype=dtype)  # the name of a dtype works as well as the dtype
    ids = torch.randint(0, 256, (2, 400))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert again.model.rotary_emb.inv_freq.dtype == torch.float32


def test_pipeline_reload_check_is_zero_in_bf16(tmp_path):
    model, _ = load_model(_hf_folder(tmp_path, n_layers=3), dtype="bfloat16")
    plan = random_plan(layer_widths(model), 0.25, seed=0)
    apply_plan(model, plan)
    exp = Experiment.create("bf16", base=tmp_path)
    assert save_and_check(model, exp, torch.randint(0, 256, (2, 64)), plan=plan) == 0.0


# ---------------------------------------------------------------------------------------------- 2. cached decoding

DECODE_PLANS = {
    "first attention emptied": {"attn": {0: [0, 1]}, "mlp": {1: [1, 2, 3]}},
    "first layer removed": {"attn": {0: [0, 1]}, "mlp": {0: list(range(96)), 2: [5]}},
    "partial": {"attn": {1: [1]}, "mlp": {0: [0, 3], 2: list(range(40))}},
    "last attention emptied": {"attn": {2: [0, 1]}},
}


def _pair(family, plan_units):
    dense, pruned = tiny_model(family, n_layers=3), tiny_model(family, n_layers=3)
    plan = Plan.from_units(layer_widths(dense), plan_units)
    mask_plan(dense, plan)
    apply_plan(pruned, plan)
    return dense, pruned


@torch.no_grad()
def _step_by_step(model, ids, prompt):
    out = model(input_ids=ids[:, :prompt], use_cache=True)
    cache, logits = out.past_key_values, [out.logits[:, -1]]
    for t in range(prompt, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("kind", DECODE_PLANS)
def test_cached_step_by_step_decoding_matches_the_zeroed_dense_model(family, kind):
    dense, pruned = _pair(family, DECODE_PLANS[kind])
    ids = torch.randint(0, 256, (2, 12))
    want, _ = _step_by_step(dense, ids, 5)
    got, cache = _step_by_step(pruned, ids, 5)
    assert (got - want).abs().max() < 1e-4
    assert cache.get_seq_length() == 12
    with torch.no_grad():  # and the cache gives what one uncached forward gives
        full = pruned(input_ids=ids, use_cache=False).logits[:, 4:]
    assert (got - full).abs().max() < 1e-4


@pytest.mark.parametrize("kind", DECODE_PLANS)
def test_left_padded_batched_generation_matches_the_zeroed_dense_model(family, kind):
    dense, pruned = _pair(family, DECODE_PLANS[kind])
    ids = torch.randint(3, 256, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 257, 0  # left padding of the shorter prompt
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=257)
    with torch.no_grad():
        want = dense.generate(ids, **kw)
        got = pruned.generate(ids, **kw)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- 3. resume


def _ft_cfg(**kw):
    from workbench.recovery.finetune import FinetuneConfig

    return FinetuneConfig(**dict(dict(max_steps=4, seq_len=32, batch_size=2, eval_every=2, save_every=1,
                                      warmup_steps=0, lr=1e-3), **kw))


def _lora_modules(model):
    return [n for n, _ in model.named_modules() if "lora_" in n]


@pytest.mark.slow
def test_resume_refuses_another_model_and_leaves_it_untouched(tmp_path, tokenizer):
    from workbench.recovery.finetune import finetune

    ckpt = tmp_path / "ckpt"
    finetune(tiny_model("llama", n_layers=2, seed=0), tokenizer, _ft_cfg(), ckpt, stop_after=2, progress=False,
             log=lambda *_: None)
    for other in (tiny_model("llama", n_layers=2, seed=1), tiny_model("llama", n_layers=2, hidden=96, n_heads=6)):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match="another model"):
            finetune(other, tokenizer, _ft_cfg(), ckpt, progress=False, log=lambda *_: None)
        assert not _lora_modules(other)
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.slow
def test_resume_refuses_other_data(tmp_path, tokenizer):
    from workbench.data.recovery import text_examples
    from workbench.recovery.finetune import finetune

    ckpt = tmp_path / "ckpt"
    finetune(tiny_model("llama", n_layers=2), tokenizer, _ft_cfg(), ckpt, stop_after=1, progress=False,
             log=lambda *_: None)
    other = text_examples(tokenizer, "pydoc", 32).subset(torch.arange(0, 40))
    with pytest.raises(ValueError, match="other training data"):
        finetune(tiny_model("llama", n_layers=2), tokenizer, _ft_cfg(), ckpt, data=other, progress=False,
                 log=lambda *_: None)


@pytest.mark.slow
def test_a_stopped_runs_model_can_be_passed_back(tmp_path, tokenizer):
    from workbench.recovery.finetune import finetune

    ckpt = tmp_path / "ckpt"
    first = finetune(tiny_model("llama", n_layers=2), tokenizer, _ft_cfg(), ckpt, stop_after=2, progress=False,
                     log=lambda *_: None)
    assert not first.completed
    done = finetune(first.model, tokenizer, _ft_cfg(), ckpt, progress=False, log=lambda *_: None)
    straight = finetune(tiny_model("llama", n_layers=2), tokenizer, _ft_cfg(), tmp_path / "straight",
                        progress=False, log=lambda *_: None)
    assert done.completed and done.steps == 4 and not _lora_modules(done.model)
    for (n, a), (_, b) in zip(done.model.state_dict().items(), straight.model.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.slow
def test_a_damaged_state_file_is_named(tmp_path, tokenizer):
    from workbench.recovery.finetune import STATE_FILE, finetune

    ckpt = tmp_path / "ckpt"
    finetune(tiny_model("llama", n_layers=2), tokenizer, _ft_cfg(), ckpt, stop_after=1, progress=False,
             log=lambda *_: None)
    path = ckpt / STATE_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=STATE_FILE):
        finetune(tiny_model("llama", n_layers=2), tokenizer, _ft_cfg(), ckpt, progress=False, log=lambda *_: None)


# ---------------------------------------------------------------------------------------------- 4. widths


def test_importance_of_the_dense_model_is_refused_on_the_pruned_model():
    dense = tiny_model("llama", n_layers=3)
    imp = compute_importance(dense, torch.randint(0, 256, (2, 16)), progress=False)
    pruned = tiny_model("llama", n_layers=3)
    apply_plan(pruned, random_plan(layer_widths(pruned), 0.3, seed=0))
    table = build_table(imp.scores("taylor"), unit_costs(pruned))
    with pytest.raises(ValueError, match="widths"):
        select(table, pruned, SelectionConfig(ratio=0.2))


def test_plans_from_dicts_are_validated():
    widths = [(2, 8), (2, 8)]
    good = Plan.from_units(widths, {"mlp": {0: [1, 2]}}).to_dict()
    assert Plan.from_dict(good).removed["mlp"][0] == [1, 2]
    for bad in ([1, 8], [3, 3], [-1]):
        d = json.loads(json.dumps(good))
        d["removed"]["mlp"][0] = bad
        with pytest.raises(ValueError, match="distinct and in"):
            Plan.from_dict(d)


@pytest.mark.parametrize("kw", [dict(fraction=-0.5), dict(fraction=1.0), dict(fraction=0.1, empty_blocks=4),
                                dict(fraction=0.1, remove_layers=3), dict(fraction=0.1, empty_blocks=-1)])
def test_random_plan_refuses_what_it_cannot_do(kw):
    with pytest.raises(ValueError):
        random_plan([(2, 8)] * 3, **kw)


# ---------------------------------------------------------------------------------------------- 5. cache keys


def test_cache_key_sees_every_weight_and_the_config():
    model = tiny_model("llama", n_layers=2)
    samples = torch.randint(0, 256, (2, 8))
    base = make_key(model=model, data=samples)
    up = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        up.view(-1)[1::4] = 0.0  # 25 % of one matrix, none at the positions a strided sample reads
    zeroed = make_key(model=model, data=samples)
    model.config.rope_theta = 1234.0
    assert len({base, zeroed, make_key(model=model, data=samples)}) == 3


def test_a_damaged_cache_file_is_named_and_recomputed(tmp_path):
    model, samples = tiny_model("llama", n_layers=2), torch.randint(0, 256, (2, 8))
    first = importance_cached(model, samples, cache=tmp_path, progress=False)
    (path,) = tmp_path.rglob("*.pt")
    path.write_bytes(path.read_bytes()[:50])
    import workbench.core.cache as cache

    cache.clear_memory()
    with pytest.warns(UserWarning, match=path.name):
        again = importance_cached(model, samples, cache=tmp_path, progress=False)
    assert torch.equal(first.scores("taylor")["mlp"][0], again.scores("taylor")["mlp"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.clear_memory()
        importance_cached(model, samples, cache=tmp_path, progress=False)  # rewritten: read without a warning


# ---------------------------------------------------------------------------------------------- 6. values


@pytest.mark.parametrize("tau", [-0.1, math.nan, math.inf])
def test_tau_must_be_a_finite_non_negative_number(tau):
    with pytest.raises(ValueError, match="tau"):
        ScoringConfig(tau=tau)


def test_a_corrupted_weight_payload_is_refused(tmp_path):
    model = tiny_model("llama", n_layers=2)
    save_pruned(model, tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # NaN patterns in the middle of a tensor
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_pruned(tmp_path / "ck")
    (tmp_path / "ck" / "checksums.json").unlink()  # without the manifest: refused unless the user opts out
    with pytest.raises(CheckpointError, match="has no checksums.json.*verify=False"):
        load_pruned(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="inf/NaN"):  # unchecked, the NaN values are still caught
        load_pruned(tmp_path / "ck", verify=False)


# ---------------------------------------------------------------------------------------------- 7. no data lost


def test_save_refuses_a_folder_with_user_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a pruned checkpoint"):
        save_pruned(tiny_model("llama", n_layers=2), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    save_pruned(tiny_model("llama", n_layers=2), tmp_path / "mine", overwrite=True)  # saved beside the user's file
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and load_pruned(tmp_path / "mine")


def test_an_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = tiny_model("llama", n_layers=2, seed=0)
    save_pruned(old, tmp_path / "ck")
    new = tiny_model("llama", n_layers=2, seed=1)

    def crash(*a, **k):
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr(new, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(new, tmp_path / "ck")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "ck")(ids).logits, old(ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folder left behind

    import workbench.core.paths as paths

    real_replace = os.replace
    calls = []

    def fail_second(src, dst):  # the swap: old moved aside, then the new one fails to move in
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.undo()
    monkeypatch.setattr(paths.os, "replace", fail_second)
    with pytest.raises(OSError):
        save_pruned(new, tmp_path / "ck")
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "ck")(ids).logits, old(ids).logits)


# ---------------------------------------------------------------------------------------------- 8. confined paths


@pytest.mark.parametrize("name", ["../x", "a/b", "x\n", ".", "..", "", "/abs"])
def test_experiment_names_are_confined(tmp_path, name):
    with pytest.raises(ValueError, match="experiment name"):
        Experiment.create(name, base=tmp_path / "exps")
    with pytest.raises(ValueError, match="experiment name"):
        Experiment.open(name, base=tmp_path / "exps")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("rel", ["analysis/../../../x.json", "/tmp/x.json", "analysis/a\nb.json", "analysis"])
def test_experiment_files_are_confined(tmp_path, rel):
    exp = Experiment.create("e", base=tmp_path / "exps")
    with pytest.raises(ValueError):
        exp.write_json(rel, {})
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------------------------------------- 9. the CLI


class _Demo:
    """`make demo` is `workbench run configs/demo.yaml`: its exit status raised as SystemExit, else its record."""

    @staticmethod
    def main(argv):
        from workbench.core.paths import experiments_root
        from workbench.runs import cli

        code = cli.main(["run", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"), "--quiet", *argv])
        if code:
            raise SystemExit(code)
        name = argv[argv.index("--name") + 1]
        return json.loads((experiments_root() / name / "evaluation" / "perplexity.json").read_text())


def test_cli_checks_arguments_before_loading(monkeypatch, capsys):
    from workbench.runs import sweep
    demo = _Demo

    monkeypatch.setattr(sweep, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv in (["calibration.num_samples=0"], ["calibration.seq_len=1"], ["eval_windows=0"],
                 ["selection.ratio=1.5"], ["--name", "../x"]):
        with pytest.raises(SystemExit) as e:
            demo.main(argv)
        assert e.value.code == 2
    assert "eval_windows" not in capsys.readouterr().out


@pytest.mark.slow
def test_cli_never_mixes_two_runs_in_one_directory(tmp_path, monkeypatch):
    from workbench.core.paths import experiments_root
    from workbench.runs import cli
    demo = _Demo

    folder = _hf_folder(tmp_path, n_layers=2)
    argv = [f"model.name={folder}", "calibration.num_samples=4", "calibration.seq_len=32", "eval_seq_len=32",
            "eval_windows=2", "--name", "r"]
    rec = demo.main(argv)
    config = (experiments_root() / "r" / "config.json").read_text()
    with pytest.raises(SystemExit):  # the same name again: refused before anything runs
        demo.main(argv)

    def boom(*a, **k):
        raise RuntimeError("failed half-way")

    monkeypatch.setattr(cli, "run_pruning", boom)
    with pytest.raises(RuntimeError):
        demo.main([*argv, "--overwrite", "selection.ratio=0.3"])
    assert (experiments_root() / "r" / "config.json").read_text() == config  # the first run, whole
    assert sorted(p.name for p in experiments_root().iterdir()) == ["r"]  # no staging folder left
    with pytest.raises(RuntimeError):
        demo.main([*argv[:-1], "fresh"])
    assert not (experiments_root() / "fresh").exists()
    assert rec["reload_max_abs_diff"] == 0.0


# ---------------------------------------------------------------------------------------------- clear errors


def test_token_ids_outside_the_vocabulary_are_named():
    from workbench.evaluation.evaluate import window_nll

    model = tiny_model("llama", n_layers=2)
    for ids in (torch.full((1, 8), 400), torch.full((1, 8), -1)):
        with pytest.raises(ValueError, match=r"\[0, 260\)"):
            compute_importance(model, ids, progress=False)
        with pytest.raises(ValueError, match="vocabulary"):
            window_nll(model, ids, progress=False)


def test_load_model_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        load_model(tmp_path / "empty")
    folder = _hf_folder(tmp_path, n_layers=2)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_value_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="at least 2"):
        CalibrationConfig(seq_len=1)
    with pytest.raises(ValueError, match="at least 2"):
        compute_importance(tiny_model("llama", n_layers=2), torch.zeros(2, 1, dtype=torch.long), progress=False)
    with pytest.raises(TypeError, match="ratio='0.2' must be a number"):
        SelectionConfig(ratio="0.2")
    with pytest.raises(ValueError, match="vocab_size=100"):
        tiny_model("llama", vocab_size=100)
    with pytest.raises(ValueError, match="empty_blocks=9"):
        random_plan([(2, 8)] * 4, 0.1, empty_blocks=9)


def test_fingerprint_is_stable_and_fast_enough_to_key_on():
    model = tiny_model("llama", n_layers=2)
    assert model_fingerprint(model) == model_fingerprint(model)
    assert model_fingerprint(model) != model_fingerprint(tiny_model("llama", n_layers=2, seed=1))


# ---------------------------------------------------------------------------------------------- 8. checkpoints under bad input


def _pruned_checkpoint(tmp_path, name="ck", family="llama", dtype=None):
    model = tiny_model(family, n_layers=3)
    if dtype is not None:
        model = model.to(dtype)
    apply_plan(model, random_plan(layer_widths(model), 0.3, seed=2))
    return model, save_pruned(model, tmp_path / name)


def test_saving_over_a_checkpoint_keeps_the_files_it_did_not_write(tmp_path):
    _, ck = _pruned_checkpoint(tmp_path)
    (ck / "notes.md").write_text("my notes")
    (ck / "model.gguf").write_bytes(b"GGUF exported beside it")
    (ck / "eval").mkdir()
    (ck / "eval" / "ppl.json").write_text("{}")
    (ck / "model-00009-of-00009.safetensors").write_bytes(b"stale shard from an older save")
    sums = json.loads((ck / "checksums.json").read_text())
    sums["model-00009-of-00009.safetensors"] = "0" * 64  # listed by an earlier save: ours, so replaced
    (ck / "checksums.json").write_text(json.dumps(sums))
    model, _ = _pruned_checkpoint(tmp_path, name="ck")  # a second save over the first
    assert (ck / "notes.md").read_text() == "my notes"
    assert (ck / "model.gguf").read_bytes() == b"GGUF exported beside it"
    assert (ck / "eval" / "ppl.json").read_text() == "{}"
    assert not (ck / "model-00009-of-00009.safetensors").exists()
    again = load_pruned(ck)  # the foreign files do not disturb loading
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_saving_onto_a_symlink_writes_where_it_points(tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    _pruned_checkpoint(tmp_path, name="link")
    _pruned_checkpoint(tmp_path, name="link")  # twice: the second replaces the first through the link
    assert link.is_symlink() and (tmp_path / "real" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # nothing orphaned beside them
    assert load_pruned(link) is not None


def test_a_weight_file_the_manifest_does_not_list_is_refused(tmp_path):
    from safetensors.torch import save_file

    model, ck = _pruned_checkpoint(tmp_path)
    name = "model.embed_tokens.weight"
    save_file({name: torch.zeros_like(model.state_dict()[name])}, ck / "zz-extra.safetensors")
    with pytest.raises(CheckpointError, match=r"\['zz-extra.safetensors'\] are not part of the checkpoint"):
        load_pruned(ck)


@pytest.mark.parametrize("edit", [dict(rope_theta=1.0), dict(hidden_act="relu"), dict(tie_word_embeddings=True)])
def test_an_edited_config_is_refused(tmp_path, edit):
    _, ck = _pruned_checkpoint(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(edit)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json does not match its checksum"):
        load_pruned(ck)


def test_a_damaged_manifest_is_named(tmp_path):
    _, ck = _pruned_checkpoint(tmp_path)
    (ck / "checksums.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checksums.json is not valid JSON"):
        load_pruned(ck)
    (ck / "checksums.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a map of file names"):
        load_pruned(ck)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cast_model_reloads_as_it_was_saved(tmp_path, dtype):
    """`model.to(bfloat16)` casts the rotary inv_freq too; the reload reproduces that (Δlogit was up to 0.25)."""
    model, ck = _pruned_checkpoint(tmp_path, dtype=dtype)
    assert model.model.rotary_emb.inv_freq.dtype == dtype
    again = load_pruned(ck, dtype=dtype)
    assert again.model.rotary_emb.inv_freq.dtype == dtype
    ids = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_staged_checkpoints_are_readable_by_the_group(tmp_path):
    old = os.umask(0o002)
    try:
        _, ck = _pruned_checkpoint(tmp_path)
    finally:
        os.umask(old)
    assert ck.stat().st_mode & 0o777 == 0o775


@pytest.mark.parametrize("edit, match", [
    ({"num_key_value_heads": 5, "num_attention_heads": 20}, r"is not a width of this model: KV heads in 0\.\.\d"),
    ({"num_key_value_heads": 1, "num_attention_heads": 1}, r"query heads = \d × KV heads"),
    ({"intermediate_size": 10}, r"the weights do not have the per-layer widths config.json records"),
    ({"intermediate_size": "wide"}, r"needs integer"),
])
def test_edited_per_layer_widths_are_named(tmp_path, edit, match):
    _, ck = _pruned_checkpoint(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["pruned_layers"][1].update(edit)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json does not match its checksum"):
        load_pruned(ck)
    (ck / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match=match):
        load_pruned(ck, verify=False)


def test_reconstruction_on_nan_activations_does_not_blame_the_damping():
    from workbench.surgery.reconstruct import ReconstructConfig, solve_reconstruction
    model = tiny_model("llama", n_layers=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    plan = Plan.from_units(layer_widths(model), {"mlp": {1: [0, 1, 2]}})
    with pytest.raises(FloatingPointError, match=r"layer 1 mlp: .*hold inf/NaN.*No damping fixes that"):
        solve_reconstruction(model, plan, torch.randint(0, 256, (2, 16)), ReconstructConfig(), progress=False)


def test_saving_leaves_nothing_of_ours_on_the_model_s_config(tmp_path):
    """The buffers' dtypes go into the saved config only (the live config feeds the model's cache keys); the one
    change a save makes is transformers' own `architectures` label."""
    model = tiny_model("llama", n_layers=3)
    apply_plan(model, random_plan(layer_widths(model), 0.3, seed=2))
    before = model.config.to_dict()
    save_pruned(model, tmp_path / "ck")
    after = model.config.to_dict()
    assert {k for k in set(before) | set(after) if before.get(k) != after.get(k)} <= {"architectures"}
    assert "buffer_dtypes" in json.loads((tmp_path / "ck" / "config.json").read_text())
