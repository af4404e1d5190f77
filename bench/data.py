"""The data engine, side by side with the usual alternatives, in one run.

    .venv/bin/python bench/data.py [--quick]

Tables: (1) prepared reading (flame's PreparedLoader vs a nanoGPT-style random-window np.memmap
reader vs a memory copy), (2) tokenize: `flame prepare` and streaming vs the raw tokenizer and a
Hugging Face `datasets` map + group-texts pipeline, and prepare balance on one big JSONL (2 workers
vs the tokenizer's 2-thread ceiling, uint16 and uint32 stores; --balance-mb), (3) resume state size and time to first batch,
(4) anonymous memory of a reader over a store vs a 10x bigger one. Everything is written under a
temporary directory; the report is printed and kept in bench/out/data.md.

Rows that need a process of their own (tokenizer thread counts, the HF pipeline, memory,
streaming) run this file again as a child: `--child NAME JSON`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cpu_seconds,
    dir_bytes,
    documents,
    emit,
    machine,
    md_table,
    median,
    nbytes,
    rss_anon_kib,
    si,
    stop_forkserver,
    train_bpe,
    write_jsonl,
)

# torch is imported lazily: `flame prepare`'s forkserver workers re-import this module
CONTEXT = 2048
BATCH = 8
SEED = 1234
HAS_STREAM = importlib.util.find_spec("flame.data.stream") is not None


# ================================================================ children


def _texts(files: list[str]) -> list[str]:
    out = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            out.extend(json.loads(line)["text"] for line in fh)
    return out


def child_encode(a: dict) -> dict:
    """Raw tokenizer throughput on the corpus, in batches of 1,000 documents as `flame prepare` does.

    Runs each of `methods` once, in the given order; {method: {"seconds", "tokens"}}.
    """
    from tokenizers import Tokenizer

    from flame.data.tokenizer import load_tokenizer

    texts = _texts(a["files"])
    raw = Tokenizer.from_file(str(Path(a["tok"]) / "tokenizer.json"))
    ours = load_tokenizer(a["tok"])
    out = {}
    for method in a["methods"]:
        if method == "flame":
            fn = ours.encode_batch
            count = lambda res: sum(len(x) for x in res)  # noqa: E731
        else:
            call = getattr(raw, method)
            fn = lambda b, call=call: call(b, add_special_tokens=False)  # noqa: E731
            count = lambda res: sum(len(e.ids) for e in res)  # the ids must come out: a consumer needs them  # noqa: E731
        t0, c0 = time.perf_counter(), cpu_seconds()
        n = 0
        for i in range(0, len(texts), 1000):
            n += count(fn(texts[i : i + 1000]))
        out[method] = {
            "seconds": time.perf_counter() - t0,
            "cpu": cpu_seconds() - c0,
            "tokens": n + len(texts),  # + one EOS a document
        }
    return out


def child_hf(a: dict) -> dict:
    """run_clm-style preprocessing with HF `datasets` (num_proc workers), then DataLoader reading."""
    import datasets
    import torch
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    block = a["block"]
    cache = a["cache"]
    t0, c0 = time.perf_counter(), cpu_seconds()
    raw = datasets.load_dataset("json", data_files=a["files"], split="train", cache_dir=cache)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(a["tok"]) / "tokenizer.json"))

    def tokenize(batch: dict) -> dict:
        return tok(batch["text"])

    def group(batch: dict) -> dict:
        cat = {k: sum(batch[k], []) for k in batch}
        total = len(cat["input_ids"]) // block * block
        out = {k: [v[i : i + block] for i in range(0, total, block)] for k, v in cat.items()}
        out["labels"] = out["input_ids"].copy()
        return out

    tokd = raw.map(tokenize, batched=True, num_proc=a["procs"], remove_columns=["text"])
    lm = tokd.map(group, batched=True, num_proc=a["procs"])
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds() - c0  # the map workers have exited and been reaped
    res = {"seconds": seconds, "cpu": cpu, "cache_bytes": dir_bytes(Path(cache)), "samples": len(lm)}
    if a.get("read_batches"):
        ds = lm.with_format("torch", columns=["input_ids"])
        dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True)
        it = iter(dl)
        for _ in range(3):
            next(it)
        t0 = time.perf_counter()
        got = 0
        for _ in range(a["read_batches"]):
            try:
                got += next(it)["input_ids"].numel()
            except StopIteration:
                it = iter(dl)
        res["read_tok_s"] = got / (time.perf_counter() - t0)
    return res


def child_prepare(a: dict) -> dict:
    """`flame prepare` with 2 workers (unit_bytes None: its automatic units): wall time, and CPU time
    including its worker processes."""
    from flame.data.prepare import prepare

    logs: list[str] = []
    t0, c0 = time.perf_counter(), cpu_seconds()
    mf = prepare(
        a["files"],
        a["tok"],
        a["out"],
        workers=a.get("workers", 2),
        progress=False,
        unit_bytes=a["unit_bytes"],
        log=logs.append,
    )
    seconds = time.perf_counter() - t0
    stop_forkserver()  # its workers' CPU time reaches us once it has exited
    return {
        "seconds": seconds,
        "cpu": cpu_seconds() - c0,
        "tokens": mf["num_tokens"],
        "shards": mf["shards"],
        "dtype": mf["dtype"],
        "plan": next((x for x in logs if "task(s) to do" in x), ""),
    }


def _prepared_loader(paths: list[str], weights, varlen: bool = False, workers: int = 0, plan=None):
    from flame.data.loader import PreparedLoader
    from flame.data.store import TokenStore

    stores = [TokenStore(p) for p in paths]
    return PreparedLoader(
        stores,
        context_len=CONTEXT,
        batch_size=BATCH,
        seed=SEED,
        weights=weights,
        plan=plan,
        varlen=varlen,
        num_workers=workers,
    )


def _ramped_plan(store: Path, big: Path, steps: int):
    """Three phases of S and 10xS over `steps` steps: 0.7/0.3, a linear ramp over the middle third
    to 0.2/0.8, then 0.5/0.5 (so the timed reads cross phase and ramp-piece boundaries)."""
    from flame.data.mixture import DataPlan

    third = max(1, steps // 3)
    return DataPlan.from_specs(
        [
            {"start_step": 0, "mix": f"s={store}:0.7,big={big}:0.3"},
            {"start_step": third, "mix": f"s={store}:0.2,big={big}:0.8", "ramp_steps": third},
            {"start_step": 2 * third + 1, "mix": f"s={store}:0.5,big={big}:0.5"},
        ]
    )


def child_mem(a: dict) -> dict:
    """RssAnon of a process reading `batches` micro-batches: after imports, then the max while reading."""
    import torch  # noqa: F401  (the baseline includes what every loader process imports)

    import flame.data.loader  # noqa: F401

    if a["kind"] == "streaming":
        import flame.data.stream  # noqa: F401
    base = rss_anon_kib()
    if a["kind"] == "streaming":
        loader = _streaming_loader(a["inputs"], a["tok"], a["workers"], a["tmp"])
    else:
        loader = _prepared_loader(a["stores"], a.get("weights"), a.get("varlen", False))
    it = iter(loader)
    peak = 0
    for i in range(a["batches"]):
        next(it)
        if i % 50 == 0:
            peak = max(peak, rss_anon_kib())
    after = rss_anon_kib()
    return {"base_kib": base, "peak_kib": max(peak, after), "after_kib": after}


def _streaming_loader(inputs: list[str], tok_dir: str, workers: int, run_dir: str, varlen: bool = False):
    import torch

    from flame.config import load_config
    from flame.data.build import build_loader
    from flame.data.tokenizer import load_tokenizer
    from flame.parallel import World

    cfg = load_config(
        overrides={
            "data.inputs": inputs,
            "data.streaming": True,
            "data.tokenizer": tok_dir,
            "data.context_len": CONTEXT,
            "data.batch_size": BATCH,
            "data.num_workers": workers,
            "data.varlen": varlen,
            "data.seed": SEED,
            "train.run_dir": run_dir,
        }
    )
    world = World(0, 1, 0, torch.device("cpu"))
    return build_loader(cfg, world, Path(run_dir), load_tokenizer(tok_dir), log=lambda m: None)


def child_stream(a: dict) -> dict:
    """Streaming tokenize + pack: throughput, resume state and time to first batch after a resume."""
    import flame.data.build  # noqa: F401  (imports are not part of the measurement)
    import flame.data.stream  # noqa: F401

    inputs, tok, workers, tmp = a["inputs"], a["tok"], a["workers"], a["tmp"]
    depths = set(a["depths"])
    saved: dict[int, tuple[bytes, object]] = {}
    # end to end, like `prepare`: build the loader, start its workers, read `batches` batches;
    # at each resume depth, keep the state and the batch that follows it
    t0, c0 = time.perf_counter(), cpu_seconds()
    loader = _streaming_loader(inputs, tok, workers, tmp)
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0  # build + read (tokenize) one window
    for i in range(1, a["batches"]):
        if i in depths:
            blob = pickle.dumps(loader.state_dict())
            saved[i] = (blob, next(it)["input_ids"])
        else:
            next(it)
    seconds = time.perf_counter() - t0
    del it, loader
    gc.collect()  # shuts the worker processes down; their CPU time then counts
    time.sleep(0.5)
    res = {
        "first_batch_s": first,
        "seconds": seconds,
        "tok_s": a["batches"] * BATCH * CONTEXT / seconds,
        "cpu": cpu_seconds() - c0,
        "resume": [],
    }
    for depth, (blob, want) in sorted(saved.items()):
        t0 = time.perf_counter()
        fresh = _streaming_loader(inputs, tok, workers, tmp)
        fresh.load_state_dict(pickle.loads(blob))
        got = next(iter(fresh))["input_ids"]
        dt = time.perf_counter() - t0
        res["resume"].append(
            {"depth": depth, "state_bytes": len(blob), "seconds": dt, "exact": bool((got == want).all())}
        )
    return res


CHILDREN = {
    "encode": child_encode,
    "prepare": child_prepare,
    "hf": child_hf,
    "mem": child_mem,
    "stream": child_stream,
}


def run_child(name: str, args: dict, env: dict | None = None, timeout: float = 900) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, json.dumps(args)]
    e = dict(os.environ, **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"child {name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ================================================================ helpers of the main process


def replicate_store(src: Path, dst: Path, copies: int) -> Path:
    """A store holding `copies` copies of src's shards (same tokens, distinct shard names)."""
    mf = json.loads((src / "manifest.json").read_text())
    dst.mkdir(parents=True)
    shards = []
    for c in range(copies):
        for s in mf["shards"]:
            name = f"c{c:03d}-{s['name']}"
            for ext in ("tokens", "docs"):
                shutil.copyfile(src / f"{s['name']}.{ext}", dst / f"{name}.{ext}")
            shards.append({**s, "name": name})
    mf.update(shards=shards, num_tokens=mf["num_tokens"] * copies, num_documents=mf["num_documents"] * copies)
    (dst / "manifest.json").write_text(json.dumps(mf))
    if (src / "tokenizer").is_dir():
        shutil.copytree(src / "tokenizer", dst / "tokenizer")
    return dst


class MemmapReader:
    """nanoGPT's get_batch: B random windows of a uint16 memmap, each converted to int64, stacked."""

    def __init__(self, path: Path, seed: int = 0):
        self.mm = np.memmap(path, dtype=np.uint16, mode="r")
        self.rng = np.random.default_rng(seed)

    def __call__(self):
        import torch

        ix = self.rng.integers(0, len(self.mm) - CONTEXT, BATCH)
        return torch.stack([torch.from_numpy(self.mm[i : i + CONTEXT].astype(np.int64)) for i in ix])


# ================================================================ sections


def section_tokenize(files, tok_dir, tmp: Path, corpus_bytes: int, rounds: int, hf_read: int, log):
    """Throughput of everything that turns text into tokens, interleaved over `rounds` rounds."""
    rows: dict[str, list[float]] = {}  # wall seconds per round
    cpu: dict[str, list[float]] = {}  # CPU seconds per round (all processes of the row)
    extra: dict[str, dict] = {}
    fl = [str(f) for f in files]
    store_tokens = None
    kept_store = None
    methods = ["encode_batch", "encode_batch_fast", "flame"]
    for r in range(rounds):
        for threads in (1, 2):
            # RAYON_NUM_THREADS sizes the tokenizers thread pool (read once, at its first parallel call)
            env = {"RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
            # flame's wrapper only at 1 thread: prepare's workers run one tokenizer thread each
            ms = methods if threads == 1 else methods[:2]
            order = ms[r % len(ms) :] + ms[: r % len(ms)]  # rotate: no method always runs first
            res = run_child("encode", {"files": fl, "tok": str(tok_dir), "methods": order}, env)
            for method, m in res.items():
                rows.setdefault(f"{method}|{threads}", []).append(m["seconds"])
                cpu.setdefault(f"{method}|{threads}", []).append(m["cpu"])
                extra[f"{method}|{threads}"] = m
        # "default" keeps its one-shard store for the reading rows (the memmap baseline needs one)
        for label, unit in (("default", 64 << 20), ("auto", None)):
            out = tmp / f"prep-{label}-{r}"
            res = run_child(
                "prepare", {"files": fl, "tok": str(tok_dir), "out": str(out), "unit_bytes": unit}
            )
            rows.setdefault(f"prepare|{label}", []).append(res["seconds"])
            cpu.setdefault(f"prepare|{label}", []).append(res["cpu"])
            extra[f"prepare|{label}"] = {
                "tokens": res["tokens"],
                "bytes": dir_bytes(out),
                "token_bytes": sum((out / f"{s['name']}.tokens").stat().st_size for s in res["shards"]),
                "shards": len(res["shards"]),
            }
            store_tokens = res["tokens"]
            if r == 0 and label == "default":
                kept_store = out
            else:
                shutil.rmtree(out)
        cache = tmp / f"hf-cache-{r}"
        res = run_child(
            "hf",
            {
                "files": fl,
                "tok": str(tok_dir),
                "cache": str(cache),
                "procs": 2,
                "block": CONTEXT,
                "read_batches": hf_read if r == rounds - 1 else 0,
            },
            # offline, and every cache inside our temporary directory
            {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home")},
        )
        shutil.rmtree(cache, ignore_errors=True)
        rows.setdefault("hf", []).append(res["seconds"])
        cpu.setdefault("hf", []).append(res["cpu"])
        extra["hf"] = {**extra.get("hf", {}), **res}
        log(f"tokenize round {r + 1}/{rounds} done")
    return rows, cpu, extra, store_tokens, kept_store


def section_balance(
    tmp: Path, tok16: Path, corpus_bytes: int, train_bytes: int, rounds: int, log
) -> tuple[list, str]:
    """Prepare balance on ONE big JSONL: `flame prepare` with 2 workers (automatic units, and the old
    fixed 64 MiB units) against the tokenizer's own ceiling (encode_batch_fast, 2 threads), for a
    uint16 store (the bench's 16k BPE) and a uint32 one (a BPE trained here towards 100k tokens)."""
    from flame.data.store import token_dtype
    from flame.data.tokenizer import load_tokenizer

    docs = documents(max(corpus_bytes, train_bytes))
    share = len(docs) * corpus_bytes // max(corpus_bytes, train_bytes)
    big = write_jsonl(docs[:share], tmp / "one-big", 1)[0]
    # a BPE needs ~20 MB of the standard library to learn more than 65,536 tokens (the uint32 store)
    tok32 = train_bpe(docs, tmp / "tok-100k", vocab_size=100_000, sample_bytes=train_bytes)
    del docs
    if token_dtype(load_tokenizer(str(tok32)).vocab_size) != np.uint32:
        raise SystemExit(f"the BPE trained on {train_bytes >> 20} MiB fits uint16; train it on more text")
    size_mb = big.stat().st_size / 1e6
    log(f"balance: one {size_mb:.1f} MB jsonl; ~100k tokenizer trained")
    env2 = {"RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}
    rows = []
    for tok in (tok16, tok32):
        vocab = load_tokenizer(str(tok)).vocab_size
        rates: dict[str, list[float]] = {}
        info: dict[str, dict] = {}
        kinds = ["ceiling", "auto", "fixed64", "one"]
        for r in range(rounds):
            for what in kinds[r % 4 :] + kinds[: r % 4]:  # rotate: no row always runs first
                if what == "ceiling":  # both ceilings in one child, in turns
                    methods = ["encode_batch_fast", "flame"][:: 1 if r % 2 == 0 else -1]
                    both = run_child(
                        "encode", {"files": [str(big)], "tok": str(tok), "methods": methods}, env2
                    )
                    flame_like = both["flame"]
                    rates.setdefault("ceiling_flame", []).append(flame_like["tokens"] / flame_like["seconds"])
                    res = both["encode_batch_fast"]
                else:
                    out = tmp / f"balance-{what}"
                    unit = 64 << 20 if what == "fixed64" else None
                    args = {"files": [str(big)], "tok": str(tok), "out": str(out), "unit_bytes": unit}
                    # "one": one process whose tokenizer runs on 2 threads, as the ceiling does
                    res = run_child("prepare", {**args, "workers": 1 if what == "one" else 2})
                    info[what] = res
                    shutil.rmtree(out)
                rates.setdefault(what, []).append(res["tokens"] / res["seconds"])
        ceil, ceil_flame = median(rates["ceiling"]), median(rates["ceiling_flame"])
        for what, label in (
            ("auto", "automatic units"),
            ("fixed64", "fixed 64 MiB units (before)"),
            ("one", "one process, the tokenizer on 2 threads (--workers 1)"),
        ):
            res = info[what]
            toks = [sh["tokens"] for sh in res["shards"]]
            rate = median(rates[what])
            rows.append(
                [
                    f"{res['dtype']} ({vocab:,} tokens)",
                    f"**flame prepare --workers 2**, {label}" if what != "one" else f"flame prepare, {label}",
                    f"{len(toks)} ({si(min(toks))}-{si(max(toks))} tokens)",
                    si(rate),
                    si(ceil),
                    f"{rate / ceil:.2f}x",
                    si(ceil_flame),
                    f"**{rate / ceil_flame:.2f}x**" if what == "auto" else f"{rate / ceil_flame:.2f}x",
                ]
            )
        log(f"balance {info['auto']['dtype']} done: {info['auto']['plan']}")
    return rows, f"{size_mb:.1f} MB"


def section_read(store: Path, big: Path, repeats: int, batches: int, worker_batches: int, log):
    """Model-ready int64 batches per second, interleaved repeats, same store."""
    shards = sorted(store.glob("*.tokens"))
    if len(shards) != 1:  # the baseline reads one flat file: keep the corpus under one 64 MiB unit
        raise SystemExit(
            f"the memmap baseline needs a one-shard store; {store} has {len(shards)} (use --corpus-mb < 64)"
        )
    mm = MemmapReader(shards[0])
    flat = _prepared_loader([str(store)], None)
    var = _prepared_loader([str(store)], None, varlen=True)
    mix = _prepared_loader([str(store), str(big)], [0.5, 0.5])
    plan = _ramped_plan(store, big, 5 + repeats * batches)  # the phases span every batch timed
    phases = _prepared_loader([str(store), str(big)], None, plan=plan)
    its = {"flame": iter(flat), "varlen": iter(var), "mix": iter(mix), "phases": iter(phases)}
    for it in its.values():  # warm: page cache, permutation chunks, doc indices
        for _ in range(5):
            next(it)
    for _ in range(5):
        mm()
    src = np.ones(32 << 20, dtype=np.int64)  # 256 MiB
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times: dict[str, list[float]] = {k: [] for k in ("copy", "memmap", *its)}

    def run(fn, n):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0

    order = ["memmap", *its]
    for r in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times["copy"].append(time.perf_counter() - t0)
        for k in order[r % len(order) :] + order[: r % len(order)]:  # each row first in turn
            times[k].append(run(mm if k == "memmap" else lambda it=its[k]: next(it), batches))
    tok_per_batch = BATCH * CONTEXT
    rates = {k: tok_per_batch * batches / median(v) for k, v in times.items() if k != "copy"}
    rates["copy"] = src.size / median(times["copy"])
    # worker processes: steady state after the workers are up
    wl = _prepared_loader([str(store)], None, workers=2)
    wit = iter(wl)
    for _ in range(8):
        next(wit)
    wt = []
    for _ in range(max(1, repeats // 2)):
        wt.append(run(lambda: next(wit), worker_batches))
    rates["workers2"] = tok_per_batch * worker_batches / median(wt)
    wit.close()  # stops the worker processes
    log("reading done")
    return rates


def section_resume(store: Path, big: Path, reps: int):
    """State size and time to first batch of a fresh loader restored at several depths."""
    from flame.data.store import TokenStore

    n = TokenStore(store).num_tokens // CONTEXT  # samples per epoch
    per_epoch = n // BATCH
    rows = []
    cases = [
        ("store S", [str(store)], None, per_epoch // 10, "10% of epoch 0"),
        ("store S", [str(store)], None, per_epoch // 2, "50% of epoch 0"),
        ("store S", [str(store)], None, per_epoch * 95 // 100, "95% of epoch 0"),
        ("store S", [str(store)], None, per_epoch * 10 + per_epoch // 2, "50% of epoch 10"),
        ("mixture S + 10xS", [str(store), str(big)], [0.5, 0.5], per_epoch * 3, "3x the batches of S"),
    ]
    for what, paths, weights, depth, where in cases:
        ref = _prepared_loader(paths, weights)
        it = iter(ref)
        for _ in range(depth):
            next(it)
        blob = pickle.dumps(ref.state_dict())
        want = next(it)["input_ids"]
        ts, opens, exact = [], [], True
        for _ in range(reps):
            t0 = time.perf_counter()
            fresh = _prepared_loader(paths, weights)  # opens the stores too
            t1 = time.perf_counter()
            fresh.load_state_dict(pickle.loads(blob))
            got = next(iter(fresh))["input_ids"]
            ts.append(time.perf_counter() - t0)
            opens.append(t1 - t0)
            exact &= bool((got == want).all())
        rows.append(
            [
                f"flame prepared, {what}",
                f"batch {depth:,} ({where})",
                len(blob),
                f"{median(ts) * 1e3:.1f} ms (open {median(opens) * 1e3:.1f} ms)",
                "yes" if exact else "**no**",
            ]
        )
    return rows


# ================================================================ main


def _balance_section(size: str, rounds: int, rows: list) -> str:
    return "\n".join(
        [
            f"## Prepare balance: one {size} JSONL, 2 workers vs the tokenizer's 2-thread ceiling "
            f"({rounds} interleaved round(s), median)",
            "",
            md_table(
                [
                    "store",
                    "what",
                    "shards",
                    "tokens/s",
                    "raw ceiling",
                    "x raw",
                    "same-work ceiling",
                    "x same-work",
                ],
                rows,
            ),
            "",
            "Raw ceiling: `Tokenizer.encode_batch_fast` on 2 threads over the same documents in batches of "
            "1,000 (no file reading, no writing), with the tokenizer's default settings. Same-work ceiling: "
            "the same loop through flame's tokenizer, which reads special-token text as text (an `<eos>` "
            "inside a document never becomes the separator) and returns each document's ids as an array, "
            "as prepare must. Automatic units: sized from the input and the worker count (~8 per worker, "
            "2-64 MiB).",
        ]
    )


def _balance_report(header: str, size: str, rounds: int, rows: list) -> str:
    return "\n".join(
        [
            "# flame prepare balance (`.venv/bin/python bench/data.py --only balance`)",
            "",
            f"Machine: {header}.",
            "",
            _balance_section(size, rounds, rows),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~30 s version: small corpus, one round")
    ap.add_argument("--corpus-mb", type=float, default=None, help="corpus size (default 20, quick 3)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds of the tokenize rows (default 2)"
    )
    ap.add_argument("--no-stream", action="store_true", help="skip the streaming rows")
    ap.add_argument(
        "--balance-mb", type=float, default=None, help="the one-big-file prepare rows (default 100, quick 12)"
    )
    ap.add_argument(
        "--only",
        choices=["balance"],
        default=None,
        help="run one section alone (balance: the one-big-file prepare rows, a few minutes)",
    )
    ap.add_argument("--child", nargs=2, metavar=("NAME", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return
    q = args.quick
    corpus_bytes = int((args.corpus_mb or (3 if q else 20)) * 2**20)
    rounds = args.rounds or (1 if q else 2)
    read_reps, read_batches, worker_batches = (5, 300, 60) if q else (7, 1500, 300)
    mem_batches = 300 if q else 2000
    t_start = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t_start:6.1f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    stream_ok = HAS_STREAM and not args.no_stream
    header = machine()

    with tempfile.TemporaryDirectory(prefix="flame-bench-data-") as td:
        tmp = Path(td)
        docs = documents(corpus_bytes)
        files = write_jsonl(docs, tmp / "corpus", 8)
        text_bytes = sum(len(d.encode("utf-8")) for d in docs)
        tok_dir = train_bpe(docs, tmp / "tok", vocab_size=16384, sample_bytes=min(corpus_bytes, 4 << 20))
        n_docs = len(docs)
        del docs
        log(f"corpus: {n_docs:,} documents, {text_bytes / 1e6:.1f} MB; tokenizer trained")

        if args.only == "balance":
            balance_mb = args.balance_mb or (12 if q else 100)
            balance_rows, balance_size = section_balance(
                tmp, tok_dir, int(balance_mb * 2**20), (24 if q else 32) << 20, rounds, log
            )
            emit("data-balance", _balance_report(header, balance_size, rounds, balance_rows))
            log("finished")
            return

        tok_rows, tok_cpu, tok_extra, store_tokens, store = section_tokenize(
            files, tok_dir, tmp, corpus_bytes, rounds, read_batches // 5, log
        )
        balance_mb = args.balance_mb or (12 if q else 100)
        balance_rows, balance_size = section_balance(
            tmp, tok_dir, int(balance_mb * 2**20), (24 if q else 32) << 20, rounds, log
        )
        big = replicate_store(store, tmp / "store-10x", 10)
        stream = None
        if stream_ok:
            try:
                stream = {}
                epoch_batches = store_tokens // (BATCH * CONTEXT)
                for w in (0,) if q else (0, 2):
                    stream[w] = run_child(
                        "stream",
                        {
                            "inputs": [str(tmp / "corpus")],
                            "tok": str(tok_dir),
                            "workers": w,
                            "tmp": str(tmp / f"stream-run-{w}"),
                            "batches": epoch_batches,  # about one pass over the corpus
                            "depths": [epoch_batches // 2]
                            if q
                            else [10, epoch_batches // 2, epoch_batches * 9 // 10],
                        },
                        timeout=900,
                    )
                log("streaming done")
            except Exception as e:  # the module is young: report, do not lose the other tables
                stream = {"error": str(e).strip().splitlines()[-1][:200]}
                log(f"streaming failed: {e}")

        rates = section_read(store, big, read_reps, read_batches, worker_batches, log)
        resume_rows = section_resume(store, big, 5)
        log("resume done")

        # memory: each measurement in its own process
        mem_rows = []
        for varlen in (False,) if q else (False, True):
            for label, path, mult in (("S", store, 1), ("10xS", big, 10)):
                res = run_child(
                    "mem",
                    {"kind": "prepared", "stores": [str(path)], "varlen": varlen, "batches": mem_batches},
                )
                mem_rows.append(
                    [
                        f"flame prepared{', varlen' if varlen else ''}",
                        f"{label} ({si(store_tokens * mult)} tokens)",
                        mem_batches,
                        nbytes(res["base_kib"] * 1024),
                        nbytes(res["peak_kib"] * 1024),
                        nbytes((res["peak_kib"] - res["base_kib"]) * 1024),
                    ]
                )
        if stream_ok and stream and "error" not in stream and not q:
            # 10x the raw corpus without 10x the disk: the same files under 10 names (symlinks)
            big_raw = tmp / "corpus-10x"
            big_raw.mkdir()
            for c in range(10):
                for f in files:
                    (big_raw / f"c{c}-{f.name}").symlink_to(f)
            for label, inp, mult in (("S", tmp / "corpus", 1), ("10xS", big_raw, 10)):
                res = run_child(
                    "mem",
                    {
                        "kind": "streaming",
                        "inputs": [str(inp)],
                        "tok": str(tok_dir),
                        "workers": 0,
                        "tmp": str(tmp / f"mem-{label}"),
                        "batches": mem_batches // 4,
                    },
                )
                mem_rows.append(
                    [
                        "flame streaming, 0 workers",
                        f"{label} raw text ({si(text_bytes * mult, 'B')})",
                        mem_batches // 4,
                        nbytes(res["base_kib"] * 1024),
                        nbytes(res["peak_kib"] * 1024),
                        nbytes((res["peak_kib"] - res["base_kib"]) * 1024),
                    ]
                )
        log("memory done")

    # ---------------------------------------------------------------- report
    T = store_tokens
    med = {k: median(v) for k, v in tok_rows.items()}
    mcpu = {k: median(v) for k, v in tok_cpu.items()}
    ceil2 = T / med["encode_batch_fast|2"]
    ceil_cpu = T / mcpu["encode_batch_fast|1"]  # tokens per CPU-second of the bare tokenizer
    pd = tok_extra["prepare|default"]
    ps = tok_extra["prepare|auto"]
    hf = tok_extra["hf"]

    def trow(label: str, wall: float, cpu_s: float | None, disk: str) -> list:
        cells = [label, f"{wall:.2f}", si(T / wall), f"{T / wall / ceil2:.2f}x"]
        if cpu_s is None:
            return [*cells, "-", "-", "-", disk]
        return [*cells, f"{cpu_s / wall:.2f}", si(T / cpu_s), f"{T / cpu_s / ceil_cpu:.2f}x", disk]

    t_rows = []
    for method, label in (
        ("encode_batch", "`Tokenizer.encode_batch` (ids as lists)"),
        ("encode_batch_fast", "`Tokenizer.encode_batch_fast` (no offsets)"),
        ("flame", "flame `HFTokenizer.encode_batch` (-> int32 arrays)"),
    ):
        for th in (1, 2):
            key = f"{method}|{th}"
            if key in med:
                t_rows.append(trow(f"{label}, {th} thread{'s' * (th > 1)}", med[key], mcpu[key], "-"))
    for key, what, info in (
        ("prepare|default", f"`--unit-mb 64`: {pd['shards']} task", pd),
        ("prepare|auto", f"automatic units: {ps['shards']} tasks", ps),
    ):
        disk = f"{info['token_bytes'] / T:.2f} ({info['bytes'] / T:.2f} whole store directory)"
        t_rows.append(trow(f"**flame prepare**, workers=2, {what}", med[key], mcpu[key], disk))
    if stream:
        if "error" in stream:
            t_rows.append(["flame streaming (`StreamingLoader`)", "error", stream["error"], *["-"] * 5])
        else:
            for w, res in stream.items():
                label = f"**flame streaming** tokenize+pack+shuffle, {w} workers (1 pass, end to end)"
                scale = T / (res["tok_s"] * res["seconds"])  # store tokens / tokens read
                t_rows.append(trow(label, res["seconds"] * scale, res["cpu"] * scale, "0 (no cache)"))
    t_rows.append(
        trow(
            "HF `datasets` load json + map-tokenize + group-texts, num_proc=2",
            med["hf"],
            mcpu["hf"],
            f"{hf['cache_bytes'] / T:.1f} (cache {nbytes(hf['cache_bytes'])})",
        )
    )

    r_rows = []
    mmr = rates["memmap"]
    for key, label in (
        ("copy", "memory copy ceiling (np.copyto, 256 MiB int64; tokens = 8 B)"),
        ("memmap", "random-window `np.memmap` reader (nanoGPT get_batch, memmap kept open)"),
        ("flame", "**flame PreparedLoader**, global shuffle"),
        ("varlen", "**flame PreparedLoader**, global shuffle, varlen (cu_seqlens, position_ids)"),
        ("mix", "**flame PreparedLoader**, 2-store mixture (S 0.5 + 10xS 0.5)"),
        ("phases", "**flame PreparedLoader**, 3-phase mixture of S and 10xS with a linear ramp"),
        ("workers2", "flame PreparedLoader, num_workers=2 (StatefulDataLoader processes)"),
    ):
        r = rates[key]
        r_rows.append([label, si(r), f"{r / mmr:.2f}x", f"{r / rates['copy']:.3f}x"])
    if "read_tok_s" in hf:
        r = hf["read_tok_s"]
        r_rows.append(
            [
                "HF `datasets` grouped dataset, DataLoader bs=8 shuffle (own process)",
                si(r),
                f"{r / mmr:.2f}x",
                f"{r / rates['copy']:.3f}x",
            ]
        )

    res_rows = list(resume_rows)
    if stream and "error" not in stream:
        for w, res in stream.items():
            for rr in res["resume"]:
                res_rows.append(
                    [
                        f"flame streaming, {w} workers ({max(1, w)} stream{'s' * (w > 1)})",
                        f"batch {rr['depth']:,}",
                        f"{rr['state_bytes']} ({rr['state_bytes'] // max(1, w)} per worker)",
                        f"{rr['seconds'] * 1e3:.0f} ms (one window from scratch: {res['first_batch_s'] * 1e3:.0f} ms)",
                        "yes" if rr["exact"] else "**no**",
                    ]
                )

    cmd = "bench/data.py" + (" --quick" if q else "")
    text = "\n".join(
        [
            f"# flame data engine benchmark (`.venv/bin/python {cmd}`)",
            "",
            f"Machine: {header}. Context {CONTEXT}, batch {BATCH}.",
            f"Corpus: the Python {sys.version.split()[0]} standard library's .py sources cut into ~2 KB documents: "
            f"{n_docs:,} documents, {text_bytes / 1e6:.1f} MB of text in 8 jsonl files; byte-level BPE, 16,384 "
            f"tokens, trained in-process; S = {T:,} tokens (EOS after each document), uint16 store.",
            "",
            f"## Tokenize: text -> tokens ({rounds} interleaved round(s), median; rates are store tokens / time)",
            "",
            md_table(
                [
                    "what",
                    "wall s",
                    "tokens/s",
                    "x encode_batch_fast 2 thr",
                    "cores busy (CPU s / wall s)",
                    "tokens per CPU-s",
                    "x encode_batch_fast 1 thr, per CPU-s",
                    "bytes/token on disk",
                ],
                t_rows,
            ),
            "",
            "Wall-clock rates depend on how many cores the shared machine gave each row (cores busy); tokens "
            "per CPU-second do not: they compare the work each pipeline spends per token. The streaming rows "
            "read one pass worth of batches and are scaled to the store's token count.",
            "",
            _balance_section(balance_size, rounds, balance_rows),
            "",
            f"## Prepared reading: model-ready int64 [8, 2048] batches (median of {read_reps} interleaved repeats "
            f"of {read_batches} batches)",
            "",
            md_table(["reader", "tokens/s", "x memmap reader", "x memory copy"], r_rows),
            "",
            f"Phases with a ramp read at {rates['phases'] / rates['mix']:.2f}x the static mixture; the "
            f"mixture at {rates['mix'] / rates['flame']:.2f}x and the phases at "
            f"{rates['phases'] / rates['flame']:.2f}x the one-store reader.",
            "",
            "## Resume: a fresh loader (stores opened, state loaded) to its first batch (median of 5)",
            "",
            md_table(
                ["loader", "position", "state bytes (pickle)", "time to first batch", "exact"], res_rows
            ),
            "",
            "## Memory: RssAnon of a loader process (each row its own process)",
            "",
            md_table(
                ["loader", "data", "batches", "RssAnon after imports", "RssAnon max while reading", "growth"],
                mem_rows,
            ),
            "",
            "10xS = ten copies of S's shard (prepared) or the corpus files linked ten times (streaming).",
        ]
    )
    emit("data" + ("-quick" if q else ""), text)
    log("finished")


if __name__ == "__main__":
    main()
