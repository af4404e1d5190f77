"""The flight recorder and its instruments: metrics.jsonl across restarts, TensorBoard, W&B, MFU,
eval records, and the `flame plot | inspect | generate` commands, on real tiny CPU runs."""

import hashlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LOREM, metrics, tiny_overrides, write_config

from flame.cli import main
from flame.config import load_config
from flame.errors import FlameError
from flame.trainer import run_training

TOKENS_PER_STEP = 4 * 64  # data.batch_size x data.context_len of tiny_overrides, one process


def _records(run_dir, kind="train"):
    recs = metrics(run_dir)
    return [r for r in recs if r["kind"] == kind]


def _crash_at(step):
    """A process dying after `step` (no checkpoint of its own): what kill -9 leaves behind."""

    def cb(trainer):
        if trainer.step == step:
            raise KeyboardInterrupt

    return cb


def _stop_at(step):
    def cb(trainer):
        if trainer.step == step:
            trainer.stop_signal = "test"

    return cb


def _make_corpus(d, text=LOREM):
    d.mkdir()
    for i in range(6):
        (d / f"doc{i}.txt").write_text(f"Document {i}. " + text * (3 + i))
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished run with grad accumulation, eval, batch log and TensorBoard, shared by tests
    that only read it."""
    root = tmp_path_factory.mktemp("shared")
    corpus = _make_corpus(root / "corpus")
    held_out = _make_corpus(root / "held_out", "A tale of two cities, told again. ")
    over = tiny_overrides(
        root / "run",
        corpus,
        **{
            "train.max_steps": 8,
            "train.grad_accum": 2,
            "log.interval": 2,
            "log.batches": True,
            "eval.interval": 3,
            "eval.inputs": [str(held_out)],
            "eval.batches": 2,
            "checkpoint.interval": 4,
        },
    )
    result = run_training(load_config(overrides=over))
    assert result["stopped"] == "done"
    return root / "run"


# ---------------------------------------------------------------- metrics.jsonl and sinks


@pytest.mark.slow
def test_kill_and_resume_keeps_one_line_per_step_and_tensorboard_agrees(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = tiny_overrides(
        tmp_path / "r",
        corpus,
        **{"train.max_steps": 9, "checkpoint.interval": 3, "log.tensorboard": True},
    )
    cfg = load_config(overrides=over)
    with pytest.raises(KeyboardInterrupt):  # dies before its first checkpoint: starts over
        run_training(cfg, callbacks=[_crash_at(2)])
    with pytest.raises(KeyboardInterrupt):  # dies at step 5: steps 4-5 are logged, then redone
        run_training(cfg, callbacks=[_crash_at(5)])
    assert [r["step"] for r in _records(tmp_path / "r")] == [1, 2, 3, 4, 5]
    first = {r["step"]: r for r in _records(tmp_path / "r")}
    r = run_training(cfg, callbacks=[_stop_at(7)])  # preempted cleanly at 7 (checkpoint at 7)
    assert r["stopped"] == "preempted"
    assert run_training(cfg)["step"] == 9

    recs = _records(tmp_path / "r")
    steps = [r["step"] for r in recs]
    assert steps == list(range(1, 10))  # exactly one line per logged step, increasing
    assert [r["tokens"] for r in recs] == [s * TOKENS_PER_STEP for s in steps]  # tokens continue
    elapsed = [r["elapsed_s"] for r in recs]
    assert all(b >= a for a, b in zip(elapsed, elapsed[1:])), elapsed  # elapsed continues
    assert recs[3]["elapsed_s"] >= first[3]["elapsed_s"]
    assert all(r["total_steps"] == 9 and r["percent"] == pytest.approx(100 * r["step"] / 9) for r in recs)

    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == steps  # no doubled steps after two restarts
    for e, rec in zip(events, recs):
        assert e.value == pytest.approx(rec["loss"], rel=1e-6)  # TensorBoard stores float32
    lrs = acc.Scalars("train/lr")
    assert [e.value for e in lrs] == pytest.approx([r["lr"] for r in recs], rel=1e-6)


def test_logged_lr_is_the_lr_the_step_used(tmp_path, corpus):
    cfg = load_config(
        overrides=tiny_overrides(tmp_path / "r", corpus, **{"optim.lr": 0.003, "optim.warmup_steps": 2})
    )
    run_training(cfg)
    lr = {r["step"]: r["lr"] for r in _records(tmp_path / "r")}
    # linear warmup over 2 steps: the updates of steps 1, 2, 3 use 1/3, 2/3, then all of the peak
    assert lr[1] == pytest.approx(0.001)
    assert lr[2] == pytest.approx(0.002)
    assert lr[3] == pytest.approx(0.003)
    assert lr[8] == pytest.approx(0.0003)  # the cosine ends at min_lr_ratio (0.1) on the last step


@pytest.mark.slow
def test_wandb_offline_run_is_written_and_never_sent_a_step_twice(tmp_path, corpus, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    sent = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, step=None, **kw):
        sent.append((step, data))
        return real_log(self, data, step=step, **kw)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    run_dir = tmp_path / "r"
    over = tiny_overrides(
        run_dir, corpus, **{"train.max_steps": 6, "checkpoint.interval": 2, "log.wandb": "offline"}
    )
    cfg = load_config(overrides=over)
    with pytest.raises(KeyboardInterrupt):  # W&B got steps 1-3; the checkpoint is at 2
        run_training(cfg, callbacks=[_crash_at(3)])
    run_training(cfg)

    steps = [s for s, _ in sent]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3 was redone but not sent again (W&B would refuse it)
    loss = {r["step"]: r["loss"] for r in _records(run_dir)}
    for s, data in sent[3:]:
        assert data["train/loss"] == loss[s]
    run_id = (run_dir / "wandb_id").read_text().strip()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    # the resume kept the W&B run id (W&B adds "-1" when both runs start within the same second)
    assert runs and all(re.fullmatch(rf"offline-run-\d+_\d+-{run_id}(-\d+)?", p.name) for p in runs)
    files = [f for p in runs for f in p.glob(f"run-{run_id}.wandb")]
    assert files and all(f.stat().st_size > 0 for f in files)


def test_eval_every_interval_with_perplexity(run):
    evals = _records(run, "eval")
    assert [e["step"] for e in evals] == [3, 6, 8]  # every eval.interval, and at the end
    for e in evals:
        assert e["perplexity"] == pytest.approx(math.exp(e["loss"]), rel=1e-12)
        assert 0 < e["loss"] < math.log(257) + 1


def test_log_interval_and_fields(run):
    # byte tokenizer: a document is its bytes and an EOS
    samples = sum(len(f.read_bytes()) + 1 for f in (run.parent / "corpus").iterdir()) // 64
    recs = _records(run)
    assert [r["step"] for r in recs] == [2, 4, 6, 8]
    for r in recs:
        assert r["tokens"] == r["step"] * 2 * TOKENS_PER_STEP  # grad_accum 2
        assert r["epoch"] == pytest.approx(r["step"] * 8 / samples, abs=1e-6)
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_per_device"] == r["tokens_per_s"]
        assert 0 <= r["data_wait"] <= 1
        assert r["mfu"] is None  # a CPU's peak FLOP/s is unknown unless log.peak_flops is set
        assert r["memory_gib"] > 0 and r["bad_steps"] == 0


# flame modules that handle device tensors (data code reads CPU tensors, which costs no sync)
DEVICE_SIDE = tuple(
    f"flame/{m}.py" for m in ("trainer", "logging", "parallel", "optim", "model", "checkpoint")
)


def test_no_scalar_reads_on_non_logging_steps(tmp_path, corpus, monkeypatch):
    """With the guards off, flame reads no tensor value (a host-device sync on a GPU) except on
    logging steps."""
    reads = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(DEVICE_SIDE):
                reads.append(name)
            return real(self, *a, **kw)

        return wrapper

    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    per_step = {}

    def cb(trainer):
        per_step[trainer.step] = len(reads)
        reads.clear()

    over = tiny_overrides(
        tmp_path / "r", corpus, **{"log.interval": 3, "train.max_steps": 7, "train.max_bad_steps": 0}
    )
    run_training(load_config(overrides=over), callbacks=[cb])
    logging_steps = {3, 6, 7}
    for step, n in per_step.items():
        if step in logging_steps:
            assert n > 0, step  # the detector sees the reads logging needs
        else:
            assert n == 0, f"step {step} read a tensor value {n} time(s)"


# ---------------------------------------------------------------- MFU


def test_mfu_matches_a_hand_computation(tmp_path, corpus):
    from transformers import LlamaConfig

    hf = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    (tmp_path / "model").mkdir()
    hf.save_pretrained(tmp_path / "model")
    context, peak = 64, 1e9
    # by hand: every weight that multiplies activations, per token, times 6 (forward + backward),
    # plus attention scores and values: 12 x layers x hidden x context
    h, i, layers, v = 64, 160, 2, 257  # the byte tokenizer's rows, not the config's 300
    head_dim = h // 4
    per_layer = h * h + 2 * h * (2 * head_dim) + h * h + 3 * h * i  # q, k and v, o, gate/up/down
    n_matmul = layers * per_layer + v * h  # the untied output head; the input embedding is a lookup
    flops = 6 * n_matmul + 12 * layers * h * context
    over = tiny_overrides(tmp_path / "r", corpus, **{"log.peak_flops": peak, "train.max_steps": 3})
    over.pop("model.overrides")
    over["model.name"] = str(tmp_path / "model" / "config.json")
    run_training(load_config(overrides=over))
    for r in _records(tmp_path / "r"):
        assert r["mfu"] == pytest.approx(r["tokens_per_s_per_device"] * flops / peak, rel=0.01)


# ---------------------------------------------------------------- console


def test_console_is_plain_when_stdout_is_not_a_terminal(capsys, monkeypatch):
    from flame.logging import Console

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # only stdout decides
    c = Console("auto", total=10)
    assert c.mode == "plain"
    rec = {
        "step": 4,
        "total_steps": 10,
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 1234.0,
        "mfu": 0.25,
        "elapsed_s": 65.0,
        "eta_s": 30.0,
    }
    c.step(rec)
    c.close()
    out = capsys.readouterr().out
    assert out.strip() == (
        "step 4/10 | loss 2.5000 | lr 1.00e-03 | gnorm 0.500 | 1,234 tok/s | mfu 25.0% | 1m05s elapsed | eta 0m30s"
    )
    assert "\x1b[" not in out

    c = Console("rich", total=10)  # forced: the lines still reach a log, above the bar
    c.step(rec)
    c.close()
    assert "step 4/10 | loss 2.5000 | lr 1.00e-03" in capsys.readouterr().out


def test_warnings_of_other_ranks_reach_stderr(capsys):
    from flame.parallel import World
    from flame.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.world = World(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    t._say("resumed from somewhere")  # rank 0 says this one
    t._say("warning: 3 bad records in corpus/x.jsonl")
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err == "[rank 1] warning: 3 bad records in corpus/x.jsonl\n"


# ---------------------------------------------------------------- flame plot


@pytest.mark.slow
def test_plot_writes_a_png_of_the_requested_size(run, tmp_path, corpus, capsys):
    import matplotlib.image as mpimg

    other = tmp_path / "other"
    run_training(load_config(overrides=tiny_overrides(other, corpus, **{"train.max_steps": 4})))
    out = tmp_path / "plots" / "cmp.png"
    rc = main(["plot", str(run), str(other), "-o", str(out), "--x", "tokens", "--size", "640x480"])
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    img = mpimg.imread(out)
    assert img.shape[:2] == (480, 640)
    assert img[..., :3].std() > 0.05  # curves and text, not a blank canvas

    assert main(["plot", str(run), "--metrics", "loss,grad_norm"]) == 0
    assert mpimg.imread(run / "metrics.png").shape[:2] == (700, 1200)  # default: 350 px per panel


def test_plot_errors_are_clear(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(run), str(tmp_path / "empty")]) == 1
    assert f"{tmp_path / 'empty'} has no metrics.jsonl" in capsys.readouterr().err
    assert main(["plot", str(run), "--metrics", "loss,los"]) == 1
    err = capsys.readouterr().err
    assert "los appear in none of the runs" in err and "available:" in err
    (tmp_path / "a-file").write_text("")
    assert main(["plot", str(run), "-o", str(tmp_path / "a-file" / "x.png")]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert main(["plot", str(run), "-o", str(tmp_path / "x.nosuchformat")]) == 1
    assert "end --out with .png" in capsys.readouterr().err
    assert main(["plot", str(run), "-o", str(tmp_path / "noext")]) == 0
    assert f"wrote {tmp_path / 'noext.png'}" in capsys.readouterr().out  # the file savefig wrote
    assert (tmp_path / "noext.png").is_file()


# ---------------------------------------------------------------- flame inspect


def _digest(ids):
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def test_inspect_reconstructs_every_recorded_batch(run, capsys):
    logged = [json.loads(x) for x in (run / "batches" / "rank-0.jsonl").read_text().splitlines()]
    assert len(logged) == 8 * 2  # steps x micro-steps
    assert main(["inspect", str(run), "--step", "5", "--json"]) == 0
    via_cli = json.loads(capsys.readouterr().out)
    assert via_cli["world_size"] == 1 and via_cli["world_size_from"].startswith("checkpoint")
    from flame.inspect import inspect_step

    reports = {5: via_cli}
    for rec in logged:
        if rec["step"] not in reports:
            reports[rec["step"]] = inspect_step(run, rec["step"], tokens=0)
        rep = reports[rec["step"]]
        mb = next(m for m in rep["micro_batches"] if m["micro"] == rec["micro"])
        assert [x["sample"] for x in mb["samples"]] == rec["samples"]
        ids = [tok for x in mb["samples"] for tok in x["input_ids"]]
        assert len(ids) == 4 * 64
        assert _digest(ids) == rec["sha"], (rec["step"], rec["micro"])
        assert mb["matches_record"] is True


def test_inspect_shows_text_and_source(run, capsys):
    assert main(["inspect", str(run), "--step", "2", "--micro", "1", "--tokens", "30"]) == 0
    out = capsys.readouterr().out
    assert "rank 0 micro 1: samples 12-15" in out  # step 2 of a global batch of 8 (4 x 2 micro-steps)
    assert "matches the run's batch log" in out
    from flame.inspect import inspect_step

    rep = inspect_step(run, 2, micro=1, tokens=30)
    for x in rep["micro_batches"][0]["samples"]:
        assert json.dumps(x["text"], ensure_ascii=False) in out
        assert sum(d["tokens"] for d in x["documents"]) == 64
        pos = 0
        for doc in x["documents"]:  # each piece of the window is its document's bytes (+ EOS)
            # a corpus of the same content prepared first elsewhere is reused (content-addressed),
            # so the file named may be that copy's; its bytes are this corpus's
            assert Path(doc["file"]).is_file()
            source = [*open(doc["file"], "rb").read(), 256]
            piece = x["input_ids"][pos : pos + doc["tokens"]]
            assert piece == source[doc["offset"] : doc["offset"] + doc["tokens"]]
            pos += doc["tokens"]


def test_inspect_a_varlen_mixture_of_prepared_stores(tmp_path, corpus):
    from flame.data.prepare import prepare
    from flame.inspect import inspect_step

    other = _make_corpus(tmp_path / "other", "Call me Ishmael. Some years ago, never mind how long. ")
    prepare([str(corpus)], "byte", str(tmp_path / "a"), progress=False)
    prepare([str(other)], "byte", str(tmp_path / "b"), progress=False)
    over = tiny_overrides(
        tmp_path / "r",
        corpus,
        **{
            "data.mix": f"{tmp_path / 'a'}:0.7,{tmp_path / 'b'}:0.3",
            "data.varlen": True,
            "log.batches": True,
        },
    )
    del over["data.inputs"]
    over["train.max_steps"] = 4
    run_training(load_config(overrides=over))
    stores = set()
    for rec in map(json.loads, (tmp_path / "r" / "batches" / "rank-0.jsonl").read_text().splitlines()):
        (mb,) = inspect_step(tmp_path / "r", rec["step"], tokens=0)["micro_batches"]
        assert [x["sample"] for x in mb["samples"]] == rec["samples"]
        assert _digest([t for x in mb["samples"] for t in x["input_ids"]]) == rec["sha"]
        stores.update(x["store"] for x in mb["samples"])
    assert stores == {str(tmp_path / "a"), str(tmp_path / "b")}  # both sources were read


def test_inspect_refuses_what_it_cannot_know(run, tmp_path, capsys):
    assert main(["inspect", str(run), "--step", "3", "--world-size", "2"]) == 1
    assert "global batch is 8 samples" in capsys.readouterr().err
    assert main(["inspect", str(run), "--step", "3", "--rank", "1"]) == 1
    assert "the run had 1 process(es)" in capsys.readouterr().err
    streaming = tmp_path / "streaming"
    streaming.mkdir()
    write_config(streaming / "config.toml", {"data.streaming": True, "data.inputs": ["x"]})
    with pytest.raises(FlameError, match="inspect needs prepared data"):
        from flame.inspect import inspect_step

        inspect_step(streaming, 1, world_size=1)


# ---------------------------------------------------------------- flame generate


def test_generate_from_a_run_and_from_a_model_directory(run, tmp_path, capsys):
    from flame.inspect import load_for_generation

    args = ["--prompt", "It was the", "--max-tokens", "24", "--temperature", "0"]
    assert main(["generate", str(run), *args]) == 0
    cap = capsys.readouterr()
    from_run = cap.out
    assert from_run.startswith("It was the") and len(from_run.rstrip("\n")) > len("It was the")
    assert "step-00000008" in cap.err  # the latest checkpoint

    model, tok, _, _ = load_for_generation(run, None, torch.device("cpu"))
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    tok.save_pretrained(str(hf_dir))
    assert main(["generate", str(hf_dir), *args]) == 0
    assert capsys.readouterr().out == from_run  # same weights, greedy: the same text

    assert main(["generate", str(run), "--step", "4", "--prompt", "It", "--max-tokens", "5"]) == 0
    assert main(["generate", str(run), "--step", "3"]) == 1
    assert "no complete checkpoint of step 3" in capsys.readouterr().err


def test_generate_refuses_a_checkpoint_that_does_not_fit(run, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run, other)
    cfg = other / "config.toml"
    cfg.write_text(cfg.read_text().replace('"hidden_size" = 32', '"hidden_size" = 64'))
    assert main(["generate", str(other), "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "does not fit the model of" in err and "Size mismatch" in err, err


# ---------------------------------------------------------------- the meter's arithmetic

TRAIN_KEYS = [
    "kind", "step", "total_steps", "epoch", "loss", "lr", "grad_norm", "tokens", "target_tokens",
    "tokens_per_s", "tokens_per_s_per_device", "mfu", "flops_per_token", "flops_source", "attention",
    "memory_gib", "data_wait", "elapsed_s", "eta_s", "percent", "bad_steps", "skipped_steps",
]  # fmt: skip


def test_meter_records_of_a_scripted_run_equal_hand_computed_values():
    """A scripted clock: a segment resumed at 200 tokens (step 2) at t=10, two log windows. The
    first holds a 2 s evaluation (left out of the throughput, kept in the ETA) and 0.5 s of data
    wait; every field is the hand-computed value."""
    from flame.meter import Meter

    now = [0.0]
    m = Meter(
        total_steps=10,
        tokens_per_step=100,
        world_size=2,
        flops_per_token=6.0,
        flops_source="formula",
        attention="sdpa",
        peak_flops=1000.0,
        memory=lambda: 1.23456789,
        clock=lambda: now[0],
    )
    now[0] = 10.0
    m.start(200)
    m.waited(0.5)
    m.paused(2.0)
    now[0] = 20.0
    common = dict(lr=1e-3, grad_norm=0.5, elapsed_s=99.0, bad_steps=1, skipped_steps=0)
    first = m.train_record(step=4, tokens=400, epoch=0.1234567, loss=2.5, target_tokens=252, **common)
    assert list(first) == TRAIN_KEYS
    assert first == {
        "kind": "train",
        "step": 4,
        "total_steps": 10,
        "epoch": 0.123457,
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens": 400,
        "target_tokens": 252,
        "tokens_per_s": 25.0,  # 200 tokens in 20 - 10 - 2 (paused) = 8 s
        "tokens_per_s_per_device": 12.5,
        "mfu": 0.075,  # 12.5 tokens/s x 6 FLOPs / 1000 FLOP/s
        "flops_per_token": 6.0,
        "flops_source": "formula",
        "attention": "sdpa",
        "memory_gib": 1.2346,
        "data_wait": 0.0625,  # 0.5 s of 8
        "elapsed_s": 99.0,
        "eta_s": 30.0,  # 6 steps left x 10 s / 2 steps of this segment (the pause included)
        "percent": 40.0,
        "bad_steps": 1,
        "skipped_steps": 0,
    }
    now[0] = 21.0  # writing the record is in no window
    m.next_window(400)
    m.waited(1.0)
    now[0] = 25.0
    second = m.train_record(step=6, tokens=600, epoch=0.2, loss=2.0, target_tokens=252, **common)
    assert (second["tokens_per_s"], second["mfu"], second["data_wait"]) == (50.0, 0.15, 0.25)
    assert (second["eta_s"], second["percent"]) == (15.0, 60.0)  # 4 steps left x 15 s / 4 steps

    m.peak_flops = None  # a CPU, or a GPU flame does not know: no MFU rather than a wrong one
    assert m.train_record(step=7, tokens=700, epoch=0.2, loss=2.0, target_tokens=252, **common)["mfu"] is None


def test_a_real_run_writes_the_meter_schema(run):
    from conftest import metrics

    recs = metrics(run, "train")
    assert recs and all(list(r) == [*TRAIN_KEYS, "time"] for r in recs)
