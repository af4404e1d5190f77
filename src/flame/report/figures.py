"""The report's curves: one PNG per panel, drawn from every run's columns.

Long series are thinned before drawing (`decimate`): a panel is about 720 pixels wide, so a
100k-step run's every record cannot show anyway, and drawing them is most of the cost. Each
bucket of consecutive points keeps its lowest and highest, and the first and last point are
kept, so a one-step spike and the extremes stay visible exactly. The headline numbers never
come from here (see summary.py).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from flame.plot import EVAL_MARKERS, run_style, smooth, thin
from flame.report.read import Run
from flame.report.summary import finite, mixture

FIG_W, FIG_H, DPI = 8.0, 3.2, 100  # 800 x 320 pixels
# Buckets a long series is thinned to (at most two points each, plus the ends): more than the
# axes' ~720 pixels, so the thinned line draws as the full one would.
PLOT_BUCKETS = 1000


@dataclass
class Figure:
    name: str
    title: str
    png: bytes
    caption: str = ""


def decimate(xs: np.ndarray, ys: np.ndarray, buckets: int = PLOT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """At most 2 * buckets + 2 of the points (x order kept) that draw the same line: each bucket of
    consecutive points keeps its lowest and highest, and the first and last point are kept."""
    return thin(xs, ys, 2 * buckets + 2)


def warm_up() -> None:
    """Import matplotlib and load its font (about a second): run in a thread while metrics.jsonl
    is read, which pyarrow does without holding the GIL."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure

        fig = MplFigure(figsize=(1, 1), dpi=10)
        FigureCanvasAgg(fig)
        fig.text(0, 0, "0")
        fig.canvas.draw()
    except Exception:  # the drawing itself will say what is wrong
        pass


# ---------------------------------------------------------------- where things sit on the x axis


def train_x(run: Run, x: str) -> np.ndarray:
    """The x of every train record: its step, or its tokens seen (0 where a record has none)."""
    key = ("x", x)
    if key not in run.train.cache:
        if x == "step":
            xs = run.train.steps.astype(np.float64)
        else:
            tk = run.train.col("tokens")
            xs = np.where(np.isnan(tk), 0.0, tk)
        run.train.cache[key] = xs
    return run.train.cache[key]


def at_x(run: Run, steps, x: str) -> np.ndarray:
    """x of other records (evals, restarts) by their steps: tokens read off the train records."""
    steps = np.asarray(steps, dtype=np.float64)
    if x == "step" or not len(run.train):
        return steps
    return np.interp(steps, run.train.steps.astype(np.float64), train_x(run, x))


def restart_steps(run: Run) -> list[float]:
    """Where each restart sits on the step axis: the step resumed at when recorded, else just
    after the previous segment's last record."""
    out = []
    for seg in run.segments[1:]:
        if seg.resume_step is not None:
            out.append(float(seg.resume_step))
        else:
            prev = [s.last_step for s in run.segments[: seg.index] if s.last_step is not None]
            if prev:
                out.append(float(prev[-1]))
    return out


def bad_step_marks(run: Run) -> list[int]:
    """Train record steps whose window had updates skipped (bad_steps went up)."""
    idx, b = finite(run.train, "bad_steps")
    if not len(idx):
        return []
    went_up = b > np.concatenate([[0.0], b[:-1]])
    return [int(s) for s in run.train.steps[idx[went_up]]]


def _auto_window(n: int, smooth_window: int | None) -> int:
    if smooth_window is not None:
        return smooth_window
    return max(1, round(n / 100)) if n >= 200 else 1


def _log_helps(ys: np.ndarray, ratio: float) -> bool:
    ys = ys[np.isfinite(ys)]
    return len(ys) > 1 and ys.min() > 0 and ys.max() / ys.min() > ratio


# ---------------------------------------------------------------- drawing


class _Panels:
    """The shape every panel shares: a titled axes over step or tokens, lines thinned before
    they are drawn, the restarts (and skipped steps) marked, a legend, a PNG."""

    def __init__(self, runs: list[Run], x: str):
        from matplotlib import rcParams

        self.runs, self.x, self.many = runs, x, len(runs) > 1
        self.colors = rcParams["axes.prop_cycle"].by_key()["color"]
        self.figures: list[Figure] = []
        self._fig = self._ax = None

    def color(self, i: int) -> str:
        return self.colors[i % len(self.colors)]

    def _axes(self):
        """The one figure every panel is drawn on in turn, emptied: making a figure and its ticks
        anew costs more than drawing a thinned panel."""
        ax = self._ax
        if ax is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure as MplFigure
            from matplotlib.ticker import EngFormatter, MaxNLocator

            self._fig = fig = MplFigure(figsize=(FIG_W, FIG_H), dpi=DPI)
            FigureCanvasAgg(fig)
            self._ax = ax = fig.add_subplot()
            # fixed margins, title and label places: a layout engine, or placing them by the
            # tick labels' extents, would cost more than the drawing
            fig.subplots_adjust(left=0.085, right=0.985, top=0.9, bottom=0.15)
            ax.grid(True, alpha=0.3)
            ax.set_xlabel("step" if self.x == "step" else "tokens seen")
            ax.xaxis.set_label_coords(0.5, -0.11)
            if self.x == "tokens":
                ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            return ax
        for artist in [*ax.lines, *ax.collections, *ax.patches, *ax.texts]:
            artist.remove()
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        ax.set_yscale("linear")  # also puts back the default y ticks and their labels
        ax.set_autoscale_on(True)
        ax.relim()
        return ax

    def title(self, ax, text: str) -> None:
        ax.set_title(text, fontsize="medium", loc="left", y=1.0, pad=6.0)

    @contextmanager
    def panel(
        self, name: str, title: str, *, heading: str = "", bad: bool = False, caption: str = ""
    ) -> Iterator[tuple]:
        """Yields (axes, handles: legend label -> artist); draws and keeps the PNG on exit.
        `heading` is the axes' title when it is longer than the figure's `title`."""
        ax = self._axes()
        self.title(ax, heading or title)
        handles: dict = {}
        yield ax, handles
        self._marks(ax, handles, bad)
        if handles:
            ax.legend(list(handles.values()), list(handles), fontsize="small", loc="best", framealpha=0.85)
        buf = io.BytesIO()
        self._fig.savefig(buf, format="png", dpi=DPI)
        self.figures.append(Figure(name, title, buf.getvalue(), caption))

    @staticmethod
    def line(ax, xs: np.ndarray, ys: np.ndarray, **kw):
        """One curve, thinned to what the panel's pixels can show."""
        (artist,) = ax.plot(*decimate(xs, ys), **kw)
        return artist

    def _marks(self, ax, handles: dict, bad: bool) -> None:
        for i, run in enumerate(self.runs):
            for k, xs in enumerate(at_x(run, restart_steps(run), self.x)):
                artist = ax.axvline(
                    xs, color=self.color(i) if self.many else "0.45", lw=1.0, ls="--", alpha=0.8, zorder=1
                )
                if k == 0:
                    handles.setdefault("restart", artist)
            steps = bad_step_marks(run) if bad else []
            if steps:
                xs = at_x(run, steps, self.x)
                (pts,) = ax.plot(
                    xs,
                    [0.03] * len(xs),
                    "x",
                    color="crimson",
                    ms=6,
                    mew=1.5,
                    transform=ax.get_xaxis_transform(),
                    zorder=5,
                )
                handles.setdefault("skipped step(s)", pts)


def make_figures(runs: list[Run], x: str = "step", smooth_window: int | None = None) -> list[Figure]:
    """Every panel the runs have data for: loss, held-out bits per byte, per-source loss and
    mixture shares, learning rate, gradient norm, throughput, MFU, data wait, memory."""
    p = _Panels(runs, x)
    many = p.many

    def series(
        name: str,
        title: str,
        key: str,
        *,
        log_ratio: float = 0.0,
        from_zero: bool = False,
        smooth_it: bool = True,
        evals: bool = False,
        scale: float = 1.0,
        bad: bool = False,
        caption: str = "",
    ) -> None:
        if not any(finite(r.train, key)[0].size for r in runs) and not (evals and any(r.evals for r in runs)):
            return
        with p.panel(name, title, bad=bad, caption=caption) as (ax, handles):
            ally = []
            for i, run in enumerate(runs):
                color, style = p.color(i), run_style(i)
                tag = f"{run.label} " if many else ""
                idx, ys = finite(run.train, key)
                if len(idx):
                    xs = train_x(run, x)[idx]
                    ys = ys * scale
                    ally.append(ys)
                    w = _auto_window(len(ys), smooth_window) if smooth_it else 1
                    if w > 1:
                        p.line(
                            ax,
                            xs,
                            ys,
                            color=color,
                            alpha=0.25,
                            lw=0.8,
                            ls=style["ls"],
                            zorder=style["zorder"],
                        )
                        line = p.line(ax, xs, smooth(ys, w), color=color, **style)
                        handles.setdefault(
                            f"{tag}train (mean of {w})" if key == "loss" else f"{tag}mean of {w} records",
                            line,
                        )
                    else:
                        line = p.line(ax, xs, ys, color=color, **style)
                        if many or key == "loss":  # one run's only curve needs no legend entry
                            handles.setdefault(f"{tag}train" if key == "loss" else run.label, line)
                if evals and run.evals:
                    eidx, ey = finite(run.eval_table, key)
                    if len(eidx):
                        ally.append(ey * scale)
                        line = p.line(
                            ax,
                            at_x(run, run.eval_table.steps[eidx], x),
                            ey * scale,
                            color=color,
                            ls=":",
                            lw=1.0,
                            marker=EVAL_MARKERS[i % len(EVAL_MARKERS)],
                            ms=4,
                            mfc="none" if i else color,
                            zorder=style["zorder"] + 0.5,
                        )
                        handles.setdefault(f"{tag}eval", line)
            if ally and log_ratio and _log_helps(np.concatenate(ally), log_ratio):
                ax.set_yscale("log")
                p.title(ax, title + " (log scale)")
            elif from_zero and ally:
                top = max((float(np.nanmax(a)) for a in ally if np.isfinite(a).any()), default=1.0)
                ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)  # a flat line stays inside the frame
            if key == "lr":  # plain ticks (0.0025): an offset text would collide with the title
                from matplotlib.ticker import FuncFormatter

                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))

    series(
        "loss",
        "loss",
        "loss",
        log_ratio=3.0,
        evals=True,
        bad=True,
        caption="train: the loss of each log window (with a moving mean when there are many); "
        "eval: held-out loss",
    )
    if any(finite(r.eval_table, "bpb")[0].size for r in runs):
        with p.panel("bpb", "held-out bits per byte") as (ax, handles):
            for i, run in enumerate(runs):
                idx, ys = finite(run.eval_table, "bpb")
                if len(idx):
                    line = p.line(
                        ax,
                        at_x(run, run.eval_table.steps[idx], x),
                        ys,
                        color=p.color(i),
                        marker=EVAL_MARKERS[i % len(EVAL_MARKERS)],
                        ms=4,
                        **run_style(i),
                    )
                    handles.setdefault(run.label if many else "eval", line)
    for i, run in enumerate(runs):
        mx = mixture(run.train, run.evals)
        if not mx:
            continue
        suffix = f" — {run.label}" if many else ""
        xs_all = train_x(run, x)
        with p.panel(f"loss-per-source-{i}", "loss per source" + suffix) as (ax, handles):
            for j, n in enumerate(mx["names"]):
                c = p.color(j + 1)
                idx, ys = finite(run.train, "sources", n, "loss")
                if len(idx):
                    w = _auto_window(len(ys), smooth_window)
                    if w > 1:
                        p.line(ax, xs_all[idx], ys, color=c, alpha=0.25, lw=0.8)
                    line = p.line(ax, xs_all[idx], smooth(ys, w), color=c, lw=1.4)
                    handles.setdefault(f"{n} train", line)
                eidx, ey = finite(run.eval_table, "sources", n, "loss")
                if len(eidx):
                    exs = at_x(run, run.eval_table.steps[eidx], x)
                    line = p.line(ax, exs, ey, color=c, ls=":", marker="s", ms=4)
                    handles.setdefault(f"{n} eval", line)
        heading = "mixture: achieved share of tokens so far (dotted: target)" + suffix
        with p.panel(f"mixture-{i}", "mixture share" + suffix, heading=heading) as (ax, handles):
            for j, n in enumerate(mx["names"]):
                c = p.color(j + 1)
                idx, ys = finite(run.train, "sources", n, "share")
                if len(idx):
                    handles.setdefault(n, p.line(ax, xs_all[idx], ys, color=c, lw=1.4))
                tidx, ty = finite(run.train, "sources", n, "target_share")
                if len(tidx):
                    p.line(ax, xs_all[tidx], ty, color=c, lw=1.0, ls=":")
            ax.set_ylim(0, 1)
    series("lr", "learning rate", "lr", smooth_it=False)
    series("grad_norm", "gradient norm (before clipping)", "grad_norm", log_ratio=20.0, bad=True)
    series("tokens_per_s", "tokens / s (all processes)", "tokens_per_s", from_zero=True)
    if any(finite(r.train, "mfu")[0].size for r in runs):
        series("mfu", "MFU (%)", "mfu", from_zero=True, scale=100.0)
    series("data_wait", "time waiting for data (%)", "data_wait", from_zero=True, scale=100.0)
    series("memory_gib", "peak memory (GiB)", "memory_gib", from_zero=True, smooth_it=False)
    return p.figures
