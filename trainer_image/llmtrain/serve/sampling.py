"""Next-token choice per row: penalties and logit_bias first, then greedy at temperature 0, else
temperature + nucleus (top-p) sampling.

Every sequence has its own ``torch.Generator``: a request's ``seed`` then fixes its samples whatever
else shares the batch, and no request consumes random numbers from another's stream.
"""

from __future__ import annotations

import torch
from torch import Tensor


def new_generator(seed: int | None, index: int = 0) -> torch.Generator:
    """A generator for the ``index``-th prompt of a request: seed + index, so prompts differ."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()  # non-deterministic, from the OS
    else:
        gen.manual_seed(seed + index)  # int64 seed + a prompt index stays within torch's [-2^63, 2^64)
    return gen


def adjust_logits(
    logits: Tensor,
    counts: dict[int, int],
    frequency_penalty: float,
    presence_penalty: float,
    bias: tuple[tuple[int, float], ...] = (),
) -> Tensor:
    """OpenAI's penalties over the tokens generated so far, then logit_bias; ``logits`` is not changed.

    ``logits[j] -= counts[j] * frequency_penalty + (counts[j] > 0) * presence_penalty``: only tokens
    of the completion count, not the prompt's (OpenAI's and vLLM's definition).
    """
    penalise = bool(counts) and (frequency_penalty != 0.0 or presence_penalty != 0.0)
    if not penalise and not bias:
        return logits
    out = logits.float().clone()
    if penalise:
        ids = torch.tensor(list(counts), dtype=torch.long, device=out.device)
        seen = torch.tensor(list(counts.values()), dtype=out.dtype, device=out.device)
        out[ids] -= seen * frequency_penalty + presence_penalty
    if bias:
        ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=out.device)
        out[ids] += torch.tensor([b for _, b in bias], dtype=out.dtype, device=out.device)
    return out


def sample_row(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from a row of logits (shape [vocab])."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass *before* it is
        # below top_p, so the most likely token always stays.
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
