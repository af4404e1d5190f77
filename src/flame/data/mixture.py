"""Deterministic weighted mixtures of several sources, as a pure function of the sample index.

The global mixture sequence is cut into blocks of ``block`` samples. In every block source s
owns a fixed number of slots ``c_s`` (largest-remainder rounding of ``w_s * block``; they sum to
``block`` exactly and every source gets at least one). Slot p of block b sits at position
``perm_b(p)`` where ``perm_b`` is a keyed :class:`~flame.data.order.Permutation` of the block,
and slots ``[C_s, C_s + c_s)`` (``C_s`` = cumulative count) belong to source s. The sample at
position q of block b is therefore source s's sample number ``b * c_s + r``, where r is the rank
of q among s's positions in block b. Proportions hold exactly in every block, each source's
samples are numbered densely 0, 1, 2, ..., and any range of k can be computed on its own.
"""

from __future__ import annotations

import math

import numpy as np

from flame.data.order import _ROUNDS, _permute, _u64, mix64, round_keys

__all__ = ["parse_mix", "parse_named_mix", "MixtureSchedule", "largest_remainder"]

# domain separation: the block permutations never coincide with a data order of the same seed
_MIX_TAG = 0x6D69787475726521  # "mixture!"
# samples per vectorised pass when building block tables (keeps working arrays in cache)
_GROUP = 1 << 15
# a miss computes at least this many samples' worth of blocks, for cheap sequential small calls
_MIN_SPAN = 1 << 14
# ranges up to this many samples are kept for the next call
_CACHE_MAX = 1 << 17


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """``[(path, weight), ...]`` of a mixture spec (names dropped); see :func:`parse_named_mix`."""
    return [(path, w) for _, path, w in parse_named_mix(spec)]


def _name_of(entry: str) -> tuple[str | None, str]:
    """``"web=stores/web:0.7"`` -> ("web", "stores/web:0.7"); no name when the left side is a path."""
    left, eq, right = entry.partition("=")
    if eq and left.strip() and not any(c in left for c in "/\\:") and right.strip():
        return left.strip(), right.strip()
    return None, entry


def parse_named_mix(spec: str) -> list[tuple[str, str, float]]:
    """Parse ``"[name=]path_a:0.7,[name=]path_b:0.3"`` into ``[(name, path, weight), ...]``.

    Weights are normalised to sum to 1. A source is named by its ``name=`` prefix, else by its
    store directory's basename (with as many parent folders as it takes to be unique); the name
    labels its per-source loss and token share in the metrics.

    Each entry is split on its *last* colon, so a path may itself contain colons. Raises
    ValueError naming the bad entry for empty specs, missing or non-numeric weights, weights
    that are not positive and finite, empty paths and repeated paths.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty mixture spec; expected 'path_a:weight_a,path_b:weight_b,...'")
    out: list[tuple[str, float]] = []
    names: list[str | None] = []
    seen: set[str] = set()
    for i, raw in enumerate(spec.split(",")):
        name, entry = _name_of(raw.strip())
        if not entry:
            raise ValueError(f"mixture spec {spec!r}: entry {i + 1} is empty (stray comma?)")
        path, sep, wtext = entry.rpartition(":")
        path, wtext = path.strip(), wtext.strip()
        if not sep:
            raise ValueError(
                f"mixture entry {entry!r} has no weight; write it as 'path:weight', e.g. '{entry}:1'"
            )
        if not path:
            raise ValueError(f"mixture entry {entry!r} has an empty path; write it as 'path:weight'")
        try:
            w = float(wtext)
        except ValueError:
            raise ValueError(
                f"mixture entry {entry!r}: weight {wtext!r} is not a number; write it as 'path:weight'"
            ) from None
        if not math.isfinite(w) or w <= 0:
            raise ValueError(
                f"mixture entry {entry!r}: weight must be a positive finite number, got {wtext!r}"
            )
        if path in seen:
            raise ValueError(
                f"mixture spec {spec!r}: path {path!r} is listed twice; give it one combined weight"
            )
        seen.add(path)
        out.append((path, w))
        names.append(name)
    total = math.fsum(w for _, w in out)
    resolved = _default_names([p for p, _ in out], names)
    return [(n, p, w / total) for n, (p, w) in zip(resolved, out)]


def _default_names(paths: list[str], given: list[str | None]) -> list[str]:
    parts = [[x for x in p.replace("\\", "/").rstrip("/").split("/") if x not in ("", ".")] for p in paths]
    depth = 1
    while True:
        names = [g or "/".join(pp[-depth:]) or p for g, pp, p in zip(given, parts, paths)]
        if len(set(names)) == len(names) or depth > max(len(pp) for pp in parts):
            break
        depth += 1
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"mixture source name(s) {', '.join(dup)} are given twice; names must be unique")
    return names


def largest_remainder(weights: list[float] | np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to ``weights`` summing to ``total`` exactly (largest remainder).

    Ties go to the earlier source. When ``total >= len(weights)`` every source gets at least
    one: a source rounded to zero takes a unit from the currently largest count.
    """
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * total
    counts = np.floor(quota).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.lexsort((np.arange(w.size), -(quota - counts)))  # biggest remainder first
        counts[order[:short]] += 1
    if total >= w.size:
        for s in np.flatnonzero(counts == 0):
            donor = int(np.argmax(counts))  # largest count, earliest on ties; always >= 2 here
            counts[donor] -= 1
            counts[s] = 1
    assert int(counts.sum()) == total
    return counts


class MixtureSchedule:
    """Which source, and which of its samples, each global mixture sample k reads.

    ``assign(start, count)`` gives, for k in [start, start + count), the source id and the
    index n of that sample within the source's own sample sequence (0, 1, 2, ... per source).
    """

    def __init__(self, weights: list[float], seed: int, block: int = 1024):
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.size == 0:
            raise ValueError("a mixture needs at least one source")
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"mixture weights must be positive finite numbers, got {list(weights)}")
        block = int(block)
        if block < w.size:
            raise ValueError(
                f"mixture block ({block}) must be at least the number of sources ({w.size}) "
                "so that every source gets a slot in every block"
            )
        self.weights = w / w.sum()
        self.seed = int(seed)
        self.block = block
        self.counts = largest_remainder(self.weights, block)  # slots per block, per source
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])  # first slot of each source
        self._slot_src = np.repeat(np.arange(w.size, dtype=np.int64), self.counts)
        self._slot_rank = np.arange(block, dtype=np.int64) - self.starts[self._slot_src]
        self._slot_key = self._slot_src * block  # sort key offset: groups slots by source
        self._slot_count = self.counts[self._slot_src]
        self._perm_seed = int(mix64(_u64(self.seed) ^ np.uint64(_MIX_TAG))[0])
        self._cache: tuple[int, int, np.ndarray, np.ndarray] | None = None

    @property
    def num_sources(self) -> int:
        return int(self.counts.size)

    def block_positions(self, b: int) -> np.ndarray:
        """Position inside block b of each slot p (the keyed permutation of the block)."""
        keys = round_keys(self._perm_seed, int(b), _ROUNDS)
        return _permute(np.arange(self.block, dtype=np.uint64), self.block, keys)

    def _tables(self, b0: int, nb: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, n) for every position of blocks [b0, b0 + nb), flattened, int64."""
        block = self.block
        src = np.empty(nb * block, dtype=np.int64)
        num = np.empty(nb * block, dtype=np.int64)
        group = max(1, _GROUP // block)
        slots = np.arange(block, dtype=np.uint64)
        for g0 in range(0, nb, group):
            g = min(group, nb - g0)
            blocks = np.arange(b0 + g0, b0 + g0 + g, dtype=np.int64)
            keys = np.repeat(round_keys(self._perm_seed, blocks, _ROUNDS), block, axis=1)
            pos = _permute(np.tile(slots, g), block, keys).reshape(g, block)
            # sort each block's positions within each source's slot range: row entry j then holds
            # the position of source slot_src[j]'s slot_rank[j]-th slot in position order
            pos += self._slot_key
            pos.sort(axis=1)
            pos -= self._slot_key
            pos += (np.arange(g, dtype=np.int64) * block)[:, None]  # flat index into this group
            lo = g0 * block
            flat = pos.ravel()
            src[lo:][flat] = np.broadcast_to(self._slot_src, (g, block)).ravel()
            nums = blocks[:, None] * self._slot_count + self._slot_rank
            num[lo:][flat] = nums.ravel()
        return src, num

    def assign(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """For global samples k in [start, start + count): (source ids, index within source), int64."""
        start, count = int(start), int(count)
        if start < 0 or count < 0:
            raise ValueError(f"assign needs start >= 0 and count >= 0, got {start}, {count}")
        if count == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        block = self.block
        end = start + count
        cache = self._cache  # one read: safe if another thread replaces it meanwhile
        if cache is not None and cache[0] <= start and end <= cache[1]:
            lo = start - cache[0]
            return cache[2][lo : lo + count].copy(), cache[3][lo : lo + count].copy()
        b0 = start // block
        nb = max(-(-end // block) - b0, -(-_MIN_SPAN // block))
        src, num = self._tables(b0, nb)
        if nb * block <= _CACHE_MAX:
            self._cache = (b0 * block, (b0 + nb) * block, src, num)
        lo = start - b0 * block
        return src[lo : lo + count].copy(), num[lo : lo + count].copy()

    def consumed(self, k: int) -> np.ndarray:
        """How many samples of each source the first k global samples read (int64 per source)."""
        k = int(k)
        if k < 0:
            raise ValueError(f"consumed needs k >= 0, got {k}")
        b, r = divmod(k, self.block)
        out = self.counts * b
        if r:
            src, _ = self.assign(b * self.block, r)
            out += np.bincount(src, minlength=self.num_sources)
        return out

    def __repr__(self) -> str:
        w = ", ".join(f"{x:.4g}" for x in self.weights)
        return f"MixtureSchedule(weights=[{w}], seed={self.seed}, block={self.block})"
