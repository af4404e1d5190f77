"""`flame check --config run.toml [--steps N] [--stop-at K]`: does this setup resume exactly?

Trains the user's own setup (model, data, optimizer; only the length, the run directory and the
logging are changed) for N steps three ways, each in a fresh temporary run directory:

- uninterrupted (the reference);
- stopped at step K as by SIGTERM (a checkpoint is saved and the run exits), then resumed;
- killed with SIGKILL (kill -9) in a child process a few steps after an interval checkpoint,
  then resumed from that checkpoint (the steps after it are redone);
- with `--elastic`: stopped at step K on one process and resumed on two (torchrun).

Every step's loss and gradient norm, every micro-batch's sample ids and token hash
(`--log.batches`) and the final weights are compared with the reference. The verdict is
"bitwise identical", "close within X" (`--tolerance`) or "diverged at step S", with the causes
flame can see: a forward or backward pass that differs between two identical calls (unseeded
noise, state kept outside the checkpoint, non-deterministic kernels), dropout, loader workers,
streaming, compilation. Exit code 0 only when exact, or within the tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flame.config import Config, load_config
from flame.errors import FlameError
from flame.records import read_records

USAGE = """usage: flame check [--config FILE.toml] [--section.key VALUE ...] [options]

Proves that your setup resumes exactly: trains it N steps uninterrupted, stopped at step K and
resumed, and killed (-9) after a checkpoint and resumed, in temporary run directories, and compares
every step's loss and gradient norm, the sample ids of every batch and the final weights.

options:
  --steps N          steps of each training (default 12; at least 3)
  --stop-at K        the step of the stop (default N / 2)
  --tolerance X      accept relative differences up to X (default 0: bitwise only)
  --no-kill          skip the kill -9 run (it starts one more process)
  --elastic          also stop on one process and resume on two (torchrun; CPU or 2 GPUs)
  --work-dir DIR     keep the run directories in DIR (default: a temporary directory, removed)

Exit code 0 when every run is bitwise identical to the uninterrupted one (or within --tolerance),
1 when one diverged, 2 for a configuration error.
"""

# Across a change of process count the float sums run in another order: never bitwise.
ELASTIC_TOLERANCE = 1e-3
_OWN = {"--steps": int, "--stop-at": int, "--tolerance": float, "--work-dir": str}
_FLAGS = ("--no-kill", "--elastic")


@dataclass
class Options:
    steps: int = 12
    stop_at: int = 0
    tolerance: float = 0.0
    kill: bool = True
    elastic: bool = False
    work_dir: str = ""
    rest: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> Options:
    """flame check's own options; everything else is a `flame train` option."""
    o, rest, i = Options(), [], 0
    while i < len(argv):
        tok = argv[i]
        key, eq, val = tok.partition("=")
        if key in _OWN:
            if not eq:
                if i + 1 >= len(argv):
                    raise FlameError(f"{key} takes a value", hint="see `flame check --help`")
                val = argv[i + 1]
                i += 1
            try:
                setattr(o, key[2:].replace("-", "_"), _OWN[key](val))
            except ValueError:
                raise FlameError(f"{key} {val!r}: expected {_OWN[key].__name__}") from None
        elif tok in _FLAGS:
            if tok == "--no-kill":
                o.kill = False
            else:
                o.elastic = True
        else:
            rest.append(tok)
        i += 1
    o.rest = rest
    if o.steps < 3:
        raise FlameError(f"--steps {o.steps}: needs at least 3 (a stop strictly inside the run)")
    o.stop_at = o.stop_at or o.steps // 2
    if not 1 <= o.stop_at < o.steps:
        raise FlameError(f"--stop-at {o.stop_at}: choose a step in [1, {o.steps - 1}] (--steps {o.steps})")
    if not (math.isfinite(o.tolerance) and o.tolerance >= 0):
        raise FlameError(f"--tolerance {o.tolerance}: give a finite number >= 0")
    return o


def kill_plan(steps: int) -> tuple[int, int]:
    """(checkpoint interval, the step whose end kills the process): a few steps after the first
    interval checkpoint, so the resume redoes steps whose records were already written."""
    interval = max(1, steps // 3)
    return interval, min(steps - 1, interval + max(1, interval // 2))


def check_config(base: Config, run_dir: Path, steps: int, cache_dir: Path) -> Config:
    """The user's config, changed only where a check must: length, run directory, logging of every
    step and batch, no evaluation, no sample text, no external sinks, checkpoints only when asked."""
    cfg = copy.deepcopy(base)
    cfg.train.run_dir = str(run_dir)
    cfg.train.max_steps = steps
    cfg.train.sample_tokens = 0
    cfg.log.interval = 1
    cfg.log.batches = True
    cfg.log.console = "off"
    cfg.log.tensorboard = False
    cfg.log.wandb = "off"
    cfg.checkpoint.interval = 0
    cfg.checkpoint.keep = 1
    cfg.checkpoint.load = ""
    cfg.checkpoint.resume = True
    cfg.eval.interval = 0
    cfg.eval.at_start = False
    if not cfg.data.cache_dir:  # raw inputs are prepared once for every run of the check
        cfg.data.cache_dir = str(cache_dir)
    return cfg


# ---------------------------------------------------------------- running


def _quiet(log_path: Path):
    """The runs' console output (and warnings) go to the check's log file; the check prints its own
    lines, and a FlameError of a run still reaches the user as the check's error."""
    f = open(log_path, "a")  # noqa: SIM115 - closed by the ExitStack
    stack = contextlib.ExitStack()
    stack.enter_context(f)
    stack.enter_context(contextlib.redirect_stdout(f))
    stack.enter_context(contextlib.redirect_stderr(f))
    return stack


def _train(cfg: Config, log_path: Path, callbacks=None) -> dict:
    from flame.trainer import run_training

    with _quiet(log_path):
        return run_training(cfg, callbacks=callbacks)


def _stop_at(step: int):
    def cb(trainer) -> None:
        if trainer.step == step:
            trainer.stop_signal = "SIGTERM (flame check)"  # what the SIGTERM handler sets

    return cb


def _child_env(procs: int = 1) -> dict:
    """The environment of a child process: this one's, with this process's import path (a model
    named `module:function` must import there too) and its intra-op thread count."""
    paths = [p for p in sys.path if p] + [os.getcwd()]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # the thread count of the in-process reference: another one sums in another order
    import torch

    env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // procs))
    return env


def _killed_child(toml_path: str, kill_step: str) -> None:
    """In the child: train, and SIGKILL this process at the end of step `kill_step`."""
    from flame.trainer import run_training

    cfg = load_config(toml_path=toml_path)
    at = int(kill_step)

    def cb(trainer) -> None:
        if trainer.step == at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_training(cfg, callbacks=[cb])
    sys.exit(5)  # finished without being killed: the parent says so


def _run_child(cmd: list[str], log_path: Path, timeout: float = 3600, procs: int = 1) -> int:
    env = _child_env(procs)
    with open(log_path, "a") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    return p.returncode


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- what a run left


@dataclass
class Result:
    name: str
    run_dir: Path
    interrupted_at: int  # the last step before the interruption whose work survives
    seconds: float = 0.0
    note: str = ""
    steps: dict = field(default_factory=dict)  # step -> (loss, grad_norm)
    batches: dict = field(default_factory=dict)  # step -> [(rank, micro, samples, sha), ...]
    weights: dict | None = None


def read_result(res: Result) -> Result:
    for r in read_records(res.run_dir / "metrics.jsonl"):
        if r.get("kind") == "train" and isinstance(r.get("step"), int):
            res.steps[r["step"]] = (r.get("loss"), r.get("grad_norm"))
    for f in sorted((res.run_dir / "batches").glob("rank-*.jsonl")):
        rank = int(f.stem.split("-")[1])
        for r in read_records(f):
            res.batches.setdefault(r.get("step"), []).append(
                (rank, r.get("micro"), tuple(r.get("samples") or ()), r.get("sha"))
            )
    res.weights = final_weights(res.run_dir)
    return res


def final_weights(run_dir: Path) -> dict | None:
    """The model tensors of a run's latest checkpoint (None when it has none)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from flame.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        return None
    out = run_dir / "final-weights.pt"
    dcp_to_torch_save(str(found[-1] / "state"), str(out))
    state = torch.load(out, weights_only=True, map_location="cpu")
    out.unlink()
    return {k: v for k, v in state.get("model", {}).items() if torch.is_tensor(v)}


# ---------------------------------------------------------------- comparing


def _rel(a, b) -> float:
    if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return 0.0
    if not all(isinstance(v, (int, float)) for v in (a, b)) or not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


@dataclass
class Comparison:
    name: str
    status: str  # "identical", "close", "diverged"
    step: int | None = None  # the first step that differs (beyond the tolerance)
    what: str = ""
    max_rel: float = 0.0
    data_step: int | None = None  # the first step whose batches differ
    weights: str = ""
    interrupted_at: int = 0
    counts: str = ""


def compare(ref: Result, other: Result, tolerance: float, by_set: bool = False) -> Comparison:
    """`other` against the reference, step by step. `by_set` compares each step's samples as a
    set (another number of processes splits a step's samples differently)."""
    import torch

    c = Comparison(other.name, "identical", interrupted_at=other.interrupted_at)
    first_diff = None  # (step, text) of the first difference of any size
    steps = sorted(set(ref.steps) | set(other.steps))
    for s in steps:
        a, b = ref.steps.get(s), other.steps.get(s)
        if a is None or b is None:
            c.status, c.step = "diverged", s
            c.what = (
                f"step {s} is missing from the {'uninterrupted' if a is None else 'resumed'} run's records"
            )
            return c
        for name, x, y in (("loss", a[0], b[0]), ("grad norm", a[1], b[1])):
            r = _rel(x, y)
            c.max_rel = max(c.max_rel, r)
            if r and first_diff is None:
                first_diff = (s, f"{name} {x!r} vs {y!r} (relative difference {r:.2e})")
            if r > tolerance and c.step is None:
                c.step, c.what = s, f"{name} {x!r} vs {y!r} (relative difference {r:.2e})"
    for s in sorted(set(ref.batches) | set(other.batches)):
        a, b = ref.batches.get(s, []), other.batches.get(s, [])
        if by_set:
            same = sorted(x for e in a for x in e[2]) == sorted(x for e in b for x in e[2]) and (
                all(e[2] for e in a) or sorted(e[3] for e in a) == sorted(e[3] for e in b)
            )
        else:
            same = sorted(a) == sorted(b)
        if not same:
            c.data_step = s
            break
    if c.data_step is not None and (c.step is None or c.data_step <= c.step):
        c.step = c.data_step
        c.what = "the batches differ (other samples or other tokens than the uninterrupted run read)"
    wa, wb = ref.weights, other.weights
    worst, worst_name = 0.0, ""
    if wa is None or wb is None:
        c.weights = "no final checkpoint to compare"
    elif wa.keys() != wb.keys():
        c.weights = "the final checkpoints hold different tensors"
        worst = math.inf
    else:
        for k in wa:
            if not torch.equal(wa[k], wb[k]):
                d = (wa[k].double() - wb[k].double()).abs().max().item()
                scale = max(wa[k].double().abs().max().item(), 1e-30)
                if not d / scale <= worst:  # NaN counts as the worst
                    worst, worst_name = d / scale, k
        c.weights = (
            f"{len(wa)} tensors equal"
            if worst == 0
            else f"{worst_name} differs most (relative {worst:.2e} of its largest value)"
        )
    c.max_rel = max(c.max_rel, worst)
    nb = sum(len(v) for v in other.batches.values())
    c.counts = f"{len(steps)} steps' losses and gradient norms, {nb} batches, {c.weights}"
    if c.step is not None:
        c.status = "diverged"
    elif worst > tolerance:
        c.status, c.what = "diverged", f"the final weights differ: {c.weights}"
        c.step = max(steps) if steps else None
    elif c.max_rel > 0 or first_diff is not None:
        c.status = "close"
        if first_diff:
            c.what = f"first difference at step {first_diff[0]}: {first_diff[1]}"
    return c


# ---------------------------------------------------------------- why


def probe(cfg: Config) -> dict:
    """Two identical forward + backward passes of the model (same weights, inputs and seeded random
    state): whether the logits and the gradients are equal. Also what modules it has."""
    import torch

    from flame.data.build import resolve_tokenizer
    from flame.loss import model_logits, per_token_ce
    from flame.model import build_model, forward_params
    from flame.runsetup import seed_everything

    tok = resolve_tokenizer(cfg)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.context_len)
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if want_cuda else "cpu")
    model.to(device).train()
    accepts = forward_params(model)
    g = torch.Generator().manual_seed(0)
    T = max(2, min(cfg.data.context_len, 64))
    ids = torch.randint(0, tok.vocab_size, (2, T), generator=g).to(device)
    bf16 = device.type == "cuda" and cfg.train.dtype in ("auto", "bf16")
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(1234)
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            logits = model_logits(model, {"input_ids": ids}, accepts)
        per_token_ce(logits, ids).sum().backward()
        grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        outs.append((logits.detach().float().cpu(), [x.float().cpu() for x in grads]))
    (l1, g1), (l2, g2) = outs
    dropout = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and getattr(m, "p", 0) > 0
    ]
    conf = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if conf is not None and float(getattr(conf, key, 0) or 0) > 0:
            dropout.append(f"config.{key} = {getattr(conf, key)}")
    return {
        "forward_equal": torch.equal(l1, l2),
        "backward_equal": len(g1) == len(g2) and all(torch.equal(a, b) for a, b in zip(g1, g2)),
        "dropout": dropout,
        "device": device.type,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def likely_causes(cfg: Config, comparisons: list[Comparison], probed: dict | None) -> list[str]:
    """What flame can see that makes runs of this setup differ."""
    out = []
    diverged = [c for c in comparisons if c.status != "identical"]
    early = any(c.step is not None and c.step <= c.interrupted_at for c in diverged)
    data = any(c.data_step is not None for c in diverged)
    if probed is not None:
        if not probed["forward_equal"]:
            if early:
                out.append(
                    "the model's forward gives different logits for the same weights, inputs and seeded "
                    "random state: it draws random numbers that flame's seed does not fix (a torch.Generator "
                    "of its own, numpy or random without a seed, os.urandom, time), or runs a "
                    "non-deterministic kernel"
                )
            else:
                out.append(
                    "the model's forward gives different logits for the same weights, inputs and seeded "
                    "random state, and runs agree until the restart: the model keeps state that the "
                    "checkpoint does not hold (a Python attribute such as a call counter, a cache, a "
                    "generator of its own seeded once at build); keep it in a buffer (register_buffer) or "
                    "draw from torch's random state, which flame checkpoints"
                )
        elif not probed["backward_equal"]:
            fix = "torch.use_deterministic_algorithms(True)"
            if probed["device"] == "cuda":
                fix += " with CUBLAS_WORKSPACE_CONFIG=:4096:8"
            out.append(
                "two identical backward passes give different gradients: a non-deterministic kernel "
                "(atomic adds: scatter / index_add, embedding backward on CUDA, some fused attention "
                f"backward kernels, Triton kernels with atomics); try {fix}"
            )
        if probed["dropout"]:
            out.append(
                "the model uses dropout (" + ", ".join(probed["dropout"][:4]) + "): flame seeds it and "
                "checkpoints torch's (and CUDA's) random state, so it resumes exactly unless it draws from a "
                "generator of its own"
            )
        if probed["device"] == "cuda" and not probed["deterministic"] and probed["backward_equal"]:
            out.append(
                "CUDA kernels may pick algorithms by the data's layout or by timing (cuBLAS workspaces, "
                "cuDNN benchmark); torch.use_deterministic_algorithms(True) rules that out"
            )
    if data:
        if cfg.data.streaming:
            out.append(
                "streaming data: a resume re-reads the current window from its recorded start; batches that "
                "differ point at inputs that changed or a reader that is not deterministic"
            )
        if cfg.data.num_workers:
            out.append(
                f"data.num_workers = {cfg.data.num_workers}: try 0 to see whether the loader workers change "
                "the batches"
            )
        if not cfg.data.streaming and not cfg.data.num_workers:
            out.append(
                "the batches differ although the data order is arithmetic: a store changed between runs?"
            )
    if cfg.train.compile:
        out.append(
            "train.compile: compiled kernels can be chosen by autotuning, differently in another process"
        )
    if diverged and not data and not cfg.train.deterministic:
        out.append(
            "the same batches but other sums: a kernel that adds in an order that varies from call to "
            "call (a mixture of experts' expert loop with index_add, as gpt_oss's; scatter and atomics "
            "on CUDA) can differ by an ulp even when two probe passes agree; try --train.deterministic true"
        )
    if not out and diverged:
        out.append(
            "nothing flame can see; compare the runs' metrics.jsonl and batches/ with --work-dir to find "
            "what changes at that step"
        )
    return out


# ---------------------------------------------------------------- the command


def _say(msg: str) -> None:
    print(msg, flush=True)


def _describe(c: Comparison, tolerance: float) -> str:
    if c.status == "identical":
        return f"bitwise identical ({c.counts})"
    if c.status == "close":
        return f"close within {tolerance:g} (largest relative difference {c.max_rel:.2e}; {c.what})"
    if c.step is not None and c.step <= c.interrupted_at:
        when = (
            f"before the interruption at step {c.interrupted_at}: two runs of this setup already differ, "
            "so the training itself is not reproducible"
        )
    else:
        when = f"after the resume from step {c.interrupted_at}"
    return f"diverged at step {c.step} ({when}): {c.what}"


def run_check(o: Options) -> int:
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise FlameError(
            "run flame check as one process (not under torchrun)",
            hint="--elastic adds a resume on two processes by itself",
        )
    base = load_config(o.rest)
    keep = bool(o.work_dir)
    root = Path(o.work_dir) if keep else Path(tempfile.mkdtemp(prefix="flame-check-"))
    if keep:
        root.mkdir(parents=True, exist_ok=True)
        stale = [
            p.name for p in root.iterdir() if p.name in ("uninterrupted", "stopped", "killed", "elastic")
        ]
        if stale:
            raise FlameError(
                f"--work-dir {root} already holds runs of a check ({', '.join(stale)})",
                hint="give an empty or new directory",
            )
    cache = root / "data"
    log = root / "check.log"
    n, k = o.steps, o.stop_at
    t_all = time.perf_counter()
    _say(
        f"flame check: {n} steps of {base.model.name}, stop at step {k}"
        + (", kill -9 after a checkpoint" if o.kill else "")
        + (", resume on 2 processes" if o.elastic else "")
        + f"; runs in {root}"
        + ("" if keep else " (removed afterwards; --work-dir keeps them)")
    )
    try:
        results = []
        t0 = time.perf_counter()
        a_cfg = check_config(base, root / "uninterrupted", n, cache)
        r = _train(a_cfg, log)
        if r.get("stopped") != "done":
            raise FlameError(
                f"the uninterrupted run stopped early ({r.get('stopped')}) at step {r.get('step')}",
                hint=f"its output: {log}" if keep else "rerun with --work-dir DIR to keep its output",
            )
        ref = read_result(Result("uninterrupted", root / "uninterrupted", n, time.perf_counter() - t0))
        _say(f"  uninterrupted: {n} steps in {ref.seconds:.1f}s")

        t0 = time.perf_counter()
        b_cfg = check_config(base, root / "stopped", n, cache)
        r = _train(b_cfg, log, callbacks=[_stop_at(k)])
        if r.get("stopped") != "preempted" or r.get("step") != k:
            raise FlameError(
                f"the run to be stopped at step {k} ended with {r.get('stopped')} at step {r.get('step')}"
            )
        if o.elastic:
            shutil.copytree(root / "stopped", root / "elastic", ignore=shutil.ignore_patterns(".lock"))
        _train(b_cfg, log)
        res = read_result(
            Result(
                f"stopped at step {k} (as by SIGTERM), resumed", root / "stopped", k, time.perf_counter() - t0
            )
        )
        results.append(res)
        _say(f"  {res.name}: {time.perf_counter() - t0:.1f}s")

        if o.kill:
            t0 = time.perf_counter()
            interval, kill_at = kill_plan(n)
            c_cfg = check_config(base, root / "killed", n, cache)
            c_cfg.checkpoint.interval = interval
            (root / "killed").mkdir(parents=True, exist_ok=True)
            toml = root / "killed.toml"
            toml.write_text(c_cfg.to_toml())
            code = _run_child(
                [
                    sys.executable,
                    "-c",
                    "import sys; from flame.check import _killed_child; _killed_child(*sys.argv[1:])",
                    str(toml),
                    str(kill_at),
                ],
                log,
            )
            if code != -signal.SIGKILL:
                raise FlameError(
                    f"the run to be killed at step {kill_at} exited with code {code} instead",
                    hint="its output:\n" + _tail(log),
                )
            _train(c_cfg, log)
            saved = interval * (kill_at // interval)
            res = read_result(
                Result(
                    f"killed (-9) at step {kill_at} after the checkpoint of step {saved}, resumed",
                    root / "killed",
                    saved,
                    time.perf_counter() - t0,
                )
            )
            results.append(res)
            _say(f"  {res.name}: {res.seconds:.1f}s")

        elastic = None
        if o.elastic:
            t0 = time.perf_counter()
            elastic = _elastic(base, root, n, k, cache, log)
            _say(f"  {elastic.name}: {elastic.seconds:.1f}s")

        main = [compare(ref, res, o.tolerance) for res in results]
        el_tol = max(o.tolerance, ELASTIC_TOLERANCE)
        el = compare(ref, elastic, el_tol, by_set=True) if elastic is not None else None
        _say("compared with the uninterrupted run:")
        for c in main:
            _say(f"  {c.name}: {_describe(c, o.tolerance)}")
        if el is not None:
            _say(f"  {el.name}: {_describe(el, el_tol)}")
        bad = [c for c in [*main, el] if c is not None and c.status == "diverged"]
        probed = None
        if any(c.status != "identical" for c in main):
            try:
                with _quiet(log):
                    probed = probe(copy.deepcopy(a_cfg))
            except Exception as e:  # the probe is a diagnosis; its failure must not hide the verdict
                _say(f"  (could not probe the model: {type(e).__name__}: {e})")
        if bad:
            first = min(bad, key=lambda c: c.step if c.step is not None else 1 << 62)
            _say(f"verdict: diverged at step {first.step} ({first.name})")
        else:
            exact = all(c.status == "identical" for c in main)
            text = "bitwise identical" if exact else f"close within {o.tolerance:g}"
            if el is not None:
                text += (
                    "; on 2 processes bitwise identical"
                    if el.status == "identical"
                    else f"; on 2 processes the same samples and close within {el_tol:g} (sums in another order)"
                )
            _say(f"verdict: {text}" + (": this setup resumes exactly" if exact else ""))
        shown = [c for c in main if c.status != "identical"] + ([el] if el in bad else [])
        if shown:
            _say("likely causes:")
            for cause in likely_causes(a_cfg, shown, probed):
                _say(f"  - {cause}")
        _say(f"({time.perf_counter() - t_all:.0f}s" + (f"; runs kept in {root})" if keep else ")"))
        return 1 if bad else 0
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _elastic(base: Config, root: Path, n: int, k: int, cache: Path, log: Path) -> Result:
    """The run stopped at step k on one process (a copy of it), resumed on two with torchrun."""
    import torch

    cfg = check_config(base, root / "elastic", n, cache)
    if cfg.data.streaming:
        raise FlameError("--elastic: a streaming run resumes only on the same number of processes")
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if want_cuda and torch.cuda.device_count() < 2:
        raise FlameError("--elastic needs two GPUs (or --train.device cpu)")
    b, g = cfg.data.batch_size, cfg.train.grad_accum
    if g % 2:
        if b % 2:
            raise FlameError(
                f"--elastic: a global batch of {b} x {g} samples cannot be split over 2 processes",
                hint="use an even data.batch_size or train.grad_accum",
            )
        cfg.data.batch_size = b // 2  # flame then keeps the global batch with grad_accum g
    toml = root / "elastic.toml"
    toml.write_text(cfg.to_toml())
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "flame",
        "train",
        "--config",
        str(toml),
    ]
    code = _run_child(cmd, log, procs=2)  # compared within a tolerance: threads may differ
    if code != 0:
        raise FlameError(
            f"--elastic: the resume on 2 processes failed (exit code {code})",
            hint="its output:\n" + _tail(log),
        )
    return read_result(
        Result(
            f"stopped on 1 process at step {k}, resumed on 2", root / "elastic", k, time.perf_counter() - t0
        )
    )


def cli(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    return run_check(parse_args(argv))


__all__ = ["cli", "run_check", "compare", "probe", "likely_causes", "parse_args"]
