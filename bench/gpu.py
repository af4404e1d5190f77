"""The GPU check: what flame does on CUDA, checked in one command (at most 8 minutes on one H100).

    python bench/gpu.py                 # every check on CUDA (refuses to start without CUDA)
    python bench/gpu.py --dry           # the same code paths on CPU, tiny sizes, well under a minute
    python bench/gpu.py --only mfu      # the checks whose name contains a word (repeatable)
    python bench/gpu.py --batch 8       # micro-batch of the ~1B MFU row (default 4; 125M: 2x it)
    python bench/gpu.py --out FILE      # the report there instead of bench/out/

Each check returns one row: check, result (pass / FAIL / skipped), what was measured, the
criterion, seconds. One markdown table is printed (and kept as bench/out/gpu.md, or gpu-dry.md);
the exit status is 1 when a row FAILs. The machine's own torch is used; nothing is downloaded
(flame runs train on its embedded default corpus, the standard library's sources; the other
checks and the bare loop use random token batches).

Checks:
- bf16 autocast vs fp32: the same model and batch, flame's loss (fused head + cross-entropy) with
  and without bf16 autocast; the losses and the gradients' direction must agree.
- fused loss vs logits: flame's fused cross-entropy against F.cross_entropy of the model's own
  logits, fp32 and bf16, losses and gradients.
- fused AdamW vs unfused: flame's optimizer (`optim.fused` true / false), the same gradients,
  five steps; the weights must agree within a few fp32 roundings (and `auto` must be fused on
  CUDA only).
- train.compile: a short flame run with `train.compile` against the same run without.
- FSDP2, one process: the same run with `parallel.strategy fsdp` (a one-process group:
  nccl on CUDA, gloo on CPU), against strategy none.
- varlen isolation, per attention implementation (sdpa, flash_attention_2, flex_attention): three
  documents packed in one row, each one's logits against the document alone (flame.model's
  check_varlen gate, then its probe on the device for the figure).
- fla kernels (when flash-linear-attention is installed, CUDA): a GLA model trained through flame
  with `data.varlen` (its build runs flame's isolation check on the Triton kernels).
- MFU, llama ~125M and ~1B at context 2048, bf16: flame's tokens/s and logged MFU beside a bare
  PyTorch loop of the same transformers model on the same batch size (model(ids).logits ->
  F.cross_entropy, clipping, fused AdamW, bf16 autocast). On CUDA flame must reach 0.9x the
  bare loop's tokens/s. In --dry the sizes are tiny and the figures only exercise the code.

Runs skip their final checkpoint (a ~1B model's would cost more than its measured steps); nothing
else of flame's loop is changed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import emit, machine, md_table

PASS, FAIL, SKIP = "pass", "FAIL", "skipped"
BUDGET_S = 480  # the CUDA run's whole time on one H100


@dataclass
class Row:
    check: str
    result: str
    measured: str
    criterion: str
    seconds: float = 0.0

    def cells(self) -> list[str]:
        cells = [self.check, self.result, self.measured, self.criterion, f"{self.seconds:.1f}"]
        return [c.replace("|", "/") for c in cells]  # a bar would split a markdown cell


class Skip(Exception):
    """A check that cannot run here: its row says why."""


@dataclass
class Ctx:
    """What every check gets: the device, the mode and its sizes, a scratch folder."""

    dry: bool
    root: Path
    batch: int = 0  # micro-batch of the ~1B MFU row (0 = the default)
    steps: int = 0  # measured steps per MFU side (0 = the default)
    notes: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # the baseline run, the peak: computed once

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry else "cuda")

    @property
    def cuda(self) -> bool:
        return not self.dry

    # the small model of the correctness checks
    @property
    def small(self) -> dict:
        if self.dry:
            return llama(64, 176, 2, 2)
        return llama(512, 1408, 4, 8)

    @property
    def small_ctx(self) -> int:
        return 64 if self.dry else 512

    @property
    def small_vocab(self) -> int:
        return 512 if self.dry else 32000

    @property
    def small_batch(self) -> int:
        return 4 if self.dry else 8

    @property
    def run_steps(self) -> int:
        return 4 if self.dry else 10


def llama(hidden: int, inter: int, layers: int, heads: int, kv: int = 0) -> dict:
    return dict(
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv or heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def model_json(ctx: Ctx, name: str, config: dict) -> str:
    path = ctx.root / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


# ---------------------------------------------------------------- helpers


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def build(
    ctx: Ctx, config: dict, vocab: int, context: int, attn: str = "auto", name: str = "small", device=None
):
    """The model flame builds for this config (fp32, on the CPU), moved to the check's device."""
    from flame.config import load_config
    from flame.model import build_model

    cfg = load_config(
        overrides={
            "model.name": model_json(ctx, name, config),
            "model.vocab_size": vocab,
            "model.attn_implementation": attn,
        }
    )
    return build_model(cfg.model, vocab, context).to(device or ctx.device), cfg


def random_batch(vocab: int, batch: int, context: int, device, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, context), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def flame_loss(model, vocab: int, mode: str = "fused"):
    """flame's loss of a micro-batch for this model (flame.head.token_loss of head_verdict)."""
    from flame.head import head_verdict, token_loss
    from flame.model import forward_params

    accepts = forward_params(model)
    loss = token_loss(model, head_verdict(model, mode, accepts, vocab))
    return lambda batch: loss(model, batch, accepts)[0]  # the summed token loss


def loss_and_grads(model, fn, batch, autocast: bool) -> tuple[float, dict]:
    """(mean token loss, {name: fp32 gradient}) of one forward and backward."""
    import torch

    model.zero_grad(set_to_none=True)
    dev = batch["input_ids"].device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        total = fn(batch)
    targets = batch["input_ids"][:, 1:].numel()
    (total / targets).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(total.detach()) / targets, grads


def grad_agreement(a: dict, b: dict) -> tuple[float, float]:
    """(cosine of the two gradients as one vector, largest per-tensor |a - b| / max |b|)."""
    dot = sum(float((a[k] * b[k]).sum()) for k in b)
    na = math.sqrt(sum(float(a[k].square().sum()) for k in b))
    nb = math.sqrt(sum(float(b[k].square().sum()) for k in b))
    worst = max(float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 1e-30) for k in b)
    return dot / max(na * nb, 1e-30), worst


class _NoFinalSave:
    """Trainer.save, skipped: the checkpoint is not what these runs check (a 1B one costs more
    than its measured steps)."""

    def save(self, background: bool = False):
        return self.run_dir


def flame_run(ctx: Ctx, name: str, over: dict, config: dict | None = None) -> dict:
    """Train through flame's Trainer (setup, train, close, as run_training does); returns the run's
    train records and what the trainer decided (strategy, loss path, FLOPs per token)."""
    from flame import parallel
    from flame.config import load_config
    from flame.trainer import Trainer

    class _Trainer(_NoFinalSave, Trainer):
        pass

    run_dir = ctx.root / f"run-{name}"
    base = {
        "train.run_dir": str(run_dir),
        "train.device": ctx.device.type,
        "train.sample_tokens": 0,
        "train.max_steps": ctx.run_steps,
        "optim.warmup_steps": 2,
        "log.interval": 1,
        "log.console": "off",
        "checkpoint.interval": 0,
        "data.cache_dir": str(ctx.root / "cache"),
        "data.context_len": ctx.small_ctx,
        "data.batch_size": ctx.small_batch,
    }
    if config is not None:
        base["model.name"] = model_json(ctx, name, config)
    cfg = load_config(overrides={**base, **over})
    out = io.StringIO()
    t0 = time.perf_counter()
    trainer = _Trainer(cfg)
    try:
        with contextlib.redirect_stdout(out):
            try:
                trainer.setup()
                result = trainer.train()
            finally:
                trainer.close()
        parallel.shutdown(trainer.world)
    except BaseException:
        sys.stderr.write(f"--- flame run {name}: its output ---\n{out.getvalue()[-4000:]}\n")
        if torch_dist_initialized():
            import torch.distributed as dist

            dist.destroy_process_group()
        raise
    info = dict(
        result=result,
        strategy=trainer.strategy,
        attention=trainer.attention,
        fused_loss=trainer.loss.fused,
        flops_per_token=trainer.flops_per_token,
        flops_source=trainer.flops_source,
        peak=trainer.peak_flops,
        params=trainer.n_params,
        seconds=time.perf_counter() - t0,
        log=out.getvalue(),
    )
    del trainer
    _free()
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    info["train"] = [r for r in recs if r.get("kind") == "train"]
    return info


def torch_dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def losses(run: dict) -> list[float]:
    return [r["loss"] for r in run["train"]]


# ---------------------------------------------------------------- checks


def check_bf16_loss(ctx: Ctx) -> Row:
    tol_loss, tol_cos = 1e-2, 0.99
    crit = f"rel. loss diff <= {tol_loss:g}; gradient cosine >= {tol_cos}"
    vocab = ctx.small_vocab
    model, _ = build(ctx, ctx.small, vocab, ctx.small_ctx)
    fn = flame_loss(model, vocab)
    batch = random_batch(vocab, ctx.small_batch, ctx.small_ctx, ctx.device)
    l32, g32 = loss_and_grads(model, fn, batch, autocast=False)
    l16, g16 = loss_and_grads(model, fn, batch, autocast=True)
    d = rel(l16, l32)
    cos, _ = grad_agreement(g16, g32)
    ok = d <= tol_loss and cos >= tol_cos and math.isfinite(l16)
    return Row(
        "bf16 autocast loss vs fp32 (same batch)",
        PASS if ok else FAIL,
        f"fp32 {l32:.5f}, bf16 {l16:.5f} (rel {d:.2g}); grad cos {cos:.5f}",
        crit,
    )


def check_fused_loss(ctx: Ctx) -> Row:
    import torch.nn.functional as F

    vocab = ctx.small_vocab
    model, _ = build(ctx, ctx.small, vocab, ctx.small_ctx)
    fused = flame_loss(model, vocab, "fused")

    def logits_ce(batch):
        logits = model(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten(), reduction="sum"
        )

    batch = random_batch(vocab, ctx.small_batch, ctx.small_ctx, ctx.device, seed=1)
    parts, ok = [], True
    for ac in (False, True):
        lf, gf = loss_and_grads(model, fused, batch, autocast=ac)
        lr, gr = loss_and_grads(model, logits_ce, batch, autocast=ac)
        d = rel(lf, lr)
        cos, worst = grad_agreement(gf, gr)
        if ac:  # bf16: both paths round the logits to bf16, in other orders
            ok = ok and d <= 1e-2 and cos >= 0.999
            parts.append(f"bf16: loss rel {d:.2g}, grad cos {cos:.6f}")
        else:
            ok = ok and d <= 1e-5 and worst <= 1e-4
            parts.append(f"fp32: loss rel {d:.2g}, grad diff {worst:.2g}")
    return Row(
        "fused loss (flame.head.fused_ce) vs F.cross_entropy of logits",
        PASS if ok else FAIL,
        "; ".join(parts),
        "fp32: loss <= 1e-5 (rel.), grad diff <= 1e-4 of the tensor's largest; bf16: loss <= 1e-2, grad cos >= 0.999",
    )


def check_fused_adamw(ctx: Ctx) -> Row:
    import copy

    import torch

    from flame.config import OptimConfig
    from flame.optim import build_optimizer

    vocab = ctx.small_vocab
    model, _ = build(ctx, ctx.small, vocab, ctx.small_ctx)
    _, grads = loss_and_grads(
        model, flame_loss(model, vocab), random_batch(vocab, 2, ctx.small_ctx, ctx.device), False
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps, tol = 5, 16
    out = {}
    for fused in ("true", "false"):
        m = copy.deepcopy(model)
        with contextlib.redirect_stdout(io.StringIO()):  # its one-line summary of the groups, if any
            opt = build_optimizer(m, OptimConfig(lr=1e-3, fused=fused), ctx.device)
        for _ in range(steps):
            for n, p in m.named_parameters():
                p.grad = grads[n].to(p.dtype).clone()
            opt.step()
        got = bool(opt.defaults.get("fused"))
        out[fused] = ({n: p.detach().clone() for n, p in m.named_parameters()}, got)
        del m, opt
    (pf, fused_on), (pu, unfused_off) = out["true"], out["false"]
    # the largest difference, in fp32 spacings of the element (its value plus its update: a norm's
    # weight near 1 moves by ~1e-3 a step, and one rounding of it is 1.2e-7)
    ulp = torch.finfo(torch.float32).eps
    worst = max(
        float(((pf[n] - pu[n]).abs() / (ulp * (pu[n].abs() + (pu[n] - start[n]).abs()) + 1e-30)).max())
        for n in pu
    )
    # optim.fused = auto (the default): fused on CUDA, not on a CPU
    with contextlib.redirect_stdout(io.StringIO()):
        auto = bool(build_optimizer(model, OptimConfig(), ctx.device).defaults.get("fused"))
    ok = worst <= tol and fused_on and not unfused_off and auto == ctx.cuda
    return Row(
        "fused AdamW = unfused (flame.optim, same grads)",
        PASS if ok else FAIL,
        f"{steps} steps: largest param diff {worst:.1f} ulp; default (auto) "
        f"{'fused' if auto else 'unfused'} on {ctx.device.type}"
        + ("" if fused_on else "; the fused optimizer was not fused"),
        f"<= {tol} ulp (fp32, of each element's value + update); auto = fused on CUDA only",
    )


def _baseline(ctx: Ctx) -> dict:
    """The plain flame run the compile and FSDP checks compare with (run once, kept)."""
    if "baseline" not in ctx.cache:
        ctx.cache["baseline"] = flame_run(ctx, "baseline", {}, ctx.small)
    return ctx.cache["baseline"]


def _same_losses(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return math.inf
    return max(rel(x, y) for x, y in zip(a, b))


def _ms(run: dict, skip: int = 2) -> float:
    recs = run["train"][skip:] or run["train"][-1:]
    tps = statistics.median(r["tokens_per_s"] for r in recs)
    tokens = recs[-1]["tokens"] / recs[-1]["step"]
    return 1000 * tokens / tps


def check_compile(ctx: Ctx) -> Row:
    base = _baseline(ctx)
    run = flame_run(ctx, "compile", {"train.compile": True}, ctx.small)
    tol = 1e-4 if ctx.dry else 2e-2
    d = _same_losses(losses(run), losses(base))
    first = run["train"][0]["tokens"] / run["train"][0]["tokens_per_s"]
    ok = d <= tol and all(math.isfinite(x) for x in losses(run))
    return Row(
        "train.compile (flame run, per-block torch.compile)",
        PASS if ok else FAIL,
        f"{len(losses(run))} steps: max rel loss diff {d:.2g}; first step {first:.1f}s; "
        f"{_ms(run):.1f} vs {_ms(base):.1f} ms/step uncompiled",
        f"every step's loss within {tol:g} (rel.) of the uncompiled run",
    )


def check_fsdp(ctx: Ctx) -> Row:
    base = _baseline(ctx)
    run = flame_run(ctx, "fsdp", {"parallel.strategy": "fsdp"}, ctx.small)
    # on CUDA FSDP2 gathers bf16 parameters (everything bf16) where autocast keeps fp32 weights
    tol = 1e-5 if ctx.dry else 3e-2
    d = _same_losses(losses(run), losses(base))
    ok = run["strategy"] == "fsdp" and d <= tol
    backend = "nccl" if ctx.cuda else "gloo"
    return Row(
        "FSDP2, 1 process",
        PASS if ok else FAIL,
        f"{backend}, strategy {run['strategy']}; {len(losses(run))} steps: max rel loss diff {d:.2g}; "
        f"{_ms(run):.1f} vs {_ms(base):.1f} ms/step unsharded",
        f"strategy fsdp; every step's loss within {tol:g} (rel.) of strategy none",
    )


def _varlen(ctx: Ctx, impl: str, why_skip: str | None) -> Row:
    from flame.model import _probe, check_varlen, forward_params

    label = f"varlen isolation, {impl}"
    tol = 1e-2 if ctx.cuda else 1e-5
    crit = f"packed vs alone: logits within {tol:g} of their scale ({ctx.device.type})"
    if why_skip:
        raise Skip(why_skip)
    vocab = ctx.small_vocab
    # built on the CPU as flame builds it; flame's own gate first (it raises on a leak), then the
    # probe on the check's device for the measured figure
    model, _ = build(ctx, ctx.small, vocab, ctx.small_ctx, attn=impl, name=f"varlen-{impl}", device="cpu")
    check_varlen(model, vocab, label=f"llama ({impl})")
    accepts = forward_params(model)
    diff = _probe(model, ctx.device.type, impl, False, None, accepts, vocab)
    return Row(label, PASS if diff <= tol else FAIL, f"max diff {diff:.2g} of the logits' scale", crit)


def check_sdpa(ctx: Ctx) -> Row:
    return _varlen(ctx, "sdpa", None)


def check_flash(ctx: Ctx) -> Row:
    why = None
    if not ctx.cuda:
        why = "needs CUDA"
    elif importlib.util.find_spec("flash_attn") is None:
        why = "flash_attn is not installed"
    return _varlen(ctx, "flash_attention_2", why)


def check_flex(ctx: Ctx) -> Row:
    why = "needs CUDA (on CPU its kernels compile for ~40 s)" if not ctx.cuda else None
    return _varlen(ctx, "flex_attention", why)


def check_fla(ctx: Ctx) -> Row:
    if not ctx.cuda:
        raise Skip("needs CUDA (fla's kernels are Triton)")
    if importlib.util.find_spec("fla") is None:
        raise Skip("flash-linear-attention (fla) is not installed")
    gla = dict(  # configs/models/gla-340m.json, scaled down
        model_type="gla",
        hidden_size=512,
        num_hidden_layers=4,
        num_heads=4,
        expand_k=0.5,
        expand_v=1,
        hidden_ratio=4,
        attn_mode="chunk",
        use_short_conv=False,
        tie_word_embeddings=False,
        fuse_cross_entropy=False,
    )
    run = flame_run(
        ctx,
        "fla",
        {"model.import_modules": ["fla"], "data.varlen": True, "model.vocab_size": 32000},
        gla,
    )
    ls = losses(run)
    ok = all(math.isfinite(x) for x in ls) and ls[-1] < ls[0]
    return Row(
        "fla kernels: GLA through flame (varlen)",
        PASS if ok else FAIL,
        f"varlen isolation checked at build; loss {ls[0]:.3f} -> {ls[-1]:.3f} in {len(ls)} steps; "
        f"loss {'fused' if run['fused_loss'] else 'from logits'}; {_ms(run):.1f} ms/step",
        "builds (flame's varlen probe on CUDA), finite loss that falls",
    )


# ---- MFU: flame beside a bare PyTorch loop


def _peak(ctx: Ctx) -> float:
    from flame.logging import device_peak_flops

    if "peak" not in ctx.cache:
        peak = device_peak_flops(ctx.device)
        if peak is None:  # a CPU, or a GPU flame has no figure for: measured here
            peak = matmul_peak(ctx)
            what = "fp32 matmul, CPU" if ctx.dry else "bf16 matmul (no datasheet figure for this GPU)"
            ctx.notes.append(f"peak FLOP/s measured here ({what}): {peak:.3g}")
        ctx.cache["peak"] = peak
    return ctx.cache["peak"]


def matmul_peak(ctx: Ctx, rounds: int = 3) -> float:
    """The best FLOP/s of back-to-back square matmuls in the dtype training computes in."""
    import torch

    n, reps = (512, 8) if ctx.dry else (8192, 20)
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    c = a @ b  # warm-up
    best = 0.0
    for _ in range(rounds):
        _sync(ctx.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        _sync(ctx.device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def bare_loop(ctx: Ctx, config: dict, vocab: int, context: int, batch: int, warm: int, steps: int) -> float:
    """Tokens/s of the bare loop: the same transformers model, model(ids).logits -> cross-entropy,
    clipping, fused AdamW, bf16 autocast on CUDA (fp32 on CPU, as flame there)."""
    import torch
    import torch.nn.functional as F

    model, _ = build(ctx, config, vocab, context, name="bare")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    ids = random_batch(vocab, batch, context, ctx.device)["input_ids"]
    dev = ctx.device

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=ctx.cuda):
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warm):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return steps * batch * context / (time.perf_counter() - t0)  # freed on return


def _mfu(ctx: Ctx, label: str, config: dict, batch: int, context: int) -> Row:
    vocab = 32000 if ctx.cuda else 512
    warm = 3 if ctx.dry else 8
    steps = ctx.steps or (4 if ctx.dry else 20)
    interval = 1 if ctx.dry else 4
    peak = _peak(ctx)
    over = {
        "data.context_len": context,
        "data.batch_size": batch,
        "model.vocab_size": vocab,
        "train.max_steps": warm + steps,
        "log.interval": interval,
        "log.peak_flops": peak,
    }
    run = flame_run(ctx, label.split(" (")[0].replace(" ", "-").replace("~", ""), over, config)
    steady = [r for r in run["train"] if r["step"] > warm] or run["train"][-1:]
    f_tps = statistics.median(r["tokens_per_s_per_device"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    f_mfu = statistics.median(mfus) if mfus else float("nan")
    fpt = run["flops_per_token"]
    b_tps = bare_loop(ctx, config, vocab, context, batch, warm, steps)
    b_mfu = b_tps * fpt / peak
    ratio = f_tps / b_tps
    finite = all(math.isfinite(x) for x in losses(run))
    ok = finite and 0 < f_mfu <= 1.0 and 0 < b_mfu <= 1.0
    crit = "finite loss; MFU <= 100%"
    if ctx.cuda:
        ok = ok and ratio >= 0.9
        crit += "; flame >= 0.9x bare tokens/s"
    ctx.notes.append(
        f"{label}: {run['params'] / 1e6:.1f}M parameters, {batch} x {context} tokens a step, "
        f"{warm} warm-up + {steps} measured steps a side; FLOPs/token {fpt:.4g} ({run['flops_source']}); "
        f"attention {run['attention']}, loss {'fused' if run['fused_loss'] else 'from logits'}; "
        f"peak {peak:.3g} FLOP/s"
    )
    return Row(
        f"MFU {label}",
        PASS if ok else FAIL,
        f"{batch} x {context}: flame {f_tps:,.0f} tok/s, MFU {100 * f_mfu:.1f}%; bare {b_tps:,.0f} tok/s, "
        f"MFU {100 * b_mfu:.1f}%; flame/bare {ratio:.2f}x",
        crit,
    )


def check_mfu_125m(ctx: Ctx) -> Row:
    if ctx.dry:
        return _mfu(ctx, "llama tiny (125M's shape, scaled)", llama(64, 176, 2, 2), 4, 64)
    # the shape of flame's llama-125m preset, with a 32k vocabulary
    return _mfu(ctx, "llama 125M", llama(768, 2048, 12, 12), 2 * (ctx.batch or 4), 2048)


def check_mfu_1b(ctx: Ctx) -> Row:
    if ctx.dry:
        return _mfu(ctx, "llama tiny (1B's shape, scaled)", llama(96, 256, 2, 3), 2, 64)
    return _mfu(ctx, "llama ~1B", llama(2048, 5632, 16, 16), ctx.batch or 4, 2048)


CHECKS: list[tuple[str, Callable[[Ctx], Row]]] = [
    ("bf16 autocast loss vs fp32 (same batch)", check_bf16_loss),
    ("fused loss (flame.head.fused_ce) vs F.cross_entropy of logits", check_fused_loss),
    ("fused AdamW = unfused (flame.optim, same grads)", check_fused_adamw),
    ("train.compile (flame run, per-block torch.compile)", check_compile),
    ("FSDP2, 1 process", check_fsdp),
    ("varlen isolation, sdpa", check_sdpa),
    ("varlen isolation, flash_attention_2", check_flash),
    ("varlen isolation, flex_attention", check_flex),
    ("fla kernels: GLA through flame (varlen)", check_fla),
    ("MFU llama 125M", check_mfu_125m),
    ("MFU llama ~1B", check_mfu_1b),
]


def run_check(ctx: Ctx, name: str, fn: Callable[[Ctx], Row]) -> Row:
    t0 = time.perf_counter()
    try:
        row = fn(ctx)
    except Skip as e:
        row = Row(name, SKIP, "-", str(e))
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        first = (str(e).splitlines() or [""])[0][:160]
        row = Row(name, FAIL, f"{type(e).__name__}: {first}", "runs without an error")
    finally:
        _free()
    row.check = name  # the table's rows are named as CHECKS names them
    row.seconds = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="the same checks on CPU at tiny sizes")
    ap.add_argument("--only", action="append", default=[], help="run the checks whose name contains this")
    ap.add_argument("--batch", type=int, default=0, help="micro-batch of the ~1B MFU row (125M: twice it)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per MFU side (default 20; dry 4)")
    ap.add_argument("--out", default="", help="write the report here instead of bench/out/gpu[-dry].md")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    import torch

    if not args.dry and not torch.cuda.is_available():
        print(
            f"bench/gpu.py: no CUDA device here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); the checks need one. On a CPU, `python bench/gpu.py --dry` runs "
            "the same code paths at tiny sizes.",
            file=sys.stderr,
        )
        return 2
    chosen = [(n, f) for n, f in CHECKS if not args.only or any(w.lower() in n.lower() for w in args.only)]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="flame-gpu-check-") as tmp:
        ctx = Ctx(dry=args.dry, root=Path(tmp), batch=args.batch, steps=args.steps)
        for name, fn in chosen:
            row = run_check(ctx, name, fn)
            rows.append(row)
            print(
                f"[{time.perf_counter() - t_start:6.1f}s] {row.result:7s} {row.check}",
                file=sys.stderr,
                flush=True,
            )
    total = time.perf_counter() - t_start
    dev = "CPU (dry run)" if args.dry else torch.cuda.get_device_name(0)
    failed = [r for r in rows if r.result == FAIL]
    over = not args.dry and not args.only and total > BUDGET_S
    table = md_table(["check", "result", "measured", "criterion", "s"], [r.cells() for r in rows])
    text = "\n".join(
        [
            f"## GPU check{' (dry run on CPU)' if args.dry else ''}",
            "",
            f"device: {dev}; {machine()}; CUDA {torch.version.cuda}",
            "",
            table,
            "",
            *[f"- {n}" for n in ctx.notes],
            f"- total {total:.0f} s" + (f" (over the {BUDGET_S} s budget)" if over else ""),
            f"- {len(rows) - len(failed)} of {len(rows)} checks did not fail"
            + (f"; FAILED: {', '.join(r.check for r in failed)}" if failed else ""),
        ]
    )
    if args.out:
        print(text, flush=True)
        Path(args.out).write_text(text + "\n")
    else:
        emit("gpu-dry" if args.dry else "gpu", text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
