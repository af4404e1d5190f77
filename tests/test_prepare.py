import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flame.data.prepare import cli, is_val, prepare
from flame.data.sources import BadRecords, expand_inputs, plan_units, read_unit
from flame.data.tokenizer import load_tokenizer
from flame.errors import DataError

UNIT = 2048  # small units, so a tiny corpus still makes many shards


def make_corpus(root: Path, n_docs: int = 400) -> list[str]:
    rng = random.Random(0)
    words = ["alpha", "beta", "γάμμα", "δ", "東京", "🚀", "x", "def", "return", "\n"]

    def text():
        return " ".join(rng.choice(words) for _ in range(rng.randrange(1, 60)))

    root.mkdir(parents=True, exist_ok=True)
    (root / "big.jsonl").write_text("".join(json.dumps({"text": text()}) + "\n" for _ in range(n_docs)))
    (root / "b.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps({"text": text()}) + "\n" for _ in range(50)).encode())
    )
    for i in range(12):
        (root / f"t{i:02d}.txt").write_text(text() * 3)
    return [str(root)]


def store_tokens(out: str | Path, manifest: dict) -> np.ndarray:
    dtype = np.dtype(manifest["dtype"])
    parts = [np.fromfile(Path(out) / f"{s['name']}.tokens", dtype=dtype) for s in manifest["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def corpus_docs(inputs: list[str]) -> list:
    bad = BadRecords()
    return [d for u in plan_units(expand_inputs(inputs), UNIT) for d in read_unit(u, "text", bad)]


def quiet_prepare(inputs, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("unit_bytes", UNIT)
    kw.setdefault("log", lambda m: None)
    return prepare(inputs, kw.pop("tokenizer", "byte"), str(out), **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "store"
    return out, quiet_prepare(corpus, out, workers=1)


def test_store_holds_every_document_in_order(corpus, single):
    out, m = single
    docs = corpus_docs(corpus)
    assert m["num_documents"] == len(docs) and len(m["shards"]) > 5
    toks = store_tokens(out, m)
    assert len(toks) == m["num_tokens"] == sum(len(d.text.encode()) + 1 for d in docs)
    assert toks[-1] == 256
    texts = bytes(toks[toks != 256].astype(np.uint8)).decode()
    assert texts == "".join(d.text for d in docs)
    assert m["tokenizer"]["spec"] == "byte" and m["dtype"] == "uint16"
    assert [s["path"] for s in m["sources"]] == expand_inputs(corpus)
    # the document index points back at (source, record)
    first = np.fromfile(out / f"{m['shards'][0]['name']}.docs", dtype=np.uint64).reshape(-1, 3)
    d0 = docs[0]
    assert m["sources"][int(first[0, 1])]["path"] == d0.path and int(first[0, 2]) == d0.record
    # a copy of the tokenizer lives in the store
    assert load_tokenizer(str(out / "tokenizer")).fingerprint == m["tokenizer"]["fingerprint"]


@pytest.mark.slow
def test_two_workers_equal_one(corpus, single, tmp_path):
    out1, m1 = single
    m2 = quiet_prepare(corpus, tmp_path / "s2", workers=2)
    assert [(s["name"], s["tokens"], s["checksum"]) for s in m2["shards"]] == [
        (s["name"], s["tokens"], s["checksum"]) for s in m1["shards"]
    ]
    assert np.array_equal(store_tokens(tmp_path / "s2", m2), store_tokens(out1, m1))


def test_resume_recomputes_only_missing_shards(corpus, single, tmp_path):
    _, ref = single
    out = tmp_path / "s"
    quiet_prepare(corpus, out, workers=1)
    victim = ref["shards"][2]["name"]
    (out / f"{victim}.tokens").unlink()
    (out / "manifest.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("u*.tokens")}
    logs = []
    m = quiet_prepare(corpus, out, workers=2, log=logs.append)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("u*.tokens")}
    assert {n for n in after if before.get(n) != after[n]} == {f"{victim}.tokens"}
    assert any(f"{len(ref['shards']) - 1} shard(s) were already done" in x for x in logs), logs
    assert m["shards"] == ref["shards"]


@pytest.mark.slow
def test_parts_then_finalize_equal_a_single_run(corpus, single, tmp_path, capsys):
    _, ref = single
    out = tmp_path / "p"
    r0 = quiet_prepare(corpus, out, workers=1, part=(0, 2))
    assert r0["missing"] == [1]
    assert cli(["--status", str(out)]) == 1
    assert "missing parts [1]" in capsys.readouterr().out
    m = quiet_prepare(corpus, out, workers=2, part=(1, 2))
    assert m["shards"] == ref["shards"] and m["num_tokens"] == ref["num_tokens"]
    assert cli(["--status", str(out)]) == 0
    assert "2 of 2 parts complete; finalized" in capsys.readouterr().out
    with pytest.raises(DataError, match="different num_parts"):
        quiet_prepare(corpus, out, part=(0, 3))


def test_a_part_without_work_still_completes(tmp_path):
    (tmp_path / "a.txt").write_text("one small file: one task")
    r = quiet_prepare([str(tmp_path / "a.txt")], tmp_path / "s", part=(1, 3))
    assert r["missing"] == [0, 2] and r["units"] == 0
    quiet_prepare([str(tmp_path / "a.txt")], tmp_path / "s", part=(2, 3))
    m = quiet_prepare([str(tmp_path / "a.txt")], tmp_path / "s", part=(0, 3))
    assert m["num_documents"] == 1 and m["parts"] == 3


@pytest.mark.slow
def test_validation_split_is_deterministic(corpus, single, tmp_path):
    _, ref = single
    m = quiet_prepare(corpus, tmp_path / "v", workers=2, val_fraction=0.2)
    val = m["val"]
    assert 0 < val["num_documents"] < m["num_documents"]
    assert val["num_documents"] + m["num_documents"] == ref["num_documents"]
    assert val["num_tokens"] + m["num_tokens"] == ref["num_tokens"]
    docs = corpus_docs(corpus)
    assert val["num_documents"] == sum(is_val(d.path, d.record, 0.2) for d in docs)
    assert (tmp_path / "v" / "val" / "manifest.json").is_file()
    again = quiet_prepare(corpus, tmp_path / "v2", workers=1, val_fraction=0.2)
    assert again["val"]["shards"] == val["shards"]


@pytest.mark.slow
def test_bpe_tokenizer_store(corpus, tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [d.text for d in corpus_docs(corpus)[:50]],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    m = quiet_prepare(corpus, tmp_path / "s", tokenizer=str(tmp_path / "tokenizer.json"), workers=2)
    eos = tok.token_to_id("<|endoftext|>")
    want = np.concatenate([tok.encode(d.text).ids + [eos] for d in corpus_docs(corpus)])
    assert np.array_equal(store_tokens(tmp_path / "s", m), want)
    assert m["tokenizer"]["eos_id"] == eos and m["tokenizer"]["vocab_size"] == tok.get_vocab_size()


def test_bad_records_summarised_or_fatal(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text('{"text": "fine"}\n{broken\n{"text": "also fine"}\n')
    m = quiet_prepare([str(d)], tmp_path / "s", workers=1)
    assert m["num_documents"] == 2
    assert "skipped 1 bad records of 3 (1 malformed JSON)" in m["bad_records"][0]
    assert f"{d}/a.jsonl:2" in m["bad_records"][0]
    (d / "b.jsonl").write_text('{"text": "more"}\n' * 50)
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON") as e:
        quiet_prepare([str(d)], tmp_path / "e", workers=2, bad_records="error", unit_bytes=10)
    assert "skip" in e.value.hint  # the hint survives the trip from the worker process
    (d / "a.jsonl").write_text('{"body": "x"}\n' * 5)
    (d / "b.jsonl").unlink()
    with pytest.raises(DataError, match="no usable documents"):
        quiet_prepare([str(d)], tmp_path / "n", workers=1)
    assert not (tmp_path / "n" / "manifest.json").exists()


def test_refuses_to_mix_settings(corpus, tmp_path):
    quiet_prepare(corpus, tmp_path / "s", workers=1)
    with pytest.raises(DataError, match="different tokenizer"):
        quiet_prepare(corpus, tmp_path / "s", tokenizer=str(_tiny_tokenizer(tmp_path)))


def _tiny_tokenizer(tmp_path: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["a b c"], trainers.BpeTrainer(vocab_size=270, special_tokens=["</s>"], show_progress=False)
    )
    tok.save(str(tmp_path / "t.json"))
    return tmp_path / "t.json"


def test_cli(corpus, tmp_path, capsys):
    out = tmp_path / "c"
    rc = cli(
        ["--input", *corpus, "--output", str(out), "--workers", "1", "--unit-mb", "0.01", "--no-progress"]
    )
    assert rc == 0 and (out / "manifest.json").is_file()
    assert "documents" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["--input", *corpus, "--output", str(out), "--part", "2/2"])
    assert e.value.code == 2
    with pytest.raises(DataError, match="no such store"):
        cli(["--status", str(tmp_path / "none")])
    assert os.path.isdir(out / "units")


# ---------------------------------------------------------------- automatic units (issue 11)


def _jsonl(path: Path, target_bytes: int, seed: int = 0) -> Path:
    """A JSON Lines file of about target_bytes: documents of 200-2,000 characters."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "γάμμα", "δ", "東京", "x", "def", "return"]
    lines, n = [], 0
    while n < target_bytes:
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(40, 400)))
        line = json.dumps({"text": text}) + "\n"
        lines.append(line)
        n += len(line.encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def _all_docs(out: Path, m: dict) -> np.ndarray:
    """The document index of a whole store, in order: (start in the token stream, source, record)."""
    rows, base = [], 0
    for s in m["shards"]:
        d = np.fromfile(out / f"{s['name']}.docs", dtype=np.uint64).reshape(-1, 3).astype(np.int64)
        d[:, 0] += base
        rows.append(d)
        base += s["tokens"]
    return np.concatenate(rows)


def test_automatic_unit_size_is_bounded_and_feeds_every_worker():
    from flame.data.sources import MAX_AUTO_UNIT, MIN_AUTO_UNIT, MIN_SPLIT_UNIT, auto_unit_bytes

    mb = 1 << 20
    # one 100 MB input on 2 workers: 16 units of 6.25 MB (the old fixed 64 MiB gave 2 unequal ones)
    assert auto_unit_bytes(100 * mb, 2) == 100 * mb // 16
    assert auto_unit_bytes(10_000 * mb, 2) == -(-10_000 * mb // 157) <= MAX_AUTO_UNIT  # 157 equal units
    assert auto_unit_bytes(20 * mb, 2) == 2 * mb  # the minimum: 10 units, not 16 tiny ones
    assert auto_unit_bytes(3 * mb, 2) >= MIN_AUTO_UNIT // 2
    assert auto_unit_bytes(2 * mb, 4) == 512 << 10  # below the minimum, still one unit per worker
    assert auto_unit_bytes(300 << 10, 4) == 300 << 10  # too small to be worth splitting
    assert MIN_SPLIT_UNIT == 256 << 10
    for total in (1, 10**5, 7 * mb + 3, 100 * mb, 3_000 * mb):
        for w in (1, 2, 3, 16):
            size = auto_unit_bytes(total, w)
            n = -(-total // size)
            assert size >= 1 and size * n >= total and size * (n - 1) < total
            if total // w >= MIN_SPLIT_UNIT:
                assert n >= w, (total, w, n)


def test_plan_for_one_big_file_and_two_workers_is_balanced(tmp_path):
    from flame.data.sources import auto_unit_bytes, input_bytes, plan_tasks, unit_bytes

    f = _jsonl(tmp_path / "big.jsonl", 5 << 20)
    size = auto_unit_bytes(input_bytes([str(f)]), 2)
    units = plan_units([str(f)], size)
    tasks = plan_tasks(units, size)
    sizes = [sum(unit_bytes(u) for u in t) for t in tasks]
    assert len(tasks) == len(units) >= 2 and sum(sizes) == f.stat().st_size
    assert min(sizes) / max(sizes) >= 0.95, sizes  # within 5%: no worker waits on a big last unit
    # consecutive byte ranges that cover the file, each starting at a line
    assert [u.start for u in units[1:]] == [u.stop for u in units[:-1]] and units[-1].stop == -1


def test_many_small_files_make_balanced_tasks(tmp_path):
    from flame.data.sources import plan_tasks, unit_bytes

    rng = random.Random(3)
    for i in range(60):
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / f"f{i:02d}.txt").write_text("x" * rng.randrange(1_000, 20_000))
    paths = expand_inputs([str(tmp_path / "d")])
    units = plan_units(paths, 100_000)
    assert len(units) == 60  # each file whole
    tasks = plan_tasks(units, 100_000)
    sizes = [sum(unit_bytes(u) for u in t) for t in tasks]
    total = sum(sizes)
    assert len(tasks) == round(total / 100_000)
    assert [u for t in tasks for u in t] == units  # consecutive, in order
    # every task within one file (< 20,000 bytes) of the ideal share: no tiny remainder task
    assert max(abs(s - total / len(tasks)) for s in sizes) < 20_000, sizes


@pytest.mark.slow
def test_store_does_not_depend_on_the_worker_count(tmp_path):
    """Automatic units differ with the workers (1 unit for one worker, 2 for two); the store's tokens
    and document index, concatenated in order, are equal. Promised: the token stream and document
    list; the shard layout (and so the store fingerprint) follows the plan."""
    f = _jsonl(tmp_path / "one.jsonl", 1 << 20)
    logs1, logs2 = [], []
    m1 = quiet_prepare([str(f)], tmp_path / "w1", workers=1, unit_bytes=None, log=logs1.append)
    m2 = quiet_prepare([str(f)], tmp_path / "w2", workers=2, unit_bytes=None, log=logs2.append)
    assert len(m1["shards"]) == 1 and len(m2["shards"]) == 2
    assert any("2 unit(s)" in x and "automatic for 2 worker(s)" in x and "on 2 worker(s)" in x for x in logs2)
    t1, t2 = store_tokens(tmp_path / "w1", m1), store_tokens(tmp_path / "w2", m2)
    assert len(t1) == m1["num_tokens"] > 500_000 and np.array_equal(t1, t2)
    assert np.array_equal(_all_docs(tmp_path / "w1", m1), _all_docs(tmp_path / "w2", m2))
    assert m1["num_documents"] == m2["num_documents"] == len(corpus_docs([str(f)]))


@pytest.mark.slow
def test_a_text_file_stays_one_document_whatever_the_workers(tmp_path):
    """A .txt file is one document: automatic units (sized for the worker count) never cut it, so
    its tokens, its one EOS and the document count are the same for one worker and for four."""
    f = tmp_path / "book.txt"
    f.write_text("".join(f"line {i} of a long book, é and 東京\n" for i in range(40_000)))  # ~1.4 MB
    m1 = quiet_prepare([str(f)], tmp_path / "w1", workers=1, unit_bytes=None)
    m4 = quiet_prepare([str(f)], tmp_path / "w4", workers=4, unit_bytes=None)
    assert m1["num_documents"] == m4["num_documents"] == 1
    assert np.array_equal(store_tokens(tmp_path / "w1", m1), store_tokens(tmp_path / "w4", m4))


@pytest.mark.slow
def test_resume_keeps_the_recorded_automatic_plan(tmp_path):
    f = _jsonl(tmp_path / "one.jsonl", 1 << 20)
    out = tmp_path / "s"
    ref = quiet_prepare([str(f)], out, workers=2, unit_bytes=None)
    assert len(ref["shards"]) == 2
    (out / "u000001.tokens").unlink()
    (out / "manifest.json").unlink()
    logs = []
    # one worker would plan one unit; the store keeps the two it began with and redoes only u000001
    m = quiet_prepare([str(f)], out, workers=1, unit_bytes=None, log=logs.append)
    assert m["shards"] == ref["shards"]
    assert any("1 of 2 task(s) to do" in x and "as recorded" in x for x in logs), logs
    with pytest.raises(DataError, match="different unit_bytes"):  # an explicit other size is refused
        quiet_prepare([str(f)], out, workers=1, unit_bytes=1 << 20)


def test_a_store_begun_before_automatic_units_keeps_its_64_mib_plan(tmp_path):
    f = _jsonl(tmp_path / "one.jsonl", 1 << 20)
    out = tmp_path / "s"
    ref = quiet_prepare([str(f)], out, workers=1, unit_bytes=64 << 20)
    settings = json.loads((out / "prepare.json").read_text())
    del settings["unit_bytes"]  # as older versions wrote it
    (out / "prepare.json").write_text(json.dumps(settings))
    (out / "manifest.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("u*.tokens")}
    m = quiet_prepare([str(f)], out, workers=2, unit_bytes=None)  # automatic would plan two units
    assert m["shards"] == ref["shards"] and len(m["shards"]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("u*.tokens")} == before  # nothing redone


@pytest.mark.slow
def test_cli_without_unit_mb_plans_for_its_workers(tmp_path, capsys):
    f = _jsonl(tmp_path / "one.jsonl", 1 << 20)
    assert cli(["--input", str(f), "--output", str(tmp_path / "c"), "--workers", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "2 of 2 task(s) to do" in err and "automatic for 2 worker(s)" in err and "on 2 worker(s)" in err
    with pytest.raises(SystemExit):
        cli(["--input", str(f), "--output", str(tmp_path / "d"), "--unit-mb", "0"])
