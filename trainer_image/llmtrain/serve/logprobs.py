"""Per-token log-probabilities and their two OpenAI wire formats (completions' and chat's).

Values are log_softmax of the model's raw logits, before penalties, logit_bias, temperature and
top_p: what vLLM returns by default, and what a harness scoring text with the model expects (the
model's own distribution, not the sampler's). No torch here: the HTTP side only renders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """The k most likely tokens at this position (id, logprob), most likely first."""


Name = Callable[[int], str]


def completion_logprobs(
    entries: Sequence[TokenLogprob | None], ids: Sequence[int], name: Name, offset: int
) -> tuple[dict[str, Any], int]:
    """Completions' ``{tokens, token_logprobs, top_logprobs, text_offset}`` and the offset after them.

    ``entries[i]`` is None for a token with no logprob (the first prompt token under echo: nothing
    precedes it). ``top_logprobs`` holds the k alternatives plus the chosen token, as vLLM and OpenAI
    do (so up to k + 1 keys); ``text_offset`` counts characters from the start of the returned text.
    """
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, entry in zip(ids, entries, strict=True):
        text = name(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(entry.logprob)
        top = {name(t): lp for t, lp in entry.top}
        top.setdefault(text, entry.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob], name: Name) -> list[dict[str, Any]]:
    """Chat's ``logprobs.content``: per token ``{token, logprob, bytes, top_logprobs: [k of the same]}``."""
    return [
        {
            **_token(name(e.token_id), e.logprob),
            "top_logprobs": [_token(name(t), lp) for t, lp in e.top],
        }
        for e in entries
    ]
