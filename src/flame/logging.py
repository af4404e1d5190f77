"""The flight recorder: rank-0 console progress, metrics.jsonl, optional TensorBoard / W&B sinks.

metrics.jsonl holds one JSON object per logged step (kind "train") or evaluation (kind "eval").
On resume from step S, lines past S (logged after that checkpoint, about to be redone) are cut,
so the file keeps exactly one line per step, and tokens / elapsed continue from the checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from flame.config import LogConfig

# Dense bf16 peak FLOP/s of one device, by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def device_peak_flops(device: torch.device, configured: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the configured figure, a known GPU's, or None (unknown, e.g. CPU)."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def fmt_duration(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records past `last_step` (and any torn last line) so a resumed run continues cleanly."""
    if not path.is_file():
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if rec.get("step", 0) <= last_step:
                keep.append(json.dumps(rec) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class Console:
    """Plain lines, or a rich progress bar when attached to a terminal."""

    def __init__(self, mode: str, total: int):
        self.mode = mode
        if mode == "auto":
            self.mode = "rich" if sys.stderr.isatty() else "plain"
        self.total = total
        self._progress = None
        if self.mode == "rich":
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total, info="")
            self._progress.start()

    def print(self, msg: str) -> None:
        if self.mode == "off":
            return
        if self._progress is not None:
            self._progress.console.print(msg, highlight=False, markup=False)
        else:
            print(msg, flush=True)

    def step(self, rec: dict) -> None:
        line = (
            f"step {rec['step']}/{rec['total_steps']} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s"
            + (f" | mfu {rec['mfu'] * 100:.1f}%" if rec.get("mfu") is not None else "")
            + f" | {fmt_duration(rec['elapsed_s'])} elapsed | eta {fmt_duration(rec['eta_s'])}"
        )
        if self._progress is not None:
            info = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:,.0f} tok/s"
            self._progress.update(self._task, completed=rec["step"], info=info)
        elif self.mode != "off":
            print(line, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


class MetricsLogger:
    """Rank 0 writes; other ranks' calls are no-ops."""

    def __init__(
        self, cfg: LogConfig, run_dir: Path, is_main: bool, total_steps: int, resume_step: int, config: dict
    ):
        self.cfg = cfg
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.console = Console(cfg.console if is_main else "off", total_steps)
        self._file = None
        self._sinks: list = []
        if not is_main:
            return
        truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a")
        if cfg.tensorboard:
            self._sinks.append(_TensorBoard(run_dir / "tb", resume_step))
        if cfg.wandb != "off":
            self._sinks.append(_WandB(cfg, run_dir, config, resume_step))

    def info(self, msg: str) -> None:
        if self.is_main:
            self.console.print(msg)

    def log(self, rec: dict) -> None:
        if not self.is_main:
            return
        rec = {**rec, "time": time.time()}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if rec.get("kind") == "train":
            self.console.step(rec)
        else:
            self.console.print(
                f"eval @ step {rec['step']} | loss {rec['loss']:.4f} | ppl {rec['perplexity']:.2f}"
            )
        for s in self._sinks:
            s.log(rec)

    def close(self) -> None:
        self.console.close()
        if self._file:
            self._file.close()
            self._file = None
        for s in self._sinks:
            s.close()


def batch_digest(input_ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(input_ids.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class BatchLog:
    """Per rank: which global samples each micro-batch held, and a hash of its tokens."""

    def __init__(self, run_dir: Path, rank: int, resume_step: int):
        d = run_dir / "batches"
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"rank-{rank}.jsonl"
        truncate_jsonl(self.path, resume_step)
        self._f = open(self.path, "a")

    def write(self, step: int, micro: int, batch: dict) -> None:
        rec = {"step": step, "micro": micro, "sha": batch_digest(batch["input_ids"])}
        if "samples" in batch:
            rec["samples"] = [int(x) for x in batch["samples"]]
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


_SINK_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "perplexity", "data_wait", "memory_gib")


class _TensorBoard:
    def __init__(self, path: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past the checkpoint, so a resumed curve never doubles back
        self.w = SummaryWriter(str(path), purge_step=resume_step + 1 if resume_step else None)

    def log(self, rec: dict) -> None:
        kind = rec.get("kind", "train")
        for k in _SINK_KEYS:
            v = rec.get(k)
            if isinstance(v, (int, float)):
                self.w.add_scalar(f"{kind}/{k}", v, rec["step"])
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class _WandB:
    def __init__(self, cfg: LogConfig, run_dir: Path, config: dict, resume_step: int):
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.resume_step = resume_step
        self.run = wandb.init(
            project=cfg.wandb_project,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=cfg.wandb,
            config=config,
        )

    def log(self, rec: dict) -> None:
        kind = rec.get("kind", "train")
        data = {f"{kind}/{k}": rec[k] for k in _SINK_KEYS if isinstance(rec.get(k), (int, float))}
        # W&B refuses steps that do not increase; re-logged steps after a resume are dropped here
        if rec["step"] > self.resume_step or kind != "train":
            self.run.log(data, step=rec["step"])

    def close(self) -> None:
        self.run.finish()
