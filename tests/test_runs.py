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

    d = Config().to_dict()
    d["data"]["inputs"] = ["*.txt", "nothing-*.txt", "~/corpus"]
    d["data"]["cache_dir"] = "cache-made-later"
    out = absolute_paths(d, tmp_path)
    assert out["data"]["inputs"] == [str(tmp_path / "*.txt"), "nothing-*.txt", os.path.expanduser("~/corpus")]
    assert out["data"]["cache_dir"] == str(tmp_path / "cache-made-later")


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


def _rename_raw_source(run: Path, new: str) -> None:
    """Rewrite a run's data plan (data_plan.json and its checkpoints' trainer.json, resealed) so its raw
    inputs' source has the name flame gave it before the shared cache: the store's folder name."""
    import json

    from flame.checkpoint import list_checkpoints
    from flame.files import file_checksum

    def rename(plan: dict) -> None:
        for src in plan["sources"]:
            src["name"] = new
        for ph in plan["phases"]:
            (weight,) = ph["mix"].values()  # one source
            ph["mix"] = {new: weight}

    plan = json.loads((run / "data_plan.json").read_text())
    rename(plan)
    (run / "data_plan.json").write_text(json.dumps(plan))
    for ck in list_checkpoints(run / "checkpoints"):
        state = json.loads((ck / "trainer.json").read_text())
        rename(state["data"]["plan"])
        state["config"]["data"]["cache_dir"] = ""
        (ck / "trainer.json").write_text(json.dumps(state))
        marker = json.loads((ck / "COMPLETE").read_text())
        f = ck / "trainer.json"
        marker["files"]["trainer.json"] = {"size": f.stat().st_size, "sha256": file_checksum(f)}
        (ck / "COMPLETE").write_text(json.dumps(marker))


@pytest.mark.slow
def test_a_run_begun_before_the_shared_cache_resumes_on_its_own_store(tmp_path, corpus, capsys):
    """A run that prepared its raw inputs into <run_dir>/data (flame before the shared cache) resumes on
    that store, under its old source name: the same batches as an uninterrupted run, no new phase."""
    import json

    from conftest import metrics, tiny_overrides

    from flame.config import load_config
    from flame.trainer import run_training

    ref, old = tmp_path / "ref", tmp_path / "old"
    run_training(load_config(overrides=tiny_overrides(ref, corpus, **{"train.max_steps": 6})))
    over = tiny_overrides(old, corpus, **{"train.max_steps": 3, "data.cache_dir": str(old / "data")})
    run_training(load_config(overrides=over))
    store = next((old / "data").glob("store-*"))
    _rename_raw_source(old, store.name)
    capsys.readouterr()
    run_training(load_config(overrides=tiny_overrides(old, corpus, **{"train.max_steps": 6})))
    assert "reusing the store this run trained on" in capsys.readouterr().out
    plan = json.loads((old / "data_plan.json").read_text())
    assert [s["name"] for s in plan["sources"]] == [store.name] and len(plan["phases"]) == 1
    assert [r["loss"] for r in metrics(old, "train")] == [r["loss"] for r in metrics(ref, "train")]


@pytest.mark.slow
def test_resume_with_another_tokenizer_at_the_same_path_is_refused(tmp_path, corpus):
    """data.tokenizer names the same file, which now holds another tokenizer: refused, not trained on."""
    import shutil

    import pytest
    from conftest import tiny_overrides

    from flame.config import load_config
    from flame.errors import CheckpointError
    from flame.trainer import run_training

    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    _bpe(tmp_path / "tok", docs, 300)
    over = tiny_overrides(
        tmp_path / "r", corpus, **{"data.tokenizer": str(tmp_path / "tok"), "train.max_steps": 2}
    )
    run_training(load_config(overrides=over))
    shutil.rmtree(tmp_path / "tok")
    _bpe(tmp_path / "tok", [d[::-1] for d in docs], 300)
    over["train.max_steps"] = 4
    with pytest.raises(CheckpointError, match="resuming would change the tokenizer"):
        run_training(load_config(overrides=over))


def test_a_lock_written_on_another_host_is_probed_not_trusted(tmp_path):
    """`flame status` on a shared filesystem: a lock file naming another node is held only if the lock
    itself is taken (this host's /proc/locks cannot see the other node's processes)."""
    import fcntl
    import json

    from flame.runguard import RunLock

    lock = RunLock(tmp_path)
    lock.path.write_text(json.dumps({"pid": 4242, "host": "another-node"}))
    assert lock.holder() is None  # written by a run that is gone
    fd = os.open(lock.path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as that node's live run holds it
    try:
        assert lock.holder() == {"pid": 4242, "host": "another-node"}
    finally:
        os.close(fd)
    assert lock.holder() is None
