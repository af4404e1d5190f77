"""The loss without the logits: the output head and cross-entropy fused, chunk by chunk.

The model runs as usual, but its output head (`get_output_embeddings()`, an `nn.Linear`) is given
an empty slice of the last hidden states, so it returns [B, 0, V] logits at no cost; a pre-hook
keeps the real hidden states and the head's weight. flame then computes, for chunks of tokens,
hidden -> logits -> what the model does to its logits (a scale, a soft cap) -> cross-entropy, and
in the same pass the gradients of the hidden states and of the head's weight and bias. No
[B, T, V] tensor exists, forward or backward.

Whether a model's head can be reproduced is not assumed: `build_token_loss` probes the model once
(a forward with large synthetic hidden states given to the head, where a missed scale or soft cap
would show) and compares the model's own logits with the reproduction. A model that fails the
probe trains on the logits path, said once (model.loss = auto), or is refused (model.loss = fused).

A custom model opts in by exposing `get_output_embeddings()` (an `nn.Linear` that its forward
calls once, on the final hidden states) and, when it transforms the logits after the head, by
naming the transform the way transformers configs do (`config.final_logit_softcapping`,
`config.logits_scaling`, a `logit_scale` attribute or config field).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flame.errors import ConfigError
from flame.loss import IGNORE, labels_of, model_outputs, per_token_ce, shifted_targets

# logits elements of one chunk (16 M: 64 MiB of fp32 per temporary), at least _MIN_ROWS tokens so
# the head's matmuls stay efficient; model.loss_chunk sets the tokens per chunk instead
_CHUNK_ELEMS = 1 << 24
_MIN_ROWS = 256

Op = tuple[str, float]  # ("mul", s) | ("div", s) | ("softcap", c), applied to the logits in order


def _apply_ops(z: torch.Tensor, ops: tuple[Op, ...], slopes: list | None = None) -> torch.Tensor:
    """The model's transform of its head's output z, as the model writes it. With `slopes`, each
    op's derivative is appended to it (a number, or a tensor like z for the soft cap)."""
    for kind, c in ops:
        if kind == "mul":
            z = z * c
        elif kind == "div":
            z = z / c
        else:  # the soft cap as transformers writes it: tanh(z / c) * c
            t = torch.tanh(z / c)
            z = t * c
            if slopes is not None:
                t = t.square_().neg_().add_(1)  # 1 - tanh^2, from the forward's own tanh
        if slopes is not None:
            slopes.append(c if kind == "mul" else 1 / c if kind == "div" else t)
    return z


def _chain(g: torch.Tensor, slopes: list) -> torch.Tensor:
    """d(loss)/d(head output) from d(loss)/d(transformed logits), in place on g."""
    for s in slopes:
        g.mul_(s)
    return g


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


class _FusedLinearCE(torch.autograd.Function):
    """(summed cross-entropy, per-token cross-entropy) of hidden [N, H] through a head [V, H].

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits
    exist; the backward only scales them by the incoming gradient of the sum. The per-token output
    is not differentiable (it is what per-source accounting and logging read)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ops, rows, dtype):
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, explicitly
            return _FusedLinearCE._run(ctx, hidden, weight, bias, targets, ops, rows, dtype)

    @staticmethod
    def _run(ctx, hidden, weight, bias, targets, ops, rows, dtype):
        n = hidden.shape[0]
        want = ctx.needs_input_grad[:3]
        x = hidden.to(dtype)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        valid = targets != IGNORE
        safe = torch.where(valid, targets, 0)
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        f32 = torch.float32
        g_hidden = torch.empty_like(x) if want[0] else None
        g_weight = torch.zeros(weight.shape, dtype=f32, device=weight.device) if want[1] else None
        g_bias = torch.zeros(weight.shape[0], dtype=f32, device=weight.device) if want[2] else None
        for i in range(0, n, rows):
            j = min(n, i + rows)
            xc = x[i:j]
            z = F.linear(xc, w, b).float()
            slopes: list | None = [] if any(want) else None
            y = _apply_ops(z, ops, slopes) if ops else z
            picked = y.gather(1, safe[i:j, None]).view(-1)
            m = y.amax(dim=1, keepdim=True)
            p = y.sub_(m).exp_()  # in place: y is this chunk's own
            s = p.sum(dim=1, keepdim=True)
            ce[i:j] = torch.where(valid[i:j], (s.log() + m).view(-1) - picked, 0.0)
            if not any(want):
                continue
            vc = valid[i:j, None].to(f32)
            p.div_(s).mul_(vc).scatter_add_(1, safe[i:j, None], -vc)  # softmax - one-hot, kept rows
            gz = _chain(p, slopes)
            gz = gz if dtype == f32 else gz.to(dtype)
            if g_hidden is not None:
                torch.mm(gz, w, out=g_hidden[i:j])
            if g_weight is not None:
                if dtype == f32:
                    g_weight.addmm_(gz.t(), xc)
                else:  # bf16 products, accumulated over chunks in fp32
                    g_weight += (gz.t() @ xc).to(f32)
            if g_bias is not None:
                g_bias += gz.sum(0, dtype=f32)
        ctx.mark_non_differentiable(ce)
        ctx.grads = (g_hidden, g_weight, g_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return ce.sum(), ce

    @staticmethod
    def backward(ctx, g_sum, _g_ce):
        out = [None if g is None else (g * g_sum).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*out, None, None, None, None)


def fused_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ops: tuple[Op, ...] = (),
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 cross-entropy, differentiable; per-token cross-entropy [B, T-1], detached) of
    hidden states [B, T, H] through the head (weight [V, H], bias [V]) against the labels shifted
    by one; -100 targets count nothing. Matmuls run in the autocast dtype where autocast is on."""
    b, t = labels.shape
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = shifted_targets(labels, flat.device)
    v = weight.shape[0]
    rows = chunk_tokens or max(_MIN_ROWS, _CHUNK_ELEMS // max(1, v))
    total, ce = _FusedLinearCE.apply(flat, weight, bias, targets, tuple(ops), rows, _compute_dtype(flat))
    return total, ce.view(b, t)[:, :-1]


# ---- reaching the head of a model --------------------------------------------------------------


class HeadCapture:
    """A forward pre-hook on the output head. While `active`, it keeps the head's input and
    parameters and hands the head an empty slice instead (or, in the probe, `substitute(h)`)."""

    def __init__(self, head: nn.Linear):
        self.head = head
        self.active = False
        self.substitute: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.calls = 0
        self.hidden: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._pre)

    def _pre(self, module: nn.Module, args: tuple):
        if not self.active:
            return None
        self.calls += 1
        h = args[0]
        self.hidden, self.weight, self.bias = h, module.weight, module.bias
        if self.substitute is not None:
            return (self.substitute(h), *args[1:])
        return (h.narrow(-2, 0, 0), *args[1:])

    def run(self, fn: Callable[[], object]):
        self.active, self.calls = True, 0
        try:
            return fn()
        finally:
            self.active = False

    def release(self) -> None:
        self.hidden = self.weight = self.bias = None


def logit_ops(model: nn.Module) -> tuple[Op, ...]:
    """What a model does to its head's output, read from the names transformers uses."""
    cfg = getattr(model, "config", None)
    ops: list[Op] = []
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        ops.append(("mul", float(scale)))
    div = getattr(cfg, "logits_scaling", None)
    if isinstance(div, (int, float)) and not isinstance(div, bool) and div != 1:
        ops.append(("div", float(div)))
    mult = getattr(getattr(model, "model", None), "lm_head_multiplier", None)
    if isinstance(mult, (int, float)) and not isinstance(mult, bool) and mult != 1:
        ops.append(("mul", float(mult)))
    cap = getattr(cfg, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap:
        ops.append(("softcap", float(cap)))
    return tuple(ops)


def output_head(model: nn.Module) -> tuple[nn.Linear | None, str]:
    """(the model's output head, '') or (None, why it cannot be fused)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None, "it has no get_output_embeddings() returning its output head"
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return None, f"its output head is a {type(head).__name__}, not a plain nn.Linear"
    return head, ""


# ---- the loss of a step ------------------------------------------------------------------------


@dataclass
class TokenLoss:
    """How a micro-batch's token losses are computed: fused (capture set) or from the logits."""

    capture: HeadCapture | None = None
    ops: tuple[Op, ...] = ()
    chunk_tokens: int = 0
    reason: str = ""  # why the logits path, when it is

    @property
    def fused(self) -> bool:
        return self.capture is not None

    def __call__(
        self, model: nn.Module, batch: dict, accepts: set[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(summed fp32 token loss, differentiable; per-token loss [B, T-1], detached; the model's
        auxiliary loss or None) of one micro-batch. Call it inside the step's autocast."""
        labels = labels_of(batch)
        if self.capture is None:
            logits, aux = model_outputs(model, batch, accepts)
            ce = per_token_ce(logits, labels)
            return ce.sum(), ce.detach(), aux
        cap = self.capture
        logits, aux = cap.run(lambda: model_outputs(model, batch, accepts))
        if cap.calls != 1:
            raise ConfigError(
                f"model.loss: the output head ran {cap.calls} times in one forward pass (once was "
                "probed); set --model.loss logits"
            )
        try:
            total, ce = fused_ce(cap.hidden, cap.weight, cap.bias, labels, self.ops, self.chunk_tokens)
        finally:
            cap.release()
        # + the empty logits' sum (exactly 0): the model's output stays in the graph, so wrappers
        # whose backward hooks hang on it (FSDP) see the backward pass begin
        return total + logits.sum(), ce, aux

    def per_token(self, model: nn.Module, batch: dict, accepts: set[str]) -> torch.Tensor:
        """Per-token loss [B, T-1] (evaluation: no gradient is kept)."""
        return self(model, batch, accepts)[1]


def _probe(model: nn.Module, ops: tuple[Op, ...], accepts: set[str], vocab: int) -> str:
    """'' when the model's logits are its head's output with `ops` applied, else what differs.

    The head is given synthetic hidden states scaled so its output spans about +-40: a scale or a
    soft cap the reproduction missed changes logits that large well beyond rounding."""
    head, why = output_head(model)
    if head is None:
        return why
    cap = HeadCapture(head)
    dev = head.weight.device
    seen: dict = {}
    gen = torch.Generator(device="cpu").manual_seed(0)

    def substitute(h: torch.Tensor) -> torch.Tensor:
        w, b = head.weight, head.bias
        x = torch.randn(h.shape, generator=gen, dtype=torch.float32).to(device=h.device, dtype=h.dtype)
        z = F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        x = x * (40.0 / max(float(z.abs().max()), 1e-6))
        seen["x"] = x
        return x

    ids = torch.randint(0, max(1, vocab), (1, 8), generator=gen).to(dev)
    was_training = model.training
    model.eval()
    cap.substitute = substitute
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            logits, _ = cap.run(lambda: model_outputs(model, {"input_ids": ids}, accepts))
            if cap.calls != 1:
                return f"its forward calls the output head {cap.calls} times, not once"
            x, w, b = seen["x"], head.weight, head.bias
            want = _apply_ops(F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype)).float(), ops)
    finally:
        cap.handle.remove()
        model.train(was_training)
    got = logits.float()
    if got.shape != want.shape:
        return f"its logits {tuple(got.shape)} are not the head's output {tuple(want.shape)}"
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    if not err <= tol:
        done = f" followed by {', '.join(f'{k} {c:g}' for k, c in ops)}" if ops else ""
        return f"its logits are not its head's output{done} (they differ by {err:.2g} of their scale)"
    return ""


def head_verdict(model: nn.Module, mode: str, accepts: set[str], vocab: int) -> tuple[tuple[Op, ...], str]:
    """(the logit transforms, '') when the loss can be fused exactly, else (_, why not).

    Probes the model itself on its device, or a shallow CPU copy (transformers models) when it is
    on the meta device or over 1B parameters; a model whose probe fails to run on CPU is probed on
    CUDA where there is one. Raises a ConfigError when model.loss = fused and it cannot be."""
    if mode == "logits":
        return (), "model.loss = logits"
    from transformers import PreTrainedModel

    from flame.model import _shallow_copy, count_params

    ops = logit_ops(model)
    head, why = output_head(model)
    if head is not None:
        probe = model
        big = any(p.is_meta for p in model.parameters()) or count_params(model) > 1_000_000_000
        if big and isinstance(model, PreTrainedModel):
            probe = _shallow_copy(model)
        if big and probe is model:
            why = "it is built on the meta device and is not a transformers model, so it cannot be probed"
        else:
            try:
                why = _probe(probe, ops, accepts, vocab)
            except Exception as e:  # a kernel without a CPU path: try CUDA, else say why
                why = f"its probe forward failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                if torch.cuda.is_available() and isinstance(model, PreTrainedModel):
                    try:
                        why = _probe(_shallow_copy(model).cuda(), ops, accepts, vocab)
                    except Exception:
                        pass
    if why and mode == "fused":
        raise ConfigError(
            f"model.loss = fused: flame cannot reproduce this model's output head exactly ({why}); "
            "set --model.loss logits (or auto)"
        )
    return ops, why


def token_loss(model: nn.Module, verdict: tuple[tuple[Op, ...], str], chunk_tokens: int = 0) -> TokenLoss:
    """The loss of a run from `head_verdict`'s verdict: fused (a capture hook on the model's head)
    or the logits path. `model` is the unwrapped model; wrapping keeps its modules."""
    ops, why = verdict
    if why:
        return TokenLoss(reason=why)
    head, _ = output_head(model)
    return TokenLoss(capture=HeadCapture(head), ops=tuple(ops), chunk_tokens=chunk_tokens)


__all__ = ["TokenLoss", "head_verdict", "token_loss", "fused_ce", "logit_ops", "output_head", "HeadCapture"]
