"""Generated deltas -> OpenAI's response bodies and stream chunks, for completions and for chat.

The HTTP layer collects each choice's deltas (``Choice``) and asks a view for the JSON: one view per
endpoint, so the wire formats (``text_completion`` / ``chat.completion`` / ``chat.completion.chunk``)
live in one place each and the generation loop is shared.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmtrain.serve.chat import ChatRequest
from llmtrain.serve.logprobs import Name, TokenLogprob, chat_logprobs, completion_logprobs
from llmtrain.serve.protocol import CompletionRequest
from llmtrain.serve.text import Delta


def finished_delta(index: int) -> Delta:
    """A choice that generates nothing (max_tokens=0 with echo): OpenAI and vLLM call that "length"."""
    return Delta(index, "", "length", 0)


@dataclass
class Choice:
    """One choice's deltas, collected."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""
    tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.logprobs.extend(delta.logprobs)
        if delta.finish_reason:
            self.finish_reason, self.tokens = delta.finish_reason, delta.completion_tokens


def usage(prompt_tokens: int, choices: Sequence[Choice]) -> dict[str, int]:
    """Prompt tokens once per prompt (not per choice, as OpenAI counts them), every sampled token."""
    completion = sum(c.tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


class View(Protocol):
    stream: bool
    include_usage: bool

    def response(self, choices: Sequence[Choice]) -> dict[str, Any]: ...

    def first_chunks(self, n: int) -> list[dict[str, Any]]: ...

    def chunk(self, delta: Delta) -> dict[str, Any]: ...

    def usage_chunk(self, choices: Sequence[Choice]) -> dict[str, Any]: ...


class CompletionView:
    def __init__(
        self,
        model: str,
        name: Name,
        req: CompletionRequest,
        prompts: list[list[int]],
        texts: list[str],
        scores: list[list[TokenLogprob | None]] | None,
    ) -> None:
        self.stream, self.include_usage = req.stream, req.include_usage
        self._name, self._req, self._prompts, self._texts, self._scores = name, req, prompts, texts, scores
        self._base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
        }
        self._base["model"] = model
        self._extra = {"usage": None} if req.include_usage else {}
        # Each choice's next text_offset: characters of the returned text before its next token.
        self._offsets = [0 if req.echo else len(texts[i // req.n]) for i in range(len(prompts) * req.n)]

    @property
    def _logprobs(self) -> bool:
        return self._req.params.logprobs is not None

    def _echo(self, index: int) -> tuple[str, dict[str, Any] | None]:
        """The prompt's text and, with logprobs, its tokens' entries (the first one has none)."""
        p = index // self._req.n
        if not self._logprobs:
            return self._texts[p], None
        assert self._scores is not None
        rendered, self._offsets[index] = completion_logprobs(self._scores[p], self._prompts[p], self._name, 0)
        return self._texts[p], rendered

    def _generated(self, index: int, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if not self._logprobs:
            return None
        ids = [e.token_id for e in entries]
        rendered, self._offsets[index] = completion_logprobs(entries, ids, self._name, self._offsets[index])
        return rendered

    def response(self, choices: Sequence[Choice]) -> dict[str, Any]:
        out = []
        for i, c in enumerate(choices):
            text, logprobs = c.text, None
            if self._req.echo:
                prompt_text, logprobs = self._echo(i)
                text = prompt_text + text
            generated = self._generated(i, c.logprobs)
            if logprobs is not None and generated is not None:
                logprobs = {k: logprobs[k] + generated[k] for k in logprobs}
            elif generated is not None:
                logprobs = generated
            out.append({"text": text, "index": i, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**self._base, "choices": out, "usage": usage(self._prompt_tokens, choices)}

    @property
    def _prompt_tokens(self) -> int:
        return sum(len(p) for p in self._prompts)

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        """Under echo, each choice's prompt first (as vLLM streams it)."""
        if not self._req.echo:
            return []
        chunks = []
        for i in range(n):
            text, logprobs = self._echo(i)
            choice = {"text": text, "index": i, "logprobs": logprobs, "finish_reason": None}
            chunks.append({**self._base, "choices": [choice], **self._extra})
        return chunks

    def chunk(self, delta: Delta) -> dict[str, Any]:
        choice = {
            "text": delta.text,
            "index": delta.index,
            "logprobs": self._generated(delta.index, delta.logprobs),
            "finish_reason": delta.finish_reason,
        }
        return {**self._base, "choices": [choice], **self._extra}

    def usage_chunk(self, choices: Sequence[Choice]) -> dict[str, Any]:
        return {**self._base, "choices": [], "usage": usage(self._prompt_tokens, choices)}


class ChatView:
    def __init__(self, model: str, name: Name, req: ChatRequest, prompt_tokens: int) -> None:
        self.stream, self.include_usage = req.stream, req.include_usage
        self._name, self._req, self._prompt_tokens = name, req, prompt_tokens
        self._id, self._created, self._model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self._extra = {"usage": None} if req.include_usage else {}

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if self._req.params.logprobs is None:
            return None
        return {"content": chat_logprobs(entries, self._name), "refusal": None}

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self._id, "object": kind, "created": self._created, "model": self._model}

    def response(self, choices: Sequence[Choice]) -> dict[str, Any]:
        out = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": self._logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ]
        return {
            **self._envelope("chat.completion"),
            "choices": out,
            "usage": usage(self._prompt_tokens, choices),
        }

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk"), "choices": [choice], **self._extra}

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        """Each choice's first delta names the role, with empty content, as OpenAI streams it."""
        return [
            self._chunk(
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
            for i in range(n)
        ]

    def chunk(self, delta: Delta) -> dict[str, Any]:
        return self._chunk(
            {
                "index": delta.index,
                "delta": {"content": delta.text} if delta.text else {},
                "logprobs": self._logprobs(delta.logprobs),
                "finish_reason": delta.finish_reason,
            }
        )

    def usage_chunk(self, choices: Sequence[Choice]) -> dict[str, Any]:
        return {
            **self._envelope("chat.completion.chunk"),
            "choices": [],
            "usage": usage(self._prompt_tokens, choices),
        }
