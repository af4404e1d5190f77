"""The training loop, and what it needs to start and resume. Nothing else."""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from flame.checkpoint import Checkpointer
from flame.config import Config, config_from_dict
from flame.data.build import build_eval_loader, build_loader, resolve_tokenizer
from flame.errors import CheckpointError, ConfigError, FlameError
from flame.logging import BatchLog, MetricsLogger, device_peak_flops
from flame.model import build_model, count_params, flops_per_token, forward_loss, forward_params
from flame.optim import build_optimizer, build_scheduler
from flame.parallel import (
    World,
    all_reduce_mean,
    build_context,
    clip_grad_norm,
    cpu_group,
    init_mode,
    init_world,
    main_rank_copy,
    on_main_rank,
    shutdown,
    strategy_of,
    wrap_model,
)
from flame.runguard import RunLock, check_resume_compatible

# Settings that change the data order or the model: a resume with a different value is refused.
FROZEN_KEYS = (
    "model.name",
    "model.vocab_size",
    "model.overrides",
    "model.import_modules",
    "data.inputs",
    "data.store",
    "data.mix",
    "data.tokenizer",
    "data.text_field",
    "data.context_len",
    "data.seed",
    "data.shuffle",
    "data.streaming",
    "train.seed",
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, callbacks: list | None = None):
        self.cfg = cfg
        self.callbacks = list(callbacks or [])  # called as cb(trainer) after every step
        self.world: World = init_world(cfg.parallel, cfg.train)
        self.run_dir = Path(cfg.train.run_dir)
        self.stop_signal: str | None = None
        self._params: list | None = None
        self._signals_seen = 0
        self._paused = 0.0  # seconds of eval / checkpointing inside the current log window
        self._step_lr = float("nan")

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, world = self.cfg, self.world
        self.lock = on_main_rank(world, lambda: RunLock.claim(self.run_dir))  # every rank stops on an error
        self._votes = cpu_group(world)  # the per-step stop vote, without a device sync
        self._say(f"run directory: {self.run_dir.resolve()}")
        self.checkpointer = Checkpointer(
            self.run_dir,
            cfg.checkpoint.keep,
            cfg.checkpoint.checksums,
            log=self._say,
            async_save=getattr(cfg.checkpoint, "async_save", False),
        )
        resume_from = self._resume_path()
        if resume_from is not None:
            saved = self.checkpointer.trainer_state(resume_from)
            notes = check_resume_compatible(saved.get("config", {}), cfg, FROZEN_KEYS)
            for n in notes:
                self._say(n)
            self._keep_global_batch(saved)
        self.tok = resolve_tokenizer(cfg)
        self.loader = build_loader(cfg, world, self.run_dir, self.tok, log=self._say)
        self.eval_loader = build_eval_loader(cfg, world, self.run_dir, self.tok, log=self._say)
        seed_everything(cfg.train.seed)
        self.strategy = strategy_of(cfg.parallel, world)
        mode = init_mode(cfg.parallel)
        with build_context(self.strategy, world, mode):  # fsdp: the meta device where weights arrive later
            model = build_model(cfg.model, self.tok.vocab_size, cfg.data.context_len)
        self.n_params = count_params(model)
        self.flops_per_token = flops_per_token(model, cfg.data.context_len, cfg.model.flops_per_token)
        self.accepts = forward_params(model)
        self.model = wrap_model(model, self.strategy, world, cfg.train, mode)  # also compiles per block
        self.optimizer = build_optimizer(self.model, cfg.optim, world.device)
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.step, self.tokens, self.elapsed, self.bad_steps_total = 0, 0, 0.0, 0
        if resume_from is not None:
            self._load(resume_from, saved)
        self.logger = MetricsLogger(
            cfg.log, self.run_dir, world.is_main, self.total_steps, self.step, cfg.to_dict()
        )
        if world.is_main:
            (self.run_dir / "config.toml").write_text(cfg.to_toml())
        self.autocast = self._autocast()
        self.batch_log = BatchLog(self.run_dir, world.rank, self.step) if cfg.log.batches else None
        self.peak_flops = device_peak_flops(world.device, cfg.log.peak_flops)

    def _say(self, msg: str) -> None:
        if self.world.is_main:
            print(msg, flush=True)
        elif msg.startswith("warning"):  # another rank's problem must reach the user too
            print(f"[rank {self.world.rank}] {msg}", file=sys.stderr, flush=True)

    def _keep_global_batch(self, saved: dict) -> None:
        """On a resume with another world size, set train.grad_accum so the global batch (and with
        it the sequence of global samples per step) stays the checkpoint's."""
        old_world = saved.get("world_size")
        world = self.world.world_size
        if not old_world or old_world == world:
            return
        old_cfg = saved.get("config", {})
        g = saved.get("data", {}).get("global_batch") or (
            old_cfg.get("data", {}).get("batch_size", 0)
            * old_world
            * old_cfg.get("train", {}).get("grad_accum", 0)
        )
        b, t = self.cfg.data.batch_size, self.cfg.train
        if not g or b * world * t.grad_accum == g:
            return
        if g % (b * world):
            fix = "resume on a number of processes that divides it, or start a new run directory"
            if g % world == 0:  # the largest micro-batch <= b that splits the per-rank share evenly
                fit = max(d for d in range(1, b + 1) if (g // world) % d == 0)
                fix = f"pass --data.batch_size {fit} (a divisor of {g // world}), or " + fix
            raise ConfigError(
                f"the checkpoint was taken on {old_world} process(es) with a global batch of {g} samples; "
                f"on {world} process(es) with data.batch_size {b} no train.grad_accum keeps it "
                f"({g} is not a multiple of {b} x {world}): {fix}"
            )
        accum = g // (b * world)
        self._say(
            f"resuming on {world} process(es) instead of {old_world}: train.grad_accum {t.grad_accum} -> "
            f"{accum} keeps the global batch of {g} samples (data.batch_size {b} x {world} x {accum})"
        )
        t.grad_accum = accum

    def _resume_path(self) -> Path | None:
        c = self.cfg.checkpoint
        if c.load:
            return Path(c.load)
        return self.checkpointer.find_latest() if c.resume else None

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        per_step = self.cfg.data.batch_size * self.cfg.data.context_len * t.grad_accum * self.world.world_size
        return max(1, math.ceil(t.max_tokens / per_step))

    def _autocast(self):
        dtype = self.cfg.train.dtype
        use_bf16 = dtype == "bf16" or (dtype == "auto" and self.world.device.type == "cuda")
        if use_bf16:
            return lambda: torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return nullcontext

    def _load(self, path: Path, saved: dict) -> None:
        state = self.checkpointer.load(path, self.model, self.optimizer, saved)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed_s"]
        self.bad_steps_total = state.get("bad_steps", 0)
        self.loader.load_state_dict(state["data"], allow_change=self.cfg.checkpoint.allow_config_change)
        self._say(f"resumed from {path} at step {self.step} ({self.tokens:,} tokens seen)")

    def save(self, background: bool = False) -> Path:
        """Checkpoint now; `background` (interval saves, with checkpoint.async_save) writes in a thread."""
        t0 = time.perf_counter()
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed_now(),
            "bad_steps": self.bad_steps_total,
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "config": self.cfg.to_dict(),
        }
        path = self.checkpointer.save(self.step, self.model, self.optimizer, state, background=background)
        pending = background and self.checkpointer.async_save
        self._say(f"saving checkpoint {path} in the background" if pending else f"saved checkpoint {path}")
        self._paused += time.perf_counter() - t0
        return path

    def elapsed_now(self) -> float:
        return self.elapsed + (time.perf_counter() - self._seg_start)

    # ---- signals -------------------------------------------------------------------------
    def _install_signals(self) -> None:
        def handler(signum, frame):
            self._signals_seen += 1
            if self._signals_seen > 1:
                raise SystemExit(128 + signum)  # a second signal: leave at once
            self.stop_signal = signal.Signals(signum).name

        for name in self.cfg.train.preempt_signals:
            sig = getattr(signal, name, None)
            if sig is None:
                raise ConfigError(f"train.preempt_signals: unknown signal {name!r}")
            signal.signal(sig, handler)

    def _should_stop(self) -> bool:
        flag = self.stop_signal is not None
        if self.world.distributed:  # every rank must stop at the same step
            t = torch.tensor([1.0 if flag else 0.0])  # on the CPU: the vote waits for no GPU work
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._votes)
            flag = bool(t.item())
        return flag

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, world = self.cfg, self.world
        t = cfg.train
        accum = t.grad_accum
        self._install_signals()
        self._seg_start = time.perf_counter()
        self._say(
            f"model: {cfg.model.name} ({self.n_params / 1e6:.2f}M parameters), strategy {self.strategy}, "
            f"{world.world_size} process(es) on {world.device.type}; "
            f"{self.total_steps} steps of {self.loader.global_batch * cfg.data.context_len:,} tokens"
        )
        if self.step >= self.total_steps:
            self._say(f"nothing to do: the run is already at step {self.step} of {self.total_steps}")
            return {"step": self.step, "stopped": "done"}
        it = iter(self.loader)
        tokens_per_step = self.loader.global_batch * cfg.data.context_len
        win_loss = torch.zeros((), device=world.device)
        win_steps, win_wait, win_t0 = 0, 0.0, time.perf_counter()
        seg_tokens0, seg_t0 = self.tokens, time.perf_counter()
        self._win_tokens0, self._paused = self.tokens, 0.0
        consecutive_bad, spike_mean = 0, None
        last_loss = float("nan")
        self.model.train()
        stopped = "done"
        while self.step < self.total_steps:
            step_loss = torch.zeros((), device=world.device)
            for a in range(accum):
                t0 = time.perf_counter()
                batch = next(it)
                win_wait += time.perf_counter() - t0
                if self.batch_log is not None:
                    self.batch_log.write(self.step + 1, a, batch)
                batch = {
                    k: (v.to(world.device, non_blocking=True) if torch.is_tensor(v) else v)
                    for k, v in batch.items()
                }
                sync = a == accum - 1 or self.strategy != "ddp"
                ctx = nullcontext() if sync else self.model.no_sync()
                with ctx, self.autocast():
                    loss = forward_loss(self.model, batch, self.accepts)
                (loss / accum).backward()
                step_loss += loss.detach() / accum
            gnorm = self._clip()
            ok = True
            if t.max_bad_steps or t.spike_factor:
                ok = self._step_ok(step_loss, gnorm, spike_mean)
            if ok:
                self.optimizer.step()
                consecutive_bad = 0
                if t.spike_factor:
                    lv = float(step_loss)
                    spike_mean = lv if spike_mean is None else 0.99 * spike_mean + 0.01 * lv
            else:
                consecutive_bad += 1
                self.bad_steps_total += 1
                self._say(
                    f"warning: step {self.step + 1} skipped (loss {float(step_loss):.4g}, grad norm {float(gnorm):.4g}); "
                    f"{consecutive_bad} bad step(s) in a row"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self._step_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
            self.scheduler.step()
            self.step += 1
            self.tokens += tokens_per_step
            win_loss += step_loss
            win_steps += 1
            if t.max_bad_steps and consecutive_bad >= t.max_bad_steps and not ok:
                self._say(f"stopping: {consecutive_bad} consecutive steps had a non-finite or spiking loss")
                stopped = "diverged"
                self.save()
                break
            if self.step % cfg.log.interval == 0 or self.step == self.total_steps:
                last_loss = self._log(win_loss / win_steps, gnorm, win_wait, win_t0, seg_tokens0, seg_t0)
                win_loss = torch.zeros((), device=world.device)
                win_steps, win_wait, win_t0 = 0, 0.0, time.perf_counter()
            if self.eval_loader is not None and self.step % cfg.eval.interval == 0:
                self.evaluate()
            for cb in self.callbacks:
                cb(self)
            if self._should_stop():
                self._say(
                    f"received {self.stop_signal or 'a stop signal'}: saving a checkpoint at step {self.step}"
                )
                self.save()
                stopped = "preempted"
                break
            if (
                cfg.checkpoint.interval
                and self.step % cfg.checkpoint.interval == 0
                and self.step < self.total_steps
            ):
                self.save(background=True)
            self.checkpointer.poll()  # seals a background save once every rank has written it
        if stopped == "done":
            if self.eval_loader is not None and self.step % cfg.eval.interval != 0:
                self.evaluate()
            self.save()
        self.logger.close()
        return {"step": self.step, "stopped": stopped, "loss": last_loss}

    def _clip(self) -> torch.Tensor:
        if self._params is None:  # walking the module tree every step costs more than the norm
            self._params = [p for p in self.model.parameters() if p.requires_grad]
        return clip_grad_norm(self._params, self.cfg.train.grad_clip)  # a plain tensor under FSDP too

    def _step_ok(self, loss: torch.Tensor, gnorm: torch.Tensor, spike_mean: float | None) -> bool:
        bad = ~(torch.isfinite(loss) & torch.isfinite(gnorm))
        if self.cfg.train.spike_factor and spike_mean is not None:
            bad = bad | (loss > self.cfg.train.spike_factor * spike_mean)
        if self.world.distributed:  # one rank's bad gradient poisons every rank's update
            bad = bad.float()
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            bad = bad > 0
        return not bool(bad)

    def _log(self, loss, gnorm, wait, t0, seg_tokens0, seg_t0) -> float:
        world = self.world
        loss = all_reduce_mean(loss.detach().clone().float(), world)
        loss_v, gnorm_v = float(loss), float(gnorm)
        now = time.perf_counter()
        # throughput of this log window, without time spent on evaluation and checkpoints; the
        # ETA uses this process's average, which includes them
        win_s = max(now - t0 - self._paused, 1e-9)
        tps = (self.tokens - self._win_tokens0) / win_s
        self._win_tokens0, self._paused = self.tokens, 0.0
        seg_s = max(now - seg_t0, 1e-9)
        elapsed = self.elapsed_now()
        seg_steps = (self.tokens - seg_tokens0) // (self.loader.global_batch * self.cfg.data.context_len)
        remaining = (self.total_steps - self.step) * seg_s / max(1, seg_steps)
        mfu = None
        if self.peak_flops:
            mfu = tps / world.world_size * self.flops_per_token / self.peak_flops
        if world.device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(world.device) / 2**30
        else:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            mem = rss / (2**30 if sys.platform == "darwin" else 2**20)
        rec = {
            "kind": "train",
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": round(self.loader.epoch(), 6),
            "loss": loss_v,
            "lr": self._step_lr,
            "grad_norm": gnorm_v,
            "tokens": self.tokens,
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / world.world_size,
            "mfu": mfu,
            "memory_gib": round(mem, 4),
            "data_wait": wait / win_s,
            "elapsed_s": elapsed,
            "eta_s": remaining,
            "percent": 100.0 * self.step / self.total_steps,
            "bad_steps": self.bad_steps_total,
        }
        self.logger.log(rec)
        return loss_v

    @torch.no_grad()
    def evaluate(self) -> float:
        t0 = time.perf_counter()
        self.model.eval()
        self.eval_loader.micro = 0
        it = iter(self.eval_loader)
        total = torch.zeros((), device=self.world.device)
        n = self.cfg.eval.batches
        for _ in range(n):
            batch = {k: (v.to(self.world.device) if torch.is_tensor(v) else v) for k, v in next(it).items()}
            with self.autocast():
                total += forward_loss(self.model, batch, self.accepts).float()
        loss = float(all_reduce_mean(total / n, self.world))
        self.model.train()
        self.logger.log(
            {"kind": "eval", "step": self.step, "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        )
        self._paused += time.perf_counter() - t0
        return loss

    def close(self) -> None:
        logger = getattr(self, "logger", None)
        if logger is not None:  # after an error too: stops a live progress bar, closes sinks
            logger.close()
        if getattr(self, "batch_log", None) is not None:
            self.batch_log.close()
        if getattr(self, "lock", None):
            self.lock.release()


def run_training(cfg: Config, callbacks: list | None = None) -> dict:
    """`flame train`: set up, train, print a sample; returns a summary."""
    trainer = Trainer(cfg, callbacks)
    try:
        trainer.setup()
        result = trainer.train()
        if trainer.world.is_main:
            print(f"metrics: {trainer.run_dir / 'metrics.jsonl'}")
            print(f"checkpoints: {trainer.run_dir / 'checkpoints'}")
        if cfg.train.sample_tokens and result["stopped"] == "done":
            from flame.generate import sample_text

            # under FSDP every rank gathers the weights; rank 0 samples from a plain copy
            model = main_rank_copy(
                trainer.model,
                trainer.strategy,
                trainer.world,
                lambda: build_model(cfg.model, trainer.tok.vocab_size, cfg.data.context_len),
            )
            if model is not None:
                text = sample_text(model, trainer.tok, "", cfg.train.sample_tokens, trainer.world.device)
                print("sample:\n" + text)
    finally:
        trainer.close()
    # after a clean finish only: after an error another rank may still be inside a collective
    shutdown(trainer.world)
    return result


__all__ = ["Trainer", "run_training", "config_from_dict", "CheckpointError", "FlameError"]
