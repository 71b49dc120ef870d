"""Log-probabilities from logits: of sampled tokens during generation, and of a whole prompt (echo).

Prompt scoring is one full forward pass per prompt, no KV cache: every position's next-token
distribution at once. It runs on the engine's model thread (one worker), so it never overlaps a
batch step; inputs go to the model's device and results come back as CPU float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llmtrain.serve.logprobs import TokenLogprob


def entries(logprobs: Tensor, chosen: Sequence[int], k: int) -> list[TokenLogprob]:
    """Rows of log-probabilities [rows, vocab] and each row's chosen token -> one entry per row."""
    index = torch.tensor(list(chosen), dtype=torch.long, device=logprobs.device)[:, None]
    picked = logprobs.gather(1, index)[:, 0].tolist()
    if k == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(chosen, picked, strict=True)]
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return [
        TokenLogprob(t, lp, tuple(zip(top_ids, top_values, strict=True)))
        for t, lp, top_ids, top_values in zip(chosen, picked, ids.tolist(), values.tolist(), strict=True)
    ]


def log_softmax(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def score_prompts(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], k: int
) -> list[list[TokenLogprob | None]]:
    """Per prompt: None for its first token (nothing precedes it), then each next token's entry."""
    device = _device(model)
    out: list[list[TokenLogprob | None]] = []
    for ids in prompts:
        if len(ids) < 2:
            out.append([None] * len(ids))
            continue
        logits = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False).logits[0, :-1]
        scored = entries(log_softmax(logits).cpu(), ids[1:], k)
        out.append([None, *scored])
    return out
