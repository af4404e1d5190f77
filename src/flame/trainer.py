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
from flame.data.build import build_loader, resolve_tokenizer
from flame.data.packed import SkipRanges
from flame.errors import CheckpointError, ConfigError, FlameError
from flame.evaluate import build_evaluator
from flame.flops import resolve_flops_per_token
from flame.logging import BatchLog, MetricsLogger, device_peak_flops
from flame.loss import host_targets, labels_of, model_outputs, per_token_ce, sample_sums
from flame.model import attention_of, build_model, count_params, forward_params, model_label
from flame.optim import build_optimizer, build_scheduler, lr_factor
from flame.parallel import (
    World,
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
# (data.mix / data.store are not here: a changed mixture becomes a new phase of the data plan, and
# the loader refuses what would rewrite the past -- a source's content, the data settings.)
FROZEN_KEYS = (
    "model.name",
    "model.vocab_size",
    "model.pad_vocab_multiple",
    "model.overrides",
    "model.import_modules",
    "data.inputs",
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


class GuardState:
    """What the NaN / spike guards carry from step to step; checkpointed so a resume is exact."""

    def __init__(self) -> None:
        self.spike_mean: float | None = None
        self.consecutive_bad = 0

    def judge(self, loss: float, bad: bool, spike_factor: float) -> bool:
        """True when the step's update is applied; updates the running state."""
        if spike_factor and self.spike_mean is not None and loss > spike_factor * self.spike_mean:
            bad = True
        if bad:
            self.consecutive_bad += 1
            return False
        self.consecutive_bad = 0
        if spike_factor:
            self.spike_mean = loss if self.spike_mean is None else 0.99 * self.spike_mean + 0.01 * loss
        return True

    def state_dict(self) -> dict:
        return {"spike_mean": self.spike_mean, "consecutive_bad": self.consecutive_bad}

    def load_state_dict(self, state: dict) -> None:
        self.spike_mean = state.get("spike_mean")
        self.consecutive_bad = int(state.get("consecutive_bad", 0))


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

    def load_state_dict(self, state: dict, world: World) -> None:
        """Rank 0 takes the saved sums, the others start from zero: the reduced total is the same."""
        keep = world.rank == 0
        dev = world.device
        self.loss_sum = torch.tensor(state["loss_sum"] if keep else 0.0, dtype=torch.float64, device=dev)
        self.targets, self.steps = int(state["targets"]), int(state["steps"])
        self.start_step = int(state.get("start_step", -1))  # -1: an older checkpoint, set by the trainer
        for key in ("src_loss", "src_targets"):
            v = state.get(key)
            if v is not None and len(v) != self.num_sources:  # a mixture changed (allow_config_change)
                v = None
            if v is not None:
                t = torch.tensor(v, dtype=torch.float64, device=dev)
                setattr(self, key, t if keep else torch.zeros_like(t))


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
        start = 0
        if resume_from is not None:
            saved = self.checkpointer.trainer_state(resume_from)
            start = int(saved.get("step", 0))
        if resume_from is not None:
            notes = check_resume_compatible(saved.get("config", {}), cfg, FROZEN_KEYS)
            for n in notes:
                self._say(n)
            self._keep_global_batch(saved)
        self.tok = resolve_tokenizer(cfg)
        # the model is resolved before any corpus is read: a wrong model costs seconds, not a prepare
        seed_everything(cfg.train.seed)
        self.strategy = strategy_of(cfg.parallel, world)
        mode = init_mode(cfg.parallel)
        with build_context(self.strategy, world, mode):  # fsdp: the meta device where weights arrive later
            model = build_model(
                cfg.model, self.tok.vocab_size, cfg.data.context_len, varlen=cfg.data.varlen, log=self._say
            )
        self.attention = attention_of(model)
        hf = getattr(model, "config", None)
        # a mixture of experts' load-balancing loss joins the objective as in the model's own loss
        self.aux_coef = (
            float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0)
            if getattr(hf, "output_router_logits", False)
            else 0.0
        )
        self.loader = build_loader(cfg, world, self.run_dir, self.tok, log=self._say)
        self.evaluator = build_evaluator(cfg, world, self.run_dir, self.tok, log=self._say)
        self.n_params = count_params(model)
        self.flops_per_token, self.flops_source = resolve_flops_per_token(
            model, cfg.data.context_len, cfg.model.flops_per_token, log=self._say
        )
        self.accepts = forward_params(model)
        self.model = wrap_model(model, self.strategy, world, cfg.train, mode)  # also compiles per block
        self.optimizer = build_optimizer(self.model, cfg.optim, world.device)
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.step, self.tokens, self.elapsed, self.bad_steps_total = 0, 0, 0.0, 0
        self.skip = SkipRanges(cfg.data.skip)  # data.skip: steps consumed without training
        self.sources = getattr(self.loader, "source_names", None) or []  # a mixture's named sources
        self.guard = GuardState()
        self.window = LogWindow(len(self.sources))
        self._warn_schedule()
        if resume_from is not None:
            self._load(resume_from, saved)
        # only once everything checked out: a refused start changes nothing in the run directory
        aside = self.checkpointer.set_aside_after(start)
        if aside is not None:
            self._say(
                f"note: checkpoints after step {start} belong to another trajectory of this run; moved them "
                f"to {aside} (nothing deleted)"
            )
        self.logger = MetricsLogger(
            cfg.log, self.run_dir, world.is_main, self.total_steps, self.step, cfg.to_dict()
        )
        if world.is_main:
            (self.run_dir / "config.toml").write_text(cfg.to_toml())
            if hasattr(self.loader, "save_plan"):  # -- data plan: what `flame inspect` reconstructs from
                self.loader.save_plan(self.run_dir)
        self.autocast = self._autocast()
        self.batch_log = BatchLog(self.run_dir, world.rank, self.step) if cfg.log.batches else None
        self.peak_flops = device_peak_flops(world.device, cfg.log.peak_flops)
        if world.is_main:
            self._record_start(resume_from)

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

    def _record_start(self, resumed_from: Path | None) -> None:
        """One line per (re)start in <run_dir>/starts.jsonl (append-only, never cut): what ran each
        segment of the run, for `flame report`."""
        import json
        import platform
        import socket

        import transformers

        import flame

        world, dev = self.world, self.world.device
        cuda = dev.type == "cuda"
        rec = {
            "kind": "start",
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed,
            "time": time.time(),
            "resumed_from": str(resumed_from) if resumed_from is not None else None,
            "world_size": world.world_size,
            "strategy": self.strategy,
            "grad_accum": self.cfg.train.grad_accum,
            "global_batch": self.loader.global_batch,
            "device": dev.type,
            "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
            "device_count": torch.cuda.device_count() if cuda else 1,
            "dtype": "bf16" if self.autocast is not nullcontext else "fp32",
            "compile": self.cfg.train.compile,
            "parameters": self.n_params,
            "model": model_label(self.cfg.model),
            "attention": self.attention,
            "flops_per_token": self.flops_per_token,
            "flops_source": self.flops_source,
            "peak_flops": self.peak_flops,
            "versions": {
                "flame": flame.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "cuda": torch.version.cuda,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            },
            "host": socket.gethostname(),
        }
        try:
            with open(self.run_dir / "starts.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:  # a record for reports: never a reason to stop a run
            self._say(f"warning: cannot append to {self.run_dir / 'starts.jsonl'}: {e.strerror or e}")

    def _warn_schedule(self) -> None:
        o, total = self.cfg.optim, self.total_steps
        if o.warmup_steps >= total:
            self._say(
                f"warning: optim.warmup_steps {o.warmup_steps} >= the run's {total} steps: the warmup is "
                f"squeezed into {max(total - 1, 0)} step(s) and the run reaches optim.lr only at its last "
                "step, with no decay (lower optim.warmup_steps, or train longer)"
            )

    def _load(self, path: Path, saved: dict) -> None:
        state = self.checkpointer.load(path, self.model, self.optimizer, saved)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed_s"]
        self.bad_steps_total = state.get("bad_steps", 0)
        self.guard.load_state_dict(state.get("guard", {}))
        self._apply_optim_config()
        self.loader.load_state_dict(state["data"], allow_change=self.cfg.checkpoint.allow_config_change)
        # -- data plan: a re-weight on resume may add sources (the plan keeps the earlier ones)
        self.sources = getattr(self.loader, "source_names", None) or []
        self.window = LogWindow(len(self.sources))
        # -- end data plan
        self.window.reset(self.step)
        if "window" in state:
            self.window.load_state_dict(state["window"], self.world)
            if self.window.start_step < 0:
                self.window.start_step = self.step - self.window.steps
        self._say(f"resumed from {path} at step {self.step} ({self.tokens:,} tokens seen)")

    def _apply_optim_config(self) -> None:
        """After a resume the optimizer's saved hyperparameters would win; the config's take effect
        instead (lr, weight decay, betas, eps, schedule and its length), from this step on."""
        o = self.cfg.optim
        self.scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        lr = o.lr * lr_factor(self.step, self.total_steps, o)
        for i, g in enumerate(self.optimizer.param_groups):
            g["initial_lr"] = o.lr
            g["lr"] = lr
            g["betas"] = (o.beta1, o.beta2)
            g["eps"] = o.eps
            if i == 0:  # the decayed group (build_optimizer: matrices first, then norms and biases)
                g["weight_decay"] = o.weight_decay
        self.scheduler._last_lr = [lr] * len(self.optimizer.param_groups)

    def save(self, background: bool = False) -> Path:
        """Checkpoint now; `background` (interval saves, with checkpoint.async_save) writes in a thread."""
        t0 = time.perf_counter()
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed_now(),
            "bad_steps": self.bad_steps_total,
            "guard": self.guard.state_dict(),
            "window": self.window.state_dict(self.world),
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
        self._install_signals()
        self._seg_start = time.perf_counter()
        self._say(
            f"model: {model_label(cfg.model)} ({self.n_params / 1e6:.2f}M parameters, attention "
            f"{self.attention}), strategy {self.strategy}, "
            f"{world.world_size} process(es) on {world.device.type}; "
            f"{self.total_steps} steps of {self.loader.global_batch * cfg.data.context_len:,} tokens"
        )
        if self.step >= self.total_steps:
            self._say(f"nothing to do: the run is already at step {self.step} of {self.total_steps}")
            return {"step": self.step, "stopped": "done"}
        it = iter(self.loader)
        tokens_per_step = self.loader.global_batch * cfg.data.context_len
        self._seg_tokens0, self._seg_t0 = self.tokens, time.perf_counter()
        self._win_t0, self._win_wait = time.perf_counter(), 0.0
        self._win_tokens0, self._paused = self.tokens, 0.0
        last_loss = float("nan")
        self.model.train()
        if self.evaluator is not None and cfg.eval.at_start and self.step == 0:
            self.evaluate()
        stopped = "done"
        while self.step < self.total_steps:
            if self.skip(self.step + 1):  # -- data.skip: the step's data is consumed, never trained on
                for _ in range(t.grad_accum):
                    next(it)
                self.scheduler.step()
                self.step += 1
                continue  # -- end data.skip
            t0 = time.perf_counter()
            micro = [next(it) for _ in range(t.grad_accum)]
            self._win_wait += time.perf_counter() - t0
            if self.batch_log is not None:
                for a, b in enumerate(micro):
                    self.batch_log.write(self.step + 1, a, b)
            loss_sum, targets = self.train_step(micro)
            gnorm = self._clip()
            ok = True
            if t.max_bad_steps or t.spike_factor:
                ok = self._step_ok(loss_sum, targets, gnorm)
            if ok:
                self.optimizer.step()
            else:
                self.bad_steps_total += 1
                self._say(
                    f"warning: step {self.step + 1} skipped (loss {self._last_step_loss:.4g}, grad norm "
                    f"{float(gnorm):.4g}); {self.guard.consecutive_bad} bad step(s) in a row"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self._step_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
            self.scheduler.step()
            self.step += 1
            self.tokens += tokens_per_step
            self.window.add_step(loss_sum, targets)
            if t.max_bad_steps and self.guard.consecutive_bad >= t.max_bad_steps and not ok:
                self._say(
                    f"stopping: {self.guard.consecutive_bad} consecutive steps had a non-finite or spiking loss"
                )
                stopped = "diverged"
                if self._weights_finite():
                    self.save()
                else:  # a checkpoint of NaN weights would only be resumed into the same failure
                    self._say("the weights are not finite: no checkpoint saved; the latest good one stays")
                break
            if self.step % cfg.log.interval == 0 or self.step == self.total_steps:
                last_loss = self._log(gnorm)
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
            if (
                cfg.checkpoint.interval
                and self.step % cfg.checkpoint.interval == 0
                and self.step < self.total_steps
            ):
                self.save(background=True)
            self.checkpointer.poll()  # seals a background save once every rank has written it
        if stopped == "done":
            if self.evaluator is not None and cfg.eval.interval and self.step % cfg.eval.interval != 0:
                self.evaluate()
            self.save()
        self.logger.close()
        return {"step": self.step, "stopped": stopped, "loss": last_loss}

    def train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, int]:
        """Forward and backward of one optimizer step's micro-batches; returns (this rank's summed
        token loss, target tokens of the global batch).

        The gradient is that of (sum of token losses over the global batch) / (its target tokens):
        each micro-batch's summed loss is scaled by world / global targets before backward (DDP and
        FSDP average gradients over ranks), so uneven micro-batches and ranks weigh by tokens.
        Override it for a custom objective; the loop around it stays the same.
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
                logits, aux = model_outputs(self.model, batch, self.accepts)
            labels = labels_of(batch)
            ce = per_token_ce(logits, labels)
            s = ce.sum()
            objective = s
            if aux is not None and self.aux_coef:  # a micro-batch's router loss, weighted by its tokens
                objective = s + self.aux_coef * local[a] * aux.float()
            (objective * scale).backward()
            loss_sum += s.detach()
            if self.sources and "source" in batch:
                sums, counts = sample_sums(ce.detach(), labels, batch["source"].numel())
                self.window.add_sources(batch["source"], sums, counts)
        return loss_sum, targets

    def _global_targets(self, local: int) -> int:
        """Target tokens of the global batch. Without varlen every rank's count is the same
        (batch x (context - 1) per micro-batch): no collective needed."""
        if not self.world.distributed:
            return local
        if not self.cfg.data.varlen:
            return local * self.world.world_size
        t = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._votes)
        return int(t.item())

    def _weights_finite(self) -> bool:
        bad = torch.zeros((), device=self.world.device)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP: this rank's shard
            bad += (~torch.isfinite(local.detach())).sum().float()
        if self.world.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.SUM)
        return not bool(bad)

    def _clip(self) -> torch.Tensor:
        if self._params is None:  # walking the module tree every step costs more than the norm
            self._params = [p for p in self.model.parameters() if p.requires_grad]
        return clip_grad_norm(self._params, self.cfg.train.grad_clip)  # a plain tensor under FSDP too

    def _step_ok(self, loss_sum: torch.Tensor, targets: int, gnorm: torch.Tensor) -> bool:
        """The guards' verdict on this step, the same on every rank (one collective)."""
        t = self.cfg.train
        both = torch.stack([loss_sum.float() / max(targets, 1), gnorm.float().to(loss_sum.device)])
        if self.world.distributed:  # the global token-mean loss; a bad rank poisons every rank's update
            finite = torch.isfinite(both).all().float()
            packed = torch.stack([both[0], 1.0 - finite])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            loss, bad = float(packed[0]), bool(packed[1] > 0)
        else:
            loss, bad = float(both[0]), not bool(torch.isfinite(both).all())
        self._last_step_loss = loss
        return self.guard.judge(loss, bad, t.spike_factor)

    def _log(self, gnorm) -> float:
        world = self.world
        win = self.window
        loss_v, per_source = win.reduce(world)
        gnorm_v = float(gnorm)
        now = time.perf_counter()
        # throughput of this log window, without time spent on evaluation and checkpoints; the
        # ETA uses this process's average, which includes them
        win_s = max(now - self._win_t0 - self._paused, 1e-9)
        tps = (self.tokens - self._win_tokens0) / win_s
        seg_s = max(now - self._seg_t0, 1e-9)
        elapsed = self.elapsed_now()
        seg_steps = (self.tokens - self._seg_tokens0) // (
            self.loader.global_batch * self.cfg.data.context_len
        )
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
            "target_tokens": win.targets,
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / world.world_size,
            "mfu": mfu,
            "flops_per_token": self.flops_per_token,
            "flops_source": self.flops_source,
            "attention": self.attention,
            "memory_gib": round(mem, 4),
            "data_wait": self._win_wait / win_s,
            "elapsed_s": elapsed,
            "eta_s": remaining,
            "percent": 100.0 * self.step / self.total_steps,
            "bad_steps": self.bad_steps_total,
            "skipped_steps": self.skip.through(self.step),
        }
        if self.sources:
            rec["sources"] = self._source_record(per_source)
        self.logger.log(rec)
        self.window.reset(self.step)
        self._win_t0, self._win_wait = time.perf_counter(), 0.0
        self._win_tokens0, self._paused = self.tokens, 0.0
        return loss_v

    def _source_record(self, per_source: list[tuple[float, int]]) -> dict:
        """Per source: loss over its target tokens in the window, its tokens in the window and so far,
        its achieved share of all tokens so far, and its target share. Token counts come from the
        mixture's arithmetic (samples of each source among the first k global samples)."""
        L = self.cfg.data.context_len
        now = self._trained_samples(0, self.step)
        window = self._trained_samples(self.window.start_step, self.step)
        total = max(1, int(now.sum()))
        out = {}
        for i, name in enumerate(self.sources):
            loss, targets = per_source[i]
            out[name] = {
                "loss": loss,
                "target_tokens": targets,
                "tokens": int(window[i]) * L,
                "tokens_total": int(now[i]) * L,
                "share": float(now[i]) / total,
                "target_share": float(self.loader.weights[i]),
            }
        return out

    def _trained_samples(self, a: int, b: int):
        """Samples of each source that steps a+1..b trained on: the mixture's arithmetic over those
        steps, less the `data.skip` ranges inside them (consumed, never trained on)."""
        got = self.loader.source_samples(b) - self.loader.source_samples(a)
        for lo, hi in self.skip.ranges:
            lo, hi = max(lo - 1, a), min(hi, b)
            if lo < hi:
                got = got - (self.loader.source_samples(hi) - self.loader.source_samples(lo))
        return got

    def evaluate(self) -> float:
        """Held-out loss, perplexity and bits per byte (and per mixture source); logged, returned."""
        t0 = time.perf_counter()
        records = self.evaluator.run(self.model, self.accepts, self.autocast, self.step)
        for rec in records:
            self.logger.log(rec)
        self._paused += time.perf_counter() - t0
        return records[0]["loss"]

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
                text = sample_text(
                    model,
                    trainer.tok,
                    "",
                    cfg.train.sample_tokens,
                    trainer.world.device,
                    context_len=cfg.data.context_len,
                )
                print("sample:\n" + text)
    finally:
        trainer.close()
    # after a clean finish only: after an error another rank may still be inside a collective
    shutdown(trainer.world)
    return result


__all__ = ["Trainer", "run_training", "config_from_dict", "CheckpointError", "FlameError"]
