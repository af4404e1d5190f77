"""Every input format through `flame prepare`, training from raw inputs, and streaming.

One corpus (unicode, empty lines, CRLF, a whitespace-only document, an empty document, a long
document) is written as a folder of .txt files (one document per file), .jsonl, .jsonl.gz (two gzip
members), .jsonl.zst (two zstd frames), .parquet (several row groups) and a `datasets` save_to_disk
folder (two arrow shards). Every format must give the same documents, token for token:

- prepared: the store's documents, in index order, are the byte tokenization of the source
  documents (the empty one skipped), each followed by EOS;
- streaming (one stream, data.shuffle false): the first epoch's samples, concatenated, are exactly
  the store's token stream; with data.shuffle true, undoing each window's keyed permutation gives
  a token stream whose documents are the same multiset;
- training from raw inputs (prepared into data.cache_dir, and streaming) runs and finishes.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from flame.config import load_config
from flame.data.prepare import prepare
from flame.data.store import TokenStore
from flame.data.stream import StreamingLoader, window_order
from flame.data.tokenizer import load_tokenizer
from flame.parallel import World

EOS = 256  # the byte tokenizer's
ONE = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FORMATS = ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "saved"]


def _documents() -> list[str]:
    rng = np.random.default_rng(11)
    pieces = ["héllo", "naïve", "漢字かな", "🚀🔥", "مرحبا", "e\u0301", "\u2028", "tab\there", "", "word"]
    docs = []
    for i in range(60):
        words = [pieces[int(k)] for k in rng.integers(0, len(pieces), int(rng.integers(1, 30)))]
        docs.append(f"[{i:02d}] " + " ".join(words))
    docs[3] = "first line\n\n\nafter two empty lines\n"
    docs[7] = "crlf line\r\nnext\r\n"
    docs[12] = " \n\t "  # whitespace only: a document like any other
    docs[20] = ""  # empty: skipped (and counted) by every reader
    docs[33] = "\n\nstarts with empty lines"
    docs[41] = "".join(pieces[i % len(pieces)] + "ß" * (i % 7) for i in range(12000))  # long: ~90k chars
    return docs


DOCS = _documents()


def _expected_tokens() -> list[np.ndarray]:
    tok = load_tokenizer("byte")
    ids = tok.encode_batch([d for d in DOCS if d])
    return [np.append(np.asarray(a, np.int64), EOS) for a in ids]


EXPECTED = _expected_tokens()
TOTAL = sum(len(a) for a in EXPECTED)


def _jsonl_lines(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n" for i, d in docs).encode()


def _write_formats(root: Path) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    out = {}
    txt = root / "txt"
    txt.mkdir()
    for i, d in enumerate(DOCS):  # a text file is one document: one file each, in sorted order
        (txt / f"doc{i:03d}.txt").write_bytes(d.encode())
    out["txt"] = txt
    numbered = list(enumerate(DOCS))
    half = len(numbered) // 2
    (root / "c.jsonl").write_bytes(_jsonl_lines(numbered))
    out["jsonl"] = root / "c.jsonl"
    gz = gzip.compress(_jsonl_lines(numbered[:half])) + gzip.compress(_jsonl_lines(numbered[half:]))
    (root / "c.jsonl.gz").write_bytes(gz)  # two gzip members: read as one stream
    out["jsonl.gz"] = root / "c.jsonl.gz"
    z = zstandard.ZstdCompressor()
    zst = z.compress(_jsonl_lines(numbered[:half])) + z.compress(_jsonl_lines(numbered[half:]))
    (root / "c.jsonl.zst").write_bytes(zst)  # two zstd frames
    out["jsonl.zst"] = root / "c.jsonl.zst"
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, root / "c.parquet", row_group_size=7)
    assert pq.ParquetFile(root / "c.parquet").metadata.num_row_groups == 9
    out["parquet"] = root / "c.parquet"
    datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))}).save_to_disk(
        str(root / "saved"), num_shards=2
    )
    out["saved"] = root / "saved"
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return _write_formats(tmp_path_factory.mktemp("formats"))


def _store_docs(path: Path) -> list[np.ndarray]:
    store = TokenStore(path)
    tokens = np.empty(store.num_tokens, np.int64)
    store.read(0, tokens)
    starts = store.doc_starts(0, store.num_tokens).tolist()
    return [tokens[a:b] for a, b in zip(starts, [*starts[1:], store.num_tokens])]


def _assert_docs(got: list[np.ndarray]) -> None:
    assert len(got) == len(EXPECTED)
    for i, (a, b) in enumerate(zip(got, EXPECTED)):
        assert np.array_equal(a, b), f"document {i} differs"


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def stores(inputs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for name, src in inputs.items():
        out[name] = root / name
        man = prepare([str(src)], "byte", str(out[name]), workers=1, progress=False, log=_quiet)
        assert man["num_documents"] == len(EXPECTED) and man["num_tokens"] == TOTAL, name
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_prepare_gives_the_source_documents(stores, fmt):
    _assert_docs(_store_docs(stores[fmt]))


@pytest.mark.slow
def test_prepare_parquet_in_many_units_and_through_the_cli(inputs, tmp_path):
    # units smaller than a row group: several units (and shards), documents still in order
    many = tmp_path / "many"
    prepare([str(inputs["parquet"])], "byte", str(many), workers=1, progress=False, unit_bytes=1, log=_quiet)
    assert len(TokenStore(many).shards) > 1
    _assert_docs(_store_docs(many))
    # the command line, with its progress display (which sizes parquet units by their row groups)
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "flame", "prepare", "--input", str(inputs["parquet"]), "--output", str(out)]
    r = subprocess.run([*cmd, "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    _assert_docs(_store_docs(out))


def _stream_samples(inp: Path, shuffle: bool, n_samples: int, L: int, M: int, B: int = 16):
    cfg = load_config(
        overrides={
            "data.inputs": [str(inp)],
            "data.streaming": True,
            "data.context_len": L,
            "data.batch_size": B,
            "data.window": M,
            "data.shuffle": shuffle,
        }
    )
    loader = StreamingLoader.from_config(cfg, cfg.data.inputs, load_tokenizer("byte"), ONE)
    it = iter(loader)
    batches = [next(it)["input_ids"].numpy() for _ in range(math.ceil(n_samples / B))]
    return np.concatenate(batches)[:n_samples], loader.spec


@pytest.mark.parametrize("fmt", FORMATS)
def test_streaming_reads_what_prepare_stores(inputs, fmt):
    L, M = 128, 8
    windows = math.ceil(TOTAL / (L * M))
    want = np.concatenate(EXPECTED)
    # in order: the first epoch of the one stream is the store's token stream, token for token
    plain, _ = _stream_samples(inputs[fmt], False, windows * M, L, M)
    assert np.array_equal(plain.reshape(-1)[:TOTAL], want)
    # shuffled: undo each window's keyed permutation; the documents are the same multiset
    mixed, spec = _stream_samples(inputs[fmt], True, windows * M, L, M)
    assert not np.array_equal(mixed, plain)
    stream = np.empty_like(mixed)
    for w in range(windows):
        order = window_order(M, spec.seed, 0, w, True)
        stream[w * M + order] = mixed[w * M : (w + 1) * M]
    flat = stream.reshape(-1)[:TOTAL]
    assert flat[-1] == EOS
    ends = np.flatnonzero(flat == EOS) + 1
    got = Counter(tuple(d) for d in np.split(flat, ends[:-1]))
    assert got == Counter(tuple(d.tolist()) for d in EXPECTED)
    if spec.num_units > 1:  # the folder of text files: the unit order is shuffled too
        assert not np.array_equal(flat, want)


@pytest.mark.parametrize("streaming", [False, True], ids=["prepared", "streaming"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_train_from_raw_inputs(inputs, tmp_path, fmt, streaming):
    from flame.trainer import run_training

    run = tmp_path / "run"
    over = tiny_overrides(
        run,
        inputs[fmt],
        **{
            "train.max_steps": 2,
            "data.context_len": 32,
            "data.streaming": streaming,
            "data.window": 4,
            "data.cache_dir": str(tmp_path / "cache"),
        },
    )
    r = run_training(load_config(overrides=over))
    assert r["stopped"] == "done" and r["step"] == 2 and math.isfinite(r["loss"])
    caches = sorted((tmp_path / "cache").glob("store-*"))
    if streaming:
        assert caches == []  # nothing prepared
    else:
        assert len(caches) == 1
        _assert_docs(_store_docs(caches[0]))


def _loader(inp: Path, **over) -> StreamingLoader:
    o = {"data.inputs": [str(inp)], "data.streaming": True, "data.context_len": 32, "data.batch_size": 4}
    cfg = load_config(overrides={**o, "data.window": 4, **over})
    return StreamingLoader.from_config(cfg, cfg.data.inputs, load_tokenizer("byte"), ONE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_streaming_resumes_exactly_in_every_format(inputs, fmt):
    # stops mid-window, one of them inside the long document (a token offset within it)
    full = iter(_loader(inputs[fmt]))
    want = [next(full)["input_ids"] for _ in range(400)]
    for k in (7, 150):
        first = _loader(inputs[fmt])
        it = iter(first)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))
        if k == 150 and fmt != "txt":  # one unit, read in order: the window starts inside document 41
            assert state["streams"]["0"]["tok"] > 0
        again = _loader(inputs[fmt])
        again.load_state_dict(state)
        it = iter(again)
        for j in range(k, k + 30):
            assert torch.equal(next(it)["input_ids"], want[j]), (k, j)
