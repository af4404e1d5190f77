"""`flame export --average K`: the exported weights are the mean of the last K checkpoints'."""

import torch
from conftest import tiny_overrides

from flame.checkpoint import list_checkpoints, load_model_weights
from flame.cli import main
from flame.config import load_config
from flame.export import _saved_config, build_for_export
from flame.runs import run_tokenizer
from flame.trainer import run_training


def _weights(ckpt):
    cfg, state = _saved_config(ckpt)
    tok = run_tokenizer(ckpt.parent.parent, cfg, state)
    model = build_for_export(cfg, tok.vocab_size)
    load_model_weights(ckpt, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_export_average_is_the_mean_of_the_last_checkpoints(tmp_path, corpus, capsys):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "r"
    over = tiny_overrides(run, corpus, **{"train.max_steps": 8, "checkpoint.interval": 2, "checkpoint.keep": 4})
    run_training(load_config(overrides=over))
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == [f"step-0000000{s}" for s in (2, 4, 6, 8)]
    each = [_weights(c) for c in ckpts[1:]]  # the last three: steps 4, 6, 8
    want = {k: (sum(w[k].double() for w in each) / 3).float() for k in each[0]}

    out = tmp_path / "avg"
    assert main(["export", str(run), "--out", str(out), "--average", "3"]) == 0
    assert "steps 4, 6, 8" in capsys.readouterr().err
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert any(not torch.equal(want[k], each[-1][k]) for k in want)  # not the last checkpoint

    # ending at --step 6: steps 2, 4, 6
    out6 = tmp_path / "avg6"
    assert main(["export", str(run), "--out", str(out6), "--average", "3", "--step", "6"]) == 0
    assert "steps 2, 4, 6" in capsys.readouterr().err
    # more than the run kept, or nonsense: clear errors
    for args, text in ((["--average", "5"], "has 4 checkpoint(s)"), (["--average", "0"], "1 or more")):
        assert main(["export", str(run), "--out", str(tmp_path / "x"), *args]) == 1
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err, err
