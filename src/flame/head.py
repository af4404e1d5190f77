"""The loss without the logits: the output head and cross-entropy fused, chunk by chunk.

The model runs as usual, but its output head (`get_output_embeddings()`, an `nn.Linear`) is given
an empty slice of the last hidden states, so it returns [B, 0, V] logits at no cost; a pre-hook
keeps the real hidden states and the head's weight. flame then computes, for chunks of tokens,
hidden -> logits -> what the model does to its logits (a scale, a soft cap) -> cross-entropy, and
in the same pass the gradients of the hidden states and of the head's weight and bias. No
[B, T, V] tensor exists, forward or backward.

Whether a model's head can be reproduced is not assumed: `head_verdict` probes the model at start
(its head's output replaced by synthetic logits of 0.5 to 400, in eval and train mode; the model's
logits must be the reproduction of them, and no parameter may act after the head). A model that
fails trains on the logits path, said once (model.loss = auto), or is refused (model.loss = fused);
`token_loss` builds the run's `TokenLoss` from the verdict.

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
from torch.autograd.function import once_differentiable

from flame.errors import ConfigError, FlameError
from flame.loss import IGNORE, labels_of, model_outputs, per_token_ce, shifted_targets

# logits elements of one chunk (16 M: 64 MiB of fp32 per temporary, more above 65,536 ids), at
# least _MIN_ROWS tokens so the head's matmuls stay efficient; model.loss_chunk sets it instead
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


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32) + a @ b (bf16): on CUDA one fp32-output matmul, no [V, H] temporary; elsewhere
    (no such kernel) one bf16 product added in."""
    if acc.is_cuda:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError):
            pass
    return acc.add_(a @ b)


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
                else:
                    g_weight = _add_product(g_weight, gz.t(), xc)
            if g_bias is not None:
                g_bias += gz.sum(0, dtype=f32)
        ctx.mark_non_differentiable(ce)
        ctx.grads = (g_hidden, g_weight, g_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return ce.sum(), ce

    @staticmethod
    @once_differentiable
    def backward(ctx, g_sum, _g_ce):
        if ctx.grads is None:
            raise FlameError(
                "the fused loss was back-propagated twice (retain_graph): its gradients are computed "
                "once, in the forward pass",
                hint="back-propagate each loss once, or set --model.loss logits",
            )
        out = [None if g is None else g.mul_(g_sum).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None  # freed now, though the graph's outputs may live on
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
    if not torch.is_grad_enabled():  # evaluation: no gradient work (needs_input_grad would ask for it)
        flat, weight = flat.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    targets = shifted_targets(labels, flat.device)
    v = weight.shape[0]
    rows = chunk_tokens or max(_MIN_ROWS, _CHUNK_ELEMS // max(1, v))
    total, ce = _FusedLinearCE.apply(flat, weight, bias, targets, tuple(ops), rows, _compute_dtype(flat))
    return total, ce.view(b, t)[:, :-1]


# ---- reaching the head of a model --------------------------------------------------------------


class HeadCapture:
    """A forward pre-hook on the output head. While `active`, it keeps the head's input and
    parameters and hands the head an empty slice instead (the probe, `passthrough`: the input)."""

    def __init__(self, head: nn.Linear):
        self.head = head
        self.active = False
        self.passthrough = False
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
        if self.passthrough:
            return None
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
        try:  # released whatever happens: the captured hidden states hold the forward's graph
            logits, aux = cap.run(lambda: model_outputs(model, batch, accepts))
            if cap.calls != 1:
                raise ConfigError(
                    f"model.loss: the output head ran {cap.calls} times in one forward pass (once was "
                    "probed); set --model.loss logits"
                )
            total, ce = fused_ce(cap.hidden, cap.weight, cap.bias, labels, self.ops, self.chunk_tokens)
        finally:
            cap.release()
        # + the empty logits' sum (exactly 0): the model's output stays in the graph, so wrappers
        # whose backward hooks hang on it (FSDP) see the backward pass begin
        return total + logits.sum(), ce, aux

    def hidden_states(self, model: nn.Module, batch: dict, accepts: set[str]) -> torch.Tensor:
        """The last hidden states the head would read (fused only): what the varlen check on the
        trained weights compares, without [B, T, V] logits."""
        cap = self.capture
        try:
            cap.run(lambda: model_outputs(model, batch, accepts))
            return cap.hidden.detach()
        finally:
            cap.release()

    def per_token(self, model: nn.Module, batch: dict, accepts: set[str]) -> torch.Tensor:
        """Per-token loss [B, T-1] (evaluation: no gradient is kept)."""
        return self(model, batch, accepts)[1]


# the probe's synthetic logits: magnitudes from 0.5 to 400, so a scale, an offset, a cap or a clamp
# the reproduction missed shows beyond rounding wherever it acts
_PROBE_SCALES = (0.5, 4.0, 40.0, 400.0)


def _probe(model: nn.Module, ops: tuple[Op, ...], accepts: set[str], vocab: int) -> str:
    """'' when the model's logits are `ops` of its head's output, in eval and in train mode, else
    what differs.

    The head's output is replaced by synthetic logits (a leaf tensor, whatever the weights: a
    zero-initialised head hides nothing) and the model's logits must equal `ops` of them,
    element by element; no parameter may act on them after the head (a learned temperature or
    logit bias the fused path would not train)."""
    head, why = output_head(model)
    if head is None:
        return why
    own = {id(head.weight), id(head.bias)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    gen = torch.Generator(device="cpu").manual_seed(0)
    seen: dict = {}

    def synthetic(module: nn.Module, args: tuple, out: torch.Tensor):
        if not cap.active:
            return None
        scale = torch.tensor(_PROBE_SCALES).repeat(out.shape[-2] // len(_PROBE_SCALES) + 1)
        scale = scale[: out.shape[-2]].view(-1, 1)
        z = torch.randn(out.shape, generator=gen) * scale
        seen["z"] = z = z.to(device=out.device, dtype=out.dtype).requires_grad_()
        return z

    cap = HeadCapture(head)
    cap.passthrough = True  # the head runs on the real hidden states; its output is replaced
    handle = head.register_forward_hook(synthetic)
    ids = torch.randint(0, max(1, vocab), (1, 8), generator=gen).to(head.weight.device)
    modes = {m: m.training for m in model.modules()}
    cuda = [torch.cuda.current_device()] if head.weight.is_cuda else []
    try:
        for training in (False, True):
            model.train(training)
            with torch.random.fork_rng(devices=cuda), torch.enable_grad():
                logits, _ = cap.run(lambda: model_outputs(model, {"input_ids": ids}, accepts))
                mode = "training" if training else "evaluation"
                if cap.calls != 1:
                    return f"its forward calls the output head {cap.calls} times in {mode}, not once"
                z = seen.pop("z")
                want = _apply_ops(z.detach().float(), ops)
                got = logits.detach().float()
                if got.shape != want.shape:
                    return f"its logits {tuple(got.shape)} are not its head's output {tuple(want.shape)}"
                tol = 1e-5 if z.dtype == torch.float32 else 2e-2
                err = float(((got - want).abs() / want.abs().clamp(min=1.0)).max())
                if not err <= tol:
                    done = f" followed by {', '.join(f'{k} {c:g}' for k, c in ops)}" if ops else ""
                    return (
                        f"its logits in {mode} are not its head's output{done} (they differ by "
                        f"{err:.2g} of their size)"
                    )
                used = torch.autograd.grad(logits.float().sum(), others, allow_unused=True) if others else ()
                names = [n for (n, p), g in zip(_named(model, others), used) if g is not None]
                if names:
                    return f"parameters act on its logits after the head ({', '.join(names[:3])})"
    finally:
        handle.remove()
        cap.handle.remove()
        cap.release()
        for m, t in modes.items():
            m.training = t
    return ""


def _named(model: nn.Module, params: list) -> list[tuple[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names.get(id(p), "?"), p) for p in params]


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
        meta = any(p.is_meta for p in model.parameters())
        if isinstance(model, PreTrainedModel) and (meta or count_params(model) > 1_000_000_000):
            probe = _shallow_copy(model)  # the verdict is the architecture's: seconds, not minutes
        if meta and probe is model:
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
