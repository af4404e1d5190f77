"""optim.name = muon: Muon (torch.optim.Muon) on the hidden matrices, AdamW on the rest, as one
optimizer; the same weights whatever the split of the global batch (ranks, DDP or FSDP2,
accumulation), and resumes that continue exactly (the momentum buffers are in the checkpoint,
resharded from 2 processes to 1).

Tolerance. torch's Newton-Schulz iteration runs in bf16, and its quintic amplifies small singular
values ~500x in 5 steps: the bf16 rounding of a gradient's weak directions comes out as O(1) of
the update there, and which way it rounds depends on the gradient's last fp32 bits. One process
and two ranks (or 3 micro-batches and 1) sum the gradient in another order, so with bf16
Newton-Schulz their weights part by ~3e-3 after 6 steps -- about one Muon step (measured), and not
a flaw of the split. The equality tests of the split therefore run the same iteration in fp32
(`_ns_fp32`, patched into torch.optim._muon, in the spawned ranks too): then 1 and 2 ranks, and
accumulation, agree to ~4e-7 (measured), and they are compared with TOL = 1e-4 absolute, where a
Muon step moves a weight by ~lr / sqrt(fan) ~ 3e-3 (a wrong shard, or a rank that orthogonalized
only its own shard, is off by that much). The sharded step itself is checked with torch's bf16
iteration: given the same gradient, FSDP2's step equals one process's bit for bit; so is a run
stopped and resumed in the same world.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from conftest import final_weights, metrics, read_jsonl, run_distributed, tiny_overrides
from torch import nn

from flame.config import load_config
from flame.errors import ConfigError
from flame.optim import DECAY, MUON, NO_DECAY, MuonAdamW, build_optimizer, param_split
from flame.trainer import Trainer, run_training

TOL = 1e-4
STEPS = 6


def _ns_fp32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz in fp32 instead of bf16 (for the tolerance)."""
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


def _fp32_newton_schulz() -> None:
    import torch.optim._muon as m

    m._zeropower_via_newtonschulz = _ns_fp32


@pytest.fixture
def fp32_ns(monkeypatch):
    import torch.optim._muon as m

    monkeypatch.setattr(m, "_zeropower_via_newtonschulz", _ns_fp32)


def _over(run: Path, corpus: Path, **extra) -> dict:
    base = {
        "optim.name": "muon",
        "train.max_steps": STEPS,
        "checkpoint.interval": 3,
        "checkpoint.keep": 5,
        "data.batch_size": 4,
    }
    base.update(extra)
    return tiny_overrides(run, corpus, **base)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run, "train")]


def _assert_weights_close(a: dict, b: dict, atol: float = TOL) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _stop_at(step):
    def cb(trainer):
        if trainer.step == step:
            trainer.stop_signal = "test"

    return cb


# ---- which parameters go where ------------------------------------------------------------------


def test_split_of_a_tiny_llama(tmp_path, corpus, capsys):
    t = Trainer(load_config(overrides=_over(tmp_path / "r", corpus)))
    try:
        t.setup()
        split = param_split(t.model)
        muon = [n for n, _ in split[MUON]]
        assert len(muon) == 2 * 7  # q, k, v, o, gate, up, down of each of 2 layers
        assert all(n.endswith(("_proj.weight",)) for n in muon)
        assert [n for n, _ in split[DECAY]] == ["model.embed_tokens.weight"]  # tied: the head too
        assert all(p.dim() == 1 for _, p in split[NO_DECAY])
        assert isinstance(t.optimizer, MuonAdamW)
        roles = [g["role"] for g in t.optimizer.param_groups]
        assert roles == [MUON, DECAY, NO_DECAY]
        lrs = [g["lr"] for g in t.optimizer.param_groups]  # warmup step 0 of 2: 1/3 of each peak
        assert lrs[0] == pytest.approx(0.02 / 3) and lrs[1] == lrs[2] == pytest.approx(3e-3 / 3)
    finally:
        t.close()
    out = capsys.readouterr().out
    assert out.count("optimizer: muon on 14 hidden matrices") == 1
    start = read_jsonl(tmp_path / "r" / "starts.jsonl")[-1]
    assert start["optimizer"]["name"] == "muon"
    assert start["optimizer"]["muon"]["tensors"] == 14
    assert start["optimizer"]["adamw_names"] == ["model.embed_tokens.weight"]


class _Odd(nn.Module):
    """An untied head, a conv kernel (3-d), stacked experts (3-d), a bias, a position embedding."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 8)
        self.pos = nn.Embedding(16, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.experts = nn.Parameter(torch.randn(4, 8, 8))
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 50, bias=False)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def get_input_embeddings(self):
        return self.tok

    def get_output_embeddings(self):
        return self.head


def test_split_keeps_embeddings_head_and_other_shapes_on_adamw():
    split = param_split(_Odd())
    assert [n for n, _ in split[MUON]] == ["proj.weight"]
    assert sorted(n for n, _ in split[DECAY]) == [
        "conv.weight",
        "experts",
        "head.weight",
        "pos.weight",
        "tok.weight",
    ]
    assert sorted(n for n, _ in split[NO_DECAY]) == ["conv.bias", "proj.bias"]
    plain = param_split(_Odd(), muon=False)
    assert not plain[MUON] and "proj.weight" in [n for n, _ in plain[DECAY]]


def test_muon_adamw_equals_torch_muon_and_adamw_side_by_side():
    """One MuonAdamW step is torch.optim.Muon's and torch.optim.AdamW's, bit for bit."""
    cfg = load_config(overrides={"optim.name": "muon", "optim.muon_weight_decay": 0.05}).optim
    torch.manual_seed(0)
    a = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 24), nn.LayerNorm(24), nn.Linear(24, 16))
    b = copy.deepcopy(a)
    opt = build_optimizer(a, cfg, torch.device("cpu"), say=lambda _m: None)
    hidden = [b[1].weight, b[3].weight]
    rest_decay = [b[0].weight]
    rest = [b[1].bias, b[2].weight, b[2].bias, b[3].bias]
    ref_muon = torch.optim.Muon(
        hidden, lr=cfg.muon_lr, weight_decay=0.05, momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps
    )
    ref_adamw = torch.optim.AdamW(
        [{"params": rest_decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    x = torch.randint(0, 20, (5, 7))
    for _ in range(3):
        for m in (a, b):
            m(x).pow(2).mean().backward()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
        for o in (opt, ref_muon, ref_adamw):
            o.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert set(opt.state[a[1].weight]) == {"momentum_buffer"}
    assert set(opt.state[a[0].weight]) == {"step", "exp_avg", "exp_avg_sq"}
    # the state round-trips through state_dict / load_state_dict and keeps stepping alike
    c = copy.deepcopy(a)
    opt_c = build_optimizer(c, cfg, torch.device("cpu"), say=lambda _m: None)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict keeps the tensors
    for m, o in ((a, opt), (c, opt_c)):
        m(x).pow(2).mean().backward()
        o.step()
    for (n, p), q in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    "args,message",
    [
        (["--optim.name", "muom"], "optim.name = 'muom' is not one of adamw, muon (did you mean muon?)"),
        (["--optim.muon_lr", "0"], "optim.muon_lr = 0.0 must be > 0"),
        (["--optim.muon_momentum", "1"], "optim.muon_momentum = 1.0 must be in [0, 1)"),
        (["--optim.muon_ns_steps", "0"], "optim.muon_ns_steps = 0 must be between 1 and 99"),
        (["--optim.muon_ns_steps", "100"], "optim.muon_ns_steps = 100 must be between 1 and 99"),
        (["--optim.muon_weight_decay", "-1"], "optim.muon_weight_decay = -1.0 must be >= 0"),
        (["--optim.muon_adjust_lr", "rms"], "optim.muon_adjust_lr = 'rms' is not one of original"),
    ],
)
def test_muon_knobs_are_validated(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert message in str(e.value)


# ---- the same weights whatever the split of the global batch ------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_m):
    """One process, micro-batch 4 x 2 accumulation steps: the global batch of 8 of every run here."""
    run = tmp_path_factory.mktemp("ref") / "run"
    run_training(load_config(overrides=_over(run, corpus_m, **{"train.grad_accum": 2})))
    return run


@pytest.fixture(scope="module")
def reference32(tmp_path_factory, corpus_m):
    """The same with Newton-Schulz in fp32: the reference of the equality tests."""
    import torch.optim._muon as m

    run = tmp_path_factory.mktemp("ref32") / "run"
    orig = m._zeropower_via_newtonschulz
    m._zeropower_via_newtonschulz = _ns_fp32
    try:
        run_training(load_config(overrides=_over(run, corpus_m, **{"train.grad_accum": 2})))
    finally:
        m._zeropower_via_newtonschulz = orig
    return run


def _train_rank(rank, run_dir, corpus, strategy):
    _fp32_newton_schulz()
    run_training(load_config(overrides=_over(Path(run_dir), Path(corpus), **{"parallel.strategy": strategy})))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus_m):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    run_distributed(_train_rank, 2, str(run), str(corpus_m), "fsdp")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank(tmp_path, reference32, fsdp_run, corpus_m, strategy):
    if strategy == "fsdp":
        run = fsdp_run
    else:
        run = tmp_path / "ddp"
        run_distributed(_train_rank, 2, str(run), str(corpus_m), "ddp")
    start = read_jsonl(run / "starts.jsonl")[-1]
    assert start["strategy"] == strategy and start["world_size"] == 2
    assert start["optimizer"]["muon"]["tensors"] == 14
    a, b = _losses(reference32), _losses(run)
    assert len(a) == len(b) == STEPS
    for s, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= TOL, f"step {s}: {x} vs {y}"
    wa, wb = final_weights(reference32), final_weights(run)
    _assert_weights_close(wa, wb)
    # Muon really moved the hidden matrices, and by more than the tolerance
    init = final_weights_at(reference32, 3)
    assert (
        wa["model.layers.0.self_attn.q_proj.weight"] - init["model.layers.0.self_attn.q_proj.weight"]
    ).abs().max() > 100 * TOL


def final_weights_at(run: Path, step: int) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run.parent / f"{run.name}-step{step}.pt"
    dcp_to_torch_save(str(run / "checkpoints" / f"step-{step:08d}" / "state"), str(out))
    return torch.load(out, weights_only=False)["model"]


def _sharded_step(rank, out_dir):
    """One MuonAdamW step of an FSDP2-sharded model given the whole gradients, gathered back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from flame.parallel import init_world

    cfg = load_config(overrides={"optim.name": "muon", "optim.muon_weight_decay": 0.1})
    init_world(cfg.parallel, cfg.train)
    model, grads = _step_case()
    for block in model[1:4]:
        fully_shard(block)
    fully_shard(model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), say=lambda _m: None)
    for _ in range(2):
        for n, p in model.named_parameters():
            p.grad = distribute_tensor(grads[n], p.device_mesh, p.placements, src_data_rank=None)
        opt.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, Path(out_dir) / "sharded.pt")


def _step_case():
    """A model of uneven shapes (rows that 2 ranks split unevenly) and seeded whole gradients."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Embedding(30, 12), nn.Linear(12, 37), nn.Linear(37, 12, bias=False), nn.LayerNorm(12)
    )
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    return model, grads


@pytest.mark.slow
def test_fsdp_step_equals_one_process_step_bitwise(tmp_path):
    """Given the same gradients, the sharded step (gather the update, bf16 Newton-Schulz, keep
    this rank's shard) equals torch.optim.Muon's on the whole matrices, bit for bit."""
    cfg = load_config(overrides={"optim.name": "muon", "optim.muon_weight_decay": 0.1})
    model, grads = _step_case()
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), say=lambda _m: None)
    for _ in range(2):
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
    run_distributed(_sharded_step, 2, str(tmp_path))
    got = torch.load(tmp_path / "sharded.pt", weights_only=False)
    for n, p in model.state_dict().items():
        assert torch.equal(p, got[n]), n
    # and a shard orthogonalized alone would not be: the 37-row matrix's update differs
    _, g = _step_case()
    from torch.optim._muon import _zeropower_via_newtonschulz as ns

    w = g["1.weight"]
    coeffs = (3.4445, -4.7750, 2.0315)
    alone = torch.cat([ns(h, coeffs, 5, 1e-7) for h in w.chunk(2)])
    assert (ns(w, coeffs, 5, 1e-7).float() - alone.float()).abs().max() > 0.05


def test_sharded_update_is_not_a_shard_update():
    """The check above can fail: orthogonalizing each rank's shard alone gives other weights."""
    from torch.optim._muon import _zeropower_via_newtonschulz as ns

    torch.manual_seed(0)
    g = torch.randn(64, 32)
    whole = ns(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    halves = torch.cat([ns(h, (3.4445, -4.7750, 2.0315), 5, 1e-7) for h in g.chunk(2)])
    assert (whole.float() - halves.float()).abs().max() > 0.05


@pytest.mark.slow
def test_accumulation_equals_one_big_batch(tmp_path, corpus_m, fp32_ns):
    """grad_accum 3 x micro-batch 2 gives the weights of one micro-batch of 6."""
    big = tmp_path / "big"
    acc = tmp_path / "acc"
    run_training(load_config(overrides=_over(big, corpus_m, **{"data.batch_size": 6})))
    run_training(load_config(overrides=_over(acc, corpus_m, **{"data.batch_size": 2, "train.grad_accum": 3})))
    _assert_weights_close(final_weights(big), final_weights(acc))
    for x, y in zip(_losses(big), _losses(acc)):
        assert abs(x - y) <= TOL


# ---- resumes ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(tmp_path, reference, corpus_m):
    part = tmp_path / "part"
    cfg = load_config(overrides=_over(part, corpus_m, **{"train.grad_accum": 2}))
    assert run_training(cfg, callbacks=[_stop_at(2)])["step"] == 2  # between interval checkpoints
    assert run_training(cfg)["step"] == STEPS
    assert _losses(part) == _losses(reference)
    wa, wb = final_weights(reference), final_weights(part)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the momentum buffers are in the checkpoint
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(part / "checkpoints" / f"step-{STEPS:08d}" / "state"), str(tmp_path / "s.pt"))
    optim = torch.load(tmp_path / "s.pt", weights_only=False)["optim"]
    assert "model.layers.0.mlp.up_proj.weight" in optim["state"]
    assert set(optim["state"]["model.layers.0.mlp.up_proj.weight"]) == {"momentum_buffer"}
    assert set(optim["state"]["model.embed_tokens.weight"]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.slow
def test_fsdp_checkpoint_reshards_onto_one_process(tmp_path, reference32, fsdp_run, capsys, fp32_ns):
    """FSDP on 2 ranks stopped at step 3, resumed on 1 process: the momentum buffers reshard, and
    the run ends where one process alone does (a lost momentum would be off by ~lr per weight)."""
    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:08d}")
    corpus = Path(load_config(toml_path=str(fsdp_run / "config.toml")).data.inputs[0])
    r = run_training(load_config(overrides=_over(run, corpus)))
    out = capsys.readouterr().out
    assert r["step"] == STEPS and "resumed from" in out and "step-00000003" in out
    _assert_weights_close(final_weights(reference32), final_weights(run))


@pytest.mark.slow
def test_resume_without_momentum_would_differ(tmp_path, reference, corpus_m):
    """The resume checks above can fail: a resume whose Muon momentum is zeroed ends elsewhere."""
    part = tmp_path / "part"
    cfg = load_config(overrides=_over(part, corpus_m, **{"train.grad_accum": 2}))
    run_training(cfg, callbacks=[_stop_at(3)])

    def zero_momentum(trainer):
        if trainer.step == 3 and not getattr(trainer, "_zeroed", False):
            trainer._zeroed = True
            for st in trainer.optimizer.state.values():
                if "momentum_buffer" in st:
                    st["momentum_buffer"].zero_()

    t = Trainer(cfg)
    try:
        t.setup()
        zero_momentum(t)  # after the load, before step 4
        t.train()
    finally:
        t.close()
    wa, wb = final_weights(reference), final_weights(part)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) > 10 * TOL


def test_resume_with_another_optimizer_is_refused(tmp_path, corpus):
    """AdamW's moments are not Muon's momentum: a resume that switches optim.name names the key."""
    from flame.errors import FlameError

    over = tiny_overrides(tmp_path / "r", corpus, **{"train.max_steps": 2})
    run_training(load_config(overrides=over))
    with pytest.raises(FlameError, match="optim.name"):
        run_training(load_config(overrides={**over, "train.max_steps": 4, "optim.name": "muon"}))
