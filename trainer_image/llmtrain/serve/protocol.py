"""The /v1/completions request: parsed and validated into a typed value, or an ApiError naming the field.

Policy for fields: everything in OpenAI's completions API is known. Those this server implements are
checked for type and range; those it does not (logprobs, echo, best_of, penalties, logit_bias,
suffix) are accepted only at their neutral value, so a client never silently gets a different
behaviour from the one it asked for; ``user`` is accepted and ignored. A field OpenAI does not define
is rejected, as OpenAI does ("Unrecognized request argument supplied").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmtrain.serve.errors import ApiError, invalid

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_PROMPTS = 64  # prompts in one request; each is one sequence in the batcher
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as OpenAI documents it (torch accepts all of it)

# Known fields this server does not implement, with the values that mean "not used".
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
_IMPLEMENTED = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "n",
    "seed",
    "user",
}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[str, ...]
    """One choice per prompt, index = position in the list (n is always 1)."""
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    """stream_options.include_usage: a last chunk with the token counts."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(
    body: dict[str, Any], name: str, default: float, low: float, high: float, low_open: bool
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise invalid(f"{name} must be a finite number, got {value!r}", param=name)
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid(f"{name} must be in {bracket}{low:g}, {high:g}], got {value}", param=name)
    return float(value)


def _prompts(value: Any) -> tuple[str, ...]:
    if value is None:
        raise invalid("you must provide a prompt", param="prompt")
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise invalid("prompt must be a string or a list of strings", param="prompt")
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise invalid(f"prompt must hold 1 to {MAX_PROMPTS} strings, got {len(prompts)}", param="prompt")
    if any(not p for p in prompts):
        raise invalid("prompt must not be empty (this model has no beginning-of-text token)", param="prompt")
    return tuple(prompts)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
    return tuple(stops)


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{name} must be a boolean, got {type(value).__name__}", param=name)
    return value


def parse_completion(body: Any, served_model: str, max_tokens_limit: int) -> CompletionRequest:
    """Validate a decoded JSON body; raises ApiError (400, or 404 for another model's name)."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    for name in body:
        if name not in _IMPLEMENTED and name not in _NEUTRAL:
            raise invalid(f"Unrecognized request argument supplied: {name}", param=name)
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if not any(value == n and type(value) is type(n) for n in neutral):
            raise invalid(f"{name} is not supported by this server", param=name, code="unsupported_parameter")

    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise invalid("model must be a string", param="model")
    if model != served_model:
        raise ApiError(
            404,
            f"The model `{model}` does not exist; this server serves `{served_model}`",
            param="model",
            code="model_not_found",
        )
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise invalid("only n=1 is supported; send a list of prompts for several completions", param="n")

    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    elif not _is_int(max_tokens):
        raise invalid(f"max_tokens must be an integer, got {type(max_tokens).__name__}", param="max_tokens")
    elif not 1 <= max_tokens <= max_tokens_limit:
        raise invalid(f"max_tokens must be in [1, {max_tokens_limit}], got {max_tokens}", param="max_tokens")

    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise invalid(f"seed must be a 64-bit signed integer, got {seed!r}", param="seed")

    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options takes only include_usage", param="stream_options")
        include_usage = _bool(options, "include_usage")

    return CompletionRequest(
        model=served_model,
        prompts=_prompts(body.get("prompt")),
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0, low_open=False),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            stop=_stop(body.get("stop")),
            seed=seed,
        ),
        stream=stream,
        include_usage=include_usage,
    )


def check_context(prompt_tokens: int, max_tokens: int, context_length: int, index: int) -> None:
    """Prompt plus completion must fit the model's positions, as OpenAI checks before generating."""
    if prompt_tokens + max_tokens > context_length:
        raise invalid(
            f"This model's maximum context length is {context_length} tokens, however you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in prompt[{index}], {max_tokens} for "
            "the completion). Please reduce your prompt or completion length.",
            param="prompt" if prompt_tokens >= context_length else "max_tokens",
            code="context_length_exceeded",
        )
