"""Scaling out: FSDP2 / DDP equal one process, checkpoints reshard across world sizes and strategies,
two torchrun agents train together, and export to Hugging Face format round-trips.

Tolerance. Every run here is fp32 on CPU with the same initial weights (FSDP's rank 0 builds the
model and broadcasts it) and the same global batch of 8 samples per step, so the losses agree up
to floating-point summation order. Against the reference (one process, micro-batches of 4 with 2
accumulation steps) they come out bitwise equal: each rank computes the same micro-batch of 4, and
with two ranks the all-reduce is a single commutative addition and the halving is exact. Against
one process with one micro-batch of 8 they are not: the loss and gradient sums over 8 samples run
inside one kernel in another order than two sums of 4 added afterwards; the difference (~1e-7
relative) is carried on by Adam, ~1e-6 after 6 steps. More ranks or other kernels change the order
again, so every comparison allows TOL = 1e-4 on losses of ~5.5 (two orders above what we observe).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import metrics, run_torchrun, tiny_overrides, write_config

from flame.config import load_config
from flame.errors import CheckpointError, ConfigError
from flame.trainer import run_training

TOL = 1e-4
STEPS = 6  # optimizer steps of every run; checkpoints at 3 and 6


def _overrides(run: Path, corpus: Path, **extra) -> dict:
    base = {
        "train.max_steps": STEPS,
        "checkpoint.interval": 3,
        "checkpoint.keep": 5,
        "log.batches": True,
        "data.batch_size": 4,
    }
    base.update(extra)
    return tiny_overrides(run, corpus, **base)


def _torchrun(nproc: int, tmp: Path, run: Path, corpus: Path, **extra) -> subprocess.CompletedProcess:
    cfg = write_config(tmp / f"{run.name}.toml", _overrides(run, corpus, **extra))
    r = run_torchrun(nproc, ["train", "--config", str(cfg)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _losses(run: Path) -> dict[int, float]:
    recs = metrics(run)
    out = {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}
    assert list(out) == list(range(1, len(out) + 1))  # one line per step, no gap, no duplicate
    return out


def _samples(run: Path) -> dict[int, list[int]]:
    """The global sample ids each step consumed: the union over ranks and micro-batches."""
    steps: dict[int, list[int]] = {}
    for f in sorted((run / "batches").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"], []).extend(rec["samples"])
    return {s: sorted(v) for s, v in steps.items()}


def _close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= TOL, f"step {s}: {a[s]} vs {b[s]}"


def _resume_copy(src: Path, dst: Path) -> Path:
    """A copy of a finished run stopped at step 3: later checkpoints and the batch records removed."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(dst / "batches")
    return dst


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_m):
    """One process, micro-batch 4 x 2 accumulation steps: the global batch of 8 of every run here."""
    run = tmp_path_factory.mktemp("ref") / "run"
    run_training(load_config(overrides=_overrides(run, corpus_m, **{"train.grad_accum": 2})))
    return run


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus_m):
    """Two processes, strategy auto (= FSDP2), activation checkpointing on, a sample at the end."""
    tmp = tmp_path_factory.mktemp("fsdp")
    run = tmp / "run"
    extra = {"train.activation_checkpointing": True, "train.sample_tokens": 16}
    r = _torchrun(2, tmp, run, corpus_m, **extra)
    assert "strategy fsdp, 2 process(es)" in r.stdout
    assert r.stdout.count("sample:\n") == 1  # rank 0 samples from the gathered weights, no hang
    return run


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(tmp_path, reference, fsdp_run, corpus_m):
    a, b = _losses(reference), _losses(fsdp_run)
    _close(a, b, range(1, STEPS + 1))
    assert _samples(reference) == _samples(fsdp_run)
    assert len(_samples(fsdp_run)[1]) == 8
    # one process, one micro-batch of 8: the same samples, summed in another order
    one = tmp_path / "one"
    run_training(load_config(overrides=_overrides(one, corpus_m, **{"data.batch_size": 8})))
    _close(_losses(one), b, range(1, STEPS + 1))
    assert _samples(one) == _samples(fsdp_run)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_process(tmp_path, reference, fsdp_run, capsys):
    run = _resume_copy(fsdp_run, tmp_path / "run")
    corpus = Path(load_config(toml_path=str(fsdp_run / "config.toml")).data.inputs[0])
    # the same command as the two-process run (grad_accum 1): the trainer keeps the global batch
    r = run_training(load_config(overrides=_overrides(run, corpus)))
    out = capsys.readouterr().out
    assert r["stopped"] == "done" and r["step"] == STEPS
    assert "resuming on 1 process(es) instead of 2: train.grad_accum 1 -> 2" in out
    assert "resumed from" in out and "step-00000003" in out
    a, b = _losses(reference), _losses(run)
    _close(a, b, range(1, STEPS + 1))
    ref_samples, got = _samples(reference), _samples(run)
    assert sorted(got) == [4, 5, 6]
    for s in (4, 5, 6):
        assert got[s] == ref_samples[s], s


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_with_fsdp(tmp_path, reference, corpus_m):
    run = _resume_copy(reference, tmp_path / "run")
    r = _torchrun(2, tmp_path, run, corpus_m, **{"parallel.strategy": "fsdp"})  # grad_accum 1 given
    assert "strategy fsdp, 2 process(es)" in r.stdout
    assert "at step 3" in r.stdout
    _close(_losses(reference), _losses(run), range(1, STEPS + 1))
    ref_samples, got = _samples(reference), _samples(run)
    assert sorted(got) == [4, 5, 6] and all(got[s] == ref_samples[s] for s in got)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_with_ddp(tmp_path, reference, fsdp_run, corpus_m):
    run = _resume_copy(fsdp_run, tmp_path / "run")
    r = _torchrun(2, tmp_path, run, corpus_m, **{"parallel.strategy": "ddp"})
    assert "strategy ddp, 2 process(es)" in r.stdout and "at step 3" in r.stdout
    _close(_losses(reference), _losses(run), range(1, STEPS + 1))
    assert _samples(run) == {s: v for s, v in _samples(reference).items() if s > 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes_ddp(tmp_path_factory, corpus_m):
    """Two torchrun agents ("nodes", one process each) meeting at a c10d rendezvous, training DDP."""
    tmp = tmp_path_factory.mktemp("nodes")
    run = tmp / "run"
    cfg = write_config(tmp / "c.toml", _overrides(run, corpus_m, **{"parallel.strategy": "ddp"}))
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for node in range(2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=flame-test",
            "-m",
            "flame",
            "train",
            "--config",
            str(cfg),
        ]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, so[-2000:] + se[-4000:]
    assert sum("strategy ddp, 2 process(es)" in so for so, _ in outs) == 1  # rank 0 prints, on one node
    return run


@pytest.mark.slow
def test_two_nodes_train_together_and_match_one_process(reference, two_nodes_ddp):
    _close(_losses(reference), _losses(two_nodes_ddp), range(1, STEPS + 1))
    assert _samples(reference) == _samples(two_nodes_ddp)
    assert sorted(p.name for p in (two_nodes_ddp / "batches").glob("rank-*.jsonl")) == [
        "rank-0.jsonl",
        "rank-1.jsonl",
    ]


@pytest.mark.slow
def test_ddp_checkpoint_resumes_with_fsdp(tmp_path, reference, two_nodes_ddp, corpus_m):
    run = _resume_copy(two_nodes_ddp, tmp_path / "run")
    r = _torchrun(2, tmp_path, run, corpus_m)  # strategy auto: fsdp
    assert "strategy fsdp, 2 process(es)" in r.stdout and "at step 3" in r.stdout
    _close(_losses(reference), _losses(run), range(1, STEPS + 1))
    assert _samples(run) == {s: v for s, v in _samples(reference).items() if s > 3}


@pytest.mark.slow
def test_resume_on_a_world_size_that_cannot_keep_the_global_batch(tmp_path, fsdp_run, corpus_m):
    run = _resume_copy(fsdp_run, tmp_path / "run")  # global batch 8, taken on 2 processes
    with pytest.raises(ConfigError) as e:
        run_training(load_config(overrides=_overrides(run, corpus_m, **{"data.batch_size": 3})))
    msg = str(e.value)
    assert "global batch of 8 samples" in msg and "--data.batch_size 2" in msg


@pytest.mark.slow
def test_meta_init_trains(tmp_path, corpus_m):
    """parallel.init = meta: every rank builds on the meta device and initializes its own shards."""
    run = tmp_path / "run"
    script = tmp_path / "meta.py"
    overrides = _overrides(
        run, corpus_m, **{"parallel.strategy": "fsdp", "train.max_steps": 4, "checkpoint.interval": 0}
    )
    script.write_text(
        "import json, sys\n"
        "from flame.config import load_config\n"
        "from flame.trainer import run_training\n"
        f"cfg = load_config(overrides=json.loads({json.dumps(json.dumps(overrides))}))\n"
        "cfg.parallel.init = 'meta'\n"
        "run_training(cfg)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    losses = _losses(run)
    assert abs(losses[1] - torch.log(torch.tensor(257.0)).item()) < 0.1  # a small-std init: ~uniform
    assert losses[4] < losses[1]
    from conftest import final_weights

    w = final_weights(run)
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert 0.01 < q.std().item() < 0.05  # the model's own init (std 0.02), moved by 4 small steps
    assert not torch.equal(q[: q.shape[0] // 2], q[q.shape[0] // 2 :])  # the two ranks' shards differ


# ---- export ---------------------------------------------------------------------------------


def _flame_model(run: Path, step: int):
    """The model of a checkpoint as the trainer builds it, weights read with torch's DCP converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from flame.model import build_model

    cfg = load_config(toml_path=str(run / "config.toml"))
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    out = run.parent / f"full-{step}.pt"
    dcp_to_torch_save(str(ckpt / "state"), str(out))
    model = build_model(cfg.model, 257, cfg.data.context_len)
    model.load_state_dict(torch.load(out, weights_only=False)["model"])
    return model.eval()


def test_export_round_trip(tmp_path, fsdp_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flame.cli import main
    from flame.data.tokenizer import ByteTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(fsdp_run), "--step", "3", "--out", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "It was the age of wisdom <|endoftext|> é"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == ByteTokenizer().encode_batch([text])[0].tolist()
    ref = _flame_model(fsdp_run, 3)
    with torch.no_grad():
        diff = (hf(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert hf.config.eos_token_id == 256 and hf.generation_config.eos_token_id == 256

    bf = tmp_path / "hf-bf16"
    assert main(["export", str(fsdp_run), "--out", str(bf), "--dtype", "bf16"]) == 0
    hb = AutoModelForCausalLM.from_pretrained(bf, local_files_only=True)
    assert next(hb.parameters()).dtype == torch.bfloat16
    assert main(["export", str(fsdp_run), "--out", str(bf)]) == 1  # exists: refuses without --force


@pytest.mark.slow
def test_init_from_export_reproduces_the_loss(tmp_path, reference, corpus_m):
    from transformers import AutoModelForCausalLM

    from flame.data.build import build_loader, resolve_tokenizer
    from flame.export import export
    from flame.parallel import World

    hf_dir = export(reference, tmp_path / "hf")
    run = tmp_path / "cont"
    cfg = load_config(
        overrides=tiny_overrides(
            run, corpus_m, **{"model.init_from": str(hf_dir), "train.max_steps": 1, "data.batch_size": 8}
        )
    )
    run_training(cfg)
    got = _losses(run)[1]
    # the first batch of that run, through the exported model as transformers loads it
    world = World(0, 1, 0, torch.device("cpu"))
    batch = next(iter(build_loader(cfg, world, run, resolve_tokenizer(cfg), log=lambda m: None)))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.item()
    assert abs(got - want) <= 1e-5, (got, want)
    # and the continued run starts from the exported weights, not a fresh init (~5.55)
    assert got < _losses(reference)[1] - 0.2


def test_export_errors(tmp_path, corpus_m, capsys):
    from flame.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "has no complete checkpoint" in err and "Traceback" not in err
    (tmp_path / "a-file").write_text("")
    assert main(["export", str(empty), "--out", str(tmp_path / "a-file")]) == 1
    assert "is a file, not a directory" in capsys.readouterr().err

    # a custom (non-transformers) model: the weights as safetensors, and a clear error
    run = tmp_path / "custom"
    overrides = {"model.name": "models_for_tests:bigram", "model.overrides": {}, "train.max_steps": 2}
    run_training(load_config(overrides=tiny_overrides(run, corpus_m, **overrides)))
    out = tmp_path / "custom-hf"
    assert main(["export", str(run), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "custom model" in err and "no config.json" in err
    from safetensors.torch import load_file

    w = load_file(out / "model.safetensors")
    assert set(w) == {"emb.weight", "out.weight", "out.bias", "calls"}  # calls: a checkpointed buffer
    assert not (out / "config.json").exists()
    assert main(["export", str(run), "--step", "7", "--out", str(tmp_path / "y")]) == 1
    assert "no complete checkpoint of step 7 (it has steps 2)" in capsys.readouterr().err


# ---- background (async) checkpoints ---------------------------------------------------------


def _weights(ckpt: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent.parent / f"{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt / "state"), str(out))
    return torch.load(out, weights_only=False)["model"]


@pytest.mark.slow
def test_async_save_writes_the_same_checkpoints(tmp_path, corpus_m, capsys):
    from flame.checkpoint import list_checkpoints

    found = {}
    for mode in (True, False):
        run = tmp_path / f"async-{mode}"
        cfg = load_config(
            overrides=_overrides(run, corpus_m, **{"checkpoint.interval": 2, "log.batches": False})
        )
        cfg.checkpoint.async_save = mode  # checkpoint.async_save
        run_training(cfg)
        out = capsys.readouterr().out
        assert out.count("(written in the background)") == (2 if mode else 0)
        found[mode] = list_checkpoints(run / "checkpoints")
        assert not list((run / "checkpoints").glob("*.tmp*"))
    assert [p.name for p in found[True]] == ["step-00000002", "step-00000004", "step-00000006"]
    assert [p.name for p in found[True]] == [p.name for p in found[False]]
    # steps 2 and 4 were written in the background while training went on
    for bg, fg in zip(found[True], found[False]):
        a, b = _weights(bg), _weights(fg)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), bg.name


def test_async_save_is_sealed_only_after_the_write_finished(tmp_path, monkeypatch):
    """The COMPLETE marker (and the rename into place) waits for the background write."""
    from concurrent.futures import Future

    import torch.distributed.checkpoint as dcp

    from flame.checkpoint import Checkpointer, list_checkpoints, verify

    writes = []

    def slow_async_save(state, checkpoint_id, process_group=None):
        fut = Future()
        writes.append((state, checkpoint_id, fut))
        return fut  # not written yet

    monkeypatch.setattr(dcp, "async_save", slow_async_save)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    ck = Checkpointer(tmp_path, keep=2, async_save=True, log=lambda m: None)
    final = ck.save(5, model, opt, {"step": 5}, background=True)
    assert not final.exists() and list_checkpoints(ck.root) == []
    assert ck.poll() is None  # still writing: nothing sealed
    assert list_checkpoints(ck.root) == [] and not list(ck.root.glob("*/COMPLETE"))
    state, cid, fut = writes[0]
    dcp.save(state, checkpoint_id=cid)  # the "background thread" finishes its write
    fut.set_result(None)
    assert ck.poll() == final
    assert list_checkpoints(ck.root) == [final] and verify(final) is None

    # a failed background write never becomes a checkpoint, and says so
    ck.save(6, model, opt, {"step": 6}, background=True)
    writes[-1][2].set_exception(OSError("disk full"))
    with pytest.raises(CheckpointError, match="step 6 failed: disk full"):
        ck.poll()
    assert list_checkpoints(ck.root) == [final] and not list(ck.root.glob("*.tmp*"))
