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

__all__ = [
    "parse_mix",
    "parse_named_mix",
    "MixtureSchedule",
    "PhasedSchedule",
    "DataPlan",
    "largest_remainder",
]

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

    def assign(self, start: int, count: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For global samples k in [start, start + count): (source ids, index within source), int64.

        A miss computes whole blocks, some ahead for the next call; `limit` (a phase's end: no
        sample at or past it is asked for) stops that read-ahead there."""
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
        need = -(-end // block) - b0
        ahead = -(-_MIN_SPAN // block)
        if limit is not None:
            ahead = min(ahead, -(-int(limit) // block) - b0)
        nb = max(need, ahead)
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


# ---------------------------------------------------------------- phases: the mix as a function of the plan

# at most this many constant pieces make up a linear ramp (each a whole number of blocks)
RAMP_PIECES = 64


def _segment_seed(seed: int, i: int) -> int:
    """Seed of segment i's block permutations; segment 0 keeps the run's seed (a one-phase plan is
    exactly the plain :class:`MixtureSchedule`)."""
    return int(seed) if i == 0 else int(mix64(_u64(int(seed)) ^ _u64(i * 0x9E3779B97F4A7C15))[0] >> 1)


class PhasedSchedule:
    """A mixture whose weights change at given global samples: segment i covers samples
    ``[starts[i], starts[i + 1])`` with weights ``weights[i]`` over all sources (0 = not read).

    Within a segment the block rule of :class:`MixtureSchedule` holds, blocks counted from the
    segment start. Source s's samples continue across segments: at the start of segment i its
    counter is the samples it read in the earlier segments (whole blocks x its slots per block,
    plus the partial last block), so ``assign`` and ``consumed`` stay pure functions of k.
    """

    def __init__(self, starts: list[int], weights: list[list[float]], seed: int, block: int = 1024):
        if not starts or int(starts[0]) != 0:
            raise ValueError("the first mixture segment must start at sample 0")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"mixture segment starts must increase, got {list(starts)}")
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[0] != len(starts):
            raise ValueError("one weight vector per segment is needed")
        self.num_sources = int(w.shape[1])
        self.starts = np.asarray(starts, dtype=np.int64)
        self.block = int(block)
        self.seed = int(seed)
        self.active: list[np.ndarray] = []
        self.parts: list[MixtureSchedule] = []
        for i, row in enumerate(w):
            act = np.flatnonzero(row > 0)
            if act.size == 0:
                raise ValueError(f"mixture segment {i} gives no source a positive weight")
            self.active.append(act)
            self.parts.append(MixtureSchedule(row[act], _segment_seed(seed, i), block))
        self.weights = np.zeros_like(w)
        for i, (act, part) in enumerate(zip(self.active, self.parts)):
            self.weights[i, act] = part.weights
        # per-source counters at each segment start: arithmetic over the earlier segments
        self.offsets = np.zeros((len(starts), self.num_sources), dtype=np.int64)
        for i in range(1, len(starts)):
            used = self.parts[i - 1].consumed(int(self.starts[i] - self.starts[i - 1]))
            self.offsets[i] = self.offsets[i - 1]
            self.offsets[i, self.active[i - 1]] += used

    def segment_of(self, k: int) -> int:
        return int(np.searchsorted(self.starts, int(k), side="right")) - 1

    def weights_at(self, k: int) -> np.ndarray:
        """The target share of each source at global sample k."""
        return self.weights[self.segment_of(k)].copy()

    def assign(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """For global samples k in [start, start + count): (source ids, index within source), int64."""
        start, count = int(start), int(count)
        if start < 0 or count < 0:
            raise ValueError(f"assign needs start >= 0 and count >= 0, got {start}, {count}")
        src = np.empty(count, dtype=np.int64)
        num = np.empty(count, dtype=np.int64)
        k, end = start, start + count
        i = self.segment_of(start) if count else 0
        while k < end:
            seg_end = int(self.starts[i + 1]) if i + 1 < len(self.starts) else end
            hi = min(end, seg_end)
            limit = seg_end - int(self.starts[i]) if i + 1 < len(self.starts) else None
            s, n = self.parts[i].assign(k - int(self.starts[i]), hi - k, limit)
            s = self.active[i][s]
            src[k - start : hi - start] = s
            num[k - start : hi - start] = n + self.offsets[i][s]
            k, i = hi, i + 1
        return src, num

    def consumed(self, k: int) -> np.ndarray:
        """How many samples of each source the first k global samples read (int64 per source)."""
        k = int(k)
        if k < 0:
            raise ValueError(f"consumed needs k >= 0, got {k}")
        i = self.segment_of(k)
        out = self.offsets[i].copy()
        out[self.active[i]] += self.parts[i].consumed(k - int(self.starts[i]))
        return out

    def __repr__(self) -> str:
        return f"PhasedSchedule(segments={len(self.parts)}, sources={self.num_sources}, seed={self.seed})"


def _canon_mix(mix: dict[str, float]) -> dict[str, float]:
    total = math.fsum(mix.values())
    return {n: float(w) / total for n, w in mix.items()}


class DataPlan:
    """The run's data plan: named sources (name, store path) and phases, each a start step, weights
    over source names and an optional linear ramp (``ramp_steps``) from the previous phase's
    weights. Saved in the checkpoint's data state and as ``<run_dir>/data_plan.json``."""

    def __init__(self, sources: list[dict], phases: list[dict]):
        self.sources = [dict(s) for s in sources]
        self.phases = [
            {
                "start_step": int(p["start_step"]),
                "mix": _canon_mix(dict(p["mix"])),
                "ramp_steps": int(p.get("ramp_steps", 0)),
                **({"origin": p["origin"]} if p.get("origin") else {}),
            }
            for p in phases
        ]
        starts = [p["start_step"] for p in self.phases]
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"phases must start at step 0 and then at increasing steps, got {starts}")
        names = [s["name"] for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data plan: source names repeat: {names}")
        for p in self.phases:
            unknown = set(p["mix"]) - set(names)
            if unknown:
                raise ValueError(
                    f"data plan: phase at step {p['start_step']} names unknown source(s) {sorted(unknown)}"
                )

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.sources]

    @classmethod
    def from_specs(cls, phases: list[dict]) -> DataPlan:
        """From phases whose ``mix`` is a spec string of :func:`parse_named_mix` (start_step set)."""
        sources: list[dict] = []
        by_name: dict[str, str] = {}
        out = []
        for p in phases:
            mix = {}
            for name, path, w in parse_named_mix(p["mix"]):
                if name in by_name and by_name[name] != path:
                    raise ValueError(
                        f"source {name!r} names {by_name[name]!r} in one phase and {path!r} in another; "
                        "give each store one name"
                    )
                if name not in by_name:
                    by_name[name] = path
                    sources.append({"name": name, "path": path})
                mix[name] = w
            out.append({**p, "mix": mix})
        paths = [s["path"] for s in sources]
        dup = sorted({p for p in paths if paths.count(p) > 1})
        if dup:
            raise ValueError(f"store(s) {', '.join(dup)} appear under two names; give each store one name")
        return cls(sources, out)

    def to_dict(self) -> dict:
        return {"sources": [dict(s) for s in self.sources], "phases": [dict(p) for p in self.phases]}

    @classmethod
    def from_dict(cls, d: dict) -> DataPlan:
        return cls(d["sources"], d["phases"])

    def weight_vector(self, mix: dict[str, float]) -> list[float]:
        return [float(mix.get(n, 0.0)) for n in self.names]

    def segments(self, global_batch: int, block: int = 1024) -> tuple[list[int], list[list[float]]]:
        """Segment starts (global samples) and weights: a phase, or a ramp cut into at most
        RAMP_PIECES constant pieces of whole blocks (piece j of P at weight fraction (j + 0.5) / P)."""
        G = int(global_batch)
        starts: list[int] = []
        weights: list[list[float]] = []
        for i, p in enumerate(self.phases):
            k0 = p["start_step"] * G
            k_end = self.phases[i + 1]["start_step"] * G if i + 1 < len(self.phases) else None
            new = np.asarray(self.weight_vector(p["mix"]))
            ramp = p["ramp_steps"] * G if i > 0 else 0
            if ramp:
                old = np.asarray(self.weight_vector(self.phases[i - 1]["mix"]))
                nb = -(-ramp // block)
                pieces = min(nb, RAMP_PIECES)
                for j in range(pieces):
                    ks = k0 + (j * nb // pieces) * block
                    if k_end is not None and ks >= k_end:
                        break
                    t = (j + 0.5) / pieces
                    starts.append(ks)
                    weights.append(list(old + t * (new - old)))
                k0 += nb * block
            if k_end is None or k0 < k_end:
                starts.append(k0)
                weights.append(list(new))
        return starts, weights

    def _view(self, step: int) -> tuple:
        """What the plan does from `step` on (the active weights, a ramp still running, later phases)."""
        i = max(j for j, p in enumerate(self.phases) if p["start_step"] <= step)
        p = self.phases[i]
        key = lambda m: tuple(sorted((n, round(w, 12)) for n, w in m.items()))  # noqa: E731
        ramping = None
        if i > 0 and p["ramp_steps"] and p["start_step"] + p["ramp_steps"] > step:
            ramping = (p["start_step"], p["ramp_steps"], key(self.phases[i - 1]["mix"]))
        later = [(q["start_step"], key(q["mix"]), q["ramp_steps"]) for q in self.phases[i + 1 :]]
        return key(p["mix"]), ramping, later

    def continued(self, config: DataPlan, step: int) -> DataPlan:
        """This (saved) plan resumed at `step` under the configured plan: unchanged when the config
        does from `step` on what this plan does; else the past kept and a new phase at `step` (the
        config's weights there, then its later phases). Sources keep their ids; new ones are appended."""
        by_name = {s["name"]: dict(s) for s in self.sources}
        sources = [dict(s) for s in self.sources]
        for s in config.sources:
            if s["name"] not in by_name:
                sources.append(dict(s))
            else:  # a moved store keeps its name; its path is where it is now
                for t in sources:
                    if t["name"] == s["name"]:
                        t["path"] = s["path"]
        if self._view(step) == config._view(step):
            return DataPlan(sources, self.phases)
        past = [dict(p) for p in self.phases if p["start_step"] < step]
        i = max(j for j, p in enumerate(config.phases) if p["start_step"] <= step)
        now = dict(config.phases[i])
        ramp = now["ramp_steps"] if now["start_step"] == step else 0
        phases = [*past, {"start_step": step, "mix": now["mix"], "ramp_steps": ramp, "origin": "resume"}]
        phases += [dict(p) for p in config.phases[i + 1 :]]
        return DataPlan(sources, phases)

    def describe_phase(self, step: int) -> str:
        """``phase i (from step s): name w, ...`` of the 1-based step."""
        i = max(j for j, p in enumerate(self.phases) if p["start_step"] <= step - 1)
        p = self.phases[i]
        mix = ", ".join(f"{n} {w:.4g}" for n, w in p["mix"].items())
        ramp = f", ramping {p['ramp_steps']} steps" if p["ramp_steps"] and i else ""
        return f"phase {i} (from step {p['start_step'] + 1}{ramp}): {mix}"
