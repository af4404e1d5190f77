"""Process group, device and model wrapping (DDP or FSDP2) on torch.distributed, launched by torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from flame.config import ParallelConfig, TrainConfig
from flame.errors import ConfigError


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(pcfg: ParallelConfig, tcfg: TrainConfig) -> World:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available (use --train.device cpu)")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if want_cuda else "gloo")
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return World(rank, world_size, local_rank, device)


def strategy_of(pcfg: ParallelConfig, world: World) -> str:
    if not world.distributed:
        return "none"  # one process: nothing to replicate or shard
    return "ddp" if pcfg.strategy == "auto" else pcfg.strategy


def wrap_model(model: nn.Module, strategy: str, world: World, tcfg: TrainConfig) -> nn.Module:
    """Move to the device and wrap for data parallelism; returns the module to train."""
    if tcfg.activation_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ConfigError(
                "train.activation_checkpointing: this model has no gradient_checkpointing_enable()"
            )
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if strategy == "fsdp":
        return _fsdp(model, world)
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


def _fsdp(model: nn.Module, world: World) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = model.to(world.device)
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if world.device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def all_reduce_mean(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world.world_size
    return t


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
