"""`flame check`: a resume self-test of the user's own setup. Bitwise identical and exit 0 on
deterministic CPU setups (plain, mixture + varlen); "diverged at step K" and a non-zero exit on
models made non-deterministic on purpose, with the cause named."""

import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_overrides, write_config
from torch import nn

from flame.cli import main

HERE = Path(__file__).resolve()


class Noisy(nn.Module):
    """A bigram model adding noise from a generator seeded by the operating system: two runs of
    the same setup differ from the first step."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 16)
        self.out = nn.Linear(16, vocab_size)
        self.gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(7), "little"))

    def forward(self, input_ids):
        h = self.emb(input_ids)
        if self.training:
            h = h + 1e-2 * torch.randn(h.shape, generator=self.gen)
        return self.out(h)


class Drifting(nn.Module):
    """A bigram model whose output depends on a call counter kept as a plain attribute (not a
    buffer): runs agree until a restart, which the checkpoint does not carry it across."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 16)
        self.out = nn.Linear(16, vocab_size)
        self.calls = 0

    def forward(self, input_ids):
        if self.training:
            self.calls += 1
        return self.out(self.emb(input_ids) * (1 + 1e-3 * self.calls))


def noisy(vocab_size: int, **_):
    return Noisy(vocab_size)


def drifting(vocab_size: int, **_):
    return Drifting(vocab_size)


def _config(tmp_path, corpus, **extra):
    over = tiny_overrides(tmp_path / "unused", corpus, **extra)
    return write_config(tmp_path / "run.toml", over)


@pytest.mark.slow
def test_deterministic_setup_is_bitwise_identical(tmp_path, corpus, capsys):
    cfg = _config(tmp_path, corpus)
    work = tmp_path / "work"
    assert main(["check", "--config", str(cfg), "--steps", "6", "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 3 (as by SIGTERM), resumed: bitwise identical" in out
    assert "killed (-9) at step 3 after the checkpoint of step 2, resumed: bitwise identical" in out
    assert "verdict: bitwise identical" in out
    # the runs it compared: every step logged once, the kill's redone step 3 included
    for name in ("uninterrupted", "stopped", "killed"):
        recs = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
        assert len((work / name / "batches" / "rank-0.jsonl").read_text().splitlines()) == 6
    # the user's own settings are kept; only length, run directory and logging change
    saved = (work / "stopped" / "config.toml").read_text()
    assert "context_len = 64" in saved and "batches = true" in saved


def _store(root, name, text_of):
    from flame.data.prepare import prepare

    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": text_of(i)}) + "\n" for i in range(30)))
    out = root / f"store-{name}"
    prepare([str(src)], "byte", str(out), workers=1, progress=False)
    return out


@pytest.mark.slow
def test_mixture_with_varlen_is_bitwise_identical(tmp_path, capsys):
    rng = random.Random(1)
    a = _store(tmp_path, "a", lambda i: "".join(rng.choice("xyz ") for _ in range(rng.randint(5, 200))))
    b = _store(tmp_path, "b", lambda i: f"doc {i}: " + "abc " * rng.randint(1, 40))
    cfg = _config(
        tmp_path, tmp_path, **{"data.inputs": [], "data.mix": f"{a}:0.6,{b}:0.4", "data.varlen": True}
    )
    assert main(["check", "--config", str(cfg), "--steps", "5", "--stop-at", "2", "--no-kill"]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 2 (as by SIGTERM), resumed: bitwise identical" in out
    assert "verdict: bitwise identical" in out


@pytest.mark.slow
def test_unseeded_noise_diverges_at_step_1(tmp_path, corpus, capsys):
    cfg = _config(tmp_path, corpus, **{"model.name": f"{HERE}:noisy"})
    assert main(["check", "--config", str(cfg), "--steps", "4", "--no-kill"]) == 1
    out = capsys.readouterr().out
    assert "resumed: diverged at step 1 (before the interruption at step 2" in out
    assert "verdict: diverged at step 1" in out
    assert "draws random numbers that flame's seed does not fix" in out


@pytest.mark.slow
def test_state_outside_the_checkpoint_diverges_after_the_resume(tmp_path, corpus, capsys):
    cfg = _config(tmp_path, corpus, **{"model.name": f"{HERE}:drifting"})
    assert main(["check", "--config", str(cfg), "--steps", "4", "--no-kill"]) == 1
    out = capsys.readouterr().out
    assert "diverged at step 3 (after the resume from step 2)" in out
    assert "keeps state that the checkpoint does not hold" in out
    # the differences are small: a tolerance accepts them, and says it is not exact
    assert main(["check", "--config", str(cfg), "--steps", "4", "--no-kill", "--tolerance", "1e-2"]) == 0
    out = capsys.readouterr().out
    assert "resumed: close within 0.01" in out and "verdict: close within 0.01" in out


def test_check_errors_are_clear(tmp_path, corpus, capsys, monkeypatch):
    cfg = str(_config(tmp_path, corpus))
    for args, exit_code, text in (
        (["--steps", "2"], 1, "needs at least 3"),
        (["--steps", "6", "--stop-at", "6"], 1, "choose a step in [1, 5]"),
        (["--tolerance", "nan"], 1, "finite number"),
        (["--steps", "many"], 1, "expected int"),
        (["--steps"], 1, "takes a value"),
        (["--optim.lrr", "1"], 2, "did you mean optim.lr"),
    ):
        assert main(["check", "--config", cfg, *args]) == exit_code, args
        assert text in capsys.readouterr().err, args
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["check", "--config", cfg]) == 1
    assert "not under torchrun" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "w" / "stopped").mkdir(parents=True)
    assert main(["check", "--config", cfg, "--work-dir", str(tmp_path / "w")]) == 1
    assert "already holds runs of a check" in capsys.readouterr().err
    assert main(["check", "--help"]) == 0 and "--stop-at K" in capsys.readouterr().out


@pytest.mark.slow
def test_elastic_resume_on_two_processes(tmp_path, corpus, capsys):
    """Stopped on one process, resumed on two (torchrun, gloo): the same samples every step, the
    losses equal up to the order of the float sums."""
    cfg = _config(tmp_path, corpus, **{"model.overrides": dict(TINY)})
    assert main(["check", "--config", str(cfg), "--steps", "4", "--no-kill", "--elastic"]) == 0
    out = capsys.readouterr().out
    assert "stopped on 1 process at step 2, resumed on 2: " in out
    assert "on 2 processes" in out.split("verdict:")[1]


@pytest.mark.slow
def test_the_default_setup_checks_bitwise_identical(tmp_path, capsys, monkeypatch):
    """`flame check --steps 20` on the embedded default (its model, corpus and batch): every leg,
    the killed child too, runs with this process's thread count, so the sums agree to the bit."""
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--steps", "20", "--work-dir", str(tmp_path / "w")]) == 0
    assert "verdict: bitwise identical" in capsys.readouterr().out
    starts = [json.loads(x) for x in (tmp_path / "w" / "killed" / "starts.jsonl").read_text().splitlines()]
    assert len(starts) == 2 and starts[0]["exactness"] == starts[1]["exactness"]
    assert starts[0]["exactness"]["intra_op_threads"] == torch.get_num_threads()


def test_a_resume_with_another_thread_count_is_announced(tmp_path, corpus, capsys):
    from flame.config import load_config
    from flame.trainer import run_training

    over = tiny_overrides(tmp_path / "r", corpus, **{"train.max_steps": 4, "checkpoint.interval": 2})
    threads = torch.get_num_threads()
    cfg = load_config(overrides=over)
    try:
        torch.set_num_threads(1)
        stop = lambda t: setattr(t, "stop_signal", "test") if t.step == 2 else None  # noqa: E731
        run_training(cfg, callbacks=[stop])
        torch.set_num_threads(2)
        capsys.readouterr()
        run_training(cfg)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "intra_op_threads 1 -> 2" in text and "not bit-identical" in text, text
    recs = [json.loads(x) for x in (tmp_path / "r" / "starts.jsonl").read_text().splitlines()]
    assert [r["exactness"]["intra_op_threads"] for r in recs] == [1, 2]


@pytest.mark.slow
def test_gpt_oss_resumes_bitwise_with_deterministic_kernels(tmp_path, corpus, capsys):
    """gpt_oss's expert loop adds in an order that varies between calls on CPU (an ulp in the
    experts' bias gradients); with train.deterministic its stop and kill resumes are exact."""
    model = tmp_path / "gpt_oss.json"
    model.write_text(
        json.dumps(
            {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
             "num_experts_per_tok": 2, "max_position_embeddings": 512, "sliding_window": 32,
             "layer_types": ["sliding_attention", "full_attention"]}  # fmt: skip
        )
    )
    over = tiny_overrides(tmp_path / "unused", corpus, **{"model.name": str(model), "train.deterministic": True})
    over.pop("model.overrides")
    cfg = write_config(tmp_path / "run.toml", over)
    try:
        assert main(["check", "--config", str(cfg), "--steps", "10", "--stop-at", "7"]) == 0
    finally:
        torch.use_deterministic_algorithms(False)  # the check set it in this process
    assert "verdict: bitwise identical" in capsys.readouterr().out
