"""The fused loss (hidden states -> head -> cross-entropy in chunks) equals the logits path:
losses and every parameter's gradient, for the model families whose heads differ (tied, untied,
biased, scaled, soft-capped, a mixture of experts; fla families in tests/test_fla.py), and it never allocates [B, T, V]."""


import pytest
import torch
import torch.nn.functional as F
from conftest import metrics, tiny_overrides
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from zoo import ZOO

import flame.loss as loss_mod
from flame.config import load_config
from flame.errors import ConfigError, FlameError
from flame.head import TokenLoss, _apply_ops, fused_ce, head_verdict, token_loss
from flame.loss import per_token_ce
from flame.model import forward_params
from flame.parallel import unwrap
from flame.trainer import Trainer, run_training

VOCAB = 300
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip

FAMILIES = {
    "llama-tied": dict(ZOO["llama"], tie_word_embeddings=True),
    "llama-untied": dict(ZOO["llama"], tie_word_embeddings=False),
    "qwen3": ZOO["qwen3"],
    "gemma2-softcap": dict(ZOO["gemma2"], final_logit_softcapping=3.0),
    "cohere-logit-scale": dict(model_type="cohere", logit_scale=0.37, **_SMALL),
    "granite-logits-scaling": dict(model_type="granite", logits_scaling=2.5, **_SMALL),
    "phi-head-bias": dict(model_type="phi", **_SMALL),
    "qwen3_moe-router-loss": dict(ZOO["qwen3_moe"], output_router_logits=True, router_aux_loss_coef=0.02),
}


def _hf_model(fields: dict, vocab: int = VOCAB) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    cfg = AutoConfig.for_model(fields.pop("model_type"), vocab_size=vocab, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # a head with a real bias (transformers starts it at zero)
        head = model.get_output_embeddings()
        if head.bias is not None:
            head.bias.normal_(0, 0.5)
    return model.train()


def _batch(b: int = 2, t: int = 33, vocab: int = VOCAB) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, 5] = labels[1, 20] = -100
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model: nn.Module, loss: TokenLoss, batch: dict, coef: float = 0.0):
    model.zero_grad(set_to_none=True)
    total, ce, aux = loss(model, batch, forward_params(model))
    objective = total * 0.01
    if aux is not None and coef:
        objective = objective + coef * aux.float()
    objective.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(total), ce, grads


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """Every element within rel x the tensor's largest magnitude (fp32 sums in another order)."""
    scale = float(want.abs().max())
    err = float((got.double() - want.double()).abs().max())
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3g} of scale {scale:.3g}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_equals_logits_path(family):
    model = _hf_model(FAMILIES[family])
    accepts = forward_params(model)
    ops, why = head_verdict(model, "fused", accepts, VOCAB)
    assert why == ""
    if family.startswith(("gemma2", "cohere", "granite")):
        assert ops, "the transform on the logits was not found"
    fused = token_loss(model, (ops, why), chunk_tokens=16)  # several chunks
    assert fused.fused
    coef = getattr(model.config, "router_aux_loss_coef", 0.0) if "moe" in family else 0.0
    batch = _batch()
    l_ref, ce_ref, g_ref = _loss_and_grads(model, TokenLoss(), batch, coef)
    l_got, ce_got, g_got = _loss_and_grads(model, fused, batch, coef)
    assert abs(l_got - l_ref) <= 1e-6 * abs(l_ref)
    assert ce_got.shape == ce_ref.shape == (2, 32)
    assert float(ce_got[0, 4]) == 0.0 and float(ce_got[1, 19]) == 0.0  # -100 targets count nothing
    assert_rel_close(ce_got, ce_ref, 1e-6, "per-token loss")
    assert g_got.keys() == g_ref.keys() == {n for n, _ in model.named_parameters()}
    for k in g_ref:
        assert_rel_close(g_got[k], g_ref[k], 1e-6, k)


def test_an_undeclared_transform_falls_back_and_fused_is_refused(capsys):
    """A model that doubles its logits after the head, without saying so: the probe sees it, auto
    takes the logits path, model.loss = fused is a clear error."""
    model = _hf_model(FAMILIES["llama-untied"])
    inner = type(model).forward

    class Doubling(type(model)):
        def forward(self, *a, **kw):
            out = inner(self, *a, **kw)
            out.logits = out.logits * 2.0
            return out

    model.__class__ = Doubling
    accepts = forward_params(model)
    ops, why = head_verdict(model, "auto", accepts, VOCAB)
    assert "not its head's output" in why
    assert not token_loss(model, (ops, why)).fused
    with pytest.raises(ConfigError, match="model.loss = fused.*--model.loss logits"):
        head_verdict(model, "fused", accepts, VOCAB)
    # a softcap flame knows of, but whose value the model does not use, is caught the same way
    gemma = _hf_model(FAMILIES["gemma2-softcap"])
    gemma.config.final_logit_softcapping = 30.0
    _, why = head_verdict(gemma, "auto", forward_params(gemma), VOCAB)
    assert why == ""  # the model reads its config: the probe follows it
    model_ops = (("softcap", 5.0),)
    from flame.head import _probe

    assert "differ" in _probe(gemma, model_ops, forward_params(gemma), VOCAB)


class _Custom(nn.Module):
    """A bigram model with an output head and one thing done to its logits after it."""

    def __init__(self, after: str):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.after = after
        if after == "zero head, undeclared cap":
            nn.init.zeros_(self.head.weight)
        self.temperature = nn.Parameter(torch.ones(())) if after == "learned temperature" else None
        self.logit_bias = nn.Parameter(torch.zeros(VOCAB)) if after == "learned logit bias" else None

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        z = self.head(self.emb(input_ids))
        if self.after == "zero head, undeclared cap":
            z = torch.tanh(z / 15) * 15 * 0.5
        elif self.after == "learned temperature":
            z = z / self.temperature
        elif self.after == "learned logit bias":
            z = z + self.logit_bias
        elif self.after == "only in training" and self.training:
            z = z / 2.0
        elif self.after == "clamp at 45":
            z = z.clamp(-45, 45)
        elif self.after == "head twice in training" and self.training:
            z = z + 0 * self.head(self.emb(input_ids))
        return z


@pytest.mark.parametrize(
    "after",
    [
        "zero head, undeclared cap",
        "learned temperature",
        "learned logit bias",
        "only in training",
        "clamp at 45",
        "head twice in training",
    ],
)
def test_the_probe_sees_what_a_model_does_after_its_head(after):
    """Each of these is invisible at initialisation, in eval mode or for logits below +-40; the
    probe refuses them all (the fused path would train another loss, or not train a parameter)."""
    model = _Custom(after)
    accepts = forward_params(model)
    frozen = model.emb.train(False)  # a submodule kept in eval: the probe leaves it so
    ops, why = head_verdict(model, "auto", accepts, VOCAB)
    assert why, after
    assert not frozen.training and model.training
    with pytest.raises(ConfigError, match="model.loss = fused"):
        head_verdict(model, "fused", accepts, VOCAB)
    plain = _Custom("nothing")
    assert head_verdict(plain, "fused", forward_params(plain), VOCAB) == ((), "")


def test_the_fused_loss_refuses_a_second_backward_and_skips_gradients_without_grad():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(VOCAB, 16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9))
    total, _ = fused_ce(h, w, None, labels)
    total.backward(retain_graph=True)
    with pytest.raises(FlameError, match="back-propagated twice"):
        total.backward()
    guard = _SizeGuard(VOCAB * 16)
    with torch.no_grad(), guard:
        fused_ce(h, w, None, labels)
    made = [(f, shape) for f, shape in guard.big if "detach" not in f and ".t." not in f]
    assert made and all(shape != (VOCAB, 16) for _, shape in made), made  # no [V, H] gradient


def test_a_model_without_a_reachable_head_takes_the_logits_path(tmp_path, corpus):
    over = tiny_overrides(tmp_path / "r", corpus, **{"model.name": "models_for_tests:bigram"})
    over.pop("model.overrides", None)
    t = Trainer(load_config(overrides=over))
    t.setup()
    try:
        assert not t.loss.fused and "get_output_embeddings" in t.loss.reason
    finally:
        t.close()
    over["model.loss"] = "fused"
    over["train.run_dir"] = str(tmp_path / "f")
    t = Trainer(load_config(overrides=over))
    with pytest.raises(ConfigError, match="get_output_embeddings"):
        t.setup()
    t.close()


class _SizeGuard(TorchDispatchMode):
    """Records every op output of at least `limit` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.big, self.storages = limit, [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit:
                self.big.append((str(func), tuple(t.shape)))
                self.storages.add(t.untyped_storage().data_ptr())
        return out


def test_fused_path_never_allocates_the_logits():
    """Forward and backward of a real llama under a dispatch guard: no tensor of [B, T, V]
    elements (nor half of it) in the fused path; the logits path has them (the guard can fail)."""
    vocab = 4000  # [B, T, V] / 2 is larger than the attention scores and the embedding
    model = _hf_model(FAMILIES["llama-untied"], vocab)
    accepts = forward_params(model)
    batch = _batch(b=2, t=128, vocab=vocab)
    n_logits = 2 * 128 * vocab
    fused = token_loss(model, head_verdict(model, "fused", accepts, vocab), chunk_tokens=16)
    for loss, want_big in ((fused, False), (TokenLoss(), True)):
        model.zero_grad(set_to_none=True)
        guard = _SizeGuard(n_logits // 2)
        with guard:
            total, _, _ = loss(model, batch, accepts)
            total.backward()
        assert bool(guard.big) == want_big, guard.big
    # the logits path allocates one [B*T, V] tensor of its own (the logits' gradient), no more
    logits = torch.randn(2, 128, vocab, requires_grad=True)
    guard = _SizeGuard(n_logits // 2)
    with guard:
        per_token_ce(logits, batch["labels"]).sum().backward()
    own = {s for s in guard.storages if s != logits.untyped_storage().data_ptr()}
    assert len(own) == 1, guard.big


def test_logits_path_equals_f_cross_entropy_in_fp32_and_bf16(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMS", 50 * 7)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, 5] = -100
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(3, 17, 50).to(dtype).requires_grad_()
        want = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="none"
        )
        w = torch.rand(3 * 16)  # a different weight per token: the per-token gradient is exact
        (g_want,) = torch.autograd.grad((want * w).sum(), logits)
        got = per_token_ce(logits, labels)
        (g_got,) = torch.autograd.grad((got.reshape(-1) * w).sum(), logits)
        assert g_got.dtype == dtype
        torch.testing.assert_close(got.reshape(-1), want)
        torch.testing.assert_close(g_got, g_want)


def test_fused_under_bf16_autocast_is_close_and_accumulates_in_fp32():
    torch.manual_seed(0)
    h = torch.randn(2, 40, 32, requires_grad=True)
    w = (torch.randn(500, 32) * 0.3).requires_grad_()
    labels = torch.randint(0, 500, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = per_token_ce(F.linear(h, w), labels).sum()
    g_ref = torch.autograd.grad(ref, [h, w])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = fused_ce(h, w, None, labels, chunk_tokens=8)
    g_got = torch.autograd.grad(got, [h, w])
    assert got.dtype == torch.float32 and abs(float(got) - float(ref)) < 1e-2 * abs(float(ref))
    assert g_got[0].dtype == h.dtype and g_got[1].dtype == w.dtype
    for a, b in zip(g_got, g_ref):
        assert_rel_close(a, b, 2e-2, "bf16 gradient")


def test_ops_reproduce_the_models_arithmetic():
    z = torch.linspace(-80, 80, 101, dtype=torch.float64).requires_grad_()
    ops = (("mul", 0.5), ("div", 1.5), ("softcap", 20.0))
    want = torch.tanh(z * 0.5 / 1.5 / 20.0) * 20.0
    assert torch.allclose(_apply_ops(z, ops), want)


def _one_step(tmp_path, corpus, name, **extra):
    over = tiny_overrides(tmp_path / name, corpus, **{"data.varlen": True, "data.context_len": 48, **extra})
    t = Trainer(load_config(overrides=over))
    t.setup()
    try:
        it = iter(t.loader)
        micro = [next(it) for _ in range(t.cfg.train.grad_accum)]
        loss_sum, targets = t.train_step(micro)
        grads = {n: p.grad.detach().clone() for n, p in unwrap(t.model).named_parameters()}
        return t.loss.fused, float(loss_sum), targets, grads
    finally:
        t.close()


@pytest.mark.slow
def test_trainer_fused_accumulation_equals_one_batch_and_the_logits_path(tmp_path, corpus):
    """grad_accum 3 x batch 2 (fused) = batch 6 (fused) = batch 6 (logits), with varlen."""
    f6, l6, n6, g6 = _one_step(tmp_path, corpus, "f6", **{"data.batch_size": 6})
    f2, l2, n2, g2 = _one_step(tmp_path, corpus, "f2", **{"data.batch_size": 2, "train.grad_accum": 3})
    fl, ll, nl, gl = _one_step(tmp_path, corpus, "l6", **{"data.batch_size": 6, "model.loss": "logits"})
    assert (f6, f2, fl) == (True, True, False)
    assert n6 == n2 == nl
    for other, loss in ((g2, l2), (gl, ll)):
        assert abs(loss - l6) <= 1e-6 * abs(l6)
        for k in g6:
            assert_rel_close(other[k], g6[k], 1e-6, k)


@pytest.mark.slow
def test_per_source_losses_equal_on_both_paths(tmp_path):
    from conftest import make_token_store

    make_token_store(tmp_path / "a", 40, seed=1)
    make_token_store(tmp_path / "b", 40, seed=2)
    recs = {}
    for mode in ("fused", "logits"):
        over = tiny_overrides(
            tmp_path / mode,
            tmp_path,
            **{
                "data.inputs": [],
                "data.mix": f"a={tmp_path / 'a'}:0.4,b={tmp_path / 'b'}:0.6",
                "data.context_len": 32,
                "data.batch_size": 8,
                "train.max_steps": 4,
                "log.interval": 2,
                "model.loss": mode,
            },
        )
        run_training(load_config(overrides=over))
        recs[mode] = [r for r in metrics(tmp_path / mode) if r["kind"] == "train"]
    for rf, rl in zip(recs["fused"], recs["logits"]):
        assert rf["target_tokens"] == rl["target_tokens"]
        assert abs(rf["loss"] - rl["loss"]) <= 1e-5 * rl["loss"]
        for name in ("a", "b"):
            sf, sl = rf["sources"][name], rl["sources"][name]
            assert sf["target_tokens"] == sl["target_tokens"]
            assert abs(sf["loss"] - sl["loss"]) <= 1e-5 * sl["loss"]
