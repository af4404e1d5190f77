"""Data that evolves with the run: mixture phases and ramps, re-weighting on resume, skipped steps,
fresh windows each epoch. Everything is compared by equality."""

import json
import tomllib

import numpy as np
import pytest
from conftest import TINY
from conftest import make_token_store as _make_store

from flame.config import Config, config_from_dict, load_config
from flame.data.loader import PreparedLoader
from flame.data.mixture import DataPlan, MixtureSchedule, PhasedSchedule, largest_remainder
from flame.data.packed import SkipRanges, StoreSamples, parse_skip
from flame.errors import ConfigError, DataError

L = 16
B, W = 4, 2  # micro-batch, world: G = 8 (x accum)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return {
        n: _make_store(d / n, docs, i + 1)
        for i, (n, docs) in enumerate((("web", 400), ("code", 150), ("books", 200)))
    }


def _plan(stores, phases):
    return DataPlan.from_specs(
        [{**p, "mix": ",".join(f"{n}={stores[n].path}:{w}" for n, w in p["mix"].items())} for p in phases]
    )


PHASES = [
    {"start_step": 0, "mix": {"web": 0.8, "code": 0.2}},
    {"start_step": 300, "mix": {"web": 0.5, "code": 0.2, "books": 0.3}, "ramp_steps": 200},
    {"start_step": 700, "mix": {"books": 0.6, "code": 0.4}},
]


def _loader(stores, plan, rank=0, world=1, batch=B * W, accum=1, seed=3):
    return PreparedLoader(
        [stores[n] for n in plan.names],
        context_len=L,
        seed=seed,
        rank=rank,
        world=world,
        batch_size=batch,
        accum=accum,
        plan=plan,
    )


def _steps(loader, first, count):
    """(input ids, sources) of the global batches of steps first..first+count-1 (0-based), all ranks."""
    it = iter(loader)
    out = []
    for _ in range(count):
        out.append(next(it))
    return out


# ---------------------------------------------------------------- the schedule


def test_one_phase_is_the_plain_mixture():
    w = [0.7, 0.2, 0.1]
    a, b = MixtureSchedule(w, 11), PhasedSchedule([0], [w], 11)
    for start, count in ((0, 5000), (1023, 3), (77_777, 4096)):
        sa, na = a.assign(start, count)
        sb, nb = b.assign(start, count)
        assert np.array_equal(sa, sb) and np.array_equal(na, nb)
    for k in (0, 1, 1024, 5555, 10**6):
        assert np.array_equal(a.consumed(k), b.consumed(k))


def _schedule(stores, G=8):
    plan = _plan(stores, PHASES)
    starts, weights = plan.segments(G)
    return plan, PhasedSchedule(starts, weights, 3)


def test_sources_are_dense_across_phases_and_ramps(stores):
    plan, sch = _schedule(stores)
    K = 900 * 8
    src, n = sch.assign(0, K)
    for s in range(3):  # source s's samples are 0, 1, 2, ... in order of k: none repeats, none skipped
        assert np.array_equal(n[src == s], np.arange(int((src == s).sum())))
    for k in (0, 1, 2399, 2400, 2401, 4000, 5600, 5601, K):
        assert np.array_equal(sch.consumed(k), np.bincount(src[:k], minlength=3))
    for start, count in ((2390, 25), (2400, 8), (5595, 17), (0, 1), (4321, 1000)):  # any range on its own
        s2, n2 = sch.assign(start, count)
        assert np.array_equal(s2, src[start : start + count]) and np.array_equal(n2, n[start : start + count])


def test_shares_per_phase_equal_block_rounding(stores):
    plan, sch = _schedule(stores, G=1024)  # phases start on block boundaries
    for i, (a, b) in enumerate(((0, 300), (500, 700), (700, 720))):
        src, _ = sch.assign(a * 1024, (b - a) * 1024)
        w = plan.weight_vector(plan.phases[[0, 1, 2][i]]["mix"])
        active = [s for s in range(3) if w[s] > 0]
        want = np.zeros(3, np.int64)
        want[active] = largest_remainder([w[s] for s in active], 1024)
        per_block = np.stack([np.bincount(x, minlength=3) for x in src.reshape(-1, 1024)])
        assert (per_block == want).all(), i
    # the ramp: 200 blocks in 64 pieces, each piece's blocks at the piece's interpolated weights
    starts, weights = plan.segments(1024)
    pieces = [(k, w) for k, w in zip(starts, weights) if 300 * 1024 <= k < 500 * 1024]
    assert len(pieces) == 64 and pieces[0][0] == 300 * 1024
    old, new = (
        np.array(plan.weight_vector(PHASES[0]["mix"])),
        np.array(plan.weight_vector(plan.phases[1]["mix"])),
    )
    assert np.allclose(pieces[0][1], old + 0.5 / 64 * (new - old))
    k0, w0 = pieces[10]
    src, _ = sch.assign(k0, 1024)
    assert np.array_equal(np.bincount(src, minlength=3), largest_remainder(w0, 1024))


# ---------------------------------------------------------------- resume: exact and elastic


@pytest.mark.parametrize("stop", [299, 300, 301, 450, 700])
def test_resume_at_and_after_a_boundary_on_another_world_size(stores, stop):
    plan = _plan(stores, PHASES)
    G, first, count = B * W, stop - 2, 6
    full = _loader(stores, plan, batch=G)
    full.seek(first)
    want = _steps(full, first, count)
    # saved on 2 ranks at `stop`, resumed on 1 rank with accum 2 (or on 4 ranks)
    saver = _loader(stores, plan, rank=0, world=W, batch=B)
    saver.seek(stop)
    state = saver.state_dict()
    for world, accum in ((1, 2), (4, 1)):
        got_ids = []
        for r in range(world):
            ld = _loader(
                stores, _plan(stores, PHASES), rank=r, world=world, batch=G // (world * accum), accum=accum
            )
            ld.load_state_dict(state)
            assert ld.plan.to_dict() == saver.plan.to_dict()  # an unchanged plan: no new phase
            it = iter(ld)
            got_ids.append([next(it) for _ in range((count - 2) * accum)])
        for j in range(count - 2):  # step stop + j: the global batch is the concatenation over (micro, rank)
            parts = [got_ids[r][j * accum + a] for a in range(accum) for r in range(world)]
            ids = np.concatenate([p["input_ids"].numpy() for p in parts])
            src = np.concatenate([p["source"].numpy() for p in parts])
            ks = np.concatenate([p["samples"].numpy() for p in parts])
            ref = want[stop - first + j]
            assert np.array_equal(ks, ref["samples"].numpy())
            assert np.array_equal(ids, ref["input_ids"].numpy()) and np.array_equal(
                src, ref["source"].numpy()
            )


# ---------------------------------------------------------------- re-weighting on resume


def test_reweight_on_resume_is_a_new_phase(stores, tmp_path):
    A = _plan(stores, [{"start_step": 0, "mix": {"web": 0.7, "code": 0.3}}])
    Bp = _plan(stores, [{"start_step": 0, "mix": {"code": 0.5, "books": 0.5}}])
    N, G = 123, B * W
    run = _loader(stores, A, batch=G)
    before = _steps(run, 0, N)
    state = run.state_dict()
    resumed = _loader(stores, Bp, batch=G)
    resumed.load_state_dict(state)
    plan = resumed.plan
    assert plan.names == ["web", "code", "books"]  # earlier sources keep their ids; new ones appended
    assert [(p["start_step"], p.get("origin")) for p in plan.phases] == [(0, None), (N, "resume")]
    assert resumed.stores[0] is None  # web is not read any more
    after = _steps(resumed, N, 200)
    # steps <= N are reproduced exactly from the new plan (what `flame inspect` does)
    replay = _loader(stores, DataPlan.from_dict(json.loads(json.dumps(plan.to_dict()))), batch=G)
    again = _steps(replay, 0, N + 200)
    for x, y in zip(before + after, again):
        assert np.array_equal(x["input_ids"].numpy(), y["input_ids"].numpy())
        assert np.array_equal(x["source"].numpy(), y["source"].numpy())
    # steps > N follow B: no web, code and books at their block shares
    sch = replay.source.schedule
    src, n = sch.assign(N * G, 200 * G)
    assert not (src == 0).any()
    k0 = N * G
    blocks = np.stack(
        [np.bincount(x, minlength=3) for x in src[: (200 * G // 1024) * 1024].reshape(-1, 1024)]
    )
    assert (blocks == [0, 512, 512]).all()
    # per-source ids continue: code's samples after N start where they stopped, none repeats
    used = sch.consumed(k0)
    assert used[1] == np.count_nonzero(sch.assign(0, k0)[0] == 1)
    assert np.array_equal(n[src == 1], used[1] + np.arange(int((src == 1).sum())))
    assert np.array_equal(n[src == 2], np.arange(int((src == 2).sum())))
    # shares reported for the step last read are the new phase's
    resumed.seek(N + 5)
    assert resumed.weights == [0.0, 0.5, 0.5]


def test_resume_refuses_what_rewrites_the_past(stores):
    plan = _plan(stores, [{"start_step": 0, "mix": {"web": 0.7, "code": 0.3}}])
    run = _loader(stores, plan)
    run.seek(10)
    state = run.state_dict()
    other = _loader(stores, plan, seed=4)  # another data seed
    with pytest.raises(DataError, match="data.seed"):
        other.load_state_dict(state)
    swapped = DataPlan.from_specs(
        [{"start_step": 0, "mix": f"web={stores['books'].path}:0.7,code={stores['code'].path}:0.3"}]
    )
    ld = PreparedLoader(
        [stores["books"], stores["code"]], context_len=L, seed=3, batch_size=B * W, plan=swapped
    )
    with pytest.raises(DataError, match="source web"):
        ld.load_state_dict(state)


# ---------------------------------------------------------------- skip ranges


def test_skip_ranges():
    sk = SkipRanges("1200-1250, 3000,5-6")
    assert sk.ranges == [(5, 6), (1200, 1250), (3000, 3000)]
    assert [s for s in range(1, 10) if sk(s)] == [5, 6]
    assert sk.through(4) == 0 and sk.through(6) == 2 and sk.through(1300) == 53 and sk.through(10**6) == 54
    for bad in ("a-b", "0-3", "9-3"):
        with pytest.raises(ValueError):
            parse_skip(bad)


# ---------------------------------------------------------------- fresh windows each epoch


def test_epoch_shift_fresh_windows_and_coverage(stores):
    st = stores["code"]
    plain = StoreSamples(st, L, 9, True)
    shifted = StoreSamples(st, L, 9, True, epoch_shift=True)
    N, T = plain.num_samples, st.num_tokens
    k0 = np.arange(N)
    assert np.array_equal(plain.starts(k0), shifted.starts(k0))  # epoch 0 is unchanged
    slack = T - N * L
    seen_offsets = set()
    for e in (1, 2, 3, 4):
        ks = np.arange(e * N, (e + 1) * N)
        starts = shifted.starts(ks)
        o = int(shifted.shifts(np.array([e]))[0])
        seen_offsets.add(o)
        assert 0 <= o < L
        assert not np.array_equal(np.sort(starts), np.sort(plain.starts(ks))) or o == 0
        cover = np.zeros(T, np.int64)
        for s in starts.tolist():
            cover[s : s + L] += 1
        want = np.zeros(T, np.int64)  # the documented edge
        want[o : o + N * L] = 1
        if o > slack:
            want[o + (N - 1) * L :] = 0
            want[o : o + (N - 1) * L] = 1
            want[T - L :] += 1
        assert np.array_equal(cover, want), e
    assert len(seen_offsets) > 1


# ---------------------------------------------------------------- the config


def test_phases_config_round_trip_and_errors(stores, tmp_path):
    web, code = stores["web"].path, stores["code"].path
    phases = [
        {"start_step": 0, "mix": f"web={web}:0.8,code={code}:0.2"},
        {"start_step": 50, "mix": f"web={web}:0.5,code={code}:0.5", "ramp_steps": 10},
    ]
    cfg = load_config(overrides={"data.phases": phases, "data.skip": "3-4", "data.epoch_shift": True})
    again = config_from_dict(tomllib.loads(cfg.to_toml()))
    assert again.data.phases == phases and again.data.skip == "3-4"
    cli = load_config(["--data.phases", json.dumps(phases)])
    assert cli.data.phases == phases
    bad = [
        ({"data.phases": [{"start_step": 5, "mix": f"{web}:1"}]}, "must start at 0"),
        (
            {"data.phases": [{"start_step": 0, "mix": f"{web}:1"}, {"start_step": 0, "mix": f"{code}:1"}]},
            "after the previous",
        ),
        ({"data.phases": [{"start_step": 0, "mix": "nope:1"}]}, "no such store"),
        ({"data.phases": [{"start_step": 0, "mix": f"{web}:1", "weights": 1}]}, "unknown key"),
        ({"data.phases": phases, "data.mix": f"{web}:1"}, "only one of"),
        ({"data.skip": "x-y"}, "data.skip"),
    ]
    for over, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            load_config(overrides=over)
    assert Config().data.phases == []


# ---------------------------------------------------------------- through the trainer


def _train(run_dir, stores, **extra):
    from flame.trainer import run_training

    over = {
        "model.overrides": dict(TINY),
        "data.context_len": 32,
        "data.batch_size": 4,
        "train.run_dir": str(run_dir),
        "train.max_steps": 8,
        "train.sample_tokens": 0,
        "optim.warmup_steps": 2,
        "log.interval": 1,
        "log.console": "off",
        "log.batches": True,
        "checkpoint.interval": 0,
    }
    over.update(extra)
    return run_training(load_config(overrides=over))


def _records(run_dir, name="metrics.jsonl"):
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


@pytest.mark.slow
def test_trainer_skip_reweight_and_inspect(stores, tmp_path):
    from flame.inspect import inspect_step

    web, code, books = (str(stores[n].path) for n in ("web", "code", "books"))
    mix_a = f"web={web}:0.7,code={code}:0.3"
    # a run with skipped steps vs one without: the other steps read the same batches
    _train(tmp_path / "plain", stores, **{"data.mix": mix_a})
    _train(tmp_path / "skip", stores, **{"data.mix": mix_a, "data.skip": "3-4"})
    plain = {(r["step"], r["micro"]): r["sha"] for r in _records(tmp_path / "plain", "batches/rank-0.jsonl")}
    skip = {(r["step"], r["micro"]): r["sha"] for r in _records(tmp_path / "skip", "batches/rank-0.jsonl")}
    assert sorted(s for s, _ in skip) == [1, 2, 5, 6, 7, 8]  # skipped batches never reach the model
    assert all(skip[k] == plain[k] for k in skip)
    train = [r for r in _records(tmp_path / "skip") if r["kind"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in train] == [
        (1, 0),
        (2, 0),
        (5, 2),
        (6, 2),
        (7, 2),
        (8, 2),
    ]
    assert inspect_step(tmp_path / "skip", 3, tokens=0)["skipped"] is True

    # re-weight on resume: steps 1-4 under A, then B (with a new source) from step 5 on
    run = tmp_path / "rew"
    _train(run, stores, **{"data.mix": mix_a, "train.max_steps": 4})
    _train(run, stores, **{"data.mix": f"code={code}:0.5,books={books}:0.5", "train.max_steps": 8})
    plan = json.loads((run / "data_plan.json").read_text())
    assert [p["start_step"] for p in plan["phases"]] == [0, 4]
    assert [s["name"] for s in plan["sources"]] == ["web", "code", "books"]
    logged = {(r["step"], r["micro"]): r["sha"] for r in _records(run, "batches/rank-0.jsonl")}
    for step in range(1, 9):  # inspect reconstructs every step exactly as logged
        rep = inspect_step(run, step, tokens=0)
        assert rep["micro_batches"][0]["sha"] == logged[(step, 0)]
        srcs = {x["source"] for x in rep["micro_batches"][0]["samples"]}
        assert srcs <= ({"web", "code"} if step <= 4 else {"code", "books"})
    assert all(logged[(s, 0)] == plain[(s, 0)] for s in range(1, 5))
    rec = [r for r in _records(run) if r["kind"] == "train" and r["step"] == 8][0]
    assert rec["sources"]["books"]["target_share"] == 0.5 and rec["sources"]["web"]["target_share"] == 0.0
