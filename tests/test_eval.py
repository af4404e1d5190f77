"""Held-out evaluation (flame.evaluate): the whole set, a spread subset, bits per byte, per-source
loss of a mixture, varlen boundaries, and 2 ranks = 1 rank.

Every expectation is a plain loop over the held-out windows (window i = tokens [i*L, (i+1)*L)),
summing the cross-entropy of each predicted token in float64. The evaluator's forward passes
batch several windows at once, so the logits may differ from the loop's in the last float32
bit; the comparisons allow 1e-6.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LOREM, TINY, metrics
from torch import nn

from flame.config import load_config
from flame.data.build import resolve_tokenizer
from flame.data.prepare import prepare
from flame.data.store import TokenStore
from flame.data.tokenizer import load_tokenizer, token_byte_lengths
from flame.errors import ConfigError
from flame.evaluate import build_evaluator
from flame.model import forward_params
from flame.parallel import World

TOL = 1e-6
L = 16
ONE = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _quiet(_msg: str) -> None:
    pass


def _make_store(root: Path, docs: list[str], tokenizer: str = "byte", val_fraction: float = 0.0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = root / "store"
    prepare([str(src)], tokenizer, str(out), workers=1, val_fraction=val_fraction, progress=False, log=_quiet)
    return out


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randrange(32, 127)) for _ in range(n))


def _halves_docs() -> list[str]:
    """First half: random characters; second half: a repeated text (easy for a model fitted on it)."""
    rng = random.Random(0)
    return [_random_text(rng, 200) for _ in range(8)] + [LOREM * 4 for _ in range(4)]


class Bigram(nn.Module):
    """A context-free model (logits depend only on the current token), fitted by counting."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None):
        return self.table[input_ids]


def _bigram(text: str, vocab: int = 257) -> Bigram:
    ids = list(text.encode())
    counts = torch.full((vocab, vocab), 0.05, dtype=torch.float64)
    for a, b in zip(ids, ids[1:]):
        counts[a, b] += 1
    return Bigram(counts.log().float())


def _llama(vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY, vocab_size=vocab, max_position_embeddings=L)
    return LlamaForCausalLM(cfg).eval()


def _evaluator(tmp: Path, world: World = ONE, **over):
    base = {
        "eval.interval": 1,
        "data.context_len": L,
        "data.batch_size": 3,
        "train.run_dir": str(tmp / "run"),
    }
    base.update(over)
    cfg = load_config(overrides=base)
    tok = resolve_tokenizer(cfg)
    return build_evaluator(cfg, world, tmp / "run", tok, log=_quiet), tok


def _window(store: TokenStore, i: int) -> np.ndarray:
    out = np.empty(L, np.int64)
    store.read(i * L, out)
    return out


def _hand(model: nn.Module, store: TokenStore, windows, varlen: bool = False) -> tuple[float, int]:
    """(sum of token cross-entropy in nats, predicted tokens) by a loop over single windows."""
    total, count = 0.0, 0
    for i in windows:
        ids = _window(store, int(i))
        x = torch.from_numpy(ids)
        with torch.no_grad():
            out = model(input_ids=x[None])
        logits = (out if torch.is_tensor(out) else out.logits)[0].double()
        ce = F.cross_entropy(logits[:-1], x[1:], reduction="none")
        keep = torch.ones(L - 1, dtype=torch.bool)
        if varlen:  # a target at a document start is not predicted
            starts = store.doc_starts(int(i) * L + 1, (int(i) + 1) * L) - int(i) * L
            keep[torch.from_numpy(starts - 1)] = False
        total += float(ce[keep].sum())
        count += int(keep.sum())
    return total, count


def _check_record(rec: dict, total: float, count: int, nbytes: int | None = None) -> None:
    assert rec["kind"] == "eval"
    assert rec["tokens"] == count
    assert rec["loss"] == pytest.approx(total / count, abs=TOL)
    assert rec["perplexity"] == pytest.approx(math.exp(total / count), rel=TOL)
    if nbytes is not None:
        assert rec["bpb"] == pytest.approx(total / (math.log(2) * nbytes), abs=TOL)


@pytest.mark.slow
def test_whole_set_equals_hand_loop(tmp_path):
    held = _make_store(tmp_path / "held", [f"Document {i}. " + LOREM * (1 + i % 3) for i in range(7)])
    ev, tok = _evaluator(tmp_path, **{"eval.store": str(held), "eval.batches": 0, "data.batch_size": 5})
    store = TokenStore(held)
    n = store.num_tokens // L
    assert n % 5 and ev.sets[0].whole  # a last partial batch
    assert np.array_equal(ev.sets[0].windows(0, ev.sets[0].count), np.arange(n))
    model = _llama(tok.vocab_size)
    rec = ev.run(model, forward_params(model), None, step=7)
    assert len(rec) == 1 and rec[0]["step"] == 7 and "sources" not in rec[0]
    total, count = _hand(model, store, range(n))
    targets = np.concatenate([_window(store, i)[1:] for i in range(n)])
    _check_record(rec[0], total, count, nbytes=int((targets != tok.eos_id).sum()))  # byte: EOS has 0 bytes
    assert count == n * (L - 1)
    assert not model.training


def test_spread_differs_from_prefix_and_is_stable(tmp_path):
    held = _make_store(tmp_path / "held", _halves_docs())
    store = TokenStore(held)
    n = store.num_tokens // L
    half = store.doc_starts(0, store.num_tokens)[8] // L  # the first window of the repeated text
    model = _bigram(LOREM * 4)
    ev, _ = _evaluator(
        tmp_path, **{"eval.store": str(held), "eval.batches": 2, "eval.batch_size": 4, "data.batch_size": 5}
    )
    h = ev.sets[0]
    assert (h.count, h.num_windows) == (8, n) and not h.whole
    picked = h.windows(0, 8)
    assert len(set(picked.tolist())) == 8 and (np.diff(picked) > 0).all()
    assert picked.min() < half <= picked.max()  # spread over both halves
    a = ev.run(model, forward_params(model), None, step=1)[0]
    b = ev.run(model, forward_params(model), None, step=2)[0]
    assert (a["loss"], a["tokens"], a["bpb"]) == (b["loss"], b["tokens"], b["bpb"])  # the same windows
    again, _ = _evaluator(tmp_path, **{"eval.store": str(held), "eval.batches": 4, "eval.batch_size": 2})
    assert np.array_equal(again.sets[0].windows(0, 8), picked)  # the same in another run
    _check_record(a, *_hand(model, store, picked))
    prefix, count = _hand(model, store, range(8))
    whole, wcount = _hand(model, store, range(n))
    assert abs(a["loss"] - prefix / count) > 0.5
    assert abs(a["loss"] - whole / wcount) < abs(prefix / count - whole / wcount)


def test_bits_per_byte_byte_level_bpe(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    words = ["alpha", "beta", "γάμμα", "東京", "🚀", "def", "return", "\n", "  "]
    rng = random.Random(1)
    multi = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(20)]
    hf.train_from_iterator(
        multi + [LOREM],
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    (tmp_path / "tok").mkdir()
    hf.save(str(tmp_path / "tok" / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    table = token_byte_lengths(tok)
    for text in multi:  # exact: the bytes of a document's tokens are the document's UTF-8 bytes
        assert int(table[tok.encode_batch([text])[0]].sum()) == len(text.encode())
    assert table[tok.eos_id] == 0

    docs = [f"Part {i}: " + LOREM * (1 + i % 2) for i in range(6)]  # ASCII: each window decodes exactly
    held = _make_store(tmp_path / "held", docs, tokenizer=str(tmp_path / "tok"))
    ev, tok = _evaluator(
        tmp_path, **{"eval.store": str(held), "eval.batches": 0, "data.tokenizer": str(tmp_path / "tok")}
    )
    store = TokenStore(held)
    n = store.num_tokens // L
    model = _llama(tok.vocab_size)
    rec = ev.run(model, forward_params(model), None)[0]
    nbytes = sum(
        len(hf.decode(_window(store, i)[1:].tolist(), skip_special_tokens=True).encode()) for i in range(n)
    )
    _check_record(rec, *_hand(model, store, range(n)), nbytes=nbytes)


def test_byte_tokenizer_table():
    table = token_byte_lengths(load_tokenizer("byte"))
    assert table.tolist() == [1] * 256 + [0]


def test_per_source_mixture(tmp_path):
    rng = random.Random(2)
    noise = _make_store(tmp_path / "noise", [_random_text(rng, 150) for _ in range(16)], val_fraction=0.5)
    text = _make_store(tmp_path / "text", [f"{i} " + LOREM * 2 for i in range(16)], val_fraction=0.5)
    ev, _ = _evaluator(tmp_path, **{"data.mix": f"rand={noise}:0.3,{text}:0.7", "eval.batches": 0})
    model = _bigram(LOREM * 4)
    rec = ev.run(model, forward_params(model), None, step=3)[0]
    assert set(rec["sources"]) == {"rand", "store"}  # the given name, else the directory's name
    sums = {}
    for name, root in (("rand", noise), ("store", text)):
        val = TokenStore(root / "val")
        total, count = _hand(model, val, range(val.num_tokens // L))
        src = rec["sources"][name]
        assert src["tokens"] == count and src["loss"] == pytest.approx(total / count, abs=TOL)
        nbytes = sum(int((_window(val, i)[1:] != 256).sum()) for i in range(val.num_tokens // L))
        assert src["bpb"] == pytest.approx(total / (math.log(2) * nbytes), abs=TOL)
        sums[name] = (total, count)
    assert rec["sources"]["rand"]["loss"] > rec["sources"]["store"]["loss"] + 1
    total = sums["rand"][0] + sums["store"][0]
    count = sums["rand"][1] + sums["store"][1]
    _check_record(rec, total, count)  # the union: sum of sums / sum of counts

    # eval.store names the main set; the sources are still evaluated
    ev2, _ = _evaluator(
        tmp_path,
        **{"data.mix": f"rand={noise}:0.3,{text}:0.7", "eval.batches": 0, "eval.store": str(text / "val")},
    )
    rec2 = ev2.run(model, forward_params(model), None)[0]
    assert rec2["loss"] == rec["sources"]["store"]["loss"] and rec2["sources"] == rec["sources"]


def test_single_store_uses_its_val_part_and_needs_held_out_data(tmp_path):
    docs = [f"{i} " + LOREM for i in range(16)]
    with_val = _make_store(tmp_path / "a", docs, val_fraction=0.5)
    ev, _ = _evaluator(tmp_path, **{"data.store": str(with_val), "eval.batches": 0})
    assert ev.sets[0].store.path == with_val / "val"
    without = _make_store(tmp_path / "b", docs)
    with pytest.raises(ConfigError, match="no held-out data"):
        _evaluator(tmp_path, **{"data.store": str(without)})
    with pytest.raises(ConfigError, match="eval.batch_size = -1"):
        _evaluator(tmp_path, **{"data.store": str(with_val), "eval.batch_size": -1})
    off, _ = _evaluator(tmp_path, **{"data.store": str(with_val), "eval.interval": 0})
    assert off is None
    at_start, _ = _evaluator(
        tmp_path, **{"data.store": str(with_val), "eval.interval": 0, "eval.at_start": True}
    )
    assert at_start is not None


def _hand_documents(model: nn.Module, store: TokenStore, windows) -> tuple[float, int]:
    """Like _hand with varlen, but every document piece of a window runs through the model alone:
    equal to the packed eval only if attention stays inside documents."""
    total, count = 0.0, 0
    for i in windows:
        x = torch.from_numpy(_window(store, int(i)))
        starts = (store.doc_starts(int(i) * L + 1, (int(i) + 1) * L) - int(i) * L).tolist()
        for a, b in zip([0, *starts], [*starts, L]):
            if b - a < 2:
                continue
            with torch.no_grad():
                logits = model(input_ids=x[None, a:b]).logits[0].double()
            total += float(F.cross_entropy(logits[:-1], x[a + 1 : b], reduction="sum"))
            count += b - a - 1
    return total, count


def test_varlen_respects_document_boundaries(tmp_path):
    docs = [LOREM[: 5 + 7 * i] for i in range(12)]  # documents shorter and longer than a window
    held = _make_store(tmp_path / "held", docs)
    ev, tok = _evaluator(tmp_path, **{"eval.store": str(held), "eval.batches": 0, "data.varlen": True})
    model = _llama(tok.vocab_size)  # attends to its context: a leak across documents shows
    rec = ev.run(model, forward_params(model), None)[0]
    store = TokenStore(held)
    n = store.num_tokens // L
    total, count = _hand_documents(model, store, range(n))
    assert count < n * (L - 1)
    _check_record(rec, total, count)
    assert (total, count) != pytest.approx(_hand(model, store, range(n), varlen=True))  # the leak differs


CASES = [  # each ends in a pass where a rank holds filler rows only
    {"eval.batches": 0, "eval.batch_size": 5},
    {"eval.batches": 3, "eval.batch_size": 2},
    {"eval.batches": 0, "data.varlen": True, "eval.batch_size": 7},
]


def _records(tmp: Path, held: Path, world: World, model_kind: str) -> list[dict]:
    out = []
    for case in CASES:
        ev, tok = _evaluator(tmp, world, **{"eval.store": str(held), **case})
        model = _llama(tok.vocab_size) if model_kind == "llama" and not case.get("data.varlen") else None
        model = model or _bigram(LOREM * 4)
        out.append(ev.run(model, forward_params(model), None, step=1)[0])
    return out


def _two_rank_worker(rank: int, init: str, tmp: str, held: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        world = World(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        recs = _records(Path(tmp) / f"r{rank}", Path(held), world, "llama")
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(recs))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    import torch.multiprocessing as mp

    held = _make_store(tmp_path / "held", [f"Document {i}. " + LOREM * (1 + i % 3) for i in range(7)])
    n = TokenStore(held).num_tokens // L
    assert n % (5 * 2) and n % (7 * 2)  # the whole-set cases end in a partly filled pass
    mp.spawn(_two_rank_worker, args=(f"file://{tmp_path / 'pg'}", str(tmp_path), str(held)), nprocs=2)
    one = _records(tmp_path / "one", held, ONE, "llama")
    for r in range(2):
        two = json.loads((tmp_path / f"rank{r}.json").read_text())
        for a, b in zip(one, two):
            assert a["tokens"] == b["tokens"]
            assert a["loss"] == pytest.approx(b["loss"], abs=TOL)
            assert a["bpb"] == pytest.approx(b["bpb"], abs=TOL)


def _phase_stores(tmp: Path) -> tuple[Path, Path]:
    rng = random.Random(3)
    noise = _make_store(tmp / "noise", [_random_text(rng, 150) for _ in range(16)], val_fraction=0.5)
    text = _make_store(tmp / "text", [f"{i} " + LOREM * 2 for i in range(16)], val_fraction=0.5)
    return noise, text


def _phases(noise: Path, text: Path) -> list[dict]:
    # the source "text" is read only from the second phase on; it is evaluated from the start
    return [
        {"start_step": 0, "mix": f"rand={noise}:1"},
        {"start_step": 2, "mix": f"rand={noise}:0.5,text={text}:0.5"},
    ]


def test_per_source_with_phases(tmp_path):
    noise, text = _phase_stores(tmp_path)
    ev, _ = _evaluator(tmp_path, **{"data.phases": _phases(noise, text), "eval.batches": 0})
    model = _bigram(LOREM * 4)
    rec = ev.run(model, forward_params(model), None, step=1)[0]
    assert set(rec["sources"]) == {"rand", "text"}
    total = count = 0
    for name, root in (("rand", noise), ("text", text)):
        val = TokenStore(root / "val")
        t, c = _hand(model, val, range(val.num_tokens // L))
        assert rec["sources"][name]["tokens"] == c
        assert rec["sources"][name]["loss"] == pytest.approx(t / c, abs=TOL)
        total, count = total + t, count + c
    _check_record(rec, total, count)  # the union of the sources
    # without held-out parts in any phase's store, evaluation is refused before the run starts
    bare = _make_store(tmp_path / "bare", [f"{i} " + LOREM for i in range(8)])
    with pytest.raises(ConfigError, match="no held-out data"):
        _evaluator(tmp_path, **{"data.phases": [{"start_step": 0, "mix": f"{bare}:1"}]})


@pytest.mark.slow
def test_trainer_logs_per_source_eval_with_phases(tmp_path):
    from conftest import final_weights, tiny_overrides

    from flame.model import build_model
    from flame.trainer import run_training

    noise, text = _phase_stores(tmp_path)
    run = tmp_path / "run"
    over = tiny_overrides(run, "unused", **{"data.context_len": L, "train.max_steps": 4, "eval.interval": 2})
    del over["data.inputs"]
    over.update({"data.phases": _phases(noise, text), "eval.batches": 0, "checkpoint.interval": 4})
    cfg = load_config(overrides=over)
    run_training(cfg)
    recs = metrics(run)
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(set(r["sources"]) == {"rand", "text"} for r in evals)
    # the last evaluation, by hand, with the final weights
    model = build_model(cfg.model, 257, L, log=_quiet)
    model.load_state_dict(final_weights(run))
    model.eval()
    total = count = 0
    for name, root in (("rand", noise), ("text", text)):
        val = TokenStore(root / "val")
        t, c = _hand(model, val, range(val.num_tokens // L))
        assert evals[-1]["sources"][name]["tokens"] == c
        assert evals[-1]["sources"][name]["loss"] == pytest.approx(t / c, abs=TOL)
        total, count = total + t, count + c
    _check_record(evals[-1], total, count)
