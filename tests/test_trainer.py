import json

import torch
from conftest import final_weights, tiny_overrides

from flame.checkpoint import list_checkpoints
from flame.config import load_config
from flame.trainer import run_training


def _losses(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}, recs


def _stop_at(step):
    def cb(trainer):
        if trainer.step == step:
            trainer.stop_signal = "test"

    return cb


def test_resume_is_exact(tmp_path, corpus):
    n = 5
    full = tmp_path / "full"
    run_training(load_config(overrides=tiny_overrides(full, corpus, **{"train.max_steps": 2 * n})))

    part = tmp_path / "part"
    cfg = load_config(overrides=tiny_overrides(part, corpus, **{"train.max_steps": 2 * n}))
    r = run_training(cfg, callbacks=[_stop_at(n)])
    assert r["stopped"] == "preempted" and r["step"] == n
    r = run_training(cfg)
    assert r["stopped"] == "done" and r["step"] == 2 * n

    a, recs_a = _losses(full)
    b, recs_b = _losses(part)
    assert list(b) == list(range(1, 2 * n + 1))  # one line per step, no duplicate, no gap
    for s in range(n + 1, 2 * n + 1):
        assert a[s] == b[s], f"step {s}: {a[s]} != {b[s]}"
    assert [r["tokens"] for r in recs_a] == [r["tokens"] for r in recs_b]
    elapsed = [r["elapsed_s"] for r in recs_b]
    assert elapsed == sorted(elapsed)  # elapsed continues across the restart

    wa, wb = final_weights(full), final_weights(part)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_finished_run_resumes_to_nothing(tmp_path, corpus):
    cfg = load_config(overrides=tiny_overrides(tmp_path / "r", corpus, **{"train.max_steps": 3}))
    assert run_training(cfg)["step"] == 3
    again = run_training(cfg)
    assert again["stopped"] == "done" and again["step"] == 3
    steps, _ = _losses(tmp_path / "r")
    assert list(steps) == [1, 2, 3]


def test_loss_decreases_and_keep_last_k(tmp_path, corpus):
    cfg = load_config(
        overrides=tiny_overrides(
            tmp_path / "r", corpus, **{"train.max_steps": 30, "checkpoint.interval": 5, "checkpoint.keep": 2}
        )
    )
    run_training(cfg)
    steps, _ = _losses(tmp_path / "r")
    assert steps[30] < steps[1] * 0.7
    kept = [p.name for p in list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert kept == ["step-00000025", "step-00000030"]


def test_every_start_is_recorded(tmp_path, corpus):
    cfg = load_config(overrides=tiny_overrides(tmp_path / "r", corpus, **{"train.max_steps": 6}))
    run_training(cfg, callbacks=[_stop_at(3)])
    run_training(cfg)
    starts = [json.loads(x) for x in (tmp_path / "r" / "starts.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 3]
    assert starts[0]["resumed_from"] is None and starts[1]["resumed_from"].endswith("step-00000003")
    assert starts[1]["tokens"] == 3 * 4 * 64 and starts[1]["world_size"] == 1
    assert starts[1]["attention"] == "sdpa" and starts[1]["flops_source"] == "measured"
    assert starts[0]["parameters"] > 0 and starts[0]["versions"]["torch"]
