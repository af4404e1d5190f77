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
