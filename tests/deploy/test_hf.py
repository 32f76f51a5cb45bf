"""Self-contained checkpoints: plain transformers (remote code from the checkpoint folder) loads a pruned model
with per-layer widths where `workbench` cannot be imported, and computes exactly what the pruned model did."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from workbench.core.arch import layer_widths
from workbench.core.testing import TINY_FAMILIES, tiny_model
from workbench.plans.plan import Plan
from workbench.surgery.checkpoints import MODELING_FILE, load_pruned, save_pruned
from workbench.surgery.prune import apply_plan
from workbench.surgery.reconstruct import ReconstructConfig, prune_and_reconstruct

N_LAYERS, NEW_TOKENS = 4, 16


def _plan(kind: str, w: list[tuple[int, int]]) -> Plan:
    g, c = w[0]
    units = {
        "partial": {"attn": {1: [0]}, "mlp": {0: list(range(10)), 2: list(range(c // 2))}},
        "emptied": {"attn": {0: list(range(g))}, "mlp": {1: list(range(c)), 3: [1, 2]}},  # first attention emptied
        "removed": {"attn": {1: list(range(g)), 2: [0]}, "mlp": {1: list(range(c))}},  # layer 1 removed
        "biases": {"attn": {2: list(range(g)), 3: [0]}, "mlp": {0: list(range(c)), 1: list(range(20))}},
    }[kind]
    return Plan.from_units(w, units)


def _pruned(family: str, kind: str):
    model = tiny_model(family, n_layers=N_LAYERS, seed=3)
    plan = _plan(kind, layer_widths(model))
    if kind == "biases":  # FLAP's bias compensation: output biases on partial and emptied blocks
        ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
        prune_and_reconstruct(model, plan, ids, ReconstructConfig(weights=False, bias=True), progress=False)
    else:
        apply_plan(model, plan)
    return model.eval()


# The start of every out-of-process check: `workbench` cannot be imported there, only torch and transformers.
_NO_WORKBENCH = textwrap.dedent("""
    import importlib.abc, json, sys
    class NoWorkbench(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "workbench" or name.startswith("workbench."):
                raise ImportError("workbench is not importable in this process")
    sys.meta_path.insert(0, NoWorkbench())
    import torch
    from transformers import AutoModelForCausalLM
""")

# Loads every folder with AutoModelForCausalLM(trust_remote_code=True) where `workbench` cannot be imported.
_CHECK = _NO_WORKBENCH + textwrap.dedent("""
    out = {}
    for folder in sys.argv[1:]:
        exp = torch.load(folder + ".expected.pt")
        row = {}
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
            with torch.no_grad():
                logits = m(input_ids=exp["ids"], use_cache=False).logits
            row[name] = float((logits.float() - exp[name].float()).abs().max())
            if name == "float32":
                row["class"] = type(m).__name__
                with torch.no_grad():
                    gen = m.generate(exp["ids"][:1], max_new_tokens=16, min_new_tokens=16, do_sample=False)
                row["tokens_equal"] = bool(torch.equal(gen, exp["tokens"]))
        out[folder] = row
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_self_contained_checkpoints_load_without_the_workbench_and_compute_the_same(tmp_path):
    """Every family × plan kind (partial, emptied blocks with the first attention, removed layers, reconstruction
    biases): float32 and bfloat16 logits equal to the pruned model's, and the same 16 greedy tokens with the cache."""
    folders = []
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for family in TINY_FAMILIES:
        for kind in ("partial", "emptied", "removed", "biases"):
            model = _pruned(family, kind)
            folder = tmp_path / f"{family}-{kind}"
            save_pruned(model, folder, self_contained=True)
            with torch.no_grad():
                exp = dict(ids=ids, float32=model(input_ids=ids, use_cache=False).logits,
                           tokens=model.generate(ids[:1], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                 do_sample=False))
                bf16 = load_pruned(folder, dtype=torch.bfloat16)  # the pruned model in bfloat16, as the workbench has it
                exp["bfloat16"] = bf16(input_ids=ids, use_cache=False).logits
            torch.save(exp, f"{folder}.expected.pt")
            folders.append(str(folder))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", _CHECK, *folders], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    bad = {f: r for f, r in rows.items() if r["float32"] != 0 or r["bfloat16"] != 0 or not r["tokens_equal"]}
    assert bad == {}
    assert {r["class"] for r in rows.values()} == {"PrunedLlamaForCausalLM", "PrunedMistralForCausalLM",
                                                   "PrunedQwen2ForCausalLM", "PrunedQwen3ForCausalLM"}


def test_a_self_contained_checkpoint_is_transformers_heterogeneous_config_and_loads_in_the_workbench(tmp_path):
    model = _pruned("llama", "biases")
    folder = save_pruned(model, tmp_path / "ckpt", self_contained=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoModelForCausalLM": "modeling_pruned.PrunedLlamaForCausalLM"}
    assert cfg["per_layer_config"]["2"]["skip"] == ["self_attn"] and cfg["per_layer_config"]["2"]["attn_out_bias"]
    assert cfg["pruned_layers"] and (folder / MODELING_FILE).is_file()
    assert MODELING_FILE in json.loads((folder / "checksums.json").read_text())  # in the manifest
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(load_pruned(folder)(input_ids=ids).logits, model(input_ids=ids).logits)
    assert "per_layer_config" not in model.config.to_dict() and not hasattr(model.config, "auto_map")


def test_the_shipped_modelling_file_imports_only_torch_and_transformers():
    import ast

    from workbench.core import hf_modeling

    tree = ast.parse(open(hf_modeling.__file__).read())
    roots = {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert roots <= {"__future__", "importlib", "torch", "transformers"}


def test_export_hf_turns_a_checkpoint_or_an_experiment_into_a_self_contained_folder(tmp_path, capsys):
    from workbench.runs.cli import main

    model = _pruned("qwen2", "emptied")
    plain = save_pruned(model, tmp_path / "plain", self_contained=False)  # the form saved before
    assert not (plain / MODELING_FILE).exists()
    assert main(["export-hf", str(plain), str(tmp_path / "hf")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["per_layer_config"]
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "hf")(input_ids=ids).logits, model(input_ids=ids).logits)
    assert main(["export-hf", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def test_the_model_card_says_how_the_model_was_made_and_a_user_s_card_is_kept(tmp_path):
    from huggingface_hub import ModelCard

    from workbench.plans.plan import PlanProvenance
    from workbench.surgery.prune import apply_plan

    model = tiny_model("llama", n_layers=N_LAYERS)
    plan = _plan("emptied", layer_widths(model))
    plan.provenance = PlanProvenance("global", method="taylor", scoring={"normalization": "minmax", "level": "block"})
    report = apply_plan(model, plan)
    folder = save_pruned(model, tmp_path / "ckpt", plan=plan, report=report,
                         card=dict(base={"name": "org/tiny-base", "fingerprint": "abc123"},
                                   results={"dense": {"ppl": 20.0, "source": "pydoc", "windows": 4, "seq_len": 32},
                                            "pruned": {"ppl": 25.5, "source": "pydoc", "windows": 4, "seq_len": 32}},
                                   figure={"kept_fraction_per_layer.png": b"\x89PNG fake"}))
    card = ModelCard.load(folder / "README.md")  # the Hub's own parser, no network
    assert card.data.base_model == "org/tiny-base" and "prune-workbench" in card.data.tags
    text = (folder / "README.md").read_text()
    assert "global taylor (minmax/block)" in text and "abc123" in text and "| pruned | 25.50 | pydoc |" in text
    assert "trust_remote_code=True" in text and "![kept fraction per layer](kept_fraction_per_layer.png)" in text
    assert (folder / "kept_fraction_per_layer.png").read_bytes() == b"\x89PNG fake"
    assert f"{report.params_before:,} → {report.params_after:,}" in text
    (folder / "README.md").write_text("my own notes\n")
    save_pruned(model, folder, plan=plan, report=report)  # saved again: the user's card stays
    assert (folder / "README.md").read_text() == "my own notes\n"
    load_pruned(folder)  # and the folder still verifies


_TOOLS = _NO_WORKBENCH + textwrap.dedent("""
    folder, task, merged_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    out = {}
    # lm-eval's own HFLM, given the folder's path
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=folder, trust_remote_code=True, batch_size=4, device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=8, task_manager=TaskManager(include_defaults=False),
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                                  log_samples=False, verbosity="ERROR")
    out["acc"] = res["results"][task["task"]]["acc,none"]
    # peft LoRA: a training step, merged, saved with save_pretrained and loaded again
    from peft import LoraConfig, get_peft_model
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
    net = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for p in net.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)  # LoRA's B starts at zero: make the adapters do something
    net(input_ids=ids, labels=ids).loss.backward()
    merged = net.merge_and_unload().eval()
    merged.save_pretrained(merged_dir)
    again = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        out["merged_reload_max"] = float((again(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max())
        out["lora_changed"] = float((merged(input_ids=ids).logits - before).abs().max())
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_lm_eval_and_peft_use_a_self_contained_folder_without_the_workbench(tmp_path):
    """lm-eval's own HFLM(pretrained=folder) scores what the workbench scores on the model in memory, and peft's
    LoRA trains, merges, saves and reloads on the folder, in a process where `workbench` cannot be imported."""
    from workbench.core.testing import byte_tokenizer
    from workbench.evaluation.zeroshot import LOCAL_TASKS, ZeroShotConfig, resolve_task, zero_shot

    model = _pruned("llama", "emptied")
    folder = save_pruned(model, tmp_path / "ckpt", tokenizer=byte_tokenizer())
    task = resolve_task("pydoc_cloze")
    task["dataset_kwargs"]["cache_dir"] = str(tmp_path / "datasets")
    here = zero_shot(model, byte_tokenizer(), ZeroShotConfig(tasks=(str(LOCAL_TASKS["pydoc_cloze"]),), limit=8,
                                                             batch_size=4), progress=False)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), PYTHONWARNINGS="ignore",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    done = subprocess.run([sys.executable, "-c", _TOOLS, str(folder), json.dumps(task), str(tmp_path / "merged")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["acc"] == here.tasks["pydoc_cloze"]["acc"]
    assert out["lora_changed"] > 0 and out["merged_reload_max"] == 0
