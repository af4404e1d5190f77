"""From the data config to a rank's loader: open stores (preparing raw inputs once, cached) or stream."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from flame.config import Config
from flame.data.store import TokenStore
from flame.data.tokenizer import Tokenizer, load_tokenizer
from flame.errors import DataError
from flame.parallel import World, on_main_rank

DEFAULT_INPUTS = ["stdlib"]  # the running interpreter's standard library: text that needs no download


def inputs_of(cfg: Config) -> list[str]:
    return cfg.data.inputs or ([] if (cfg.data.store or cfg.data.mix or cfg.data.phases) else DEFAULT_INPUTS)


def _cache_key(paths: list[str], tok: Tokenizer, text_field: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{p};".encode())  # hf: names and the like
    h.update(f"{tok.fingerprint}:{text_field}".encode())
    return h.hexdigest()[:16]


def prepared_store(inputs: list[str], cfg: Config, tok: Tokenizer, run_dir: Path, world: World, log) -> Path:
    """Prepare raw inputs into a store under the cache directory once; later runs reuse it.

    Runs sharing one cache directory may prepare the same inputs at the same time: `prepare` locks
    the store, the second waits and then reuses the first's shards. An input edited since (size or
    mtime) gives another store."""
    from flame.data.prepare import prepare
    from flame.data.sources import expand_inputs

    paths = expand_inputs(inputs, log=lambda m: None)  # `prepare` reports what it skipped
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "data"
    out = root / f"store-{_cache_key(paths, tok, cfg.data.text_field)}"

    def make() -> None:
        if (out / "manifest.json").is_file():
            return
        log(f"preparing {len(paths)} input file(s) into {out} (once; later runs reuse it)")
        prepare(
            inputs,
            cfg.data.tokenizer,
            str(out),
            workers=min(os.cpu_count() or 1, max(1, len(paths))),
            text_field=cfg.data.text_field,
            bad_records=cfg.data.bad_records,
            max_bad_fraction=cfg.data.max_bad_fraction,
            progress=False,
        )

    on_main_rank(world, make)  # the others wait for it, and stop too when it fails
    return out


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
        stores = [open_store(prepared_store(inputs_of(cfg), cfg, tok, run_dir, world, log), tok)]
    loader = PreparedLoader(
        stores,
        weights,
        d.context_len,
        d.seed,
        d.shuffle,
        world.rank,
        world.world_size,
        d.batch_size,
        cfg.train.grad_accum,
        varlen=d.varlen,
        num_workers=d.num_workers,
        names=names,
        plan=plan,
        epoch_shift=d.epoch_shift,
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
    `flame prepare --val-fraction`) of the data.mix stores, named like the mixture's sources.
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
    if d.mix:
        from flame.data.mixture import parse_named_mix

        for name, path, _ in parse_named_mix(d.mix):
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
