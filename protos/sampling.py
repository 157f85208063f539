"""Pick the next token from logits (pure; randomness comes from the generator passed in).

The one sampler of both ends: the scheduler samples a prompt's first token after a
sequence-parallel prefill, and a request's home samples every token after that (and the first,
when it prefilled the prompt), with the generator the scheduler hands it in AdoptKV. A request
then draws the same tokens wherever each is sampled. It lives beside the wire types it reads and
writes (SamplingParams, TokenEvent) because the scheduler and the agents may only share protos/.
"""

from __future__ import annotations

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


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def generator_state(generator: torch.Generator) -> bytes:
    """A CPU generator's state as bytes (AdoptKVRequest.generator_state)."""
    return bytes(generator.get_state().numpy().tobytes())


def generator_from_state(state: bytes) -> torch.Generator:
    """The generator `generator_state` saved; ValueError for bytes that are not one."""
    g = torch.Generator()
    try:
        g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    except RuntimeError as exc:
        raise ValueError(f"not a generator state ({len(state)} bytes): {exc}") from exc
    return g
