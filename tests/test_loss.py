"""The objective is the token mean of the global batch: equal gradients whatever the split."""

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import final_weights, metrics, run_distributed, tiny_overrides

import flame.loss as loss_mod
from flame.config import load_config
from flame.loss import per_token_ce, sample_sums
from flame.parallel import unwrap
from flame.trainer import Trainer, run_training


@pytest.fixture
def uneven_corpus(tmp_path):
    """Documents from 3 to 3,000 bytes: windows hold very different numbers of boundaries."""
    rng = random.Random(0)
    d = tmp_path / "uneven"
    d.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for i, n in enumerate([3, 3000, 7, 40, 1200, 5, 5, 260, 11, 900, 2, 600, 17, 33, 1500, 4]):
        text = " ".join(rng.choice(words) for _ in range(n))[:n]
        (d / f"doc{i:02d}.txt").write_text(text)
    return d


def _trainer(run_dir, corpus, **extra) -> Trainer:
    over = tiny_overrides(run_dir, corpus, **{"data.varlen": True, "data.context_len": 48, **extra})
    t = Trainer(load_config(overrides=over))
    t.setup()
    return t


def _one_step_grads(t: Trainer) -> tuple[dict, float, int]:
    it = iter(t.loader)
    micro = [next(it) for _ in range(t.cfg.train.grad_accum)]
    for b in micro:  # the loader's count, used without a tensor read, is the labels' count
        assert b["num_targets"] == int(loss_mod.target_count(b["labels"]))
    loss_sum, targets = t.train_step(micro)
    grads = {n: p.grad.detach().clone() for n, p in unwrap(t.model).named_parameters()}
    return grads, float(loss_sum), targets


def _assert_grads_equal(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_chunked_cross_entropy_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(3, 17, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, 5] = labels[2, 1] = -100
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    (g_want,) = torch.autograd.grad(want, logits)
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMS", 50 * 7)  # 7 positions per chunk, recomputed
    got = per_token_ce(logits, labels)
    assert got.shape == (3, 16) and float(got[0, 4]) == 0.0 and float(got[2, 0]) == 0.0
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(got.sum(), want)
    torch.testing.assert_close(g_got, g_want)


def test_sample_sums_of_a_flattened_row():
    torch.manual_seed(1)
    ce = torch.rand(1, 3 * 8 - 1)
    labels = torch.ones(1, 24, dtype=torch.int64)
    labels[0, [8, 13, 16]] = -100
    sums, counts = sample_sums(ce, labels, 3)
    # position t predicts token t + 1, which belongs to window (t + 1) // 8
    owner = [(t + 1) // 8 for t in range(23)]
    for w in range(3):
        want = sum(float(ce[0, t]) for t in range(23) if owner[t] == w)
        assert abs(float(sums[w]) - want) < 1e-6
        assert int(counts[w]) == sum(1 for t in range(23) if owner[t] == w and labels[0, t + 1] != -100)


@pytest.mark.slow
def test_accumulation_equals_one_big_batch_with_varlen(tmp_path, uneven_corpus):
    big = _trainer(tmp_path / "big", uneven_corpus, **{"data.batch_size": 6, "train.grad_accum": 1})
    acc = _trainer(tmp_path / "acc", uneven_corpus, **{"data.batch_size": 2, "train.grad_accum": 3})
    try:
        g_big, l_big, n_big = _one_step_grads(big)
        g_acc, l_acc, n_acc = _one_step_grads(acc)
        assert n_big == n_acc
        assert abs(l_big - l_acc) < 1e-6 * n_big
        _assert_grads_equal(g_big, g_acc)

        # the data really is uneven: the old mean of micro-batch means has another gradient
        acc.optimizer.zero_grad(set_to_none=True)
        it = iter(acc.loader)
        counts = []
        for _ in range(3):
            b = next(it)
            logits = loss_mod.model_logits(acc.model, b, acc.accepts)
            ce = per_token_ce(logits, b["labels"])
            n = int(loss_mod.target_count(b["labels"]))
            counts.append(n)
            (ce.sum() / n / 3).backward()
        assert len(set(counts)) > 1, counts
        biased = {n: p.grad.detach().clone() for n, p in unwrap(acc.model).named_parameters()}
        assert any((biased[k] - g_big[k]).abs().max() > 1e-4 for k in g_big)
    finally:
        big.close()
        acc.close()


@pytest.mark.slow
def test_logged_loss_is_the_token_mean_of_documents_run_alone(tmp_path, uneven_corpus):
    """Step 1's logged loss equals a hand computation: every document of every window run alone
    through the initial model, cross-entropies summed, divided by the targets."""
    t = _trainer(tmp_path / "r", uneven_corpus, **{"data.batch_size": 2, "train.grad_accum": 2})
    try:
        model = unwrap(t.model)
        it = iter(t.loader)
        total, count = 0.0, 0
        with torch.no_grad():
            for _ in range(2):
                b = next(it)
                ids, cu = b["input_ids"][0], b["cu_seqlens"].tolist()
                for s, e in zip(cu[:-1], cu[1:]):
                    doc = ids[s:e].view(1, -1)
                    if doc.shape[1] < 2:
                        continue
                    logits = model(input_ids=doc).logits
                    total += float(F.cross_entropy(logits[0, :-1], doc[0, 1:], reduction="sum"))
                    count += doc.shape[1] - 1
    finally:
        t.close()
    cfg = load_config(
        overrides=tiny_overrides(
            tmp_path / "run",
            uneven_corpus,
            **{"data.varlen": True, "data.context_len": 48, "data.batch_size": 2, "train.grad_accum": 2},
            **{"train.max_steps": 1},
        )
    )
    run_training(cfg)
    rec = metrics(tmp_path / "run")[0]
    assert rec["target_tokens"] == count
    assert abs(rec["loss"] - total / count) < 1e-5


def _dist_grads(rank, out_dir, run_dir, corpus, strategy, accum=1):
    t = _trainer(
        run_dir,
        corpus,
        **{
            "data.batch_size": 2 // accum,  # 2 ranks x accum micro-batches x this = 4 windows
            "train.grad_accum": accum,
            "parallel.strategy": strategy,
            "log.console": "off",
        },
    )
    assert t.loss.fused  # the tiny llama's loss is fused: this is the fused path across ranks
    grads, loss_sum, targets = _one_step_grads(t)
    if strategy == "fsdp":
        grads = {k: v.full_tensor() for k, v in grads.items()}
    if rank == 0:
        torch.save({"grads": grads, "targets": targets}, os.path.join(out_dir, "grads.pt"))
    t.close()


@pytest.mark.slow
@pytest.mark.parametrize("strategy,accum", [("ddp", 1), ("fsdp", 1), ("ddp", 2)])
def test_two_ranks_equal_one_rank_with_varlen(tmp_path, uneven_corpus, strategy, accum):
    """2 ranks x micro-batch 2 (or 2 ranks x 2 micro-batches of 1, through DDP's no_sync) give
    the gradient of one rank with the global batch of 4 windows."""
    one = _trainer(tmp_path / "one", uneven_corpus, **{"data.batch_size": 4, "train.grad_accum": 1})
    try:
        g_one, _, n_one = _one_step_grads(one)
    finally:
        one.close()
    run_distributed(_dist_grads, 2, str(tmp_path), str(tmp_path / "two"), str(uneven_corpus), strategy, accum)
    got = torch.load(tmp_path / "grads.pt", weights_only=False)
    assert got["targets"] == n_one
    _assert_grads_equal(g_one, got["grads"])


def _stop_at(step):
    def cb(trainer):
        if trainer.step == step:
            trainer.stop_signal = "test"

    return cb


def _records(run_dir):
    return metrics(run_dir)


def test_spike_guard_resume_is_exact(tmp_path, corpus):
    """A 3x-plus loss at step 6 with the spike guard on: skipped by the uninterrupted run and by a
    run stopped at step 5 and resumed (the guard's running mean is in the checkpoint)."""
    over = {
        "model.name": "models_for_tests:bigram",
        "model.overrides": {"spike_calls": [6]},
        "train.spike_factor": 2.0,
        "train.max_steps": 9,
        "log.interval": 2,  # the stop at step 5 falls inside a log window
    }
    full = tmp_path / "full"
    run_training(load_config(overrides=tiny_overrides(full, corpus, **over)))
    part = tmp_path / "part"
    cfg = load_config(overrides=tiny_overrides(part, corpus, **over))
    assert run_training(cfg, callbacks=[_stop_at(5)])["step"] == 5
    assert run_training(cfg)["step"] == 9
    a, b = _records(full), _records(part)
    assert a[-1]["bad_steps"] == 1  # step 6 was skipped
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8, 9]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # the window across the stop too
    assert [r["bad_steps"] for r in a] == [r["bad_steps"] for r in b]
    wa, wb = final_weights(full), final_weights(part)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _store(tmp_path, name, text):
    from flame.data.prepare import prepare

    src = tmp_path / f"{name}.txt"
    src.write_text(text)
    out = tmp_path / f"store-{name}"
    prepare([str(src)], "byte", str(out), workers=1, progress=False)
    return out


@pytest.mark.slow
def test_per_source_loss_and_shares_over_one_block(tmp_path):
    """A random-letters source against a repeated sentence: the hard one has the higher loss, the
    achieved shares after one mixture block (1,024 samples) are the block's exact slot counts, and
    the per-source losses weighted by their targets give the overall loss."""
    from flame.data.mixture import largest_remainder

    rng = random.Random(3)
    hard = _store(tmp_path, "hard", "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(40_000)))
    easy = _store(tmp_path, "easy", "the cat sat on the mat. " * 2_000)
    over = tiny_overrides(
        tmp_path / "run",
        tmp_path,
        **{
            "data.inputs": [],
            "data.mix": f"rand={hard}:0.3,text={easy}:0.7",
            "data.context_len": 16,
            "data.batch_size": 16,
            "train.max_steps": 64,  # 64 x 16 = one block of 1,024 samples
            "log.interval": 32,
            "optim.lr": 1e-2,
        },
    )
    run_training(load_config(overrides=over))
    recs = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    last = recs[-1]
    src = last["sources"]
    assert set(src) == {"rand", "text"}
    assert src["rand"]["loss"] > src["text"]["loss"] + 0.5
    slots = largest_remainder([0.3, 0.7], 1024)
    assert [src["rand"]["tokens_total"], src["text"]["tokens_total"]] == [
        int(slots[0]) * 16,
        int(slots[1]) * 16,
    ]
    assert src["rand"]["share"] == slots[0] / 1024 and src["rand"]["target_share"] == pytest.approx(0.3)

    # the same counts, taken from the batches themselves
    t = Trainer(load_config(overrides={**over, "train.run_dir": str(tmp_path / "fresh")}))
    t.setup()
    try:
        it = iter(t.loader)
        seen = torch.zeros(2, dtype=torch.int64)
        window = torch.zeros(2, dtype=torch.int64)
        for step in range(64):
            s = next(it)["source"]
            seen += torch.bincount(s, minlength=2)
            if step >= 32:
                window += torch.bincount(s, minlength=2)
    finally:
        t.close()
    assert seen.tolist() == [int(x) for x in slots]
    assert [src["rand"]["tokens"], src["text"]["tokens"]] == [int(x) * 16 for x in window]

    for r in recs:
        s = r["sources"]
        mixed = sum(v["loss"] * v["target_tokens"] for v in s.values()) / sum(
            v["target_tokens"] for v in s.values()
        )
        assert abs(mixed - r["loss"]) < 1e-6  # fp32 sums in another order
        assert sum(v["target_tokens"] for v in s.values()) == r["target_tokens"]
    from flame.errors import FlameError
    from flame.plot import plot_runs, source_names

    assert source_names(recs) == ["rand", "text"]
    png = plot_runs([str(tmp_path / "run")], tmp_path / "by-source.png", by_source=True)
    assert png.is_file() and png.stat().st_size > 10_000
    single = {**over, "train.run_dir": str(tmp_path / "single"), "train.max_steps": 1}
    run_training(load_config(overrides={**single, "data.mix": "", "data.store": str(easy)}))
    with pytest.raises(FlameError, match="per-source"):
        plot_runs([str(tmp_path / "single")], tmp_path / "x.png", by_source=True)


def test_streaming_varlen_counts_its_targets(tmp_path, uneven_corpus):
    t = _trainer(tmp_path / "s", uneven_corpus, **{"data.streaming": True, "data.window": 8})
    try:
        it = iter(t.loader)
        for _ in range(3):
            b = next(it)
            assert b["num_targets"] == int(loss_mod.target_count(b["labels"]))
            assert len(b["cu_seqlens"]) > 2  # the count covers real boundaries
    finally:
        t.close()


def test_router_loss_of_a_mixture_of_experts_joins_the_objective(tmp_path, corpus):
    """With output_router_logits, flame's gradient equals the one of the model's own loss
    (mean cross-entropy + router_aux_loss_coef x load-balancing loss) on one micro-batch."""
    from zoo import write_config as zoo_config

    over = tiny_overrides(
        tmp_path / "r", corpus, **{"model.name": zoo_config(tmp_path, "qwen3_moe", output_router_logits=True)}
    )
    over.pop("model.overrides")
    t = Trainer(load_config(overrides=over))
    t.setup()
    try:
        assert t.aux_coef > 0
        model = unwrap(t.model)
        batch = next(iter(t.loader))
        t.train_step([batch])
        ours = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        t.optimizer.zero_grad(set_to_none=True)
        x = batch["input_ids"]
        model(input_ids=x, labels=x).loss.backward()
        theirs = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        _assert_grads_equal(ours, theirs)
        t.optimizer.zero_grad(set_to_none=True)
        t.aux_coef = 0.0  # without the router loss the router's gradient is another one
        t.train_step([batch])
        router = [n for n in ours if "gate" in n and "proj" not in n]
        assert router and any(
            (dict(model.named_parameters())[n].grad - ours[n]).abs().max() > 1e-6 for n in router
        )
    finally:
        t.close()


def test_bad_step_streak_survives_a_restart(tmp_path, corpus):
    """NaN at steps 4, 5, 6 with max_bad_steps 3: an uninterrupted run stops at step 6, and so does
    one stopped at step 5 (inside the streak) and resumed."""
    over = {
        "model.name": "models_for_tests:bigram",
        "model.overrides": {"bad_calls": [4, 5, 6]},
        "train.max_bad_steps": 3,
        "train.max_steps": 9,
    }
    full = run_training(load_config(overrides=tiny_overrides(tmp_path / "full", corpus, **over)))
    assert (full["stopped"], full["step"]) == ("diverged", 6)
    cfg = load_config(overrides=tiny_overrides(tmp_path / "part", corpus, **over))
    assert run_training(cfg, callbacks=[_stop_at(5)])["step"] == 5
    again = run_training(cfg)
    assert (again["stopped"], again["step"]) == ("diverged", 6)


@pytest.mark.slow
def test_end_of_run_sample_stays_inside_positions_and_vocabulary(tmp_path, corpus):
    """A padded vocabulary never samples the unused rows (the byte tokenizer cannot decode them),
    and learned positions as long as the context are never exceeded."""
    padded = tiny_overrides(
        tmp_path / "p",
        corpus,
        **{"train.max_steps": 2, "train.sample_tokens": 60, "model.pad_vocab_multiple": 64},
    )
    assert run_training(load_config(overrides=padded))["stopped"] == "done"
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(
        json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64})
    )
    short = tiny_overrides(tmp_path / "g", corpus, **{"model.name": str(gpt2), "train.max_steps": 2})
    short.pop("model.overrides")
    short["train.sample_tokens"] = 120
    assert run_training(load_config(overrides=short))["stopped"] == "done"


def test_sampling_never_produces_padded_rows():
    from flame.generate import sample_ids

    class Loud(torch.nn.Module):  # puts all its mass on a padded row
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 320)
            logits[..., 300] = 50.0
            return logits

    out = sample_ids(Loud(), [1, 2], 20, 32, temperature=1.0, vocab=257, seed=3)
    assert len(out) == 20 and max(out) < 257
    assert sample_ids(Loud(), [1, 2], 5, 32, temperature=0.0, vocab=None) == [300] * 5


@pytest.mark.slow
def test_per_source_tokens_leave_out_skipped_steps(tmp_path):
    """With data.skip inside a log window, each source's tokens count only the trained steps:
    equal to counting the sources of the batches of those steps."""
    rng = random.Random(4)
    a = _store(tmp_path, "a", "".join(rng.choice("abcdefgh ") for _ in range(20_000)))
    b = _store(tmp_path, "b", "the dog ran. " * 2_000)
    over = tiny_overrides(
        tmp_path / "run",
        tmp_path,
        **{
            "data.inputs": [],
            "data.mix": f"a={a}:0.5,b={b}:0.5",
            "data.context_len": 16,
            "data.batch_size": 8,
            "data.skip": "2-3,6",
            "train.max_steps": 8,
            "log.interval": 4,
        },
    )
    run_training(load_config(overrides=over))
    recs = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [4, 8] and recs[-1]["skipped_steps"] == 3
    t = Trainer(load_config(overrides={**over, "train.run_dir": str(tmp_path / "fresh"), "data.skip": ""}))
    t.setup()
    try:
        it = iter(t.loader)
        per_step = [torch.bincount(next(it)["source"], minlength=2) for _ in range(8)]
    finally:
        t.close()
    trained = [s for s in range(1, 9) if s not in (2, 3, 6)]
    for rec, steps in ((recs[0], range(1, 5)), (recs[1], range(5, 9))):
        want = sum(per_step[s - 1] for s in steps if s in trained)
        assert [rec["sources"][n]["tokens"] for n in ("a", "b")] == [int(x) * 16 for x in want]
    total = sum(per_step[s - 1] for s in trained)
    assert [recs[-1]["sources"][n]["tokens_total"] for n in ("a", "b")] == [int(x) * 16 for x in total]
