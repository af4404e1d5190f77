"""kill -9 at random moments, some during a checkpoint save: every restart of the same command
resumes, and the final weights equal an uninterrupted run's, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import final_weights, tiny_overrides, write_config

from flame.checkpoint import list_checkpoints

STEPS = 150  # long enough for several kills whatever the machine's speed


def _start(cfg):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "flame", "train", "--config", str(cfg)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _saving(run):
    root = run / "checkpoints"
    return root.is_dir() and any(".tmp" in p.name for p in root.iterdir())


@pytest.mark.slow
def test_kill_nine_campaign(tmp_path, corpus):
    over = {"train.max_steps": STEPS, "checkpoint.interval": 2, "checkpoint.keep": 2}
    ref = tmp_path / "ref"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame",
            "train",
            "--config",
            str(write_config(tmp_path / "ref.toml", tiny_overrides(ref, corpus, **over))),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.toml", tiny_overrides(run, corpus, **over))
    rng = random.Random(7)
    kills, during_save = 0, 0
    for attempt in range(12):
        proc = _start(cfg)
        want_save = attempt % 2 == 0  # every other kill aims at a checkpoint being written
        deadline = time.time() + rng.uniform(3.0, 6.0)
        while proc.poll() is None and time.time() < deadline + 30:
            if want_save and _saving(run):
                break
            if not want_save and time.time() > deadline:
                break
            time.sleep(0.002)
        if proc.poll() is not None:
            break  # it finished
        was_saving = _saving(run)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        during_save += was_saving
        if kills >= 6 and during_save >= 2:
            break
    assert kills >= 5 and during_save >= 1, (kills, during_save)
    r = subprocess.run(
        [sys.executable, "-m", "flame", "train", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert list_checkpoints(run / "checkpoints")[-1].name == f"step-{STEPS:08d}"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # one line per step despite the kills
    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
