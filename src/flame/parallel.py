"""Process group, device and model wrapping (DDP or FSDP2) on torch.distributed, launched by torchrun.

Strategies (`parallel.strategy`):
- `none`: one process, the model as it is.
- `ddp`: every rank holds the whole model; gradients are averaged after each optimizer step's
  last micro-batch.
- `fsdp`: FSDP2 (`fully_shard`) on every transformer block, then on the root; each rank holds
  1/world of every parameter, gradient and optimizer state. On CUDA parameters are gathered
  in bf16 and gradients reduced in fp32 (unless train.dtype = fp32).
- `auto`: `none` on one process, `fsdp` on several.

With `fsdp` the model is never materialized whole on a device. `parallel.init = rank0` (the
default): rank 0 builds it on the CPU (the exact weights a one-process run gets from the same
seed), every other rank on the meta device; after sharding, rank 0 broadcasts each tensor and
every rank keeps only its shard. `parallel.init = meta`: every rank builds on the meta device
and runs the model's own initializer on its shards — for models larger than host memory; the
weights are then a valid draw of the same initializer but not the ones a one-process run gets.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from flame.config import ParallelConfig, TrainConfig
from flame.errors import ConfigError, FlameError


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # init_world started the process group, so shutdown() ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(pcfg: ParallelConfig, tcfg: TrainConfig) -> World:
    """Join the process group torchrun set up (if any) and pick this rank's device.

    One process with an explicit `ddp` or `fsdp` strategy gets a one-process group, so the
    wrapper it asked for can be built (useful to measure its overhead).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available (use --train.device cpu)")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if want_cuda else "gloo")
    owns = not dist.is_initialized() and (world_size > 1 or pcfg.strategy in ("ddp", "fsdp"))
    if not dist.is_initialized():
        if world_size > 1:
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        elif pcfg.strategy in ("ddp", "fsdp"):
            if "MASTER_ADDR" in os.environ:  # torchrun with one process
                dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
            else:
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(rank, world_size, local_rank, device, owns)


def strategy_of(pcfg: ParallelConfig, world: World) -> str:
    """The strategy this run uses: auto is none on one process and fsdp on several."""
    if pcfg.strategy == "auto":
        return "fsdp" if world.distributed else "none"
    if pcfg.strategy in ("ddp", "fsdp") and not dist.is_initialized():
        return "none"
    return pcfg.strategy


def init_mode(pcfg: ParallelConfig) -> str:
    """`parallel.init`: rank0 (also for auto) or meta (its Literal choices are checked by config)."""
    return "rank0" if pcfg.init == "auto" else pcfg.init


def builds_on_meta(strategy: str, world: World, mode: str = "rank0") -> bool:
    """Whether this rank builds the model on the meta device (its weights arrive after sharding)."""
    return strategy == "fsdp" and (mode == "meta" or not world.is_main)


@contextlib.contextmanager
def build_context(strategy: str, world: World, mode: str = "rank0") -> Iterator[None]:
    """The context to build the model in: the meta device on ranks whose weights arrive later."""
    if builds_on_meta(strategy, world, mode):
        with torch.device("meta"):
            yield
    else:
        yield


def wrap_model(
    model: nn.Module,
    strategy: str,
    world: World,
    tcfg: TrainConfig,
    mode: str = "rank0",
) -> nn.Module:
    """Activation checkpointing, per-block compile, then the device and the data-parallel wrapper.

    Returns the module to train. Parameter names (and so checkpoints) are the same with and
    without checkpointing, compile and any strategy.
    """
    blocks = transformer_blocks(model)
    if tcfg.activation_checkpointing:
        _activation_checkpointing(model, blocks)
    if tcfg.compile:
        _compile(model, blocks)
    if strategy == "fsdp":
        return _fsdp(model, blocks, world, mode, tcfg)
    model = model.to(world.device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the largest nn.ModuleList of identical-type children."""
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _activation_checkpointing(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass.

    The block's `forward` is wrapped (not the module), so parameter names stay the same and the
    FSDP hooks stay outside the recomputed region.
    """
    if blocks:
        for block in blocks:
            block.forward = _checkpointed(block.forward)
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ConfigError(
            "train.activation_checkpointing: this model has no repeated blocks (an nn.ModuleList of "
            "one module type) and no gradient_checkpointing_enable(); keep its blocks in an "
            "nn.ModuleList, or set --train.activation_checkpointing false"
        )
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _compile(model: nn.Module, blocks: list[nn.Module]) -> None:
    """torch.compile each block's forward (the whole model's when it has no repeated blocks)."""
    for m in blocks or [model]:
        m.forward = torch.compile(m.forward)


def _fsdp(model: nn.Module, blocks: list[nn.Module], world: World, mode: str, tcfg: TrainConfig) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta != builds_on_meta("fsdp", world, mode):  # our own invariant: build_context was used
        raise RuntimeError(f"rank {world.rank}: model built on the wrong device for parallel.init={mode}")
    full = None
    if mode == "rank0" and world.is_main:
        full = {k: v for k, v in model.state_dict().items()}  # rank 0's weights, broadcast after sharding
    # CUDA, unless train.dtype = fp32: gather parameters in bf16, reduce gradients in fp32
    bf16 = world.device.type == "cuda" and tcfg.dtype != "fp32"
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if mode == "rank0":
        _broadcast_from_rank0(model, full, world)
    else:
        _init_sharded(model, world, tcfg.seed)
    return model


def _broadcast_from_rank0(model: nn.Module, full: dict | None, world: World) -> None:
    """Give every rank its shards of rank 0's weights, and rank 0's buffers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not world.is_main:
        model.to_empty(device=world.device)
    set_model_state_dict(
        model,
        full or {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    for buf in model.buffers():  # non-persistent ones (rotary tables) are not in the state dict
        if buf.device != world.device:
            raise RuntimeError(f"buffer on {buf.device}, expected {world.device}")
        dist.broadcast(buf, src=0)
    del full


def _init_sharded(model: nn.Module, world: World, seed: int) -> None:
    """Materialize a meta-built, sharded model on the device and run its own initializer there."""
    model.to_empty(device=world.device)
    # each rank draws its own shards: the result is a valid initialization, not a one-process one
    torch.manual_seed(seed + 1_000_003 * (world.rank + 1))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message="DTensor random operators")
        if hasattr(model, "initialize_weights") and hasattr(model, "init_weights"):  # transformers
            for t in [model, *model.modules(), *model.parameters(), *model.buffers()]:
                if getattr(t, "_is_hf_initialized", False):
                    t._is_hf_initialized = False
            model.init_weights()
        elif callable(getattr(model, "init_weights", None)):
            model.init_weights()
        else:
            raise ConfigError(
                f"parallel.init = 'meta': {type(model).__name__} has no init_weights() to initialize "
                "its shards (and its buffers) after they are allocated; add one, or use parallel.init = rank0"
            )
    torch.manual_seed(seed)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global gradient norm (and clip to max_norm when it is > 0), as a plain tensor.

    Under FSDP the gradients are sharded DTensors; the norm is reduced over every rank.
    """
    params = [p for p in params if p.grad is not None]
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm


def main_rank_copy(model: nn.Module, strategy: str, world: World, build) -> nn.Module | None:
    """The trained model as a plain module on rank 0 (None on other ranks), e.g. to sample text.

    Under FSDP the weights are gathered (every rank must call this) into a fresh `build()` on the
    CPU of rank 0, then moved to its device; otherwise it is the model itself.
    """
    if strategy != "fsdp":
        return unwrap(model) if world.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    plain = build()
    plain.load_state_dict(full)
    return plain.to(world.device)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def all_reduce_mean(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world.world_size
    return t


def cpu_group(world: World):
    """A process group for small votes on CPU tensors (every rank must call this, in step):
    None (the default group) when that is gloo already, else a gloo group of every rank. A vote
    on it never waits for the device to finish its queued work, as a .item() of a CUDA tensor does.
    """
    if not world.distributed or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def any_rank(flag: bool, world: World, group=None) -> bool:
    """Whether `flag` is set on any rank (a collective; `group`: a cpu_group, so it waits for no
    device work)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def global_sum(local: int, world: World, group=None) -> int:
    """The sum of an integer over all ranks (a collective on a cpu_group, like any_rank)."""
    if not world.distributed:
        return local
    t = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.item())


def on_main_rank(world: World, fn, share: bool = False):
    """Run `fn` on rank 0 only; when it raises, every rank raises (a FlameError on the others).

    The other ranks would otherwise wait in their next collective for a rank that has left.
    Returns fn's result on rank 0, None elsewhere; with `share`, rank 0's result (picklable) on
    every rank, in the same broadcast.
    """
    result, error = None, None
    if world.is_main:
        try:
            result = fn()
        except Exception as e:  # any failure: the others must not wait for a rank that has left
            error = e
    if error is None:
        failure = None
    elif isinstance(error, FlameError):
        failure = (error.message, error.hint)
    else:
        failure = (f"{type(error).__name__}: {error}", None)
    if world.distributed:
        box = [failure, result if share and failure is None else None]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
        if share:
            result = box[1]
    if error is not None:
        raise error
    if failure is not None:
        raise FlameError(f"rank 0 stopped: {failure[0]}", failure[1])
    return result


def shutdown(world: World) -> None:
    """End the process group init_world started (not one the caller set up). Unreachable wrappers
    (DDP's reducer and its pending gloo work) are collected first: freed later, at interpreter
    exit, gloo's threads can abort the process after a finished run."""
    if world.owns_group and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()
