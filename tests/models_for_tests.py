"""Small custom models for tests, built through `model.name = "models_for_tests:FUNCTION"`."""

import torch
from torch import nn


class Bigram(nn.Module):
    """A bigram language model whose loss turns NaN on chosen training calls (1-based)."""

    def __init__(self, vocab_size: int, bad_calls=()):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 16)
        self.out = nn.Linear(16, vocab_size)
        self.bad_calls = set(bad_calls)
        self.calls = 0

    def forward(self, input_ids, labels=None):
        logits = self.out(self.emb(input_ids))
        if labels is None:
            return logits
        if self.training:
            self.calls += 1
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
        if self.calls in self.bad_calls:
            loss = loss * torch.tensor(float("nan"))
        return loss


def bigram(vocab_size: int, bad_calls=()):
    return Bigram(vocab_size, bad_calls)
