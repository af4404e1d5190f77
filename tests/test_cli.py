"""The command line as one tool: help, the dialect of `flame prepare`, closed pipes, one error
message under torchrun, `flame status`, `flame resume` / `flame train RUN_DIR`."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import run_torchrun, tiny_overrides, write_config

from flame.checkpoint import list_checkpoints, read_trainer_state, step_of
from flame.cli import main, report_error, train_config
from flame.config import all_keys, resume_config
from flame.errors import ConfigError, FlameError
from flame.records import read_records
from flame.runguard import RunLock
from flame.status import format_status, run_status


def _train_records(run_dir):
    return {r["step"]: r for r in read_records(run_dir / "metrics.jsonl") if r.get("kind") == "train"}


def _quiet_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step run (checkpoints at 2 and 4) and the same setup run 6 steps without a stop; a
    constant schedule, so that lengthening the run does not change its first steps."""
    tmp = tmp_path_factory.mktemp("cli")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(f"Document {i}. " + "It was the best of times. " * (20 + i))
    base = tiny_overrides(
        tmp / "short",
        corpus,
        **{
            "train.max_steps": 4,
            "checkpoint.interval": 2,
            "optim.schedule": "constant",
            "data.cache_dir": str(tmp / "cache"),
        },
    )
    cfg = write_config(tmp / "run.toml", base)
    code, out, _ = _quiet_main(["train", "--config", str(cfg)])
    assert code == 0
    code, _, _ = _quiet_main(
        ["train", "--config", str(cfg), "--train.max_steps", "6", "--train.run_dir", str(tmp / "long")]
    )
    assert code == 0
    return {"tmp": tmp, "short": tmp / "short", "long": tmp / "long", "toml": cfg, "start_output": out}


@pytest.mark.slow
def test_train_prints_only_what_differs_and_the_config_path(runs):
    head = runs["start_output"].split("run directory:")[0]
    flat = " ".join(head.split())
    assert f"full config: {runs['short'] / 'config.toml'}" in head
    assert (runs["short"] / "config.toml").is_file()
    assert '[optim] warmup_steps = 2, schedule = "constant"' in flat
    assert "max_steps = 4," in flat and "[checkpoint] interval = 2" in flat
    for unchanged in ("beta1", "weight_decay", "[parallel]", "[eval]", "wandb_project"):
        assert unchanged not in head
    assert len(head.strip().splitlines()) <= 20  # not the 90-line config (long paths wrap onto more lines)


@pytest.mark.parametrize("width", [60, 100])
def test_help_fits_the_width_lists_every_key_and_choices(width, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(width))
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert max(len(x) for x in lines) <= width
    for key in all_keys():
        assert f"--{key} " in text
    assert "--optim.schedule {cosine,linear,constant,wsd}" in text
    assert "--data.bad_records {skip,error}" in text
    assert "--data.context_len INT" in text and "(default: 256)" in text
    assert "--model.overrides JSON" in text and "'{\"hidden_size\": 512}'" in text
    sections = [x.split()[0] for x in lines if x.startswith("[")]
    assert sections == [
        "[model]",
        "[data]",
        "[train]",
        "[optim]",
        "[checkpoint]",
        "[log]",
        "[eval]",
        "[parallel]",
    ]


def _closed_pipe_run(args, cwd=None):
    """Run flame with a stdout whose reader is gone before the first write (`flame ... | head`
    after head exited): the write fails every time, not only under a race."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(
            [sys.executable, "-m", "flame", *args],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            timeout=180,
        )
    finally:
        os.close(w)


def test_closed_pipe_after_help_is_quiet():
    r = _closed_pipe_run(["train", "--help"])
    assert r.returncode == 141
    assert r.stderr == ""


@pytest.mark.slow
def test_closed_pipe_after_inspect_json_is_quiet(runs):
    r = _closed_pipe_run(["inspect", str(runs["short"]), "--step", "1", "--json"])
    assert r.returncode == 141
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


def test_status_reads_the_run_as_its_files_say(runs, capsys):
    run = runs["short"]
    recs = _train_records(run)
    last = recs[max(recs)]
    ckpts = list_checkpoints(run / "checkpoints")
    state = read_trainer_state(ckpts[-1])
    s = run_status(run)
    assert s["step"] == last["step"] == 4 and s["tokens"] == last["tokens"] == state["tokens"]
    assert s["total_steps"] == 4 and s["finished"] is True
    assert s["checkpoint"]["step"] == step_of(ckpts[-1]) == 4
    assert s["checkpoint"]["path"] == str(ckpts[-1])
    assert s["checkpoints"] == [step_of(p) for p in ckpts] == [2, 4]
    assert s["last_metrics"] == {k: last[k] for k in ("step", "loss", "lr", "tokens_per_s", "time")}
    assert s["process"] is None
    assert main(["status", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(s))
    text = format_status(s)
    assert f"step        4 of 4, {last['tokens']:,} tokens" in text and "finished" in text
    assert f"loss {last['loss']:.4f}" in text


def test_status_names_the_process_that_holds_the_run(runs):
    lock = RunLock(runs["short"])
    lock.acquire()
    try:
        held = run_status(runs["short"])["process"]
    finally:
        lock.release()
    assert held is not None and held["pid"] == os.getpid()
    assert run_status(runs["short"])["process"] is None


def test_status_of_a_directory_that_is_not_a_run(tmp_path):
    code, _, err = _quiet_main(["status", str(tmp_path)])
    assert code == 1 and "not a flame run directory" in err and "Traceback" not in err


def test_resume_continues_as_an_uninterrupted_run(runs):
    run = runs["tmp"] / "resumed"
    shutil.copytree(runs["short"], run)  # its config.toml still names the old run_dir
    code, out, _ = _quiet_main(["resume", str(run), "--train.max_steps", "6"])
    assert code == 0, out
    assert "resumed from" in out and "step-00000004" in out
    got, want = _train_records(run), _train_records(runs["long"])
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert (got[step]["loss"], got[step]["grad_norm"]) == (want[step]["loss"], want[step]["grad_norm"])
    assert step_of(list_checkpoints(run / "checkpoints")[-1]) == 6
    assert not (runs["short"] / "checkpoints" / "step-00000006").exists()  # the copy ran, not the original


def test_train_with_a_run_dir_is_resume(runs):
    run = runs["short"]
    args = ["--train.max_steps", "9", "--log.interval", "2"]
    cfg = train_config([str(run), *args])
    assert cfg == resume_config(run, args)
    assert cfg.train.max_steps == 9 and cfg.log.interval == 2 and cfg.train.run_dir == str(run)
    assert cfg.optim.schedule == "constant" and cfg.checkpoint.load == "" and cfg.checkpoint.resume


def test_resume_mistakes_are_clear(runs, tmp_path):
    code, _, err = _quiet_main(["train", str(tmp_path / "nope")])
    assert code == 2 and "'" + str(tmp_path / "nope") + "' is not a run directory" in err
    code, _, err = _quiet_main(["resume", str(tmp_path)])
    assert code == 2 and "has no config.toml" in err and "Traceback" not in err
    code, _, err = _quiet_main(["resume", "--train.max_steps", "3"])
    assert code == 2 and "needs the run directory" in err
    with pytest.raises(ConfigError, match="a resume continues"):
        resume_config(runs["short"], ["--train.run_dir", str(tmp_path / "other")])
    with pytest.raises(ConfigError, match="a resume reads"):
        resume_config(runs["short"], ["--config", str(runs["toml"])])


class _Store:
    """The part of a c10d store report_error uses."""

    def __init__(self, **items):
        self.items = {k: v.encode() for k, v in items.items()}

    def check(self, keys):
        return all(k in self.items for k in keys)

    def get(self, key):
        return self.items[key]

    def set(self, key, value):
        self.items[key] = value.encode() if isinstance(value, str) else value


KEY = "flame/error/0/rank0"


def test_report_error_once_per_launch(capsys):
    store = _Store()
    report_error(FlameError("data is bad", hint="fix it"), rank=0, world=2, store=store)
    assert capsys.readouterr().err == "error: data is bad\n  hint: fix it\n"
    assert store.items[KEY] == b"data is bad"
    # another rank with the same error, or rank 0's error echoed, stays quiet
    report_error(FlameError("data is bad"), rank=1, world=2, store=store, wait_s=0.1)
    report_error(FlameError("rank 0 stopped: data is bad"), rank=1, world=2, store=None, wait_s=0.1)
    report_error(ConfigError("x = 1 is wrong"), rank=3, world=4, store=None)
    assert capsys.readouterr().err == ""
    # only this rank failed (rank 0 says nothing), or failed differently: it speaks, with its rank
    report_error(FlameError("shard 3 is short"), rank=1, world=2, store=_Store(), wait_s=0.1)
    report_error(FlameError("other"), rank=2, world=4, store=store, wait_s=0.1)
    assert capsys.readouterr().err == "[rank 1] error: shard 3 is short\n[rank 2] error: other\n"


@pytest.mark.slow
def test_one_error_message_under_torchrun(tmp_path):
    missing = tmp_path / "no-such-store"
    r = run_torchrun(2, ["train", "--data.store", str(missing), "--train.run_dir", str(tmp_path / "r")])
    text = r.stdout + r.stderr
    assert r.returncode != 0
    assert text.count(f"no such directory '{missing}'") == 1, text
    assert "[rank 1]" not in text and "flame/cli.py" not in text  # no traceback of ours


def test_prepare_speaks_the_config_dialect_and_the_old_one(tmp_path, capsys):
    from flame.data.prepare import cli

    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.jsonl").write_text(json.dumps({"body": f"doc {i} " * 40}) + "\n")
    common = ["--workers", "1", "--no-progress"]
    assert (
        cli(
            [
                "--data.inputs",
                str(corpus),
                "--data.store",
                str(tmp_path / "new"),
                "--data.text_field",
                "body",
                *common,
            ]
        )
        == 0
    )
    assert "note:" not in capsys.readouterr().err
    assert cli(["--input", str(corpus), "--output", str(tmp_path / "old"), "--text-field=body", *common]) == 0
    notes = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note:")]
    assert notes == [
        f"note: flame prepare {old} is now spelt {new} (as in flame train); the old spelling still works"
        for old, new in (
            ("--input", "--data.inputs"),
            ("--output", "--data.store"),
            ("--text-field", "--data.text_field"),
        )
    ]
    new, old = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("new", "old"))
    assert new["num_tokens"] > 0
    assert [s["checksum"] for s in new["shards"]] == [s["checksum"] for s in old["shards"]]
