"""Supervised records -> token ids with a per-token loss mask, for PromptCompletion, Chat and Template.

A record becomes a list of text segments, each with or without a loss: the prompt has none, the
completion (or each assistant reply, as the chat template renders it) has one. Segments are tokenised
separately, so the tokens with a loss decode to exactly the completion text, and every record ends
with the tokenizer's EOS, which has a loss too: the model learns where an answer stops.

Records that lack a field or hold the wrong type in it are not fatal: they are counted per field
(``Problems``), reported in the statistics and a log line, and skipped. Only when no record is left
does the stage fail, with DataError naming the field that was wrong most often.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from llmop_contract.api.v1alpha1.data import DataFormat, RecordFormat
from llmop_contract.protocol import LOSS_FLAG, RECORD_START_FLAG
from llmtrain.config import DataError

log = logging.getLogger("llmtrain.prepare")

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
Segments = tuple[tuple[str, bool], ...]
"""A rendered record: (text, has a loss) in order."""
_TOKENISE_BATCH = 512


class Invalid(Exception):
    """One record cannot be used: ``field`` (a record field, or ``<record>``) and what is wrong."""

    def __init__(self, field: str, kind: str) -> None:
        super().__init__(f"{field}: {kind}")
        self.field, self.kind = field, kind


@dataclass
class Problems:
    """Unusable records, per record field and kind (missing, not_a_string, ...)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, problem: Invalid) -> None:
        self.counts[(problem.field, problem.kind)] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_field(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (name, kind), n in sorted(self.counts.items()):
            out.setdefault(name, {})[kind] = n
        return out

    def worst(self) -> str | None:
        per_field: Counter[str] = Counter()
        for (name, _), n in self.counts.items():
            per_field[name] += n
        return per_field.most_common(1)[0][0] if per_field else None

    def describe(self, name: str) -> str:
        kinds = self.by_field().get(name, {})
        return ", ".join(f"{kind.replace('_', ' ')} in {n}" for kind, n in kinds.items())


def _text(record: dict[str, Any], name: str) -> str:
    if name not in record or record[name] is None:
        raise Invalid(name, "missing")
    value = record[name]
    if not isinstance(value, str):
        raise Invalid(name, "not_a_string")
    return value


def _scalar(record: dict[str, Any], name: str) -> str:
    """A template field: strings as they are, numbers and booleans (labels often are) as str()."""
    if name not in record or record[name] is None:
        raise Invalid(name, "missing")
    value = record[name]
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    raise Invalid(name, "not_a_scalar")


def fill(template: str, record: dict[str, Any]) -> str:
    """``template`` with each ``{field}`` replaced by the record's value (other braces stay as they are)."""
    return _FIELD.sub(lambda m: _scalar(record, m.group(1)), template)


class Renderer:
    """Turns a record into segments for one DataFormat; raises Invalid for a record it cannot use."""

    def __init__(self, fmt: DataFormat, tokenizer: Any) -> None:
        self.fmt, self.tok = fmt, tokenizer
        if fmt.type == RecordFormat.CHAT and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "spec.data.format.type",
                "Chat records are rendered with the tokenizer's chat template, and this tokenizer has "
                "none (use a chat/instruct model's tokenizer, or format Template)",
            )
        self.completion_template = fmt.completion_template or f" {{{fmt.completion_field}}}"

    def api_field(self, record_field: str) -> str:
        """The spec field to name when ``record_field`` is what made every record unusable."""
        f = self.fmt
        if f.type == RecordFormat.CHAT:
            return "spec.data.format.messagesField"
        if f.type == RecordFormat.TEMPLATE:
            in_prompt = record_field in _FIELD.findall(f.prompt_template or "")
            return "spec.data.format." + ("promptTemplate" if in_prompt else "completionTemplate")
        if record_field == f.prompt_field:
            return "spec.data.format.promptField"
        if record_field == f.completion_field:
            return "spec.data.format.completionField"
        return "spec.data.sources"

    def render(self, record: Any) -> Segments:
        if not isinstance(record, dict):
            raise Invalid("<record>", "not_an_object")
        f = self.fmt
        if f.type == RecordFormat.PROMPT_COMPLETION:
            prompt, completion = _text(record, f.prompt_field), _text(record, f.completion_field)
            if not completion.strip():
                raise Invalid(f.completion_field, "empty")
            return ((prompt, False), (completion, True))
        if f.type == RecordFormat.TEMPLATE:
            assert f.prompt_template is not None  # the API requires it with type Template
            prompt, completion = fill(f.prompt_template, record), fill(self.completion_template, record)
            if not completion.strip():
                raise Invalid(_FIELD.findall(self.completion_template)[0], "empty")
            return ((prompt, False), (completion, True))
        if f.type == RecordFormat.CHAT:
            return self._chat(record)
        raise ValueError(f"format {f.type} has no records")

    def _chat(self, record: dict[str, Any]) -> Segments:
        name = self.fmt.messages_field
        if name not in record or record[name] is None:
            raise Invalid(name, "missing")
        messages = record[name]
        if not isinstance(messages, list) or not messages:
            raise Invalid(name, "not_a_list_of_messages")
        for m in messages:
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise Invalid(name, "message_without_role_and_content")
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        if not any(m["role"] == "assistant" for m in turns):
            raise Invalid(name, "no_assistant_turn")
        return assistant_segments(self.tok, turns, name)


def _render(tok: Any, messages: list[dict[str, str]], generation_prompt: bool, name: str) -> str:
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises what the template chooses (roles must alternate, ...)
        raise Invalid(name, "rejected_by_chat_template") from exc
    return str(text)


def assistant_segments(tok: Any, messages: list[dict[str, str]], name: str) -> Segments:
    """The conversation as the chat template renders it, with a loss on each assistant reply.

    A reply's span is what rendering the conversation up to and including it adds to rendering the
    turns before it with the generation prompt (``<|im_start|>assistant\\n`` and the like): its content
    and the template's end-of-turn marker, but none of the template's role headers. This holds for any
    template whose renderings of prefixes are prefixes of the whole, which is checked: a template that
    rewrites earlier turns (some drop old reasoning) makes the record unusable rather than mislabelled.
    """
    full = _render(tok, messages, False, name)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], True, name)
        upto = _render(tok, messages[: i + 1], False, name)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= done):
            raise Invalid(name, "chat_template_not_incremental")
        segments += [(full[done : len(before)], False), (full[len(before) : len(upto)], True)]
        done = len(upto)
    segments.append((full[done:], False))
    return tuple((text, loss) for text, loss in segments if text)


def special_prefix(tok: Any) -> list[int]:
    """The ids the tokenizer itself puts before a text (a BOS for Llama, Gemma, Mistral; none for GPT-2
    or Qwen2): every record starts with them, as the model saw its training documents."""
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    full = list(tok("a")["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


@dataclass
class Encoded:
    """Token ids of records, each with its flags (LOSS_FLAG, RECORD_START_FLAG on the first token)."""

    ids: npt.NDArray[np.int64]
    flags: npt.NDArray[np.uint8]


class Encoder:
    """Segments -> ids and flags with the pretrained model's tokenizer, in batches."""

    def __init__(self, tok: Any, eos_id: int, chat: bool) -> None:
        self.tok, self.eos_id = tok, eos_id
        # A chat template writes the BOS itself when the model wants one ({{ bos_token }}).
        self.prefix = [] if chat else special_prefix(tok)

    def encode(self, records: Sequence[Segments]) -> Encoded:
        texts = [text for segs in records for text, _ in segs]
        ids_per_text: list[list[int]] = []
        for lo in range(0, len(texts), _TOKENISE_BATCH):
            batch = texts[lo : lo + _TOKENISE_BATCH]
            ids_per_text += [list(x) for x in self.tok(batch, add_special_tokens=False)["input_ids"]]
        ids: list[int] = []
        flags: list[int] = []
        k = 0
        for segs in records:
            first = len(ids)
            ids += self.prefix
            flags += [0] * len(self.prefix)
            for _, loss in segs:
                part = ids_per_text[k]
                k += 1
                ids += part
                flags += [LOSS_FLAG if loss else 0] * len(part)
            ids.append(self.eos_id)
            flags.append(LOSS_FLAG)
            flags[first] |= RECORD_START_FLAG
        return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(flags, dtype=np.uint8))


def segments_key(segs: Segments) -> bytes:
    """Exact-duplicate key of a rendered record: its texts and which of them carry the loss."""
    h = hashlib.blake2b(digest_size=16)
    for text, loss in segs:
        h.update(b"\x01" if loss else b"\x00")
        h.update(text.encode())
        h.update(b"\xff")
    return h.digest()


@dataclass
class Rendered:
    segments: list[Segments]
    origins: list[str]
    problems: Problems
    duplicates: int


def render_all(renderer: Renderer, records: Iterable[tuple[str, Any]], dedup: bool) -> Rendered:
    """Renders every (origin, record); counts the invalid ones and drops exact duplicates.

    Of cleaning, only exact deduplication applies to records: the Gopher/C4 rules (word counts, mean
    word length, symbol ratios, boilerplate lines, markup stripping, Unicode normalisation) are made
    for web pages and would drop short labelled examples ("Topic: license") or rewrite the very
    answers the model is to learn. Near-duplicate removal is off too: records built from one template
    share most of their shingles by design, so MinHash would call distinct examples duplicates.
    """
    out = Rendered([], [], Problems(), 0)
    seen: set[bytes] = set()
    for origin, record in records:
        try:
            segs = renderer.render(record)
        except Invalid as problem:
            out.problems.add(problem)
            continue
        if dedup:
            key = segments_key(segs)
            if key in seen:
                out.duplicates += 1
                continue
            seen.add(key)
        out.segments.append(segs)
        out.origins.append(origin)
    return out


def require_usable(renderer: Renderer, rendered: Rendered, read: int) -> None:
    """DataError naming the field when no record (or only one: no validation split) is usable."""
    usable = len(rendered.segments)
    if read == 0:
        raise DataError("spec.data.sources", "the sources hold no records (0 read)")
    if usable >= 2:
        return
    worst = rendered.problems.worst()
    if usable == 0 and worst is not None:
        raise DataError(
            renderer.api_field(worst),
            f"no usable record among {read}: field {worst!r} {rendered.problems.describe(worst)}",
        )
    raise DataError(
        "spec.data.sources",
        f"{usable} usable record(s) among {read} ({rendered.problems.total} invalid, "
        f"{rendered.duplicates} duplicates): at least 2 are needed, one for the validation split",
    )
