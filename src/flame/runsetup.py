"""What a run decides before its first step: what it resumes from (and whether it may), the
model and what is measured of it, seeds, the run's length, the autocast, how a resume keeps the
global batch and takes the config's optimizer settings, and the start record (starts.jsonl).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flame import fla_cpu
from flame.checkpoint import Checkpointer
from flame.config import Config
from flame.data.stream import check_resume_layout
from flame.errors import ConfigError
from flame.flops import resolve_flops_per_token
from flame.head import head_verdict
from flame.meter import Meter, memory_gib
from flame.model import attention_of, build_model, count_params, forward_params, model_label
from flame.optim import apply_config, lr_factor
from flame.parallel import World, build_context, init_mode, on_main_rank, strategy_of
from flame.records import read_records
from flame.runguard import check_resume_compatible

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
    "optim.name",  # the optimizer's state: AdamW's moments are not Muon's momentum
)


def resume_point(
    cfg: Config, world: World, checkpointer: Checkpointer, say: Callable[[str], None]
) -> tuple[Path | None, dict]:
    """The checkpoint this start continues (checkpoint.load, else the newest with checkpoint.resume)
    and its trainer state, once the config is checked against it: refused settings raise, a changed
    world size adjusts train.grad_accum. (None, {}) for a fresh start."""
    c = cfg.checkpoint
    path = Path(c.load) if c.load else (checkpointer.find_latest() if c.resume else None)
    if path is None:
        return None, {}
    saved = checkpointer.trainer_state(path)
    for note in check_resume_compatible(saved.get("config", {}), cfg, FROZEN_KEYS):
        say(note)
    if cfg.data.streaming and not c.allow_config_change:  # before any batch-size advice
        check_resume_layout(saved.get("data", {}), world.world_size, cfg.data.num_workers)
    keep_global_batch(cfg, world.world_size, saved, say)
    return path, saved


@dataclass
class RunModel:
    """The model as built (not yet wrapped for the strategy), and what the run knows of it."""

    module: nn.Module
    strategy: str  # single, ddp or fsdp
    init_mode: str  # how fsdp initialises the weights
    attention: str
    n_params: int
    accepts: set[str]  # forward()'s keyword arguments
    aux_coef: float  # the weight of a mixture of experts' router loss in the objective (0: none)
    head: tuple  # flame.head.head_verdict: (logit transforms, why the loss is not fused or '')


def build_run_model(cfg: Config, world: World, vocab_size: int, say: Callable[[str], None]) -> RunModel:
    """Seed, then build the model of the config for this world (on the meta device where FSDP
    materialises the weights later) and count it. Its FLOPs are measured later
    (`measure_flops`), once the data checked out: that can take seconds."""
    seed_everything(cfg.train.seed)
    use_deterministic(cfg.train.deterministic)
    strategy, mode = strategy_of(cfg.parallel, world), init_mode(cfg.parallel)
    with build_context(strategy, world, mode):
        model = build_model(cfg.model, vocab_size, cfg.data.context_len, varlen=cfg.data.varlen, log=say)
    problem = fla_cpu.bf16_problem(model, autocast_of(cfg, world.device) is not nullcontext)
    if problem:
        raise ConfigError(problem)
    hf = getattr(model, "config", None)
    # a mixture of experts' load-balancing loss joins the objective as in the model's own loss
    aux = (
        float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0)
        if getattr(hf, "output_router_logits", False)
        else 0.0
    )
    accepts = forward_params(model)
    # decided on rank 0 (other ranks may hold meta weights) and shared: every rank computes alike
    verdict = on_main_rank(
        world, lambda: head_verdict(model, cfg.model.loss, accepts, vocab_size), share=True
    )
    return RunModel(
        module=model,
        strategy=strategy,
        init_mode=mode,
        attention=attention_of(model),
        n_params=count_params(model),
        accepts=accepts,
        aux_coef=aux,
        head=verdict,
    )


def measure_flops(rm: RunModel, cfg: Config, say: Callable[[str], None]) -> tuple[float, str]:
    """(FLOPs per token, where the figure comes from) of the built model, for MFU."""
    return resolve_flops_per_token(rm.module, cfg.data.context_len, cfg.model.flops_per_token, log=say)


def run_meter(trainer) -> Meter:
    """The meter of a set-up trainer: what its train records' throughput, MFU and ETA are made of."""
    return Meter(
        total_steps=trainer.total_steps,
        tokens_per_step=trainer.loader.global_batch * trainer.cfg.data.context_len,
        world_size=trainer.world.world_size,
        flops_per_token=trainer.flops_per_token,
        flops_source=trainer.flops_source,
        attention=trainer.attention,
        peak_flops=trainer.peak_flops,
        memory=lambda: memory_gib(trainer.world.device),
    )


def run_banner(trainer) -> str:
    """The console line a run starts its loop with."""
    cfg, world = trainer.cfg, trainer.world
    return (
        f"model: {model_label(cfg.model)} ({trainer.n_params / 1e6:.2f}M parameters, attention "
        f"{trainer.attention}, loss {'fused' if trainer.loss.fused else 'from logits'}), strategy {trainer.strategy}, {world.world_size} process(es) on "
        f"{world.device.type}; {trainer.total_steps} steps of "
        f"{trainer.loader.global_batch * cfg.data.context_len:,} tokens"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic(on: bool) -> None:
    """train.deterministic: deterministic kernels (cuBLAS needs its workspace fixed before its first
    call); off leaves torch's default, which a caller may have set."""
    if on:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


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
    peaks = apply_config(optimizer, o)  # each group's own (optim.lr, or optim.muon_lr for Muon's)
    f = lr_factor(step, total, o)
    scheduler.base_lrs = list(peaks)
    for g, peak in zip(optimizer.param_groups, peaks):
        g["initial_lr"] = peak
        g["lr"] = peak * f
    scheduler._last_lr = [peak * f for peak in peaks]


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
        "loss": "fused" if trainer.loss.fused else "logits",
        "optimizer": getattr(trainer.optimizer, "flame_split", None),
        "exactness": exactness_settings(dev),
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


def exactness_settings(device: torch.device) -> dict:
    """The settings bitwise-equal results depend on besides the config: another intra-op thread
    count reduces in another order (a gradient norm moves by an ulp), and so on."""
    cuda = device.type == "cuda"
    return {
        "intra_op_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "device": torch.cuda.get_device_name(device) if cuda else device.type,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if cuda else None,
    }


def exactness_changes(run_dir: Path, now: dict) -> list[str]:
    """What differs between this start's exactness settings and the last start's of the run."""
    last = None
    for rec in read_records(run_dir / "starts.jsonl"):
        last = rec
    before = (last or {}).get("exactness")
    if not isinstance(before, dict):
        return []
    return [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and before[k] != now[k]]


def append_start(run_dir: Path, rec: dict, say: Callable[[str], None]) -> None:
    """Append-only, never cut: a record for reports, never a reason to stop a run."""
    try:
        with open(run_dir / "starts.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:
        say(f"warning: cannot append to {run_dir / 'starts.jsonl'}: {e.strerror or e}")
