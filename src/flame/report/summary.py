"""The numbers of a report: the headline of a run, its mixture, its config's difference from the
defaults, its data stores. Every number is computed from all of the run's records (the columns
of `read.Table`), never from the thinned series the figures draw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flame.report.read import Run, Table, _is_num, checkpoint_parameters


def finite(table: Table, *path: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the records holding a finite number under `path`, those numbers)."""
    key = ("finite", path)
    hit = table.cache.get(key)
    if hit is None:
        ys = table.col(*path)
        idx = np.flatnonzero(np.isfinite(ys))
        hit = table.cache[key] = (idx, ys[idx])
    return hit


def _median(table: Table, key: str) -> float | None:
    _, ys = finite(table, key)
    return float(np.median(ys)) if len(ys) else None


def model_description(cfg: dict | None) -> str:
    if not cfg:
        return "?"
    m = cfg.get("model", {})
    name = m.get("init_from") and f"{m['init_from']} (init_from)" or m.get("name", "?")
    kind = ""
    from flame.config import MODEL_PRESETS

    if m.get("name") in MODEL_PRESETS and not m.get("init_from"):
        kind = "llama preset"
    else:
        path = Path(m.get("init_from") or m.get("name", ""))
        cj = path / "config.json" if path.is_dir() else path
        if cj.suffix == ".json" and cj.is_file():
            try:
                kind = json.loads(cj.read_text()).get("model_type", "")
            except (OSError, ValueError, AttributeError):
                kind = ""
        elif ":" in str(m.get("name", "")):
            kind = "custom module"
    out = f"{name} ({kind})" if kind else name
    if m.get("overrides"):
        out += " with " + ", ".join(f"{k}={v}" for k, v in m["overrides"].items())
    return out


def mixture(train: Table | list[dict], evals: list[dict]) -> dict:
    """Per source: target and achieved shares (overall and per phase of constant targets), tokens,
    the last finite train loss, the last held-out loss and bits per byte. `train` is a run's
    train table (or its records, step-sorted); {} when the run did not mix sources."""
    if not isinstance(train, Table):
        train = Table.from_records(train)
    key = ("mixture", id(evals))
    hit = train.cache.get(key)
    if hit is None or hit[0] is not evals:
        hit = train.cache[key] = (evals, _mixture(train, evals))  # evals kept: its id stays theirs
    return hit[1]


def _source_names(recs: list[dict]) -> list[str]:
    names: list[str] = []
    for r in recs:
        names += [n for n in r.get("sources") or {} if n not in names]
    return names


def _mixture(train: Table, evals: list[dict]) -> dict:
    train_names = train.source_names()
    names = train_names + [n for n in _source_names(evals) if n not in train_names]
    if not names:
        return {}
    with_src = np.flatnonzero(train.source_rows())
    last = train.row(int(with_src[-1])) if len(with_src) else {}
    out: dict = {"sources": [], "phases": []}
    last_eval = next((r for r in reversed(evals) if r.get("sources")), {})
    for n in names:
        s = (last.get("sources") or {}).get(n, {})
        idx, ys = finite(train, "sources", n, "loss")
        ev = (last_eval.get("sources") or {}).get(n, {})
        out["sources"].append(
            {
                "name": n,
                "target_share": s.get("target_share"),
                "share": s.get("share"),
                "tokens_total": s.get("tokens_total"),
                "train_loss": train.row(int(idx[-1]))["sources"][n]["loss"] if len(idx) else None,
                "eval_loss": ev.get("loss"),
                "eval_bpb": ev.get("bpb"),
            }
        )
    # phases: runs of records (with sources) with the same target shares, rounded to 1e-9; a
    # phase can only change where some raw target changes, so only there are records read whole
    if len(with_src):
        raw = np.stack([train.col("sources", n, "target_share")[with_src] for n in names], axis=1)
        raw = np.where(np.isnan(raw), 0.0, raw)  # an absent target counts as 0, as in the records
        cand = np.flatnonzero(np.any(raw[1:] != raw[:-1], axis=1)) + 1

        def targets(k: int) -> tuple:
            src = train.row(int(with_src[k]))["sources"]
            return tuple(round(float(src.get(n, {}).get("target_share") or 0.0), 9) for n in names)

        firsts, prev = [0], targets(0)
        for k in cand:
            t = targets(int(k))
            if t != prev:
                firsts.append(int(k))
            prev = t
        ends = firsts[1:] + [len(with_src)]
        prev_totals = dict.fromkeys(names, 0)
        for a, b in zip(firsts, ends):
            src = train.row(int(with_src[b - 1]))["sources"]
            end_totals = {n: int(src.get(n, {}).get("tokens_total") or 0) for n in names}
            got = {n: end_totals[n] - prev_totals[n] for n in names}
            total = sum(got.values()) or 1
            out["phases"].append(
                {
                    "targets": targets(a),
                    "first_step": int(train.steps[with_src[a]]),
                    "last_step": int(train.steps[with_src[b - 1]]),
                    "start_totals": dict(prev_totals),
                    "end_totals": end_totals,
                    "achieved": tuple(got[n] / total for n in names),
                    "tokens": tuple(got[n] for n in names),
                }
            )
            prev_totals = end_totals
    out["names"] = names
    return out


def summarize(run: Run) -> dict:
    """The headline numbers of a run, each computed from metrics.jsonl (and the checkpoints)."""
    t, e = run.train, run.evals
    last = t.row(-1) if len(t) else {}
    first = t.row(0) if len(t) else {}
    out: dict = {"label": run.label, "run_dir": str(run.run_dir), "model": model_description(run.config)}
    start = run.starts[-1] if run.starts else {}
    if _is_num(start.get("parameters")):
        out["parameters"], out["parameters_from"] = int(start["parameters"]), "start record"
    else:
        n = checkpoint_parameters(run)
        out["parameters"] = n
        out["parameters_from"] = f"checkpoint {run.checkpoints[-1]['path'].name}" if n is not None else None
    out["attention"] = last.get("attention")
    out["step"], out["total_steps"] = last.get("step"), last.get("total_steps")
    out["tokens"], out["epoch"] = last.get("tokens"), last.get("epoch")
    out["train_loss"] = last.get("loss")
    finite_evals = [r for r in e if _is_num(r.get("loss"))]
    le = e[-1] if e else {}
    out["eval_step"] = le.get("step")
    out["eval_loss"], out["eval_bpb"], out["eval_perplexity"] = (
        le.get("loss"),
        le.get("bpb"),
        le.get("perplexity"),
    )
    if finite_evals:
        best = min(finite_evals, key=lambda r: r["loss"])
        out["best_eval_loss"], out["best_eval_step"] = best["loss"], best["step"]
        with_bpb = [r for r in finite_evals if _is_num(r.get("bpb"))]
        if with_bpb:
            b = min(with_bpb, key=lambda r: r["bpb"])
            out["best_eval_bpb"], out["best_eval_bpb_step"] = b["bpb"], b["step"]
    out["training_time_s"] = last.get("elapsed_s")
    if run.starts and _is_num(run.starts[0].get("time")) and _is_num(last.get("time")):
        out["wall_clock_s"] = last["time"] - run.starts[0]["time"]  # from the first start, setup included
    elif _is_num(first.get("time")) and _is_num(first.get("elapsed_s")) and _is_num(last.get("time")):
        out["wall_clock_s"] = last["time"] - (first["time"] - first["elapsed_s"])
    out["restarts"] = max(0, len(run.segments) - 1)
    out["median_tokens_per_s"] = _median(t, "tokens_per_s")
    out["median_tokens_per_s_per_device"] = _median(t, "tokens_per_s_per_device")
    if _is_num(last.get("tokens")) and _is_num(last.get("elapsed_s")) and last["elapsed_s"] > 0:
        out["tokens_per_training_s"] = last["tokens"] / last["elapsed_s"]
    out["median_mfu"] = _median(t, "mfu")
    out["flops_per_token"], out["flops_source"] = last.get("flops_per_token"), last.get("flops_source")
    _, mems = finite(t, "memory_gib")
    out["peak_memory_gib"] = float(mems.max()) if len(mems) else None
    out["median_data_wait"] = _median(t, "data_wait")
    out["bad_steps"] = last.get("bad_steps")
    out["data_skipped_steps"] = last.get("skipped_steps")
    out["world_sizes"] = [s.world_size for s in run.segments if s.records]
    out["mixture"] = mixture(t, e)
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for section, body in d.items():
        if isinstance(body, dict) and not prefix:
            for k, v in body.items():
                out[f"{section}.{k}"] = v
        else:
            out[f"{prefix}{section}"] = body
    return out


def config_diff(cfg: dict | None) -> list[tuple[str, object, object]]:
    """(key, default, value) of every setting that differs from flame's defaults; keys this flame
    does not know have the default None."""
    if not cfg:
        return []
    from flame.config import Config

    defaults = _flatten(Config().to_dict())
    mine = _flatten(cfg)
    return [(k, defaults.get(k), v) for k, v in mine.items() if k not in defaults or defaults[k] != v]


def checkpoint_config_changes(run: Run) -> list[tuple[str, str, object, object]]:
    """(checkpoint, key, its value, config.toml's value) where a kept checkpoint was saved with
    other settings than the run's latest start (e.g. a resume with a new lr)."""
    if not run.config:
        return []
    now = _flatten(run.config)
    out = []
    for c in run.checkpoints:
        saved = (c.get("state") or {}).get("config")
        if isinstance(saved, dict):
            for k, v in _flatten(saved).items():
                if k in now and now[k] != v:
                    out.append((c["path"].name, k, v, now[k]))
    return out


def data_plan(run: Run) -> list[dict]:
    """The phases of the run's data plan (`<run_dir>/data_plan.json`), [] when it has none."""
    try:
        plan = json.loads((run.run_dir / "data_plan.json").read_text())
    except (OSError, ValueError):
        return []
    phases = plan.get("phases") if isinstance(plan, dict) else None
    return [p for p in phases if isinstance(p, dict)] if isinstance(phases, list) else []


def data_stores(run: Run) -> list[dict]:
    """The stores the run read (training and held-out) with their manifests' fingerprints."""
    cfg = run.config or {}
    d, ev = cfg.get("data", {}), cfg.get("eval", {})
    rows: list[tuple[str, Path]] = []
    if d.get("streaming"):
        return [
            {
                "role": "train (streaming)",
                "path": ", ".join(d.get("inputs") or ["stdlib"]),
                "note": "no store",
            }
        ]
    phases = [ph.get("mix") for ph in d.get("phases") or [] if isinstance(ph, dict) and ph.get("mix")]
    if d.get("mix") or phases:
        from flame.data.mixture import parse_named_mix

        seen = set()
        for spec in [d["mix"]] if d.get("mix") else phases:
            try:
                parsed = parse_named_mix(spec)
            except ValueError as e:
                return [{"role": "train", "path": spec, "note": f"unreadable mixture: {e}"}]
            for name, path, w in parsed:
                if path not in seen:
                    seen.add(path)
                    share = f" ({w:.1%})" if d.get("mix") else ""
                    rows.append((f"mixture source {name}{share}", Path(path)))
    elif d.get("store"):
        rows.append(("train", Path(d["store"])))
    else:
        # the cache is shared by runs: the run's own store is the one its data plan names
        try:
            plan = json.loads((run.run_dir / "data_plan.json").read_text())
            recorded = [s["path"] for s in plan["sources"]]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = []
        root = Path(d["cache_dir"]) if d.get("cache_dir") else run.run_dir / "data"
        found = [Path(p) for p in recorded] or sorted(root.glob("store-*"))
        for p in found:
            if (p / "manifest.json").is_file():
                rows.append(("train (prepared from data.inputs)", p))
    if ev.get("store"):
        rows.append(("held-out", Path(ev["store"])))
    else:
        for role, p in list(rows):
            if (p / "val" / "manifest.json").is_file():
                rows.append((f"held-out of {role.split(' (')[0]}", p / "val"))
    latest = next((c["state"] for c in reversed(run.checkpoints) if c.get("state")), None) or {}
    saved = str((latest.get("data") or {}).get("fingerprint", "")).split("|")
    out = []
    for role, p in rows:
        row = {"role": role, "path": str(p)}
        if not (p / "manifest.json").is_file():
            row["note"] = "not found from here (a relative path is relative to where the run started)"
            out.append(row)
            continue
        try:
            from flame.data.store import TokenStore

            s = TokenStore(p, verify=False)
            tok = s.manifest.get("tokenizer", {})
            row.update(
                fingerprint=s.fingerprint(),
                tokens=s.num_tokens,
                documents=s.num_documents,
                shards=len(s.shards),
                dtype=str(s.dtype),
                tokenizer=f"{tok.get('spec', '?')} ({tok.get('vocab_size', '?')} tokens, "
                f"fingerprint {str(tok.get('fingerprint', '?'))[:12]})",
            )
            if latest and not role.startswith("held-out"):
                row["checkpoint"] = "matches" if row["fingerprint"] in saved else "differs"
        except Exception as e:  # a damaged store: say so, the report still gets made
            row["note"] = f"unreadable: {getattr(e, 'message', e)}"
        out.append(row)
    return out
