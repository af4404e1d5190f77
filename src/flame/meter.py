"""The arithmetic of a "train" record of metrics.jsonl: what each field means and how it is computed.

`MetricsLogger` (logging.py) writes records; this module makes them. A record covers the *log
window*, the steps since the previous train record:

- loss: the token-mean loss of the window over every rank (`LogWindow`, kept on the device between
  log steps: no host sync per step; checkpointed, so a record across a resume equals the
  uninterrupted one);
- tokens_per_s: tokens of the window / (window wall time - time paused for evaluation and
  checkpoints), per device too; data_wait: the share of that time spent waiting for batches;
- eta_s: steps left x the average step time of this process's segment (pauses included: they recur);
- mfu: tokens/s per device x FLOPs per token / the device's peak (None without a known peak);
- memory_gib: peak CUDA memory allocated, or the process's peak RSS on a CPU.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from flame.parallel import World


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator peak, or the peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class LogWindow:
    """Loss accumulators of the steps since the last train record, on the device (no host sync
    between log steps); checkpointed, so a record after a resume equals the uninterrupted one."""

    def __init__(self, num_sources: int):
        self.num_sources = num_sources
        self.reset()

    def reset(self, start_step: int = 0) -> None:
        self.start_step = start_step  # the step the window follows (skipped steps inside count too)
        self.loss_sum: torch.Tensor | float = 0.0
        self.targets = 0  # global target tokens, counted on the host
        self.steps = 0
        self.src_loss: torch.Tensor | None = None  # this rank's per-source loss sums and targets
        self.src_targets: torch.Tensor | None = None

    def add_step(self, loss_sum: torch.Tensor, targets: int) -> None:
        self.loss_sum = self.loss_sum + loss_sum.double()
        self.targets += targets
        self.steps += 1

    def add_sources(self, source: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        if self.src_loss is None:
            self.src_loss = torch.zeros(self.num_sources, dtype=torch.float64, device=sums.device)
            self.src_targets = torch.zeros(self.num_sources, dtype=torch.float64, device=sums.device)
        idx = source.to(sums.device)
        self.src_loss.index_add_(0, idx, sums.double())
        self.src_targets.index_add_(0, idx, counts.to(sums.device).double())

    def _summed(self, world: World) -> list[float]:
        """[loss sum, per-source loss sums..., per-source targets...] over every rank (a collective)."""
        n = self.num_sources
        packed = torch.zeros(1 + 2 * n, dtype=torch.float64, device=world.device)
        packed[0] = self.loss_sum if torch.is_tensor(self.loss_sum) else float(self.loss_sum)
        if n and self.src_loss is not None:
            packed[1 : 1 + n] = self.src_loss
            packed[1 + n :] = self.src_targets
        if world.distributed:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        return packed.tolist()

    def reduce(self, world: World) -> tuple[float, list[tuple[float, int]]]:
        """(token-mean loss of the window over all ranks, per source (loss, target tokens))."""
        n = self.num_sources
        vals = self._summed(world)
        loss = vals[0] / max(self.targets, 1)
        per_source = []
        for i in range(n):
            cnt = vals[1 + n + i]
            per_source.append((vals[1 + i] / cnt if cnt else float("nan"), int(cnt)))
        return loss, per_source

    def state_dict(self, world: World) -> dict:
        """The window summed over ranks (every rank calls it: a collective); rank 0's copy is saved."""
        n = self.num_sources
        vals = self._summed(world)
        return {
            "loss_sum": vals[0],
            "targets": self.targets,
            "steps": self.steps,
            "start_step": self.start_step,
            "src_loss": vals[1 : 1 + n] if self.src_loss is not None else None,
            "src_targets": vals[1 + n :] if self.src_loss is not None else None,
        }

    def load_state_dict(self, state: dict, world: World, step: int) -> None:
        """Rank 0 takes the saved sums, the others start from zero: the reduced total is the same.
        `step`: the checkpoint's (a window saved before start_step was kept began `steps` earlier)."""
        keep = world.rank == 0
        dev = world.device
        self.loss_sum = torch.tensor(state["loss_sum"] if keep else 0.0, dtype=torch.float64, device=dev)
        self.targets, self.steps = int(state["targets"]), int(state["steps"])
        self.start_step = int(state.get("start_step", step - self.steps))
        for key in ("src_loss", "src_targets"):
            v = state.get(key)
            if v is not None and len(v) != self.num_sources:  # a mixture changed (allow_config_change)
                v = None
            if v is not None:
                t = torch.tensor(v, dtype=torch.float64, device=dev)
                setattr(self, key, t if keep else torch.zeros_like(t))


class Meter:
    """The timers of the log window and of this process's segment, and the train record's
    arithmetic. The trainer reports what happened (`waited`, `paused`); `train_record` turns a log
    step into the record, and `next_window` starts the next window once the record is written.

    `clock` and `memory` are injectable so the arithmetic can be checked against a scripted run.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        tokens_per_step: int,
        world_size: int,
        flops_per_token: float,
        flops_source: str,
        attention: str,
        peak_flops: float | None,
        memory: Callable[[], float],
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.flops_source = flops_source
        self.attention = attention
        self.peak_flops = peak_flops
        self.memory = memory
        self.clock = clock
        self.start(0)

    def start(self, tokens: int) -> None:
        """A (re)started segment: its average step time drives the ETA."""
        self._seg_t0, self._seg_tokens0 = self.clock(), tokens
        self.next_window(tokens)

    def next_window(self, tokens: int) -> None:
        self._win_t0, self._win_tokens0 = self.clock(), tokens
        self._win_wait = self._paused = 0.0

    def waited(self, seconds: float) -> None:
        """Time spent waiting for the data of a step (the record's data_wait)."""
        self._win_wait += seconds

    def paused(self, seconds: float) -> None:
        """Time spent on evaluation or a checkpoint: left out of the window's throughput."""
        self._paused += seconds

    def train_record(
        self,
        *,
        step: int,
        tokens: int,
        epoch: float,
        loss: float,
        lr: float,
        grad_norm: float,
        target_tokens: int,
        elapsed_s: float,
        bad_steps: int,
        skipped_steps: int,
    ) -> dict:
        """The train record of a log step (the key order is the file's)."""
        now = self.clock()
        # throughput of this log window, without time spent on evaluation and checkpoints; the
        # ETA uses this process's average, which includes them
        win_s = max(now - self._win_t0 - self._paused, 1e-9)
        tps = (tokens - self._win_tokens0) / win_s
        seg_s = max(now - self._seg_t0, 1e-9)
        seg_steps = (tokens - self._seg_tokens0) // self.tokens_per_step
        remaining = (self.total_steps - step) * seg_s / max(1, seg_steps)
        mfu = None
        if self.peak_flops:
            mfu = tps / self.world_size * self.flops_per_token / self.peak_flops
        return {
            "kind": "train",
            "step": step,
            "total_steps": self.total_steps,
            "epoch": round(epoch, 6),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "target_tokens": target_tokens,
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / self.world_size,
            "mfu": mfu,
            "flops_per_token": self.flops_per_token,
            "flops_source": self.flops_source,
            "attention": self.attention,
            "memory_gib": round(self.memory(), 4),
            "data_wait": self._win_wait / win_s,
            "elapsed_s": elapsed_s,
            "eta_s": remaining,
            "percent": 100.0 * step / self.total_steps,
            "bad_steps": bad_steps,
            "skipped_steps": skipped_steps,
        }


def trained_samples(loader, skip_ranges: Sequence[tuple[int, int]], a: int, b: int):
    """Samples of each source that steps a+1..b trained on: the mixture's arithmetic over those
    steps, less the `data.skip` ranges inside them (consumed, never trained on)."""
    got = loader.source_samples(b) - loader.source_samples(a)
    for lo, hi in skip_ranges:
        lo, hi = max(lo - 1, a), min(hi, b)
        if lo < hi:
            got = got - (loader.source_samples(hi) - loader.source_samples(lo))
    return got


def source_record(
    loader,
    skip_ranges: Sequence[tuple[int, int]],
    per_source: Sequence[tuple[float, int]],
    context_len: int,
    window_start: int,
    step: int,
) -> dict:
    """Per source of a mixture: loss over its target tokens in the window, its tokens in the window
    and so far, its achieved share of all tokens so far, and its target share. Token counts come
    from the mixture's arithmetic (samples of each source among the first k global samples)."""
    now = trained_samples(loader, skip_ranges, 0, step)
    window = trained_samples(loader, skip_ranges, window_start, step)
    total = max(1, int(now.sum()))
    out = {}
    for i, name in enumerate(loader.source_names):
        loss, targets = per_source[i]
        out[name] = {
            "loss": loss,
            "target_tokens": targets,
            "tokens": int(window[i]) * context_len,
            "tokens_total": int(now[i]) * context_len,
            "share": float(now[i]) / total,
            "target_share": float(loader.weights[i]),
        }
    return out


def step_record(trainer, grad_norm: float) -> dict:
    """The train record of a set-up trainer's log step: its window reduced over the ranks (a
    collective), the meter's arithmetic, and per source of a mixture."""
    loss, per_source = trainer.window.reduce(trainer.world)
    rec = trainer.meter.train_record(
        step=trainer.step,
        tokens=trainer.tokens,
        epoch=trainer.loader.epoch(),
        loss=loss,
        lr=trainer.step_lr,
        grad_norm=grad_norm,
        target_tokens=trainer.window.targets,
        elapsed_s=trainer.elapsed_now(),
        bad_steps=trainer.guard.bad_total,
        skipped_steps=trainer.skip.through(trainer.step),
    )
    if trainer.sources:
        ctx, start = trainer.cfg.data.context_len, trainer.window.start_step
        rec["sources"] = source_record(
            trainer.loader, trainer.skip.ranges, per_source, ctx, start, trainer.step
        )
    return rec
