"""Prepared batches equal a slow, per-sample, per-token reference built from the definitions.

The reference reads each store's shard files directly (no TokenStore), draws sample k of a store
of N samples as ``Permutation(N, seed + 7919 * source, k // N)(k % N)``, the epoch shift as its
documented keyed offset, a mixture position as "source of the slot the block permutation puts
there, numbered by earlier positions of that source", and varlen boundaries token by token. Every
field of every batch must be torch.equal (and of the same dtype) to it: the fast loader is a
rewrite of exactly this arithmetic, for fixed and varlen batches, static mixtures, phases with a
ramp, a closed past source, epoch shifts, multi-shard stores and windows longer than a shard.
"""

import functools
import json

import numpy as np
import pytest
import torch
from conftest import make_token_store

from flame.data.loader import PreparedLoader
from flame.data.mixture import DataPlan, MixtureSchedule, _segment_seed
from flame.data.order import Permutation, _u64, mix64
from flame.data.packed import _SHIFT_TAG
from flame.data.prepare import prepare
from flame.data.store import TokenStore

BLOCK = 1024


class RefStore:
    """A store's token stream and document starts, read from its files without TokenStore."""

    def __init__(self, path):
        m = json.loads((path / "manifest.json").read_text())
        dtype = np.dtype(m["dtype"])
        tokens, docs, base = [], set(), 0
        for sh in m["shards"]:
            t = np.fromfile(path / f"{sh['name']}.tokens", dtype=dtype)
            d = np.fromfile(path / f"{sh['name']}.docs", dtype=np.uint64).reshape(-1, 3)[:, 0]
            tokens.append(t)
            docs |= {base + int(x) for x in d}
            base += len(t)
        self.tokens = np.concatenate(tokens).astype(np.int64)
        self.docs = docs


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("read-equal")
    rng = np.random.default_rng(11)
    src = d / "multi.jsonl"
    with open(src, "w") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"{i}:" + "xyz"[i % 3] * int(rng.integers(1, 60))}) + "\n")
    prepare([str(src)], "byte", str(d / "multi"), workers=1, progress=False, unit_bytes=2048)
    out = {
        "a": make_token_store(d / "a", 300, 1),
        "b": make_token_store(d / "b", 120, 2),
        "multi": TokenStore(d / "multi"),
    }
    assert len(out["multi"].shards) > 4  # windows cross shard ends
    return out


@functools.cache
def _ref_store(path: str) -> RefStore:
    from pathlib import Path

    return RefStore(Path(path))


def _ref_start(ref: RefStore, source: int, n: int, L: int, seed: int, shuffle: bool, shift: bool) -> int:
    s = seed + 7919 * source
    T = len(ref.tokens)
    N = T // L
    e, j = divmod(n, N)
    start = (int(Permutation(N, s, e)(j)) if shuffle else j) * L
    if shift and e > 0:
        key = mix64(_u64(s) ^ _u64(_SHIFT_TAG))[0]
        start = min(start + int(mix64(_u64(e) ^ key)[0] % np.uint64(L)), T - L)
    return start


class RefMix:
    """(source, n) of global sample k under segments (starts, weights): per position, from the blocks."""

    def __init__(self, starts, weights, seed):
        self.starts, self.seed = list(starts), seed
        self.weights = [np.asarray(w, dtype=np.float64) for w in weights]
        self.nsrc = len(self.weights[0])
        self._memo = {}

    def _once(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def _segment(self, t):
        act = np.flatnonzero(self.weights[t] > 0)
        return self._once(
            ("segment", t),
            lambda: (act, MixtureSchedule(self.weights[t][act], _segment_seed(self.seed, t), BLOCK)),
        )

    def _block(self, t, b):
        """Source (active index) at each position of block b of segment t."""
        _, sch = self._segment(t)
        slot_src = np.repeat(np.arange(len(sch.counts)), sch.counts)
        return self._once(("block", t, b), lambda: slot_src[np.argsort(sch.block_positions(b))])

    def _offset(self, t):
        return self._once(("offset", t), lambda: self._offset_of(t))

    def _offset_of(self, t):
        """Samples each source read in segments before t."""
        out = np.zeros(self.nsrc, dtype=np.int64)
        for u in range(t):
            act, sch = self._segment(u)
            full, rest = divmod(self.starts[u + 1] - self.starts[u], BLOCK)
            out[act] += full * sch.counts
            out[act] += np.bincount(self._block(u, full)[:rest], minlength=len(act))
        return out

    def __call__(self, k):
        t = max(i for i, s0 in enumerate(self.starts) if s0 <= k)
        act, sch = self._segment(t)
        b, q = divmod(k - self.starts[t], BLOCK)
        src = self._block(t, b)
        s = int(src[q])
        n = b * int(sch.counts[s]) + int((src[:q] == s).sum())
        return int(act[s]), n + int(self._offset(t)[act[s]])


def _reference(paths, micro, *, L, B, seed, shuffle, rank, world, accum, varlen, shift, mix):
    step, a = divmod(micro, accum)
    G = B * world * accum
    ks = step * G + (a * world + rank) * B + np.arange(B, dtype=np.int64)
    rows, srcs, cuts = [], [], []
    for r, k in enumerate(ks.tolist()):
        s, n = mix(k) if mix is not None else (0, k)
        ref = _ref_store(paths[s])
        start = _ref_start(ref, s, n, L, seed, shuffle, shift)
        rows.append(ref.tokens[start : start + L])
        srcs.append(s)
        cuts += [r * L] + [r * L + d - start for d in range(start + 1, start + L) if d in ref.docs]
    ids = np.stack(rows)
    out = {"input_ids": torch.from_numpy(ids), "samples": torch.from_numpy(ks)}
    if mix is not None:
        out["source"] = torch.tensor(srcs, dtype=torch.int64)
    if varlen:
        flat = ids.reshape(1, -1)
        cu = cuts + [B * L]
        labels = flat.copy()
        pos = np.zeros(B * L, dtype=np.int64)
        for c0, c1 in zip(cu, cu[1:]):
            labels[0, c0] = -100 if c0 else labels[0, c0]
            pos[c0:c1] = np.arange(c1 - c0)
        out.update(
            input_ids=torch.from_numpy(flat),
            labels=torch.from_numpy(labels),
            position_ids=torch.from_numpy(pos).view(1, -1),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            max_seqlen=max(c1 - c0 for c0, c1 in zip(cu, cu[1:])),
            num_targets=B * L - 1 - (len(cu) - 2),
        )
    return out


def _plan(stores, phases):
    return DataPlan.from_specs(
        [{**p, "mix": ",".join(f"{n}={stores[n].path}:{w}" for n, w in p["mix"].items())} for p in phases]
    )


RAMPED = [
    {"start_step": 0, "mix": {"a": 0.7, "multi": 0.3}},
    {"start_step": 20, "mix": {"a": 0.2, "multi": 0.5, "b": 0.3}, "ramp_steps": 150},
    {"start_step": 300, "mix": {"b": 0.6, "multi": 0.4}},
]

CASES = {
    # name: (sources, loader settings, plan phases or None)
    "fixed": (["a"], dict(L=16, B=4), None),
    "varlen": (["a"], dict(L=16, B=4, varlen=True), None),
    "multi-shard": (["multi"], dict(L=64, B=3, rank=1, world=2, accum=2), None),
    "multi-shard varlen shift": (["multi"], dict(L=64, B=3, varlen=True, shift=True), None),
    "window > shard, varlen": (["multi"], dict(L=2048, B=2, varlen=True, shift=True), None),
    "no shuffle varlen": (["multi"], dict(L=32, B=5, varlen=True, shuffle=False), None),
    "mixture": (["a", "multi"], dict(L=16, B=4, weights=[0.6, 0.4]), None),
    "mixture varlen shift": (
        ["a", "multi"],
        dict(L=24, B=4, weights=[0.6, 0.4], varlen=True, shift=True),
        None,
    ),
    "phases ramp": (["a", "multi", "b"], dict(L=16, B=4, world=2), RAMPED),
    "phases ramp varlen shift": (
        ["a", "multi", "b"],
        dict(L=16, B=4, accum=2, varlen=True, shift=True),
        RAMPED,
    ),
}


def _settings(kw):
    base = dict(L=16, B=4, seed=5, shuffle=True, rank=0, world=1, accum=1, varlen=False, shift=False)
    return {**base, **kw}


def _loader(st, names, kw, phases, stores=None):
    s = _settings(kw)
    plan = _plan(st, phases) if phases else None
    return PreparedLoader(
        stores if stores is not None else [st[n] for n in (plan.names if plan else names)],
        weights=kw.get("weights"),
        context_len=s["L"],
        seed=s["seed"],
        shuffle=s["shuffle"],
        rank=s["rank"],
        world=s["world"],
        batch_size=s["B"],
        accum=s["accum"],
        varlen=s["varlen"],
        plan=plan,
        epoch_shift=s["shift"],
    )


def _micros(loader, extra=()):
    """First micro-batches, ones around each mixture segment start, and some epochs later."""
    G, A = loader.global_batch, loader.accum
    ms = set(range(6 * A))
    if loader.source.schedule is not None:
        for k0 in loader.source.schedule.starts.tolist()[1:]:
            m = k0 // G * A
            ms |= set(range(max(0, m - A), m + 2 * A))
    n = loader.source.num_samples
    ms |= {n // G * A, n // G * A + A - 1, 3 * n // G * A + 1, *extra}
    return sorted(ms)


def _assert_same(got, want, where):
    assert set(got) == set(want), where
    for k, w in want.items():
        g = got[k]
        if torch.is_tensor(w):
            assert g.dtype == w.dtype and torch.equal(g, w), f"{where}: field {k}"
        else:
            assert type(g) is type(w) and g == w, f"{where}: field {k}: {g!r} != {w!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_batches_equal_the_reference(stores, case):
    names, kw, phases = CASES[case]
    ld = _loader(stores, names, kw, phases)
    s = _settings(kw)
    mix = None
    if ld.source.schedule is not None:
        mix = RefMix(*ld.plan.segments(ld.global_batch), s["seed"])
    paths = [str(p["path"]) for p in ld.plan.sources]
    ref = dict(L=s["L"], B=s["B"], seed=s["seed"], shuffle=s["shuffle"], rank=s["rank"], world=s["world"])
    ref.update(accum=s["accum"], varlen=s["varlen"], shift=s["shift"], mix=mix)
    for m in _micros(ld):
        _assert_same(ld.batches.batch(m), _reference(paths, m, **ref), f"{case}, micro {m}")
    # iterating reads the same batches as asking for them
    it = iter(ld)
    for m in range(3):
        _assert_same(next(it), _reference(paths, m, **ref), f"{case}, iterated micro {m}")


def test_closed_past_source_equals_the_reference(stores):
    """A source of a past phase whose store is not open (None) is never read; the others continue."""
    phases = [
        {"start_step": 0, "mix": {"a": 0.5, "b": 0.5}},
        {"start_step": 10, "mix": {"multi": 0.3, "a": 0.7}},
    ]
    plan = _plan(stores, phases)
    assert plan.names == ["a", "b", "multi"]
    kw = dict(L=16, B=4, varlen=True)
    ld = _loader(stores, None, kw, phases, stores=[stores["a"], None, stores["multi"]])
    s = _settings(kw)
    mix = RefMix(*ld.plan.segments(ld.global_batch), s["seed"])
    paths = [str(p["path"]) for p in ld.plan.sources]
    first = ld.source.schedule.starts[1] // ld.global_batch + 1  # the first step wholly in phase 1
    for m in range(first, first + 5):
        want = _reference(
            paths,
            m,
            L=16,
            B=4,
            seed=5,
            shuffle=True,
            rank=0,
            world=1,
            accum=1,
            varlen=True,
            shift=False,
            mix=mix,
        )
        _assert_same(ld.batches.batch(m), want, f"micro {m}")


@pytest.mark.parametrize("L", [16, 700, 2048])
def test_window_boundaries_per_shard_and_per_window_agree(stores, L):
    """Varlen boundaries of windows in a many-shard store: shard by shard and window by window."""
    from flame.data.packed import WindowReader

    st = stores["multi"]
    ref = _ref_store(str(st.path))
    rd = WindowReader([st], L)
    starts = np.random.default_rng(L).integers(0, st.num_tokens - L + 1, 64)
    src = np.zeros(len(starts), np.int64)
    where = rd.where(src, starts)
    j = np.asarray(where[0])
    order = np.argsort(j, kind="stable")
    bounds = np.flatnonzero(np.diff(j[order])) + 1
    a = np.sort(np.concatenate(rd._grouped(starts, j, np.asarray(where[1]), order, bounds)))
    b = np.sort(np.concatenate(rd._per_window(starts, where)))
    want = [
        r * L + d - s for r, s in enumerate(starts.tolist()) for d in range(s + 1, s + L) if d in ref.docs
    ]
    assert a.tolist() == b.tolist() == want
    cu = rd.cuts(starts, where)
    assert cu.tolist() == sorted(want + list(range(0, (len(starts) + 1) * L, L)))


def test_loader_workers_read_the_reference_batches(stores):
    """Two loader workers (each micro-batch m = w mod 2, each with its own boundary blocks) and a
    resume in the middle read exactly the reference batches."""
    names, kw, phases = CASES["mixture varlen shift"]
    s = _settings(kw)
    ld = _loader(stores, names, kw, phases)
    ld.num_workers = 2
    mix = RefMix(*ld.plan.segments(ld.global_batch), s["seed"])
    paths = [str(p["path"]) for p in ld.plan.sources]
    ref = dict(L=s["L"], B=s["B"], seed=s["seed"], shuffle=True, rank=0, world=1, accum=1)
    ref.update(varlen=True, shift=True, mix=mix)
    it = iter(ld)
    for m in range(5):
        _assert_same(next(it), _reference(paths, m, **ref), f"worker batch {m}")
    it.close()
    ld.seek(300)
    it = iter(ld)
    for m in range(300, 303):
        _assert_same(next(it), _reference(paths, m, **ref), f"worker batch {m}")
    it.close()


def test_skipped_steps_leave_the_other_steps_batches_as_the_reference(stores):
    """data.skip consumes a step's micro-batches untrained: the steps after read what they would."""
    from flame.data.packed import SkipRanges

    skip = SkipRanges("2-3,6")
    names, kw, phases = CASES["phases ramp varlen shift"]
    s = _settings(kw)
    ld = _loader(stores, names, kw, phases)
    mix = RefMix(*ld.plan.segments(ld.global_batch), s["seed"])
    paths = [str(p["path"]) for p in ld.plan.sources]
    ref = dict(L=s["L"], B=s["B"], seed=s["seed"], shuffle=True, rank=0, world=1, accum=s["accum"])
    ref.update(varlen=True, shift=True, mix=mix)
    it = iter(ld)
    for step in range(1, 9):
        got = [next(it) for _ in range(s["accum"])]
        if not skip(step):
            for a, b in enumerate(got):
                _assert_same(b, _reference(paths, (step - 1) * s["accum"] + a, **ref), f"step {step}")
    assert skip.through(8) == 3
