"""Bad run inputs (model functions, model shapes, signals, run directories, checkpoint metadata)
are one clear error and a non-zero exit, never a traceback."""

import json
import os
from pathlib import Path

import pytest
from conftest import tiny_overrides, write_config

from flame.checkpoint import Checkpointer, list_checkpoints, verify
from flame.cli import main
from flame.config import load_config
from flame.errors import CheckpointError, ConfigError, FlameError
from flame.trainer import run_training


def _cli(tmp_path, capsys, over):
    cfg = write_config(tmp_path / "c.toml", over)
    capsys.readouterr()
    code = main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    "name,expect",
    [
        ("json:loads", "needs argument(s) s"),
        ("os:sep", "is not a function"),
        ("fractions:Fraction", "returned Fraction, not an nn.Module"),
        ("models_for_tests:broken", "failed: RuntimeError: the weights file is missing"),
    ],
)
def test_model_functions_that_cannot_build(tmp_path, corpus, capsys, name, expect):
    over = tiny_overrides(tmp_path / "r", corpus, **{"model.name": name, "model.overrides": {}})
    code, err = _cli(tmp_path, capsys, over)
    assert code == 2 and expect in err, err


def _gpt2(tmp_path, **fields):
    path = tmp_path / "gpt2.json"
    base = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128}
    path.write_text(json.dumps({**base, **fields}))
    return str(path)


@pytest.mark.parametrize(
    "fields,expect",
    [
        ({"n_positions": 16}, "cover 16 positions, fewer than data.context_len = 64"),
        ({"n_layer": 0}, "layers = 0 builds a model without layers"),
    ],
)
def test_model_shapes_that_would_fail_mid_run(tmp_path, corpus, capsys, fields, expect):
    over = tiny_overrides(tmp_path / "r", corpus, **{"model.name": _gpt2(tmp_path, **fields)})
    over.pop("model.overrides")
    code, err = _cli(tmp_path, capsys, over)
    assert code == 2 and expect in err, err
    assert not list(Path(os.environ["FLAME_CACHE"]).glob("store-*"))  # refused before the corpus was prepared


@pytest.mark.parametrize("sig,expect", [("SIGKILL", "cannot be caught"), ("SIG_DFL", "not a signal name")])
def test_uncatchable_or_unknown_signals_are_config_errors(sig, expect):
    with pytest.raises(ConfigError, match=expect):
        load_config(["--train.preempt_signals", sig])


def test_unwritable_run_directory(tmp_path, corpus, monkeypatch):
    import flame.runguard as rg

    real = rg.os.open

    def read_only(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(30, "Read-only file system")
        return real(path, *a, **k)

    monkeypatch.setattr(rg.os, "open", read_only)
    with pytest.raises(FlameError, match="cannot write to train.run_dir .*Read-only file system"):
        run_training(load_config(overrides=tiny_overrides(tmp_path / "r", corpus)))


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["[1, 2]", "7", '{"files": [1]}', '{"files": {"a": {"size": "x"}}}'])
def test_malformed_complete_markers_are_damage_not_tracebacks(tmp_path, corpus, marker):
    run = tmp_path / "r"
    run_training(
        load_config(overrides=tiny_overrides(run, corpus, **{"train.max_steps": 2, "checkpoint.interval": 1}))
    )
    latest = list_checkpoints(run / "checkpoints")[-1]
    (latest / "COMPLETE").write_text(marker)
    assert "COMPLETE marker" in verify(latest)
    assert Checkpointer(run, keep=2, log=lambda m: None).find_latest().name == "step-00000001"


@pytest.mark.slow
def test_odd_names_in_the_checkpoint_folder_are_ignored(tmp_path, corpus):
    run = tmp_path / "r"
    run_training(
        load_config(overrides=tiny_overrides(run, corpus, **{"train.max_steps": 2, "checkpoint.interval": 1}))
    )
    root = run / "checkpoints"
    for odd in ("step-abc", "step-00000009.bak"):
        (root / odd).mkdir()
        (root / odd / "COMPLETE").write_text('{"files": {}}')
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000002"]
    r = run_training(load_config(overrides=tiny_overrides(run, corpus, **{"train.max_steps": 3})))
    assert r["step"] == 3


def test_a_full_disk_during_a_save_says_so(tmp_path, corpus, monkeypatch):
    run = tmp_path / "r"
    import flame.checkpoint as ck

    def torn(*a, **k):
        raise OSError("unexpected pos 704 vs 598")

    monkeypatch.setattr(ck.dcp, "save", torn)
    monkeypatch.setattr(ck, "_free_bytes", lambda path: 3 << 20)
    with pytest.raises(CheckpointError, match=r"no space left on device \(3.0 MiB free"):
        run_training(load_config(overrides=tiny_overrides(run, corpus, **{"train.max_steps": 1})))


def test_a_corpus_smaller_than_a_batch_is_announced(tmp_path, capsys):
    d = tmp_path / "small"
    d.mkdir()
    (d / "a.txt").write_text("tiny corpus " * 30)
    over = tiny_overrides(tmp_path / "r", d, **{"train.max_steps": 1, "data.batch_size": 16})
    run_training(load_config(overrides=over))
    assert "fewer than one step's global batch of 16: every step repeats samples" in capsys.readouterr().out


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_checkpoint_state_is_json_and_a_crafted_pickle_runs_nothing(tmp_path, corpus, monkeypatch):
    import torch

    from flame.checkpoint import read_trainer_state

    run = tmp_path / "r"
    run_training(load_config(overrides=tiny_overrides(run, corpus, **{"train.max_steps": 2})))
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    assert (ckpt / "trainer.json").is_file() and not (ckpt / "trainer.pt").exists()
    assert read_trainer_state(ckpt)["step"] == 2
    torch.load(ckpt / "rng-0.pt", weights_only=True)  # plain tensors and values only

    crafted = tmp_path / "crafted"
    crafted.mkdir()
    torch.save({"step": 1, "x": _Payload()}, crafted / "trainer.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="unreadable"):
        read_trainer_state(crafted)
    assert not (tmp_path / "PWNED").exists()


def _hashes(root):
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_export_never_overwrites_its_inputs_or_foreign_directories(tmp_path, corpus, capsys):
    run = tmp_path / "r"
    run_training(load_config(overrides=tiny_overrides(run, corpus, **{"train.max_steps": 2})))
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    before, before_foreign = _hashes(run), _hashes(foreign)
    for out in (run, run / "exports" / "x", ckpt, tmp_path):
        capsys.readouterr()
        assert main(["export", str(run), "--out", str(out), "--force"]) == 1
        err = capsys.readouterr().err
        assert "would overwrite" in err and "Traceback" not in err, err
    assert main(["export", str(run), "--out", str(foreign), "--force"]) == 1
    assert "not an earlier flame export" in capsys.readouterr().err
    assert _hashes(run) == before and _hashes(foreign) == before_foreign
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0  # replaces its own export
    assert (out / "config.json").is_file()
    # a link to an earlier export: refused with the fix, the export and the link left as they were
    link = tmp_path / "latest"
    link.symlink_to(out)
    kept = _hashes(out)
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(link), "--force"]) == 1
    err = capsys.readouterr().err
    assert "is a symbolic link" in err and "Traceback" not in err, err
    assert link.is_symlink() and _hashes(out) == kept


def test_metrics_rewrite_on_resume_survives_odd_lines_and_a_full_disk(tmp_path, monkeypatch):
    from flame.logging import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "step": 1}, {"kind": "train", "step": "abc"}, {"kind": "train", "step": 3}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert truncate_jsonl(path, 2) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1]

    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = path.read_bytes()
    import flame.logging as lg

    real = lg.os.replace

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lg.os, "replace", full)
    with pytest.raises(FlameError, match="cannot rewrite .*No space left on device"):
        truncate_jsonl(path, 2)
    monkeypatch.setattr(lg.os, "replace", real)
    assert path.read_bytes() == before and not (tmp_path / "metrics.jsonl.tmp").exists()


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--top-p", "inf"), ("--seed", "-1")])
def test_generate_refuses_non_finite_sampling_knobs(tmp_path, capsys, flag, value):
    assert main(["generate", str(tmp_path), flag, value]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and flag in err


@pytest.mark.parametrize("streaming", [False, True])
def test_a_corpus_below_one_sample_is_refused_in_both_modes(tmp_path, capsys, streaming):
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "a.txt").write_text("abc")
    over = tiny_overrides(tmp_path / "r", d, **{"train.max_steps": 1, "data.streaming": streaming})
    code, err = _cli(tmp_path, capsys, over)
    assert code != 0 and ("fewer than one sample" in err or "fewer than one" in err), err


def test_kernels_that_refuse_float32_name_the_fix(tmp_path, corpus, capsys):
    """fla's DeltaNet asserts "does not support float32": a clear error naming --train.dtype bf16."""
    over = tiny_overrides(tmp_path / "r", corpus, **{"model.name": "models_for_tests:no_float32"})
    over.pop("model.overrides", None)
    write_config(tmp_path / "c.toml", over)
    assert main(["train", "--config", str(tmp_path / "c.toml")]) == 1
    err = capsys.readouterr().err
    assert "refuse float32" in err and "--train.dtype bf16" in err and "Traceback" not in err, err
