"""No silent restart from step 0, and a rewind (--checkpoint.load an earlier step) that sticks."""

import hashlib

import pytest
from conftest import metrics, tiny_overrides, write_config

from flame.checkpoint import list_checkpoints
from flame.cli import main
from flame.config import load_config
from flame.errors import CheckpointError
from flame.trainer import run_training


def _tree(root):
    """{relative path: sha256} of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _damage(ckpt):
    victim = max(
        (p for p in (ckpt / "state").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size
    )
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)


def _names(run):
    return [p.name for p in list_checkpoints(run / "checkpoints")]


@pytest.fixture
def damaged_run(tmp_path, corpus):
    run = tmp_path / "run"
    over = tiny_overrides(run, corpus, **{"train.max_steps": 6, "checkpoint.interval": 3})
    run_training(load_config(overrides=over))
    for c in list_checkpoints(run / "checkpoints"):
        _damage(c)
    return run, over


def test_every_checkpoint_damaged_is_an_error_not_a_restart(damaged_run, tmp_path, capsys):
    run, over = damaged_run
    before = _tree(run)
    with pytest.raises(CheckpointError) as e:
        run_training(load_config(overrides={**over, "train.max_steps": 9}))
    msg = str(e.value.message)
    assert "no checkpoint" in msg and "step-00000003" in msg and "step-00000006" in msg
    assert "--checkpoint.resume false" in e.value.hint
    after = _tree(run)
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }

    cfg = write_config(tmp_path / "c.toml", {**over, "train.max_steps": 9})
    capsys.readouterr()
    assert main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err


@pytest.mark.slow
def test_starting_over_is_explicit_and_keeps_the_damaged_checkpoints(damaged_run, capsys):
    run, over = damaged_run
    old = {p.name: _tree(p) for p in list_checkpoints(run / "checkpoints")}
    r = run_training(load_config(overrides={**over, "checkpoint.resume": False, "checkpoint.keep": 2}))
    assert r["step"] == 6
    out = capsys.readouterr().out
    assert "moved them to" in out
    aside = next((run / "checkpoints").glob("abandoned-*"))
    assert {p.name: _tree(p) for p in sorted(aside.iterdir())} == old  # intact, not deleted
    assert _names(run) == ["step-00000003", "step-00000006"]  # the new run's own, kept


@pytest.mark.slow
def test_rewind_continues_the_new_branch(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    over = tiny_overrides(
        run, corpus, **{"train.max_steps": 8, "checkpoint.interval": 2, "checkpoint.keep": 10}
    )
    run_training(load_config(overrides=over))
    assert _names(run) == [f"step-{s:08d}" for s in (2, 4, 6, 8)]
    rewind = {**over, "checkpoint.load": str(run / "checkpoints" / "step-00000004"), "optim.lr": 1e-3}
    capsys.readouterr()
    run_training(load_config(overrides=rewind))
    assert "checkpoints after step 4" in capsys.readouterr().out
    aside = next((run / "checkpoints").glob("abandoned-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000006", "step-00000008"]
    # the next automatic resume continues the new branch (its lr), not the old step 8
    r = run_training(load_config(overrides={**over, "train.max_steps": 10, "optim.lr": 1e-3}))
    assert r["step"] == 10
    recs = metrics(run)
    assert [x["step"] for x in recs if x["kind"] == "train"] == list(range(1, 11))
    from flame.checkpoint import read_trainer_state

    state = read_trainer_state(run / "checkpoints" / "step-00000008")
    assert state["config"]["optim"]["lr"] == 1e-3
