import gzip
import json
import os
import random

import pytest
import zstandard

from flame.data.sources import (
    BadRecords,
    Unit,
    expand_inputs,
    kind_of,
    plan_units,
    read_unit,
)
from flame.errors import DataError


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return str(path)


def read_all(paths, target=64 << 20, field="text", bad=None):
    bad = bad or BadRecords()
    return [d for u in plan_units(paths, target) for d in read_unit(u, field, bad)]


def quiet(**kw):
    msgs = []
    return BadRecords(log=msgs.append, **kw), msgs


# ---------------------------------------------------------------- expand_inputs, kind_of


def test_expand_folder_glob_file_and_errors(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for name in [
        "a.txt",
        "b.jsonl",
        "sub/c.jsonl.zst",
        "sub/d.parquet",
        "sub/e.md",
        ".x.txt",
        ".hidden/f.txt",
        "g.bin",
    ]:
        (tmp_path / "d" / name).write_text("x")
    d = str(tmp_path / "d")
    assert expand_inputs([d]) == sorted(
        f"{d}/{n}" for n in ["a.txt", "b.jsonl", "sub/c.jsonl.zst", "sub/d.parquet", "sub/e.md"]
    )
    # globs: with an extension every match counts; '**' alone keeps corpus files
    assert expand_inputs([f"{d}/**/*.jsonl*"]) == [f"{d}/b.jsonl", f"{d}/sub/c.jsonl.zst"]
    assert expand_inputs([f"{d}/*.bin"]) == [f"{d}/g.bin"]
    assert f"{d}/g.bin" not in expand_inputs([f"{d}/**"])
    # explicit file of unknown extension is text; duplicates collapse; result sorted
    assert expand_inputs([f"{d}/g.bin", d, f"{d}/a.txt"])[0] == f"{d}/a.txt"
    assert len(expand_inputs([d, d])) == 5
    assert kind_of(f"{d}/g.bin") == "text"
    with pytest.raises(DataError, match="nope.jsonl"):
        expand_inputs([f"{d}/nope.jsonl"])
    with pytest.raises(DataError, match=r"\*\.csv' matches no files"):
        expand_inputs([f"{d}/*.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="matches no files"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="no inputs"):
        expand_inputs([])


def test_unreadable_file_is_named(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    p = tmp_path / "secret.txt"
    p.write_text("x")
    p.chmod(0)
    with pytest.raises(DataError, match="secret.txt"):
        expand_inputs([str(p)])


def test_stdlib_corpus():
    paths = expand_inputs(["stdlib"])
    assert len(paths) > 50 and all(p.endswith(".py") for p in paths) and paths == sorted(paths)
    assert any(p.endswith("/os.py") for p in paths)


def test_kind_of():
    assert [
        kind_of(p) for p in ["a.jsonl", "a.JSONL.GZ", "a.jsonl.zst", "a.json", "a.parquet", "a.txt", "a.py"]
    ] == [
        "jsonl",
        "jsonl",
        "jsonl",
        "jsonl",
        "parquet",
        "text",
        "text",
    ]
    assert kind_of("hf:user/data:train") == "hf"


# ---------------------------------------------------------------- readers


def test_jsonl_plain_gz_zst_read_the_same(tmp_path):
    texts = [f"doc {i} " + "x" * i for i in range(50)]
    plain = write_jsonl(tmp_path / "a.jsonl", texts)
    raw = open(plain, "rb").read()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    # two zstd frames: concatenated archives must read across frames
    c = zstandard.ZstdCompressor()
    (tmp_path / "a.jsonl.zst").write_bytes(c.compress(raw[:500]) + c.compress(raw[500:]))
    for name in ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"]:
        docs = read_all([str(tmp_path / name)])
        assert [d.text for d in docs] == texts
        assert [d.record for d in docs] == list(range(50))
        offsets = [0]
        for line in raw.splitlines(keepends=True)[:-1]:
            offsets.append(offsets[-1] + len(line))
        assert [d.offset for d in docs] == offsets


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"])
def test_resume_from_position(tmp_path, name):
    texts = [f"t{i}" for i in range(40)]
    raw = open(write_jsonl(tmp_path / "src.jsonl", texts), "rb").read()
    data = {"a.jsonl": raw, "a.jsonl.gz": gzip.compress(raw), "a.jsonl.zst": zstandard.compress(raw)}[name]
    (tmp_path / name).write_bytes(data)
    (unit,) = plan_units([str(tmp_path / name)])
    docs = list(read_unit(unit, "text", BadRecords()))
    again = list(read_unit(unit, "text", BadRecords(), start_offset=docs[17].position))
    assert again == docs[17:]


def test_text_files_whole_and_invalid_utf8(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "b.txt").write_bytes(b"good\nbad \xff byte\n")
    (tmp_path / "c.txt").write_text("")
    bad, msgs = quiet()
    docs = read_all([str(tmp_path / n) for n in ["a.txt", "b.txt", "c.txt"]], bad=bad)
    assert [(d.text, d.record, d.offset) for d in docs] == [("line one\nline two\n", 0, 0)]
    assert bad.bad_count == 1 and bad.empty_count == 1 and bad.good_count == 1
    assert f"{tmp_path}/b.txt:2: invalid UTF-8" in msgs[0]


def test_bad_records_counted_with_file_and_line(tmp_path):
    lines = [
        '{"text": "ok one"}',
        "{not json",
        "[1, 2]",
        '{"body": "wrong field"}',
        '{"text": 7}',
        '{"text": ""}',
        "",
        '{"text": "ok two"}',
        '{"text": "lone \\ud800 surrogate"}',
    ]
    p = tmp_path / "a.jsonl"
    p.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff"}\n')
    bad, msgs = quiet(warn_limit=3)
    docs = read_all([str(p)], bad=bad)
    assert [(d.text, d.record) for d in docs] == [("ok one", 0), ("ok two", 7)]
    assert (bad.good_count, bad.bad_count, bad.empty_count) == (2, 6, 1)
    assert bad.reasons == {
        "malformed JSON": 1,
        "not a JSON object": 1,
        "missing field 'text'": 1,
        "field 'text' is not a string": 1,
        "invalid UTF-8": 2,
    }
    assert msgs[0].startswith(f"warning: skipping bad record {p}:2: malformed JSON")
    assert f"{p}:4: missing field 'text': keys: body" in msgs[2]
    assert len(msgs) == 4 and "quietly" in msgs[3]  # warn_limit, then one note, then silence
    s = bad.summary()
    assert "skipped 6 bad records of 9" in s and "2 invalid UTF-8" in s and f"first: {p}:2" in s
    assert "1 empty" in s


def test_policy_error_raises_with_location(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"a\.jsonl:3: malformed JSON") as e:
        read_all([str(p)], bad=BadRecords(policy="error"))
    assert "skip" in e.value.hint


def test_mostly_bad_corpus_stops(tmp_path):
    p = tmp_path / "a.jsonl"
    write_jsonl(p, [f"t{i}" for i in range(100)], field="content")
    bad, _ = quiet(min_records=20)
    with pytest.raises(DataError, match=r"corpus is mostly bad: 20 of 20 .*missing field 'text'") as e:
        read_all([str(p)], bad=bad)
    assert "--data.text_field" in e.value.hint
    # the same corpus read with the right field is fine
    assert len(read_all([str(p)], field="content")) == 100


def test_check_finished_and_merge():
    a, _ = quiet()
    with pytest.raises(DataError, match="no usable documents in corpus X"):
        a.check_finished("corpus X")
    a.bad("x.jsonl", 4, "malformed JSON")
    b, _ = quiet()
    b.good()
    b.bad("y.jsonl", 0, "invalid UTF-8")
    b.empty()
    a.merge(b.state_dict())
    assert (a.good_count, a.bad_count, a.empty_count) == (1, 2, 1)
    assert a.reasons == {"malformed JSON": 1, "invalid UTF-8": 1} and a.first == "x.jsonl:5"
    c = BadRecords()
    c.load_state_dict(a.state_dict())
    assert c.summary() == a.summary()
    a.check_finished("corpus X")
    big = BadRecords(min_records=4, log=lambda m: None)
    big.merge({"good": 1, "bad": 1, "empty": 0, "reasons": {"malformed JSON": 1}, "first": "z:1"})
    with pytest.raises(DataError, match="mostly bad: 3 of 4"):  # merged worker counts are checked too
        big.merge({"good": 0, "bad": 2, "empty": 0, "reasons": {"malformed JSON": 2}, "first": "z:2"})


def test_json_array_file_gets_a_clear_error(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    with pytest.raises(DataError, match="JSON array") as e:
        read_all([str(p)])
    assert "jq" in e.value.hint


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.jsonl.zst"])
def test_truncated_archive_is_a_data_error(tmp_path, name):
    raw = b'{"text": "x"}\n' * 1000
    p = tmp_path / name
    p.write_bytes((gzip.compress(raw) if name.endswith(".gz") else zstandard.compress(raw))[:-30])
    with pytest.raises(DataError, match=f"{name}: cannot read"):
        read_all([str(p)])


# ---------------------------------------------------------------- units


@pytest.mark.parametrize("target", [1, 7, 64, 333, 10_000])
def test_units_cover_every_line_exactly_once(tmp_path, target):
    rng = random.Random(target)
    texts = ["y" * rng.choice([0, 1, 5, 40, 300]) + str(i) for i in range(200)]
    p = write_jsonl(tmp_path / "big.jsonl", texts)
    units = plan_units([p], target)
    assert len(units) > 1 if os.path.getsize(p) > 2 * target + 400 else len(units) >= 1
    assert units[0].start == 0 and units[-1].stop == -1
    assert all(a.stop == b.start for a, b in zip(units, units[1:]))
    docs = [d for u in units for d in read_unit(u, "text", BadRecords())]
    assert [d.text for d in docs] == texts and [d.record for d in docs] == list(range(200))
    assert plan_units([p], target) == units  # deterministic
    # resuming inside a later unit keeps line numbers right
    u = units[len(units) // 2]
    mine = list(read_unit(u, "text", BadRecords()))
    if len(mine) > 1:
        assert list(read_unit(u, "text", BadRecords(), start_offset=mine[1].position)) == mine[1:]


def test_big_text_file_splits_at_line_starts(tmp_path):
    body = "".join(f"line {i} {'é' * (i % 7)}\n" for i in range(500))
    p = tmp_path / "big.txt"
    p.write_text(body)
    units = plan_units([str(p)], 1000)
    docs = [d for u in units for d in read_unit(u, "", BadRecords())]
    assert len(docs) == len(units) > 5
    assert "".join(d.text for d in docs) == body
    assert all(d.text.endswith("\n") for d in docs)
    assert [d.record for d in docs] == [body[: body.index(d.text)].count("\n") for d in docs]


def test_compressed_files_are_one_unit(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "x"}\n' * 10_000))
    assert plan_units([str(p)], 100) == [Unit(str(p), "jsonl", 0, -1, 0)]


# ---------------------------------------------------------------- parquet, HF datasets


def test_parquet_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}" if i % 10 else None for i in range(100)]
    texts[5] = ""
    pq.write_table(
        pa.table({"id": list(range(100)), "content": texts}), tmp_path / "a.parquet", row_group_size=16
    )
    p = str(tmp_path / "a.parquet")
    units = plan_units([p], 1)
    assert [(u.start, u.stop, u.record) for u in units] == [(g, g + 1, 16 * g) for g in range(7)]
    bad, msgs = quiet()
    docs = read_all([p], target=1, field="content", bad=bad)
    want = [(t, i) for i, t in enumerate(texts) if t]
    assert [(d.text, d.record) for d in docs] == want
    assert bad.reasons == {"field 'content' is null": 10} and bad.empty_count == 1
    assert f"{p} (row 0)" in msgs[0]
    assert len(read_all([p], target=1 << 30, field="content")) == len(want)  # all groups in one unit
    with pytest.raises(DataError, match=r"no column 'text'; its columns are \['id', 'content'\]"):
        read_all([p])
    u = units[3]
    mine = list(read_unit(u, "content", BadRecords()))
    assert list(read_unit(u, "content", BadRecords(), start_offset=mine[2].position)) == mine[2:]


def test_saved_hf_dataset(tmp_path):
    import datasets

    texts = [f"example {i}" for i in range(300)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(300))}).save_to_disk(str(tmp_path / "ds"))
    d = str(tmp_path / "ds")
    assert expand_inputs([str(tmp_path)]) == [d]  # a folder holding a saved dataset: the dataset
    assert expand_inputs([d]) == [d] and kind_of(d) == "hf"
    units = plan_units([d], 500)
    assert len(units) > 1 and units[0].start == 0 and units[-1].stop == 300
    docs = read_all([d], target=500)
    assert [d.text for d in docs] == texts and [d.record for d in docs] == list(range(300))
    mine = list(read_unit(units[1], "text", BadRecords()))
    assert list(read_unit(units[1], "text", BadRecords(), start_offset=mine[3].position)) == mine[3:]
    with pytest.raises(DataError, match="no column 'body'"):
        read_all([d], field="body")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(DataError, match="DatasetDict with splits"):
        expand_inputs([str(tmp_path / "dd")])


def test_hub_dataset_failure_is_a_data_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert expand_inputs(["hf:someone/corpus:train"]) == ["hf:someone/corpus:train"]
    (unit,) = plan_units(["hf:someone/corpus:train"])
    with pytest.raises(DataError, match="cannot open the hub dataset") as e:
        list(read_unit(unit, "text", BadRecords()))
    assert "save_to_disk" in e.value.hint


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.txt"])
def test_byte_order_mark_at_file_start_is_not_text(tmp_path, name):
    # editors on Windows start UTF-8 files with EF BB BF; json.loads refuses it, so the first
    # record was lost as "malformed JSON", and a text document began with U+FEFF
    bom = b"\xef\xbb\xbf"
    if name.endswith(".txt"):
        raw, want = bom + "héllo\nworld".encode(), ["héllo\nworld"]
    else:
        raw = bom + b'{"text": "first"}\n{"text": "\xef\xbb\xbfsecond"}\n'
        want = ["first", "\ufeffsecond"]  # inside a string, U+FEFF is the record's own text
    if name.endswith(".gz"):
        raw = gzip.compress(raw)
    elif name.endswith(".zst"):
        raw = zstandard.ZstdCompressor().compress(raw)
    (tmp_path / name).write_bytes(raw)
    bad, msgs = quiet()
    docs = read_all([str(tmp_path / name)], bad=bad)
    assert [d.text for d in docs] == want and bad.bad_count == 0 and msgs == []
    if len(docs) > 1:  # resuming at the second record still works
        (unit,) = plan_units([str(tmp_path / name)])
        again = list(read_unit(unit, "text", BadRecords(), start_offset=docs[1].position))
        assert [d.text for d in again] == want[1:]
    # a BOM that starts a later line is not at the file start: that line is a bad record, counted
    (tmp_path / "mid.jsonl").write_bytes(b'{"text": "a"}\n' + bom + b'{"text": "b"}\n')
    bad, _ = quiet()
    assert [d.text for d in read_all([str(tmp_path / "mid.jsonl")], bad=bad)] == ["a"]
    assert bad.reasons == {"malformed JSON": 1}


def test_parquet_dictionary_encoded_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["alpha", "beta", "alpha", None, "gamma", ""]
    col = pa.array(texts).dictionary_encode()  # a categorical column, e.g. from pandas
    pq.write_table(pa.table({"text": col, "n": list(range(6))}), tmp_path / "d.parquet", row_group_size=4)
    assert pa.types.is_dictionary(pq.ParquetFile(tmp_path / "d.parquet").schema_arrow.field("text").type)
    bad, _ = quiet()
    docs = read_all([str(tmp_path / "d.parquet")], target=1, bad=bad)
    assert [(d.text, d.record) for d in docs] == [("alpha", 0), ("beta", 1), ("alpha", 2), ("gamma", 4)]
    assert bad.reasons == {"field 'text' is null": 1} and bad.empty_count == 1
    with pytest.raises(DataError, match="column 'n' holds int64, not text"):
        read_all([str(tmp_path / "d.parquet")], field="n")
