"""Deterministic weighted mixtures (flame.data.mixture)."""

from __future__ import annotations

import numpy as np
import pytest

from flame.data.mixture import MixtureSchedule, largest_remainder, parse_mix
from flame.data.order import Permutation


def _reference(m: MixtureSchedule, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule, sample by sample: slot p of block b sits at position perm_b(p)."""
    ends = np.cumsum(m.counts)
    src_out, n_out = [], []
    for k in range(start, start + count):
        b, q = divmod(k, m.block)
        pos = Permutation(m.block, m._perm_seed, b)(np.arange(m.block))
        p = int(np.flatnonzero(pos == q)[0])
        s = int(np.searchsorted(ends, p, side="right"))
        mine = np.sort(pos[m.starts[s] : ends[s]])
        src_out.append(s)
        n_out.append(b * int(m.counts[s]) + int(np.searchsorted(mine, q)))
    return np.array(src_out), np.array(n_out)


@pytest.mark.parametrize(
    "weights,block", [([0.7, 0.2, 0.1], 16), ([1.0], 8), ([0.5, 0.5], 1024), ([1e-3, 0.999, 0.3], 100)]
)
def test_matches_rule(weights, block):
    m = MixtureSchedule(weights, seed=5, block=block)
    src, n = m.assign(37, 700)
    ref_src, ref_n = _reference(m, 37, 700)
    assert np.array_equal(src, ref_src)
    assert np.array_equal(n, ref_n)
    assert np.array_equal(m.block_positions(3), Permutation(block, m._perm_seed, 3)(np.arange(block)))


def test_pinned():
    # Pinned values: changing the schedule changes every saved mixture run on resume.
    m = MixtureSchedule([0.7, 0.2, 0.1], seed=3, block=16)
    src, n = m.assign(16, 16)
    assert src.tolist() == [2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2, 1, 0, 0, 1]
    assert n.tolist() == [2, 11, 12, 13, 14, 15, 3, 16, 17, 18, 19, 3, 4, 20, 21, 5]


def test_largest_remainder():
    assert largest_remainder([0.7, 0.2, 0.1], 16).tolist() == [11, 3, 2]
    assert largest_remainder([1, 1, 1], 10).tolist() == [4, 3, 3]  # ties go to the earlier source
    assert largest_remainder([1e-9, 1.0], 8).tolist() == [1, 7]  # every source gets a slot
    assert largest_remainder([1e-9, 1e-9, 1.0], 3).tolist() == [1, 1, 1]
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.random(rng.integers(1, 30)) ** 3 + 1e-12
        block = int(rng.integers(w.size, 5000))
        c = largest_remainder(w, block)
        assert c.sum() == block and c.min() >= 1
        assert np.all(np.abs(c - w / w.sum() * block) < 1 + w.size)


@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [0.25] * 4, [1e-4, 0.5, 0.3, 0.2]])
@pytest.mark.parametrize("block", [1024, 1000, 37])
def test_exact_counts_per_block_and_dense_n(weights, block):
    m = MixtureSchedule(weights, seed=11, block=block)
    blocks = 40
    src, n = m.assign(0, blocks * block)
    per_block = np.stack([np.bincount(row, minlength=len(weights)) for row in src.reshape(blocks, block)])
    assert np.array_equal(per_block, np.broadcast_to(m.counts, per_block.shape))
    for s in range(len(weights)):
        # each source's samples are numbered 0, 1, 2, ... in k order: dense, no gaps, no repeats
        assert np.array_equal(n[src == s], np.arange(blocks * m.counts[s]))


def test_split_points_do_not_matter():
    m = MixtureSchedule([0.6, 0.3, 0.1], seed=2, block=64)
    a, c = 50, 50 + 20_000
    whole = m.assign(a, c - a)
    for b in (50, 51, 64, 100, 128, 4000, 19_999, 20_049, 20_050):
        fresh = MixtureSchedule([0.6, 0.3, 0.1], seed=2, block=64)
        for sched in (m, fresh):  # warm cache and cold
            left = sched.assign(a, b - a)
            right = sched.assign(b, c - b)
            assert np.array_equal(np.concatenate([left[0], right[0]]), whole[0])
            assert np.array_equal(np.concatenate([left[1], right[1]]), whole[1])


def test_small_sequential_calls_equal_one_big_call():
    m = MixtureSchedule([0.5, 0.3, 0.2], seed=9)
    whole = m.assign(1000, 60_000)
    step = MixtureSchedule([0.5, 0.3, 0.2], seed=9)
    parts = [step.assign(k, 8) for k in range(1000, 61_000, 8)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), whole[0])
    assert np.array_equal(np.concatenate([p[1] for p in parts]), whole[1])
    # and out of order (cache misses backwards)
    assert np.array_equal(step.assign(1000, 8)[1], whole[1][:8])


def test_returned_arrays_are_private():
    m = MixtureSchedule([0.5, 0.5], seed=0)
    src, n = m.assign(0, 10)
    src[:] = 7
    n[:] = -1
    src2, n2 = m.assign(0, 10)
    assert src2.max() <= 1 and n2.min() >= 0


def test_determinism_and_seed():
    a = MixtureSchedule([0.5, 0.5], seed=1).assign(0, 4096)
    b = MixtureSchedule([0.5, 0.5], seed=1).assign(0, 4096)
    c = MixtureSchedule([0.5, 0.5], seed=2).assign(0, 4096)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # blocks differ from each other
    assert not np.array_equal(a[0][:1024], a[0][1024:2048])


def test_single_source_is_identity():
    src, n = MixtureSchedule([3.0], seed=4, block=16).assign(5, 100)
    assert src.tolist() == [0] * 100
    assert n.tolist() == list(range(5, 105))


def test_weights_normalised_and_dtypes():
    m = MixtureSchedule([2, 6], seed=0, block=8)
    assert np.allclose(m.weights, [0.25, 0.75])
    assert m.counts.tolist() == [2, 6]
    src, n = m.assign(0, 3)
    assert src.dtype == np.int64 and n.dtype == np.int64
    empty = m.assign(10, 0)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


def test_consumed():
    m = MixtureSchedule([0.7, 0.2, 0.1], seed=3, block=100)
    src, _ = m.assign(0, 1234)
    for k in (0, 1, 99, 100, 101, 1234):
        assert np.array_equal(m.consumed(k), np.bincount(src[:k], minlength=3))


def test_schedule_errors():
    with pytest.raises(ValueError, match="at least one"):
        MixtureSchedule([], seed=0)
    with pytest.raises(ValueError, match="positive"):
        MixtureSchedule([0.5, 0.0], seed=0)
    with pytest.raises(ValueError, match="positive"):
        MixtureSchedule([0.5, float("nan")], seed=0)
    with pytest.raises(ValueError, match="number of sources"):
        MixtureSchedule([1, 1, 1], seed=0, block=2)
    with pytest.raises(ValueError, match="start"):
        MixtureSchedule([1], seed=0).assign(-1, 3)


def test_parse_mix():
    assert parse_mix("a:3,b:1") == [("a", 0.75), ("b", 0.25)]
    assert parse_mix(" data/x : 1 , data/y:1 ") == [("data/x", 0.5), ("data/y", 0.5)]
    assert parse_mix("only:2") == [("only", 1.0)]
    # split on the last colon: paths may contain colons
    assert parse_mix("s3://bucket/x:1,hf:org/ds:3") == [("s3://bucket/x", 0.25), ("hf:org/ds", 0.75)]
    assert parse_mix("a:1e-3,b:1e-3") == [("a", 0.5), ("b", 0.5)]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", "empty mixture spec"),
        ("   ", "empty mixture spec"),
        ("a", "no weight"),
        ("a:1,b", "no weight"),
        ("a:", "not a number"),
        ("a:x", "not a number"),
        ("a:0", "positive"),
        ("a:-1", "positive"),
        ("a:nan", "positive"),
        ("a:inf", "positive"),
        (":1", "empty path"),
        ("a:1,,b:1", "empty"),
        ("a:1,", "empty"),
        ("a:1,a:2", "listed twice"),
    ],
)
def test_parse_mix_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mix(spec)
