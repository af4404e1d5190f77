"""The varlen isolation check is a proof over what training sees: rows of documents up to the
context at start, and again on the trained weights, where a leak stops the run with a checkpoint."""

import pytest
import torch
from conftest import tiny_overrides

from flame.cli import main
from flame.config import load_config
from flame.errors import ConfigError, FlameError
from flame.model import probe_rows
from flame.trainer import run_training


def _over(tmp_path, corpus, name, **extra):
    over = tiny_overrides(
        tmp_path / "run",
        corpus,
        **{"model.name": f"models_for_tests:{name}", "data.varlen": True, "data.context_len": 128, **extra},
    )
    over.pop("model.overrides", None)
    return over


def test_probe_rows_reach_the_context_and_past_chunks():
    for L in (48, 128, 256, 2048):
        rows = probe_rows(L)
        assert all(sum(r) <= max(L, 24) and min(r) > 0 for r in rows)
        assert any(sum(r) == L for r in rows)  # a row of the full context
        assert max(max(r) for r in rows) >= L - 24  # a document longer than any chunk below it
        assert any(len(r) >= 3 for r in rows)


def test_a_model_mixing_32_token_chunks_is_refused_at_start(tmp_path, corpus):
    """Three short documents (the old probe) fit in one chunk: that probe passes the model;
    documents up to the context do not."""
    from models_for_tests import chunk_mixer

    from flame.model import _PROBE_DOCS, forward_params, isolation

    model = chunk_mixer(257)
    assert isolation(model, forward_params(model), 257, "cpu", _PROBE_DOCS) <= 1e-6
    with pytest.raises(ConfigError, match="does not keep packed documents apart"):
        run_training(load_config(overrides=_over(tmp_path, corpus, "chunk_mixer")))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_leak_that_starts_at_zero_stops_the_trained_run_with_a_checkpoint(tmp_path, corpus, capsys):
    over = _over(tmp_path, corpus, "zero_start_leak", **{"train.max_steps": 6, "log.interval": 2})
    with pytest.raises(FlameError, match="at step 2 the trained model no longer keeps packed documents"):
        run_training(load_config(overrides=over))
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000002"]
    # the command line: the same message, no traceback, exit code 1
    capsys.readouterr()
    args = ["train", "--config", str(tmp_path / "c.toml")]
    from conftest import write_config

    over["train.run_dir"] = str(tmp_path / "cli")
    write_config(tmp_path / "c.toml", over)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "no longer keeps packed documents apart" in err and "Traceback" not in err


def test_an_isolated_model_trains_through_every_check(tmp_path, corpus):
    over = _over(tmp_path, corpus, "isolated", **{"train.max_steps": 4, "log.interval": 2, "checkpoint.interval": 2})
    result = run_training(load_config(overrides=over))
    assert result["stopped"] == "done" and result["step"] == 4
    assert torch.get_num_threads() >= 1
