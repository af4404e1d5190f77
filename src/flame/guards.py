"""The NaN / spike guards' running state: which steps' updates are applied, checkpointed."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from flame.config import TrainConfig
from flame.parallel import World


class GuardState:
    """What the NaN / spike guards carry from step to step; checkpointed so a resume is exact."""

    def __init__(self) -> None:
        self.spike_mean: float | None = None
        self.consecutive_bad = 0
        self.bad_total = 0  # steps skipped so far (trainer.json keeps it as "bad_steps")

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


def step_verdict(
    guard: GuardState,
    loss_sum: torch.Tensor,
    targets: int,
    gnorm: torch.Tensor,
    world: World,
    spike_factor: float,
) -> tuple[bool, float]:
    """(apply the update?, the step's global token-mean loss): the same on every rank (one
    collective); a bad rank poisons every rank's update."""
    both = torch.stack([loss_sum.float() / max(targets, 1), gnorm.float().to(loss_sum.device)])
    if world.distributed:
        finite = torch.isfinite(both).all().float()
        packed = torch.stack([both[0], 1.0 - finite])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        loss, bad = float(packed[0]), bool(packed[1] > 0)
    else:
        loss, bad = float(both[0]), not bool(torch.isfinite(both).all())
    return guard.judge(loss, bad, spike_factor), loss


def update_allowed(
    guard: GuardState,
    tcfg: TrainConfig,
    loss_sum: torch.Tensor,
    targets: int,
    gnorm: torch.Tensor,
    world: World,
    step: int,
    say: Callable[[str], None],
) -> bool:
    """Whether step `step`'s update is applied: always without guards (train.max_bad_steps and
    train.spike_factor 0, and no collective); else the guards' verdict, a skipped step reported."""
    if not (tcfg.max_bad_steps or tcfg.spike_factor):
        return True
    ok, loss = step_verdict(guard, loss_sum, targets, gnorm, world, tcfg.spike_factor)
    if not ok:
        guard.bad_total += 1
        say(
            f"warning: step {step} skipped (loss {loss:.4g}, grad norm {float(gnorm):.4g}); "
            f"{guard.consecutive_bad} bad step(s) in a row"
        )
    return ok


def weights_finite(model: torch.nn.Module, world: World) -> bool:
    """Whether every weight on every rank is finite (a collective): a NaN model is not saved."""
    bad = torch.zeros((), device=world.device)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # FSDP: this rank's shard
        bad += (~torch.isfinite(local.detach())).sum().float()
    if world.distributed:
        dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    return not bool(bad)
