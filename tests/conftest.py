import atexit
import os
import shutil
import sys
import tempfile
import warnings

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

# A model small enough that a test trains it for a few steps in about a second.
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}

LOREM = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
    "of foolishness, it was the epoch of belief, it was the epoch of incredulity. "
)


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written (pytest swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR = _CurrentStderr()


def _repoint_log_handlers() -> None:
    """A library logger (transformers, ...) configured during one test keeps the stream pytest
    captured then; once that stream is closed, its next warning prints a "Logging error"
    traceback into a later test's output. Such handlers write to the current stderr instead."""
    import logging

    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for h in lg.handlers:
            stream = getattr(h, "stream", None)
            if type(h) is logging.StreamHandler and stream is not _STDERR and stream is not sys.__stderr__:
                if getattr(stream, "closed", False) or type(stream).__module__.startswith("_pytest"):
                    h.stream = _STDERR  # setStream would flush the old one first


_CACHE = tempfile.mkdtemp(prefix="flame-test-cache-")
atexit.register(shutil.rmtree, _CACHE, True)
os.environ["FLAME_CACHE"] = _CACHE  # module fixtures too: tests never write the user's ~/.cache/flame


@pytest.fixture(autouse=True)
def _own_flame_cache(tmp_path_factory, monkeypatch):
    """Each test its own cache of stores prepared from raw inputs (the same text in two tests would
    otherwise be prepared once, by whichever ran first)."""
    monkeypatch.setenv("FLAME_CACHE", str(tmp_path_factory.mktemp("flame-cache")))


@pytest.fixture(autouse=True)
def _log_handlers_on_live_streams():
    _repoint_log_handlers()
    yield
    _repoint_log_handlers()


def _write_corpus(d):
    for i in range(6):
        (d / f"doc{i}.txt").write_text(f"Document {i}. " + LOREM * (3 + i))
    return d


@pytest.fixture
def corpus(tmp_path):
    """A few small text files with distinct documents."""
    d = tmp_path / "corpus"
    d.mkdir()
    return _write_corpus(d)


@pytest.fixture(scope="module")
def corpus_m(tmp_path_factory):
    """The same corpus, shared by a module's runs (the multi-process tests)."""
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_overrides(run_dir, inputs, **extra):
    """Config overrides (TOML-style dict) for a fast CPU test run."""
    base = {
        "model.overrides": dict(TINY),
        "data.inputs": [str(inputs)],
        "data.context_len": 64,
        "data.batch_size": 4,
        "train.run_dir": str(run_dir),
        "train.max_steps": 8,
        "train.sample_tokens": 0,
        "optim.warmup_steps": 2,
        "log.interval": 1,
        "log.console": "off",
        "checkpoint.interval": 0,
    }
    base.update(extra)
    return base


def write_config(path, overrides):
    """Write a TOML config file from a {section.key: value} dict."""
    from flame.config import to_toml

    nested = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    path.write_text(to_toml(nested))
    return path


def read_jsonl(path):
    """Every record of a JSONL file (metrics, batch logs, starts), in order."""
    import json
    from pathlib import Path

    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def metrics(run_dir, kind=None):
    """A run's metrics.jsonl records, only those of `kind` ('train', 'eval', ...) when given."""
    from pathlib import Path

    recs = read_jsonl(Path(run_dir) / "metrics.jsonl")
    return [r for r in recs if kind is None or r.get("kind") == kind]


def subprocess_env(**extra):
    """The environment for a `python -m flame ...` child: one thread, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def run_torchrun(nproc, args, timeout=300, nnodes=1, extra=()):
    """`torchrun --standalone --nproc_per_node=N -m flame ARGS` on CPU (gloo); returns the CompletedProcess."""
    import subprocess
    import sys

    env = subprocess_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra,
        "-m",
        "flame",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def final_weights(run_dir):
    """The model tensors of a run's latest checkpoint, as a plain dict."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from flame.checkpoint import list_checkpoints

    path = list_checkpoints(run_dir / "checkpoints")[-1]
    out = run_dir.parent / f"{run_dir.name}-final.pt"
    dcp_to_torch_save(str(path / "state"), str(out))
    return torch.load(out, weights_only=False)["model"]


def _distributed_entry(rank, nprocs, port, fn, args):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    import gc

    import torch.distributed as dist

    try:
        fn(rank, *args)
    finally:
        gc.collect()  # the trainer's DDP/FSDP objects and their gloo work, before the group goes
        if dist.is_initialized():
            dist.destroy_process_group()
    # done and cleaned up: leave without interpreter finalization, where gloo's worker threads can
    # still abort a process whose work is finished (SIGABRT, "terminate called without an active
    # exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, nprocs, *args, timeout=300):
    """Run fn(rank, *args) in `nprocs` fresh processes joined by a gloo process group (flame's
    init_world picks it up from the environment, as under torchrun). fn must be importable."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(
        _distributed_entry, args=(nprocs, port, fn, args), nprocs=nprocs, join=False, start_method="spawn"
    )
    import time

    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"run_distributed: {fn.__name__} did not finish in {timeout}s")


def make_token_store(path, n_docs, seed):
    """A byte-tokenized store of `n_docs` short documents of seeded random words, at `path`."""
    import json

    import numpy as np

    from flame.data.prepare import prepare
    from flame.data.store import TokenStore

    rng = np.random.default_rng(seed)
    src = path.parent / f"{path.name}.jsonl"
    with open(src, "w") as f:
        for i in range(n_docs):
            words = " ".join(f"w{seed}x{int(x)}" for x in rng.integers(0, 1000, rng.integers(1, 12)))
            f.write(json.dumps({"text": f"[{i}] {words}"}) + "\n")
    prepare([str(src)], "byte", str(path), workers=1, progress=False)
    return TokenStore(path)
