"""Prepared mode: global sample index -> a window of `context_len` tokens of a store.

Global sample k of a store of N samples is sample perm(seed, k // N)(k % N): a stateless global
shuffle per epoch. With a mixture, k is first mapped to (source, n) by a block schedule and n is
then that source's own global sample. Which samples a rank's micro-batch holds is plain
arithmetic of (step, micro-step, rank, world, batch size) — see `micro_batch_samples`.
"""

from __future__ import annotations

import numpy as np

from flame.data.mixture import MixtureSchedule, PhasedSchedule
from flame.data.order import _u64, mix64, samples_at
from flame.data.store import TokenStore
from flame.errors import DataError

_CHUNK = 1 << 16  # samples whose locations are computed at once (vectorised permutation)
_SHIFT_TAG = 0x7368696674657021  # "shifter!": the per-epoch window offsets' own key


class SkipRanges:
    """``data.skip``: steps (1-based, as in metrics.jsonl) whose data is consumed without training,
    e.g. ``"1200-1250,3000"``. Pure arithmetic of the step: deterministic and resumable."""

    def __init__(self, spec: str = ""):
        self.spec = spec or ""
        self.ranges = parse_skip(self.spec)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __call__(self, step: int) -> bool:
        return any(a <= step <= b for a, b in self.ranges)

    def through(self, step: int) -> int:
        """How many of the steps 1..step are skipped."""
        return sum(max(0, min(b, step) - a + 1) for a, b in self.ranges)


def parse_skip(spec: str) -> list[tuple[int, int]]:
    """``"1200-1250,3000"`` -> [(1200, 1250), (3000, 3000)], sorted; ValueError naming the bad entry."""
    out = []
    for raw in (spec or "").split(","):
        part = raw.strip()
        if not part:
            continue
        a, dash, b = part.partition("-")
        try:
            lo, hi = int(a), int(b) if dash else int(a)
        except ValueError:
            raise ValueError(f"entry {part!r} is not a step or a range 'first-last' of steps") from None
        if lo < 1 or hi < lo:
            raise ValueError(f"entry {part!r}: steps count from 1 and a range's last step is >= its first")
        out.append((lo, hi))
    return sorted(out)


def micro_batch_samples(micro: int, rank: int, world: int, batch: int, accum: int) -> np.ndarray:
    """Global sample indices of micro-batch `micro` (counted on this rank) of a rank.

    Step s consumes global samples [s*G, (s+1)*G), G = batch * world * accum; micro-step a of
    rank r takes [s*G + (a*world + r)*batch, ... + batch). The set per step does not depend on
    how G is split, so a run can resume with another world size and the same G.
    """
    step, a = divmod(micro, accum)
    g = batch * world * accum
    start = step * g + (a * world + rank) * batch
    return np.arange(start, start + batch, dtype=np.int64)


class StoreSamples:
    """Samples of one store: global sample k -> token start offset in the store's stream."""

    def __init__(
        self, store: TokenStore, context_len: int, seed: int, shuffle: bool, epoch_shift: bool = False
    ):
        self.store = store
        self.context_len = context_len
        self.seed = seed
        self.shuffle = shuffle
        self.epoch_shift = epoch_shift
        self._shift_key = mix64(_u64(int(seed)) ^ _u64(_SHIFT_TAG))[0]
        self.num_samples = store.num_tokens // context_len
        if self.num_samples == 0:
            raise DataError(
                f"store {store.path} holds {store.num_tokens} tokens, fewer than one sample of {context_len}",
                hint="use a smaller --data.context_len or more data",
            )

    def starts(self, ks: np.ndarray) -> np.ndarray:
        """Token start offsets of global samples `ks` (any order, any epochs)."""
        epochs, local = samples_at(ks, self.num_samples, self.seed, self.shuffle)
        starts = local.astype(np.int64) * self.context_len
        if self.epoch_shift:
            starts += self.shifts(epochs)
            np.minimum(starts, self.store.num_tokens - self.context_len, out=starts)
        return starts

    def shifts(self, epochs: np.ndarray) -> np.ndarray:
        """Token offset of the window grid in each epoch: 0 in epoch 0, then keyed in [0, L).

        Window i of epoch e is tokens [o + i*L, o + (i+1)*L); when o exceeds the slack
        (tokens - windows*L) the last window is the stream's last L tokens instead. So an
        epoch reads every token once except its first o tokens (and the slack past the last
        window, or, when o is larger than the slack, o - slack tokens read twice)."""
        e = np.asarray(epochs, dtype=np.int64)
        o = (mix64(_u64(e) ^ self._shift_key) % np.uint64(self.context_len)).astype(np.int64)
        return np.where(e == 0, 0, o).reshape(e.shape)

    def epoch_of(self, k: int) -> int:
        return k // self.num_samples


class SampleSource:
    """Global sample k -> (store, token start), over one store or a weighted mixture."""

    def __init__(
        self,
        stores: list[TokenStore],
        weights: list[float] | None,
        context_len: int,
        seed: int,
        shuffle: bool,
        schedule: PhasedSchedule | None = None,
        epoch_shift: bool = False,
    ):
        """`stores`: one per source (None for a source no longer read: a past phase's); `schedule`
        (a phased plan) replaces `weights`."""
        self.parts = [
            StoreSamples(s, context_len, seed + 7919 * i, shuffle, epoch_shift) if s is not None else None
            for i, s in enumerate(stores)
        ]
        if schedule is None and len(stores) > 1:
            schedule = MixtureSchedule(weights, seed)
        self.schedule = schedule
        self.context_len = context_len
        self._cache_chunk = -1
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_samples(self) -> int:
        """Samples in one pass (an epoch of the first store, or of the whole mixture by weight)."""
        if self.schedule is None:
            return self.parts[0].num_samples
        return sum(p.num_samples for p in self.parts if p is not None)

    def _compute(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.schedule is None:
            return np.zeros(len(ks), np.int64), self.parts[0].starts(ks)
        src, n = self.schedule.assign(int(ks[0]), len(ks))
        starts = np.empty(len(ks), np.int64)
        for s, part in enumerate(self.parts):
            m = src == s
            if m.any():
                # a source of a past phase whose store is not open: never read from here on
                starts[m] = part.starts(n[m]) if part is not None else -1
        return src.astype(np.int64), starts

    def locate(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, token start) of contiguous global samples ks, via a chunked cache."""
        chunk = int(ks[0]) // _CHUNK
        if chunk == int(ks[-1]) // _CHUNK:
            if chunk != self._cache_chunk:
                base = chunk * _CHUNK
                self._cache = self._compute(np.arange(base, base + _CHUNK, dtype=np.int64))
                self._cache_chunk = chunk
            off = ks - chunk * _CHUNK
            return self._cache[0][off], self._cache[1][off]
        return self._compute(ks)


def varlen_fields(
    stores: list[TokenStore], src: np.ndarray, starts: np.ndarray, context_len: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """cu_seqlens (int32), position_ids and the longest segment of B windows flattened to one
    row of B*L tokens. A segment starts at every window start and every document start inside."""
    n = len(starts)
    total = n * context_len
    cuts = [np.arange(0, total + 1, context_len, dtype=np.int64)]  # window starts, and the end
    if len(stores) == 1:
        rows, offs = stores[0].inner_doc_starts(starts, context_len)
        cuts.append(rows * context_len + offs)
    else:
        for s in np.unique(src).tolist():
            m = np.nonzero(src == s)[0]
            rows, offs = stores[s].inner_doc_starts(starts[m], context_len)
            cuts.append(m[rows] * context_len + offs)
    cu = np.concatenate(cuts)
    cu.sort()
    seg_len = np.diff(cu)
    pos = np.arange(total, dtype=np.int64)
    pos -= np.repeat(cu[:-1], seg_len)
    return cu.astype(np.int32), pos, int(seg_len.max())
