"""The shared, content-addressed cache of stores that `flame train` prepares from raw data.inputs."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from flame.config import load_config
from flame.data import build
from flame.data.build import cache_root, prepared_store, store_cache_path
from flame.data.prepare import prepare
from flame.data.sources import expand_inputs
from flame.data.store import TokenStore
from flame.data.tokenizer import load_tokenizer
from flame.parallel import World

ONE = World(0, 1, 0, torch.device("cpu"))
OLD = 1_000_000_000  # an mtime (s) long past: the hash memo trusts it


def _corpus(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"f{i}.jsonl").write_text(
            "".join(json.dumps({"text": f"file {i} document {j}. " * (j % 7 + 1)}) + "\n" for j in range(60))
        )
        os.utime(root / f"f{i}.jsonl", (OLD, OLD))
    return root


def _cfg(corpus: Path, run: Path, *extra: str):
    return load_config(["--data.inputs", str(corpus), "--train.run_dir", str(run), *extra])


def _prepare(corpus: Path, run: Path, *extra: str) -> tuple[Path, list[str]]:
    logs: list[str] = []
    cfg = _cfg(corpus, run, *extra)
    return prepared_store(cfg.data.inputs, cfg, load_tokenizer("byte"), run, ONE, logs.append), logs


def test_cache_root_default_env_and_config(tmp_path, monkeypatch):
    cfg = load_config([])
    monkeypatch.delenv("FLAME_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(cfg) == tmp_path / "home" / ".cache" / "flame"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(cfg) == tmp_path / "xdg" / "flame"
    monkeypatch.setenv("FLAME_CACHE", str(tmp_path / "fc"))
    assert cache_root(cfg) == tmp_path / "fc"
    cfg = load_config(["--data.cache_dir", str(tmp_path / "cd")])
    assert cache_root(cfg) == tmp_path / "cd"  # data.cache_dir wins


@pytest.mark.slow
def test_two_run_dirs_prepare_once_and_record_the_store(tmp_path, capsys):
    from flame.config import load_config as load
    from flame.trainer import run_training

    corpus = _corpus(tmp_path / "corpus")
    cache = Path(os.environ["FLAME_CACHE"])
    for run in ("a", "b"):
        run_training(load(overrides=tiny_overrides(tmp_path / run, corpus, **{"train.max_steps": 2})))
    out = capsys.readouterr().out
    stores = sorted(cache.glob("store-*"))
    assert len(stores) == 1 and (stores[0] / "manifest.json").is_file()
    assert out.count("data: preparing") == 1 and f"data: reusing the store {stores[0]}" in out
    for run in ("a", "b"):
        assert not (tmp_path / run / "data").exists()
        plan = json.loads((tmp_path / run / "data_plan.json").read_text())
        assert [s["path"] for s in plan["sources"]] == [str(stores[0])]  # the run records its store


def test_a_copy_elsewhere_reuses_and_an_edit_gives_a_new_store(tmp_path):
    a = _corpus(tmp_path / "a")
    first, logs = _prepare(a, tmp_path / "run1")
    assert any("data: preparing 4 input file(s)" in x for x in logs)
    b = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, b)  # other path, other mtimes, same content
    again, logs = _prepare(b, tmp_path / "run2")
    assert again == first and any("reusing" in x for x in logs), logs
    # an edit of the same size: a new key, a new store, the old one untouched
    text = (b / "f2.jsonl").read_text()
    (b / "f2.jsonl").write_text(text.replace("file 2", "FILE 2"))
    edited, logs = _prepare(b, tmp_path / "run2")
    assert edited != first and any("preparing" in x for x in logs)
    assert TokenStore(edited).fingerprint() != TokenStore(first).fingerprint()
    assert len(list(first.parent.glob("store-*"))) == 2


def test_key_covers_tokenizer_text_field_and_format(tmp_path):
    a = _corpus(tmp_path / "a")
    paths = expand_inputs([str(a)])
    cfg = _cfg(a, tmp_path / "r")
    byte = load_tokenizer("byte")
    key = store_cache_path(paths, byte, cfg)
    assert store_cache_path(paths, byte, _cfg(a, tmp_path / "other-run")) == key  # not the run dir
    assert store_cache_path(paths, byte, _cfg(a, tmp_path / "r", "--data.text_field", "body")) != key
    assert store_cache_path(paths[:2], byte, cfg) != key
    assert store_cache_path(paths[::-1], byte, cfg) != key  # the order is the store's order
    txt = tmp_path / "as-text" / "f0.txt"  # the same bytes read as plain text: another store
    txt.parent.mkdir()
    shutil.copy(paths[0], txt)
    jl = tmp_path / "as-jsonl" / "f0.jsonl"
    jl.parent.mkdir()
    shutil.copy(paths[0], jl)
    assert store_cache_path([str(txt)], byte, cfg) != store_cache_path([str(jl)], byte, cfg)
    assert store_cache_path([str(jl)], byte, cfg) == store_cache_path([paths[0]], byte, cfg)


def test_content_hash_is_memoised_per_file_version(tmp_path, monkeypatch):
    a = _corpus(tmp_path / "a", n=5)
    paths = expand_inputs([str(a)])
    cfg, tok = _cfg(a, tmp_path / "r"), load_tokenizer("byte")
    read: list[str] = []
    real = build._sha256_file
    monkeypatch.setattr(build, "_sha256_file", lambda p: read.append(p) or real(p))
    key = store_cache_path(paths, tok, cfg)
    assert len(read) == 5
    assert store_cache_path(paths, tok, cfg) == key and len(read) == 5  # memo hits: nothing read
    os.utime(paths[3], (OLD + 10, OLD + 10))  # touched, same content: read again, same key
    assert store_cache_path(paths, tok, cfg) == key and read[5:] == [paths[3]]
    memo = list((cache_root(cfg) / ".index" / "hashes").glob("*.json"))
    assert len(memo) == 1  # one memo file for the folder
    memo[0].write_text("{not json")  # a damaged memo costs a re-read, never a wrong key
    assert store_cache_path(paths, tok, cfg) == key and len(read) == 11


def test_a_file_modified_just_now_is_not_memoised(tmp_path, monkeypatch):
    a = _corpus(tmp_path / "a", n=1)
    f = a / "f0.jsonl"
    f.write_text(f.read_text())  # mtime = now: a same-size edit within its mtime tick would go unseen
    paths, cfg, tok = [str(f)], _cfg(a, tmp_path / "r"), load_tokenizer("byte")
    read: list[str] = []
    real = build._sha256_file
    monkeypatch.setattr(build, "_sha256_file", lambda p: read.append(p) or real(p))
    store_cache_path(paths, tok, cfg)
    store_cache_path(paths, tok, cfg)
    assert len(read) == 2


def test_data_cache_dir_moves_the_cache(tmp_path):
    a = _corpus(tmp_path / "a")
    out, _ = _prepare(a, tmp_path / "r", "--data.cache_dir", str(tmp_path / "mine"))
    assert out.parent == tmp_path / "mine" and (out / "manifest.json").is_file()
    assert not list(Path(os.environ["FLAME_CACHE"]).glob("store-*"))


def test_same_content_begun_at_another_path_gets_its_own_store(tmp_path):
    """A store interrupted while prepared from one path records that path for its resume: the same
    content at another path prepares next to it rather than mixing the two."""
    a = _corpus(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    cfg = _cfg(a, tmp_path / "r")
    key_path = store_cache_path(expand_inputs([str(a)]), load_tokenizer("byte"), cfg)
    # half of a two-part prepare from `a`: begun, not finished
    prepare(
        [str(a)], "byte", str(key_path), workers=1, part=(0, 2), unit_bytes=2000, progress=False, log=print
    )
    assert not (key_path / "manifest.json").exists()
    out, logs = _prepare(b, tmp_path / "r2")
    assert out.name.startswith(key_path.name + "-") and (out / "manifest.json").is_file()
    assert not (key_path / "manifest.json").exists()  # the begun one is left for its own resume
    again, logs = _prepare(b, tmp_path / "r3")
    assert again == out and any("reusing" in x for x in logs)


def _tokens(out: Path) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.fromfile(out / f"{s['name']}.tokens", dtype=m["dtype"]) for s in m["shards"]])


def test_prepared_store_holds_what_an_explicit_prepare_holds(tmp_path):
    a = _corpus(tmp_path / "a")
    out, _ = _prepare(a, tmp_path / "r")
    prepare([str(a)], "byte", str(tmp_path / "ref"), workers=1, progress=False, log=lambda m: None)
    assert np.array_equal(_tokens(out), _tokens(tmp_path / "ref"))


def _two_ranks(rank, corpus, cache, per_rank, out):
    from flame.errors import FlameError
    from flame.parallel import init_world

    if per_rank:  # a node-local cache: the same (relative) path, another folder on each "node"
        os.makedirs(f"{cache}-node{rank}")
        os.chdir(f"{cache}-node{rank}")
        os.environ["FLAME_CACHE"] = "cache"
    else:
        os.environ["FLAME_CACHE"] = cache
    cfg = _cfg(Path(corpus), Path(out) / "run")
    world = init_world(cfg.parallel, cfg.train)
    try:
        got = str(prepared_store(cfg.data.inputs, cfg, load_tokenizer("byte"), Path(out), world, print))
    except FlameError as e:
        got = f"error: {e.message} | {e.hint}"
    (Path(out) / f"rank{rank}.txt").write_text(got)


@pytest.mark.slow
@pytest.mark.parametrize("per_rank", [False, True])
def test_ranks_get_rank_0s_store_or_a_clear_error(tmp_path, per_rank):
    from conftest import run_distributed

    corpus = _corpus(tmp_path / "corpus")
    run_distributed(_two_ranks, 2, str(corpus), str(tmp_path / "cache"), per_rank, str(tmp_path))
    got = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if not per_rank:  # one shared cache: both ranks read the store rank 0 prepared
        assert got[0] == got[1] and Path(got[0]).parent == tmp_path / "cache"
    else:  # a cache each (a node-local ~/.cache): rank 1 cannot see rank 0's store, both stop
        assert all("rank(s) [1] cannot see it" in g and "every node shares" in g for g in got), got
        assert list((tmp_path / "cache-node0" / "cache").glob("store-*"))  # only rank 0 prepared
        assert not (tmp_path / "cache-node1" / "cache").exists()
