"""Small custom models for tests, built through `model.name = "models_for_tests:FUNCTION"`."""

import torch
from torch import nn


class Bigram(nn.Module):
    """A bigram language model returning logits, with faults on chosen training calls (1-based):
    `bad_calls` make the logits NaN, `spike_calls` flip and scale them (a loss spike), a
    `poison_call` turns the output weights NaN for good (as a broken update would).

    The call counter is a buffer, so it is checkpointed: a resumed run faults at the same calls.
    """

    def __init__(self, vocab_size: int, bad_calls=(), spike_calls=(), poison_call=0):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 16)
        self.out = nn.Linear(16, vocab_size)
        self.bad_calls = set(bad_calls)
        self.spike_calls = set(spike_calls)
        self.poison_call = poison_call
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, input_ids):
        logits = self.out(self.emb(input_ids))
        if self.training:
            self.calls += 1
            n = int(self.calls)
            if n in self.bad_calls:
                logits = logits * torch.tensor(float("nan"))
            if n in self.spike_calls:
                logits = logits * -8.0
            if n == self.poison_call:
                with torch.no_grad():
                    self.out.weight.fill_(float("nan"))
                logits = self.out(self.emb(input_ids))
        return logits


def bigram(vocab_size: int, bad_calls=(), spike_calls=(), poison_call=0):
    return Bigram(vocab_size, bad_calls, spike_calls, poison_call)


def broken(vocab_size: int):
    raise RuntimeError("the weights file is missing")


class _DocModel(nn.Module):
    """An embedding, a per-document causal mean of earlier tokens (cu_seqlens keeps documents
    apart), and a head; `leak` adds a cross-document term of its own."""

    def __init__(self, vocab_size: int, leak: str):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 16)
        self.head = nn.Linear(16, vocab_size)
        self.leak = leak
        # the zero-started path: exactly isolated until training moves it
        self.alpha = nn.Parameter(torch.zeros(())) if leak == "zero-start" else None

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, cu_seqlens=None, max_seqlen=None):
        x = self.emb(input_ids)
        t = x.shape[1]
        bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, t]
        parts = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            seg = x[:, s:e]
            n = torch.arange(1, e - s + 1, device=x.device).view(1, -1, 1)
            parts.append(seg.cumsum(1) / n)
        h = x + torch.cat(parts, 1)
        if self.leak == "chunks":  # a state carried from earlier 32-token chunks, documents or not
            c = torch.arange(t, device=x.device) // 32
            earlier = (c.view(1, -1) < c.view(-1, 1)).float()
            h = h + 0.5 * (earlier @ x[0]).unsqueeze(0) / earlier.sum(1, keepdim=True).clamp(min=1)
        elif self.leak == "zero-start":
            h = h + self.alpha * x.cumsum(1) / torch.arange(1, t + 1, device=x.device).view(1, -1, 1)
        return self.head(h)


def chunk_mixer(vocab_size: int):
    return _DocModel(vocab_size, "chunks")


def zero_start_leak(vocab_size: int):
    return _DocModel(vocab_size, "zero-start")


def isolated(vocab_size: int):
    return _DocModel(vocab_size, "none")


class _NoFloat32(nn.Module):
    """Asserts its dtype as fla's DeltaNet chunk kernel does."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 8)
        self.out = nn.Linear(8, vocab_size)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        assert h.dtype != torch.float32, "ChunkDeltaRuleFunction does not support float32. Please use bfloat16."
        return self.out(h)


def no_float32(vocab_size: int):
    return _NoFloat32(vocab_size)
