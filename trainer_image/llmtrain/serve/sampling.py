"""Next-token choice per row: greedy at temperature 0, else temperature + nucleus (top-p) sampling.

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
