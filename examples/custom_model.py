"""A small causal transformer written for flame: `--model.name examples/custom_model.py:build`.

It shows the whole contract of a `pkg.module:function` model (README, "Models"):
- `build(vocab_size, context_len, ...)` returns an nn.Module; flame passes the resolved
  vocabulary and the context length, and `model.overrides` as further keyword arguments;
- `forward(input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None)` returns logits
  [B, T, V]; flame computes the loss. With `--data.varlen true` the batch is one row of packed
  documents and `cu_seqlens` marks where each starts: attention stays inside a document;
- its blocks sit in one nn.ModuleList (FSDP shards, activation checkpointing and compile work
  per block), `init_weights()` initializes it (parallel.init = meta), and `flops_per_token`
  gives the MFU's FLOPs;
- `get_output_embeddings()` names its output head (an nn.Linear its forward calls once on the final
  hidden states): flame then computes the loss fused, from those hidden states, in chunks, without
  ever holding the [B, T, V] logits (model.loss = auto).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.RMSNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).unbind(2)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab_size: int, context_len: int, hidden: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.hidden, self.context_len = hidden, context_len
        self.embed = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Embedding(context_len, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def flops_per_token(self, context_len: int) -> float:
        matmuls = sum(p.numel() for n, p in self.named_parameters() if n.startswith(("blocks", "head")))
        return 6.0 * matmuls + 12.0 * len(self.blocks) * self.hidden * context_len

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        t = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0)
        mask = None
        if cu_seqlens is not None:  # packed documents: causal inside each one, nothing across
            doc = torch.searchsorted(cu_seqlens[1:], torch.arange(t, device=input_ids.device), right=True)
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & (doc[:, None] == doc[None, :])
        x = self.embed(input_ids) + self.pos(position_ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def build(vocab_size: int, context_len: int, hidden: int = 64, layers: int = 2, heads: int = 4) -> nn.Module:
    return TinyTransformer(vocab_size, context_len, hidden, layers, heads)
