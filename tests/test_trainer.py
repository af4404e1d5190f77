import json

import pytest
import torch
from conftest import final_weights, metrics, tiny_overrides

from flame.checkpoint import list_checkpoints
from flame.config import load_config
from flame.trainer import run_training


def _losses(run_dir):
    recs = metrics(run_dir)
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}, recs


def _stop_at(step):
    def cb(trainer):
        if trainer.step == step:
            trainer.stop_signal = "test"

    return cb


@pytest.mark.slow
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


@pytest.mark.slow
def test_finished_run_resumes_to_nothing(tmp_path, corpus):
    cfg = load_config(overrides=tiny_overrides(tmp_path / "r", corpus, **{"train.max_steps": 3}))
    assert run_training(cfg)["step"] == 3
    again = run_training(cfg)
    assert again["stopped"] == "done" and again["step"] == 3
    steps, _ = _losses(tmp_path / "r")
    assert list(steps) == [1, 2, 3]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_state_dict_round_trip_continues_like_the_uninterrupted_run(tmp_path, corpus):
    """Trainer.state_dict() is what trainer.json holds; loaded into a fresh trainer (weights and
    optimizer copied over), training continues exactly as the uninterrupted run, the log window
    that spans the stop included."""
    import copy

    from flame.checkpoint import read_trainer_state
    from flame.trainer import Trainer

    over = {"train.max_steps": 8, "log.interval": 3}  # the stop at step 5 falls inside a log window
    full = tmp_path / "full"
    run_training(load_config(overrides=tiny_overrides(full, corpus, **over)))

    a = Trainer(load_config(overrides=tiny_overrides(tmp_path / "a", corpus, **over)), [_stop_at(5)])
    try:
        a.setup()
        assert a.train()["stopped"] == "preempted"
        state = a.state_dict()
        weights, optim = copy.deepcopy(a.model.state_dict()), copy.deepcopy(a.optimizer.state_dict())
    finally:
        a.close()
    saved = read_trainer_state(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    for k in state:
        if k != "elapsed_s":  # the clock moved on since the save
            assert saved[k] == state[k], k
    state = json.loads(json.dumps(state))  # plain JSON, as trainer.json

    fresh = tmp_path / "b"
    b = Trainer(load_config(overrides=tiny_overrides(fresh, corpus, **over)))
    try:
        b.setup()
        b.model.load_state_dict(weights)
        b.optimizer.load_state_dict(optim)
        b.load_state_dict(state)
        assert b.step == 5
        assert b.train()["stopped"] == "done"
    finally:
        b.close()
    ref = {r["step"]: r for r in _losses(full)[1]}
    got = _losses(fresh)[1]
    assert [r["step"] for r in got] == [6, 8]
    for r in got:
        for key in ("loss", "tokens", "target_tokens", "lr", "grad_norm", "bad_steps"):
            assert r[key] == ref[r["step"]][key], (r["step"], key)
    wa, wb = final_weights(full), final_weights(fresh)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
