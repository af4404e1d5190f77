"""The report as a document: headline rows and cards, blocks (headings, tables, figures), and their
HTML (self-contained: PNGs embedded as base64, no network) or Markdown (PNGs beside it)."""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flame.report.figures import DPI, FIG_H, FIG_W, Figure
from flame.report.read import Run, _dur, _is_num
from flame.report.summary import checkpoint_config_changes, config_diff, data_plan, data_stores

# ---------------------------------------------------------------- formatting


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.{digits - 1}e}"
    return str(v)


def _si(v) -> str:
    if not _is_num(v):
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def _value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "(not set)" if v is None else str(v)


def headline_rows(s: dict) -> list[tuple[str, str]]:
    """The headline as (label, text) rows."""
    rows = [("model", s["model"])]
    if s.get("parameters") is not None:
        rows.append(
            ("parameters", f"{s['parameters']:,} ({_si(s['parameters'])}; from the {s['parameters_from']})")
        )
    else:
        rows.append(("parameters", "- (no start record or checkpoint holds them)"))
    rows.append(("attention", s.get("attention") or "-"))
    rows.append(("steps", f"{_f(s['step'])} of {_f(s['total_steps'])}"))
    rows.append(("tokens", f"{_f(s['tokens'])} ({_si(s['tokens'])}; {_f(s['epoch'], 3)} epochs)"))
    mx = s.get("mixture") or {}
    if mx:
        parts = [
            f"{x['name']} {_pct(x['target_share'])} target / {_pct(x['share'])} achieved"
            for x in mx["sources"]
        ]
        rows.append(("mixture", "; ".join(parts)))
    seg_note = f"{s['restarts'] + 1} segment(s), {s['restarts']} restart(s)"
    rows.append(
        (
            "training time",
            f"{_dur(s['training_time_s'])} across {seg_note}; wall clock {_dur(s.get('wall_clock_s'))} "
            "from the first start to the last record",
        )
    )
    rows.append(("final train loss", f"{_f(s['train_loss'])} (step {_f(s['step'])})"))
    if s.get("eval_step") is not None:
        rows.append(
            (
                "final eval",
                f"loss {_f(s['eval_loss'])}, perplexity {_f(s['eval_perplexity'], 2)}, "
                f"{_f(s['eval_bpb'])} bits per byte (step {_f(s['eval_step'])})",
            )
        )
        best = f"loss {_f(s.get('best_eval_loss'))} (step {_f(s.get('best_eval_step'))})"
        if s.get("best_eval_bpb") is not None:
            best += f", {_f(s['best_eval_bpb'])} bits per byte (step {_f(s['best_eval_bpb_step'])})"
        rows.append(("best eval", best))
    else:
        rows.append(("eval", "- (no eval records: see --eval.interval)"))
    rows.append(
        (
            "throughput",
            f"{_int(s['median_tokens_per_s'])} tokens/s median of records "
            f"({_int(s['median_tokens_per_s_per_device'])} per device); "
            f"{_int(s.get('tokens_per_training_s'))} tokens/s over the whole training time",
        )
    )
    fl = f"{_si(s['flops_per_token'])} FLOPs/token ({s['flops_source'] or '?'})"
    if s.get("median_mfu") is not None:
        rows.append(("MFU", f"{s['median_mfu'] * 100:.2f}% median of records; {fl}"))
    else:
        rows.append(("MFU", f"- (peak FLOP/s of the device unknown: --log.peak_flops); {fl}"))
    rows.append(("peak memory", f"{_f(s['peak_memory_gib'], 3)} GiB"))
    rows.append(("data wait", f"{_pct(s['median_data_wait'])} of the time (median of records)"))
    rows.append(("skipped steps", f"{_f(s['bad_steps'])} (NaN / spike guard)"))
    if s.get("data_skipped_steps"):
        rows.append(
            ("data skipped", f"{_f(s['data_skipped_steps'])} steps consumed without training (data.skip)")
        )
    ws = sorted({w for w in s["world_sizes"] if w})
    rows.append(("processes", ", ".join(map(str, ws)) if ws else "-"))
    return rows


def headline_cards(s: dict) -> list[tuple[str, str, str]]:
    """The few numbers a reader looks for first: (label, value, note)."""
    cards = [("final train loss", _f(s["train_loss"]), f"step {_f(s['step'])}")]
    if s.get("eval_step") is not None:
        cards.append(("final eval loss", _f(s["eval_loss"]), f"step {_f(s['eval_step'])}"))
        if s.get("eval_bpb") is not None:
            cards.append(("eval bits per byte", _f(s["eval_bpb"]), f"best {_f(s.get('best_eval_bpb'))}"))
    cards.append(("tokens", _si(s["tokens"]), f"{_f(s['step'])} of {_f(s['total_steps'])} steps"))
    cards.append(("training time", _dur(s["training_time_s"]), f"{s['restarts']} restart(s)"))
    cards.append(("tokens / s", _si(s["median_tokens_per_s"]), "median of records"))
    if s.get("median_mfu") is not None:
        cards.append(("MFU", f"{s['median_mfu'] * 100:.1f}%", f"FLOPs: {s['flops_source']}"))
    return cards


def _int(v) -> str:
    return f"{v:,.0f}" if _is_num(v) else "-"


def _pct(v) -> str:
    return f"{v * 100:.2f}%" if _is_num(v) else "-"


@dataclass
class Block:
    kind: str  # h2, p, kv, table, figures, details
    title: str = ""
    rows: list = field(default_factory=list)
    header: list = field(default_factory=list)
    text: str = ""
    figures: list = field(default_factory=list)
    anchor: str = ""


def build_blocks(runs: list[Run], summaries: list[dict], figures: list[Figure]) -> list[Block]:
    many = len(runs) > 1
    blocks: list[Block] = [Block("h2", "Summary", anchor="summary")]
    if many:
        rows_by_run = [headline_rows(s) for s in summaries]
        labels = [label for label, _ in rows_by_run[0]]
        for rs in rows_by_run[1:]:
            labels += [lab for lab, _ in rs if lab not in labels]
        table = []
        for lab in labels:
            table.append([lab] + [dict(rs).get(lab, "-") for rs in rows_by_run])
        blocks.append(Block("table", header=[""] + [r.label for r in runs], rows=table))
    else:
        blocks.append(Block("cards", rows=headline_cards(summaries[0])))
        blocks.append(Block("kv", rows=headline_rows(summaries[0])))
    blocks.append(Block("h2", "Curves", anchor="curves"))
    if figures:
        blocks.append(Block("figures", figures=figures))
    blocks.append(
        Block(
            "p",
            text="Dashed vertical lines: restarts. Red crosses: log windows in which the NaN / spike "
            "guard skipped updates. A faint line under a curve is the raw record; the solid one its "
            "moving mean.",
        )
    )
    blocks.append(Block("h2", "Restarts", anchor="restarts"))
    for run in runs:
        rows = []
        for seg in run.segments:
            rows.append(
                [
                    str(seg.index + 1),
                    "-" if seg.resume_step is None else f"{seg.resume_step:,}",
                    f"{_f(seg.first_step)} – {_f(seg.last_step)}"
                    if seg.records
                    else "no record (its work was lost)",
                    _dur(seg.elapsed_end),
                    _f(seg.world_size),
                    _dur(seg.lost_s) if seg.index else "-",
                    seg.found_by,
                ]
            )
        blocks.append(
            Block(
                "table",
                title=run.label if many else "",
                header=[
                    "segment",
                    "resumed at step",
                    "records (steps)",
                    "training time at its end",
                    "processes",
                    "wall time from the saved state to training again",
                    "found by",
                ],
                rows=rows,
            )
        )
    for run, s in zip(runs, summaries):
        mx = s.get("mixture") or {}
        if not mx:
            continue
        blocks.append(Block("h2", "Mixture" + (f" — {run.label}" if many else ""), anchor="mixture"))
        blocks.append(
            Block(
                "table",
                header=[
                    "source",
                    "target",
                    "achieved",
                    "tokens",
                    "last train loss",
                    "last eval loss",
                    "eval bits per byte",
                ],
                rows=[
                    [
                        x["name"],
                        _pct(x["target_share"]),
                        _pct(x["share"]),
                        _f(x["tokens_total"]),
                        _f(x["train_loss"]),
                        _f(x["eval_loss"]),
                        _f(x["eval_bpb"]),
                    ]
                    for x in mx["sources"]
                ],
            )
        )
        plan = data_plan(run)
        if plan:
            blocks.append(
                Block(
                    "table",
                    title="the data plan (data_plan.json)",
                    header=["phase", "from step", "mixture", "origin"],
                    rows=[
                        [
                            str(i + 1),
                            _f(ph.get("start_step")),
                            str(ph.get("mix", "-")),
                            str(ph.get("origin") or "config"),
                        ]
                        for i, ph in enumerate(plan)
                    ],
                )
            )
        if len(mx["phases"]) > 1:
            rows = []
            for k, ph in enumerate(mx["phases"]):
                for j, n in enumerate(mx["names"]):
                    rows.append(
                        [
                            str(k + 1),
                            f"{ph['first_step']:,} – {ph['last_step']:,}",
                            n,
                            _pct(ph["targets"][j]),
                            _pct(ph["achieved"][j]),
                            _f(ph["tokens"][j]),
                        ]
                    )
            blocks.append(
                Block(
                    "table",
                    title="per phase (records with the same target shares)",
                    header=["phase", "records (steps)", "source", "target", "achieved in phase", "tokens"],
                    rows=rows,
                )
            )
    blocks.append(Block("h2", "Configuration", anchor="config"))
    for run in runs:
        tag = f"{run.label}: " if many else ""
        if run.config is None:
            blocks.append(Block("p", text=f"{tag}no readable config.toml in {run.run_dir}."))
            continue
        diff = config_diff(run.config)
        blocks.append(
            Block(
                "table",
                title=f"{tag}settings that differ from flame's defaults",
                header=["setting", "default", "this run"],
                rows=[
                    [k, "(not an option of this flame)" if d is None else _value(d), _value(v)]
                    for k, d, v in diff
                ],
            )
        )
        changes = checkpoint_config_changes(run)
        if changes:
            blocks.append(
                Block(
                    "table",
                    title=f"{tag}settings of kept checkpoints that differ from the latest start",
                    header=["checkpoint", "setting", "saved with", "latest start"],
                    rows=[[c, k, _value(a), _value(b)] for c, k, a, b in changes],
                )
            )
        blocks.append(Block("details", title=f"{tag}the full config.toml", text=run.config_text))
    blocks.append(Block("h2", "Environment", anchor="environment"))
    for run in runs:
        tag = f"{run.label}: " if many else ""
        if run.starts:
            rows = []
            for k, st in enumerate(run.starts):
                v = st.get("versions") or {}
                rows.append(
                    [
                        str(k + 1),
                        _f(st.get("step")),
                        _f(st.get("world_size")),
                        str(st.get("device_name") or st.get("device") or "-"),
                        str(st.get("strategy") or "-"),
                        ", ".join(f"{a} {b}" for a, b in v.items()) or "-",
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["time"]))
                        if _is_num(st.get("time"))
                        else "-",
                    ]
                )
            blocks.append(
                Block(
                    "table",
                    title=tag.rstrip(": "),
                    header=["start", "at step", "processes", "device", "strategy", "versions", "time"],
                    rows=rows,
                )
            )
        else:
            dev = ((run.config or {}).get("train") or {}).get("device", "?")
            ws = ", ".join(str(s.world_size) for s in run.segments if s.world_size) or "-"
            blocks.append(
                Block(
                    "p",
                    text=f"{tag}this run's records hold no start records, so the versions and devices it ran "
                    f"with are not known. train.device: {dev}; processes per segment (tokens/s over tokens/s "
                    f"per device): {ws}.",
                )
            )
    blocks.append(Block("h2", "Data", anchor="data"))
    for run in runs:
        tag = f"{run.label}: " if many else ""
        stores = data_stores(run)
        if not stores:
            blocks.append(Block("p", text=f"{tag}no store found for this run."))
            continue
        blocks.append(
            Block(
                "table",
                title=tag.rstrip(": "),
                header=[
                    "role",
                    "store",
                    "fingerprint",
                    "tokens",
                    "documents",
                    "shards",
                    "dtype",
                    "tokenizer",
                    "latest checkpoint",
                ],
                rows=[
                    [
                        r["role"],
                        r["path"],
                        r.get("fingerprint", r.get("note", "-")),
                        _f(r.get("tokens")),
                        _f(r.get("documents")),
                        _f(r.get("shards")),
                        r.get("dtype", "-"),
                        r.get("tokenizer", "-"),
                        r.get("checkpoint", "-"),
                    ]
                    for r in stores
                ],
            )
        )
    blocks.append(Block("h2", "Checkpoints", anchor="checkpoints"))
    for run in runs:
        tag = f"{run.label}: " if many else ""
        rows = []
        for c in run.checkpoints + run.abandoned:
            st = c.get("state") or {}
            rows.append(
                [
                    c["path"].name + (f" ({c['folder']}: another trajectory)" if c.get("folder") else ""),
                    _f(st.get("tokens")),
                    _dur(st.get("elapsed_s")),
                    _f(st.get("world_size")),
                    f"{c['bytes'] / 2**20:,.1f} MiB",
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["saved"]))
                    if _is_num(c.get("saved"))
                    else "-",
                    c["problem"] or "complete, sizes match",
                ]
            )
        if rows:
            blocks.append(
                Block(
                    "table",
                    title=tag.rstrip(": "),
                    header=["checkpoint", "tokens", "training time", "processes", "size", "saved", "state"],
                    rows=rows,
                )
            )
        else:
            blocks.append(Block("p", text=f"{tag}no checkpoint is kept in {run.run_dir / 'checkpoints'}."))
    return blocks


CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d232a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:21px}
header p{margin:4px 0 0;color:#b8c0c8;font-size:13px}nav a{color:#9fd0ff;margin-right:14px;text-decoration:none}
main{padding:8px 28px 40px;max-width:1680px}h2{margin:26px 0 10px;font-size:17px;border-bottom:1px solid #d5d9de;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px;color:#4a5561}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px;font-size:13px;box-shadow:0 1px 2px #0001}
th,td{border:1px solid #e1e4e8;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}table.kv td:first-child{font-weight:600;white-space:nowrap;color:#4a5561}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
figure{margin:0;background:#fff;padding:6px;box-shadow:0 1px 2px #0001}figure img{width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#5b6670;padding:2px 4px}
details{background:#fff;padding:6px 10px;margin:6px 0 12px;box-shadow:0 1px 2px #0001}
summary{cursor:pointer;font-weight:600}pre{font-size:12px;overflow:auto;margin:8px 0}
p.note{color:#4a5561;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0 14px}
.card{background:#fff;box-shadow:0 1px 2px #0002;padding:8px 14px;min-width:130px;border-top:3px solid #1f77b4}
.card .label{font-size:12px;color:#5b6670}.card .value{font-size:22px;font-weight:600}
.card .sub{font-size:11px;color:#7a848e}footer{color:#6b7580;font-size:12px;padding:0 28px 24px}
"""


def render_html(blocks: list[Block], title: str, subtitle: str, footer: str) -> str:
    e = html.escape
    nav = " ".join(f'<a href="#{b.anchor}">{e(b.title)}</a>' for b in blocks if b.kind == "h2" and b.anchor)
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{e(title)}</h1><p>{e(subtitle)}</p><p><nav>{nav}</nav></p></header><main>",
    ]
    seen_anchor: set[str] = set()
    for b in blocks:
        if b.kind == "h2":
            aid = b.anchor if b.anchor and b.anchor not in seen_anchor else ""
            seen_anchor.add(b.anchor)
            out.append(f'<h2 id="{aid}">{e(b.title)}</h2>' if aid else f"<h2>{e(b.title)}</h2>")
        elif b.kind == "p":
            out.append(f'<p class="note">{e(b.text)}</p>')
        elif b.kind == "cards":
            out.append('<div class="cards">')
            out += [
                f'<div class="card"><div class="label">{e(a)}</div><div class="value">{e(v)}</div>'
                f'<div class="sub">{e(n)}</div></div>'
                for a, v, n in b.rows
            ]
            out.append("</div>")
        elif b.kind == "kv":
            out.append('<table class="kv">')
            out += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in b.rows]
            out.append("</table>")
        elif b.kind == "table":
            if b.title:
                out.append(f"<h3>{e(b.title)}</h3>")
            if not b.rows:
                out.append('<p class="note">none</p>')
                continue
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b.rows]
            out.append("</table>")
        elif b.kind == "figures":
            out.append('<div class="grid">')
            for f in b.figures:
                data = base64.b64encode(f.png).decode("ascii")
                out.append(
                    f'<figure><img alt="{e(f.title)}" width="{int(FIG_W * DPI)}" height="{int(FIG_H * DPI)}" '
                    f'src="data:image/png;base64,{data}">'
                    + (f"<figcaption>{e(f.caption)}</figcaption>" if f.caption else "")
                    + "</figure>"
                )
            out.append("</div>")
        elif b.kind == "details":
            out.append(f"<details><summary>{e(b.title)}</summary><pre>{e(b.text)}</pre></details>")
    out.append(f"</main><footer>{e(footer)}</footer></body></html>")
    return "\n".join(out) + "\n"


def _md_cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(
    blocks: list[Block], title: str, subtitle: str, footer: str, image_path: Callable[[Figure], str]
) -> str:
    """Markdown of the blocks; `image_path(figure)` writes a figure's PNG and returns its link."""
    out = [f"# {title}", "", subtitle, ""]
    for b in blocks:
        if b.kind == "h2":
            out += [f"## {b.title}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind in ("kv", "table"):
            if b.title:
                out += [f"**{b.title}**", ""]
            header = b.header if b.kind == "table" else ["", ""]
            if not b.rows:
                out += ["none", ""]
                continue
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif b.kind == "figures":
            for f in b.figures:
                out += [f"![{f.title}]({image_path(f)})", ""]
        elif b.kind == "details":
            out += [
                f"<details><summary>{b.title}</summary>",
                "",
                "```toml",
                b.text.rstrip(),
                "```",
                "",
                "</details>",
                "",
            ]
    out += [f"_{footer}_", ""]
    return "\n".join(out)
