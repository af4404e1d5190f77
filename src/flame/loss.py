"""The loss is flame's, not the model's: logits in, token cross-entropy out.

A step's objective is (sum of per-token cross-entropy over the global batch) / (target tokens in
the global batch), whatever the masking, the micro-batch split or the number of ranks. So the
model is asked for logits only; flame shifts the labels (position t predicts token t + 1),
ignores -100 targets and reduces. Large vocabularies are handled in chunks of positions whose
fp32 upcast is recomputed in the backward pass instead of kept, so no full fp32 copy of the
logits outlives its chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flame.errors import FlameError

IGNORE = -100
# logits elements per chunk (about 64 MiB of fp32): below it one chunk, no recomputation
_CHUNK_ELEMS = 1 << 24


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
    out = model(**kw)
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


def _ce_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 cross-entropy [B, T-1] of logits[:, :-1] against labels[:, 1:]; 0 where the label is -100."""
    b, t, v = logits.shape
    # every position against the next label, the last one against nothing (-100): a view of the
    # logits, where slicing off the last position would copy them whenever b > 1
    flat = logits.reshape(-1, v)
    shifted = torch.full((b, t), IGNORE, dtype=labels.dtype, device=labels.device)
    shifted[:, :-1] = labels[:, 1:]
    targets = shifted.view(-1).to(flat.device)
    n = flat.shape[0]
    rows = max(1, _CHUNK_ELEMS // max(1, v))
    if n <= rows:
        return _ce_rows(flat, targets).view(b, t)[:, :-1]
    spans = [(flat[i : i + rows], targets[i : i + rows]) for i in range(0, n, rows)]
    if torch.is_grad_enabled() and flat.requires_grad:  # keep the chunk's input, not its fp32 copy
        parts = [checkpoint(_ce_rows, x, y, use_reentrant=False) for x, y in spans]
    else:
        parts = [_ce_rows(x, y) for x, y in spans]
    return torch.cat(parts).view(b, t)[:, :-1]


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
