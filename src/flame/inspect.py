"""`flame inspect RUN_DIR --step N`: the exact micro-batches a run trained on at step N, and where
their text came from; `flame generate`: sample text from a run's checkpoint or an exported model.

Inspect trains nothing and builds no model. In prepared mode the data position is arithmetic:
step N (1-based, as in metrics.jsonl) of rank r, micro-step a, read global samples
`micro_batch_samples((N - 1) * accum + a, r, world, batch, accum)`; the run's SampleSource maps
them to token windows of its stores, and each store's document index maps a token back to its
source file and record.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from pathlib import Path

import torch

from flame.checkpoint import TRUST_NOTE, checkpoint_covering, find_checkpoint, read_trainer_state
from flame.config import Config, config_from_dict
from flame.errors import DataError, FlameError
from flame.records import read_records


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the run's settings


def load_run_config(run_dir: Path) -> Config:
    """The configuration a run saved as <run_dir>/config.toml."""
    path = run_dir / "config.toml"
    if not run_dir.is_dir():
        raise FlameError(f"no such run directory: {run_dir}")
    if not path.is_file():
        raise FlameError(
            f"{run_dir} has no config.toml, so it is not a flame run directory",
            hint="give the --train.run_dir of a `flame train` run",
        )
    try:
        return config_from_dict(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FlameError(f"{path} is not valid TOML: {e}") from None


class RunSettings:
    """What the data arithmetic of step N needs: config, world size, and the checkpoint's data state."""

    def __init__(self, run_dir: Path, step: int, world_size: int | None):
        self.run_dir = run_dir
        self.cfg = load_run_config(run_dir)
        self.checkpoint = checkpoint_covering(run_dir, step)
        self.data_state: dict = {}
        self.world_size, self.world_from = 0, ""
        if self.checkpoint is not None:
            saved = read_trainer_state(self.checkpoint)
            if saved.get("config"):  # the settings of the process that saved it
                self.cfg = config_from_dict(saved["config"])
            self.data_state = saved.get("data", {}) or {}
            if saved.get("world_size"):
                self.world_size, self.world_from = (
                    int(saved["world_size"]),
                    f"checkpoint {self.checkpoint.name}",
                )
        if world_size is not None:
            if world_size < 1:
                raise FlameError(f"--world-size {world_size} must be >= 1")
            self.world_size, self.world_from = world_size, "--world-size"
        elif not self.world_size:
            ranks = list((run_dir / "batches").glob("rank-*.jsonl"))
            if not ranks:
                raise FlameError(
                    f"{run_dir} has no checkpoint that records the world size",
                    hint="pass --world-size (the number of processes the run trained with)",
                )
            self.world_size, self.world_from = len(ranks), "the batch logs in batches/"
        # the data plan (phases over named sources): the run directory's latest, else the checkpoint's
        self.plan: dict | None = self.data_state.get("plan")
        plan_file = run_dir / "data_plan.json"
        if plan_file.is_file():
            try:
                self.plan = json.loads(plan_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise FlameError(f"{plan_file} is not valid JSON: {e}") from None
        d, t = self.cfg.data, self.cfg.train
        g = self.data_state.get("global_batch")
        if g and g != d.batch_size * self.world_size * t.grad_accum:
            raise FlameError(
                f"the checkpoint's global batch is {g} samples, but data.batch_size {d.batch_size} x world "
                f"size {self.world_size} x train.grad_accum {t.grad_accum} = "
                f"{d.batch_size * self.world_size * t.grad_accum}",
                hint=f"pass the world size the run used at step {step} with --world-size",
            )


# ---------------------------------------------------------------- the run's data


def _find_cached_store(root: Path, fingerprint: str, inputs: list[str] | None) -> Path | None:
    """A store under the run's cache directory whose content fingerprint matches the checkpoint's,
    preferring one prepared from `inputs` (a held-out store may hold the same text)."""
    from flame.data.store import TokenStore

    matches = []
    for p in sorted(root.glob("store-*")):
        if (p / "manifest.json").is_file():
            try:
                store = TokenStore(p)
            except DataError:
                continue
            if store.fingerprint() == fingerprint:
                sources = [x["path"] if isinstance(x, dict) else str(x) for x in store.sources]
                matches.append((sources != inputs, p))
    return min(matches)[1] if matches else None


def _store_paths(s: RunSettings, tok) -> tuple[list[str], list[float] | None]:
    cfg = s.cfg
    d = cfg.data
    if d.streaming:
        raise FlameError(
            "flame inspect needs prepared data; this run streamed its inputs (data.streaming = true), so its "
            "batches depend on reader state rather than arithmetic",
            hint="train with --log.batches true to record each batch's samples and hash, or prepare the "
            "inputs with `flame prepare` and train with --data.store",
        )
    if d.mix:
        from flame.data.mixture import parse_mix

        pairs = parse_mix(d.mix)
        return [p for p, _ in pairs], [w for _, w in pairs]
    if d.store:
        return [d.store], None
    # raw inputs: the store the run prepared into its cache directory, found by its key (the
    # inputs' content), else -- inputs edited since -- by the checkpoint's data fingerprint
    from flame.data.build import cache_root, inputs_of, prepared_store, store_cache_path
    from flame.data.sources import expand_inputs
    from flame.parallel import World

    old = s.run_dir / "data"  # where runs before the shared cache prepared their inputs
    root = old if old.is_dir() and not d.cache_dir else cache_root(cfg)
    try:
        paths = expand_inputs(inputs_of(cfg))
    except DataError:
        paths = None
    if paths is not None:
        keyed = store_cache_path(paths, tok, cfg)
        if (keyed / "manifest.json").is_file():
            return [str(keyed)], None
    saved = s.data_state.get("fingerprint", "")
    found = _find_cached_store(root, saved.split("|")[0], paths) if saved else None
    if found is not None:
        return [str(found)], None
    one = World(0, 1, 0, torch.device("cpu"))
    return [str(prepared_store(inputs_of(cfg), cfg, tok, s.run_dir, one, _err))], None


def open_run_data(s: RunSettings) -> tuple[list, list[float] | None, object]:
    """(stores, mixture weights, tokenizer) the run read."""
    from flame.data.build import open_store
    from flame.runs import run_tokenizer

    tok = run_tokenizer(s.run_dir, s.cfg)
    if s.plan is not None:  # every source of every phase, by the path the plan records
        paths, weights = [src["path"] for src in s.plan["sources"]], None
    else:
        paths, weights = _store_paths(s, tok)
    for p in paths:
        if not Path(p).exists():
            raise DataError(
                f"store {p} (from the run's config) does not exist here",
                hint="run flame inspect from the directory the run was started in (relative paths), "
                "or restore the store",
            )
    return [open_store(p, tok) for p in paths], weights, tok


def run_loader(s: RunSettings, stores: list, weights: list[float] | None, rank: int):
    """The run's PreparedLoader for one rank, checked against the checkpoint's data fingerprint."""
    from flame.data.loader import PreparedLoader
    from flame.data.mixture import DataPlan

    # a saved plan records the run's epoch_shift; runs from before data plans had none
    plan = DataPlan.from_dict(s.plan) if s.plan is not None else None
    shift = bool(s.plan.get("epoch_shift", s.cfg.data.epoch_shift)) if s.plan is not None else False
    loader = PreparedLoader.from_config(
        s.cfg,
        stores,
        rank=rank,
        world=s.world_size,
        weights=None if plan is not None else weights,
        plan=plan,
        epoch_shift=shift,
        num_workers=0,  # inspect reads batches in-process
    )
    if plan is not None:
        for was, now in zip(s.plan["sources"], loader.plan.sources):
            if was.get("fingerprint") and was["fingerprint"] != now.get("fingerprint"):
                raise DataError(
                    f"source {was['name']} ({was['path']}) has changed since the run read it, so the batches "
                    "shown would not be the ones trained on",
                    hint="restore the store the run trained on",
                )
        return loader
    saved = s.data_state.get("fingerprint")
    if saved and saved != loader.fingerprint:
        raise DataError(
            "the run's data has changed since the checkpoint was saved (a store, the context length, the "
            "seed or the mixture differs), so the batches shown would not be the ones trained on",
            hint=f"checkpoint {s.checkpoint} records data fingerprint {saved}; now it is {loader.fingerprint}",
        )
    return loader


# ---------------------------------------------------------------- reconstruction


def _recorded(run_dir: Path, rank: int, step: int) -> dict[int, dict]:
    """What the run itself recorded (with --log.batches true) for `step` on `rank`, by micro-step."""
    path = run_dir / "batches" / f"rank-{rank}.jsonl"
    return {int(rec.get("micro", 0)): rec for rec in read_records(path) if rec.get("step") == step}


def _trained_steps(run_dir: Path) -> int:
    """The last step metrics.jsonl records (0 when none)."""
    steps = [r.get("step") for r in read_records(run_dir / "metrics.jsonl")]
    return max((s for s in steps if isinstance(s, int)), default=0)


def _documents(store, start: int, length: int) -> list[dict]:
    """The documents a window [start, start + length) of a store's stream holds, in order."""
    from flame.data.sources import where

    cuts = [start, *(int(x) for x in store.doc_starts(start + 1, start + length)), start + length]
    docs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        path, record, offset = store.locate(a)
        docs.append(
            {"file": path, "record": record, "where": where(path, record), "offset": offset, "tokens": b - a}
        )
    return docs


def inspect_step(
    run_dir: str | Path,
    step: int,
    rank: int | None = None,
    micro: int | None = None,
    tokens: int = 200,
    world_size: int | None = None,
    with_ids: bool = True,
) -> dict:
    """The micro-batches of `step` (all ranks and micro-steps unless narrowed), as a JSON-ready dict."""
    from flame.logging import batch_digest

    run_dir = Path(run_dir)
    if step < 1:
        raise FlameError(f"--step {step}: steps count from 1, as in metrics.jsonl")
    s = RunSettings(run_dir, step, world_size)
    cfg, W, A = s.cfg, s.world_size, s.cfg.train.grad_accum
    if rank is not None and not 0 <= rank < W:
        raise FlameError(f"--rank {rank}: the run had {W} process(es) (ranks 0-{W - 1}; from {s.world_from})")
    if micro is not None and not 0 <= micro < A:
        raise FlameError(f"--micro {micro}: the run accumulated {A} micro-batch(es) per step (0-{A - 1})")
    ranks = [rank] if rank is not None else list(range(W))
    micros = [micro] if micro is not None else list(range(A))
    L, B = cfg.data.context_len, cfg.data.batch_size
    out = {
        "run_dir": str(run_dir),
        "step": step,
        "world_size": W,
        "world_size_from": s.world_from,
        "batch_size": B,
        "grad_accum": A,
        "context_len": L,
        "global_batch": B * W * A,
        "trained_steps": _trained_steps(run_dir),
        "micro_batches": [],
    }
    from flame.data.packed import SkipRanges

    out["skipped"] = SkipRanges(cfg.data.skip)(step)  # data.skip: read, never trained on
    stores, weights, tok = open_run_data(s)
    for r in ranks:
        loader = run_loader(s, stores, weights, r)
        names = loader.plan.names
        out["phase"] = loader.phase_of(step)
        recorded = _recorded(run_dir, r, step)
        source = loader.source
        for a in micros:
            batch = loader.batches.batch((step - 1) * A + a)
            ks = batch["samples"].numpy()
            ids = batch["input_ids"].reshape(len(ks), L)
            src, starts = source.locate(ks)
            if source.schedule is not None:
                _, nth = source.schedule.assign(int(ks[0]), len(ks))
            else:
                nth = ks
            sha = batch_digest(batch["input_ids"])
            rec = recorded.get(a)
            mb = {
                "rank": r,
                "micro": a,
                "sha": sha,
                "recorded_sha": rec.get("sha") if rec else None,
                "matches_record": (rec.get("sha") == sha and rec.get("samples", ks.tolist()) == ks.tolist())
                if rec
                else None,
                "samples": [],
            }
            for b, k in enumerate(ks.tolist()):
                part = source.parts[int(src[b])]
                row = ids[b].numpy()
                sample = {
                    "sample": k,
                    "source": names[int(src[b])],
                    "nth": int(nth[b]),
                    "store": str(part.store.path),
                    "epoch": int(nth[b]) // part.num_samples,
                    "start": int(starts[b]),
                    "documents": _documents(part.store, int(starts[b]), L),
                    "text": tok.decode(row[:tokens]) if tokens else "",
                }
                if with_ids:
                    sample["input_ids"] = row.tolist()
                mb["samples"].append(sample)
            out["micro_batches"].append(mb)
    return out


def format_report(rep: dict) -> str:
    lines = [
        f"{rep['run_dir']} step {rep['step']}: world size {rep['world_size']} (from {rep['world_size_from']}), "
        f"{rep['batch_size']} sample(s) x {rep['grad_accum']} micro-step(s) per rank, "
        f"global batch {rep['global_batch']} samples of {rep['context_len']} tokens",
    ]
    if rep.get("phase"):
        lines.append(f"data {rep['phase']}")
    if rep.get("skipped"):
        lines.append(f"step {rep['step']} is in data.skip: its batches were read and not trained on")
    if rep["step"] > rep["trained_steps"]:
        lines.append(
            f"note: metrics.jsonl records {rep['trained_steps']} step(s) so far; this is the batch step "
            f"{rep['step']} will read"
        )
    for mb in rep["micro_batches"]:
        ks = [x["sample"] for x in mb["samples"]]
        check = ""
        if mb["matches_record"] is True:
            check = "  (matches the run's batch log)"
        elif mb["matches_record"] is False:
            check = f"  (DIFFERS from the run's batch log: sha {mb['recorded_sha']})"
        lines.append("")
        lines.append(
            f"rank {mb['rank']} micro {mb['micro']}: samples {ks[0]}-{ks[-1]}, sha {mb['sha']}{check}"
        )
        for x in mb["samples"]:
            docs = x["documents"]
            src = docs[0]["where"] + (f" +{docs[0]['offset']} tokens" if docs[0]["offset"] else "")
            more = (
                f" ({docs[0]['tokens']} tokens), and {len(docs) - 1} more document(s)"
                if len(docs) > 1
                else ""
            )
            lines.append(
                f"  sample {x['sample']} ({x['source']} #{x['nth']}, epoch {x['epoch']}, tokens {x['start']}-{x['start'] + rep['context_len']} "
                f"of {x['store']}): from {src}{more}"
            )
            for doc in docs[1:]:
                lines.append(f"      then {doc['where']} ({doc['tokens']} tokens)")
            if x["text"]:
                lines.append(f"    {json.dumps(x['text'], ensure_ascii=False)}")
    return "\n".join(lines)


def _inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flame inspect",
        description="Show the exact micro-batches a run trained on at a step, their text and sources "
        "(prepared data; computed from the config, no training).",
        epilog=TRUST_NOTE,
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--step", type=int, required=True, help="the step, counted from 1 as in metrics.jsonl")
    p.add_argument("--rank", type=int, help="only this rank (default: all)")
    p.add_argument("--micro", type=int, help="only this micro-step of the accumulation (default: all)")
    p.add_argument("--tokens", type=int, default=200, help="tokens of text shown per sample (default 200)")
    p.add_argument("--world-size", type=int, help="processes the run used (default: from its checkpoint)")
    p.add_argument("--json", action="store_true", help="print JSON, including every sample's token ids")
    return p


def cli(argv: list[str]) -> int:
    args = _inspect_parser().parse_args(argv)
    if args.tokens < 0:
        raise FlameError(f"--tokens {args.tokens} must be >= 0")
    rep = inspect_step(
        args.run_dir, args.step, args.rank, args.micro, args.tokens, args.world_size, with_ids=args.json
    )
    print(json.dumps(rep, ensure_ascii=False) if args.json else format_report(rep))
    return 0


# ---------------------------------------------------------------- generate


def load_for_generation(path: str | Path, step: int | None, device: torch.device):
    """(model, tokenizer, context length, description) from a run directory or an HF model directory."""
    from flame.data.tokenizer import load_tokenizer

    path = Path(path)
    if (path / "config.toml").is_file():
        from flame.checkpoint import load_model_weights
        from flame.export import build_for_export
        from flame.runs import run_tokenizer

        cfg = load_run_config(path)
        ckpt = find_checkpoint(path, step, log=_err)
        tok = run_tokenizer(path, cfg, read_trainer_state(ckpt))
        # the architecture the run trained (an init_from directory's config.json), random weights:
        # the checkpoint's replace them
        model = build_for_export(cfg, tok.vocab_size)
        load_model_weights(ckpt, model, f"the model of {path}/config.toml")
        return model.to(device), tok, cfg.data.context_len, f"{ckpt}"
    if (path / "config.json").is_file():
        if step is not None:
            raise FlameError("--step applies to run directories; an exported model directory holds one model")
        from transformers import AutoModelForCausalLM

        from flame.model import quiet_progress

        try:
            with quiet_progress():  # a local directory: no "Loading weights" bar in the output
                model = AutoModelForCausalLM.from_pretrained(
                    str(path), local_files_only=True, dtype=torch.float32
                )
        except Exception as e:
            raise FlameError(f"transformers cannot load a causal LM from {path}: {e}") from None
        tok = load_tokenizer(str(path))
        ctx = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        return model.to(device), tok, ctx, str(path)
    raise FlameError(
        f"{path} is neither a run directory (config.toml) nor a Hugging Face model directory (config.json)",
        hint="give a --train.run_dir of `flame train` or the --out of `flame export`",
    )


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flame generate",
        description="Sample text from a run's checkpoint or an exported model.",
        epilog=TRUST_NOTE,
    )
    p.add_argument("path", metavar="RUN_DIR_OR_MODEL_DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole context for every token instead of the model's generate() with its "
        "KV cache (slower; greedy output is the same)",
    )
    p.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def generate_cli(argv: list[str]) -> int:
    from flame.generate import sample_text

    args = _generate_parser().parse_args(argv)
    if not (math.isfinite(args.temperature) and math.isfinite(args.top_p)):
        raise FlameError("--temperature and --top-p must be finite numbers")
    if args.max_tokens < 0 or args.top_k < 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise FlameError("--max-tokens, --top-k and --temperature must be >= 0 and --top-p in (0, 1]")
    if not 0 <= args.seed < 2**63:
        raise FlameError(f"--seed {args.seed} must be in [0, 2^63)")
    if args.device not in ("auto", "cpu", "cuda"):
        raise FlameError(f"--device {args.device!r}: choose auto, cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise FlameError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, tok, ctx, what = load_for_generation(args.path, args.step, device)
    _err(f"generating with {what} on {device.type}")
    text = sample_text(
        model,
        tok,
        args.prompt,
        args.max_tokens,
        device,
        context_len=ctx,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
    )
    print(text)
    return 0


__all__ = ["inspect_step", "format_report", "load_for_generation", "cli", "generate_cli"]
