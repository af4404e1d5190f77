"""A run's saved config works from any folder: absolute paths, the run's own tokenizer copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flame.config import Config
from flame.data.mixture import parse_named_mix
from flame.runs import absolute_paths


def _dirs(base: Path, *names: str) -> None:
    for n in names:
        (base / n).mkdir(parents=True, exist_ok=True)


def test_absolute_paths_resolve_existing_paths_and_leave_names(tmp_path):
    _dirs(tmp_path, "stores/web", "stores/code", "other/web", "hfmodel")
    (tmp_path / "tok.json").write_text("{}")
    (tmp_path / "mymodel.py").write_text("")
    (tmp_path / "a.txt").write_text("x")
    d = Config().to_dict()
    d["model"]["name"] = "mymodel.py:build"
    d["model"]["init_from"] = "hfmodel"
    d["data"]["inputs"] = ["a.txt", "stdlib", "hf:org/name", "missing.txt"]
    d["data"]["tokenizer"] = "tok.json"
    d["data"]["mix"] = "stores/web:0.7,code=stores/code:0.3"
    d["data"]["phases"] = [{"start_step": 0, "mix": "stores/web:1,other/web:1"}]
    out = absolute_paths(d, tmp_path)

    assert out["model"]["name"] == f"{tmp_path / 'mymodel.py'}:build"
    assert out["model"]["init_from"] == str(tmp_path / "hfmodel")
    assert out["data"]["inputs"] == [str(tmp_path / "a.txt"), "stdlib", "hf:org/name", "missing.txt"]
    assert out["data"]["tokenizer"] == str(tmp_path / "tok.json")
    # every source keeps its name and weight; only its path becomes absolute
    for key in ("mix",):
        before, after = parse_named_mix(d["data"][key]), parse_named_mix(out["data"][key])
        assert [(n, w) for n, _, w in before] == [(n, w) for n, _, w in after]
        assert [p for _, p, _ in after] == [str(tmp_path / p) for _, p, _ in before]
    before = parse_named_mix(d["data"]["phases"][0]["mix"])
    after = parse_named_mix(out["data"]["phases"][0]["mix"])
    assert [n for n, _, _ in before] == [n for n, _, _ in after] == ["stores/web", "other/web"]
    assert [p for _, p, _ in after] == [str(tmp_path / "stores/web"), str(tmp_path / "other/web")]
    assert d["data"]["mix"] == "stores/web:0.7,code=stores/code:0.3"  # the input is not modified


def test_absolute_paths_is_idempotent_and_keeps_presets(tmp_path):
    d = Config().to_dict()
    d["data"]["store"] = "s"
    (tmp_path / "s").mkdir()
    once = absolute_paths(d, tmp_path)
    assert once["model"]["name"] == d["model"]["name"]  # a preset
    assert once["data"]["tokenizer"] == "byte"
    assert absolute_paths(once, tmp_path / "elsewhere") == once
    assert os.path.isabs(once["data"]["store"])


def _bpe(path: Path, text: list[str], vocab: int) -> Path:
    """A small byte-level BPE tokenizer directory trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    path.mkdir(parents=True)
    hf.save(str(path / "tokenizer.json"))
    return path


@pytest.mark.slow
def test_commands_work_from_another_folder_and_refuse_another_tokenizer(tmp_path, monkeypatch, capsys):
    """A run started with relative paths (corpus, tokenizer, run dir): generate, export and inspect
    from another folder use the run's own tokenizer and give what they give from the start folder;
    a tokenizer of the same size that is not the run's is refused, not silently used."""
    import shutil

    from conftest import LOREM, tiny_overrides

    from flame.cli import main
    from flame.config import load_config
    from flame.trainer import run_training

    start = tmp_path / "start"
    (start / "corpus").mkdir(parents=True)
    docs = [f"Chapter {i}. " + LOREM * (2 + i % 3) for i in range(8)]
    for i, d in enumerate(docs):
        (start / "corpus" / f"d{i}.txt").write_text(d)
    _bpe(start / "tok", docs, 300)
    monkeypatch.chdir(start)
    over = tiny_overrides("run", "corpus", **{"data.tokenizer": "tok", "train.max_steps": 3})
    run_training(load_config(overrides=over))
    capsys.readouterr()
    args = ["--prompt", "Chapter", "--max-tokens", "12", "--temperature", "0"]
    assert main(["generate", "run", *args]) == 0
    here = capsys.readouterr().out

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shutil.move(str(start / "tok"), str(tmp_path / "tok-moved"))  # the configured tokenizer is gone too
    run = start / "run"
    assert main(["generate", str(run), *args]) == 0
    assert capsys.readouterr().out == here  # the same tokenizer and weights: the same greedy text
    assert main(["export", str(run), "--out", str(elsewhere / "hf")]) == 0
    assert main(["inspect", str(run), "--step", "2"]) == 0
    capsys.readouterr()

    # a different tokenizer with the same number of ids in place of the run's copy
    shutil.rmtree(run / "tokenizer")
    other = _bpe(tmp_path / "other-tok", [d[::-1] for d in docs], 300)
    shutil.copytree(other, run / "tokenizer")
    assert main(["generate", str(run), *args]) == 1
    err = capsys.readouterr().err
    assert "is not the one the checkpoint was trained with" in err and "Traceback" not in err
