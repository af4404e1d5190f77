"""Forward FLOPs per token of the token mixing in flash-linear-attention's (fla's) layers.

fla's layers mix tokens in Triton kernels that torch's FLOP counter cannot see (and that cannot run
on the meta device), so flame counts their work from each layer's shape instead: the algorithm the
chunk kernel implements, read off fla 0.6.0's sources. The projections, MLPs, short convolutions
and the head are not counted here: they are the weights of 6N, which the formula already has.

Conventions (the same as flame's count of softmax attention, `flame.flops`):
- a multiply-add is 2 FLOPs; only products of two matrices are counted, element-wise work is not
  (gates, decays and their cumulative sums, masks, beta scaling, normalization, the state passing
  of Mamba2 between chunks, which is a per-head scalar decay);
- a causally masked intra-chunk block counts as the full C x C (no halving), as softmax attention
  counts the full T x T; the inverse of a chunk's unit lower-triangular matrix (delta rules) counts
  as forward substitution whose row i is a (1 x i) @ (i x i) product: sum over i < C of 2 i^2 =
  (C - 1) C (2C - 1) / 3 FLOPs per chunk, again without using the triangle's zeros;
- these are forward figures; training is 3x them (the backward is 2x the forward), like the rest.

Per token and per head, with chunk size C, key head dim K, value head dim V (D_inv = (C-1)(2C-1)/3):
- GLA chunk form, and HGRN2 (the same kernel, K = expand_ratio): intra-chunk q k^T (2CK) and its
  product with v (2CV), inter-chunk q S (2KV), state update k^T v (2KV): 2C(K + V) + 4KV;
- delta rule (DeltaNet; GatedDeltaNet per value head): k k^T (2CK), D_inv, the WY representation
  w = T k (2CK) and u = T v (2CV), v_new = u - w S (2KV), S += k^T v_new (2KV), o = q S (2KV) +
  (q k^T) v_new (2CK + 2CV): 6CK + 4CV + 6KV + D_inv;
- RWKV-7 (the generalized, diagonal-plus-low-rank delta rule): four intra-chunk products q k^T,
  q b^T, a k^T, a b^T (8CK), D_inv, (I - A_ab)^-1 A_ak (2C^2), w (2CK), u (2CV), v_new = w S + u
  (2KV), S += k^T v + b^T v_new (4KV), o = q S (2KV) + A_qk v + A_qb v_new (4CV):
  10CK + 6CV + 2C^2 + 8KV + D_inv;
- Mamba2 (SSD, mamba_ssm's chunk scan), with P the head dim, N the state size and G groups: C B^T
  per group (2CN), per head (C B^T) x (2CP), chunk states B^T x (2NP) and the states' output C S
  (2NP): G 2CN + heads (2CP + 4NP);
- fla's softmax Attention (the attention layers of fla's hybrid models): 4 T x heads x head_dim,
  the full T x T as for every softmax attention in flame.

Context: apart from softmax attention these do not depend on the context length. Every token pays
for its chunk's C x C block and its share of the state work, so the cost per token is set by the
chunk size and the head dims; a context that is not a multiple of C ends in a partial chunk that
the kernel pads, counted here as if it were full (packed documents likewise). GLA, HGRN2 and
DeltaNet run their recurrent kernel on sequences of 64 tokens or fewer; the count is of the chunk
form, which they run on anything longer. A layer built with a recurrent `mode` is not counted.

Nothing here imports fla: a layer is recognised by its class's module (under `fla.layers.`) and
name, and read through the attributes fla's classes set in their constructors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

# BT of the chunk kernels these layers call: chunk_gla, chunk_delta_rule and chunk_gated_delta_rule
# take chunk_size=64 by default and the layers pass none; RWKV7Attention passes chunk_size=64.
FLA_CHUNK = 64

# the `mode`s of GLA, HGRN2 and DeltaNet that run the chunk form (fused_chunk: the same algorithm in
# one kernel, in older fla; 0.6.0 refuses it); fused_recurrent runs the recurrence, not counted
CHUNK_MODES = ("chunk", "fused_chunk")


def triangular_inverse(chunk: int) -> float:
    """FLOPs per token of inverting a chunk's C x C unit lower-triangular matrix: forward
    substitution, row i a (1 x i) @ (i x i) product, summed over the chunk and divided by C."""
    return (chunk - 1) * chunk * (2 * chunk - 1) / 3 / chunk


def gla_forward(heads: int, k: int, v: int, chunk: int = FLA_CHUNK) -> float:
    """GLA's chunk form (also HGRN2's), forward FLOPs per token."""
    intra = 2 * chunk * k + 2 * chunk * v  # (q k^T) over the chunk, then its product with v
    inter = 2 * k * v + 2 * k * v  # q S from the state before the chunk; the state update k^T v
    return heads * float(intra + inter)


def delta_rule_forward(heads: int, k: int, v: int, chunk: int = FLA_CHUNK) -> float:
    """The delta rule's chunk form with its WY representation (DeltaNet, GatedDeltaNet)."""
    wy = 2 * chunk * k + triangular_inverse(chunk) + 2 * chunk * k + 2 * chunk * v  # k k^T, T, w, u
    state = 2 * k * v + 2 * k * v  # v_new = u - w S; S += k^T v_new
    out = 2 * k * v + 2 * chunk * k + 2 * chunk * v  # q S + (q k^T) v_new
    return heads * (wy + state + out)


def rwkv7_forward(heads: int, k: int, v: int, chunk: int = FLA_CHUNK) -> float:
    """RWKV-7's chunk form (the diagonal-plus-low-rank delta rule, chunk_dplr_delta_rule)."""
    intra = 4 * 2 * chunk * k  # A_qk, A_qb, A_ak, A_ab
    wy = triangular_inverse(chunk) + 2 * chunk * chunk + 2 * chunk * k + 2 * chunk * v  # inv, inv A_ak, w, u
    state = 2 * k * v + 2 * 2 * k * v  # v_new = w S + u; S += k^T v + b^T v_new
    out = 2 * k * v + 2 * 2 * chunk * v  # q S + A_qk v + A_qb v_new
    return heads * (intra + wy + state + out)


def mamba2_forward(heads: int, head_dim: int, state: int, groups: int, chunk: int) -> float:
    """Mamba2's SSD chunk scan (mamba_ssm's kernels, which fla's Mamba2 calls)."""
    per_group = 2 * chunk * state  # C B^T over the chunk
    per_head = 2 * chunk * head_dim + 2 * state * head_dim + 2 * state * head_dim  # (C B^T) x, B^T x, C S
    return float(groups * per_group + heads * per_head)


def attention_forward(heads: int, head_dim: int, context_len: int) -> float:
    """Softmax attention over the full T x T: q k^T and the product with v."""
    return 4.0 * context_len * heads * head_dim


# ---------------------------------------------------------------- fla's layer classes


def _gla(m: nn.Module, _t: int) -> float:
    return gla_forward(m.num_heads, m.head_k_dim, m.head_v_dim)


def _hgrn2(m: nn.Module, _t: int) -> float:
    return gla_forward(m.num_heads, m.head_f_dim, m.head_i_dim)


def _delta_net(m: nn.Module, _t: int) -> float:
    return delta_rule_forward(m.num_heads, m.head_k_dim, m.head_v_dim)


def _gated_delta_net(m: nn.Module, _t: int) -> float:
    # q and k have num_heads heads, v has num_v_heads; the kernel runs once per value head
    return delta_rule_forward(m.num_v_heads, m.head_k_dim, m.head_v_dim)


def _rwkv7(m: nn.Module, _t: int) -> float:
    return rwkv7_forward(m.num_heads, m.head_dim, m.head_v_dim)


def _mamba2(m: nn.Module, _t: int) -> float:
    return mamba2_forward(m.num_heads, m.head_dim, m.ssm_state_size, m.n_groups, m.chunk_size)


def _attention(m: nn.Module, t: int) -> float:
    return attention_forward(m.num_heads, m.head_dim, t)


@dataclass(frozen=True)
class _Family:
    label: str
    forward: Callable[[nn.Module, int], float]
    modes: tuple[str, ...] | None = None  # the `mode`s that run the counted form (None: any)
    module: str | None = None  # the class's module, where the name alone is too common


# class name -> family, for classes whose module is under fla.layers
FAMILIES = {
    "GatedLinearAttention": _Family("GLA chunk form", _gla, CHUNK_MODES),
    "HGRN2Attention": _Family("HGRN2 chunk form", _hgrn2, CHUNK_MODES),  # GLA's kernel
    "DeltaNet": _Family("delta rule chunk form", _delta_net, CHUNK_MODES),
    # trains in chunk mode whatever its `mode` (the layer switches to chunk when grad is enabled)
    "GatedDeltaNet": _Family("gated delta rule chunk form", _gated_delta_net),
    "RWKV7Attention": _Family("RWKV-7 chunk form", _rwkv7),  # likewise, in training
    "Mamba2": _Family("Mamba2 SSD", _mamba2),
    "Attention": _Family("softmax attention", _attention, module="fla.layers.attn"),
}


def is_fla(m: nn.Module) -> bool:
    return type(m).__module__.partition(".")[0] == "fla"


def layer_forward(m: nn.Module, context_len: int) -> tuple[str, float] | str | None:
    """(family, forward FLOPs per token) of a known fla layer; a reason (str) when the class is
    known but its configuration is not counted; None when it is not a known fla layer."""
    if not type(m).__module__.startswith("fla.layers."):
        return None
    family = FAMILIES.get(type(m).__name__)
    if family is None or family.module not in (None, type(m).__module__):
        return None
    mode = getattr(m, "mode", None)
    if family.modes is not None and mode not in family.modes:
        return (
            f"{type(m).__name__} in mode {mode!r} comes from fla, whose kernels the FLOP counter "
            "cannot see (flame counts fla's chunk forms)"
        )
    return family.label, family.forward(m, context_len)


@dataclass
class FlaCores:
    """The fla token mixing of a model: forward FLOPs per token summed over its counted layers,
    how many layers of each family, and the fla modules whose work is counted nowhere."""

    forward: float = 0.0
    layers: dict[str, int] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)  # one reason per module, in model order

    def describe(self) -> str:
        return ", ".join(f"{n} x {label}" for label, n in self.layers.items())


def fla_cores(model: nn.Module, context_len: int) -> FlaCores:
    """Walk the model's fla modules. A known layer is counted (and what it contains is its own);
    fla's other modules (the model classes, norms, MLPs, convolutions, losses under fla.models /
    fla.modules) do matmuls only with their own weights, which 6N counts, or element-wise work;
    any other fla module, an unknown layer above all, is uncounted."""
    out = FlaCores()
    inside: list[str] = []  # name prefixes of the counted layers, whose submodules are theirs
    for name, m in model.named_modules():
        if not is_fla(m) or any(name.startswith(p) for p in inside):
            continue
        got = layer_forward(m, context_len)
        if isinstance(got, tuple):
            label, fwd = got
            out.forward += fwd
            out.layers[label] = out.layers.get(label, 0) + 1
            inside.append(f"{name}." if name else "")
        elif isinstance(got, str):
            out.uncounted.append(got)
        elif not type(m).__module__.startswith(("fla.models.", "fla.modules.")):
            out.uncounted.append(
                f"{type(m).__name__} comes from fla, whose kernels the FLOP counter cannot see"
            )
    return out
