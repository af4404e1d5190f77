"""Prepared mode: global sample index -> a window of `context_len` tokens of a store.

Global sample k of a store of N samples is sample perm(seed, k // N)(k % N): a stateless global
shuffle per epoch. With a mixture, k is first mapped to (source, n) by a block schedule and n is
then that source's own global sample. Which samples a rank's micro-batch holds is plain
arithmetic of (step, micro-step, rank, world, batch size) — see `micro_batch_samples`.
"""

from __future__ import annotations

import numpy as np

from flame.data.mixture import MixtureSchedule
from flame.data.order import samples_at
from flame.data.store import TokenStore
from flame.errors import DataError

_CHUNK = 1 << 16  # samples whose locations are computed at once (vectorised permutation)


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

    def __init__(self, store: TokenStore, context_len: int, seed: int, shuffle: bool):
        self.store = store
        self.context_len = context_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_samples = store.num_tokens // context_len
        if self.num_samples == 0:
            raise DataError(
                f"store {store.path} holds {store.num_tokens} tokens, fewer than one sample of {context_len}",
                hint="use a smaller --data.context_len or more data",
            )

    def starts(self, ks: np.ndarray) -> np.ndarray:
        """Token start offsets of global samples `ks` (any order, any epochs)."""
        _, local = samples_at(ks, self.num_samples, self.seed, self.shuffle)
        return local.astype(np.int64) * self.context_len

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
    ):
        self.parts = [StoreSamples(s, context_len, seed + 7919 * i, shuffle) for i, s in enumerate(stores)]
        self.schedule = MixtureSchedule(weights, seed) if len(stores) > 1 else None
        self.context_len = context_len
        self._cache_chunk = -1
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_samples(self) -> int:
        """Samples in one pass (an epoch of the first store, or of the whole mixture by weight)."""
        if self.schedule is None:
            return self.parts[0].num_samples
        return sum(p.num_samples for p in self.parts)

    def _compute(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.schedule is None:
            return np.zeros(len(ks), np.int64), self.parts[0].starts(ks)
        src, n = self.schedule.assign(int(ks[0]), len(ks))
        starts = np.empty(len(ks), np.int64)
        for s, part in enumerate(self.parts):
            m = src == s
            if m.any():
                starts[m] = part.starts(n[m])
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
