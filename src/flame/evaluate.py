"""Held-out evaluation: token-mean loss, perplexity and bits per byte, per held-out set.

Every number is a ratio of sums: loss = (sum of token cross-entropy in nats) / (target tokens),
bpb = (the same sum) / (ln 2 x UTF-8 bytes of the text the target tokens stand for). The sums
are taken per held-out set on each rank and added across ranks (one all-reduce of sums, never
of means), so the result does not depend on how the windows were split over ranks or passes.
With a mixture (data.mix, or every source that data.phases names), each source's `<store>/val` is
a set of its own, and the main record is their union (sum of sums / sum of counts) unless
eval.store / eval.inputs names the main set.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flame.config import Config
from flame.data.build import build_eval_sets
from flame.data.evalset import IGNORE, HeldOut
from flame.data.tokenizer import Tokenizer, token_byte_lengths
from flame.head import TokenLoss
from flame.parallel import World

_BATCH_KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens")


def _stats(loss_sum: float, tokens: float, nbytes: float) -> dict:
    loss = loss_sum / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)) if tokens else float("nan"),
        "bpb": loss_sum / (math.log(2) * nbytes) if nbytes else None,
        "tokens": int(tokens),
    }


class Evaluator:
    """Evaluates a model on fixed held-out sets; `run` gives the `kind: "eval"` records to log."""

    def __init__(
        self,
        main: HeldOut | None,
        sources: list[HeldOut],
        batch_size: int,
        world: World,
        byte_lengths: np.ndarray,
        varlen: bool = False,
    ):
        if main is None and not sources:
            raise ValueError("an Evaluator needs a held-out set")
        self.sets = ([main] if main is not None else []) + list(sources)
        self.has_main = main is not None
        self.sources = list(sources)
        self.batch_size = batch_size
        self.world = world
        self.byte_lengths = np.asarray(byte_lengths, dtype=np.int64)
        self.varlen = varlen

    def describe(self) -> str:
        """One line for the console: which held-out sets, how many windows of each."""
        parts = []
        for i, h in enumerate(self.sets):
            label = "held-out" if (i == 0 and self.has_main) else h.name
            how = "all" if h.whole else f"{h.count} spread over {h.num_windows}"
            parts.append(f"{label} {h.store.path} ({how} windows)")
        return "eval: " + "; ".join(parts)

    def sums(self, model: nn.Module, accepts: set[str], autocast=None, token_loss=None) -> np.ndarray:
        """[sets, 3] float64: (cross-entropy sum in nats, target tokens, target bytes) per held-out
        set, summed over every rank. A collective when distributed: every rank calls it.
        token_loss: the run's `flame.head.TokenLoss` (None: the logits path)."""
        token_loss = token_loss or TokenLoss()
        world, B = self.world, self.batch_size
        device = world.device
        ctx = autocast or nullcontext
        pin = device.type == "cuda"
        loss = torch.zeros(len(self.sets), dtype=torch.float64, device=device)
        counts = np.zeros((len(self.sets), 2), dtype=np.float64)  # exact: integers below 2**53
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for i, held in enumerate(self.sets):
                    for p in range(held.passes(B, world.world_size)):
                        b = held.batch(p, world.rank, world.world_size, B, self.varlen)
                        targets = b["labels"][:, 1:].numpy()
                        kept = targets[targets != IGNORE]
                        counts[i, 0] += kept.size
                        counts[i, 1] += int(self.byte_lengths[kept].sum())
                        batch = {"max_seqlen": b["max_seqlen"]} if "max_seqlen" in b else {}
                        for k in _BATCH_KEYS:
                            if k in b:
                                t = b[k].pin_memory() if pin else b[k]
                                batch[k] = t.to(device, non_blocking=pin)
                        with ctx():
                            ce = token_loss.per_token(model, batch, accepts)
                        loss[i] += ce.sum(dtype=torch.float64)
                        del ce
        finally:
            model.train(was_training)
        total = torch.cat([loss.view(-1, 1), torch.from_numpy(counts).to(device)], dim=1)
        if world.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.cpu().numpy()

    def run(self, model: nn.Module, accepts: set[str], autocast=None, step: int = 0, loss=None) -> list[dict]:
        """Evaluate every held-out set; returns the records to log, the main one first.

        autocast: a callable returning the context manager of the forward pass (None: none).
        The main record holds `sources` ({name: {loss, bpb, tokens}}) for a mixture's held-out parts.
        """
        s = self.sums(model, accepts, autocast, loss)
        srcs = s[1:] if self.has_main else s
        main = s[0] if self.has_main else srcs.sum(axis=0)
        rec = {"kind": "eval", "step": step, **_stats(*main.tolist())}
        if self.sources:
            rec["sources"] = {}
            for h, row in zip(self.sources, srcs):
                st = _stats(*row.tolist())
                rec["sources"][h.name] = {"loss": st["loss"], "bpb": st["bpb"], "tokens": st["tokens"]}
        return [rec]


def build_evaluator(cfg: Config, world: World, run_dir: Path, tok: Tokenizer, log=print) -> Evaluator | None:
    """The run's evaluator, or None when evaluation is off (no eval.interval, no eval.at_start)."""
    main, sources = build_eval_sets(cfg, world, run_dir, tok, log)
    if main is None and not sources:
        return None
    ev = Evaluator(
        main,
        sources,
        cfg.eval.batch_size or cfg.data.batch_size,
        world,
        token_byte_lengths(tok),
        varlen=cfg.data.varlen,
    )
    log(ev.describe())
    return ev


__all__ = ["Evaluator", "build_evaluator"]
