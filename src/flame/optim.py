"""The optimizer (AdamW, or Muon for the hidden matrices beside AdamW) and learning-rate schedules
(warmup, then cosine / linear / constant / warmup-stable-decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from flame.config import OptimConfig

# Roles of MuonAdamW's parameter groups (each group says its own: it is saved with the optimizer)
MUON, DECAY, NO_DECAY = "muon", "decay", "no_decay"


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device, say=None
) -> torch.optim.Optimizer:
    """AdamW (norms, biases and other 1-d weights get no weight decay); with optim.name = muon, a
    MuonAdamW: Muon on the hidden matrices, AdamW on the rest. The split is said once (rank 0)."""
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "true"
    split = param_split(model, muon=cfg.name == "muon")
    if cfg.name == "muon":
        opt: torch.optim.Optimizer = MuonAdamW(split, cfg, fused)
    else:
        groups = [
            {"params": [p for _, p in split[DECAY]], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in split[NO_DECAY]], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
        )
    opt.flame_split = split_summary(split, cfg.name)  # type: ignore[attr-defined]
    if say is None:
        say = _say_on_rank0
    say(split_line(opt.flame_split))  # type: ignore[attr-defined]
    return opt


def _say_on_rank0(msg: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def _unwrapped(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # DDP
    return inner if isinstance(inner, nn.Module) else model


def _module_params(m) -> set[int]:
    return {id(p) for p in m.parameters()} if isinstance(m, nn.Module) else set()


def param_split(model: nn.Module, muon: bool = True) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """{role: [(name, parameter)]} of the trainable parameters, in model order.

    muon: the hidden matrices -- 2-d, and not an embedding (any nn.Embedding, the input
    embeddings) nor the output head (get_output_embeddings(), tied or not). decay: every other
    parameter of 2 or more dimensions (embeddings, the head, conv kernels, stacked experts).
    no_decay: 1-d and 0-d (norms, biases). Without `muon`, the hidden matrices go to decay.
    The shapes are the whole matrices' (an FSDP2 shard is a DTensor of the full shape)."""
    m = _unwrapped(model)
    outside: set[int] = set()
    for sub in m.modules():
        if isinstance(sub, nn.Embedding):
            outside |= _module_params(sub)
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(m, getter, None)
        if callable(fn):
            try:
                outside |= _module_params(fn())
            except (NotImplementedError, AttributeError):
                pass
    out: dict[str, list[tuple[str, torch.Tensor]]] = {MUON: [], DECAY: [], NO_DECAY: []}
    for name, p in m.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            out[NO_DECAY].append((name, p))
        elif muon and p.dim() == 2 and id(p) not in outside:
            out[MUON].append((name, p))
        else:
            out[DECAY].append((name, p))
    return out


def split_summary(split: dict, name: str) -> dict:
    """What starts.jsonl records of the split: tensors and parameters per optimizer."""
    if name == "muon":
        parts = {"muon": split[MUON], "adamw": split[DECAY] + split[NO_DECAY]}
    else:
        parts = {"adamw": split[MUON] + split[DECAY] + split[NO_DECAY]}
    rec: dict = {"name": name}
    for k, items in parts.items():
        rec[k] = {"tensors": len(items), "parameters": sum(p.numel() for _, p in items)}
    if name == "muon":
        rec["adamw_names"] = [n for n, _ in split[DECAY]]  # the matrices kept off Muon
    return rec


def split_line(rec: dict) -> str:
    if rec["name"] != "muon":
        a = rec["adamw"]
        return f"optimizer: adamw on all {a['tensors']} tensors ({a['parameters']:,} parameters)"
    m, a = rec["muon"], rec["adamw"]
    kept = ", ".join(rec["adamw_names"]) or "none"
    return (
        f"optimizer: muon on {m['tensors']} hidden matrices ({m['parameters']:,} parameters); adamw on "
        f"{a['tensors']} tensors ({a['parameters']:,} parameters: 2-d or larger {kept}; the rest 1-d)"
    )


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the hidden matrices and torch.optim.AdamW on the rest, as one optimizer
    (one param_groups list for the schedule, one state for checkpoints; each group's "role" says
    which). Both do their own step; they share this optimizer's state and groups.

    Under FSDP2 a parameter is a DTensor shard, and an orthogonalized update of a shard is not the
    shard of the matrix's: the momentum buffer stays sharded (an elementwise update), the update is
    gathered whole (DTensor.full_tensor), orthogonalized identically on every rank with torch's
    Newton-Schulz, and each rank applies its own shard of it. The weights then equal one process's
    up to floating-point summation order (tests/test_optim.py)."""

    def __init__(self, split: dict, cfg: OptimConfig, fused: bool = False):
        from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS

        muon = [{"params": [p for _, p in split[MUON]], "role": MUON}] if split[MUON] else []
        adamw = [
            {"params": [p for _, p in split[role]], "role": role, "weight_decay": wd}
            for role, wd in ((DECAY, cfg.weight_decay), (NO_DECAY, 0.0))
            if split[role]
        ]
        # the inner optimizers validate and fill in their groups' defaults (in place)
        self._muon = (
            torch.optim.Muon(
                muon, ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), eps=EPS, **muon_options(cfg)
            )
            if muon
            else None
        )
        self._adamw = (
            torch.optim.AdamW(
                adamw, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
            )
            if adamw
            else None
        )
        super().__init__(muon + adamw, {})

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (load_state_dict replaces both)."""
        for inner, roles in ((self._muon, (MUON,)), (self._adamw, (DECAY, NO_DECAY))):
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["role"] in roles]
                inner.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._link()
        if self._adamw is not None:
            self._adamw.step()
        if self._muon is not None:
            if any(_is_dtensor(p) for g in self._muon.param_groups for p in g["params"]):
                self._sharded_muon_step()
            else:
                self._muon.step()
        return loss

    def _sharded_muon_step(self) -> None:
        """torch.optim.Muon's step (torch.optim._muon._single_tensor_muon) on DTensor shards: the
        update gathered whole for Newton-Schulz, then this rank's shard of it applied."""
        from torch.distributed.tensor import distribute_tensor
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        for group in self._muon.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                update = p.grad.lerp(buf, mom) if group["nesterov"] else buf
                whole = update.full_tensor() if _is_dtensor(update) else update
                ortho = _zeropower_via_newtonschulz(
                    whole, group["ns_coefficients"], group["ns_steps"], group["eps"]
                ).to(p.dtype)
                if _is_dtensor(p):  # every rank holds the same whole update: each keeps its shard
                    ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))


def muon_options(cfg: OptimConfig) -> dict:
    """The Muon groups' settings from the config (at build, and again after a resume)."""
    return dict(
        lr=cfg.muon_lr,
        weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps,
        adjust_lr_fn=cfg.muon_adjust_lr,
    )


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def group_roles(opt: torch.optim.Optimizer) -> list[str]:
    """The role of each of build_optimizer's param groups (AdamW's: matrices first, then the rest)."""
    if isinstance(opt, MuonAdamW):
        return [g["role"] for g in opt.param_groups]
    return [DECAY, NO_DECAY][: len(opt.param_groups)]


def apply_config(opt: torch.optim.Optimizer, cfg: OptimConfig) -> list[float]:
    """Set every group's hyperparameters from the config (after a resume the saved ones would win);
    returns each group's peak lr."""
    peaks = []
    for g, role in zip(opt.param_groups, group_roles(opt)):
        if role == MUON:
            g.update(muon_options(cfg))
        else:
            g.update(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
            if role == DECAY:
                g["weight_decay"] = cfg.weight_decay
        peaks.append(g["lr"])
    return peaks


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based) of `total` steps."""
    warm = min(cfg.warmup_steps, max(total - 1, 0))
    if step < warm:
        return (step + 1) / (warm + 1)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total))
        start = total - decay_steps
        if step < start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - start + 1) / decay_steps)
    progress = min(1.0, (step - warm) / max(1, total - warm - 1))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Every group's lr follows its own peak (optim.lr, or optim.muon_lr) times lr_factor."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
