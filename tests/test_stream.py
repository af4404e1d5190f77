"""Streaming mode: disjoint deal, nothing dropped, exact resume, tiny state, varlen boundaries, no hang."""

import json
import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from flame.config import load_config
from flame.data.stream import StreamingLoader, slot_unit, streaming_units, window_order
from flame.data.tokenizer import load_tokenizer
from flame.errors import DataError
from flame.parallel import World

EOS = 256  # the byte tokenizer's
CPU = torch.device("cpu")


def _write_corpus(root, docs_per_file, seed=0):
    """jsonl files of distinct documents of uneven lengths; returns {path: [texts]}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, n in enumerate(docs_per_file):
        texts = [
            f"<{i}.{j}>" + "".join(rng.choice(list("abcdefgh "), int(rng.integers(1, 60)))) for j in range(n)
        ]
        p = root / f"part{i:02d}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        files[str(p)] = texts
    return files


def _file_tokens(texts):
    out = []
    for t in texts:
        out.extend(t.encode())
        out.append(EOS)
    return np.array(out, dtype=np.int64)


def _loader(inputs, rank=0, world=1, **over):
    o = {
        "data.inputs": [str(inputs)],
        "data.streaming": True,
        "data.context_len": 16,
        "data.batch_size": 3,
        "data.window": 4,
        **over,
    }
    cfg = load_config(overrides=o)
    return StreamingLoader.from_config(
        cfg, cfg.data.inputs, load_tokenizer("byte"), World(rank, world, 0, CPU)
    )


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_deal_partitions_every_epoch():
    for n in (1, 2, 5, 13):
        for epoch in range(3):
            units = [slot_unit(g, n, seed=7, shuffle=True) for g in range(epoch * n, (epoch + 1) * n)]
            assert sorted(units) == list(range(n))
        assert [slot_unit(g, n, 7, False) for g in range(2 * n)] == list(range(n)) * 2
    orders = {tuple(slot_unit(g, 13, 7, True) for g in range(e * 13, (e + 1) * 13)) for e in range(4)}
    assert len(orders) == 4  # a new unit shuffle each epoch
    w = window_order(8, 1, 0, 0, True)
    assert sorted(w) == list(range(8))
    assert not np.array_equal(window_order(8, 1, 0, 0, True), window_order(8, 1, 0, 1, True))
    assert not np.array_equal(window_order(8, 1, 0, 0, True), window_order(8, 1, 1, 0, True))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_zero_read_exactly_once(tmp_path, world):
    files = _write_corpus(tmp_path / "c", [9, 3, 14, 6, 1, 11, 5])
    paths = sorted(files)
    n = len(paths)
    loaders = [_loader(tmp_path / "c", r, world) for r in range(world)]
    spec = loaders[0].spec
    assert [u.path for u in spec.units] == paths  # small files: one unit each
    L, M, B, S = 16, 4, 3, world
    seen = Counter()
    shuffled = False
    for r, loader in enumerate(loaders):
        # stream r reads slots r, r+S, ...; its tokens are those units' documents back to back
        slots = list(range(r, 4 * n, S))
        stream = np.concatenate([_file_tokens(files[paths[slot_unit(g, n, spec.seed, True)]]) for g in slots])
        epoch0 = sum(
            len(_file_tokens(files[paths[slot_unit(g, n, spec.seed, True)]])) for g in slots if g < n
        )
        windows = math.ceil(epoch0 / (M * L))
        got = np.concatenate([b["input_ids"].numpy() for b in _take(loader, math.ceil(windows * M / B))])
        for w in range(windows):
            emitted = got[w * M : (w + 1) * M]
            want = stream[w * M * L : (w + 1) * M * L].reshape(M, L)
            # a window is emitted whole, in a shuffled order
            assert sorted(map(tuple, emitted)) == sorted(map(tuple, want)), (r, w)
            shuffled |= not np.array_equal(emitted, want)
        seen.update(stream[:epoch0].tolist())
    corpus = Counter(np.concatenate([_file_tokens(files[p]) for p in paths]).tolist())
    assert seen == corpus  # every token of epoch 0 once, across all streams, nothing dropped
    assert shuffled


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("varlen", [False, True])
def test_resume_is_exact(tmp_path, workers, varlen):
    _write_corpus(tmp_path / "c", [7, 2, 12, 4, 9])
    over = {"data.num_workers": workers, "data.varlen": varlen}
    k, m = 7, 30  # 7 micro-batches: mid-window, and (with 2 workers) the other worker is next
    full = _take(_loader(tmp_path / "c", **over), k + m)
    first = _loader(tmp_path / "c", **over)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    assert len(json.dumps(state)) <= 4096 * max(1, workers)
    assert len(pickle.dumps(state)) <= 4096 * max(1, workers)
    again = _loader(tmp_path / "c", **over)
    again.load_state_dict(state)
    rest = _take(again, m)
    for a, b in zip(full[k:], rest):
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(a[key]):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key
    assert again.epoch() > 1  # the run crossed epoch boundaries without a hitch


def test_resume_twice_and_state_between_steps_only(tmp_path):
    _write_corpus(tmp_path / "c", [5, 8, 3])
    full = _take(_loader(tmp_path / "c", **{"train.grad_accum": 2}), 24)
    out, state = [], None
    for chunk in (6, 10, 8):
        loader = _loader(tmp_path / "c", **{"train.grad_accum": 2})
        if state is not None:
            loader.load_state_dict(state)
        it = iter(loader)
        out += [next(it) for _ in range(chunk)]
        state = loader.state_dict()
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, out))
    next(it)
    with pytest.raises(RuntimeError):
        loader.state_dict()  # mid-step


def test_varlen_boundaries_are_document_boundaries(tmp_path):
    _write_corpus(tmp_path / "c", [6, 9, 4])
    loader = _loader(tmp_path / "c", **{"data.varlen": True, "data.batch_size": 4})
    B, L = 4, 16
    docs_inside = 0
    for b in _take(loader, 40):
        ids = b["input_ids"][0].numpy()
        cu = b["cu_seqlens"].numpy()
        assert b["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * L
        want = {0}
        for r in range(B):
            want.add(r * L)
            want.update(r * L + i for i in range(1, L) if ids[r * L + i - 1] == EOS)
        assert set(cu[:-1].tolist()) == want and list(cu) == sorted(cu)
        docs_inside += len(want) - B
        pos = b["position_ids"][0].numpy()
        for a, z in zip(cu[:-1], cu[1:]):
            assert list(pos[a:z]) == list(range(z - a))
        labels = b["labels"][0].numpy()
        masked = set(np.flatnonzero(labels == -100).tolist())
        assert masked == set(cu[1:-1].tolist())
        keep = labels != -100
        assert np.array_equal(labels[keep], ids[keep])
        assert b["max_seqlen"] == int(np.diff(cu).max())
    assert docs_inside > 20  # boundaries inside samples were exercised


def test_all_ranks_yield_forever_with_uneven_units(tmp_path):
    files = _write_corpus(tmp_path / "c", [40, 1])  # 2 units of very different size, 3 ranks
    total = sum(len(_file_tokens(t)) for t in files.values())
    per_rank_epoch = total // (3 * 16 * 3)
    for r in range(3):
        loader = _loader(tmp_path / "c", r, 3)
        batches = _take(loader, 3 * per_rank_epoch + 5)
        assert all(b["input_ids"].shape == (3, 16) for b in batches)
        assert loader.epoch() > 0


def test_refuses_another_layout_unless_allowed(tmp_path):
    _write_corpus(tmp_path / "c", [5, 5, 5, 5])
    a = _loader(tmp_path / "c")
    _take(a, 5)
    state = a.state_dict()
    with pytest.raises(DataError, match="num_workers"):
        _loader(tmp_path / "c", **{"data.num_workers": 2}).load_state_dict(state)
    with pytest.raises(DataError, match="cannot be re-split"):
        _loader(tmp_path / "c", 0, 2).load_state_dict(state)
    with pytest.raises(DataError, match="differs"):
        _loader(tmp_path / "c", **{"data.seed": 5}).load_state_dict(state)
    b = _loader(tmp_path / "c", 1, 2)
    b.load_state_dict(state, allow_change=True)
    st = b.local_states()[0]
    assert st["slot"] == 4 + 1 and st["window"] == 0  # stream 1 starts afresh in epoch 1
    assert len(_take(b, 3)) == 3


def test_layout_refusal_names_the_checkpoint_layout(tmp_path):
    from flame.data.stream import check_resume_layout
    from flame.errors import ConfigError

    _write_corpus(tmp_path / "c", [5, 5, 5, 5])
    a = _loader(tmp_path / "c", **{"data.num_workers": 3})
    _take(a, 4)
    state = a.state_dict()
    with pytest.raises(DataError) as e:
        _loader(tmp_path / "c").load_state_dict(state)
    assert "resume in one process (no torchrun) with --data.num_workers 3" in e.value.hint
    check_resume_layout(state, 1, 3)  # the same layout: nothing to say
    with pytest.raises(ConfigError, match="with --data.num_workers 3, as the checkpoint was taken") as e:
        check_resume_layout(state, 2, 3)
    assert e.value.exit_code == 2
    two = {**state, "world_size": 2, "workers": 1}
    with pytest.raises(ConfigError, match=r"on 2 processes \(torchrun --nproc_per_node 2\) with --data"):
        check_resume_layout(two, 1, 0)
    check_resume_layout({"kind": "prepared", "world_size": 2}, 1, 0)  # not a stream position


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.jsonl").write_text("")
    with pytest.raises(DataError, match="no data"):
        _loader(tmp_path / "e")
    (tmp_path / "e" / "a.jsonl").write_text('{"text": ""}\n' * 3)
    with pytest.raises(DataError, match="without a usable document"):
        _take(_loader(tmp_path / "e"), 1)


def test_bad_records_warned_and_worker_errors_reach_the_user(tmp_path, capfd):
    d = tmp_path / "b"
    _write_corpus(d, [6, 6])
    with open(d / "part01.jsonl", "a") as f:
        f.write("{not json\n")
    _take(_loader(d, **{"data.shuffle": False, "data.window": 1}), 12)
    assert "part01.jsonl:7" in capfd.readouterr().err
    with pytest.raises(DataError, match=r"part01\.jsonl:7: malformed JSON") as e:
        _take(_loader(d, **{"data.bad_records": "error", "data.num_workers": 2}), 40)
    assert "Traceback" not in str(e.value)


def test_units_split_big_jsonl_not_text(tmp_path):
    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "y" * 1000}) + "\n"
    big.write_text(line * 5000)  # ~5 MB: split into ~1 MiB byte ranges
    txt = tmp_path / "big.txt"
    txt.write_text("z" * (5 << 20))
    units = streaming_units([str(big), str(txt)])
    assert len([u for u in units if u.path == str(big)]) == 5
    assert len([u for u in units if u.path == str(txt)]) == 1


@pytest.mark.slow
def test_trainer_streams_and_resumes_exactly(tmp_path, corpus):
    from test_trainer import _losses, _stop_at

    from flame.trainer import run_training

    n = 4
    extra = {"data.streaming": True, "data.window": 8, "train.max_steps": 2 * n, "data.num_workers": 2}
    run_training(load_config(overrides=tiny_overrides(tmp_path / "full", corpus, **extra)))
    cfg = load_config(overrides=tiny_overrides(tmp_path / "part", corpus, **extra))
    assert run_training(cfg, callbacks=[_stop_at(n)])["step"] == n
    assert run_training(cfg)["step"] == 2 * n
    a, _ = _losses(tmp_path / "full")
    b, _ = _losses(tmp_path / "part")
    assert list(b) == list(range(1, 2 * n + 1))
    for s in range(1, 2 * n + 1):
        assert a[s] == b[s], f"step {s}: {a[s]} != {b[s]}"


def _two_rank_worker(rank, init, root, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        first = _loader(root, rank, 2)
        it = iter(first)
        for _ in range(4):
            next(it)
        state = first.state_dict()  # collective: every rank's streams
        tail = [next(it)["input_ids"] for _ in range(5)]
        again = _loader(root, rank, 2)
        again.load_state_dict(state)
        resumed = _take(again, 5)
        ok = all(torch.equal(a, b["input_ids"]) for a, b in zip(tail, resumed))
        torch.save({"streams": sorted(state["streams"]), "ok": ok}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_gather_state(tmp_path):
    import torch.multiprocessing as mp

    _write_corpus(tmp_path / "c", [5, 7, 3, 9])
    init = f"file://{tmp_path / 'pg'}"
    mp.spawn(_two_rank_worker, args=(init, str(tmp_path / "c"), str(tmp_path)), nprocs=2)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["streams"] == ["0", "1"] and res["ok"]


@pytest.mark.slow
def test_resume_on_another_world_size_names_the_resume_that_works(tmp_path, corpus):
    """A checkpoint of 1 process resumed on 2 with data.batch_size 4: the global batch of 4 does not
    split into 2 x 4, so flame used to suggest --data.batch_size 2, and then refused that too (the
    streams cannot be re-split). Now the first answer is the stream layout's, and each way out it
    names works: the checkpoint's layout continues exactly; allow_config_change (then the batch
    size that keeps the global batch) runs on."""
    import shutil

    from conftest import run_torchrun, write_config
    from test_trainer import _losses, _stop_at

    from flame.trainer import run_training

    n = 4
    extra = {"data.streaming": True, "data.window": 8, "train.max_steps": 2 * n}
    run_training(load_config(overrides=tiny_overrides(tmp_path / "full", corpus, **extra)))
    part = tmp_path / "part"
    over = tiny_overrides(part, corpus, **extra)
    assert run_training(load_config(overrides=over), callbacks=[_stop_at(n)])["step"] == n
    shutil.copytree(part, tmp_path / "alt")
    toml = write_config(tmp_path / "part.toml", over)
    before = sorted(p.name for p in part.rglob("*"))

    r = run_torchrun(2, ["train", "--config", str(toml)])
    assert r.returncode != 0
    assert "streams cannot be re-split" in r.stderr
    assert "src/flame" not in r.stderr  # flame's message, no traceback of ours (torchrun adds its own)
    assert "resume in one process (no torchrun) with --data.num_workers 0 (or 1)" in r.stderr
    assert "--data.batch_size" not in r.stderr  # no advice that the next start would refuse
    assert "exitcode: 2" in r.stderr or "exit code: 2" in r.stderr  # a config error on each rank
    assert sorted(p.name for p in part.rglob("*")) == before  # the refused start changed nothing

    # the hint, literally: one process, no loader workers -> the run continues exactly
    assert run_training(load_config(overrides=over))["step"] == 2 * n
    a, _ = _losses(tmp_path / "full")
    b, _ = _losses(part)
    assert list(b) == list(range(1, 2 * n + 1))
    for s in range(1, 2 * n + 1):
        assert a[s] == b[s], f"step {s}: {a[s]} != {b[s]}"

    # the other way out: keep the 2 processes with allow_config_change, and the batch size that
    # keeps the global batch of 4 (2 x 2; flame asks for it when the given one does not fit): the
    # run goes on, its streams restarted at an epoch start
    alt = ["--train.run_dir", str(tmp_path / "alt"), "--checkpoint.allow_config_change", "true"]
    r = run_torchrun(2, ["train", "--config", str(toml), *alt, "--data.batch_size", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the data streams restart at epoch" in r.stdout + r.stderr
    c, _ = _losses(tmp_path / "alt")
    assert list(c) == list(range(1, 2 * n + 1)) and all(c[s] == a[s] for s in range(1, n + 1))
