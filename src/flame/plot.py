"""`flame plot RUN_DIR... -o out.png`: curves of one or more runs' metrics.jsonl, overlaid.

One panel per metric (train loss with eval loss when the run evaluated, learning rate,
tokens/s by default) and one legend for the figure. Every run has its own colour and line
style (the first solid, later ones dashed and drawn on top, so equal curves stay visible),
labelled with its run directory's name. The helpers here (reading, smoothing, thinning long
series) are shared with `flame report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flame.errors import FlameError
from flame.records import read_records

DEFAULT_METRICS = ("loss", "lr", "tokens_per_s")
TITLES = {
    "loss": "loss",
    "lr": "learning rate",
    "tokens_per_s": "tokens / s",
    "tokens_per_s_per_device": "tokens / s / device",
    "grad_norm": "gradient norm",
    "mfu": "MFU",
    "memory_gib": "peak memory (GiB)",
    "data_wait": "fraction of time waiting for data",
    "perplexity": "eval perplexity",
}
X_LABELS = {"step": "step", "tokens": "tokens seen"}
# panels whose y axis starts at zero: a throughput dip must not look like a collapse
FROM_ZERO = ("tokens_per_s", "tokens_per_s_per_device", "mfu", "data_wait", "memory_gib")


def read_run_records(run_dir: str | Path) -> list[dict]:
    """Every record of a run's metrics.jsonl with an integer step, in file order (which is the
    order they were written: a resume cuts the lines past its checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise FlameError(f"no such run directory: {run_dir}")
    if not path.is_file():
        raise FlameError(
            f"{run_dir} has no metrics.jsonl",
            hint="give the run directory of a `flame train` run (its --train.run_dir) that logged a step",
        )
    return [
        r for r in read_records(path) if isinstance(r.get("step"), int) and not isinstance(r["step"], bool)
    ]


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train records, eval records), each sorted by step, one per step (the last written)."""
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    for rec in records:
        by_kind.setdefault(rec.get("kind", "train"), {})[rec["step"]] = rec
    train = [by_kind["train"][s] for s in sorted(by_kind["train"])]
    evals = [by_kind["eval"][s] for s in sorted(by_kind["eval"])]
    return train, evals


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run, each sorted by step, one per step (the last written)."""
    train, evals = split_records(read_run_records(run_dir))
    if not train and not evals:
        raise FlameError(
            f"{Path(run_dir) / 'metrics.jsonl'} holds no records yet",
            hint="try again once the run has logged a step",
        )
    return train, evals


def run_labels(run_dirs: list[str]) -> list[str]:
    """The run directories' names; the shortest distinguishing path suffix when names repeat."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` points (shrinking at both ends); NaNs are skipped."""
    y = np.asarray(y, dtype=np.float64)
    if window <= 1 or len(y) < 3:
        return y
    window = min(int(window), len(y))
    ok = np.isfinite(y)
    vals = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    cnt = np.concatenate([[0], np.cumsum(ok)])
    half = window // 2
    i = np.arange(len(y))
    lo, hi = np.clip(i - half, 0, len(y)), np.clip(i - half + window, 0, len(y))
    n = cnt[hi] - cnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (vals[hi] - vals[lo]) / np.maximum(n, 1), np.nan)


def thin(xs: np.ndarray, ys: np.ndarray, max_points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points that draw the same line: each of max_points / 2 - 1 buckets
    keeps its lowest and highest point (in x order), so spikes survive the thinning; the first and
    last point are kept too."""
    n = len(xs)
    if n <= max_points:
        return xs, ys
    size = -(-n // max(1, max_points // 2 - 1))  # with the first and last: at most max_points
    buckets = -(-n // size)
    padded = np.full(buckets * size, np.nan)
    padded[:n] = ys
    grid = padded.reshape(buckets, size)
    finite = np.isfinite(grid)
    lo = np.where(finite, grid, np.inf).argmin(axis=1)  # a bucket of NaNs keeps its first point
    hi = np.where(finite, grid, -np.inf).argmax(axis=1)
    base = np.arange(buckets) * size
    idx = np.unique(np.concatenate([[0, n - 1], base + lo, base + hi]))
    idx = idx[idx < n]
    return xs[idx], ys[idx]


# Line styles of runs 1, 2, ...: the first solid, later ones dashed / dotted and drawn on top of
# it, thinner, so a later run that equals an earlier one shows as a dashed line over a solid one.
RUN_STYLES = ("-", (0, (5, 3)), (0, (1, 2)), (0, (6, 2, 1, 2)), (0, (3, 1)))
EVAL_MARKERS = ("o", "s", "^", "D", "v")


def run_style(i: int) -> dict:
    """matplotlib keyword arguments for run i's lines."""
    return {"ls": RUN_STYLES[i % len(RUN_STYLES)], "lw": max(0.9, 1.8 - 0.3 * i), "zorder": 2 + i}


def _x(recs: list[dict], x: str, train: list[dict]) -> np.ndarray:
    steps = np.array([r["step"] for r in recs], dtype=np.float64)
    if x == "step":
        return steps
    if all(isinstance(r.get("tokens"), (int, float)) for r in recs):
        return np.array([r["tokens"] for r in recs], dtype=np.float64)
    # eval records carry no token count: read it off the train records' step -> tokens line
    ts = np.array([r["step"] for r in train], dtype=np.float64)
    tk = np.array([r["tokens"] for r in train], dtype=np.float64)
    return np.interp(steps, ts, tk)


def _series(recs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the records holding a number under `key`, and those numbers."""
    idx = [i for i, r in enumerate(recs) if isinstance(r.get(key), (int, float)) and r[key] is not None]
    return np.array(idx, dtype=np.int64), np.array([recs[i][key] for i in idx], dtype=np.float64)


def source_names(recs: list[dict]) -> list[str]:
    """Mixture source names found in records' `sources`, in first-seen order."""
    names: list[str] = []
    for r in recs:
        for n in r.get("sources") or {}:
            if n not in names:
                names.append(n)
    return names


def _source_series(recs: list[dict], name: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    idx, ys = [], []
    for i, r in enumerate(recs):
        v = (r.get("sources") or {}).get(name, {}).get(key)
        if isinstance(v, (int, float)) and v == v:  # NaN: the source had no tokens in that window
            idx.append(i)
            ys.append(v)
    return np.array(idx, dtype=np.int64), np.array(ys, dtype=np.float64)


def plot_runs(
    run_dirs: list[str],
    out: str | Path,
    x: str = "step",
    metrics: list[str] | tuple[str, ...] = DEFAULT_METRICS,
    size: tuple[int, int] = (1200, 0),
    dpi: int = 100,
    by_source: bool = False,
    log_y: list[str] | tuple[str, ...] = (),
    smooth_window: int = 0,
) -> Path:
    """Write a PNG of `metrics` against `x` for every run; returns its path.

    `size` is (width, height) in pixels; height 0 means 350 pixels per panel. `by_source` adds
    each mixture source's train (and held-out) loss to the loss panel. `log_y` names the panels
    drawn on a log scale; `smooth_window` > 1 draws each train curve as a centred moving average
    over that many records, over the raw curve in a lighter tone.
    """
    import matplotlib.pyplot as plt

    fig = metrics_figure(run_dirs, x, metrics, size, dpi, by_source, log_y, smooth_window)
    out = Path(out)
    if out.is_dir():
        out = out / "metrics.png"
    elif not out.suffix:
        out = out.with_name(out.name + ".png")  # what savefig writes; the path returned must say so
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)  # no bbox_inches="tight": the image keeps the requested size
    except OSError as e:
        raise FlameError(f"cannot write {out}: {e.strerror or e}", hint="choose another --out") from None
    except ValueError as e:  # an image format matplotlib does not write
        raise FlameError(f"cannot write {out}: {e}", hint="end --out with .png (or .svg, .pdf)") from None
    finally:
        plt.close(fig)
    return out


def metrics_figure(
    run_dirs: list[str],
    x: str = "step",
    metrics: list[str] | tuple[str, ...] = DEFAULT_METRICS,
    size: tuple[int, int] = (1200, 0),
    dpi: int = 100,
    by_source: bool = False,
    log_y: list[str] | tuple[str, ...] = (),
    smooth_window: int = 0,
):
    """The matplotlib figure `plot_runs` saves (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    if x not in X_LABELS:
        raise FlameError(f"--x {x!r}: choose step or tokens")
    if not metrics:
        raise FlameError("--metrics is empty: name at least one, e.g. --metrics loss,lr")
    runs = [read_metrics(d) for d in run_dirs]
    available = set()
    for train, evals in runs:
        for r in train:
            available.update(
                k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            )
        if evals:
            available.update(("loss", "perplexity"))
    missing = [m for m in metrics if m not in available]
    if missing:
        shown = ", ".join(sorted(available - {"step", "time", "total_steps"}))
        hint = f"available: {shown}"
        if "mfu" in missing:
            hint += "; mfu is null when the device's peak FLOP/s is unknown (set --log.peak_flops)"
        raise FlameError(f"metric(s) {', '.join(missing)} appear in none of the runs", hint=hint)
    if by_source and not any(source_names(train) for train, _ in runs):
        raise FlameError(
            "--by-source: none of the runs logged per-source losses",
            hint="per-source losses are logged for runs that mix stores (--data.mix)",
        )
    if x == "tokens" and any(train and "tokens" not in train[0] for train, _ in runs):
        raise FlameError("--x tokens: a run's metrics.jsonl has no 'tokens' field; use --x step")
    not_shown = [m for m in log_y if m not in metrics]
    if not_shown:
        raise FlameError(
            f"--log-y {','.join(not_shown)}: not among the panels ({','.join(metrics)})",
            hint="name panels given to --metrics, e.g. --log-y loss,grad_norm",
        )
    if smooth_window < 0:
        raise FlameError(f"--smooth {smooth_window}: give a number of records >= 0 (0 or 1 = off)")

    width, height = size
    height = height or 350 * len(metrics)
    fig, axes = plt.subplots(
        len(metrics),
        1,
        figsize=(width / dpi, height / dpi),
        dpi=dpi,
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    labels = run_labels(run_dirs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles: dict[str, object] = {}  # one legend for the whole figure: label -> line
    for ax, key in zip(axes[:, 0], metrics):
        for i, ((train, evals), label) in enumerate(zip(runs, labels)):
            color = colors[i % len(colors)]
            style = run_style(i)
            idx, y = _series(train, key)
            if len(idx):
                xs = _x(train, x, train)[idx]
                name = f"{label} train" if key in ("loss", "perplexity") and evals else label
                if smooth_window > 1 and len(y) > 2:
                    ax.plot(
                        *thin(xs, y), color=color, alpha=0.3, lw=0.8, ls=style["ls"], zorder=style["zorder"]
                    )
                    y = smooth(y, smooth_window)
                (line,) = ax.plot(*thin(xs, y), color=color, **style)
                if not (name == label and f"{label} train" in handles):  # the same line style
                    handles.setdefault(name, line)
            if key in ("loss", "perplexity") and evals:
                eidx, ey = _series(evals, key)
                if len(eidx):
                    exs = _x(evals, x, train)[eidx]
                    (line,) = ax.plot(
                        exs,
                        ey,
                        color=color,
                        lw=1.0,
                        ls=":",
                        marker=EVAL_MARKERS[i % len(EVAL_MARKERS)],
                        ms=4,
                        mfc="none" if i else color,  # hollow: an equal earlier point shows through
                        zorder=style["zorder"] + 0.5,
                    )
                    handles.setdefault(f"{label} eval", line)
            if key == "loss" and by_source:
                _plot_sources(ax, train, evals, x, label, len(runs) > 1, color, colors, handles)
        ax.set_ylabel(TITLES.get(key, key))
        ax.grid(True, alpha=0.3)
        if key in log_y:
            ax.set_yscale("log")
        elif key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if key in FROM_ZERO and key not in log_y:
            ax.set_ylim(bottom=0)
    axes[-1, 0].set_xlabel(X_LABELS[x])
    if x == "step":
        from matplotlib.ticker import MaxNLocator

        axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside upper center",
            ncol=min(len(handles), 4),
            fontsize="small",
            frameon=False,
        )
    return fig


_SOURCE_STYLES = (":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1)))


def _plot_sources(ax, train, evals, x, label, many_runs, run_color, colors, handles) -> None:
    """One line per source: its own colour for a single run, the run's colour and a dash style
    per source when runs are compared."""
    for j, name in enumerate(
        source_names(train) + [n for n in source_names(evals) if n not in source_names(train)]
    ):
        color = run_color if many_runs else colors[(j + 1) % len(colors)]
        style = _SOURCE_STYLES[j % len(_SOURCE_STYLES)] if many_runs else "-"
        tag = f"{label} {name}" if many_runs else name
        idx, y = _source_series(train, name, "loss")
        if len(idx):
            (line,) = ax.plot(*thin(_x(train, x, train)[idx], y), color=color, lw=1.0, ls=style)
            handles.setdefault(f"{tag} train", line)
        eidx, ey = _source_series(evals, name, "loss")
        if len(eidx):
            exs = _x(evals, x, train)[eidx]
            (line,) = ax.plot(exs, ey, color=color, lw=1.0, ls="--", marker="s", ms=3)
            handles.setdefault(f"{tag} eval", line)


def _size(s: str) -> tuple[int, int]:
    try:
        w, _, h = s.lower().partition("x")
        width, height = int(w), int(h) if h else 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not WIDTHxHEIGHT in pixels, e.g. 1200x900") from None
    if width <= 0 or height < 0:
        raise argparse.ArgumentTypeError(f"{s!r}: width and height must be positive")
    return width, height


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flame plot", description="Plot metrics of one or more runs (overlaid) into a PNG."
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    p.add_argument("-o", "--out", help="output PNG (default: <first RUN_DIR>/metrics.png)")
    p.add_argument("--x", choices=tuple(X_LABELS), default="step", help="x axis (default: step)")
    p.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help="comma-separated metrics.jsonl fields, one panel each (default: loss,lr,tokens_per_s; "
        "also grad_norm, mfu, memory_gib, data_wait, perplexity, ...)",
    )
    p.add_argument(
        "--size", type=_size, default=(1200, 0), help="WIDTHxHEIGHT in pixels (default: 1200 x 350 per panel)"
    )
    p.add_argument(
        "--by-source",
        action="store_true",
        help="add each mixture source's train and held-out loss to the loss panel (runs with --data.mix)",
    )
    p.add_argument(
        "--log-y",
        nargs="?",
        const="loss",
        default="",
        metavar="PANELS",
        help="log-scale y axis for these comma-separated panels (a bare --log-y: loss)",
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=0,
        metavar="N",
        help="draw train curves as a centred moving average over N records, over the raw curve (0 = off)",
    )
    return p


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    out = args.out or str(Path(args.run_dirs[0]) / "metrics.png")
    log_y = [m.strip() for m in args.log_y.split(",") if m.strip()]
    path = plot_runs(
        args.run_dirs,
        out,
        x=args.x,
        metrics=metrics,
        size=args.size,
        by_source=args.by_source,
        log_y=log_y,
        smooth_window=args.smooth,
    )
    print(f"wrote {path}")
    return 0
