"""What the flight recorder costs per training step.

Trains the same small model with logging every step, every 10 (the default), every 100, with the
console off, with TensorBoard on, and with no logging at all (only the final step), side by side
in one process: repeats are interleaved (variant order rotated every repeat) and the table shows
the median over repeats of the mean step time over the measured steps, which include the
logging steps. Console lines go to /dev/null, so terminal speed is not measured.

On a shared machine wall-clock step times drift by more than logging costs, so the table also
shows the CPU time of this process per step (with one torch thread, what the step costs, little
disturbed by other processes) and the time spent inside the logging code itself (Trainer._log:
the all-reduce and scalar reads, the record, metrics.jsonl, console, sinks), measured directly.

    .venv/bin/python bench/logging_overhead.py [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

VARIANTS = [
    # name, log.interval, log.console, log.tensorboard
    ("no logging (final step only)", 10**9, "off", False),
    ("every step, plain console", 1, "plain", False),
    ("every 10 steps (default), plain console", 10, "plain", False),
    ("every 100 steps, plain console", 100, "plain", False),
    ("every 10 steps, console off", 10, "off", False),
    ("every 10 steps, plain console + TensorBoard", 10, "plain", True),
]


def _corpus(root: Path, files: int) -> Path:
    """A few hundred KB of the standard library's own source: text that needs no download."""
    src = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:files]
    out = root / "corpus"
    out.mkdir()
    for p in src:
        (out / (p.name + ".txt")).write_text(p.read_text(encoding="utf-8", errors="replace"))
    return out


def _one_run(
    root: Path, corpus: Path, interval: int, console: str, tb: bool, args, rep: int
) -> tuple[float, float, float]:
    """(wall time, CPU time, time inside Trainer._log), each per step, over the measured steps."""
    from flame.config import load_config
    from flame.trainer import Trainer, run_training

    stamps: dict[int, tuple[float, float]] = {}
    in_log: dict[int, float] = {}
    real_log = Trainer._log

    def timed_log(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return real_log(self, *a, **kw)
        finally:
            in_log[self.step] = time.perf_counter() - t0

    def clock(trainer) -> None:
        stamps[trainer.step] = (time.perf_counter(), time.process_time())

    over = {
        "model.overrides": {
            "hidden_size": args.hidden,
            "intermediate_size": 4 * args.hidden,
            "num_hidden_layers": args.layers,
            "num_attention_heads": max(1, args.hidden // 32),
            "num_key_value_heads": max(1, args.hidden // 32),
        },
        "data.inputs": [str(corpus)],
        "data.cache_dir": str(root / "cache"),
        "data.context_len": args.context,
        "data.batch_size": args.batch,
        "train.run_dir": str(root / f"run-{rep}-{interval}-{console}-{tb}"),
        "train.max_steps": args.steps,
        "train.sample_tokens": 0,
        "log.interval": interval,
        "log.console": console,
        "log.tensorboard": tb,
        "checkpoint.interval": 0,
    }
    Trainer._log = timed_log
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            run_training(load_config(overrides=over), callbacks=[clock])
    finally:
        Trainer._log = real_log
    first, last = args.warmup, args.steps - 1  # the last step also saves: left out
    n = last - first
    logged = sum(v for s, v in in_log.items() if first < s <= last)
    (w0, c0), (w1, c1) = stamps[first], stamps[last]
    return (w1 - w0) / n, (c1 - c0) / n, logged / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10, help="steps left out at the start")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64, help="model width (a llama; heads of 32)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    if args.steps - 1 - args.warmup < 100:
        sys.exit(
            "--steps must exceed --warmup by more than 100, so that every variant logs inside the window"
        )

    import torch

    torch.set_num_threads(args.threads)
    wall: dict[str, list[float]] = {v[0]: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v[0]: [] for v in VARIANTS}
    logging: dict[str, list[float]] = {v[0]: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = _corpus(root, 40)
        for rep in range(args.repeats):
            k = rep % len(VARIANTS)
            for name, interval, console, tb in VARIANTS[k:] + VARIANTS[:k]:
                dt, ct, lg = _one_run(root, corpus, interval, console, tb, args, rep)
                wall[name].append(dt)
                cpu[name].append(ct)
                logging[name].append(lg)
                print(
                    f"  repeat {rep + 1}: {name}: {dt * 1e3:.2f} ms/step wall, {ct * 1e3:.2f} CPU, "
                    f"{lg * 1e3:.4f} in logging",
                    file=sys.stderr,
                    flush=True,
                )

    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    base, cbase = med[VARIANTS[0][0]], cmed[VARIANTS[0][0]]
    print(
        f"\nflame logging overhead: llama {args.layers} x {args.hidden}, context {args.context}, "
        f"batch {args.batch}, {args.steps} steps ({args.steps - 1 - args.warmup} measured), "
        f"{args.repeats} interleaved repeats, {args.threads} CPU thread(s), torch {torch.__version__}\n"
    )
    print(
        "| logging | wall ms/step (median; min - max) | vs no logging | CPU ms/step (median) "
        "| vs no logging | in logging code (ms/step) | share of the step |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, *_ in VARIANTS:
        xs, lg = wall[name], statistics.median(logging[name])
        first = name == VARIANTS[0][0]
        over = "-" if first else f"{(med[name] / base - 1) * 100:+.1f}%"
        cover = "-" if first else f"{(cmed[name] / cbase - 1) * 100:+.1f}%"
        print(
            f"| {name} | {med[name] * 1e3:.2f} ({min(xs) * 1e3:.2f} - {max(xs) * 1e3:.2f}) | {over} "
            f"| {cmed[name] * 1e3:.2f} | {cover} | {lg * 1e3:.4f} | {lg / cmed[name] * 100:.2f}% |"
        )


if __name__ == "__main__":
    main()
