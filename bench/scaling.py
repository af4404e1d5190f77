"""Data-parallel scaling: tokens/s and peak memory of none / DDP / FSDP2 at 1 and 2 processes.

    .venv/bin/python bench/scaling.py [--steps 8] [--hidden 512] [--layers 8] [--nprocs 1,2]

Every configuration trains the same llama (byte vocabulary, fp32 on CPU; bf16 autocast on CUDA)
with `flame train` under torchrun, with the same micro-batch per process (so 2 processes train
twice the tokens per step). tokens/s is the median of the per-step rates after the first two
steps (compile-free warm-up). Peak memory per rank: CPU — the process's ru_maxrss (this includes
~0.4 GiB of Python, torch and transformers themselves, the same for every row, and with FSDP on
rank 0 the whole model it builds on the CPU before sharding it); CUDA —
torch.cuda.max_memory_allocated. "params + Adam state" counts the bytes of parameters and
optimizer moments this rank holds (its shards under FSDP) after a step. On a GPU machine the same script reports GPU figures (rows
with more processes than GPUs are skipped). Each process gets --threads CPU threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, md_table  # noqa: E402


def _local_bytes(tensors) -> int:
    """Bytes this rank holds of some tensors (a DTensor's local shard only)."""
    total = 0
    for t in tensors:
        local = getattr(t, "_local_tensor", t)
        total += local.numel() * local.element_size()
    return total


def _worker(stats_dir: str, flame_args: list[str]) -> int:
    """Run under torchrun: train, then record this rank's peak memory and training-state size."""
    import torch

    from flame.config import load_config
    from flame.trainer import run_training

    state = {"bytes": 0}

    def measure(trainer) -> None:  # after a step: parameters + the optimizer's moments on this rank
        opt = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        state["bytes"] = max(state["bytes"], _local_bytes(trainer.model.parameters()) + _local_bytes(opt))
        state["params"] = trainer.n_params

    result = run_training(load_config(flame_args[1:]), callbacks=[measure])
    rc = 0 if result["stopped"] == "done" else 1
    rank = int(os.environ.get("RANK", "0"))
    rec = {
        "rank": rank,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "state_bytes": state["bytes"],
        "params": state["params"],
    }
    if torch.cuda.is_available():
        rec["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    Path(stats_dir, f"rank-{rank}.json").write_text(json.dumps(rec))
    return rc


def _run(strategy: str, nproc: int, args, corpus: Path, work: Path) -> dict:
    run = work / f"{strategy}-{nproc}"
    stats = work / f"stats-{strategy}-{nproc}"
    stats.mkdir(parents=True)
    model = {
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 // 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 64),
        "num_key_value_heads": max(1, args.hidden // 64),
    }
    flame_args = [
        "train",
        f"--model.overrides={json.dumps(model)}",
        f"--data.inputs={corpus}",
        f"--data.context_len={args.context}",
        f"--data.batch_size={args.batch}",
        f"--train.run_dir={run}",
        f"--train.max_steps={args.steps}",
        "--train.sample_tokens=0",
        "--checkpoint.interval=0",
        "--log.interval=1",
        "--log.console=off",
        f"--parallel.strategy={strategy}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        "--worker",
        str(stats),
        "--",
        *flame_args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{strategy} x {nproc} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x.get("kind") == "train"]
    rates = sorted(x["tokens_per_s"] for x in train[2:]) or [train[-1]["tokens_per_s"]]
    ranks = [json.loads(p.read_text()) for p in sorted(stats.glob("rank-*.json"))]
    cuda = "cuda_max_allocated" in ranks[0]
    mem = [x["cuda_max_allocated"] if cuda else x["maxrss_kib"] * 1024 for x in ranks]
    state = [x["state_bytes"] for x in ranks]
    return {
        "strategy": strategy,
        "nproc": nproc,
        "tokens_per_s": rates[len(rates) // 2],
        "loss": train[-1]["loss"],
        "mem": mem,
        "state": state,
        "params": ranks[0]["params"],
        "cuda": cuda,
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        rest = sys.argv[3:]
        sys.exit(_worker(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="sequences per micro-batch per process")
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--strategies", default="none,ddp,fsdp")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    args = p.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    work = Path(tempfile.mkdtemp(prefix="flame-scaling-"))
    corpus = work / "corpus"
    corpus.mkdir()
    from common import documents

    for i, doc in enumerate(documents(2 << 20, doc_bytes=8192)):
        (corpus / f"{i:05d}.txt").write_text(doc)
    rows = []
    params = 0
    base = None
    for nproc in [int(x) for x in args.nprocs.split(",")]:
        if gpus and nproc > gpus:
            print(f"skipping {nproc} processes: {gpus} GPU(s)", flush=True)
            continue
        for strategy in args.strategies.split(","):
            if strategy == "none" and nproc > 1:
                continue
            r = _run(strategy, nproc, args, corpus, work)
            params = r["params"]
            if strategy == "none":
                base = r["tokens_per_s"]
            mem = r["mem"]
            rows.append(
                [
                    {"none": "none", "ddp": "DDP", "fsdp": "FSDP2"}[strategy],
                    nproc,
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['tokens_per_s'] / base:.2f}x" if base else "-",
                    " / ".join(f"{m / 2**20:,.0f}" for m in mem),
                    " / ".join(f"{m / 2**20:,.0f}" for m in r["state"]),
                    f"{r['loss']:.4f}",
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    n = args.hidden
    kind = "CUDA max_memory_allocated" if gpus else "ru_maxrss"
    head = (
        f"# Data-parallel scaling\n\n{machine()}; {f'{gpus} GPU(s)' if gpus else 'CPU, gloo'}, "
        f"{args.threads} thread(s) per process\n\nllama {args.layers} x {n} (~{params / 1e6:.1f}M parameters), "
        f"context {args.context}, micro-batch {args.batch} per process, {args.steps} steps; "
        f"tokens/s = median per-step rate after step 2, all processes together\n\n"
    )
    table = md_table(
        [
            "strategy",
            "processes",
            "tokens/s",
            "vs none",
            f"peak memory per rank, MiB ({kind})",
            "params + Adam state per rank, MiB",
            "loss at end",
        ],
        rows,
    )
    emit("scaling", head + table)


if __name__ == "__main__":
    main()
