"""Sampling text from a trained model (temperature, top-k, top-p, seed; temperature 0 is greedy).

A transformers model samples through its own `generate()`, with its KV cache (or recurrent state:
Mamba, RWKV), as long as the text fits the context; past that, and for custom modules, each token
is the model's forward over the last `context_len` tokens (no cache). The cache is trusted only
after it gave the logits of the forward over the whole text on the prompt itself (`cache_error`):
a model whose cache is lost between steps (fla 0.6.0's models read `past_key_values`, which
transformers 5 passes as `cache`) generates without it, and says so. Both stop at EOS, which is
not part of the output. Greedy output is the same either way (tested); sampled output depends on
the path (each draws its random numbers in its own order), but is fixed by the seed.
"""

from __future__ import annotations

import contextlib
import sys
import weakref

import torch
from torch import nn

from flame.data.tokenizer import Tokenizer


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    logits = out if torch.is_tensor(out) else getattr(out, "logits", None)
    if logits is None:
        raise ValueError("the model's forward(input_ids) returned no logits")
    return logits[:, -1, :].float()


def has_generate(model: nn.Module) -> bool:
    """Whether the model is a transformers model with a `generate()` (and so a cache) of its own."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    can = getattr(model, "can_generate", None)
    return isinstance(model, PreTrainedModel) and callable(can) and bool(can())


def _next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen) -> int:
    if temperature <= 0:
        return int(logits.argmax(-1))
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, order = torch.sort(logits, descending=True)
        cum = sorted_l.softmax(-1).cumsum(-1)
        drop = cum - sorted_l.softmax(-1) > top_p
        logits = logits.scatter(-1, order, sorted_l.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


def _loop(
    model, ids, max_new, context_len, temperature, top_k, top_p, eos_id, gen, device, vocab=None
) -> bool:
    """Append up to `max_new` tokens to `ids`, one full forward each; True when EOS ended it."""
    for _ in range(max_new):
        ctx = torch.tensor([ids[-context_len:]], device=device)
        logits = _logits(model, ctx).cpu()
        if vocab is not None:  # rows past the tokenizer's vocabulary (padding) are never sampled
            logits[..., vocab:] = float("-inf")
        nxt = _next_token(logits, temperature, top_k, top_p, gen)
        if eos_id is not None and nxt == eos_id:
            return True
        ids.append(nxt)
    return False


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' notes about generation settings given on purpose, silenced for a block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _with_cache(model, ids, max_new, temperature, top_k, top_p, eos_id, seed, device, vocab=None) -> bool:
    """Append up to `max_new` tokens to `ids` with `model.generate()`; True when EOS ended it."""
    from transformers import GenerationConfig

    sample = temperature > 0
    x = torch.tensor([ids], device=device)
    rows = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 0
    unused = list(range(vocab, rows)) if vocab is not None and rows > vocab else None
    devices = [device] if torch.device(device).type == "cuda" else []
    with _quiet_transformers():
        # every setting given, so nothing comes from the model's own generation_config.json
        config = GenerationConfig(
            max_new_tokens=max_new,
            min_new_tokens=0,
            do_sample=sample,
            num_beams=1,
            temperature=temperature if sample else 1.0,
            top_k=top_k if sample else 0,
            top_p=top_p if sample else 1.0,
            repetition_penalty=1.0,
            eos_token_id=eos_id,
            pad_token_id=eos_id if eos_id is not None else 0,
            suppress_tokens=unused,  # padded rows the tokenizer cannot decode
            use_cache=True,
        )
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    new = out[0, len(ids) :].tolist()
    if eos_id is not None and eos_id in new:
        ids.extend(new[: new.index(eos_id)])
        return True
    ids.extend(new)
    return False


# models whose cache was checked, with the verdict (True: the cache can be used)
_CACHE_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CACHE_STEPS = 3


def cache_error(model: nn.Module, ids: list[int], device) -> float:
    """The largest difference, relative to the logits' scale, between the logits `generate()`
    gives token by token from its cache and the model's forward over the whole text (CACHE_STEPS
    greedy tokens after `ids`)."""
    x = torch.tensor([ids], device=device)
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=CACHE_STEPS,
        min_new_tokens=CACHE_STEPS,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    cached = torch.stack(out.logits, 1).float()
    whole = model(input_ids=out.sequences[:, :-1]).logits[:, len(ids) - 1 :].float()
    return float((cached - whole).abs().max()) / max(float(whole.abs().max()), 1e-30)


def _cache_usable(model: nn.Module, ids: list[int], device) -> bool:
    if model in _CACHE_CHECKED:
        return _CACHE_CHECKED[model]
    with _quiet_transformers():
        err = cache_error(model, ids, device)
    dtype = next(model.parameters()).dtype
    usable = err <= (1e-3 if dtype == torch.float32 else 2e-2)
    if not usable:
        print(
            f"generate: {type(model).__name__}'s cache gives other logits than its forward over the "
            f"whole text ({err:.1%} of their scale); generating without the cache (slower, exact)",
            file=sys.stderr,
        )
    _CACHE_CHECKED[model] = usable
    return usable


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
    use_cache: bool = True,
    vocab: int | None = None,
) -> list[int]:
    """Up to `max_new` token ids continuing `prompt` (the last `context_len` of it are seen).

    `use_cache=False` takes the no-cache path for every model (the reference for greedy output).
    `vocab`: ids from it on (embedding rows the tokenizer does not use) are never produced.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt[-context_len:]) if context_len else list(prompt)
    start = len(ids)
    try:
        stopped = False
        fits = max(0, min(max_new, context_len - len(ids)))  # tokens before the window must slide
        if (
            use_cache
            and has_generate(model)
            and fits > 0
            and ids
            and _cache_usable(model, ids[: max(1, context_len - CACHE_STEPS)], device)
        ):
            stopped = _with_cache(model, ids, fits, temperature, top_k, top_p, eos_id, seed, device, vocab)
        left = max_new - (len(ids) - start)
        if not stopped and left > 0:
            _loop(model, ids, left, context_len, temperature, top_k, top_p, eos_id, gen, device, vocab)
    finally:
        model.train(was_training)
    return ids[start:]


def sample_text(
    model: nn.Module, tok: Tokenizer, prompt: str, max_new: int, device, context_len: int = 256, **kw
) -> str:
    start = [int(x) for x in tok.encode_batch([prompt])[0]] if prompt else [tok.eos_id]
    kw.setdefault("vocab", tok.vocab_size)
    out = sample_ids(model, start, max_new, context_len, eos_id=tok.eos_id, device=device, **kw)
    return prompt + tok.decode(out)


def sample_after_training(trainer) -> None:
    """`flame train`'s closing sample of train.sample_tokens tokens, printed by rank 0. Under FSDP
    every rank gathers the weights (every rank must call this); rank 0 samples from a plain copy."""
    from flame.model import build_model
    from flame.parallel import main_rank_copy

    cfg = trainer.cfg
    model = main_rank_copy(
        trainer.model,
        trainer.strategy,
        trainer.world,
        lambda: build_model(cfg.model, trainer.tok.vocab_size, cfg.data.context_len),
    )
    if model is not None:
        text = sample_text(
            model,
            trainer.tok,
            "",
            cfg.train.sample_tokens,
            trainer.world.device,
            context_len=cfg.data.context_len,
        )
        print("sample:\n" + text)
