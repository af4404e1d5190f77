"""The loss is flame's, not the model's: logits in, token cross-entropy out.

A step's objective is (sum of per-token cross-entropy over the global batch) / (target tokens in
the global batch), whatever the masking, the micro-batch split or the number of ranks. So the
model is asked for logits only; flame shifts the labels (position t predicts token t + 1),
ignores -100 targets and reduces. This module is the logits path (the model returns [B, T, V]
logits); `flame.head` computes the same loss from the last hidden states and the output head in
chunks, so the logits never exist (model.loss = auto|fused|logits).
"""

from __future__ import annotations

import torch
from torch import nn

from flame.errors import FlameError

IGNORE = -100
# logits elements per chunk of fp32 temporaries (4 MiB: they stay in cache)
_CHUNK_ELEMS = 1 << 20


def labels_of(batch: dict) -> torch.Tensor:
    return batch["labels"] if "labels" in batch else batch["input_ids"]


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that are predicted: every label after the first position that is not -100."""
    return (labels[:, 1:] != IGNORE).sum()


def host_targets(batch: dict) -> int:
    """Target tokens of a micro-batch as a Python int, without reading a tensor where the loader
    says (`num_targets`) or nothing is masked (no `labels`: every position after the first)."""
    n = batch.get("num_targets")
    if isinstance(n, int):
        return n
    if "labels" not in batch:
        b, t = batch["input_ids"].shape
        return b * (t - 1)
    return int(target_count(batch["labels"]))


def model_logits(model: nn.Module, batch: dict, accepts: set[str]) -> torch.Tensor:
    """Logits [B, T, V] of a batch; passes only the keys the model's forward accepts, no labels."""
    return model_outputs(model, batch, accepts)[0]


def model_outputs(
    model: nn.Module, batch: dict, accepts: set[str]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits [B, T, V], the model's auxiliary loss or None): a mixture of experts with
    `output_router_logits` returns its load-balancing loss as `.aux_loss` (it adds it to its own
    loss only when given labels, which flame does not pass)."""
    kw = {"input_ids": batch["input_ids"]}
    for k in ("position_ids", "cu_seqlens", "max_seqlen"):
        if k in batch and k in accepts:
            kw[k] = batch[k]
    if "use_cache" in accepts:  # no KV cache in training: it would hold every layer's keys and values
        kw["use_cache"] = False
    try:
        out = model(**kw)
    except AssertionError as e:  # fla's chunk kernels assert their dtype (DeltaNet: no float32)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "float32" in msg or "fp32" in msg:
            raise FlameError(
                f"the model's kernels refuse float32 inputs ({msg})",
                hint="train in bf16: --train.dtype bf16 (bf16 autocast; on CUDA the default, auto)",
            ) from None
        raise
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise FlameError(
            f"the model's forward returned {type(out).__name__}, not logits of shape [batch, time, vocab]",
            hint="a custom model's forward(input_ids, ...) called without labels must return the logits "
            "(a tensor or an object with .logits); flame computes the loss",
        )
    aux = getattr(out, "aux_loss", None)
    return logits, aux if isinstance(aux, torch.Tensor) else None


def _rows_per_chunk(v: int, elems: int = _CHUNK_ELEMS) -> int:
    return max(1, elems // max(1, v))


def shifted_targets(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B*T] targets of every position: the next label, -100 after a row's last position (so the
    logits or hidden states are read as one [B*T, ...] view, never sliced into a copy)."""
    b, t = labels.shape
    shifted = torch.full((b, t), IGNORE, dtype=torch.int64, device=labels.device)
    shifted[:, :-1] = labels[:, 1:]
    return shifted.view(-1).to(device)


class _LogitsCE(torch.autograd.Function):
    """Per-row fp32 cross-entropy of materialised logits [N, V], 0 where the target is -100.

    Forward keeps only a logsumexp per row (each chunk's fp32 copy is a temporary); backward writes
    the gradient of the logits once, chunk by chunk: softmax minus the one-hot, times the row's
    incoming gradient. One read of the logits each way and no saved log-softmax, so it is cheaper
    than `F.cross_entropy` and holds one [N, V] tensor less."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, v = logits.shape
        rows = _rows_per_chunk(v)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for i in range(0, n, rows):
            lse[i : i + rows] = torch.logsumexp(logits[i : i + rows].float(), dim=-1)
        valid = targets != IGNORE
        safe = torch.where(valid, targets, 0)
        picked = logits.gather(1, safe.view(-1, 1)).view(-1).float()
        ce = torch.where(valid, lse - picked, 0.0)
        ctx.save_for_backward(logits, lse, safe, valid)
        return ce

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        logits, lse, safe, valid = ctx.saved_tensors
        n, v = logits.shape
        rows = _rows_per_chunk(v)
        w = torch.where(valid, grad_ce.float(), 0.0)
        grad = torch.empty_like(logits)
        fp32 = logits.dtype == torch.float32
        for i in range(0, n, rows):
            j = min(n, i + rows)
            x = logits[i:j]
            p = torch.sub(x, lse[i:j, None], out=grad[i:j]) if fp32 else x.float().sub_(lse[i:j, None])
            p.exp_().mul_(w[i:j, None])
            p.scatter_add_(1, safe[i:j, None], -w[i:j, None])
            if not fp32:
                grad[i:j] = p
        return grad, None


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 cross-entropy [B, T-1] of logits[:, :-1] against labels[:, 1:]; 0 where the label is -100.
    Differentiable per token."""
    b, t, v = logits.shape
    targets = shifted_targets(labels, logits.device)
    return _LogitsCE.apply(logits.reshape(-1, v), targets).view(b, t)[:, :-1]


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy (fp32 scalar) of a micro-batch."""
    return per_token_ce(logits, labels).sum()


def sample_sums(ce: torch.Tensor, labels: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (loss sum, target count) of a micro-batch of `samples` windows.

    `ce` is per_token_ce's [B, T-1]. A varlen batch is one row of B*L tokens: position t's
    target is token t + 1, which belongs to window (t + 1) // L.
    """
    valid = labels[:, 1:] != IGNORE
    if ce.shape[0] == samples:
        return ce.sum(1), valid.sum(1)
    total = ce.shape[0] * (ce.shape[1] + 1)
    length = total // samples
    owner = torch.arange(1, total, device=ce.device) // length
    sums = torch.zeros(samples, dtype=ce.dtype, device=ce.device).index_add_(0, owner, ce.reshape(-1))
    counts = torch.zeros(samples, dtype=torch.int64, device=valid.device).index_add_(
        0, owner.to(valid.device), valid.reshape(-1).long()
    )
    return sums, counts


__all__ = [
    "host_targets",
    "model_logits",
    "per_token_ce",
    "loss_sum",
    "target_count",
    "labels_of",
    "sample_sums",
]
