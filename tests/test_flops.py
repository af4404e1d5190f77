"""Training FLOPs per token for MFU: the measurement on the meta device against hand counts, its
fallbacks, and the order user > model > measured > formula."""

import importlib.util
import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from flame import fla_flops
from flame import flops as fl
from flame.flops import (
    FLOP_FORMULAS,
    FlopsNotMeasured,
    formula_flops_per_token,
    measure_flops_per_token,
    resolve_flops_per_token,
)


def _llama(tied: bool, kv_heads: int = 2, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
    )
    cfg = AutoConfig.for_model("llama", **{**fields, **over})
    return cfg, AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _llama_hand_count(cfg, context: int) -> float:
    """6 x every weight a token is multiplied by (q, k, v, o, gate, up, down, the output head; the
    input embedding is a lookup) + 12 x layers x (heads x head_dim) x context for the attention
    scores and values (the full T x T, no causal halving)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    weights = cfg.num_hidden_layers * per_layer + cfg.vocab_size * h
    return 6.0 * weights + 12.0 * cfg.num_hidden_layers * q * context


def _mamba(layers=2):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "mamba",
        vocab_size=300,
        hidden_size=64,
        state_size=8,
        num_hidden_layers=layers,
        expand=2,
        conv_kernel=4,
    )
    return cfg, AutoModelForCausalLM.from_config(cfg)


def _mamba_hand_count(cfg, context: int) -> float:
    """Per layer: the in/x/dt/out projections (6 x weights), the depthwise causal convolution
    (2 x channels x kernel per output position, forward + input and weight gradients; the padded
    output has T + kernel - 1 positions) and the scan's state-times-C product (2 x channels x state
    per token, x 3); plus the tied output head."""
    h, c, s, k, r = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.state_size,
        cfg.conv_kernel,
        cfg.time_step_rank,
    )
    proj = h * 2 * c + c * (r + 2 * s) + r * c + c * h
    conv = 3 * 2 * c * k * (context + k - 1) / context
    scan = 3 * 2 * c * s
    return cfg.num_hidden_layers * (6.0 * proj + conv + scan) + 6.0 * cfg.vocab_size * h


def _quiet(_msg):
    pass


# ---------------------------------------------------------------- against hand counts


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query attention
def test_llama_measured_matches_a_hand_count(tied, kv_heads):
    cfg, model = _llama(tied, kv_heads)
    context = 256
    hand = _llama_hand_count(cfg, context)
    got, note = measure_flops_per_token(model, context, budget_s=120)
    assert note == ""  # one pass at the real context, not extrapolated
    assert got == pytest.approx(hand, rel=0.02)
    # building on the meta device gives the same count as stand-ins for the built model's weights
    from transformers import AutoModelForCausalLM

    built, _ = measure_flops_per_token(None, context, build=lambda: AutoModelForCausalLM.from_config(cfg))
    assert built == got
    assert resolve_flops_per_token(model, context, log=_quiet) == (got, "measured")


def test_measuring_leaves_the_model_as_it_was():
    _, model = _llama(tied=False)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_flops_per_token(model, 64)
    assert not model.training and not any(m.training for m in model.modules())
    assert all(p.device.type == "cpu" and p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_mamba_measured_matches_a_hand_count_and_is_below_the_attention_formula():
    cfg, model = _mamba()
    context = 32
    got, note = measure_flops_per_token(model, context, budget_s=600)
    assert note == ""
    assert got == pytest.approx(_mamba_hand_count(cfg, context), rel=0.02)
    # the attention formula adds attention that a state-space model does not have
    from flame.flops import matmul_weights

    attention_formula = 6.0 * matmul_weights(model) + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * context
    assert got < 0.9 * attention_formula
    # the formula flame falls back to has no attention term for it
    assert formula_flops_per_token(model, context) == 6.0 * matmul_weights(model)


@pytest.mark.slow
def test_a_slow_pass_is_extrapolated_exactly_from_short_contexts(monkeypatch):
    """A model whose Python loops over time steps (Mamba's reference scan) is too slow to run at the
    real context; three short ones give F(T) = c + a*T + b*T^2, exact for attention and for scans."""
    real = fl._count_once
    calls = []

    def slow_at_long_contexts(model, context_len, guard, params):
        calls.append(context_len)
        if context_len > max(fl.PROBE_CONTEXTS):
            raise fl._OutOfTime("ran out of time")
        return real(model, context_len, guard, params)

    cases = [(_llama(tied=True), _llama_hand_count, 2048), (_mamba(), _mamba_hand_count, 2048)]
    for (cfg, model), hand, context in cases:
        calls.clear()
        monkeypatch.setattr(fl, "_count_once", slow_at_long_contexts)
        got, note = measure_flops_per_token(model, context, budget_s=600)
        assert calls == [context, *fl.PROBE_CONTEXTS]
        assert "extrapolated" in note
        assert got == pytest.approx(hand(cfg, context), rel=1e-6)
        monkeypatch.setattr(fl, "_count_once", real)
    # the same fit, checked against a direct measurement at a context Mamba can still afford
    cfg, model = _mamba()
    direct, _ = measure_flops_per_token(model, 24, budget_s=600)
    monkeypatch.setattr(fl, "_count_once", slow_at_long_contexts)
    fitted, _ = measure_flops_per_token(model, 24, budget_s=600)
    assert fitted == pytest.approx(direct, rel=1e-9)


def test_a_measurement_past_its_budget_falls_back_to_the_formula(monkeypatch):
    def never_in_time(*a, **k):
        raise fl._OutOfTime("ran out of time")

    monkeypatch.setattr(fl, "_count_once", never_in_time)
    _, model = _mamba()
    lines = []
    value, source = resolve_flops_per_token(model, 2048, log=lines.append, budget_s=0.5)
    assert (value, source) == (formula_flops_per_token(model, 2048), "formula")
    assert "took over" in lines[0] and "model.flops_per_token" in lines[0]


def test_counter_formulas_for_grouped_convolution_and_cpu_attention():
    from torch.utils.flop_counter import FlopCounterMode

    # a depthwise convolution's backward costs two forwards (input and weight gradients); torch's
    # own formula ignores the groups and counts channels x more
    conv = nn.Conv1d(16, 16, kernel_size=4, groups=16, padding=3)
    x = torch.randn(2, 16, 10, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as fc:
        conv(x).sum().backward()
    fwd = 2 * 2 * 16 * 4 * (10 + 3)  # 2 x batch x channels x kernel x output positions
    assert fc.get_total_flops() == 3 * fwd
    # CPU attention runs a fused kernel torch's counter does not know; forward + backward is
    # 3 x (two matmuls of B x H x T x T x D)
    b, h, t, d = 1, 2, 8, 4
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as fc:
        nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert fc.get_total_flops() == 3 * 2 * (2 * b * h * t * t * d)


# ---------------------------------------------------------------- which figure a run uses


class _Declared(nn.Module):
    def __init__(self, figure):
        super().__init__()
        self.out = nn.Linear(8, 8)
        self.num_flops_per_token = figure


class _DataDependent(nn.Module):
    """Reads a value from its activations: cannot run on the meta device."""

    def __init__(self, vocab=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.out = nn.Linear(16, vocab)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return self.out(h) * float(h.detach().abs().max())


class _NumpyInside(nn.Module):
    """Leaves torch for numpy in its forward: a custom kernel the meta device cannot run."""

    def __init__(self, vocab=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.out = nn.Linear(16, vocab)

    def forward(self, input_ids):
        h = torch.from_numpy(self.emb(input_ids).detach().numpy() * 2)
        return self.out(h)


@pytest.mark.slow
def test_priority_user_then_model_then_measured_then_formula():
    cfg, model = _llama(tied=False)
    measured, _ = measure_flops_per_token(model, 128)
    assert resolve_flops_per_token(model, 128, user=5e5, log=_quiet) == (5e5, "user")
    model.num_flops_per_token = 7e5  # the model's own figure beats a measurement...
    assert resolve_flops_per_token(model, 128, log=_quiet) == (7e5, "model")
    assert resolve_flops_per_token(model, 128, user=5e5, log=_quiet) == (5e5, "user")  # ...the user beats it
    del model.num_flops_per_token
    model.flops_per_token = lambda context: 10.0 * context  # a method gets the context length
    assert resolve_flops_per_token(model, 128, log=_quiet) == (1280.0, "model")
    del model.flops_per_token
    assert resolve_flops_per_token(model, 128, log=_quiet) == (measured, "measured")
    assert resolve_flops_per_token(_Declared(42.0), 128, log=_quiet) == (42.0, "model")
    for custom in (_DataDependent(), _NumpyInside()):
        lines = []
        got = resolve_flops_per_token(custom, 128, log=lines.append)
        assert got == (formula_flops_per_token(custom, 128), "formula")
        assert "not measured" in lines[0], lines

    def cannot_build_on_meta():
        return nn.Linear(int(torch.ones(1).sum().item()), 2)  # reads a value while building

    lines = []
    got = resolve_flops_per_token(model, 128, build=cannot_build_on_meta, log=lines.append)
    assert got == (formula_flops_per_token(model, 128), "formula")
    assert "not measured" in lines[0], lines


def test_formula_is_the_documented_one():
    cfg, model = _llama(tied=False)
    h, layers, context = cfg.hidden_size, cfg.num_hidden_layers, 128
    n = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * h  # less the input embedding
    assert formula_flops_per_token(model, context) == 6.0 * n + 12.0 * layers * h * context
    cfg, tied = _llama(tied=True)
    n = sum(p.numel() for p in tied.parameters())  # tied: the embedding is the output head too
    assert formula_flops_per_token(tied, context) == 6.0 * n + 12.0 * layers * h * context
    from flame.model import flops_per_token  # the figure runs used before the measurement

    assert formula_flops_per_token(model, context) == flops_per_token(model, context)


def test_the_log_line_compares_measurement_and_formula():
    cfg, model = _llama(tied=True)
    lines = []
    value, _ = resolve_flops_per_token(model, 128, log=lines.append)
    formula = formula_flops_per_token(model, 128)
    assert lines == [f"FLOPs per token: {value:.4g} measured (formula {formula:.4g}, {value / formula:.2f}x)"]


# ---------------------------------------------------------------- work the counter cannot see


@torch.library.custom_op("flame_test::opaque_linear", mutates_args=())
def _opaque_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


@_opaque_linear.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _opaque_backward(ctx, grad):
    x, w = ctx.saved_tensors
    return _opaque_linear(grad, w.t().contiguous()), _opaque_linear(
        grad.flatten(0, -2).t(), x.flatten(0, -2).t()
    )


_opaque_linear.register_autograd(
    _opaque_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs)
)


class _OpaqueLinear(nn.Linear):
    """A linear layer computed by a kernel the counter has no formula for (like a Triton kernel)."""

    def forward(self, x):
        return _opaque_linear(x, self.weight)


class _Opaque(nn.Module):
    def __init__(self, vocab=64, hidden=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.mid = _OpaqueLinear(hidden, hidden, bias=False)
        self.out = _OpaqueLinear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        return self.out(torch.relu(self.mid(self.emb(input_ids))))


def test_work_hidden_from_the_counter_falls_back_to_the_formula():
    model = _Opaque()
    measured, _ = measure_flops_per_token(model, 16)
    assert measured == 0  # runs on meta, but the counter sees none of it
    lines = []
    assert resolve_flops_per_token(model, 16, log=lines.append) == (
        formula_flops_per_token(model, 16),
        "formula",
    )
    assert "below 6 x the linear layers' weights" in lines[0]


def test_models_of_custom_kernel_packages_use_their_own_figure_or_the_formula():
    class Layer(nn.Linear):
        pass

    Layer.__module__ = "fla.layers.gla"  # the class path of a flash-linear-attention layer
    model = nn.Sequential(nn.Embedding(16, 8), Layer(8, 16))
    lines = []
    assert resolve_flops_per_token(model, 32, log=lines.append)[1] == "formula"
    assert "fla" in lines[0] and "cannot see" in lines[0]
    model.num_flops_per_token = 99.0
    assert resolve_flops_per_token(model, 32, log=_quiet) == (99.0, "model")


def test_mixtures_of_experts_are_not_measured():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "mixtral",
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    lines = []
    assert resolve_flops_per_token(model, 64, log=lines.append) == (
        formula_flops_per_token(model, 64),
        "formula",
    )
    assert "experts" in lines[0]
    with pytest.raises(FlopsNotMeasured, match="experts"):
        measure_flops_per_token(model, 64)
    # by hand: a token runs the attention, the router and 2 of the 4 experts of each layer
    h, i, layers, v, context = 64, 128, 2, 300, 64
    head = h // 4
    attention = h * h + 2 * h * (2 * head) + h * h
    norms = (2 * layers + 1) * h  # the formula's N is every parameter but the input embedding
    active = layers * (attention + h * 4 + 2 * 3 * h * i) + v * h + norms  # v * h: the output head
    assert formula_flops_per_token(model, context) == pytest.approx(
        6.0 * active + 12.0 * layers * h * context
    )


# ---------------------------------------------------------------- fla layers, counted per layer
#
# fla is never imported here (importing it registers its model types with transformers and changes
# what other tests in this worker build): its layers are stood in for by modules whose class has
# fla's module path and name and the attributes fla's constructors set. One child process builds
# the real ones.

C = 64  # the chunk size of fla's chunk kernels (BT = 64)


def _fla_layer(name: str, module: str, **attrs) -> nn.Module:
    """A module that flame takes for fla's `module.name`, with those attributes."""
    cls = type(name, (nn.Module,), {"__module__": module})
    layer = cls()
    for key, value in attrs.items():
        setattr(layer, key, value)
    return layer


def _gla(heads=2, dk=16, dv=32, mode="chunk", hidden=64):
    layer = _fla_layer(
        "GatedLinearAttention", "fla.layers.gla", num_heads=heads, head_k_dim=dk, head_v_dim=dv, mode=mode
    )
    layer.q_proj = nn.Linear(hidden, heads * dk, bias=False)
    layer.k_proj = nn.Linear(hidden, heads * dk, bias=False)
    layer.v_proj = nn.Linear(hidden, heads * dv, bias=False)
    layer.o_proj = nn.Linear(heads * dv, hidden, bias=False)
    return layer


def _per_layer(layer, context=2048) -> float:
    got = fla_flops.layer_forward(layer, context)
    assert isinstance(got, tuple), got
    return got[1]


def test_gla_chunk_form_matches_a_hand_count():
    # heads 2, dk 16, dv 32, chunk 64; per token and head, multiply-add = 2 FLOPs:
    intra_qk = 2 * C * 16  # its row of the chunk's q k^T: 64 keys x 16 dims (full 64, no causal half)
    intra_av = 2 * C * 32  # that row (64 weights) times the chunk's v: 64 x 32
    inter_qs = 2 * 16 * 32  # q times the state S (16 x 32) carried in from earlier chunks
    state = 2 * 16 * 32  # its k^T v added to the state (16 x 32 outer product)
    per_head = intra_qk + intra_av + inter_qs + state
    assert per_head == 2048 + 4096 + 1024 + 1024 == 8192
    assert _per_layer(_gla()) == 2 * per_head == 16384


def test_hgrn2_is_gla_chunk_form_with_the_forget_dim_as_keys():
    # HGRN2 calls chunk_gla with q, 1 - f (head_f_dim = expand_ratio) and the input i (head_i_dim)
    layer = _fla_layer(
        "HGRN2Attention", "fla.layers.hgrn2", num_heads=4, head_f_dim=8, head_i_dim=16, mode="chunk"
    )
    per_head = 2 * C * 8 + 2 * C * 16 + 2 * 8 * 16 + 2 * 8 * 16  # q k^T, A v, q S, k^T v
    assert per_head == 1024 + 2048 + 256 + 256 == 3584
    assert _per_layer(layer) == 4 * per_head == 14336


def test_delta_rule_chunk_form_matches_a_hand_count():
    layer = _fla_layer(
        "DeltaNet", "fla.layers.delta_net", num_heads=2, head_k_dim=16, head_v_dim=32, mode="chunk"
    )
    # heads 2, dk 16, dv 32, chunk 64, per token and head:
    kkt = 2 * C * 16  # A = beta k k^T over the chunk (full 64 x 64)
    # T = (I + A)^-1 by forward substitution: row i is a (1 x i) @ (i x i) product, 2 i^2 FLOPs;
    # sum over i < 64 of 2 i^2 = 63 * 64 * 127 / 3 = 170,688 per chunk, / 64 tokens
    inverse = sum(2 * i * i for i in range(C)) / C
    assert inverse == 170688 / 64 == 2667
    w = 2 * C * 16  # w = T (beta k)
    u = 2 * C * 32  # u = T (beta v)
    v_new = 2 * 16 * 32  # v_new = u - w S
    state = 2 * 16 * 32  # S += k^T v_new
    out = 2 * 16 * 32 + 2 * C * 16 + 2 * C * 32  # o = q S + (q k^T) v_new
    per_head = kkt + inverse + w + u + v_new + state + out
    assert per_head == 2048 + 2667 + 2048 + 4096 + 1024 + 1024 + (1024 + 2048 + 4096) == 20075
    assert _per_layer(layer) == 2 * per_head == 40150


def test_gated_delta_rule_counts_each_value_head():
    # GatedDeltaNet with 2 query/key heads and 4 value heads (GVA): the kernel runs per value head
    layer = _fla_layer(
        "GatedDeltaNet",
        "fla.layers.gated_deltanet",
        num_heads=2,
        num_v_heads=4,
        head_k_dim=16,
        head_v_dim=32,
        mode="fused_recurrent",  # ignored: the layer trains in chunk mode whatever its mode
    )
    assert _per_layer(layer) == 4 * 20075 == 80300  # the delta rule's per-head count above


def test_rwkv7_chunk_form_matches_a_hand_count():
    layer = _fla_layer(
        "RWKV7Attention", "fla.layers.rwkv7", num_heads=2, head_dim=16, head_v_dim=32, mode="chunk"
    )
    # heads 2, dk 16, dv 32, chunk 64, per token and head:
    intra = 4 * 2 * C * 16  # A_qk = q k^T, A_qb = q b^T, A_ak = a k^T, A_ab = a b^T
    inverse = 2667  # (I - A_ab)^-1, as the delta rule's
    inv_ak = 2 * C * C  # (I - A_ab)^-1 A_ak: a 64 x 64 x 64 product per chunk
    w = 2 * C * 16  # w = (I - A_ab)^-1 a
    u = 2 * C * 32  # u = ((I - A_ab)^-1 A_ak) v
    v_new = 2 * 16 * 32  # v_new = w S + u
    state = 2 * 16 * 32 + 2 * 16 * 32  # S += k^T v + b^T v_new
    out = 2 * 16 * 32 + 2 * C * 32 + 2 * C * 32  # o = q S + A_qk v + A_qb v_new
    per_head = intra + inverse + inv_ak + w + u + v_new + state + out
    assert per_head == 8192 + 2667 + 8192 + 2048 + 4096 + 1024 + 2048 + (1024 + 4096 + 4096) == 37483
    assert _per_layer(layer) == 2 * per_head == 74966


def test_mamba2_ssd_matches_a_hand_count():
    layer = _fla_layer(
        "Mamba2", "fla.layers.mamba2", num_heads=4, head_dim=32, ssm_state_size=16, n_groups=2, chunk_size=64
    )
    # heads 4, head dim P 32, state N 16, groups 2, chunk 64 (Mamba2's own chunk_size), per token:
    cb = 2 * (2 * C * 16)  # C B^T over the chunk, once per group (2 groups): 64 x 16 each
    y_diag = 4 * (2 * C * 32)  # per head, (L o C B^T) x: its 64 weights times x (64 x 32)
    states = 4 * (2 * 16 * 32)  # per head, the chunk state B^T x: its 16 x 32 outer product
    y_off = 4 * (2 * 16 * 32)  # per head, C times the state carried in (16 x 32)
    assert _per_layer(layer) == cb + y_diag + states + y_off == 4096 + 16384 + 4096 + 4096 == 28672


def test_fla_softmax_attention_counts_the_full_context():
    layer = _fla_layer("Attention", "fla.layers.attn", num_heads=4, head_dim=16, window_size=None)
    # q k^T and the product with v over all 256 positions (full T x T, as flame counts attention)
    assert _per_layer(layer, context=256) == 4 * (2 * 256 * 16 + 2 * 256 * 16) == 65536


# plain PyTorch references of the chunked algorithms for one layer (B 1, float64), each checked
# against the token-by-token recurrence it computes, then counted by torch's FLOP counter


def _counted(fn, *args):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args)
    return out, counter.get_total_flops()


def _chunks(x, c=C):  # [H, T, D] -> [H, T / c, c, D]
    return x.unflatten(1, (-1, c))


def _gla_chunked(q, k, v, g):
    """GLA's chunk form: intra-chunk (q Gamma)(k / Gamma)^T masked, inter-chunk q S, state update."""
    heads, t, dk = q.shape
    s = q.new_zeros(heads, dk, v.shape[-1])
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    out = []
    for qc, kc, vc, gc in zip(*(_chunks(x).unbind(1) for x in (q, k, v, g)), strict=True):
        b = gc.cumsum(1)  # log decay from the chunk's start, per key dim
        qg, kg = qc * b.exp(), kc * (-b).exp()
        a = (qg @ kg.transpose(1, 2)).masked_fill(~causal, 0)  # full C x C, then masked
        out.append(a @ vc + qg @ s)
        last = b[:, -1:]
        s = last.exp().transpose(1, 2) * s + (kc * (last - b).exp()).transpose(1, 2) @ vc
    return torch.cat(out, 1)


def _gla_recurrent(q, k, v, g):
    s = q.new_zeros(q.shape[0], q.shape[2], v.shape[2])
    out = []
    for i in range(q.shape[1]):
        s = g[:, i].exp()[..., None] * s + k[:, i, :, None] * v[:, i, None, :]
        out.append((q[:, i, None, :] * s.transpose(1, 2)).sum(-1))
    return torch.stack(out, 1)


def _inverse_unit_lower(a):
    """(I + a)^-1 for strictly lower-triangular a [H, C, C], by forward substitution."""
    x = torch.eye(a.shape[-1], dtype=a.dtype).repeat(a.shape[0], 1, 1)
    for i in range(1, a.shape[-1]):
        x[:, i : i + 1, :i] = -(a[:, i : i + 1, :i] @ x[:, :i, :i])  # (1 x i) @ (i x i)
    return x


def _delta_chunked(q, k, v, beta):
    """The delta rule's chunk form with the WY representation, as fla's chunk_delta_rule."""
    heads, t, dk = q.shape
    s = q.new_zeros(heads, dk, v.shape[-1])
    strict = torch.ones(C, C, dtype=torch.bool).tril(-1)
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    out = []
    for qc, kc, vc, bc in zip(*(_chunks(x).unbind(1) for x in (q, k, v, beta)), strict=True):
        kb, vb = kc * bc, vc * bc
        a = (kb @ kc.transpose(1, 2)).masked_fill(~strict, 0)  # beta k k^T
        tinv = _inverse_unit_lower(a)
        w, u = tinv @ kb, tinv @ vb
        v_new = u - w @ s
        qk = (qc @ kc.transpose(1, 2)).masked_fill(~causal, 0)
        out.append(qc @ s + qk @ v_new)
        s = s + kc.transpose(1, 2) @ v_new
    return torch.cat(out, 1)


def _delta_recurrent(q, k, v, beta):
    s = q.new_zeros(q.shape[0], q.shape[2], v.shape[2])
    out = []
    for i in range(q.shape[1]):
        ki, vi = k[:, i], v[:, i]
        pred = (ki[..., None] * s).sum(1)  # k S
        s = s + beta[:, i, :, None] * ki[..., None] * (vi - pred)[:, None, :]
        out.append((q[:, i, :, None] * s).sum(1))
    return torch.stack(out, 1)


def _qkv(heads=2, dk=16, dv=32, t=2 * C, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(heads, t, dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(heads, t, dv, generator=gen, dtype=torch.float64)
    return q, k, v, gen


def test_gla_count_equals_a_counted_pytorch_reference_of_the_chunk_form():
    q, k, v, gen = _qkv()
    g = -0.1 * torch.rand(q.shape, generator=gen, dtype=torch.float64)  # log decays per key dim
    got, flops = _counted(_gla_chunked, q, k, v, g)
    torch.testing.assert_close(got, _gla_recurrent(q, k, v, g))  # it is GLA
    assert flops / q.shape[1] == _per_layer(_gla(heads=2, dk=16, dv=32)) == 16384


def test_delta_rule_count_equals_a_counted_pytorch_reference_of_the_chunk_form():
    q, k, v, gen = _qkv()
    k = k / k.norm(dim=-1, keepdim=True)  # fla's DeltaNet l2-normalizes q and k
    q = q / q.norm(dim=-1, keepdim=True)
    beta = torch.rand(2, q.shape[1], 1, generator=gen, dtype=torch.float64)
    got, flops = _counted(_delta_chunked, q, k, v, beta)
    torch.testing.assert_close(got, _delta_recurrent(q, k, v, beta))  # it is the delta rule
    layer = _fla_layer(
        "DeltaNet", "fla.layers.delta_net", num_heads=2, head_k_dim=16, head_v_dim=32, mode="chunk"
    )
    assert flops / q.shape[1] == _per_layer(layer) == 40150


def _dplr_chunked(q, k, v, a, b):
    """RWKV-7's chunk form (fla's chunk_dplr_delta_rule) without its decays, which are element-wise
    and change no count: S_t = S_{t-1} + k_t^T v_t + b_t^T (a_t S_{t-1})."""
    heads, t, dk = q.shape
    s = q.new_zeros(heads, dk, v.shape[-1])
    strict = torch.ones(C, C, dtype=torch.bool).tril(-1)
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    out = []
    for qc, kc, vc, ac, bc in zip(*(_chunks(x).unbind(1) for x in (q, k, v, a, b)), strict=True):
        a_qk = (qc @ kc.transpose(1, 2)).masked_fill(~causal, 0)
        a_qb = (qc @ bc.transpose(1, 2)).masked_fill(~causal, 0)
        a_ak = (ac @ kc.transpose(1, 2)).masked_fill(~strict, 0)
        a_ab = (ac @ bc.transpose(1, 2)).masked_fill(~strict, 0)
        tinv = _inverse_unit_lower(-a_ab)  # (I - A_ab)^-1
        w, u = tinv @ ac, (tinv @ a_ak) @ vc
        v_new = w @ s + u  # a_t S_{t-1} for each row of the chunk
        out.append(qc @ s + a_qk @ vc + a_qb @ v_new)
        s = s + kc.transpose(1, 2) @ vc + bc.transpose(1, 2) @ v_new
    return torch.cat(out, 1)


def _dplr_recurrent(q, k, v, a, b):
    s = q.new_zeros(q.shape[0], q.shape[2], v.shape[2])
    out = []
    for i in range(q.shape[1]):
        sa = (a[:, i, :, None] * s).sum(1)  # a S
        s = s + k[:, i, :, None] * v[:, i, None, :] + b[:, i, :, None] * sa[:, None, :]
        out.append((q[:, i, :, None] * s).sum(1))
    return torch.stack(out, 1)


def test_rwkv7_count_equals_a_counted_pytorch_reference_of_the_chunk_form():
    q, k, v, gen = _qkv()
    kk = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    kk = kk / kk.norm(dim=-1, keepdim=True)
    a, b = -kk, kk * torch.rand(q.shape, generator=gen, dtype=torch.float64)  # as RWKV7Attention: -kk, kk a
    got, flops = _counted(_dplr_chunked, q, k, v, a, b)
    torch.testing.assert_close(got, _dplr_recurrent(q, k, v, a, b))
    layer = _fla_layer("RWKV7Attention", "fla.layers.rwkv7", num_heads=2, head_dim=16, head_v_dim=32)
    assert flops / q.shape[1] == _per_layer(layer) == 74966


def _ssd_chunked(x, da, b, c, chunk):
    """Mamba2's SSD chunk scan (x already scaled by dt): x [H, T, P], da [H, T] log decays,
    b and c [G, T, N] shared by the H / G heads of each group."""
    heads, groups = x.shape[0], b.shape[0]
    group = torch.arange(heads) // (heads // groups)
    s = x.new_zeros(heads, b.shape[-1], x.shape[-1])
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    out = []
    for xc, dac, bc, cc in zip(*(z.unflatten(1, (-1, chunk)).unbind(1) for z in (x, da, b, c)), strict=True):
        seg = dac.cumsum(-1)  # [H, chunk]
        decay = (seg[:, :, None] - seg[:, None, :]).masked_fill(~causal, float("-inf")).exp()
        cb = cc @ bc.transpose(1, 2)  # per group, the full chunk x chunk
        ch, bh = cc[group], bc[group]  # each head its group's C and B (a copy, no arithmetic)
        y_diag = (cb[group] * decay) @ xc
        y_off = seg.exp()[..., None] * (ch @ s)
        out.append(y_diag + y_off)
        last = seg[:, -1:]
        s = last.exp()[..., None] * s + (bh * (last - seg).exp()[..., None]).transpose(1, 2) @ xc
    return torch.cat(out, 1)


def _ssd_recurrent(x, da, b, c):
    heads, groups = x.shape[0], b.shape[0]
    group = torch.arange(heads) // (heads // groups)
    s = x.new_zeros(heads, b.shape[-1], x.shape[-1])
    out = []
    for i in range(x.shape[1]):
        bi, ci = b[group, i], c[group, i]  # [H, N]
        s = da[:, i, None, None].exp() * s + bi[:, :, None] * x[:, i, None, :]
        out.append((ci[:, :, None] * s).sum(1))
    return torch.stack(out, 1)


def test_mamba2_count_equals_a_counted_pytorch_reference_of_the_ssd_chunk_scan():
    heads, p, n, groups, chunk, t = 4, 32, 16, 2, 64, 128
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(heads, t, p, generator=gen, dtype=torch.float64)
    da = -0.1 * torch.rand(heads, t, generator=gen, dtype=torch.float64)
    b, c = (torch.randn(groups, t, n, generator=gen, dtype=torch.float64) for _ in range(2))
    got, flops = _counted(_ssd_chunked, x, da, b, c, chunk)
    torch.testing.assert_close(got, _ssd_recurrent(x, da, b, c))
    layer = _fla_layer(
        "Mamba2",
        "fla.layers.mamba2",
        num_heads=heads,
        head_dim=p,
        ssm_state_size=n,
        n_groups=groups,
        chunk_size=chunk,
    )
    assert flops / t == _per_layer(layer) == 28672


def _fake_fla_model(layers, vocab=100, hidden=64):
    """An fla-shaped causal LM: embedding, the given token mixers, an MLP each, an untied head."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, hidden)
            self.mixers = nn.ModuleList(layers)
            self.mlps = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in layers)
            self.head = nn.Linear(hidden, vocab, bias=False)

        def get_input_embeddings(self):
            return self.emb

        def get_output_embeddings(self):
            return self.head

    Model.__module__ = "fla.models.gla.modeling_gla"
    return Model()


def test_an_fla_model_counts_weights_and_each_layers_token_mixing():
    model = _fake_fla_model([_gla(), _gla()])
    context = 2048
    n = sum(p.numel() for p in model.parameters()) - 100 * 64  # all but the untied input embedding
    core = 16384  # per layer, the hand count above
    lines = []
    got = resolve_flops_per_token(model, context, log=lines.append)
    assert got == (6.0 * n + 3.0 * 2 * core, "formula")
    assert got[0] == formula_flops_per_token(model, context)
    # neither the bare 6N (the token mixing missing) nor softmax attention's 12 x layers x d x T
    assert 6.0 * n < got[0] < 6.0 * n + 12.0 * 2 * (2 * 32) * context
    mixing = 3.0 * 2 * core
    assert lines == [
        f"FLOPs per token: {got[0]:.4g} by the formula, fla layers' token mixing counted per layer "
        f"(2 x GLA chunk form: {mixing:.4g}, {mixing / got[0]:.1%} of the total)"
    ]
    # independent of the context beyond softmax attention: the same per token at 4x the context
    assert formula_flops_per_token(model, 4 * context) == got[0]
    # the user's figure and the model's own still come first
    assert resolve_flops_per_token(model, context, user=123.0, log=_quiet) == (123.0, "user")
    model.num_flops_per_token = 99.0
    assert resolve_flops_per_token(model, context, log=_quiet) == (99.0, "model")


def test_fla_modules_inside_a_counted_layer_and_outside_the_layers_are_covered():
    rwkv = _fla_layer("RWKV7Attention", "fla.layers.rwkv7", num_heads=2, head_dim=16, head_v_dim=32)
    rwkv.w_lora = _fla_layer("LoRA", "fla.layers.rwkv6")  # fla's RWKV7Attention holds fla.layers.rwkv6.LoRA
    norm = _fla_layer("RMSNorm", "fla.modules.layernorm")
    model = _fake_fla_model([rwkv, norm])
    cores = fla_flops.fla_cores(model, 2048)
    assert (cores.forward, cores.layers, cores.uncounted) == (74966, {"RWKV-7 chunk form": 1}, [])
    # a layer on its own is counted the same, its LoRA still its own
    assert fla_flops.fla_cores(rwkv, 2048).forward == 74966
    assert fla_flops.fla_cores(rwkv, 2048).uncounted == []
    # a name alone is not enough where it is as common as "Attention": fla's is fla.layers.attn's
    other = _fla_layer("Attention", "fla.layers.other", num_heads=4, head_dim=16)
    assert fla_flops.layer_forward(other, 256) is None


def test_an_unknown_fla_layer_keeps_the_message_that_the_counter_cannot_see_it():
    unknown = _fla_layer("RWKV6Attention", "fla.layers.rwkv6")
    lines = []
    model = _fake_fla_model([_gla(), unknown])
    value, source = resolve_flops_per_token(model, 2048, log=lines.append)
    assert source == "formula" and value == formula_flops_per_token(model, 2048)
    assert "RWKV6Attention comes from fla, whose kernels the FLOP counter cannot see" in lines[0]
    # a known class in a form flame does not count
    lines.clear()
    resolve_flops_per_token(_fake_fla_model([_gla(mode="fused_recurrent")]), 2048, log=lines.append)
    assert "GatedLinearAttention in mode 'fused_recurrent'" in lines[0] and "cannot see" in lines[0]


def test_gla_340m_token_mixing_is_a_few_percent_of_6n():
    """configs/models/gla-340m.json's shape: 24 layers, hidden 1024, 4 heads, key 512 / value 1024."""
    per_layer = _per_layer(_gla(heads=4, dk=128, dv=256))
    assert per_layer == 4 * (2 * C * (128 + 256) + 4 * 128 * 256) == 720896
    n = 341707776  # its matmul weights (untied head included, input embedding not)
    share = 3 * 24 * per_layer / (6 * n)
    assert share == pytest.approx(0.0253, abs=1e-4)  # vs 0.295 for softmax attention at 2048


# Run in a child: real fla 0.6.0 layers of each family, built on the meta device (no kernels run).
# The per-layer terms are computed here from the real modules' attributes, checked against their
# projections' shapes, so a wrong attribute name or meaning in flame.fla_flops shows.
FLA_CHILD = r"""
import json, warnings
warnings.filterwarnings("ignore")
from flame import fla_cpu
fla_cpu.enable()
import fla  # noqa: F401  (registers fla's model types with the Auto classes)
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging
from flame.flops import active_matmul_weights, resolve_flops_per_token
logging.set_verbosity_error()
C, T = 64, 256
D_INV = (C - 1) * (2 * C - 1) / 3

def term(m):
    name = type(m).__name__
    if name == "GatedLinearAttention":
        h, k, v = m.num_heads, m.head_k_dim, m.head_v_dim
        assert m.q_proj.out_features == h * k and m.o_proj.in_features == h * v
        return h * (2 * C * (k + v) + 4 * k * v)
    if name == "HGRN2Attention":
        h, k, v = m.num_heads, m.head_f_dim, m.head_i_dim
        assert m.q_proj.out_features == h * k and m.i_proj.out_features == h * v
        return h * (2 * C * (k + v) + 4 * k * v)
    if name in ("DeltaNet", "GatedDeltaNet"):
        h = getattr(m, "num_v_heads", m.num_heads)
        k, v = m.head_k_dim, m.head_v_dim
        assert m.q_proj.out_features == m.num_heads * k and m.v_proj.out_features == h * v
        return h * (6 * C * k + 4 * C * v + 6 * k * v + D_INV)
    if name == "RWKV7Attention":
        h, k, v = m.num_heads, m.head_dim, m.head_v_dim
        assert m.r_proj.out_features == h * k and m.v_proj.out_features == h * v
        return h * (10 * C * k + 6 * C * v + 2 * C * C + 8 * k * v + D_INV)
    if name == "Mamba2":
        h, p, n, g, c = m.num_heads, m.head_dim, m.ssm_state_size, m.n_groups, m.chunk_size
        assert m.in_proj.out_features == 2 * h * p + 2 * g * n + h
        return g * 2 * c * n + h * (2 * c * p + 4 * n * p)
    return None

small = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2)
cases = {
    "gla": dict(num_heads=2, num_kv_heads=1),
    "delta_net": dict(num_heads=2),
    "gated_deltanet": dict(num_heads=2, num_v_heads=4, head_dim=16),
    "hgrn2": dict(num_heads=2, expand_ratio=16),
    "rwkv7": dict(head_dim=16),
    "mamba2": dict(num_heads=4, head_dim=32, state_size=16, expand=2, n_groups=2, chunk_size=128),
}
out = {}
for family, over in cases.items():
    cfg = AutoConfig.for_model(family, **small, **over)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    terms = [t for t in map(term, model.modules()) if t is not None]
    lines = []
    value, source = resolve_flops_per_token(model, T, log=lines.append)
    out[family] = dict(
        value=value, source=source, line=lines[0], layers=len(terms),
        expected=6.0 * active_matmul_weights(model) + 3.0 * sum(terms),
        bare=6.0 * active_matmul_weights(model),
    )
print("FLA " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("fla") is None, reason="flash-linear-attention (fla) is not installed"
)
def test_real_fla_models_of_each_family_are_counted_per_layer():
    proc = subprocess.run([sys.executable, "-c", FLA_CHILD], capture_output=True, text=True, timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FLA ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[0][4:])
    assert set(got) == {"gla", "delta_net", "gated_deltanet", "hgrn2", "rwkv7", "mamba2"}
    for family, r in got.items():
        assert r["layers"] == 2, (family, r)
        assert r["source"] == "formula" and "counted per layer (2 x " in r["line"], (family, r)
        assert r["value"] == r["expected"] > r["bare"], (family, r)


# ---------------------------------------------------------------- cost


@pytest.mark.slow
def test_cost_of_a_measurement_for_llama_125m_at_context_2048(record_property, capsys):
    """Reported, not asserted: the time depends on the machine and its load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)  # as an FSDP run with parallel.init meta has it
    measure_flops_per_token(model, 64, budget_s=600)  # the first use of meta kernels imports a lot
    t0 = time.perf_counter()
    got, note = measure_flops_per_token(model, 2048, budget_s=600)
    seconds = time.perf_counter() - t0
    assert note == ""
    assert got == pytest.approx(_llama_hand_count(cfg, 2048), rel=0.02)
    record_property("llama_125m_2048_seconds", round(seconds, 3))
    with capsys.disabled():
        print(f"\n[flops] llama-125m at context 2048: {got:.4g} FLOPs/token measured in {seconds:.2f}s")
