"""Hostile corpora, stores and faults around data preparation: each case is a clear message and a
non-zero exit (never a traceback, a hang or silently wrong data), and what the user had is kept."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from flame.config import load_config
from flame.data import prepare as prepare_mod
from flame.data import store as store_mod
from flame.data.build import open_store
from flame.data.prepare import cli, prepare
from flame.data.sources import expand_inputs
from flame.data.store import TokenStore
from flame.errors import ConfigError, DataError

EOS = 256
UNIT = 1024  # bytes per unit of work: small stores of several shards


def flame(*args, timeout=300, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "flame", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def assert_clean_failure(r, *needles, code=None):
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    if code is not None:
        assert r.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for n in needles:
        assert n in out, out[-3000:]


def quiet_prepare(inputs, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda m: None)
    kw.setdefault("workers", 1)
    return prepare([str(i) for i in inputs], kw.pop("tokenizer", "byte"), str(out), **kw)


def tokens_of(out) -> np.ndarray:
    m = json.loads((Path(out) / "manifest.json").read_text())
    parts = [np.fromfile(Path(out) / f"{s['name']}.tokens", np.uint16) for s in m["shards"]]
    return np.concatenate(parts)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file and its bytes (but flame's lock files, which name the last process holding them)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def write_docs(path: Path, n: int, tag: str) -> Path:
    path.write_text(
        "".join(json.dumps({"text": f"{tag} document {i} " + "x" * (i % 37)}) + "\n" for i in range(n))
    )
    return path


@pytest.fixture
def small_store(tmp_path):
    """A finished store of 3 jsonl files, one shard each (byte tokenizer: uint16, vocabulary 257)."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(3):
        write_docs(d / f"f{i}.jsonl", 60, f"file{i}")
    out = tmp_path / "store"
    quiet_prepare([d], out, unit_bytes=UNIT)
    return d, out


# ---------------------------------------------------------------- 1. symbolic links


def test_symlink_loops_and_linked_folders_read_each_file_once(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_text("the one and only document")
    os.symlink(".", d / "loop")  # a loop
    os.symlink(".", d / "loop2")  # two loops: 2^40 paths for a walk that follows them blindly
    (d / "sub").mkdir()
    os.symlink("..", d / "sub" / "up")
    os.symlink(d, tmp_path / "alias")  # a linked folder, named as well
    os.symlink(d / "a.txt", tmp_path / "a-link.txt")
    notes = []
    specs = [d, tmp_path / "alias", tmp_path / "a-link.txt", f"{d}/**", f"{tmp_path}/**/*.txt"]
    real = str((d / "a.txt").resolve())
    for spec in specs:
        found = expand_inputs([str(spec)], notes.append)
        assert [os.path.realpath(p) for p in found] == [real], spec
    t0 = time.monotonic()
    paths = expand_inputs([str(s) for s in specs], notes.append)
    assert time.monotonic() - t0 < 10
    assert [os.path.realpath(p) for p in paths] == [real]
    assert any("read once" in n for n in notes)
    m = quiet_prepare(specs, tmp_path / "s")
    assert m["num_documents"] == 1


# ---------------------------------------------------------------- 2. empty data.inputs


@pytest.mark.parametrize(
    "args", [["--data.inputs"], ["--data.inputs", ""], ["--data.inputs="], ["--data.inputs", ","]]
)
def test_empty_data_inputs_is_refused(args):
    with pytest.raises(ConfigError, match="--data.inputs is given without a value") as e:
        load_config(args)
    assert "leave the option out for the default corpus" in e.value.message


def test_empty_data_inputs_on_the_command_line_exits_2(tmp_path):
    r = flame("train", "--data.inputs", "", "--train.run_dir", tmp_path / "run", timeout=120)
    assert_clean_failure(r, "--data.inputs is given without a value", code=2)
    assert not (tmp_path / "run").exists()  # refused before anything was built


def test_empty_entry_in_toml_inputs_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    for value in ('[""]', '""', '["  "]'):
        cfg.write_text(f"[data]\ninputs = {value}\n")
        with pytest.raises(ConfigError, match="data.inputs: an entry is empty"):
            load_config(["--config", str(cfg)])
    with pytest.raises(DataError, match="an input is an empty name"):
        expand_inputs([""])


# ---------------------------------------------------------------- 3. FIFOs, sockets, devices


def test_fifo_in_a_folder_is_skipped_with_a_warning(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_text("a real document")
    os.mkfifo(d / "pipe.txt")  # reading it would block forever
    os.mkfifo(d / "pipe.jsonl")
    os.symlink("/dev/zero", d / "zero.txt")  # a device that never ends
    os.symlink(d / "missing.txt", d / "broken.txt")
    notes = []
    assert expand_inputs([str(d)], notes.append) == [str(d / "a.txt")]
    assert expand_inputs([f"{d}/*.txt"], notes.append) == [str(d / "a.txt")]
    assert any("skipped 4 input entries that are not a regular file" in n for n in notes), notes
    r = flame(
        "prepare", "--input", d, "--output", tmp_path / "s", "--no-progress", "--workers", "1", timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "not a regular file" in r.stderr and "named pipe" in r.stderr
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["num_documents"] == 1


def test_fifo_named_explicitly_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    r = flame("prepare", "--input", tmp_path / "pipe.jsonl", "--output", tmp_path / "s", timeout=60)
    assert_clean_failure(r, "is a named pipe (FIFO); flame reads regular files only")


# ---------------------------------------------------------------- 4. inputs edited between runs


def _interrupted(out: Path, keep_units: int | None = None) -> None:
    """What a prepare killed before its end leaves: shards and unit records, no part or store manifest."""
    (out / "manifest.json").unlink()
    for p in (out / "parts").glob("*.json"):
        p.unlink()
    if keep_units is not None:
        for p in sorted((out / "units").glob("*.json"))[keep_units:]:
            p.unlink()


def test_input_edited_in_place_after_an_interrupted_prepare_is_redone(small_store, tmp_path):
    corpus, out = small_store
    _interrupted(out, keep_units=2)
    victim = corpus / "f0.jsonl"
    text = victim.read_text()
    victim.write_text(text.replace("file0", "FILE0"))  # same size, new content
    assert len(victim.read_text()) == len(text)
    logs = []
    m = quiet_prepare([corpus], out, unit_bytes=UNIT, log=logs.append)
    fresh = quiet_prepare([corpus], tmp_path / "fresh", unit_bytes=UNIT)
    assert np.array_equal(tokens_of(out), tokens_of(tmp_path / "fresh"))
    assert m["shards"] == fresh["shards"]
    assert any(f"input {victim} changed" in x for x in logs), logs


def test_input_that_grew_after_a_finished_prepare_is_redone(small_store, tmp_path):
    corpus, out = small_store
    with open(corpus / "f1.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    m = quiet_prepare([corpus], out, unit_bytes=UNIT)
    fresh = quiet_prepare([corpus], tmp_path / "fresh", unit_bytes=UNIT)
    assert m["num_documents"] == 181 and m["shards"] == fresh["shards"]
    assert np.array_equal(tokens_of(out), tokens_of(tmp_path / "fresh"))


def test_parts_that_saw_different_versions_of_an_input_are_refused(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for i in range(4):
        write_docs(d / f"f{i}.jsonl", 30, f"f{i}")
    out = tmp_path / "s"
    quiet_prepare([d], out, unit_bytes=500, part=(0, 2))
    victim = d / "f0.jsonl"
    victim.write_text(victim.read_text().replace("f0 ", "F0 "))
    with pytest.raises(DataError, match="prepared from different versions of") as e:
        quiet_prepare([d], out, unit_bytes=500, part=(1, 2))
    assert str(victim) in e.value.message and "--part I/N" in e.value.hint
    assert not (out / "manifest.json").exists()
    m = quiet_prepare([d], out, unit_bytes=500, part=(0, 2))  # redoes what part 0 made from the old file
    fresh = quiet_prepare([d], tmp_path / "fresh", unit_bytes=500)
    assert m["shards"] == fresh["shards"]


def test_input_changing_while_it_is_read_is_an_error(small_store, tmp_path):
    corpus, _ = small_store
    path = str(corpus / "f0.jsonl")
    size, mtime = os.stat(path).st_size, os.stat(path).st_mtime_ns
    job = prepare_mod._Job(
        tokenizer="byte",
        output=str(tmp_path / "s"),
        dtype="uint16",
        text_field="text",
        val_fraction=0.0,
        bad_records="skip",
        max_bad_fraction=0.5,
        sources=(path,),
        states=((path, [size, mtime - 1]),),
    )
    unit = prepare_mod.plan_units([path])[0]
    with pytest.raises(DataError, match=f"input {path} changed while flame prepare was reading it"):
        prepare_mod._UnitWorker(job).run(0, [unit])
    assert not list((tmp_path / "s").glob("u000000.*"))  # nothing half-written, no record
    assert not (tmp_path / "s" / "units").exists()


def test_different_input_list_names_the_new_file(small_store):
    corpus, out = small_store
    extra = write_docs(corpus.parent / "extra.jsonl", 5, "extra")
    with pytest.raises(DataError, match=r"different inputs \(1 new, e\.g\. .*extra\.jsonl\)"):
        quiet_prepare([corpus, extra], out, unit_bytes=UNIT)


# ---------------------------------------------------------------- 5. shard names leading out of the store


@pytest.mark.parametrize("name", ["../other/u000000", "/etc/passwd", "sub/u000000", "..", ""])
def test_manifest_shard_outside_the_store_is_refused(small_store, tmp_path, name):
    _, out = small_store
    other = tmp_path / "other"
    other.mkdir()
    for ext in ("tokens", "docs"):
        (other / f"u000000.{ext}").write_bytes((out / f"u000000.{ext}").read_bytes())
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][0]["name"] = name
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        DataError, match=r"is damaged: manifest.json: shards\[0\]\.name .* expected a plain file name"
    ):
        TokenStore(out)


# ---------------------------------------------------------------- 6. damaged shards


def _flip(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([value], np.uint16).tobytes())


def test_flipped_token_in_range_is_found_by_the_background_check(small_store):
    _, out = small_store
    TokenStore(out, verify="background").wait_verified(30)  # intact: records what it verified
    assert (out / store_mod.VERIFIED).is_file()
    _flip(out / "u000001.tokens", 20, ord("Q"))  # still a valid id: only the checksum can tell
    s = open_store(out, None)  # what training opens: verification in the background on rank 0
    with pytest.raises(DataError, match=r"u000001\.tokens: checksum mismatch") as e:
        s.wait_verified(30)
    assert "flame prepare --verify" in e.value.hint
    with pytest.raises(DataError, match="is damaged"):  # the next read stops too
        s.read_windows(np.array([0]), np.empty((1, 8), np.int64))
    with pytest.raises(DataError, match="checksum mismatch"):
        TokenStore(out, verify=True)


def test_out_of_range_token_stops_the_read_naming_the_shard(small_store):
    _, out = small_store
    _flip(out / "u000002.tokens", 40, 60000)
    s = TokenStore(out)  # sizes are right: opening alone cannot tell
    base = int(s.offsets[2])
    batch = np.empty((2, 16), np.int64)
    with pytest.raises(DataError, match=r"shard u000002\.tokens holds token id 60000 at token 20"):
        s.read_windows(np.array([0, base + 10]), batch)
    with pytest.raises(DataError, match="u000002.tokens holds token id 60000"):
        s.read(base, np.empty(64, np.int64))
    s.read_windows(np.array([0, 16]), batch)  # windows elsewhere still read
    with pytest.raises(DataError, match="outside the vocabulary of 257 ids"):
        store_mod.check_ids(np.array([[1, 2, 257]]), 257)
    store_mod.check_ids(np.array([[0, 256]]), 257)


@pytest.mark.slow
def test_training_on_a_damaged_store_stops_with_the_shard_name(small_store, tmp_path):
    _, out = small_store
    _flip(out / "u000000.tokens", 10, 999)
    r = flame(
        "train",
        "--data.store",
        out,
        "--train.run_dir",
        tmp_path / "run",
        "--train.max_steps",
        3,
        "--data.context_len",
        16,
        "--data.batch_size",
        64,
        "--log.console",
        "off",
        "--train.sample_tokens",
        0,
        timeout=300,
    )
    assert_clean_failure(r, "u000000.tokens", "is damaged", "flame prepare --verify")


def test_truncated_shard_is_refused_at_open(small_store):
    _, out = small_store
    p = out / "u000001.tokens"
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"is damaged: u000001\.tokens: size"):
        TokenStore(out)


def test_verify_sets_damaged_shards_aside_and_prepare_redoes_only_them(small_store, capsys):
    corpus, out = small_store
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("u*.tokens")}
    n = len(before)
    assert cli(["--verify", str(out)]) == 0
    assert f"all {n} shard(s) intact" in capsys.readouterr().err
    _flip(out / "u000001.tokens", 6, ord("Z"))
    assert cli(["--verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"1 of {n} shard(s) damaged" in err and "u000001.tokens: checksum mismatch" in err
    assert "run the `flame prepare` command that made it again" in err
    assert "Traceback" not in err
    assert (out / "manifest.json.damaged").is_file() and (out / "units" / "u000001.json.damaged").is_file()
    with pytest.raises(DataError, match="found damaged shards and set them aside"):  # not used until repaired
        TokenStore(out)
    assert cli(["--status", str(out)]) == 1
    assert "set aside by `flame prepare --verify`" in capsys.readouterr().out
    logs = []
    quiet_prepare([corpus], out, unit_bytes=UNIT, log=logs.append)
    assert any("set aside are prepared again" in x for x in logs) and not list(out.rglob("*.damaged"))
    assert cli(["--status", str(out)]) == 0
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("u*.tokens")}
    assert {n for n in after if after[n] != before[n]} == {"u000001.tokens"}
    assert after["u000001.tokens"][0] == before["u000001.tokens"][0]  # the repaired shard is the original
    TokenStore(out, verify=True)


def test_verify_cli_on_damaged_store_subprocess(small_store):
    _, out = small_store
    _flip(out / "u000000.tokens", 0, 7)
    r = flame("prepare", "--verify", out, timeout=60)
    assert_clean_failure(
        r, "u000000.tokens: checksum mismatch", "only those shards are tokenized again", code=1
    )


# ---------------------------------------------------------------- 7. two prepares of one store at once


def _corpus(tmp_path, files=8, docs=200):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(files):
        write_docs(d / f"f{i}.jsonl", docs, f"file{i}")
    return d


@pytest.mark.slow
def test_two_prepares_into_one_store_at_once_both_succeed(tmp_path):
    d = _corpus(tmp_path)
    out = tmp_path / "shared"
    args = ["prepare", "--input", d, "--output", out, "--workers", "1", "--unit-mb", "0.002", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flame", *map(str, args)], stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, e in zip(procs, errs):
        assert p.returncode == 0 and "Traceback" not in e, e
    ref = quiet_prepare([d], tmp_path / "ref", unit_bytes=int(0.002 * (1 << 20)))
    assert json.loads((out / "manifest.json").read_text())["shards"] == ref["shards"]
    assert not list(out.glob("*.tmp*"))


_CACHE_SCRIPT = """
import sys
from pathlib import Path
import torch
from flame.config import load_config
from flame.data.build import prepared_store
from flame.data.tokenizer import load_tokenizer
from flame.parallel import World
corpus, cache, run = sys.argv[1:]
cfg = load_config(["--data.inputs", corpus, "--data.cache_dir", cache, "--train.run_dir", run])
print(prepared_store(cfg.data.inputs, cfg, load_tokenizer("byte"), Path(run), World(0, 1, 0, torch.device("cpu")), print))
"""


@pytest.mark.slow
def test_two_runs_preparing_into_one_cache_dir_share_one_store(tmp_path):
    d = _corpus(tmp_path, files=12, docs=400)
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CACHE_SCRIPT, str(d), str(cache), str(tmp_path / f"run{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in e, e
    stores = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(stores) == 1 and len(list(cache.glob("store-*"))) == 1
    TokenStore(stores.pop(), verify=True)


@pytest.mark.slow
def test_a_second_prepare_waits_for_the_lock_then_reuses_the_work(small_store):
    corpus, out = small_store
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with prepare_mod._PartLock(out, (0, 1), lambda m: None):
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flame",
                "prepare",
                "--input",
                str(corpus),
                "--output",
                str(out),
                "--unit-mb",
                str(UNIT / (1 << 20)),
                "--workers",
                "1",
                "--no-progress",
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        time.sleep(3)
        assert p.poll() is None  # waiting
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 0, err
    assert "is writing this part; waiting for it" in err and "documents" not in err  # nothing redone


# ---------------------------------------------------------------- 8. kill -9 of prepare's parent


def _children() -> dict[int, int]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (p / "stat").read_text()
                out[int(p.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(pid: int) -> set[int]:
    parent = _children()
    found, todo = set(), [pid]
    while todo:
        q = todo.pop()
        for c, pp in parent.items():
            if pp == q and c not in found:
                found.add(c)
                todo.append(c)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _endless_zst(path: Path, gigabytes: int = 2) -> None:
    """A small file that decompresses to gigabytes of JSON lines: a minute of work for a worker."""
    chunk = ((json.dumps({"text": "abc " * 50}) + "\n") * 4000).encode()
    frame = zstandard.ZstdCompressor(level=19).compress(chunk)
    with open(path, "wb") as f:
        f.write(frame * (gigabytes * (1 << 30) // len(chunk)))


@pytest.mark.slow
def test_workers_exit_when_prepare_is_killed(tmp_path):
    for name in ("a", "b"):
        _endless_zst(tmp_path / f"{name}.jsonl.zst")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flame",
            "prepare",
            "--input",
            str(tmp_path / "a.jsonl.zst"),
            str(tmp_path / "b.jsonl.zst"),
            "--output",
            str(tmp_path / "s"),
            "--workers",
            "2",
            "--unit-mb",
            "0.1",
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    kids: set[int] = set()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and len(list((tmp_path / "s").glob("u*.tokens.tmp*"))) < 2:
            time.sleep(0.1)  # until both workers write
        time.sleep(1)
        kids = _descendants(p.pid)
        assert len(kids) >= 2, "the workers did not start"
        p.send_signal(signal.SIGKILL)
        p.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8 and any(_running(k) for k in kids):
            time.sleep(0.1)
        alive = [k for k in kids if _running(k)]
        assert not alive, f"worker processes {alive} outlived their parent"
    finally:
        p.kill()
        for k in kids:
            with contextlib.suppress(OSError):
                if _running(k):
                    os.kill(k, signal.SIGKILL)


# ---------------------------------------------------------------- 9. a full disk


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_full_disk_during_prepare_is_a_clear_error_and_keeps_what_was_done(tmp_path, tiny_disk):
    d = tmp_path / "c"
    d.mkdir()
    write_docs(d / "a.jsonl", 300, "small")  # fits
    (d / "b.jsonl").write_text(
        "".join(json.dumps({"text": "y" * 1000}) + "\n" for _ in range(400))
    )  # does not
    out = tiny_disk / "s"
    args = ["prepare", "--input", d, "--output", out, "--workers", "1", "--unit-mb", "0.01", "--no-progress"]
    r = flame(*args, timeout=120)
    assert_clean_failure(r, "No space left on device", "cannot write shard", "free space", code=1)
    assert not list(out.rglob("*.tmp*"))  # nothing half-written left behind
    kept = snapshot(out)
    assert any(k.startswith("units/") for k in kept)  # the shards that fitted are recorded
    r = flame(*args, timeout=120)  # again: the same clear error, and the earlier state is untouched
    assert_clean_failure(r, "No space left on device", code=1)
    assert snapshot(out) == kept
    args[args.index("--workers") + 1] = "2"
    r = flame(*args, timeout=120)
    assert_clean_failure(r, "No space left on device", code=1)  # the same from worker processes
    assert snapshot(out) == kept


def test_write_errors_never_raise_from_abort(tmp_path, monkeypatch):
    w = store_mod.ShardWriter(tmp_path, "u000000", np.dtype(np.uint16))
    w.add(np.arange(10), 0, 0)

    class Full:
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    w._tok = Full()
    with pytest.raises(
        DataError, match=r"cannot write shard .*u000000\.tokens\.tmp\d+: No space left on device"
    ):
        w.add(np.arange(5), 0, 1)
    w.abort()  # the buffered tail fails again: never an error from the cleanup
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- 10. parquet text columns


def _parquet(path, **cols):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols), path)
    return path


@pytest.mark.parametrize(
    "cols, message",
    [
        ({"text": [None, None, None]}, "column 'text' holds null, not text"),
        ({"text": [1, 2, 3]}, "column 'text' holds int64, not text"),
        ({"body": ["a", "b"]}, "no column 'text'; its columns are ['body']"),
    ],
)
@pytest.mark.slow
def test_parquet_without_a_usable_text_column_is_a_clear_error(tmp_path, cols, message):
    f = _parquet(tmp_path / "t.parquet", **cols)
    r = flame("prepare", "--input", f, "--output", tmp_path / "s", "--no-progress", timeout=60)
    assert_clean_failure(r, message, code=1)
    r = flame(
        "train", "--data.inputs", f, "--train.run_dir", tmp_path / "run", "--train.max_steps", 1, timeout=300
    )
    assert_clean_failure(r, message, code=1)


@pytest.mark.slow
def test_parquet_null_strings_are_counted_bad_records(tmp_path):
    import pyarrow as pa

    f = _parquet(
        tmp_path / "t.parquet", text=pa.array(["a document", None, "another one", None], pa.string())
    )
    r = flame(
        "prepare", "--input", f, "--output", tmp_path / "s", "--no-progress", "--workers", "2", timeout=60
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "skipped 2 bad records of 4 (2 field 'text' is null)" in r.stderr
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["num_documents"] == 2


# ---------------------------------------------------------------- 11. malformed store metadata


MANIFEST_DAMAGE = [
    ("num_documents", "abc", "num_documents is 'abc', expected a non-negative integer"),
    ("shards.0.tokens", "12", r"shards\[0\]\.tokens is '12', expected a non-negative integer"),
    ("shards.0.documents", -1, r"shards\[0\]\.documents is -1"),
    ("shards.0", "u000000", r"shards\[0\] is 'u000000', expected an object"),
    ("shards", {"a": 1}, "shards is {'a': 1}, expected a list"),
    ("dtype", "float64", "dtype is 'float64', expected uint16 or uint32"),
    (
        "tokenizer.vocab_size",
        1 << 20,
        r"tokenizer.vocab_size is 1048576, expected an integer in \[1, 65536\]",
    ),
    ("tokenizer.eos_id", 300, "tokenizer.eos_id is 300"),
    ("tokenizer", None, "tokenizer is None, expected an object"),
    ("sources", "x", "sources is 'x', expected a list"),
    ("shards.1.name", "u000000", r"shards\[1\]\.name is 'u000000', expected a name no other shard has"),
    ("shards.0.checksum", 5, r"shards\[0\]\.checksum is 5"),
]


@pytest.mark.parametrize("field, value, message", MANIFEST_DAMAGE, ids=[x[0] for x in MANIFEST_DAMAGE])
def test_malformed_manifest_field_is_named(small_store, field, value, message):
    _, out = small_store
    m = json.loads((out / "manifest.json").read_text())
    *path, last = field.split(".")
    node = m
    for k in path:
        node = node[int(k)] if k.isdigit() else node[k]
    node[int(last) if last.isdigit() else last] = value
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"store {out} is damaged: manifest.json: {message}"):
        TokenStore(out)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", '"a string"', "\xff\xfe"])
def test_unreadable_manifest_is_named(small_store, content):
    _, out = small_store
    (out / "manifest.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match=f"store {out} is damaged"):
        TokenStore(out)


@pytest.mark.slow
def test_damaged_store_metadata_on_the_command_line(small_store, tmp_path):
    _, out = small_store
    m = json.loads((out / "manifest.json").read_text())
    m["num_documents"] = "many"
    (out / "manifest.json").write_text(json.dumps(m))
    r = flame(
        "train", "--data.store", out, "--train.run_dir", tmp_path / "run", "--train.max_steps", 1, timeout=300
    )
    assert_clean_failure(r, f"store {out} is damaged: manifest.json: num_documents is 'many'", code=1)


def test_damaged_part_manifest_and_records_when_finishing(small_store):
    corpus, out = small_store
    (out / "manifest.json").unlink()
    part = out / "parts" / "part-0-of-1.json"
    info = json.loads(part.read_text())
    info["shards"][0]["tokens"] = "lots"
    part.write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"is damaged: parts/part-0-of-1.json: shards\[0\]\.tokens is 'lots'"):
        TokenStore(out)
    (out / "parts" / "part-x-of-y.json").write_text("{}")  # not a name flame writes: ignored
    (out / "units" / "u000001.json").write_text('{"units": 3}')  # a damaged record: that unit is redone
    (out / "prepare.json").write_text("[]")
    with pytest.raises(DataError, match="prepare.json does not hold a JSON object"):
        quiet_prepare([corpus], out, unit_bytes=UNIT)
    (out / "prepare.json").unlink()
    m = quiet_prepare([corpus], out, unit_bytes=UNIT)  # rewrites the part manifest: repaired
    assert m["num_documents"] == 180
    TokenStore(out, verify=True)


# ---------------------------------------------------------------- 12. bounds of prepare's numbers


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--unit-mb", "inf", "--unit-mb inf must be in [0.0009766, 16384]"),
        ("--unit-mb", "nan", "--unit-mb nan must be in"),
        ("--unit-mb", "0", "--unit-mb 0.0 must be in"),
        ("--unit-mb", "1e30", "--unit-mb 1e+30 must be in"),
        ("--max-bad-fraction", "7", "--max-bad-fraction 7.0 must be in (0, 1]"),
        ("--max-bad-fraction", "0", "--max-bad-fraction 0.0 must be in (0, 1]"),
        ("--max-bad-fraction", "nan", "--max-bad-fraction nan must be in (0, 1]"),
        ("--val-fraction", "1", "--val-fraction 1.0 must be in [0, 1)"),
        ("--val-fraction", "inf", "--val-fraction inf must be in [0, 1)"),
    ],
)
def test_prepare_numbers_out_of_bounds(tmp_path, capsys, flag, value, message):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(SystemExit) as e:
        cli(["--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "s"), flag, value])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_prepare_api_bounds(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    for kw, msg in [
        ({"max_bad_fraction": 7.0}, r"max_bad_fraction = 7.0 must be in \(0, 1\]"),
        ({"unit_bytes": 0}, "unit_bytes = 0 must be an integer"),
        ({"val_fraction": float("nan")}, r"val_fraction = nan must be in \[0, 1\)"),
    ]:
        with pytest.raises(DataError, match=msg):
            quiet_prepare([tmp_path / "a.txt"], tmp_path / "s", **kw)
