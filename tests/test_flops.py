"""Training FLOPs per token for MFU: the measurement on the meta device against hand counts, its
fallbacks, and the order user > model > measured > formula."""

import time

import pytest
import torch
from torch import nn

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
