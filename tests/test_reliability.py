import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import metrics, tiny_overrides, write_config

from flame.checkpoint import Checkpointer, list_checkpoints
from flame.config import load_config
from flame.errors import CheckpointError, FlameError
from flame.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]


def _steps(run_dir):
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _spawn(args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "flame", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def _wait_for_step(run_dir, step, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = run_dir / "metrics.jsonl"
        if m.is_file() and any(
            json.loads(x)["step"] >= step for x in m.read_text().splitlines() if x.strip()
        ):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_and_exits_cleanly(tmp_path, corpus, sig):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", tiny_overrides(run, corpus, **{"train.max_steps": 100000}))
    proc = _spawn(["train", "--config", str(cfg)])
    _wait_for_step(run, 3, proc)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"received {sig}" in out
    last = list_checkpoints(run / "checkpoints")[-1]
    step = int(last.name.split("-")[1])
    assert step == _steps(run)[-1]  # the checkpoint is at the step it stopped at
    # resuming continues with the next step
    r = subprocess.run(
        [sys.executable, "-m", "flame", "train", "--config", str(cfg), "--train.max_steps", str(step + 2)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {last} at step {step}" in r.stdout
    assert _steps(run) == list(range(1, step + 3))


def _children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


@pytest.mark.slow
@pytest.mark.parametrize("target", ["workers", "whole job"])
def test_sigterm_under_torchrun_two_processes(tmp_path, corpus, target):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", tiny_overrides(run, corpus, **{"train.max_steps": 100000}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*cmd, "-m", "flame", "train", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    _wait_for_step(run, 2, proc)
    if target == "workers":  # what a scheduler's per-task signal does (srun --signal, kubectl)
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGTERM)
    else:  # the whole process group, torchrun's agent included
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    if target == "workers":
        assert proc.returncode == 0, err[-3000:]
    # torchrun's own agent exits non-zero when it is signalled itself, but only after the ranks saved
    last = list_checkpoints(run / "checkpoints")[-1]
    assert int(last.name.split("-")[1]) == _steps(run)[-1]
    assert "received SIGTERM" in out


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    cfg = load_config(
        overrides=tiny_overrides(run, corpus, **{"train.max_steps": 6, "checkpoint.interval": 3})
    )
    run_training(cfg)
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000003", "step-00000006"]
    victim = max(
        (p for p in (ckpts[-1] / "state").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size
    )
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    capsys.readouterr()
    cfg2 = load_config(
        overrides=tiny_overrides(run, corpus, **{"train.max_steps": 8, "checkpoint.interval": 3})
    )
    r = run_training(cfg2)
    out = capsys.readouterr().out
    assert "step-00000006 is damaged" in out and "trying the previous one" in out
    assert "resumed from" in out and "at step 3" in out
    assert r["step"] == 8
    assert _steps(run) == list(range(1, 9))


def test_bit_flip_is_caught_by_checksum(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    run_training(
        load_config(overrides=tiny_overrides(run, corpus, **{"train.max_steps": 4, "checkpoint.interval": 2}))
    )
    latest = list_checkpoints(run / "checkpoints")[-1]
    victim = next(p for p in (latest / "state").iterdir() if p.suffix == ".distcp")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    found = Checkpointer(run, keep=2, log=print).find_latest()
    assert found.name == "step-00000002"
    assert "fails its checksum" in capsys.readouterr().out


@pytest.mark.slow
def test_failed_save_is_clear_and_keeps_earlier(tmp_path, corpus, monkeypatch):
    run = tmp_path / "run"
    run_training(
        load_config(overrides=tiny_overrides(run, corpus, **{"train.max_steps": 2, "checkpoint.interval": 1}))
    )
    before = [p.name for p in list_checkpoints(run / "checkpoints")]

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("flame.checkpoint.torch.save", no_space)
    cfg = load_config(
        overrides=tiny_overrides(run, corpus, **{"train.max_steps": 3, "checkpoint.interval": 1})
    )
    with pytest.raises(CheckpointError, match="No space left on device") as e:
        run_training(cfg)
    assert "earlier checkpoints are intact" in e.value.hint
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == before
    assert not list((run / "checkpoints").glob("*.tmp*"))


def test_nan_steps_are_skipped_then_stop(tmp_path, corpus, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    run = tmp_path / "run"
    over = tiny_overrides(
        run,
        corpus,
        **{
            "model.name": "models_for_tests:bigram",
            "model.overrides": {"bad_calls": [3]},
            "train.max_steps": 6,
        },
    )
    r = run_training(load_config(overrides=over))
    assert r["stopped"] == "done"
    recs = metrics(run)
    assert recs[-1]["bad_steps"] == 1
    assert "step 3 skipped" in capsys.readouterr().out
    assert all(torch.isfinite(torch.tensor(x["loss"])) or x["step"] == 3 for x in recs)

    run2 = tmp_path / "run2"
    over = tiny_overrides(
        run2,
        corpus,
        **{
            "model.name": "models_for_tests:bigram",
            "model.overrides": {"bad_calls": [3, 4, 5]},
            "train.max_steps": 10,
            "train.max_bad_steps": 3,
        },
    )
    r = run_training(load_config(overrides=over))
    assert r["stopped"] == "diverged" and r["step"] == 5
    assert list_checkpoints(run2 / "checkpoints")[-1].name == "step-00000005"
    # the weights are those of the last good step: three skipped updates changed nothing
    out = capsys.readouterr().out
    assert "3 consecutive steps" in out


@pytest.mark.slow
def test_second_writer_is_refused(tmp_path, corpus):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", tiny_overrides(run, corpus, **{"train.max_steps": 100000}))
    proc = _spawn(["train", "--config", str(cfg)])
    try:
        _wait_for_step(run, 1, proc)
        r = subprocess.run(
            [sys.executable, "-m", "flame", "train", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1
        assert f"is in use by process {proc.pid}" in r.stderr and "Traceback" not in r.stderr
    finally:
        proc.kill()
        proc.wait()
    # the dead process's lock is stale and simply taken over
    r = subprocess.run(
        [sys.executable, "-m", "flame", "train", "--config", str(cfg), "--train.max_steps", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_resume_refuses_order_changing_settings(tmp_path, corpus):
    run = tmp_path / "run"
    run_training(load_config(overrides=tiny_overrides(run, corpus, **{"train.max_steps": 2})))
    changed = tiny_overrides(run, corpus, **{"train.max_steps": 4, "data.context_len": 32, "data.seed": 9})
    with pytest.raises(CheckpointError) as e:
        run_training(load_config(overrides=changed))
    msg = str(e.value)
    assert "data.context_len: 64 in the checkpoint, 32 now" in msg and "data.seed" in msg
    assert "--checkpoint.allow_config_change" in e.value.hint
    # harmless changes are allowed and noted
    ok = tiny_overrides(run, corpus, **{"train.max_steps": 4, "optim.lr": 1e-3})
    assert run_training(load_config(overrides=ok))["step"] == 4


def test_checkpoint_from_another_model_is_refused(tmp_path, corpus):
    run = tmp_path / "run"
    run_training(load_config(overrides=tiny_overrides(run, corpus, **{"train.max_steps": 2})))
    other = tiny_overrides(tmp_path / "other", corpus, **{"train.max_steps": 3})
    other["model.overrides"] = {**other["model.overrides"], "hidden_size": 48}
    other["checkpoint.load"] = str(list_checkpoints(run / "checkpoints")[-1])
    other["checkpoint.allow_config_change"] = True
    with pytest.raises(FlameError, match="does not fit this model"):
        run_training(load_config(overrides=other))


@pytest.mark.parametrize(
    "setup,args,expect",
    [
        ("empty", ["--data.inputs", "{d}/empty.txt"], "no usable documents"),
        ("garbage", ["--data.inputs", "{d}/bad.jsonl", "--data.bad_records", "error"], "bad.jsonl:1"),
        ("tokenizer", ["--data.tokenizer", "{d}/tok.json"], "tok.json"),
        ("model", ["--model.name", "{d}/config.json"], "config.json"),
        ("run dir", ["--train.run_dir", "{d}/empty.txt"], "is a file, not a directory"),
        ("checkpoint", ["--checkpoint.load", "{d}/empty.txt"], "is a file, not a directory"),
        (
            "override type",
            ["--data.inputs", "{d}/ok.txt", "--model.overrides", '{{"hidden_size": "big"}}'],
            "model.overrides",
        ),
        (
            "override size",
            ["--data.inputs", "{d}/ok.txt", "--model.overrides", '{{"hidden_size": 0}}'],
            "model.overrides",
        ),
    ],
)
@pytest.mark.slow
def test_bad_input_is_a_clear_error(tmp_path, setup, args, expect):
    d = tmp_path
    (d / "empty.txt").write_text("")
    (d / "ok.txt").write_text("a short document " * 40)
    (d / "bad.jsonl").write_bytes(b"\x00\xff\xfe garbage\n{not json\n")
    (d / "tok.json").write_text("{this is not a tokenizer")
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"')
    argv = [a.format(d=d) for a in args]
    r = subprocess.run(
        [sys.executable, "-m", "flame", "train", "--train.run_dir", str(d / "run"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert expect in r.stderr, r.stderr[-3000:]
