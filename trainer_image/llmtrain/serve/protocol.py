"""The /v1/completions request: parsed and validated into a typed value, or an ApiError naming the field.

Policy for fields: everything in OpenAI's completions API is known. Those this server implements are
checked for type and range; those it does not (best_of other than n, suffix) are accepted only at
their neutral value, so a client never silently gets a behaviour other than the one it asked for;
``user`` is accepted and ignored. A field OpenAI does not define is rejected, as OpenAI does
("Unrecognized request argument supplied"). The helpers here are shared with the chat parser.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmtrain.serve.errors import ApiError, invalid

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_PROMPTS = 64  # sequences in one request (prompts x n); each is one row in the batcher
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' integer logprobs
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as OpenAI documents it (torch accepts all of it)
BIAS_RANGE = 100.0  # logit_bias values lie in [-100, 100]

Prompt = str | tuple[int, ...]
"""A text prompt, or one already tokenized (what evaluation harnesses send)."""

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
    "logprobs",
    "echo",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "best_of",
    "suffix",
}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each sampled token's, and the k most likely alternatives."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit) pairs."""


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[Prompt, ...]
    params: SamplingParams
    n: int = 1
    """Choices per prompt: choice ``index`` = prompt position * n + j, as OpenAI orders them."""
    echo: bool = False
    """The prompt text (and with logprobs, the prompt tokens' log-probabilities) comes before the answer."""
    stream: bool = False
    include_usage: bool = False
    """stream_options.include_usage: a last chunk with the token counts."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(body: dict[str, Any], name: str, default: float, low: float, high: float, low_open: bool) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise invalid(f"{name} must be a finite number, got {value!r}", param=name)
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid(f"{name} must be in {bracket}{low:g}, {high:g}], got {value}", param=name)
    return float(value)


def integer(body: dict[str, Any], name: str, default: int, low: int, high: int, hint: str = "") -> int:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise invalid(f"{name} must be an integer, got {type(value).__name__}", param=name)
    if not low <= value <= high:
        raise invalid(f"{name} must be in [{low}, {high}], got {value}{hint}", param=name)
    return int(value)


def _token_ids(value: list[Any], vocab_size: int) -> tuple[int, ...]:
    if not all(is_int(t) for t in value):
        raise invalid("a token-id prompt must be a list of integers", param="prompt")
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise invalid(f"prompt token ids must be in [0, {vocab_size}), got {bad[0]}", param="prompt")
    return tuple(value)


def _prompts(value: Any, vocab_size: int) -> tuple[Prompt, ...]:
    """A string, a list of strings, a list of token ids, or a list of such lists (OpenAI's four forms)."""
    if value is None:
        raise invalid("you must provide a prompt", param="prompt")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid("prompt must be a string or a list of strings or token ids", param="prompt")
    prompts: list[Prompt]
    if all(is_int(t) for t in value):
        prompts = [_token_ids(value, vocab_size)]
    elif all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif all(isinstance(p, list) for p in value):
        prompts = [_token_ids(p, vocab_size) for p in value]
    else:
        raise invalid("prompt must be a string or a list of strings or token ids", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise invalid(f"prompt must hold 1 to {MAX_PROMPTS} prompts, got {len(prompts)}", param="prompt")
    if any(len(p) == 0 for p in prompts):
        raise invalid("prompt must not be empty (this model has no beginning-of-text token)", param="prompt")
    return tuple(prompts)


def stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
    return tuple(stops)


def boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{name} must be a boolean, got {type(value).__name__}", param=name)
    return value


def unsupported(name: str, why: str = "") -> ApiError:
    return invalid(f"{name} is not supported by this server{why}", param=name, code="unsupported_parameter")


def check_fields(body: Any, known: set[str], neutral: dict[str, Callable[[Any], bool]]) -> dict[str, Any]:
    """The body as a dict; unknown fields are refused, and known-unsupported ones unless neutral."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    for name in body:
        if name not in known and name not in neutral:
            raise invalid(f"Unrecognized request argument supplied: {name}", param=name)
    for name, is_neutral in neutral.items():
        if name in body and not is_neutral(body[name]):
            raise unsupported(name)
    return body


def check_model(body: dict[str, Any], served_model: str) -> None:
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


def seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is not None and not (is_int(value) and SEED_RANGE[0] <= value <= SEED_RANGE[1]):
        raise invalid(f"seed must be a 64-bit signed integer, got {value!r}", param="seed")
    return value


def stream_options(body: dict[str, Any], stream: bool) -> bool:
    """stream_options.include_usage (only with stream=true, as OpenAI checks)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise invalid("stream_options takes only include_usage", param="stream_options")
    return boolean(options, "include_usage")


def logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's map from token id (a JSON object key, so a string) to a bias in [-100, 100]."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid("logit_bias must be an object mapping token ids to numbers", param="logit_bias")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.lstrip("-").isdigit() and 0 <= int(key) < vocab_size):
            raise invalid(
                f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}", "logit_bias"
            )
        if not _is_number(bias) or not math.isfinite(bias) or abs(bias) > BIAS_RANGE:
            raise invalid(f"logit_bias values must be numbers in [-100, 100], got {bias!r}", "logit_bias")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def common_sampling(body: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The sampling fields completions and chat share, as SamplingParams keyword arguments."""
    return {
        "temperature": number(body, "temperature", 1.0, 0.0, 2.0, low_open=False),
        "top_p": number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "stop": stop_sequences(body.get("stop")),
        "seed": seed(body),
        "frequency_penalty": number(body, "frequency_penalty", 0.0, -2.0, 2.0, low_open=False),
        "presence_penalty": number(body, "presence_penalty", 0.0, -2.0, 2.0, low_open=False),
        "logit_bias": logit_bias(body.get("logit_bias"), vocab_size),
    }


def choices(body: dict[str, Any], prompts: int) -> int:
    n = integer(body, "n", 1, 1, MAX_PROMPTS)
    if prompts * n > MAX_PROMPTS:
        raise invalid(f"prompts x n must be at most {MAX_PROMPTS} sequences, got {prompts} x {n}", param="n")
    return n


def parse_completion(
    body: Any, served_model: str, max_tokens_limit: int, vocab_size: int = 2**31
) -> CompletionRequest:
    """Validate a decoded JSON body; raises ApiError (400, or 404 for another model's name)."""
    body = check_fields(body, _IMPLEMENTED, {})  # best_of and suffix are checked below
    check_model(body, served_model)
    prompts = _prompts(body.get("prompt"), vocab_size)
    n = choices(body, len(prompts))
    if body.get("suffix") not in (None, ""):
        raise unsupported("suffix", " (this model does not fill in the middle)")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise unsupported("best_of", " (only best_of = n: every sampled sequence is returned)")

    echo = boolean(body, "echo")
    asked_zero = body.get("max_tokens") == 0 and not echo
    hint = " (0 is allowed only with echo, to score the prompt)" if asked_zero else ""
    max_tokens = integer(
        body,
        "max_tokens",
        min(DEFAULT_MAX_TOKENS, max_tokens_limit),
        0 if echo else 1,
        max_tokens_limit,
        hint,
    )
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = integer(body, "logprobs", 0, 0, MAX_COMPLETION_LOGPROBS)
    stream = boolean(body, "stream")
    return CompletionRequest(
        model=served_model,
        prompts=prompts,
        params=SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **common_sampling(body, vocab_size)),
        n=n,
        echo=echo,
        stream=stream,
        include_usage=stream_options(body, stream),
    )


def check_context(prompt_tokens: int, max_tokens: int, context_length: int, index: int) -> None:
    """Prompt plus completion must fit the model's positions, as OpenAI checks before generating."""
    if prompt_tokens + max_tokens > context_length:
        where = f"prompt[{index}]" if index >= 0 else "the messages"
        raise invalid(
            f"This model's maximum context length is {context_length} tokens, however you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in {where}, {max_tokens} for "
            "the completion). Please reduce your prompt or completion length.",
            param=("prompt" if index >= 0 else "messages")
            if prompt_tokens >= context_length
            else "max_tokens",
            code="context_length_exceeded",
        )
