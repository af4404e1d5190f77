"""Sampling text from a trained model (temperature, top-k, top-p)."""

from __future__ import annotations

import torch
from torch import nn

from flame.data.tokenizer import Tokenizer


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    logits = out if torch.is_tensor(out) else getattr(out, "logits", None)
    if logits is None:
        raise ValueError("the model's forward(input_ids) returned no logits")
    return logits[:, -1, :].float()


@torch.no_grad()
def sample_ids(
    model: nn.Module,
    prompt: list[int],
    max_new: int,
    context_len: int,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[int]:
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt)
    for _ in range(max_new):
        ctx = torch.tensor([ids[-context_len:]], device=device)
        logits = _logits(model, ctx).cpu()
        if temperature <= 0:
            nxt = int(logits.argmax(-1))
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p < 1.0:
                sorted_l, order = torch.sort(logits, descending=True)
                cum = sorted_l.softmax(-1).cumsum(-1)
                drop = cum - sorted_l.softmax(-1) > top_p
                logits = logits.scatter(-1, order, sorted_l.masked_fill(drop, float("-inf")))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        if eos_id is not None and nxt == eos_id:
            break
        ids.append(nxt)
    model.train(was_training)
    return ids[len(prompt) :]


def sample_text(
    model: nn.Module, tok: Tokenizer, prompt: str, max_new: int, device, context_len: int = 256, **kw
) -> str:
    start = [int(x) for x in tok.encode_batch([prompt])[0]] if prompt else [tok.eos_id]
    out = sample_ids(model, start, max_new, context_len, eos_id=tok.eos_id, device=device, **kw)
    return prompt + tok.decode(out)
