"""build_loader: one rank's stream of model-ready micro-batches, with a tiny resumable state.

Prepared mode reads in the training process by default (a batch is one gather from a memmap;
moving it between processes costs more than reading it). With `num_workers > 0` the same
micro-batches come through torchdata's StatefulDataLoader, worker w making micro-batches
m = w (mod workers), so the order never depends on the worker count.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from flame.data.packed import SampleSource, micro_batch_samples, varlen_fields
from flame.data.store import TokenStore
from flame.errors import DataError

STATE_VERSION = 1


class PreparedBatches(IterableDataset):
    """Micro-batch m of one rank, as tensors; iterating yields m = start, start+1, ... forever."""

    def __init__(
        self,
        source: SampleSource,
        rank: int,
        world: int,
        batch_size: int,
        accum: int,
        varlen: bool,
        start: int = 0,
    ):
        self.source = source
        self.rank, self.world, self.batch_size, self.accum = rank, world, batch_size, accum
        self.varlen = varlen
        self.start = start
        self.L = source.context_len

    def samples(self, micro: int) -> np.ndarray:
        return micro_batch_samples(micro, self.rank, self.world, self.batch_size, self.accum)

    def batch(self, micro: int) -> dict:
        ks = self.samples(micro)
        src, starts = self.source.locate(ks)
        out = np.empty((len(ks), self.L), dtype=np.int64)
        stores = [p.store for p in self.source.parts]
        if len(stores) == 1:
            stores[0].read_windows(starts, out)
        else:
            for s in np.unique(src).tolist():
                rows = np.nonzero(src == s)[0]
                stores[s].read_windows(starts[rows], out, rows)
        batch = {"input_ids": torch.from_numpy(out), "samples": torch.from_numpy(ks)}
        if len(stores) > 1:  # which mixture source each window came from: per-source loss
            batch["source"] = torch.from_numpy(src)
        if self.varlen:
            cu, pos, longest = varlen_fields(stores, src, starts, self.L)
            flat = out.reshape(1, -1)
            labels = flat.copy()
            labels[0, cu[1:-1]] = -100  # no prediction across a boundary
            batch.update(
                input_ids=torch.from_numpy(flat),
                labels=torch.from_numpy(labels),
                position_ids=torch.from_numpy(pos).view(1, -1),
                cu_seqlens=torch.from_numpy(cu),
                max_seqlen=longest,
                num_targets=flat.size - 1 - (len(cu) - 2),  # known here: no tensor read in the step
            )
        return batch

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        m = self.start + w
        while True:
            yield self.batch(m)
            m += nw


class PreparedLoader:
    """A rank's iterator over prepared micro-batches; state = the next global sample."""

    kind = "prepared"

    def __init__(
        self,
        stores: list[TokenStore],
        weights: list[float] | None,
        context_len: int,
        seed: int,
        shuffle: bool,
        rank: int,
        world: int,
        batch_size: int,
        accum: int,
        varlen: bool = False,
        num_workers: int = 0,
        names: list[str] | None = None,
    ):
        self.source = SampleSource(stores, weights, context_len, seed, shuffle)
        self.stores = stores
        self.weights = list(weights) if weights else [1.0]
        self.source_names = list(names) if names and len(stores) > 1 else []
        self.batches = PreparedBatches(self.source, rank, world, batch_size, accum, varlen)
        self.num_workers = num_workers
        self.global_batch = batch_size * world * accum
        self.accum = accum
        self.micro = 0
        self.fingerprint = (
            "|".join(s.fingerprint() for s in stores) + f"|L{context_len}|s{seed}|{shuffle}|{weights}"
        )

    @property
    def tokens_per_micro(self) -> int:
        return self.batches.batch_size * self.source.context_len

    def __iter__(self):
        if self.num_workers == 0:
            while True:
                b = self.batches.batch(self.micro)
                self.micro += 1
                yield b
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.batches.start = self.micro
        dl = StatefulDataLoader(
            self.batches,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4,
            persistent_workers=False,
        )
        for b in dl:
            for s in self.stores:  # the background checksum runs here, not in the workers
                s.raise_if_damaged()
            self.micro += 1
            yield b

    def source_samples(self, step: int) -> np.ndarray:
        """Samples each mixture source gave the first `step` steps (all ranks): arithmetic, no state."""
        k = step * self.global_batch
        if self.source.schedule is None:
            return np.array([k], dtype=np.int64)
        return self.source.schedule.consumed(k)

    def epoch(self) -> float:
        """Passes over the data so far (fractional)."""
        return self.micro // self.accum * self.global_batch / max(1, self.source.num_samples)

    def state_dict(self) -> dict:
        if self.micro % self.accum:
            raise RuntimeError("data state is only taken between optimizer steps")
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "next_sample": self.micro // self.accum * self.global_batch,
            "global_batch": self.global_batch,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict, allow_change: bool = False) -> None:
        if state.get("kind") != self.kind or state.get("version") != STATE_VERSION:
            raise DataError(
                f"the checkpoint's data state is of kind {state.get('kind')!r}, this run reads {self.kind}"
            )
        if state["fingerprint"] != self.fingerprint and not allow_change:
            raise DataError(
                "the data (stores, context length, seed or shuffle) differs from the checkpoint's",
                hint="resume with the same data settings, or pass --checkpoint.allow_config_change true",
            )
        g = state["global_batch"]
        if g != self.global_batch:
            raise DataError(
                f"the checkpoint was taken with a global batch of {g} samples; this run has {self.global_batch} "
                "(batch_size x world x grad_accum)",
                hint=f"choose data.batch_size and train.grad_accum so that their product with the world size is {g}",
            )
        self.micro = state["next_sample"] // g * self.accum
