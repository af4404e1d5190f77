"""The training loop, and what it needs to start and resume. Nothing else.

Extension points: subclass `Trainer` and override `train_step` for another objective (the loop
around it stays the same), or pass callbacks, `cb(trainer)`, run after every trained step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from flame import parallel, runsetup
from flame.checkpoint import Checkpointer
from flame.config import Config
from flame.data.build import build_loader, resolve_tokenizer
from flame.data.packed import SkipRanges
from flame.errors import FlameError
from flame.evaluate import build_evaluator
from flame.guards import GuardState, update_allowed, weights_finite
from flame.head import token_loss
from flame.logging import BatchLog, MetricsLogger, device_peak_flops
from flame.loss import host_targets, labels_of, sample_sums
from flame.meter import LogWindow, step_record
from flame.optim import build_optimizer, build_scheduler
from flame.parallel import World
from flame.runguard import RunLock, StopSignals, stop_signals
from flame.runs import check_same_tokenizer, with_absolute_paths, write_run_files

# A callback runs after every trained step (after logging and evaluation, before the stop vote and
# the interval checkpoint; not on data.skip steps). It may read anything of the trainer, and set
# `trainer.stop_signal` to a reason to checkpoint and stop at this step, as a signal would.
Callback = Callable[["Trainer"], None]


class Trainer:
    def __init__(self, cfg: Config, callbacks: list[Callback] | None = None):
        self.cfg = cfg = with_absolute_paths(cfg)  # the saved config works from any folder
        self.callbacks: list[Callback] = list(callbacks or [])
        self.world: World = parallel.init_world(cfg.parallel, cfg.train)
        self.run_dir = Path(cfg.train.run_dir)
        self.stop_signal: str | None = None
        self.failure: str | None = None  # why the run stopped as wrong (a varlen leak)
        self._leak_checked = False
        self._params: list | None = None
        self.step_lr = float("nan")
        self._seg_start = time.perf_counter()

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, world = self.cfg, self.world
        # on rank 0, and every rank stops when it fails (another run holds the directory)
        self.lock = parallel.on_main_rank(world, lambda: RunLock.claim(self.run_dir))
        self._votes = parallel.cpu_group(world)  # the per-step stop vote, without a device sync
        self._say(f"run directory: {self.run_dir.resolve()}")
        c = cfg.checkpoint
        self.checkpointer = Checkpointer(
            self.run_dir, c.keep, c.checksums, log=self._say, async_save=c.async_save
        )
        resume_from, saved = runsetup.resume_point(cfg, world, self.checkpointer, self._say)
        self.tok = resolve_tokenizer(cfg)
        if resume_from is not None:
            check_same_tokenizer(saved, self.tok, c.allow_config_change)
        # the model is resolved before any corpus is read: a wrong model costs seconds, not a prepare
        rm = runsetup.build_run_model(cfg, world, self.tok.vocab_size, self._say)
        self.strategy, self.attention, self.n_params = rm.strategy, rm.attention, rm.n_params
        self.accepts, self.aux_coef = rm.accepts, rm.aux_coef
        self.loss = token_loss(rm.module, rm.head, cfg.model.loss_chunk)
        if not self.loss.fused and cfg.model.loss == "auto":
            self._say(f"loss: from the model's [batch, time, vocab] logits, not fused: {self.loss.reason}")
        self.loader = build_loader(cfg, world, self.run_dir, self.tok, log=self._say)
        self.evaluator = build_evaluator(cfg, world, self.run_dir, self.tok, log=self._say)
        self.flops_per_token, self.flops_source = runsetup.measure_flops(rm, cfg, self._say)
        # wrapped for the strategy (and compiled per block) only now: a refused start costs no compile
        self.model = parallel.wrap_model(rm.module, self.strategy, world, cfg.train, rm.init_mode)
        self.optimizer = build_optimizer(self.model, cfg.optim, world.device)
        self.total_steps = runsetup.total_steps(cfg, world)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.skip = SkipRanges(cfg.data.skip)  # data.skip: steps consumed without training
        self.sources = getattr(self.loader, "source_names", None) or []  # a mixture's named sources
        self.guard = GuardState()
        self.window = LogWindow(len(self.sources))
        if (warning := runsetup.schedule_warning(cfg, self.total_steps)) is not None:
            self._say(warning)
        if resume_from is not None:
            self.load_state_dict(self.checkpointer.load(resume_from, self.model, self.optimizer, saved))
            self._say(f"resumed from {resume_from} at step {self.step} ({self.tokens:,} tokens seen)")
        # only once everything checked out: a refused start changes nothing in the run directory
        self.checkpointer.set_aside_after(self.step)
        self.logger = MetricsLogger(
            cfg.log, self.run_dir, world.is_main, self.total_steps, self.step, cfg.to_dict()
        )
        if world.is_main:
            write_run_files(self.run_dir, cfg, self.tok, self.loader)
        self.autocast = runsetup.autocast_of(cfg, world.device)
        self.batch_log = BatchLog(self.run_dir, world.rank, self.step) if cfg.log.batches else None
        self.peak_flops = device_peak_flops(world.device, cfg.log.peak_flops)
        self.meter = runsetup.run_meter(self)
        if world.is_main:
            start = runsetup.start_record(self, resume_from)
            changed = runsetup.exactness_changes(self.run_dir, start["exactness"]) if resume_from else []
            if changed:
                self._say(
                    f"note: resumed with other settings than the last start ({'; '.join(changed)}): "
                    "the run stays valid, but from here it is not bit-identical to an uninterrupted run"
                )
            runsetup.append_start(self.run_dir, start, self._say)

    @property
    def bad_steps_total(self) -> int:
        """Steps whose update the guards skipped so far (trainer.json's "bad_steps")."""
        return self.guard.bad_total

    def _say(self, msg: str) -> None:
        if self.world.is_main:
            print(msg, flush=True)
        elif msg.startswith("warning"):  # another rank's problem must reach the user too
            print(f"[rank {self.world.rank}] {msg}", file=sys.stderr, flush=True)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The run's state besides the weights and the optimizer (those are the checkpointer's,
        sharded): what trainer.json holds. A collective (the log window sums over ranks)."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed_now(),
            "bad_steps": self.guard.bad_total,
            "guard": self.guard.state_dict(),
            "window": self.window.state_dict(self.world),
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "config": self.cfg.to_dict(),
            "tokenizer": {"fingerprint": self.tok.fingerprint, "vocab_size": self.tok.vocab_size},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s result (weights and optimizer loaded separately); the
        config's optimizer settings take effect from this step on."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed_s"]
        self.guard.load_state_dict(state.get("guard", {}))
        self.guard.bad_total = state.get("bad_steps", 0)
        runsetup.apply_optim_config(self.cfg, self.optimizer, self.scheduler, self.step, self.total_steps)
        self.loader.load_state_dict(state["data"], allow_change=self.cfg.checkpoint.allow_config_change)
        # -- data plan: a re-weight on resume may add sources (the plan keeps the earlier ones)
        self.sources = getattr(self.loader, "source_names", None) or []
        self.window = LogWindow(len(self.sources))
        # -- end data plan
        self.window.reset(self.step)
        if "window" in state:
            self.window.load_state_dict(state["window"], self.world, self.step)

    def save(self, background: bool = False) -> Path:
        """Checkpoint now; `background` (interval saves, with checkpoint.async_save) writes in a thread."""
        t0 = time.perf_counter()
        path = self.checkpointer.save(
            self.step, self.model, self.optimizer, self.state_dict(), background=background
        )
        pending = background and self.checkpointer.async_save
        self._say(f"saving checkpoint {path} in the background" if pending else f"saved checkpoint {path}")
        self.meter.paused(time.perf_counter() - t0)
        return path

    def elapsed_now(self) -> float:
        return self.elapsed + (time.perf_counter() - self._seg_start)

    def _should_stop(self) -> bool:
        # every rank stops at the same step
        return parallel.any_rank(self.stop_signal is not None, self.world, self._votes)

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> dict:
        """Train to the run's last step, or until a stop; returns {"step", "stopped", "loss"}."""
        cfg, t = self.cfg, self.cfg.train
        # the first signal (or Ctrl-C) stops at the end of the step, with a checkpoint
        with StopSignals(stop_signals(t.preempt_signals), lambda name: setattr(self, "stop_signal", name)):
            self._seg_start = time.perf_counter()
            self._say(runsetup.run_banner(self))
            if self.step >= self.total_steps:
                self._say(f"nothing to do: the run is already at step {self.step} of {self.total_steps}")
                return {"step": self.step, "stopped": "done"}
            it = iter(self.loader)
            self.meter.start(self.tokens)
            last_loss = float("nan")
            self.model.train()
            if self.evaluator is not None and cfg.eval.at_start and self.step == 0:
                self.evaluate()
            stopped = "done"
            while self.step < self.total_steps:
                if self.skip(self.step + 1):  # -- data.skip: the step's data is consumed, never trained on
                    self._skip_step(it)
                    continue
                micro = self._next_batches(it)
                loss_sum, targets = self.train_step(micro)
                gnorm, ok = self._update(loss_sum, targets)
                self._advance(loss_sum, targets)
                if not ok and t.max_bad_steps and self.guard.consecutive_bad >= t.max_bad_steps:
                    self._stop_diverged()
                    stopped = "diverged"
                    break
                leak = None
                if self.step % cfg.log.interval == 0 or self.step == self.total_steps:
                    last_loss = self._log(gnorm)
                    if not self._leak_checked:  # the first log step of this start
                        leak = self._varlen_leak()
                if self.evaluator is not None and cfg.eval.interval and self.step % cfg.eval.interval == 0:
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
                c = cfg.checkpoint
                interval = c.interval and self.step % c.interval == 0 and self.step < self.total_steps
                leak = leak or (self._varlen_leak() if interval else None)
                if leak:
                    self.failure = leak
                    self.save()
                    stopped = "varlen-leak"
                    break
                if interval:
                    self.save(background=True)
                self.checkpointer.poll()  # seals a background save once every rank has written it
            if stopped == "done":
                if self.evaluator is not None and cfg.eval.interval and self.step % cfg.eval.interval != 0:
                    self.evaluate()
                self.failure = self._varlen_leak()
                self.save()
                stopped = "varlen-leak" if self.failure else stopped
            self.logger.close()
            return {"step": self.step, "stopped": stopped, "loss": last_loss}

    def _varlen_leak(self) -> str | None:
        """With data.varlen, the isolation proof again, on the trained weights (one row: a long
        document, then two short ones): a model whose cross-document path starts at zero leaks
        only once trained. A message when documents leak, else None. Every rank runs it."""
        if not self.cfg.data.varlen:
            return None
        from flame.model import isolation, trained_probe_row

        self._leak_checked = True
        lens = trained_probe_row(self.cfg.data.context_len)
        outputs = self.loss.hidden_states if self.loss.fused else None
        dev = self.world.device
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            diff = isolation(self.model, self.accepts, self.tok.vocab_size, dev, lens, outputs)
        self.meter.paused(time.perf_counter() - t0)
        tol = 1e-5 if dev.type == "cpu" else 1e-2
        leaked = parallel.any_rank(not diff <= tol, self.world, self._votes)
        if not leaked:
            return None
        return (
            f"data.varlen: at step {self.step} the trained model no longer keeps packed documents apart: "
            f"a document's outputs change by {diff:.3g} of their scale when documents of {lens[0]} "
            "tokens are packed before it; the run stopped with a checkpoint (its steps trained across "
            "document boundaries where the model leaks)"
        )

    def _skip_step(self, it) -> None:
        for _ in range(self.cfg.train.grad_accum):
            next(it)
        self.scheduler.step()
        self.step += 1

    def _next_batches(self, it) -> list[dict]:
        t0 = time.perf_counter()
        micro = [next(it) for _ in range(self.cfg.train.grad_accum)]
        self.meter.waited(time.perf_counter() - t0)
        if self.batch_log is not None:
            for a, b in enumerate(micro):
                self.batch_log.write(self.step + 1, a, b)
        return micro

    def _update(self, loss_sum: torch.Tensor, targets: int) -> tuple[torch.Tensor, bool]:
        """Clip, ask the guards, apply the update (or skip it); returns (grad norm, applied)."""
        gnorm = self._clip()
        g, t = self.guard, self.cfg.train
        ok = update_allowed(g, t, loss_sum, targets, gnorm, self.world, self.step + 1, self._say)
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm, ok

    def _advance(self, loss_sum: torch.Tensor, targets: int) -> None:
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
        self.scheduler.step()
        self.step += 1
        self.tokens += self.loader.global_batch * self.cfg.data.context_len
        self.window.add_step(loss_sum, targets)

    def _stop_diverged(self) -> None:
        self._say(
            f"stopping: {self.guard.consecutive_bad} consecutive steps had a non-finite or spiking loss"
        )
        if weights_finite(self.model, self.world):
            self.save()
        else:  # a checkpoint of NaN weights would only be resumed into the same failure
            self._say("the weights are not finite: no checkpoint saved; the latest good one stays")

    def train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, int]:
        """Forward and backward of one optimizer step's micro-batches; returns (this rank's summed
        token loss, target tokens of the global batch).

        The gradient is that of (sum of token losses over the global batch) / (its target tokens):
        each micro-batch's summed loss is scaled by world / global targets before backward (DDP and
        FSDP average gradients over ranks), so uneven micro-batches and ranks weigh by tokens.

        The extension point for another objective: override it in a subclass and return the same
        pair (the summed loss is what the log window and the guards read; the gradients left on
        the parameters are what the optimizer applies). The loop around it -- clipping, guards,
        optimizer, schedule, logging, checkpoints -- stays the same.
        """
        world = self.world
        local = [host_targets(b) for b in micro_batches]  # on the host: no device sync
        targets = self._global_targets(sum(local))
        scale = world.world_size / max(targets, 1)
        loss_sum = torch.zeros((), device=world.device)
        last = len(micro_batches) - 1
        for a, batch in enumerate(micro_batches):
            batch = {
                k: (v.to(world.device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in batch.items()
            }
            sync = a == last or self.strategy != "ddp"
            with nullcontext() if sync else self.model.no_sync(), self.autocast():
                s, ce, aux = self.loss(self.model, batch, self.accepts)
            labels = labels_of(batch)
            objective = s
            if aux is not None and self.aux_coef:  # a micro-batch's router loss, weighted by its tokens
                objective = s + self.aux_coef * local[a] * aux.float()
            (objective * scale).backward()
            loss_sum += s.detach()
            if self.sources and "source" in batch:
                sums, counts = sample_sums(ce, labels, batch["source"].numel())
                self.window.add_sources(batch["source"], sums, counts)
        return loss_sum, targets

    def _global_targets(self, local: int) -> int:
        """Target tokens of the global batch. Without varlen every rank's count is the same
        (batch x (context - 1) per micro-batch): no collective needed."""
        if self.cfg.data.varlen:
            return parallel.global_sum(local, self.world, self._votes)
        return local * self.world.world_size

    def _clip(self) -> torch.Tensor:
        if self._params is None:  # walking the module tree every step costs more than the norm
            self._params = [p for p in self.model.parameters() if p.requires_grad]
        return parallel.clip_grad_norm(self._params, self.cfg.train.grad_clip)  # a plain tensor, FSDP too

    def _log(self, gnorm) -> float:
        """Write the train record of this log step (meter.py: its fields and arithmetic); a collective."""
        rec = step_record(self, float(gnorm))
        self.logger.log(rec)
        self.window.reset(self.step)
        self.meter.next_window(self.tokens)
        return rec["loss"]

    def evaluate(self) -> float:
        """Held-out loss, perplexity and bits per byte (and per mixture source); logged, returned."""
        t0 = time.perf_counter()
        records = self.evaluator.run(self.model, self.accepts, self.autocast, self.step, self.loss)
        for rec in records:
            self.logger.log(rec)
        self.meter.paused(time.perf_counter() - t0)
        return records[0]["loss"]

    def close(self) -> None:
        logger = getattr(self, "logger", None)
        if logger is not None:  # after an error too: stops a live progress bar, closes sinks
            logger.close()
        if getattr(self, "batch_log", None) is not None:
            self.batch_log.close()
        if getattr(self, "lock", None):
            self.lock.release()


def run_training(cfg: Config, callbacks: list[Callback] | None = None) -> dict:
    """`flame train`: set up, train, print a sample; returns a summary."""
    trainer = Trainer(cfg, callbacks)
    try:
        trainer.setup()
        result = trainer.train()
        if trainer.failure:
            raise FlameError(
                trainer.failure,
                hint="make the model's forward keep documents apart (cu_seqlens), or train with "
                "--data.varlen false",
            )
        if trainer.world.is_main:
            print(f"metrics: {trainer.run_dir / 'metrics.jsonl'}")
            print(f"checkpoints: {trainer.run_dir / 'checkpoints'}")
        if cfg.train.sample_tokens and result["stopped"] == "done":
            from flame.generate import sample_after_training

            sample_after_training(trainer)
    finally:
        trainer.close()
    # after a clean finish only: after an error another rank may still be inside a collective
    parallel.shutdown(trainer.world)
    return result
