"""The /v1/chat/completions request: messages validated, then rendered with the model's chat template.

The prompt is the tokenizer's own chat template (``apply_chat_template(..., add_generation_prompt=True)``);
a tokenizer without one is refused with a 400 rather than given an invented format, since a template
the model was not trained on makes it answer badly without any error. Text content only: tools,
function calls, images, audio and structured output are refused as unsupported, with the field named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmtrain.serve.errors import invalid
from llmtrain.serve.protocol import (
    SamplingParams,
    boolean,
    check_fields,
    check_model,
    choices,
    common_sampling,
    integer,
    stream_options,
    unsupported,
)

ROLES = ("system", "user", "assistant", "developer")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs

_IMPLEMENTED = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "n",
    "seed",
    "user",
    "logprobs",
    "top_logprobs",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "metadata",
    "store",
}


def _none_or_empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


# Known fields this server does not implement, accepted only at the value that means "not used".
_NEUTRAL = {
    "tools": _none_or_empty,
    "functions": _none_or_empty,
    "tool_choice": lambda v: v in (None, "none", "auto") and not isinstance(v, dict),
    "function_call": lambda v: v in (None, "none", "auto") and not isinstance(v, dict),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v is None or v == ["text"],
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "service_tier": lambda v: v in (None, "auto", "default"),
    "verbosity": lambda v: v is None,
}
_MESSAGE_FIELDS = {"role", "content", "name"}
_MESSAGE_UNSUPPORTED = {"tool_calls", "function_call", "tool_call_id", "audio", "refusal"}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict[str, str], ...]
    """Each {"role", "content"[, "name"]} with content as plain text, as the template receives it."""
    params: SamplingParams
    max_tokens: int | None
    """None: up to the model's context (OpenAI's default for chat), capped by the server's limit."""
    n: int = 1
    stream: bool = False
    include_usage: bool = False


def _content(value: Any, where: str) -> str:
    """A string, or a list of text parts (joined with newlines, as vLLM joins them)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise invalid(
            f"{where}.content must be a string or a list of content parts", param=f"{where}.content"
        )
    texts = []
    for j, part in enumerate(value):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{at} must be an object with a type", param=at)
        if part["type"] != "text":
            raise unsupported(f"{at}.type", f": only text content (got {part['type']!r})")
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise invalid(f"{at} must be {{'type': 'text', 'text': string}}", param=f"{at}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty list of messages", param="messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", param=where)
        for key in message:
            if key in _MESSAGE_UNSUPPORTED and message[key] is not None:
                raise unsupported(f"{where}.{key}")
            if key not in _MESSAGE_FIELDS and key not in _MESSAGE_UNSUPPORTED:
                raise invalid(
                    f"Unrecognized request argument supplied: {where}.{key}", param=f"{where}.{key}"
                )
        role = message.get("role")
        if role in ("tool", "function"):
            raise unsupported(
                f"{where}.role", f": {role} messages need tool calling, which this server lacks"
            )
        if role not in ROLES:
            raise invalid(
                f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role"
            )
        if "content" not in message:
            raise invalid(f"{where}.content is required", param=f"{where}.content")
        rendered = {"role": role, "content": _content(message["content"], where)}
        if message.get("name") is not None:
            if not isinstance(message["name"], str):
                raise invalid(f"{where}.name must be a string", param=f"{where}.name")
            rendered["name"] = message["name"]
        out.append(rendered)
    return tuple(out)


def parse_chat(body: Any, served_model: str, max_tokens_limit: int, vocab_size: int = 2**31) -> ChatRequest:
    """Validate a decoded JSON body; raises ApiError (400, or 404 for another model's name)."""
    body = check_fields(body, _IMPLEMENTED, _NEUTRAL)
    check_model(body, served_model)
    messages = _messages(body.get("messages"))
    n = choices(body, 1)
    # max_completion_tokens replaced max_tokens in OpenAI's API; the newer one wins when both are sent.
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is not None:
        max_tokens = integer(body, name, 0, 1, max_tokens_limit)
    logprobs = boolean(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if not logprobs:
            raise invalid("top_logprobs requires logprobs to be true", param="top_logprobs")
        top = integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    stream = boolean(body, "stream")
    params = SamplingParams(
        max_tokens=max_tokens or max_tokens_limit,
        logprobs=(top or 0) if logprobs else None,
        **common_sampling(body, vocab_size),
    )
    return ChatRequest(
        model=served_model,
        messages=messages,
        params=params,
        max_tokens=max_tokens,
        n=n,
        stream=stream,
        include_usage=stream_options(body, stream),
    )


def render_prompt(tokenizer: Any, messages: tuple[dict[str, str], ...]) -> str:
    """The conversation as the model was trained to read it, ending where the assistant's turn starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise invalid(
            "this model's tokenizer has no chat template, so chat messages cannot be turned into a "
            "prompt; use /v1/completions, or serve a model whose tokenizer_config.json has a chat_template",
            param="messages",
            code="chat_template_missing",
        )
    try:
        text: str = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # the template's own checks (e.g. "roles must alternate") raise
        raise invalid(f"the chat template rejected these messages: {exc}", param="messages") from None
    return text
