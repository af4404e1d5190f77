"""Stateless keyed permutations and the global sample order (flame.data.order)."""

from __future__ import annotations

import numpy as np
import pytest

from flame.data.order import Identity, Permutation, epoch_permutation, global_samples, samples_at

SMALL_NS = [1, 2, 3, 4, 5, 7, 10, 16, 17, 100, 1000, 1024, 1025, 65537]
SEEDS = [0, 1, -5, 2**63 + 7]


def _reference(start: int, count: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition, one epoch at a time: k -> (k // n, Permutation(n, seed, k // n)(k % n))."""
    ks = np.arange(start, start + count, dtype=np.int64)
    epochs = ks // n
    local = np.empty_like(ks)
    for e in np.unique(epochs):
        sel = epochs == e
        local[sel] = Permutation(n, seed, int(e))(ks[sel] % n)
    return epochs, local


@pytest.mark.parametrize("n", SMALL_NS)
@pytest.mark.parametrize("seed", SEEDS)
def test_bijection_small(n, seed):
    for epoch in (0, 3):
        out = Permutation(n, seed, epoch)(np.arange(n))
        assert out.dtype == np.int64
        assert np.array_equal(np.sort(out), np.arange(n))


@pytest.mark.parametrize("n", [4**10 + 1, 4**10 - 1, 999_983])
def test_bijection_million(n):
    # n just above a power of 4 is the worst case for a power-of-two domain
    out = Permutation(n, 123, 1)(np.arange(n))
    assert np.array_equal(np.bincount(out, minlength=n), np.ones(n, dtype=np.int64))


@pytest.mark.slow
@pytest.mark.parametrize("n", [2**40, 2**40 - 3, 2**33 + 1, 2**62])
def test_huge_n_injective_and_in_range(n):
    rng = np.random.default_rng(0)
    idx = np.unique(rng.integers(0, n, size=200_000, dtype=np.int64))
    idx = np.concatenate([idx, [0, n - 1]])
    idx = np.unique(idx)
    out = Permutation(n, 9, 2)(idx)
    assert out.min() >= 0 and out.max() < n
    assert np.unique(out).size == idx.size


def test_tiny_n():
    assert Permutation(1, 5)(np.zeros(4, dtype=np.int64)).tolist() == [0, 0, 0, 0]
    seen2 = {tuple(Permutation(2, 0, e)(np.arange(2))) for e in range(64)}
    assert seen2 == {(0, 1), (1, 0)}
    seen3 = {tuple(Permutation(3, 0, e)(np.arange(3))) for e in range(200)}
    assert len(seen3) == 6  # every permutation of 3 occurs


def test_shape_scalar_and_dtype():
    p = Permutation(1000, 4, 1)
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    out = p(x)
    assert out.shape == (3, 4) and out.dtype == np.int64
    assert np.array_equal(out.ravel(), p(np.arange(12)))
    assert int(p(5)) == int(p(np.array([5]))[0])
    assert p(np.zeros(0, dtype=np.int64)).shape == (0,)
    assert len(p) == 1000


def test_pointwise_equals_batch():
    p = Permutation(1_000_003, 42, 7)
    full = p(np.arange(100_000))  # batched in cache-sized chunks
    pieces = np.concatenate([p(np.arange(i, min(i + 777, 100_000))) for i in range(0, 100_000, 777)])
    assert np.array_equal(full, pieces)
    assert all(int(p(np.array([i]))[0]) == full[i] for i in (0, 1, 32767, 32768, 99_999))


def test_seeds_and_epochs_give_different_orders():
    orders = {}
    for seed in (0, 1, 2):
        for epoch in range(10):
            orders[(seed, epoch)] = Permutation(1000, seed, epoch)(np.arange(1000))
    keys = list(orders)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            # two independent random orders of 1000 agree on ~1 position
            assert np.sum(orders[a] == orders[b]) < 20, (a, b)
    assert not np.array_equal(orders[(0, 0)], np.arange(1000))


def test_deterministic_and_pinned():
    # Pinned values: changing the network changes every saved run's data order on resume.
    assert Permutation(10, 0)(np.arange(10)).tolist() == [3, 7, 4, 8, 9, 1, 5, 6, 2, 0]
    idx = np.array([0, 1, 2, 999_999, 1_000_002])
    assert Permutation(1_000_003, 42, 7)(idx).tolist() == [437943, 265555, 476, 189437, 269817]
    big = Permutation(2**40, 1, 3)(np.array([0, 1, 2**40 - 1]))
    assert big.tolist() == [1022213188207, 661755502244, 82362281560]
    a = Permutation(5000, 17, 2)(np.arange(5000))
    b = Permutation(5000, 17, 2)(np.arange(5000))
    assert np.array_equal(a, b)


def test_roughly_uniform():
    # over many epochs each input lands on each output about equally often (chi-square / dof ~ 1)
    n, epochs = 16, 4000
    _, local = global_samples(0, n * epochs, n, seed=11)
    counts = np.zeros((n, n))
    np.add.at(counts, (np.tile(np.arange(n), epochs), local), 1)
    expected = epochs / n
    chi2_per_dof = ((counts - expected) ** 2 / expected).sum() / (n - 1) ** 2
    assert 0.7 < chi2_per_dof < 1.4


def test_identity_without_shuffle():
    p = epoch_permutation(10, 3, 5, shuffle=False)
    assert isinstance(p, Identity)
    assert p(np.arange(10)).tolist() == list(range(10))
    assert isinstance(epoch_permutation(10, 3, 5), Permutation)
    epochs, local = global_samples(7, 20, 10, seed=3, shuffle=False)
    assert epochs.tolist() == [k // 10 for k in range(7, 27)]
    assert local.tolist() == [k % 10 for k in range(7, 27)]
    epochs, local = global_samples(1, 100, 3, seed=3, shuffle=False)  # many epochs
    assert epochs.tolist() == [k // 3 for k in range(1, 101)]
    assert local.tolist() == [k % 3 for k in range(1, 101)]


def test_epoch_permutation_matches_permutation():
    p = epoch_permutation(777, 8, 4)
    assert np.array_equal(p(np.arange(777)), Permutation(777, 8, 4)(np.arange(777)))


@pytest.mark.parametrize(
    "start,count,n",
    [
        (0, 10, 10),  # exactly one epoch
        (5, 10, 10),  # across one boundary
        (995, 20, 1000),
        (0, 1, 1),
        (3, 50, 1),  # n = 1: every sample is sample 0
        (1, 100, 3),  # many epochs: per-element keys
        (12345, 5000, 7),
        (2 * 65537 - 3, 70000, 65537),
        (10**12, 1000, 2**40),
    ],
)
def test_global_samples_matches_definition(start, count, n):
    epochs, local = global_samples(start, count, n, seed=21)
    ref_e, ref_l = _reference(start, count, n, seed=21)
    assert epochs.dtype == np.int64 and local.dtype == np.int64
    assert np.array_equal(epochs, ref_e)
    assert np.array_equal(local, ref_l)


def test_global_samples_epoch_is_a_permutation():
    n = 1234
    epochs, local = global_samples(0, 3 * n, n, seed=2)
    for e in range(3):
        sel = local[epochs == e]
        assert np.array_equal(np.sort(sel), np.arange(n))
    assert not np.array_equal(local[:n], local[n : 2 * n])


@pytest.mark.parametrize("n", [3, 100, 1000])
def test_global_samples_split_points_do_not_matter(n):
    whole = global_samples(17, 5000, n, seed=4)
    for cut in (17, 18, 100, n + 17, 2500, 5016, 5017):
        a = global_samples(17, cut - 17, n, seed=4)
        b = global_samples(cut, 5017 - cut, n, seed=4)
        assert np.array_equal(np.concatenate([a[0], b[0]]), whole[0])
        assert np.array_equal(np.concatenate([a[1], b[1]]), whole[1])


@pytest.mark.parametrize("n", [1, 3, 1000, 10**6])
@pytest.mark.parametrize("spread", [2, 50])  # few epochs (loop) and many (per-element keys)
def test_samples_at_matches_global_samples(n, spread):
    rng = np.random.default_rng(n + spread)
    ks = rng.integers(3 * n, (3 + spread) * n, size=(40, 25))
    epochs, local = samples_at(ks, n, seed=6)
    assert epochs.shape == ks.shape and local.shape == ks.shape
    for k, e, v in zip(ks.ravel(), epochs.ravel(), local.ravel()):
        ref_e, ref_l = global_samples(int(k), 1, n, seed=6)
        assert (e, v) == (ref_e[0], ref_l[0])
    plain = samples_at(ks, n, seed=6, shuffle=False)
    assert np.array_equal(plain[0], ks // n) and np.array_equal(plain[1], ks % n)


def test_global_samples_empty():
    epochs, local = global_samples(100, 0, 10, seed=0)
    assert epochs.shape == (0,) and local.shape == (0,)


def test_errors():
    with pytest.raises(ValueError, match="out of range"):
        Permutation(10, 0)(np.array([10]))
    with pytest.raises(ValueError, match="out of range"):
        Permutation(10, 0)(np.array([-1]))
    with pytest.raises(TypeError, match="integers"):
        Permutation(10, 0)(np.array([1.0]))
    with pytest.raises(ValueError, match="size"):
        Permutation(0, 0)
    with pytest.raises(ValueError, match="rounds"):
        Permutation(10, 0, rounds=0)
    with pytest.raises(ValueError, match="start"):
        global_samples(-1, 5, 10, seed=0)
    with pytest.raises(ValueError, match="size"):
        global_samples(0, 5, 0, seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        samples_at(np.array([-1]), 10, seed=0)
