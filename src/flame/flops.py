"""Training FLOPs per token, for MFU: the user's figure, the model's own, a measurement, or a formula.

The measurement runs one forward and backward of the model at the run's context length (batch 1)
under `torch.utils.flop_counter.FlopCounterMode`, on the meta device: no memory, no arithmetic,
only shapes, so it costs a fraction of a second for a transformer. The loss is flame's (the
cross-entropy of logits[:, :-1] against input_ids[:, 1:]); FLOPs per token = counted FLOPs /
context length.

Conventions (the same for the measurement and the formula, so the two compare):
- matmuls and convolutions count 2 FLOPs per multiply-add; element-wise work (norms, activations,
  softmax, the loss) is not counted;
- attention counts the full T x T score and value matmuls, without halving for the causal mask,
  and over the whole context also when documents are packed (varlen); sliding windows are not
  discounted either;
- training = forward + backward (2x the forward's matmuls), without recomputation: neither
  activation checkpointing's nor a fused attention kernel's (model FLOPs, not hardware FLOPs).

The formula is 6 x (weights used in matmuls; the input embedding only when it is tied to the
output projection) + 12 x layers x hidden x context. It is right for dense transformers and
wrong for state-space models, linear attention and mixtures of experts, which is why a
measurement is preferred. Models of fla (flash-linear-attention), whose Triton kernels the
counter cannot see, get 6 x those weights + 3 x their layers' token mixing, counted per layer from
each layer's shape (`flame.fla_flops`, which states the same conventions for chunked forms).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flame.fla_flops import FlaCores, fla_cores

SOURCES = ("user", "model", "measured", "formula")

# Contexts of the fallback measurement for models whose work grows with the sequence length in
# Python (a loop over time steps): three short contexts fit F(T) = c + a*T + b*T^2 exactly.
PROBE_CONTEXTS = (2, 3, 4)

# Packages whose models run custom (Triton / CUDA) kernels the counter does not see.
HIDDEN_KERNEL_PACKAGES = ("fla", "mamba_ssm", "causal_conv1d", "flash_attn", "liger_kernel")

aten = torch.ops.aten


class FlopsNotMeasured(Exception):
    """The measurement could not run, or ran out of time; the message says why."""


class _OutOfTime(FlopsNotMeasured):
    pass


# ---------------------------------------------------------------- the formula and the model's own


def matmul_weights(model: nn.Module) -> int:
    """The N of 6N: every parameter, less the input embedding unless it is tied to the output."""
    n = sum(p.numel() for p in model.parameters())
    emb_fn = getattr(model, "get_input_embeddings", None)
    out_fn = getattr(model, "get_output_embeddings", None)
    emb = emb_fn() if callable(emb_fn) else None
    out = out_fn() if callable(out_fn) else None
    if emb is not None and (out is None or out.weight is not emb.weight):
        n -= emb.weight.numel()
    return n


def formula_flops_per_token(model: nn.Module, context_len: int) -> float:
    """6 x matmul weights used per token + 12 x layers x hidden x context for softmax attention
    + 3 x the forward FLOPs of fla layers' token mixing, counted per layer (`flame.fla_flops`).

    A mixture of experts counts its expert weights x (experts per token / experts): the active
    ones. Models without softmax attention (state-space models, and custom-kernel layers) get no
    attention term; of the custom-kernel layers, fla's known ones (GLA, HGRN2, DeltaNet,
    GatedDeltaNet, RWKV-7, Mamba2, and fla's softmax Attention) get their own count instead.
    """
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    hidden = getattr(cfg, "hidden_size", 0) or 0
    attention = 12.0 * layers * hidden * context_len if _has_softmax_attention(model) else 0.0
    return 6.0 * active_matmul_weights(model) + attention + 3.0 * fla_cores(model, context_len).forward


def _has_softmax_attention(model: nn.Module) -> bool:
    from flame.model import attention_of

    return attention_of(model) != "native" and hidden_kernels(model) is None


def _experts(model: nn.Module) -> tuple[int, int] | None:
    """(experts per token, experts) of a mixture of experts, from its config."""
    cfg = getattr(model, "config", None)
    total = next(
        (
            n
            for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
            if isinstance(n := getattr(cfg, k, None), int) and n > 1
        ),
        None,
    )
    top = next(
        (
            n
            for k in ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k")
            if isinstance(n := getattr(cfg, k, None), int) and n > 0
        ),
        None,
    )
    return (top, total) if total and top else None


def active_matmul_weights(model: nn.Module) -> float:
    """matmul_weights, with a mixture of experts' expert weights scaled to the share a token uses."""
    n = matmul_weights(model)
    moe = _experts(model)
    if moe is None:
        return float(n)
    top, total = moe
    expert = sum(p.numel() for name, p in model.named_parameters() if ".experts." in f".{name}.")
    return n - expert * (1.0 - top / total)


def declared_flops_per_token(model: nn.Module, context_len: int) -> float | None:
    """The model's own figure: a `num_flops_per_token` or `flops_per_token` attribute or method
    (a method is called with the context length)."""
    for name in ("num_flops_per_token", "flops_per_token"):
        f = getattr(model, name, None)
        if f is not None:
            return float(f(context_len) if callable(f) else f)
    return None


def hidden_kernels(model: nn.Module) -> str | None:
    """Why the counter would miss FLOPs of this model (custom kernels), or None."""
    for m in model.modules():
        top = type(m).__module__.partition(".")[0]
        if top in HIDDEN_KERNEL_PACKAGES:
            return f"{type(m).__name__} comes from {top}, whose kernels the FLOP counter cannot see"
    return None


def _uncounted_kernels(model: nn.Module, cores: FlaCores) -> str | None:
    """Why the formula misses FLOPs of this model's custom kernels, or None: a module of a custom-
    kernel package other than fla, or an fla module that `flame.fla_flops` does not count."""
    for m in model.modules():
        top = type(m).__module__.partition(".")[0]
        if top in HIDDEN_KERNEL_PACKAGES and top != "fla":
            return f"{type(m).__name__} comes from {top}, whose kernels the FLOP counter cannot see"
    return cores.uncounted[0] if cores.uncounted else None


def _linear_weights(model: nn.Module) -> int:
    """Weights of the nn.Linear layers (each once, tied ones too): a dense model's forward
    multiplies every token by each of them, so 6x this is a floor for its training FLOPs."""
    seen = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(seen.values())


def _is_mixture_of_experts(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return any(isinstance(n := getattr(cfg, k, None), int) and n > 1 for k in keys)


# ---------------------------------------------------------------- the measurement


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    # the input gradient and the weight gradient each cost one forward convolution; torch's own
    # formula multiplies the weight gradient by the full channel product, ignoring groups, which
    # overcounts a depthwise convolution (Mamba's) by the number of channels
    from torch.utils.flop_counter import conv_flop_count

    fwd = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return fwd * (int(output_mask[0]) + int(output_mask[1]))


def _attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kw
):
    # two forwards (the gradients of the scores and of the values, then of queries and keys), as
    # the formula counts; torch's own table adds the fused kernels' recomputation of the scores
    return 2 * _attention_flop(query_shape, key_shape, value_shape)


# additions to the counter's table (shapes in, FLOPs out), so that every attention kernel follows
# the convention above and CPU attention is counted at all
_FORMULAS_BY_NAME = {
    "convolution_backward": _conv_backward_flop,
    "_scaled_dot_product_flash_attention_for_cpu": _attention_flop,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _attention_backward_flop,
    "_scaled_dot_product_efficient_attention_backward": _attention_backward_flop,
    "_scaled_dot_product_flash_attention_backward": _attention_backward_flop,
    "_scaled_dot_product_cudnn_attention_backward": _attention_backward_flop,
}
FLOP_FORMULAS = {getattr(aten, name): f for name, f in _FORMULAS_BY_NAME.items() if hasattr(aten, name)}


class _MetaGuard(TorchDispatchMode):
    """Keeps a measurement on the meta device honest and bounded.

    Reading a value from a meta tensor is impossible. Checks of the form `if x.all():` and
    `if x.any():` (a library's "is this batch padded / packed / broken" tests) get the answer
    for a clean, unpadded batch (all: True, any: False); any other read raises, and the model
    cannot be measured. Past the deadline the next op raises `_OutOfTime`.
    """

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline
        self.ops = 0
        self._answers: dict[int, tuple[bool, torch.Tensor]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if self.ops % 32 == 0 and time.perf_counter() > self.deadline:
            raise _OutOfTime("ran out of time")
        if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
            known = self._answers.get(id(args[0]))
            if known is None or known[1] is not args[0]:
                raise FlopsNotMeasured("the forward reads a value from a tensor (data-dependent)")
            return known[0]
        out = func(*args, **kwargs)
        packet = getattr(func, "overloadpacket", None)
        if packet in (aten.all, aten.any) and isinstance(out, torch.Tensor) and out.device.type == "meta":
            self._answers[id(out)] = (packet is aten.all, out)
        return out


def _forward_kwargs(model: nn.Module, ids: torch.Tensor) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {"input_ids": ids}
    kw = {"input_ids": ids}
    if "use_cache" in params:
        kw["use_cache"] = False
    labels = params.get("labels")
    if labels is not None and labels.default is inspect.Parameter.empty:  # an older custom contract
        kw["labels"] = ids
    return kw


def _loss_of(out, ids: torch.Tensor) -> torch.Tensor:
    """flame's loss from what the model returned: logits [B, T, V], a per-token loss, or a loss."""
    if not isinstance(out, torch.Tensor):
        logits = getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor):
            out = logits
        elif isinstance(getattr(out, "loss", None), torch.Tensor):
            out = out.loss
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            out = out[0]
        else:
            raise FlopsNotMeasured(f"the forward returned {type(out).__name__}, neither logits nor a loss")
    if out.dim() == 3:
        return F.cross_entropy(out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return out.float().sum()


def _count_once(model: nn.Module, context_len: int, guard: _MetaGuard, params: dict | None) -> int:
    ids = torch.zeros(1, context_len, dtype=torch.long, device="meta")
    kw = _forward_kwargs(model, ids)
    # imported here: torch's flop counter imports Triton, which must not happen before fla_cpu
    # has had the chance to switch Triton to its interpreter
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter, guard:
        if params is None:
            out = model(**kw)
        else:
            out = torch.func.functional_call(model, params, (), kw, strict=False)
        loss = _loss_of(out, ids)
        if loss.requires_grad:
            loss.backward()
    return counter.get_total_flops()


def _meta_stand_ins(model: nn.Module) -> dict:
    """Meta tensors in place of the model's parameters and buffers (the model is left as it is)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
    for name, b in model.named_buffers():
        out[name] = torch.empty_like(b, device="meta")
    return out


def measure_flops_per_token(
    model: nn.Module | None,
    context_len: int,
    build: Callable[[], nn.Module] | None = None,
    budget_s: float = 5.0,
) -> tuple[float, str]:
    """(training FLOPs per token, a note on how it was measured), counted on the meta device.

    With `build`, the model is built again under `torch.device("meta")`; otherwise the given model
    runs with meta stand-ins for its weights (it is not changed). One pass at `context_len`; if
    that does not finish in half of `budget_s` (a model whose Python code loops over time steps),
    three short contexts fit F(T) = c + a*T + b*T^2, which is exact for attention (a*T + b*T^2)
    and recurrent or convolutional models (c + a*T). Raises FlopsNotMeasured with the reason.
    """
    _warm_up()
    t0 = time.perf_counter()
    if model is None and build is None:
        raise ValueError("measure_flops_per_token needs a model or a build function")
    try:
        if build is not None:
            with torch.device("meta"):
                model = build()
            params = None
        else:
            params = _meta_stand_ins(model)
        if _is_mixture_of_experts(model):
            raise FlopsNotMeasured(
                "a mixture of experts: which experts run depends on the routing of real tokens"
            )
        modes = {m: m.training for m in model.modules()}
        model.train()
        try:
            return _measure(model, context_len, params, t0, budget_s)
        finally:
            for m, training in modes.items():
                m.training = training
    except FlopsNotMeasured:
        raise
    except Exception as e:  # a module that cannot be built or run on meta: mixed devices, custom ops...
        raise FlopsNotMeasured(f"{type(e).__name__}: {_first_line(e)}") from None


def _warm_up() -> None:
    """The first element-wise op on meta imports torch's Python meta kernels (and sympy): seconds
    once per process (already paid where a transformers model was built), not the model's cost."""
    x = torch.empty(2, device="meta")
    (x * x > 0).all()


def _measure(model, context_len, params, t0, budget_s) -> tuple[float, str]:
    try:
        flops = _count_once(model, context_len, _MetaGuard(t0 + budget_s / 2), params)
        return flops / context_len, ""
    except _OutOfTime:
        pass
    probes = [t for t in PROBE_CONTEXTS if t < context_len]
    if len(probes) < 3:
        raise FlopsNotMeasured(f"the pass at context {context_len} took over {budget_s / 2:.3g}s")
    guard = _MetaGuard(t0 + budget_s)
    try:
        counts = [float(_count_once(model, t, guard, params)) for t in probes]
    except _OutOfTime:
        raise FlopsNotMeasured(
            f"the passes at context {context_len} and at {', '.join(map(str, probes))} took over {budget_s:.3g}s"
        ) from None
    c, a, b = _fit_quadratic(probes, counts)
    if a <= 0 or b < -1e-9 * a:
        raise FlopsNotMeasured(
            f"the FLOPs at contexts {probes} do not follow c + a*T + b*T^2 ({counts}); "
            "the model's work depends on the context in another way"
        )
    per_token = (c + a * context_len + b * context_len**2) / context_len
    return per_token, f", extrapolated from contexts {', '.join(map(str, probes))}"


def _fit_quadratic(xs, ys) -> tuple[float, float, float]:
    """(c, a, b) with c + a*x + b*x^2 through three points (exact for integer counts)."""
    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    coef = torch.linalg.solve(torch.stack([torch.ones_like(x), x, x * x], dim=1), y)
    return float(coef[0]), float(coef[1]), float(coef[2])


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return (lines[0] if lines else "")[:200]


# ---------------------------------------------------------------- the figure a run uses


def resolve_flops_per_token(
    model: nn.Module,
    context_len: int,
    user: float = 0.0,
    build: Callable[[], nn.Module] | None = None,
    log: Callable[[str], None] = print,
    budget_s: float = 5.0,
) -> tuple[float, str]:
    """(training FLOPs per token, source): the first of `user` (> 0), the model's own figure,
    a measurement (`measure_flops_per_token`), and the formula. Logs one line saying which,
    and how the measurement compares with the formula."""
    if user and user > 0:
        log(f"FLOPs per token: {user:.4g} (model.flops_per_token)")
        return float(user), "user"
    own = declared_flops_per_token(model, context_len)
    if own is not None:
        log(f"FLOPs per token: {own:.4g}, the model's own figure")
        return own, "model"
    formula = formula_flops_per_token(model, context_len)
    fix = "; set model.flops_per_token for an exact figure"
    why = hidden_kernels(model)
    if why is None and _is_mixture_of_experts(model):
        why = "a mixture of experts: the formula counts the active experts' weights (experts per token / experts)"
    if why is not None:
        cores = fla_cores(model, context_len)
        missing = _uncounted_kernels(model, cores)
        if cores.layers and missing is None:
            mixing = 3.0 * cores.forward
            log(
                f"FLOPs per token: {formula:.4g} by the formula, fla layers' token mixing counted per "
                f"layer ({cores.describe()}: {mixing:.4g}, {mixing / formula:.1%} of the total)"
            )
            return formula, "formula"
        log(f"FLOPs per token: {formula:.4g} by the formula ({missing or why}{fix})")
        return formula, "formula"
    try:
        measured, note = measure_flops_per_token(model, context_len, build=build, budget_s=budget_s)
    except FlopsNotMeasured as e:
        log(f"FLOPs per token: {formula:.4g} by the formula (not measured: {e}{fix})")
        return formula, "formula"
    floor = 6.0 * _linear_weights(model)
    if measured < 0.98 * floor:
        log(
            f"FLOPs per token: {formula:.4g} by the formula (measured {measured:.4g} is below 6 x the "
            f"linear layers' weights, {floor:.4g}: the FLOP counter misses some of this model's work, "
            f"custom kernels?{fix})"
        )
        return formula, "formula"
    ratio = f", {measured / formula:.2f}x" if formula > 0 else ""
    log(f"FLOPs per token: {measured:.4g} measured{note} (formula {formula:.4g}{ratio})")
    return measured, "measured"
