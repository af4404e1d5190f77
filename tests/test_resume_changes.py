"""Changes flame allows on resume take effect; non-finite or out-of-range knobs are refused."""

import pytest
from conftest import metrics, tiny_overrides

from flame.config import _SECTION_TYPES, _field_types, load_config
from flame.errors import ConfigError
from flame.optim import lr_factor
from flame.trainer import Trainer, run_training


def _lrs(run_dir):
    recs = metrics(run_dir)
    return {r["step"]: r["lr"] for r in recs if r["kind"] == "train"}


@pytest.mark.slow
def test_changed_lr_and_schedule_length_take_effect(tmp_path, corpus):
    run = tmp_path / "r"
    first = tiny_overrides(run, corpus, **{"train.max_steps": 10, "optim.lr": 1e-3, "optim.warmup_steps": 2})
    run_training(load_config(overrides=first))
    again = {**first, "train.max_steps": 20, "optim.lr": 5e-3}
    run_training(load_config(overrides=again))
    cfg = load_config(overrides=again)
    lrs = _lrs(run)
    assert list(lrs) == list(range(1, 21))
    for s in range(1, 11):  # the first segment ran the old schedule
        assert lrs[s] == pytest.approx(1e-3 * lr_factor(s - 1, 10, load_config(overrides=first).optim))
    for s in range(11, 21):  # the rest: the new peak and the new length, as a fresh 20-step run has
        assert lrs[s] == pytest.approx(5e-3 * lr_factor(s - 1, 20, cfg.optim), rel=1e-12)


@pytest.mark.slow
def test_changed_weight_decay_betas_eps_take_effect(tmp_path, corpus):
    run = tmp_path / "r"
    first = tiny_overrides(run, corpus, **{"train.max_steps": 3})
    run_training(load_config(overrides=first))
    changed = {
        **first,
        "train.max_steps": 4,
        "optim.weight_decay": 0.02,
        "optim.beta1": 0.8,
        "optim.beta2": 0.99,
        "optim.eps": 1e-6,
    }
    t = Trainer(load_config(overrides=changed))
    try:
        t.setup()
        assert t.step == 3
        decay, no_decay = t.optimizer.param_groups
        assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
        for g in (decay, no_decay):
            assert g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6
    finally:
        t.close()


def _float_keys():
    return [
        f"{s}.{n}"
        for s, cls in _SECTION_TYPES.items()
        for n, typ in _field_types(cls).items()
        if typ is float
    ]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", _float_keys())
def test_every_float_knob_refuses_non_finite(key, value):
    with pytest.raises(ConfigError) as e:
        load_config([f"--{key}", value])
    assert f"{key} = " in str(e.value) and "finite" in str(e.value)


@pytest.mark.parametrize(
    "key,value",
    [
        ("train.seed", "1e30"),
        ("data.batch_size", "1000000000000000"),
        ("train.grad_accum", "1e12"),
        ("train.max_tokens", "1e30"),
        ("data.context_len", "1e9"),
    ],
)
def test_huge_integers_are_refused_with_the_bound(key, value):
    with pytest.raises(ConfigError) as e:
        load_config([f"--{key}", value])
    assert f"{key} = " in str(e.value) and "out of range: at most" in str(e.value)


def test_defaults_are_in_range():
    from flame.config import Config, validate

    assert not [p for p in validate(Config()) if "finite" in p or "out of range" in p]


def test_non_finite_weights_are_never_checkpointed(tmp_path, corpus):
    """Weights that turned NaN make every later loss NaN: the guard stops the run, and the stop
    saves no checkpoint of those weights (the last good one stays the latest)."""
    from flame.checkpoint import list_checkpoints

    over = {
        "model.name": "models_for_tests:bigram",
        "model.overrides": {"poison_call": 5},
        "train.max_bad_steps": 2,
        "train.max_steps": 10,
        "checkpoint.interval": 2,
    }
    r = run_training(load_config(overrides=tiny_overrides(tmp_path / "r", corpus, **over)))
    assert r["stopped"] == "diverged" and r["step"] == 6
    kept = [p.name for p in list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert kept == ["step-00000002", "step-00000004"]
