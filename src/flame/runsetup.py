"""What a run decides before its first step: seeds, its length, the autocast, how a resume keeps
the global batch and takes the config's optimizer settings, and the start record (starts.jsonl).

Plain functions of the config and the world; the trainer calls them from `setup`."""

from __future__ import annotations

import json
import math
import platform
import random
import socket
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from flame.config import Config
from flame.errors import ConfigError
from flame.model import model_label
from flame.optim import lr_factor
from flame.parallel import World

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


def total_steps(cfg: Config, world: World) -> int:
    """train.max_steps, or the steps that train.max_tokens takes at this global batch."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    per_step = cfg.data.batch_size * cfg.data.context_len * t.grad_accum * world.world_size
    return max(1, math.ceil(t.max_tokens / per_step))


def autocast_of(cfg: Config, device: torch.device) -> Callable:
    """A context factory: bf16 autocast (train.dtype bf16, or auto on CUDA) or nothing."""
    dtype = cfg.train.dtype
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def schedule_warning(cfg: Config, total: int) -> str | None:
    o = cfg.optim
    if o.warmup_steps >= total:
        return (
            f"warning: optim.warmup_steps {o.warmup_steps} >= the run's {total} steps: the warmup is "
            f"squeezed into {max(total - 1, 0)} step(s) and the run reaches optim.lr only at its last "
            "step, with no decay (lower optim.warmup_steps, or train longer)"
        )
    return None


def keep_global_batch(cfg: Config, world_size: int, saved: dict, say: Callable[[str], None]) -> None:
    """On a resume with another world size, set train.grad_accum so the global batch (and with
    it the sequence of global samples per step) stays the checkpoint's."""
    old_world = saved.get("world_size")
    world = world_size
    if not old_world or old_world == world:
        return
    old_cfg = saved.get("config", {})
    g = saved.get("data", {}).get("global_batch") or (
        old_cfg.get("data", {}).get("batch_size", 0)
        * old_world
        * old_cfg.get("train", {}).get("grad_accum", 0)
    )
    b, t = cfg.data.batch_size, cfg.train
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
    say(
        f"resuming on {world} process(es) instead of {old_world}: train.grad_accum {t.grad_accum} -> "
        f"{accum} keeps the global batch of {g} samples (data.batch_size {b} x {world} x {accum})"
    )
    t.grad_accum = accum


def apply_optim_config(cfg: Config, optimizer, scheduler, step: int, total: int) -> None:
    """After a resume the optimizer's saved hyperparameters would win; the config's take effect
    instead (lr, weight decay, betas, eps, schedule and its length), from this step on."""
    o = cfg.optim
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    lr = o.lr * lr_factor(step, total, o)
    for i, g in enumerate(optimizer.param_groups):
        g["initial_lr"] = o.lr
        g["lr"] = lr
        g["betas"] = (o.beta1, o.beta2)
        g["eps"] = o.eps
        if i == 0:  # the decayed group (build_optimizer: matrices first, then norms and biases)
            g["weight_decay"] = o.weight_decay
    scheduler._last_lr = [lr] * len(optimizer.param_groups)


def start_record(trainer, resumed_from: Path | None) -> dict:
    """What ran this segment of the run: one line of <run_dir>/starts.jsonl, for `flame report`."""
    import transformers

    import flame

    world, dev = trainer.world, trainer.world.device
    cuda = dev.type == "cuda"
    return {
        "kind": "start",
        "step": trainer.step,
        "tokens": trainer.tokens,
        "elapsed_s": trainer.elapsed,
        "time": time.time(),
        "resumed_from": str(resumed_from) if resumed_from is not None else None,
        "world_size": world.world_size,
        "strategy": trainer.strategy,
        "grad_accum": trainer.cfg.train.grad_accum,
        "global_batch": trainer.loader.global_batch,
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
        "device_count": torch.cuda.device_count() if cuda else 1,
        "dtype": "bf16" if trainer.autocast is not nullcontext else "fp32",
        "compile": trainer.cfg.train.compile,
        "parameters": trainer.n_params,
        "model": model_label(trainer.cfg.model),
        "attention": trainer.attention,
        "flops_per_token": trainer.flops_per_token,
        "flops_source": trainer.flops_source,
        "peak_flops": trainer.peak_flops,
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


def append_start(run_dir: Path, rec: dict, say: Callable[[str], None]) -> None:
    """Append-only, never cut: a record for reports, never a reason to stop a run."""
    try:
        with open(run_dir / "starts.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:
        say(f"warning: cannot append to {run_dir / 'starts.jsonl'}: {e.strerror or e}")
