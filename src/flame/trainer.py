"""The training loop, and what it needs to start and resume. Nothing else."""

from __future__ import annotations

import math
import random
import signal
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
from flame.parallel import World, all_reduce_mean, init_world, strategy_of, unwrap, wrap_model
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
        self._signals_seen = 0

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, world = self.cfg, self.world
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.run_dir)
            self.lock.acquire()
        self._say(f"run directory: {self.run_dir.resolve()}")
        self.checkpointer = Checkpointer(
            self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.checksums, log=self._say
        )
        resume_from = self._resume_path()
        if resume_from is not None:
            saved = torch.load(resume_from / "trainer.pt", weights_only=False)
            notes = check_resume_compatible(saved.get("config", {}), cfg, FROZEN_KEYS)
            for n in notes:
                self._say(n)
        self.tok = resolve_tokenizer(cfg)
        self.loader = build_loader(cfg, world, self.run_dir, self.tok, log=self._say)
        self.eval_loader = build_eval_loader(cfg, world, self.run_dir, self.tok, log=self._say)
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, self.tok.vocab_size, cfg.data.context_len)
        self.n_params = count_params(model)
        self.flops_per_token = flops_per_token(model, cfg.data.context_len, cfg.model.flops_per_token)
        self.accepts = forward_params(model)
        self.strategy = strategy_of(cfg.parallel, world)
        self.model = wrap_model(model, self.strategy, world, cfg.train)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim, world.device)
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.step, self.tokens, self.elapsed, self.bad_steps_total = 0, 0, 0.0, 0
        if resume_from is not None:
            self._load(resume_from)
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

    def _load(self, path: Path) -> None:
        state = self.checkpointer.load(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed_s"]
        self.bad_steps_total = state.get("bad_steps", 0)
        self.loader.load_state_dict(state["data"], allow_change=self.cfg.checkpoint.allow_config_change)
        self._say(f"resumed from {path} at step {self.step} ({self.tokens:,} tokens seen)")

    def save(self) -> Path:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed_now(),
            "bad_steps": self.bad_steps_total,
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "config": self.cfg.to_dict(),
        }
        path = self.checkpointer.save(self.step, self.model, self.optimizer, state)
        self._say(f"saved checkpoint {path}")
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
            t = torch.tensor([1.0 if flag else 0.0], device=self.world.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
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
            self.scheduler.step()
            self.step += 1
            self.tokens += tokens_per_step
            win_loss += step_loss
            win_steps += 1
            if consecutive_bad >= max(1, t.max_bad_steps) and not ok:
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
                self.save()
        if stopped == "done":
            if self.eval_loader is not None and self.step % cfg.eval.interval != 0:
                self.evaluate()
            self.save()
        self.logger.close()
        if self.batch_log is not None:
            self.batch_log.close()
        return {"step": self.step, "stopped": stopped, "loss": last_loss}

    def _clip(self) -> torch.Tensor:
        clip = self.cfg.train.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        if clip:
            return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

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
        seg_s = max(now - seg_t0, 1e-9)
        tps = (self.tokens - seg_tokens0) / seg_s  # the new segment only: a resume does not inflate it
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

            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rec = {
            "kind": "train",
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": round(self.loader.epoch(), 6),
            "loss": loss_v,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": gnorm_v,
            "tokens": self.tokens,
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / world.world_size,
            "mfu": mfu,
            "memory_gib": round(mem, 4),
            "data_wait": wait / max(now - t0, 1e-9),
            "elapsed_s": elapsed,
            "eta_s": remaining,
            "percent": 100.0 * self.step / self.total_steps,
            "bad_steps": self.bad_steps_total,
        }
        self.logger.log(rec)
        return loss_v

    @torch.no_grad()
    def evaluate(self) -> float:
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
        return loss

    def close(self) -> None:
        if self.world.is_main and getattr(self, "lock", None):
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
        if cfg.train.sample_tokens and result["stopped"] == "done" and trainer.world.is_main:
            from flame.generate import sample_text

            text = sample_text(
                unwrap(trainer.model), trainer.tok, "", cfg.train.sample_tokens, trainer.world.device
            )
            print("sample:\n" + text)
        return result
    finally:
        trainer.close()


__all__ = ["Trainer", "run_training", "config_from_dict", "CheckpointError", "FlameError"]
