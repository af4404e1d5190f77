"""Prepared mode: exactly-once epochs, exact and elastic resume, mixtures, varlen boundaries."""

import json

import numpy as np
import pytest
import torch
from conftest import make_token_store as _make_store

from flame.data.loader import PreparedLoader
from flame.data.prepare import prepare
from flame.data.store import TokenStore

L = 16
EOS = 256


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return _make_store(d / "a", 300, 1), _make_store(d / "b", 120, 2)


def _loader(stores, rank=0, world=1, batch=2, accum=1, varlen=False, workers=0, weights=None, seed=5):
    return PreparedLoader(
        list(stores),
        weights=weights,
        context_len=L,
        seed=seed,
        rank=rank,
        world=world,
        batch_size=batch,
        accum=accum,
        varlen=varlen,
        num_workers=workers,
    )


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch(stores, world):
    a = stores[0]
    n = a.num_tokens // L
    seen = []
    for rank in range(world):
        ld = _loader([a], rank=rank, world=world, batch=2)
        steps = -(-n // (2 * world))
        seen += [int(k) for b in _take(ld, steps) for k in b["samples"] if k < n]
        starts = ld.source.locate(np.arange(0, n, dtype=np.int64))[1]
    assert sorted(seen) == list(range(n))  # each global sample index once
    assert sorted(starts.tolist()) == [i * L for i in range(n)]  # and they cover every window once


def test_workers_give_the_same_batches(stores):
    a = _take(_loader(stores[:1], batch=3), 9)
    b = _take(_loader(stores[:1], batch=3, workers=2), 9)
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("mix", [False, True])
def test_resume_equals_uninterrupted(stores, workers, varlen, mix):
    kw = dict(varlen=varlen, workers=workers, accum=2, weights=[0.7, 0.3] if mix else None)
    use = stores if mix else stores[:1]
    ref = _take(_loader(use, **kw), 16)
    first = _loader(use, **kw)
    _take(first, 6)  # three optimizer steps
    state = first.state_dict()
    assert len(json.dumps(state)) <= 1024
    again = _loader(use, **kw)
    again.load_state_dict(json.loads(json.dumps(state)))
    for x, y in zip(ref[6:], _take(again, 10)):
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k]


def _step_sets(loaders, steps, accum):
    out = []
    its = [iter(ld) for ld in loaders]
    for _ in range(steps):
        s = []
        for it in its:
            for _ in range(accum):
                s += next(it)["samples"].tolist()
        out.append(sorted(s))
    return out


def test_elastic_world_size(stores):
    two = _step_sets([_loader(stores[:1], rank=r, world=2, batch=2) for r in range(2)], 5, 1)
    one = _step_sets([_loader(stores[:1], batch=4)], 5, 1)
    accum = _step_sets([_loader(stores[:1], batch=2, accum=2)], 5, 2)
    assert two == one == accum
    # checkpoint on 2 ranks after 3 steps, resume on 1 rank with twice the batch
    ranks = [_loader(stores[:1], rank=r, world=2, batch=2) for r in range(2)]
    _step_sets(ranks, 3, 1)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    solo = _loader(stores[:1], batch=4)
    solo.load_state_dict(state)
    assert _step_sets([solo], 2, 1) == one[3:5]
    # and a global batch that cannot be kept is a clear error
    odd = _loader(stores[:1], batch=3)
    with pytest.raises(Exception, match="global batch of 4"):
        odd.load_state_dict(state)


def test_mixture_proportions_exact_per_block(stores):
    ld = _loader(stores, batch=64, weights=[0.7, 0.3])
    src, _ = ld.source.locate(np.arange(0, 2048, dtype=np.int64))
    for block in (src[:1024], src[1024:]):
        assert (block == 0).sum() == 717 and (block == 1).sum() == 307


def test_varlen_boundaries_match_documents(stores):
    for b in _take(_loader(stores, batch=4, varlen=True, weights=[0.5, 0.5]), 20):
        ids = b["input_ids"][0]
        cu = b["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == ids.numel() and b["cu_seqlens"].dtype == torch.int32
        window_starts = set(range(0, ids.numel(), L))
        expected = set(window_starts)
        for p in (ids == EOS).nonzero().flatten().tolist():
            if p + 1 < ids.numel() and (p + 1) % L:
                expected.add(p + 1)  # a document starts right after each EOS
        assert set(cu[:-1]) == expected
        pos = b["position_ids"][0]
        for s, e in zip(cu[:-1], cu[1:]):
            assert pos[s:e].tolist() == list(range(e - s))
        assert (b["labels"][0, cu[1:-1]] == -100).all() and b["max_seqlen"] == max(np.diff(cu))


def test_batched_reads_across_shard_boundaries(tmp_path):
    rng = np.random.default_rng(3)
    for f in range(5):
        with open(tmp_path / f"part{f}.jsonl", "w") as fh:
            for i in range(40):
                fh.write(json.dumps({"text": "x" * int(rng.integers(1, 40)) + f"{f}-{i}"}) + "\n")
    prepare(
        [str(tmp_path / "part*.jsonl")],
        "byte",
        str(tmp_path / "s"),
        workers=1,
        progress=False,
        unit_bytes=1500,
    )
    store = TokenStore(tmp_path / "s")
    assert len(store.shards) >= 3
    length = 37
    starts = np.arange(0, store.num_tokens - length, 5, dtype=np.int64)
    crossing = [
        s
        for s in starts
        if np.searchsorted(store.offsets, s, "right")
        != np.searchsorted(store.offsets, s + length - 1, "right")
    ]
    assert crossing  # some windows straddle two shards
    out = np.empty((len(starts), length), np.int64)
    store.read_windows(starts, out)
    rows, offs = store.inner_doc_starts(starts, length)
    for j, s in enumerate(starts.tolist()):
        ref = np.empty(length, np.int64)
        store.read(s, ref)
        assert np.array_equal(out[j], ref)
        want = store.doc_starts(s + 1, s + length) - s
        assert offs[rows == j].tolist() == want.tolist()
        # a document starts right after each EOS inside the window
        assert set(want.tolist()) == {p + 1 for p in np.nonzero(ref[:-1] == EOS)[0].tolist()}


def test_reset_and_seek_position_the_loader(stores):
    ld = _loader(stores, batch=2, accum=2, weights=[0.6, 0.4], varlen=True)
    want = _take(_loader(stores, batch=2, accum=2, weights=[0.6, 0.4], varlen=True), 10)
    _take(ld, 7)
    ld.reset()
    assert ld.micro == 0
    for x, y in zip(want[:3], _take(ld, 3)):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["cu_seqlens"], y["cu_seqlens"])
    ld.seek(3)  # three optimizer steps of 2 micro-batches read
    for x, y in zip(want[6:], _take(ld, 4)):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["samples"], y["samples"])
    assert ld.state_dict()["next_sample"] == 5 * ld.global_batch
    with pytest.raises(ValueError, match="step >= 0"):
        ld.seek(-1)


def test_constructor_is_keyword_only_and_from_config_matches_it(stores):
    from flame.config import Config

    with pytest.raises(TypeError):
        PreparedLoader(list(stores), [0.5, 0.5], L, 5)  # positional settings are refused
    cfg = Config()
    d = cfg.data
    d.context_len, d.batch_size, d.seed, d.varlen, d.epoch_shift = L, 3, 9, True, True
    cfg.train.grad_accum = 2
    got = PreparedLoader.from_config(cfg, list(stores), rank=1, world=2, weights=[0.7, 0.3])
    want = PreparedLoader(
        list(stores),
        context_len=L,
        batch_size=3,
        seed=9,
        rank=1,
        world=2,
        accum=2,
        weights=[0.7, 0.3],
        varlen=True,
        epoch_shift=True,
    )
    assert got.fingerprint == want.fingerprint and got.global_batch == 12
    for x, y in zip(_take(got, 4), _take(want, 4)):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
    # the overrides inspect uses: no workers, and the epoch shift a saved plan records
    plain = PreparedLoader.from_config(cfg, list(stores), rank=0, world=1, epoch_shift=False, num_workers=0)
    assert not plain.epoch_shift and plain.num_workers == 0
