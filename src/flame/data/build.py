"""From the data config to a rank's loader: open stores (preparing raw inputs once, cached) or stream."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from flame.config import Config
from flame.data.store import TokenStore
from flame.data.tokenizer import Tokenizer, load_tokenizer
from flame.errors import DataError
from flame.parallel import World, on_main_rank

DEFAULT_INPUTS = ["stdlib"]  # the running interpreter's standard library: text that needs no download


def inputs_of(cfg: Config) -> list[str]:
    return cfg.data.inputs or ([] if (cfg.data.store or cfg.data.mix or cfg.data.phases) else DEFAULT_INPUTS)


# stores that `flame train` prepares from raw data.inputs are content-addressed: the same corpus (any
# path, any run directory) maps to one store in one cache folder, and an edited file to a new one
CACHE_FORMAT = 1
# the unit plan of a cached store is sized for this many workers whatever the machine, so a store
# prepared again elsewhere (a resume on another machine) is the same store, fingerprint included
CACHE_PLAN_WORKERS = 32
_HASH_BLOCK = 8 << 20
_RACY_NS = 2_000_000_000  # a file modified this recently may change again within its mtime tick


def cache_root(cfg: Config) -> Path:
    """Where raw inputs are prepared: data.cache_dir, else $FLAME_CACHE, else $XDG_CACHE_HOME/flame,
    else ~/.cache/flame (shared by every run of this user)."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    if os.environ.get("FLAME_CACHE"):
        return Path(os.environ["FLAME_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "flame"
    return Path.home() / ".cache" / "flame"


def _memo_path(root: Path, folder: str) -> Path:
    name = hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return root / ".index" / "hashes" / f"{name}.json"


def _read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(path: Path, memo: dict) -> None:
    """Best effort (a read-only cache only costs hashing again); atomic, so a reader never sees half."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_HASH_BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _file_hashes(files: list[str], root: Path) -> list[str]:
    """SHA-256 of each file's content, memoised in `root` per file version (absolute path, size,
    mtime_ns, inode), so each version of a file is read once whatever the number of runs."""
    out: dict[str, str] = {}
    by_dir: dict[str, list[tuple[str, os.stat_result]]] = {}
    for f in files:
        absf = os.path.abspath(f)
        try:
            by_dir.setdefault(os.path.dirname(absf), []).append((absf, os.stat(absf)))
        except OSError:
            out[absf] = "unreadable"  # the reader reports it with its own message
    now = time.time_ns()
    for folder, entries in by_dir.items():
        mp = _memo_path(root, folder)
        memo, dirty = _read_memo(mp), False
        for absf, st in entries:
            ident = [st.st_size, st.st_mtime_ns, st.st_ino]
            seen = memo.get(os.path.basename(absf))
            if isinstance(seen, list) and len(seen) == 4 and seen[:3] == ident and isinstance(seen[3], str):
                out[absf] = seen[3]
                continue
            try:
                digest = _sha256_file(absf)
            except OSError:
                out[absf] = "unreadable"
                continue
            out[absf] = digest
            if now - st.st_mtime_ns > _RACY_NS:
                memo[os.path.basename(absf)] = [*ident, digest]
                dirty = True
        if dirty:
            _write_memo(mp, memo)
    return [out[os.path.abspath(f)] for f in files]


def _content_id(path: str, root: Path) -> str:
    """What identifies one expanded input: the SHA-256 of its bytes (a saved-dataset folder: of its
    files, by relative name); a hub name only by its name (its content is the hub's)."""
    if path.startswith("hf:"):
        return "name:" + path
    if os.path.isdir(path):
        files = sorted(os.path.join(top, n) for top, _, names in os.walk(path) for n in names)
        rel = [os.path.relpath(f, path) for f in files]
        h = hashlib.sha256()
        for r, digest in zip(rel, _file_hashes(files, root)):
            h.update(f"{r}\0{digest}\n".encode("utf-8", "surrogateescape"))
        return "dir:" + h.hexdigest()
    return _file_hashes([path], root)[0]


def store_key(paths: list[str], tok: Tokenizer, cfg: Config, root: Path | None = None) -> str:
    """The content address of the store prepared from the expanded inputs `paths`: a SHA-256 over
    each input's content (in order, with its format as its name tells the reader), the tokenizer's
    fingerprint and the settings that change the store (text_field, bad-record policy, unit plan)."""
    from flame.data import sources

    root = cache_root(cfg) if root is None else root
    ids = [_content_id(p, root) for p in paths] if paths else []
    h = hashlib.sha256()
    h.update(f"flame-store/{CACHE_FORMAT}\n".encode())
    for p, cid in zip(paths, ids):
        comp = sources.COMPRESSED.get(os.path.splitext(p)[1].lower(), "")
        h.update(f"{sources.kind_of(p)}:{comp}:{cid}\n".encode())
    d = cfg.data
    settings = {
        "tokenizer": tok.fingerprint,
        "text_field": d.text_field,
        "bad_records": d.bad_records,
        "max_bad_fraction": d.max_bad_fraction,
        "plan": [
            CACHE_PLAN_WORKERS,
            sources.UNITS_PER_WORKER,
            sources.MIN_AUTO_UNIT,
            sources.MAX_AUTO_UNIT,
            sources.MIN_SPLIT_UNIT,
        ],
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:20]


def store_cache_path(paths: list[str], tok: Tokenizer, cfg: Config) -> Path:
    """The cached store `flame train` prepares the expanded inputs `paths` into (it may not exist yet)."""
    root = cache_root(cfg)
    return root / f"store-{store_key(paths, tok, cfg, root)}"


class _CacheLock:
    """An flock per cached store, held while deciding and preparing: a second run with the same
    content waits, then finds the store finished. Released by the kernel when a process dies."""

    def __init__(self, path: Path, log):
        self.path, self.log, self.fd = path, log, None

    def __enter__(self) -> _CacheLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DataError(
                f"cannot use the data cache {self.path.parent.parent.parent}: {e.strerror or e}",
                hint="point data.cache_dir (or $FLAME_CACHE) at a writable folder",
            ) from None
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.log(f"another run is preparing the same inputs ({self.path.stem}); waiting for it")
                fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks on this filesystem: prepare's own part lock still orders the writers
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _settings_inputs(out: Path) -> list | None:
    try:
        old = json.loads((out / "prepare.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return old.get("inputs") if isinstance(old, dict) else None


def prepared_store(inputs: list[str], cfg: Config, tok: Tokenizer, run_dir: Path, world: World, log) -> Path:
    """Prepare raw inputs once into a content-addressed store under the cache root; every later run
    of the same content (other paths, other run directories) reuses it.

    Rank 0 prepares (all cores; a progress bar on a terminal); runs preparing the same content at
    the same time take turns (a lock), the second then reuses the first's store. The store used is
    logged, and recorded with the run's data plan (data_plan.json)."""
    from flame.data.prepare import prepare, usable_cpus
    from flame.data.sources import expand_inputs, input_bytes

    def make() -> Path:
        # rank 0 only: the other ranks neither expand nor hash the inputs, they get the path
        paths = expand_inputs(inputs, log=lambda m: None)  # `prepare` reports what it skipped
        root = cache_root(cfg)
        key = store_key(paths, tok, cfg, root)
        out = root / f"store-{key}"
        if (out / "manifest.json").is_file():
            log(f"data: reusing the store {out} prepared from these inputs (same content)")
            return out
        with _CacheLock(root / ".index" / "locks" / f"store-{key}.lock", log):
            if (out / "manifest.json").is_file():
                log(f"data: reusing the store {out} another run just prepared from these inputs")
                return out
            target = out
            seen = _settings_inputs(out)
            if seen is not None and seen != paths:
                # begun (and interrupted) from the same content at other paths: a store's resume
                # record names its inputs, so this copy gets a store of its own
                tag = hashlib.sha256(json.dumps(paths).encode("utf-8", "surrogateescape")).hexdigest()[:8]
                target = root / f"store-{key}-{tag}"
                if (target / "manifest.json").is_file():
                    log(f"data: reusing the store {target} prepared from these inputs")
                    return target
            nbytes = input_bytes(paths)
            log(
                f"data: preparing {len(paths)} input file(s), {nbytes / 1e6:,.1f} MB, into {target} "
                "(once; later runs of the same content reuse it)"
            )
            prepare(
                inputs,
                cfg.data.tokenizer,
                str(target),
                workers=usable_cpus(),
                text_field=cfg.data.text_field,
                bad_records=cfg.data.bad_records,
                max_bad_fraction=cfg.data.max_bad_fraction,
                progress=sys.stderr.isatty(),
                plan_workers=CACHE_PLAN_WORKERS,
                log=log,
            )
            return target

    made = on_main_rank(world, make)  # the others wait for it, and stop too when it fails
    if world.distributed:
        import torch.distributed as dist

        box = [str(made) if made is not None else None]
        dist.broadcast_object_list(box, src=0)
        made = Path(box[0])
        seen = [None] * world.world_size
        dist.all_gather_object(seen, (made / "manifest.json").is_file())
        if not all(seen):
            missing = [r for r, ok in enumerate(seen) if not ok]
            raise DataError(
                f"rank 0 prepared the store {made}, but rank(s) {missing} cannot see it (a cache folder "
                "local to each machine?)",
                hint="point data.cache_dir (or $FLAME_CACHE) at a folder every node shares",
            )
    return made


def open_store(path: str | Path, tok: Tokenizer | None, verify: bool | str | None = None) -> TokenStore:
    """Open a store for reading: manifest and shard sizes checked now, token ids on every read, and
    (verify None: on global rank 0 only) every shard's SHA-256 in a background thread; a damaged
    shard stops the run with its name and the fix."""
    if verify is None:
        verify = "background" if int(os.environ.get("RANK", "0") or 0) == 0 else False
    store = TokenStore(path, verify=verify)
    if tok is not None and store.tokenizer_fingerprint != tok.fingerprint:
        raise DataError(
            f"store {path} was prepared with tokenizer {store.manifest['tokenizer'].get('spec')!r} "
            f"(fingerprint {store.tokenizer_fingerprint[:12]}), but this run uses {tok.spec!r} "
            f"(fingerprint {tok.fingerprint[:12]})",
            hint="pass the store's tokenizer with --data.tokenizer, or prepare the store again",
        )
    return store


def store_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a store was prepared with (a copy lives inside the store)."""
    inner = Path(path) / "tokenizer"
    if inner.is_dir():
        return load_tokenizer(str(inner))
    spec = json.loads((Path(path) / "manifest.json").read_text())["tokenizer"].get("spec", "byte")
    return load_tokenizer(spec)


def resolve_tokenizer(cfg: Config) -> Tokenizer:
    """data.tokenizer, or — when reading stores with the default tokenizer — the stores' own."""
    first = cfg.data.store or (cfg.data.mix and _mix_paths(cfg)[0])
    if cfg.data.phases and not first:
        from flame.data.mixture import parse_mix

        first = parse_mix(cfg.data.phases[0]["mix"])[0][0]
    if first and cfg.data.tokenizer == "byte" and Path(first, "manifest.json").is_file():
        return store_tokenizer(first)
    return load_tokenizer(cfg.data.tokenizer)


def _mix_paths(cfg: Config) -> list[str]:
    from flame.data.mixture import parse_mix

    return [p for p, _ in parse_mix(cfg.data.mix)]


def config_plan(cfg: Config, world_size: int):
    """data.phases as a DataPlan: start_tokens become the first step at or after that many tokens."""
    from flame.data.mixture import DataPlan

    d = cfg.data
    per_step = d.batch_size * world_size * cfg.train.grad_accum * d.context_len
    phases = []
    for ph in d.phases:
        start = ph["start_step"] if "start_step" in ph else -(-int(ph["start_tokens"]) // per_step)
        phases.append(
            {"start_step": int(start), "mix": ph["mix"], "ramp_steps": int(ph.get("ramp_steps", 0))}
        )
    try:
        return DataPlan.from_specs(phases)
    except ValueError as e:
        raise DataError(f"data.phases: {e}") from None


# The source name of raw data.inputs: fixed, so that inputs edited between a stop and a resume (another
# content-addressed store) are a changed source the resume refuses, not a new source it adds.
RAW_SOURCE = "inputs"


def _earlier_raw_store(run_dir: Path, cfg: Config) -> tuple[str, Path] | None:
    """(name, path) of the store a run begun before the shared cache prepared into <run_dir>/data, as its
    data_plan.json records it; None for any other run."""
    plan_file = Path(run_dir) / "data_plan.json"
    if cfg.data.cache_dir or not plan_file.is_file():
        return None
    try:
        sources = json.loads(plan_file.read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(sources) != 1 or not isinstance(sources[0], dict):
        return None
    name, path = sources[0].get("name"), Path(str(sources[0].get("path", "")))
    inside = Path(run_dir).resolve() / "data"
    if name == RAW_SOURCE or not (path / "manifest.json").is_file():
        return None
    if path.resolve().parent != inside:
        return None
    return str(name), path


def build_loader(cfg: Config, world: World, run_dir: Path, tok: Tokenizer, log=print):
    """The training loader of this rank."""
    d = cfg.data
    if d.streaming:
        from flame.data.stream import StreamingLoader

        return StreamingLoader.from_config(cfg, inputs_of(cfg), tok, world)
    from flame.data.loader import PreparedLoader

    weights = names = plan = None
    if d.phases:
        plan = config_plan(cfg, world.world_size)
        stores = [open_store(src["path"], tok) for src in plan.sources]
    elif d.mix:
        from flame.data.mixture import parse_named_mix

        named = parse_named_mix(d.mix)
        stores = [open_store(p, tok) for _, p, _ in named]
        weights = [w for _, _, w in named]
        names = [n for n, _, _ in named]
    elif d.store:
        stores = [open_store(d.store, tok)]
    else:
        earlier = _earlier_raw_store(run_dir, cfg)
        if earlier is not None:  # a run begun before the shared cache keeps the store it trained on
            name, path = earlier
            log(f"data: reusing the store this run trained on, {path}")
        else:
            name, path = RAW_SOURCE, prepared_store(inputs_of(cfg), cfg, tok, run_dir, world, log)
        stores, names = [open_store(path, tok)], [name]
    loader = PreparedLoader.from_config(
        cfg, stores, rank=world.rank, world=world.world_size, weights=weights, names=names, plan=plan
    )
    n, g = loader.source.num_samples, loader.global_batch
    if n < g:
        log(
            f"warning: the data holds {n} sample(s) of {d.context_len} tokens, fewer than one step's global "
            f"batch of {g}: every step repeats samples (use more data, or a smaller batch or context)"
        )
    return loader


def build_eval_sets(cfg: Config, world: World, run_dir: Path, tok: Tokenizer, log=print):
    """The held-out sets of evaluation: (main, sources), or (None, []) when evaluation is off.

    main is eval.store / eval.inputs when given, else data.store's `<store>/val`; None with a
    mixture means "the union of the sources". sources are the `<store>/val` parts (written by
    `flame prepare --val-fraction`) of the data.mix (or data.phases) stores, named like the mixture's
    sources.
    Each set reads `eval.batches x eval.batch_size` windows spread over it (0 batches: all).
    """
    from flame.data.evalset import HeldOut

    e, d = cfg.eval, cfg.data
    if not (e.interval or e.at_start):
        return None, []
    count = e.batches * (e.batch_size or d.batch_size)
    L = d.context_len
    main = None
    if e.store or e.inputs:
        path = e.store or prepared_store(e.inputs, cfg, tok, run_dir, world, log)
        main = HeldOut(open_store(path, tok), "eval", L, count)
    sources: list = []
    if d.mix or d.phases:
        from flame.data.mixture import parse_named_mix

        # with phases: every source any phase names, from the first evaluation on (whole curves)
        named = (
            [(s["name"], s["path"]) for s in config_plan(cfg, world.world_size).sources]
            if d.phases
            else [(n, p) for n, p, _ in parse_named_mix(d.mix)]
        )
        for name, path in named:
            val = Path(path) / "val"
            if not val.is_dir():
                log(f"note: mixture source {name} has no held-out part ({val}): no held-out loss for it")
                continue
            try:
                sources.append(HeldOut(open_store(val, tok), name, L, count))
            except DataError as err:
                log(f"warning: mixture source {name}: {err.message}; no held-out loss for it")
    elif d.store and main is None and Path(d.store, "val").is_dir():
        main = HeldOut(open_store(Path(d.store) / "val", tok), Path(d.store).name, L, count)
    return main, sources
