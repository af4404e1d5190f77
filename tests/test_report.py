"""`flame report` (and the `flame plot` fixes): a page built from the run directory alone, whose
headline numbers equal the values computed by hand from metrics.jsonl and the checkpoints."""

import base64
import io
import json
import math
import random
import re
import shutil
import statistics
import subprocess
import time

import matplotlib.image as mpimg
import pytest
import torch
from conftest import final_weights, metrics, tiny_overrides

from flame.cli import main
from flame.config import load_config
from flame.errors import FlameError
from flame.trainer import run_training


def _records(run_dir):
    return metrics(run_dir)


def _stop_at(step):
    def cb(trainer):
        if trainer.step == step:
            trainer.stop_signal = "test"

    return cb


def _store(root, name, text_of):
    from flame.data.prepare import prepare

    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": text_of(i)}) + "\n" for i in range(40)))
    out = root / f"store-{name}"
    # routing hashes the (temporary) path: 0.3 of 40 documents leaves each held-out part several
    prepare([str(src)], "byte", str(out), workers=1, progress=False, val_fraction=0.3)
    return out


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """A two-store mixture with held-out sets, interval checkpoints, stopped at step 6 and resumed
    after a pause (a restart), evaluated every 4 steps."""
    root = tmp_path_factory.mktemp("report")
    rng = random.Random(0)
    hard = _store(root, "hard", lambda i: "".join(rng.choice("abcdefgh ") for _ in range(300)))
    easy = _store(root, "easy", lambda i: f"the cat sat on the mat {i}. " * 12)
    run_dir = root / "mixed"
    over = tiny_overrides(
        run_dir,
        root,
        **{
            "data.inputs": [],
            "data.mix": f"rand={hard}:0.3,text={easy}:0.7",
            "data.context_len": 32,
            "train.max_steps": 10,
            "eval.interval": 4,
            "eval.batches": 1,
            "checkpoint.interval": 5,
            "checkpoint.keep": 3,
        },
    )
    cfg = load_config(overrides=over)
    assert run_training(cfg, callbacks=[_stop_at(6)])["stopped"] == "preempted"
    time.sleep(0.6)  # the restart's downtime
    assert run_training(cfg)["stopped"] == "done"
    return run_dir


@pytest.mark.slow
def test_headline_equals_the_records(mixed_run, tmp_path):
    from flame.report import load_run, summarize

    recs = _records(mixed_run)
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 11)) and [r["step"] for r in evals] == [4, 8, 10]
    run = load_run(mixed_run)
    s = summarize(run)
    last, best = train[-1], min(evals, key=lambda r: r["loss"])
    assert s["step"] == 10 and s["total_steps"] == 10
    assert s["tokens"] == last["tokens"] == 10 * 4 * 32
    assert s["epoch"] == last["epoch"]
    assert s["train_loss"] == last["loss"]
    assert (s["eval_loss"], s["eval_bpb"], s["eval_step"]) == (evals[-1]["loss"], evals[-1]["bpb"], 10)
    assert (s["best_eval_loss"], s["best_eval_step"]) == (best["loss"], best["step"])
    assert s["best_eval_bpb"] == min(r["bpb"] for r in evals)
    assert s["training_time_s"] == last["elapsed_s"]
    starts = [json.loads(x) for x in (mixed_run / "starts.jsonl").read_text().splitlines()]
    assert [x["step"] for x in starts] == [0, 6]  # the trainer records every start
    assert s["wall_clock_s"] == last["time"] - starts[0]["time"]  # setup included
    assert s["median_tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in train)
    assert s["tokens_per_training_s"] == last["tokens"] / last["elapsed_s"]
    assert s["median_mfu"] is None  # CPU: no peak FLOP/s
    assert (s["flops_per_token"], s["flops_source"]) == (last["flops_per_token"], last["flops_source"])
    assert s["attention"] == last["attention"] == "sdpa"
    assert s["peak_memory_gib"] == max(r["memory_gib"] for r in train)
    assert s["median_data_wait"] == statistics.median(r["data_wait"] for r in train)
    assert s["bad_steps"] == 0
    w = final_weights(mixed_run)
    assert torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"])  # tied: one parameter
    unique = sum(t.numel() for t in w.values()) - w["lm_head.weight"].numel()
    assert s["parameters"] == starts[0]["parameters"] == unique
    # the restart: found from the records alone (the pause shows in time - elapsed_s)
    assert s["restarts"] == 1
    a, b = run.segments
    assert (a.first_step, a.last_step, b.first_step, b.last_step) == (1, 6, 7, 10)
    assert b.resume_step == 6 and b.lost_s >= 0.6 and a.world_size == b.world_size == 1
    # the mixture: target and achieved shares of the last record, per source
    mx = {x["name"]: x for x in s["mixture"]["sources"]}
    for name in ("rand", "text"):
        src = last["sources"][name]
        assert (mx[name]["share"], mx[name]["target_share"]) == (src["share"], src["target_share"])
        assert mx[name]["tokens_total"] == src["tokens_total"]
        assert mx[name]["eval_loss"] == evals[-1]["sources"][name]["loss"]
    assert [c["step"] for c in run.checkpoints] == [5, 6, 10]
    assert [c["state"]["tokens"] for c in run.checkpoints] == [5 * 128, 6 * 128, 10 * 128]


@pytest.mark.slow
def test_html_is_self_contained_and_shows_the_numbers(mixed_run, tmp_path, capsys):
    from flame.report import FIG_H, FIG_W, load_run, summarize

    out = tmp_path / "r.html"
    assert main(["report", str(mixed_run), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    s = summarize(load_run(mixed_run))
    for text in (
        f"{s['train_loss']:.4f}",
        f"{s['eval_loss']:.4f}",
        f"{s['eval_bpb']:.4f}",
        f"{s['best_eval_loss']:.4f} (step {s['best_eval_step']})",
        f"{s['parameters']:,}",
        f"{s['tokens']:,}",
        "1 restart(s)",
        "rand 30.00% target",
        "mixture source rand",
        "step-00000010",
    ):
        assert text in page, text
    # nothing is fetched: no external scripts, styles, images or fonts
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "<link" not in page and "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 8  # loss, bpb, per source, mixture, lr, grad norm, tokens/s, data wait, memory
    for data in images:
        img = mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert img.shape[:2] == (int(FIG_H * 100), int(FIG_W * 100))
        assert img[..., :3].std() > 0.05  # curves and text, not a blank canvas
    # the config as its difference from the defaults, and the whole of it folded
    assert "data.mix" in page and "<details>" in page and "train.max_steps" in page


@pytest.mark.slow
def test_markdown_report_with_pngs_beside_it(mixed_run, tmp_path):
    out = tmp_path / "paper" / "report.md"
    assert main(["report", str(mixed_run), "-o", str(out), "--x", "tokens", "--smooth", "3"]) == 0
    md = out.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links and all((out.parent / link).is_file() for link in links)
    assert "| final train loss |" in md and "## Checkpoints" in md


@pytest.mark.slow
def test_report_compares_runs(mixed_run, tmp_path):
    other = tmp_path / "again" / "mixed"
    shutil.copytree(mixed_run, other)
    out = tmp_path / "cmp.html"
    assert main(["report", str(mixed_run), str(other), "-o", str(out), "--title", "two runs"]) == 0
    page = out.read_text()
    assert "<title>two runs</title>" in page
    # labels are the shortest distinguishing path suffixes, one column each
    assert "<th>report0/mixed</th>" in page or re.search(r"<th>[^<]*mixed</th><th>again/mixed</th>", page)


def test_segments_from_start_records(tmp_path):
    """With the `start` records a trainer writes at each (re)start, restarts, world sizes and the
    parameter count come from them, also for a start that saved nothing before dying."""
    from flame.report import load_run, summarize

    run = tmp_path / "synthetic"
    run.mkdir()
    t0 = 1.7e9

    def train(step, elapsed, world=1, mem=1.0):
        return {
            "kind": "train",
            "step": step,
            "total_steps": 8,
            "loss": 5.0 - step * 0.1,
            "tokens": step * 100,
            "tokens_per_s": 1000.0 * world,
            "tokens_per_s_per_device": 1000.0,
            "elapsed_s": elapsed,
            "time": t0 + elapsed,
            "memory_gib": mem,
            "bad_steps": 1 if step >= 3 else 0,
        }

    recs = [
        {"kind": "start", "step": 0, "world_size": 1, "parameters": 1234, "time": t0, "elapsed_s": 0.0},
        train(1, 1.0),
        train(2, 2.0),
        train(3, 3.0),
        {"kind": "start", "step": 3, "world_size": 2, "parameters": 1234, "time": t0 + 50, "elapsed_s": 3.0},
        {"kind": "start", "step": 3, "world_size": 2, "parameters": 1234, "time": t0 + 90, "elapsed_s": 3.0},
    ]
    recs += [dict(train(s, 3.0 + s, world=2), time=t0 + 100 + s) for s in range(4, 9)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = load_run(run)
    assert [(s.resume_step, s.records, s.world_size) for s in r.segments] == [(0, 3, 1), (3, 0, 2), (3, 5, 2)]
    s = summarize(r)
    assert s["parameters"] == 1234 and s["parameters_from"] == "start record"
    assert s["restarts"] == 2 and sorted(set(s["world_sizes"])) == [1, 2]
    from flame.report import bad_step_marks

    assert bad_step_marks(r) == [3]
    # the same start records in a file of their own: put back where they happened, by time
    (run / "starts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs if x["kind"] == "start"))
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs if x["kind"] != "start"))
    r2 = load_run(run)
    assert [(x.resume_step, x.records, x.world_size) for x in r2.segments] == [
        (0, 3, 1),
        (3, 0, 2),
        (3, 5, 2),
    ]
    assert summarize(r2)["parameters"] == 1234
    (run / "starts.jsonl").unlink()
    # without start records: the same run's restarts from the time jump and the memory drop
    plain = [x for x in recs if x["kind"] != "start"]
    plain[3] = dict(plain[3], memory_gib=0.5, time=plain[2]["time"] + 1.0)  # no time jump, less memory
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in plain))
    segs = load_run(run).segments
    assert [(x.first_step, x.last_step) for x in segs] == [(1, 3), (4, 4), (5, 8)]
    assert segs[1].found_by.startswith("peak memory") and segs[2].found_by.startswith("time jump")


def test_smooth_and_thin_keep_what_matters():
    import numpy as np

    from flame.plot import smooth, thin

    y = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    assert smooth(y, 3).tolist() == [1.5, 2.0, 3.0, 107 / 3, 52.0]
    assert smooth(y, 1).tolist() == y.tolist()
    xs = np.arange(100_000, dtype=np.float64)
    ys = np.sin(xs / 1000)
    ys[54_321] = 50.0
    tx, ty = thin(xs, ys, 1000)
    assert len(tx) <= 1000 and ty.max() == 50.0 and ty.min() == ys.min() and np.all(np.diff(tx) > 0)


@pytest.mark.slow
def test_report_errors_are_clear(mixed_run, tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path / "fresh")]) == 1
    assert "holds no records yet" in capsys.readouterr().err
    assert main(["report", str(mixed_run), "-o", str(tmp_path / "r.pdf")]) == 1
    assert "end -o with .html or .md" in capsys.readouterr().err
    assert main(["report", str(mixed_run), "--smooth", "-2"]) == 1
    with pytest.raises(SystemExit) as e:
        main(["report", str(mixed_run), "--x", "time"])
    assert e.value.code == 2
    (tmp_path / "a-file").write_text("")
    assert main(["report", str(mixed_run), "-o", str(tmp_path / "a-file" / "r.html")]) == 1
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.slow
def test_plot_one_legend_log_y_smooth_and_throughput_from_zero(mixed_run, tmp_path):
    import matplotlib.pyplot as plt

    from flame.plot import metrics_figure, plot_runs

    other = tmp_path / "other"
    shutil.copytree(mixed_run, other)  # equal curves: the second must stay visible
    runs = [str(mixed_run), str(other)]
    fig = metrics_figure(runs, metrics=("loss", "lr", "tokens_per_s"), log_y=("loss",), smooth_window=3)
    try:
        assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert len(labels) == len(set(labels)) and "other train" in labels and "other eval" in labels
        loss_ax, _, tps_ax = fig.axes
        assert loss_ax.get_yscale() == "log" and tps_ax.get_ylim()[0] == 0
        first, second = (ln for ln in tps_ax.get_lines() if ln.get_alpha() is None)
        assert first.get_linestyle() == "-" and second.get_linestyle() != "-"  # dashed over solid
        assert second.get_zorder() > first.get_zorder()
    finally:
        plt.close(fig)
    with pytest.raises(FlameError, match="--log-y grad_norm"):
        plot_runs(runs, tmp_path / "x.png", log_y=("grad_norm",))
    assert main(["plot", *runs, "-o", str(tmp_path / "p.png"), "--log-y", "--smooth", "2"]) == 0


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_report_renders_in_a_browser(mixed_run, tmp_path):
    """Headless Chromium opens the page from disk: no console errors, every plot decoded at its size."""
    out = tmp_path / "r.html"
    assert main(["report", str(mixed_run), "-o", str(out)]) == 0
    probe = tmp_path / "probe.html"  # the report plus a script that lists what the browser decoded
    probe.write_text(
        out.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load',()=>{document.title='IMAGES '+JSON.stringify("
            "[...document.images].map(i=>[i.naturalWidth,i.naturalHeight,i.complete]))});</script></body>",
        )
    )
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(
        [*args, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    title = re.search(r"<title>IMAGES (.*?)</title>", dom.stdout)
    assert title, dom.stderr[-2000:]
    sizes = json.loads(title.group(1).replace("&quot;", '"'))
    assert len(sizes) >= 8 and all(s == [800, 320, True] for s in sizes)
    assert "CONSOLE" not in dom.stderr and "Uncaught" not in dom.stderr
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*args, "--hide-scrollbars", "--window-size=1400,2400", f"--screenshot={shot}", out.as_uri()],
        capture_output=True,
        timeout=120,
    )
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2400, 1400) and img[..., :3].std() > 0.1


def test_mixture_phases_from_the_records():
    """A re-weighted mixture: each run of records with the same target shares is a phase, and its
    achieved share is that phase's tokens (differences of tokens_total) over all of its tokens."""
    from flame.report import mixture

    def rec(step, web, code, w):
        src = {
            "web": {"tokens_total": web, "share": web / (web + code), "target_share": w, "loss": 2.0},
            "code": {"tokens_total": code, "share": code / (web + code), "target_share": 1 - w, "loss": 1.0},
        }
        return {"kind": "train", "step": step, "sources": src}

    train = [rec(1, 70, 30, 0.7), rec(2, 140, 60, 0.7), rec(3, 160, 140, 0.2), rec(4, 180, 220, 0.2)]
    mx = mixture(train, [])
    assert mx["names"] == ["web", "code"]
    first, second = mx["phases"]
    assert (first["first_step"], first["last_step"], second["first_step"], second["last_step"]) == (
        1,
        2,
        3,
        4,
    )
    assert first["achieved"] == (140 / 200, 60 / 200) and first["targets"] == (0.7, 0.3)
    assert second["tokens"] == (40, 160) and second["achieved"] == (40 / 200, 160 / 200)
    assert [x["share"] for x in mx["sources"]] == [180 / 400, 220 / 400]


def test_decimate_keeps_a_one_step_spike_and_the_extremes():
    """The figures draw thinned series; the one-step spike, the global minimum and maximum, and
    the first and last points are in them exactly."""
    import numpy as np

    from flame.report import PLOT_BUCKETS, decimate

    xs = np.arange(1, 100_001, dtype=np.float64)
    ys = 2 + 8 * np.exp(-xs / 5000) + np.sin(xs / 37) * 0.05
    ys[77_777] = 50.0  # one step's spike
    ys[12_345] = -3.0  # and one step's dip
    tx, ty = decimate(xs, ys)
    assert len(tx) <= 2 * PLOT_BUCKETS + 2 < len(xs)
    assert ty.max() == ys.max() == 50.0 and ty.min() == ys.min() == -3.0
    assert tx[ty.argmax()] == xs[77_777] and tx[ty.argmin()] == xs[12_345]
    assert (tx[0], ty[0], tx[-1], ty[-1]) == (xs[0], ys[0], xs[-1], ys[-1])
    assert np.all(np.diff(tx) > 0)  # x order kept, no point twice
    assert np.isin(tx, xs).all() and np.array_equal(ty, ys[(tx - 1).astype(int)])  # real points only
    short = np.arange(10.0)
    assert decimate(short, short)[0] is short  # short series are drawn whole


def _long_run(run, steps):
    """A metrics.jsonl the way the trainer writes one, long: a record per step with a two-source
    mixture re-weighted half way, NaN losses, null MFU, evals, two restarts (time jumps) and a
    line torn by a crash at the end."""
    rng = random.Random(7)
    run.mkdir(parents=True)
    t0, off, mem, lines = 1.7e9, 0.0, 20.0, []
    for s in range(1, steps + 1):
        mem = max(mem, 20 + rng.random())  # a process's peak memory never drops
        if s in (steps // 3, 2 * steps // 3):
            off += 120.0
        w = 0.7 if s <= steps // 2 else 0.4
        loss = float("nan") if s % 997 == 0 else 2 + 8 * math.exp(-s / 3000) + rng.gauss(0, 0.05)
        src = {
            n: {"loss": loss + d, "tokens_total": int(s * 1000 * sh), "share": sh, "target_share": sh}
            for n, sh, d in (("web", w, 0.1), ("code", round(1 - w, 10), -0.2))
        }
        lines.append(
            {
                "kind": "train",
                "step": s,
                "total_steps": steps,
                "loss": loss,
                "lr": 3e-4 * min(1, s / 500),
                "grad_norm": 0.5 + rng.random(),
                "tokens": s * 1000,
                "tokens_per_s": 30000 + rng.gauss(0, 500),
                "tokens_per_s_per_device": 30000.0,
                "mfu": None if s % 3 else 0.4 + rng.random() * 0.01,
                "memory_gib": mem,
                "data_wait": abs(rng.gauss(0.01, 0.005)),
                "elapsed_s": s * 0.5,
                "bad_steps": s // 5000,
                "sources": src,
                "time": t0 + s * 0.5 + off,
            }
        )
        if s % 500 == 0:
            lines.append(
                {"kind": "eval", "step": s, "loss": loss + rng.random(), "bpb": rng.random(), "time": t0 + s}
            )
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "step": 99999, "lo'
    (run / "metrics.jsonl").write_text(text)
    return lines


@pytest.mark.slow
def test_headline_of_a_long_run_equals_the_records(tmp_path, monkeypatch):
    """A long run (read into columns by pyarrow) has the headline computed by hand from every
    line of its metrics.jsonl, and the same one as json.loads line by line gives."""
    import flame.report.read as read
    from flame.report import bad_step_marks, load_run, summarize

    steps = 20_000
    recs = _long_run(tmp_path / "long", steps)
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    run = load_run(tmp_path / "long")
    assert run.reader == "pyarrow"  # the fast reader read it, the torn last line left out
    s = summarize(run)
    last = train[-1]
    assert (s["step"], s["tokens"], s["train_loss"]) == (steps, last["tokens"], last["loss"])
    assert s["median_tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in train)
    assert s["median_mfu"] == statistics.median(r["mfu"] for r in train if r["mfu"] is not None)
    assert s["median_data_wait"] == statistics.median(r["data_wait"] for r in train)
    assert s["peak_memory_gib"] == max(r["memory_gib"] for r in train)
    finite = [r for r in evals if not math.isnan(r["loss"])]
    best = min(finite, key=lambda r: r["loss"])
    assert (s["best_eval_loss"], s["best_eval_step"]) == (best["loss"], best["step"])
    assert s["best_eval_bpb"] == min(r["bpb"] for r in evals)
    assert (s["eval_loss"], s["eval_step"]) == (evals[-1]["loss"], steps)
    assert s["wall_clock_s"] == last["time"] - (train[0]["time"] - train[0]["elapsed_s"])
    assert s["restarts"] == 2
    assert [(g.first_step, g.last_step) for g in run.segments] == [
        (1, steps // 3 - 1),
        (steps // 3, 2 * steps // 3 - 1),
        (2 * steps // 3, steps),
    ]
    assert bad_step_marks(run) == [5000, 10_000, 15_000, 20_000]
    mx = s["mixture"]
    assert [x["share"] for x in mx["sources"]] == [last["sources"][n]["share"] for n in ("web", "code")]
    assert [x["train_loss"] for x in mx["sources"]] == [last["sources"][n]["loss"] for n in ("web", "code")]
    half = train[steps // 2 - 1]["sources"]
    first, second = mx["phases"]
    assert (first["first_step"], first["last_step"], second["first_step"]) == (1, steps // 2, steps // 2 + 1)
    assert first["tokens"] == (half["web"]["tokens_total"], half["code"]["tokens_total"])
    assert second["tokens"] == tuple(
        last["sources"][n]["tokens_total"] - half[n]["tokens_total"] for n in ("web", "code")
    )
    # json.loads line by line (the reader for files pyarrow cannot read): the same numbers
    monkeypatch.setattr(read, "_read_arrow", lambda path: None)
    slow = load_run(tmp_path / "long")
    assert slow.reader == "json"
    s2 = summarize(slow)
    assert json.dumps(s2, default=str) == json.dumps(s, default=str)
    assert [vars(g) for g in slow.segments] == [vars(g) for g in run.segments]
