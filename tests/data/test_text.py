
import pandas as pd
import pytest
import torch

from workbench.data.text import (
    HUB_SOURCES,
    CalibrationConfig,
    calibration_samples,
    evaluation_windows,
    load_text,
    token_stream,
)


def test_offline_split_is_deterministic_and_disjoint():
    cal, ev = load_text("pydoc", "calibration"), load_text("pydoc", "evaluation")
    assert load_text("pydoc", "calibration") == cal
    assert len(cal) > 300_000 and len(ev) > 100_000
    cal_paras, ev_paras = set(cal.split("\n\n")), set(ev.split("\n\n"))
    # topics are assigned whole to one side; long paragraphs never appear on both sides
    shared = {p for p in cal_paras & ev_paras if len(p) > 200}
    assert not shared


def test_calibration_is_reproducible_and_seeded(tokenizer):
    cfg = CalibrationConfig(num_samples=8, seq_len=32, seed=1)
    a, b = calibration_samples(tokenizer, cfg), calibration_samples(tokenizer, cfg)
    assert a.shape == (8, 32) and torch.equal(a, b)
    c = calibration_samples(tokenizer, CalibrationConfig(num_samples=8, seq_len=32, seed=2))
    assert not torch.equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) == 8  # disjoint windows, no repeats


def test_calibration_never_touches_evaluation_tokens(tokenizer):
    ev = token_stream(tokenizer, "pydoc", "evaluation")
    n = 96  # 96 bytes of text: long enough that only copied passages coincide
    ev_windows = {tuple(ev[i : i + n].tolist()) for i in range(0, len(ev) - n)}
    cal = calibration_samples(tokenizer, CalibrationConfig(num_samples=256, seq_len=n, seed=0))
    hits = sum(tuple(row.tolist()) in ev_windows for row in cal)
    assert hits == 0


def test_too_many_tokens_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="num_samples=100000"):
        calibration_samples(tokenizer, CalibrationConfig(num_samples=100_000, seq_len=128))
    with pytest.raises(ValueError, match="max_windows=100000"):
        evaluation_windows(tokenizer, "pydoc", 128, 100_000)


def test_bad_names_are_errors():
    with pytest.raises(ValueError, match="split='test'"):
        load_text("pydoc", "test")
    with pytest.raises(ValueError, match="source='nope'"):
        load_text("nope")
    with pytest.raises(ValueError, match="num_samples=0"):
        CalibrationConfig(num_samples=0)


def _write_hub_wikitext(root):
    """A local folder laid out as the hub serves Salesforce/wikitext (README configs + parquet shards)."""
    repo = root / HUB_SOURCES["wikitext2"].path
    (repo / "wikitext-2-raw-v1").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        "  - split: train\n    path: wikitext-2-raw-v1/train-*\n"
        "  - split: test\n    path: wikitext-2-raw-v1/test-*\n---\n# wikitext fixture\n"
    )
    train = [" = Valkyria = \n", " The game began development in 2010 .\n", ""] * 50
    test = [" = Robert Boulter = \n", " Robert Boulter is an English actor .\n"] * 40
    pd.DataFrame({"text": train}).to_parquet(repo / "wikitext-2-raw-v1/train-00000-of-00001.parquet")
    pd.DataFrame({"text": test}).to_parquet(repo / "wikitext-2-raw-v1/test-00000-of-00001.parquet")
    return train, test


def test_hub_source_code_path_on_local_fixture(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA_CACHE", str(tmp_path / "cache"))
    train, test = _write_hub_wikitext(tmp_path / "hub")
    cal = load_text("wikitext2", "calibration", hub_root=tmp_path / "hub")
    ev = load_text("wikitext2", "evaluation", hub_root=tmp_path / "hub")
    assert cal == "".join(train) and ev == "".join(test)
    w = evaluation_windows(tokenizer, "wikitext2", 32, hub_root=tmp_path / "hub")
    assert w.shape[1] == 32 and w.shape[0] == len("".join(test).encode()) // 32


def test_local_text_folder(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"paragraph {i} " * 5 for i in range(20)))
    cal, ev = load_text(str(tmp_path), "calibration"), load_text(str(tmp_path), "evaluation")
    assert "paragraph 18" not in cal and "paragraph 17" in cal and "paragraph 19" in ev and "paragraph 0" in cal


def _jargon_fixture(path):
    """A file laid out as Debian's jargon.txt.gz: a title, a table of contents, headwords and wrapped prose."""
    import gzip

    entries = ["   The Jargon File\n\n   Table of Contents\n\n   cruft\n\n   crufty"]
    for i in range(96):
        entries.append(f"   :word{i}: n.\n\n   Entry {i} says that a hacker's cruft number {i} is\n   wrapped over two "
                       f"lines of plain English prose, as the File does.")
    entries.append("   :common: n.\n\n   This paragraph appears twice in the file, once early and once late, "
                   "on both sides.")
    entries.insert(5, entries[-1])
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(entries) + "\n")


def test_the_out_of_domain_source_splits_prose_paragraphs_into_disjoint_parts(tmp_path, monkeypatch):
    import workbench.data.text as text

    monkeypatch.setattr(text, "JARGON_FILE", tmp_path / "jargon.txt.gz")
    with pytest.raises(FileNotFoundError, match=r"source 'jargon' reads .*jargon.txt.gz, from Debian's jargon-text "
                                                r"package .*apt-get install jargon-text"):
        text.load_text("jargon", "evaluation")
    _jargon_fixture(tmp_path / "jargon.txt.gz")
    cal, ev = (text.load_text("jargon", s).split("\n\n") for s in text.SPLITS)
    assert not set(cal) & set(ev) and len(set(cal)) + len(ev) == 97  # 96 entries + the repeated one
    assert all(len(p.split()) >= 8 and "\n" not in p for p in cal + ev)  # prose only, wrapped lines joined
    assert not any(p.startswith((":", "The Jargon File", "Table of")) for p in cal + ev)
    assert len(ev) == 24 and ev[0].startswith("Entry 35 says")  # every 4th block of 12 paragraphs
    assert "jargon" in text.SOURCES and text.OUT_OF_DOMAIN_SOURCE == "jargon"


def test_a_calibration_mixture_draws_equal_interleaved_shares_disjoint_from_its_held_out_windows(tmp_path, tokenizer):
    from workbench.data.text import held_out_samples

    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Paragraph {i}: plain English prose about gardens and rivers." for i in range(400)))
    mix = CalibrationConfig(source=f"pydoc+{other}", num_samples=5, seq_len=16)
    samples = calibration_samples(tokenizer, mix)
    a = calibration_samples(tokenizer, CalibrationConfig(source="pydoc", num_samples=3, seq_len=16))
    b = calibration_samples(tokenizer, CalibrationConfig(source=str(other), num_samples=2, seq_len=16))
    assert torch.equal(samples, torch.stack([a[0], b[0], a[1], b[1], a[2]]))  # 3 + 2, interleaved
    held = held_out_samples(tokenizer, mix, 4)
    rows = {tuple(r.tolist()) for r in samples}
    assert len(held) == 4 and not rows & {tuple(r.tolist()) for r in held}
    with pytest.raises(ValueError, match="is a mixture, which only calibration samples are drawn from"):
        evaluation_windows(tokenizer, "pydoc+jargon", seq_len=16)
    with pytest.raises(ValueError, match="cannot give each of the 2 sources"):
        calibration_samples(tokenizer, CalibrationConfig(source=f"pydoc+{other}", num_samples=1, seq_len=16))
    with pytest.raises(ValueError, match="two or more different sources"):
        calibration_samples(tokenizer, CalibrationConfig(source="pydoc+pydoc", num_samples=2, seq_len=16))
