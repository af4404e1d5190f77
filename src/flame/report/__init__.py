"""`flame report RUN_DIR... [-o report.html]`: one self-contained page about one run or several.

Built afterwards from what a run directory already holds, never threaded through training:
`metrics.jsonl` (train and eval records; and one record per (re)start when the trainer writes
them, as `kind: "start"` there or in `starts.jsonl`), `config.toml`, the kept checkpoints' run state and the data stores'
manifests. The page has the headline numbers, the curves (PNG embedded as base64: it opens from
disk with no network), the restarts, the config as its difference from the defaults, the
environment, the data fingerprints and the checkpoints. `-o report.md` writes the same as
Markdown with the PNGs beside it.

The parts: `read` (a run directory -> `Run`: metrics.jsonl as columns, starts, segments,
checkpoints), `summary` (the numbers, from all records), `figures` (the curves, thinned to the
pixels before drawing), `render` (the blocks of the page, HTML and Markdown).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from flame.errors import FlameError
from flame.plot import run_labels
from flame.report.figures import (
    DPI,
    FIG_H,
    FIG_W,
    PLOT_BUCKETS,
    Figure,
    bad_step_marks,
    decimate,
    make_figures,
    restart_steps,
)
from flame.report.read import (
    STARTS_FILE,
    Run,
    Segment,
    Table,
    find_segments,
    load_run,
    read_checkpoints,
    read_metrics_columns,
)
from flame.report.render import (
    Block,
    build_blocks,
    headline_cards,
    headline_rows,
    render_html,
    render_markdown,
)
from flame.report.summary import (
    config_diff,
    data_plan,
    data_stores,
    mixture,
    model_description,
    summarize,
)


def build_report(
    run_dirs: list[str | Path],
    out: str | Path | None = None,
    x: str = "step",
    smooth_window: int | None = None,
    title: str | None = None,
    timings: dict[str, float] | None = None,
) -> Path:
    """Write the report of `run_dirs` to `out` (.html, or .md with PNGs beside it); returns its path.
    `timings`, when given, receives the seconds spent reading, drawing and rendering."""
    if not run_dirs:
        raise FlameError("name at least one run directory")
    if x not in ("step", "tokens"):
        raise FlameError(f"--x {x!r}: choose step or tokens")
    if smooth_window is not None and smooth_window < 0:
        raise FlameError(f"--smooth {smooth_window}: give a number of records >= 0 (0 or 1 = off)")
    out = Path(out) if out else Path(run_dirs[0]) / "report.html"
    if out.is_dir():
        out = out / "report.html"
    elif not out.suffix:
        out = out.with_name(out.name + ".html")
    if out.suffix.lower() not in (".html", ".htm", ".md"):
        raise FlameError(f"cannot write {out}: a report is .html or .md", hint="end -o with .html or .md")
    clock = timings if timings is not None else {}
    t0 = time.perf_counter()
    # matplotlib's import (about a second) overlaps the reading, which pyarrow does without the GIL
    from flame.report.figures import warm_up

    warm = threading.Thread(target=warm_up, name="flame-report-matplotlib", daemon=True)
    warm.start()
    labels = run_labels([str(d) for d in run_dirs])
    runs = [load_run(d, label) for d, label in zip(run_dirs, labels)]
    try:  # before the figures are drawn: an unwritable -o fails at once
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlameError(f"cannot write {out}: {e.strerror or e}", hint="choose another -o") from None
    summaries = [summarize(r) for r in runs]
    t1 = time.perf_counter()
    warm.join()
    figures = make_figures(runs, x=x, smooth_window=smooth_window)
    t2 = time.perf_counter()
    blocks = build_blocks(runs, summaries, figures)
    from flame import __version__

    title = title or ("flame report: " + ", ".join(r.label for r in runs))
    subtitle = (
        f"{len(runs)} run(s): "
        + ", ".join(str(Path(d).resolve()) for d in run_dirs)
        + f" · made {time.strftime('%Y-%m-%d %H:%M')}"
    )
    footer = (
        f"Made by flame {__version__} from the run directories alone (metrics.jsonl, config.toml, "
        "checkpoints, store manifests). Medians are over the train records; the final train loss is "
        "the last record's (its log window)."
    )
    try:
        if out.suffix.lower() == ".md":
            stem = out.stem

            def image_path(f: Figure) -> str:
                p = out.with_name(f"{stem}-{f.name}.png")
                p.write_bytes(f.png)
                return p.name

            out.write_text(render_markdown(blocks, title, subtitle, footer, image_path), encoding="utf-8")
        else:
            out.write_text(render_html(blocks, title, subtitle, footer), encoding="utf-8")
    except OSError as e:
        raise FlameError(f"cannot write {out}: {e.strerror or e}", hint="choose another -o") from None
    clock.update(read_s=t1 - t0, figures_s=t2 - t1, render_s=time.perf_counter() - t2)
    clock["records"] = float(sum(len(r.train) + len(r.evals) for r in runs))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flame report",
        description="A self-contained HTML (or Markdown) report of one run, or comparing several, "
        "from their run directories alone.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (their --train.run_dir)")
    p.add_argument(
        "-o",
        "--out",
        help="report.html, or report.md with PNGs beside it (default: <first RUN_DIR>/report.html)",
    )
    p.add_argument(
        "--x", choices=("step", "tokens"), default="step", help="x axis of the curves (default: step)"
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=None,
        metavar="N",
        help="moving mean over N records for train curves (default: about 1/100 of the records from 200 records on; 0 = off)",
    )
    p.add_argument("--title", help="the page's title")
    return p


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    path = build_report(args.run_dirs, args.out, x=args.x, smooth_window=args.smooth, title=args.title)
    print(f"wrote {path}")
    return 0


__all__ = [
    "DPI",
    "FIG_H",
    "FIG_W",
    "PLOT_BUCKETS",
    "STARTS_FILE",
    "Block",
    "Figure",
    "Run",
    "Segment",
    "Table",
    "bad_step_marks",
    "build_blocks",
    "build_report",
    "cli",
    "config_diff",
    "data_plan",
    "data_stores",
    "decimate",
    "find_segments",
    "headline_cards",
    "headline_rows",
    "load_run",
    "make_figures",
    "mixture",
    "model_description",
    "read_checkpoints",
    "read_metrics_columns",
    "render_html",
    "render_markdown",
    "restart_steps",
    "summarize",
]
