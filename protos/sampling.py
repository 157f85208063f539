"""Pick the next token from logits (pure; randomness comes from the generator passed in).

The one sampler of both ends: the scheduler samples a prompt's first token after a
sequence-parallel prefill, and a request's home samples every token after that (and the first,
when it prefilled the prompt). Token i draws from `token_generator(seed, i)`, so a request draws
the same tokens wherever each is sampled, also when it is replayed elsewhere after a failure. It lives beside the wire types it reads and
writes (SamplingParams, TokenEvent) because the scheduler and the agents may only share protos/.
"""

from __future__ import annotations

import secrets

import torch

from protos.messages import SamplingParams, TokenEvent


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> TokenEvent:
    """logits [V] float32 -> one token. temperature 0 is greedy; top_p keeps the smallest set of
    tokens whose mass reaches top_p. Reported logprobs are the model's own distribution (before
    temperature and top_p), as OpenAI's API reports them."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if params.temperature == 0:
        token = int(torch.argmax(logits))
    else:
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p  # mass before this token < top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        token = int(torch.multinomial(probs, 1, generator=generator))
    top: tuple[tuple[int, float], ...] = ()
    if params.logprobs and params.top_logprobs:
        values, ids = torch.topk(logprobs, min(params.top_logprobs, logprobs.numel()))
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenEvent(
        token_id=token,
        logprob=float(logprobs[token]) if params.logprobs else None,
        top_logprobs=top,
        is_stop=token in params.stop_token_ids,
    )


def request_seed(seed: int | None) -> int:
    """A request's seed: its own, or a fresh one (drawn once, at submit, so that a replay after a
    failure draws the same tokens as the run it continues)."""
    return seed if seed is not None else secrets.randbits(63)


_MASK = (1 << 64) - 1


def token_generator(seed: int, index: int) -> torch.Generator:
    """The randomness of a request's token `index` (0: its first), from the seed and the index
    alone (a splitmix64 mix of the two): whoever samples a token (the scheduler after a prefill,
    the home after a decode step, another agent replaying the request after a failure) draws the
    same one, with no generator state to carry between them."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    g = torch.Generator()
    g.manual_seed((z ^ (z >> 31)) & ((1 << 63) - 1))
    return g
