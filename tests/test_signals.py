"""Ctrl-C (SIGINT) during training: the first one checkpoints at the end of the step and exits like
SIGTERM (code 0, resumable exactly); a second one exits at once (130), without a checkpoint."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import final_weights, subprocess_env, tiny_overrides, write_config

from flame.checkpoint import list_checkpoints

# A bigram model whose training forward sleeps: a step lasts long enough for a signal sent after
# the previous step was logged to land inside it (and for a second one to follow it there).
SLOW = """
import time

from torch import nn


class Slow(nn.Module):
    def __init__(self, vocab_size, delay):
        super().__init__()
        self.delay = delay
        self.emb = nn.Embedding(vocab_size, 16)
        self.out = nn.Linear(16, vocab_size)

    def forward(self, input_ids):
        if self.training:
            time.sleep(self.delay)
        return self.out(self.emb(input_ids))


def slow(vocab_size, delay=0.0):
    return Slow(vocab_size, delay)
"""


def _config(tmp_path, corpus, run, delay):
    model = tmp_path / "slow.py"
    model.write_text(SLOW)
    over = tiny_overrides(run, corpus, **{"model.name": f"{model}:slow", "model.overrides": {"delay": delay}})
    return write_config(tmp_path / f"{run.name}.toml", over)


def _train(cfg):
    return [sys.executable, "-m", "flame", "train", "--config", str(cfg)]


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _wait_for_step(run, step, proc, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = run / "metrics.jsonl"
        if m.is_file() and any(r["step"] >= step for r in _records(run)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the run")


@pytest.mark.slow
def test_first_sigint_checkpoints_exits_0_and_resumes_exactly(tmp_path, corpus):
    ref, part = tmp_path / "ref", tmp_path / "part"
    r = subprocess.run(
        _train(_config(tmp_path, corpus, ref, 0.3)), capture_output=True, text=True, env=subprocess_env()
    )
    assert r.returncode == 0, r.stderr[-2000:]

    cfg = _config(tmp_path, corpus, part, 0.3)
    proc = subprocess.Popen(
        _train(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )
    _wait_for_step(part, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]  # as SIGTERM: a clean stop, not the 130 of an interrupt
    assert "received SIGINT" in out
    stopped = _records(part)[-1]["step"]
    assert 2 <= stopped < 8
    last = list_checkpoints(part / "checkpoints")[-1]
    assert last.name == f"step-{stopped:08d}"  # the checkpoint is at the step it stopped at

    r = subprocess.run(_train(cfg), capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {last} at step {stopped}" in r.stdout
    a, b = _records(ref), _records(part)
    assert [x["step"] for x in b] == list(range(1, 9))
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    wa, wb = final_weights(ref), final_weights(part)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_second_sigint_exits_at_once(tmp_path, corpus):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train(_config(tmp_path, corpus, run, 3.0)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    _wait_for_step(run, 1, proc)
    proc.send_signal(signal.SIGINT)  # lands in step 2's 3-second forward
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "received SIGINT" not in out  # it did not wait for the step to end
    assert [r["step"] for r in _records(run)] == [1]
    assert list_checkpoints(run / "checkpoints") == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_to_the_process_group_with_loader_workers_checkpoints(tmp_path, corpus, sig):
    """A terminal's Ctrl-C, or a scheduler's SIGTERM to the job, reaches every process of the group,
    loader workers included: the workers outlast it and the main process checkpoints, rather than
    crashing on a worker that died of it."""
    import os

    run = tmp_path / "run"
    cfg = _config(tmp_path, corpus, run, 0.3)
    proc = subprocess.Popen(
        [*_train(cfg), "--data.num_workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        start_new_session=True,
    )
    _wait_for_step(run, 2, proc)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and f"received {sig.name}" in out
    stopped = _records(run)[-1]["step"]
    assert list_checkpoints(run / "checkpoints")[-1].name == f"step-{stopped:08d}"


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_a_run_with_loader_workers_exits_after_finishing_or_failing(tmp_path, corpus, streaming):
    """Workers still alive at exit are ended by the training process (multiprocessing's exit sends
    them SIGTERM): they must go at once, whatever they defer from other senders, or the run hangs."""
    run = tmp_path / "run"
    cfg = _config(tmp_path, corpus, run, 0.0)
    args = [*_train(cfg), "--data.num_workers", "2", "--data.streaming", str(streaming).lower()]
    r = subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["step"] for x in _records(run)][-1] == 8
    # a crash inside the loop: the error, a non-zero exit, and no hang
    bad = tmp_path / "bad"
    over = {"model.overrides": {"delay": "not a number"}}
    cfg = write_config(
        tmp_path / "bad.toml",
        {**tiny_overrides(bad, corpus), **over, "model.name": f"{tmp_path / 'slow.py'}:slow"},
    )
    r = subprocess.run(
        [*_train(cfg), "--data.num_workers", "2", "--data.streaming", str(streaming).lower()],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=240,
    )
    assert r.returncode != 0 and "not a number" in r.stderr + r.stdout
