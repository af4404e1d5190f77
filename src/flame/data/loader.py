"""build_loader: one rank's stream of model-ready micro-batches, with a tiny resumable state.

Prepared mode reads in the training process by default (a batch is one gather from a memmap;
moving it between processes costs more than reading it). With `num_workers > 0` the same
micro-batches come through torchdata's StatefulDataLoader, worker w making micro-batches
m = w (mod workers), so the order never depends on the worker count.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from flame.data.mixture import DataPlan, PhasedSchedule, parse_named_mix
from flame.data.packed import SampleSource, WindowReader, micro_batch_samples
from flame.data.store import TokenStore
from flame.errors import DataError

if TYPE_CHECKING:
    from flame.config import Config

STATE_VERSION = 1
PLAN_FILE = "data_plan.json"
# window locations and varlen boundaries are found for this many micro-batches at once (at most
# BLOCK_TOKENS tokens' worth)
BLOCK_MICRO = 256
BLOCK_TOKENS = 1 << 22


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
        self.reader = (
            WindowReader([p.store if p is not None else None for p in source.parts], source.context_len)
            if source is not None
            else None
        )
        self.rank, self.world, self.batch_size, self.accum = rank, world, batch_size, accum
        self.varlen = varlen
        self.start = start
        self.L = source.context_len if source is not None else 0
        self.stride = 1  # micro-batches m, m + stride, ... are read in turn (one loader worker's)
        self._blk: tuple | None = None

    def set_reader(self, source: SampleSource, reader: WindowReader) -> None:
        self.source, self.reader, self.L = source, reader, source.context_len
        self._blk = None

    def _block(self, micro: int) -> tuple[int, tuple]:
        """(position of `micro` in its block, the block): where the windows of the micro-batches
        read next lie in the stores, and their varlen segment starts, found for a block of them at
        once. A batch then takes slices of the block instead of a dozen small numpy calls; the
        values are those `reader.where` / `reader.cuts` give for the batch alone."""
        c, B, L, stride = self._blk, self.batch_size, self.L, self.stride
        if c is None or not (c[2] == stride and c[0] <= micro < c[1] and (micro - c[0]) % stride == 0):
            count = max(1, min(BLOCK_MICRO, BLOCK_TOKENS // (B * L)))
            ms = np.arange(micro, micro + count * stride, stride, dtype=np.int64)
            step, a = np.divmod(ms, self.accum)  # micro_batch_samples of every m at once
            first = step * (B * self.world * self.accum) + (a * self.world + self.rank) * B
            src, starts = self.source.locate_many((first[:, None] + np.arange(B)).ravel())
            where = self.reader.where(src, starts)
            ptr = cu = None
            if self.varlen:
                cu = self.reader.cuts(starts, where)
                ptr = cu.searchsorted(np.arange(0, len(starts) + 1, B) * L).tolist()  # each batch's first cut
            c = self._blk = (micro, micro + count * stride, stride, where, ptr, cu)
        return (micro - c[0]) // stride, c

    def _where(self, micro: int) -> tuple | None:
        k, c = self._block(micro)
        B = self.batch_size
        return None if c[3] is None else (c[3][0][k * B : (k + 1) * B], c[3][1][k * B : (k + 1) * B])

    def _cuts(self, micro: int) -> np.ndarray:
        k, c = self._block(micro)
        ptr, cu = c[4], c[5]
        return cu[ptr[k] : ptr[k + 1] + 1] - k * self.batch_size * self.L

    def samples(self, micro: int) -> np.ndarray:
        return micro_batch_samples(micro, self.rank, self.world, self.batch_size, self.accum)

    def batch(self, micro: int) -> dict:
        ks = self.samples(micro)
        src, starts = self.source.locate_range(int(ks[0]), len(ks))
        blocked = self.varlen or not self.reader.one_shard  # a flat one-shard read needs no lookups
        tokens, _ = self.reader.read(src, starts, self._where(micro) if blocked else None)
        out = tokens.astype(np.int64)
        if not self.varlen:
            batch = {"input_ids": torch.from_numpy(out), "samples": torch.from_numpy(ks)}
        else:
            cu, pos, longest = self.reader.segments(self._cuts(micro))
            flat = out.reshape(1, -1)
            labels = tokens.astype(np.int64).reshape(1, -1)  # from the narrow ids: a quarter of the reads
            labels[0, cu[1:-1]] = -100  # no prediction across a boundary
            batch = {
                "input_ids": torch.from_numpy(flat),
                "samples": torch.from_numpy(ks),
                "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(pos.reshape(1, -1)),
                "cu_seqlens": torch.from_numpy(cu),
                "max_seqlen": longest,
                "num_targets": flat.size - 1 - (len(cu) - 2),  # known here: no tensor read in the step
            }
        if len(self.source.parts) > 1:  # which mixture source each window came from: per-source loss
            batch["source"] = torch.from_numpy(src)
        return batch

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        self.stride = nw
        m = self.start + w
        while True:
            yield self.batch(m)
            m += nw


class PreparedLoader:
    """A rank's iterator over prepared micro-batches; state = the next global sample."""

    kind = "prepared"

    def __init__(
        self,
        stores: list[TokenStore | None],
        *,
        context_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
        accum: int = 1,
        weights: list[float] | None = None,
        names: list[str] | None = None,
        plan: DataPlan | None = None,
        varlen: bool = False,
        num_workers: int = 0,
        epoch_shift: bool = False,
    ):
        """`batch_size` windows of `context_len` tokens per micro-batch, `accum` micro-batches per
        step on each of `world` ranks. `weights` / `names` make a mixture of `stores`; a `plan`
        (phases over named sources, `stores` aligned with its sources, None for one not read any
        more) replaces them."""
        self.context_len, self.seed, self.shuffle, self.epoch_shift = context_len, seed, shuffle, epoch_shift
        self.global_batch = batch_size * world * accum
        self.accum = accum
        self.micro = 0
        self.num_workers = num_workers
        self._legacy = plan is None and not epoch_shift  # the fingerprint of runs before data plans
        if plan is None:
            if names is None or len(names) != len(stores):
                paths = [str(s.path) for s in stores]
                names = [n for n, _, _ in parse_named_mix(",".join(f"{p}:1" for p in paths))]
            ws = list(weights) if weights else [1.0] * len(stores)
            plan = DataPlan(
                [{"name": n, "path": str(s.path)} for n, s in zip(names, stores)],
                [{"start_step": 0, "mix": dict(zip(names, ws))}],
            )
        self.batches = PreparedBatches(None, rank, world, batch_size, accum, varlen)  # source: below
        self._set_plan(plan, stores)
        self._legacy_weights = weights

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        stores: list[TokenStore | None],
        *,
        rank: int,
        world: int,
        weights: list[float] | None = None,
        names: list[str] | None = None,
        plan: DataPlan | None = None,
        epoch_shift: bool | None = None,
        num_workers: int | None = None,
    ) -> PreparedLoader:
        """The loader of rank `rank` of `world` that `cfg`'s data and train sections describe.
        `epoch_shift` / `num_workers` replace the config's (a saved plan records the former)."""
        d = cfg.data
        return cls(
            stores,
            context_len=d.context_len,
            batch_size=d.batch_size,
            seed=d.seed,
            shuffle=d.shuffle,
            rank=rank,
            world=world,
            accum=cfg.train.grad_accum,
            weights=weights,
            names=names,
            plan=plan,
            varlen=d.varlen,
            num_workers=d.num_workers if num_workers is None else num_workers,
            epoch_shift=d.epoch_shift if epoch_shift is None else bool(epoch_shift),
        )

    def reset(self) -> None:
        """Back to the first micro-batch (step 0), as a fresh loader."""
        self.micro = 0

    def seek(self, step: int) -> None:
        """Continue at the first micro-batch of 0-based optimizer step `step` (that many steps read)."""
        if step < 0:
            raise ValueError(f"seek needs a step >= 0, got {step}")
        self.micro = int(step) * self.accum

    def _set_plan(self, plan: DataPlan, stores: list) -> None:
        self.plan = plan
        self.stores = list(stores)
        for src, st in zip(plan.sources, stores):
            if st is not None:
                src["fingerprint"] = st.fingerprint()
        schedule = None
        if len(stores) > 1:
            starts, weights = plan.segments(self.global_batch)
            schedule = PhasedSchedule(starts, weights, self.seed)
        self.source = SampleSource(
            stores,
            None,
            self.context_len,
            self.seed,
            self.shuffle,
            schedule=schedule,
            epoch_shift=self.epoch_shift,
        )
        self.batches.set_reader(self.source, WindowReader(self.stores, self.context_len))
        self.source_names = plan.names if len(stores) > 1 else []

    @property
    def weights(self) -> list[float]:
        """Target share of each source in the step last read (the current phase, or ramp piece)."""
        if self.source.schedule is None:
            return [1.0]
        k = max(0, self.micro // self.accum * self.global_batch - 1)
        return self.source.schedule.weights_at(k).tolist()

    @property
    def fingerprint(self) -> str:
        fps = "|".join(s.get("fingerprint", "") for s in self.plan.sources)
        base = f"{fps}|L{self.context_len}|s{self.seed}|{self.shuffle}"
        if self._legacy and len(self.plan.phases) == 1:
            return base + f"|{self._legacy_weights}"
        return base + f"|shift{self.epoch_shift}"

    def phase_of(self, step: int) -> str:
        """The phase of the 1-based `step`, in words."""
        return self.plan.describe_phase(step)

    def save_plan(self, run_dir: str | Path) -> Path:
        """Write the plan to <run_dir>/data_plan.json (what `flame inspect` reconstructs from)."""
        path = Path(run_dir) / PLAN_FILE
        tmp = path.with_suffix(".tmp")
        body = {
            **self.plan.to_dict(),
            "global_batch": self.global_batch,
            "context_len": self.context_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch_shift": self.epoch_shift,
        }
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        tmp.replace(path)
        return path

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

        from flame.data.order import ignore_stop_signals

        self.batches.start = self.micro
        dl = StatefulDataLoader(
            self.batches,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4,
            persistent_workers=False,
            worker_init_fn=functools.partial(ignore_stop_signals, main_pid=os.getpid()),
        )
        for b in dl:
            for s in self.stores:  # the background checksum runs here, not in the workers
                if s is not None:
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
            "plan": self.plan.to_dict(),
            "settings": self._settings(),
        }

    def _settings(self) -> dict:
        return {
            "context_len": self.context_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch_shift": self.epoch_shift,
        }

    def load_state_dict(self, state: dict, allow_change: bool = False) -> None:
        if state.get("kind") != self.kind or state.get("version") != STATE_VERSION:
            raise DataError(
                f"the checkpoint's data state is of kind {state.get('kind')!r}, this run reads {self.kind}"
            )
        g = state["global_batch"]
        if g != self.global_batch:
            raise DataError(
                f"the checkpoint was taken with a global batch of {g} samples; this run has {self.global_batch} "
                "(batch_size x world x grad_accum)",
                hint=f"choose data.batch_size and train.grad_accum so that their product with the world size is {g}",
            )
        if "plan" in state:
            self._continue_plan(state, allow_change)
        elif state["fingerprint"] != self.fingerprint and not allow_change:
            raise DataError(
                "the data (stores, context length, seed or shuffle) differs from the checkpoint's",
                hint="resume with the same data settings, or pass --checkpoint.allow_config_change true",
            )
        self.micro = state["next_sample"] // g * self.accum

    def _continue_plan(self, state: dict, allow_change: bool) -> None:
        """Resume under the saved plan: what would rewrite the past (data settings, a source's
        content) is refused; a changed mixture or a new source becomes a new phase at this step."""
        saved = DataPlan.from_dict(state["plan"])
        step = state["next_sample"] // state["global_batch"]
        problems = []
        for key, was in (state.get("settings") or {}).items():
            now = self._settings().get(key)
            if now != was:
                problems.append(f"data.{key}: {was!r} in the checkpoint, {now!r} now")
        mine = {s["name"]: (s, st) for s, st in zip(self.plan.sources, self.stores)}
        by_path = {s["path"]: s["name"] for s in saved.sources}
        for s in saved.sources:
            if s["name"] in mine and mine[s["name"]][0].get("fingerprint") != s.get("fingerprint"):
                problems.append(
                    f"source {s['name']}: its store's content differs from the checkpoint's "
                    f"({mine[s['name']][0]['path']})"
                )
        for s in self.plan.sources:
            old = by_path.get(s["path"])
            if old is not None and old != s["name"]:
                problems.append(f"store {s['path']} was source {old!r} and is named {s['name']!r} now")
        if problems and not allow_change:
            raise DataError(
                "resuming would rewrite the data of the steps already trained:\n    "
                + "\n    ".join(problems),
                hint="resume with the checkpoint's data settings and stores (a changed mixture is fine: it "
                "becomes a new phase), start a new --train.run_dir, or pass --checkpoint.allow_config_change true",
            )
        plan = saved.continued(self.plan, step)
        stores = [mine[n][1] if n in mine else None for n in plan.names]
        for src, old in zip(plan.sources, saved.sources):  # sources no longer read keep their record
            if src.get("fingerprint") is None and old.get("fingerprint"):
                src["fingerprint"] = old["fingerprint"]
        self._set_plan(plan, stores)
