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
        # the last two chunks: a block of varlen boundaries may look one chunk ahead of the reads
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

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

    def _chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        cache = self._cache.get(chunk)
        if cache is None:
            base = chunk * _CHUNK
            cache = self._compute(np.arange(base, base + _CHUNK, dtype=np.int64))
            for a in cache:
                a.flags.writeable = False  # slices of it are handed out
            if len(self._cache) >= 2:
                self._cache.pop(max(self._cache, key=lambda c: abs(c - chunk)))  # the farthest
            self._cache[chunk] = cache
        return cache

    def locate(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, token start) of contiguous global samples ks, via a chunked cache."""
        chunk = int(ks[0]) // _CHUNK
        if chunk == int(ks[-1]) // _CHUNK:
            off = ks - chunk * _CHUNK
            cache = self._chunk(chunk)
            return cache[0][off], cache[1][off]
        return self._compute(ks)

    def locate_many(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`locate` of any ascending global samples: chunk by chunk from the cache."""
        chunks = ks // _CHUNK
        cuts = np.flatnonzero(chunks[1:] != chunks[:-1]) + 1
        src, starts = np.empty(len(ks), np.int64), np.empty(len(ks), np.int64)
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(ks)]):
            c = int(chunks[lo])
            cache = self._chunk(c)
            off = ks[lo:hi] - c * _CHUNK
            src[lo:hi], starts[lo:hi] = cache[0][off], cache[1][off]
        return src, starts

    def locate_range(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """`locate` of the samples start, ..., start + count - 1 (count >= 1): the sources as a new
        array, the token starts possibly a read-only view of the cache."""
        chunk = start // _CHUNK
        if chunk == (start + count - 1) // _CHUNK:
            cache = self._chunk(chunk)
            lo = start - chunk * _CHUNK
            return cache[0][lo : lo + count].copy(), cache[1][lo : lo + count]
        return self._compute(np.arange(start, start + count, dtype=np.int64))


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


class WindowReader:
    """Windows of `length` tokens at (source, start) pairs over the stores of a source, in one pass.

    The stores' shards are laid end to end in one virtual stream, so one searchsorted finds every
    window's shard, whatever source it comes from; a window is then one slice copy (of the narrow
    ids) and the batch one id check against the vocabulary. Document boundaries (varlen) come
    from the shards' document columns: one searchsorted for all windows of a one-shard store, one
    per shard when the windows share few shards, one per window otherwise (the loader asks for a
    block of micro-batches at once, so the per-call cost is paid once a block). Only public
    TokenStore methods are used, so the stores' bounded caches of open shards and document
    columns still hold.
    """

    def __init__(self, stores: list[TokenStore | None], length: int):
        self.stores = list(stores)
        self.length = int(length)
        self._open = [st for st in self.stores if st is not None]
        self._closed = [s for s, st in enumerate(self.stores) if st is None]
        self._base = np.zeros(len(self.stores), dtype=np.int64)  # store s starts at _base[s]
        offs = []
        self._owner: list[TokenStore] = []  # per virtual shard: its store, its index there, its size
        self._shard: list[int] = []
        self._size: list[int] = []
        pos = 0
        for s, st in enumerate(self.stores):
            if st is None:
                continue
            self._base[s] = pos
            offs.append(st.offsets[:-1] + pos)
            self._owner += [st] * len(st.shards)
            self._shard += range(len(st.shards))
            self._size += np.diff(st.offsets).tolist()
            pos += st.num_tokens
        self._off = np.concatenate(offs)
        self._multi = len(self._open) > 1
        self._one = len(self._off) == 1  # one store of one shard: no lookups at all
        # ids need a check only where the dtype holds ids past the vocabulary
        limits = [st.vocab_size for st in self._open if st.vocab_size < 1 << (8 * st.dtype.itemsize)]
        self._limit = min(limits) if limits else None
        self._dtype = np.result_type(*(st.dtype for st in self._open))  # holds every store's ids
        self._ramps: dict[int, np.ndarray] = {}
        self._wins: dict[int, np.ndarray] = {}
        self._lims = np.array([1, self.length], dtype=np.int64)  # documents strictly inside a window

    def where(self, src: np.ndarray, starts: np.ndarray) -> tuple[list[int], list[int]] | None:
        """Where the windows lie: (virtual shard, offset in it) of each, None for a one-shard store."""
        if self._one:
            return None
        v = starts + self._base[src] if self._multi else starts
        jv = self._off.searchsorted(v, "right") - 1
        return jv.tolist(), (v - self._off[jv]).tolist()

    @property
    def one_shard(self) -> bool:
        """One store of one shard: windows need no lookups (`where` is None)."""
        return self._one

    def read(
        self, src: np.ndarray, starts: np.ndarray, where: tuple | None = None
    ) -> tuple[np.ndarray, tuple | None]:
        """(tokens, where): tokens[r] = the window at (src[r], starts[r]) in the stores' own dtype
        (copies, checked against the vocabulary), and where the windows lie (for `cuts`; `where`
        given: what `where` returned for these windows).

        Copying the narrow ids and widening the whole batch once (an int64 copy per field) moves a
        quarter of the bytes a window-by-window int64 copy and check does."""
        for st in self._open:  # cheap: a background verification's verdict, if any
            st.raise_if_damaged()
        if self._closed and np.isin(src, self._closed).any():
            s = int(src[np.isin(src, self._closed)][0])
            raise DataError(f"a micro-batch reads mixture source {s}, whose store is not open")
        L = self.length
        if self._one:
            arr = self._owner[0].shard_tokens(0)
            out = np.concatenate([arr[lo : lo + L] for lo in starts.tolist()]).reshape(len(starts), L)
            where = None
        else:
            where = j, local = where if where is not None else self.where(src, starts)
            owner, shard, size = self._owner, self._shard, self._size
            parts = []
            for r, (i, lo) in enumerate(zip(j, local)):
                if lo + L <= size[i]:
                    parts.append(owner[i].shard_tokens(shard[i])[lo : lo + L])
                else:  # the window runs into the next shard(s)
                    parts.append(np.empty(L, dtype=self._dtype))
                    owner[i].read(int(starts[r]), parts[-1])
            out = np.concatenate(parts, dtype=self._dtype).reshape(len(starts), L)
        if self._limit is not None and len(out) and out.max() >= self._limit:
            self._bad_ids(src, starts)
        return out, where

    def _bad_ids(self, src: np.ndarray, starts: np.ndarray) -> None:
        """After a failed batch-wide id check: each store's own checked read names the bad shard."""
        for s, st in enumerate(self.stores):
            rows = np.flatnonzero(src == s)
            if st is not None and rows.size:
                st.read_windows(starts[rows], np.empty((rows.size, self.length), np.int64))

    def _ramp(self, n: int) -> np.ndarray:
        """0, 1, ..., n*L - 1 (read-only, kept per batch size)."""
        ar = self._ramps.get(n)
        if ar is None:
            ar = np.arange(n * self.length)
            ar.flags.writeable = False
            self._ramps[n] = ar
        return ar

    def _windows(self, n: int) -> np.ndarray:
        """0, L, 2L, ..., n*L: where the windows of a flattened batch start, and its end (read-only)."""
        w = self._wins.get(n)
        if w is None:
            w = np.arange(0, n * self.length + 1, self.length)
            w.flags.writeable = False
            self._wins[n] = w
        return w

    def cuts(self, starts: np.ndarray, where) -> np.ndarray:
        """Segment starts of the windows flattened to one row, then its end (sorted int64, maybe
        read-only): every window start and every document start strictly inside a window. `where`:
        what `read` returned for these windows."""
        n = len(starts)
        wins = self._windows(n)
        if where is None:  # one shard: every window's document range in one searchsorted
            col = self._owner[0].doc_column(0)
            ranges = col.searchsorted(starts[:, None] + self._lims)
            inner = np.concatenate([col[a:b] for a, b in ranges.tolist()])
            inner += np.repeat(wins[:-1] - starts, ranges[:, 1] - ranges[:, 0])  # -> position in the row
        else:
            j = np.asarray(where[0])
            order = np.argsort(j, kind="stable")
            bounds = np.flatnonzero(np.diff(j[order])) + 1
            if 4 * (len(bounds) + 1) <= n:  # few shards: one searchsorted per shard
                parts = self._grouped(starts, j, np.asarray(where[1]), order, bounds)
            else:
                parts = self._per_window(starts, where)
            inner = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if not inner.size:
            return wins
        cu = np.concatenate((wins, inner))
        cu.sort()
        return cu

    def _grouped(self, starts, j, local, order, bounds) -> list[np.ndarray]:
        """Row positions of the inner document starts, the windows taken shard by shard."""
        L, parts = self.length, []
        for rows in np.split(order, bounds):
            i = int(j[rows[0]])
            st, col = self._owner[i], self._owner[i].doc_column(self._shard[i])
            lo = local[rows]
            q = col.searchsorted(lo[:, None] + self._lims)
            cnt = q[:, 1] - q[:, 0]
            total = int(cnt.sum())
            if total:
                first = np.repeat(q[:, 0] - (cnt.cumsum() - cnt), cnt)  # each window's run in col
                parts.append(col[np.arange(total) + first] + np.repeat(rows * L - lo, cnt))
            for r in rows[lo + L > self._size[i]].tolist():  # documents of the next shard(s) inside
                s = int(starts[r])
                parts.append(st.doc_starts(int(st.offsets[self._shard[i] + 1]), s + L) + (r * L - s))
        return parts

    def _per_window(self, starts, where) -> list[np.ndarray]:
        """Row positions of the inner document starts, window by window (windows in many shards)."""
        L, parts = self.length, []
        owner, shard, size = self._owner, self._shard, self._size
        for r, (i, lo, s) in enumerate(zip(*where, starts.tolist())):
            st = owner[i]
            col = st.doc_column(shard[i])
            a, b = col.searchsorted(lo + 1), col.searchsorted(lo + L)
            if b > a:
                parts.append(col[a:b] + (r * L - lo))
            if lo + L > size[i]:  # documents of the next shard(s) inside the window
                parts.append(st.doc_starts(int(st.offsets[shard[i] + 1]), s + L) + (r * L - s))
        return parts

    def varlen(self, starts: np.ndarray, where) -> tuple[np.ndarray, np.ndarray, int]:
        """(cu_seqlens int32, position_ids int64, longest segment) of the windows flattened to one row."""
        return self.segments(self.cuts(starts, where))

    def segments(self, cu: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(cu_seqlens int32, position_ids int64, longest segment) of a row cut at `cu` (from 0 to its end)."""
        seg = cu[1:] - cu[:-1]
        pos = np.repeat(cu[:-1], seg)
        np.subtract(self._ramp(int(cu[-1]) // self.length), pos, out=pos)  # position in the segment
        return cu.astype(np.int32), pos, int(seg.max())
