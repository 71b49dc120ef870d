"""Document cleaning: normalisation and stripping, then Gopher/C4-style quality filters.

``clean`` returns the cleaned text, or ``None`` with the name of the first rule that rejected the
document; every rule is named after the Cleaning field that configures it so the statistics read like
the configuration.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from typing import Literal

from llmop_contract.api.v1alpha1.data import Cleaning, Normalization
from llmtrain.prepare import pii

_SCRIPT = re.compile(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# Block-level tags end a line; inline tags just vanish. A tag must start with a letter, '/' or '!'
# so that prose like "a < b" or "x<3" survives.
_BLOCK_TAG = re.compile(
    r"</?(?:p|div|br|li|ul|ol|tr|td|th|table|h[1-6]|section|article|header|footer|blockquote|pre)\b[^<>]*>",
    re.IGNORECASE,
)
_TAG = re.compile(r"</?[A-Za-z!][^<>]*>")
_BOILERPLATE = re.compile(
    r"""(
        \bcookies?\b.*\b(policy|settings|consent|accept|use)\b | \bwe\ use\ cookies\b | \baccept\ (all\ )?cookies\b
      | \ball\ rights\ reserved\b | ^\s*(copyright\b|©|\(c\)\s*\d{4})
      | \bprivacy\ policy\b | \bterms\ (of|and)\ (use|service|conditions)\b
      | ^\s*(home|menu|search|back\ to\ top|skip\ to\ (main\ )?content|read\ more|click\ here|share\ (this|on)
             |follow\ us|sign\ (in|up)|log\ ?(in|out)|subscribe|newsletter|previous|next)\b\W*$
      | \b(enable|requires?)\ javascript\b | \bjavascript\ (is\ )?(disabled|required)\b
      | \bpowered\ by\b
    )""",
    re.IGNORECASE | re.VERBOSE,
)
# "Home > Products > Widgets": three or more short crumbs joined by a separator.
_BREADCRUMB = re.compile(r"^\s*[^\s>|»/][^>|»]{0,40}(\s[>|»/]\s[^>|»]{1,40}){2,}\s*$")
_BOILERPLATE_MAX_WORDS = 25  # longer lines are prose that happens to mention e.g. "privacy policy"
_SYMBOLS = re.compile(r"#|\.\.\.|…")
# C0/C1 controls except tab and newline, plus the format characters that hide in scraped text
# (soft hyphen, zero-width spaces and joiners, bidi marks, word joiner, BOM). A regex class is far
# faster than a per-character unicodedata.category scan.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_SPACES = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


def _strip_controls(text: str) -> str:
    return _CONTROLS.sub("", text)


def _strip_markup(text: str) -> str:
    text = _SCRIPT.sub(" ", text)
    text = _COMMENT.sub(" ", text)
    text = _BLOCK_TAG.sub("\n", text)
    text = _TAG.sub("", text)
    return html.unescape(text)


def is_boilerplate(line: str) -> bool:
    """A short line that is navigation, legal or cookie furniture rather than content."""
    if len(line.split()) > _BOILERPLATE_MAX_WORDS:
        return False
    return bool(_BOILERPLATE.search(line) or _BREADCRUMB.match(line))


def quality_failure(text: str, cfg: Cleaning) -> str | None:
    """The first Gopher-style rule ``text`` breaks, or None."""
    tokens = text.split()
    n = len(tokens)
    if n < cfg.min_words:
        return "min_words"
    if n > cfg.max_words:
        return "max_words"
    stripped = [t.strip("\"'()[]{}.,;:!?-") for t in tokens]
    lengths = [len(t) for t in stripped if t]
    mean = sum(lengths) / len(lengths) if lengths else 0.0
    if mean < cfg.min_mean_word_length:
        return "min_mean_word_length"
    if mean > cfg.max_mean_word_length:
        return "max_mean_word_length"
    if len(_SYMBOLS.findall(text)) / n > cfg.max_symbol_word_ratio:
        return "max_symbol_word_ratio"
    if sum(any(c.isalpha() for c in t) for t in tokens) / n < cfg.min_alpha_word_fraction:
        return "min_alpha_word_fraction"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and (len(lines) - len(set(lines))) / len(lines) > cfg.max_duplicate_line_fraction:
        return "max_duplicate_line_fraction"
    return None


_FORMS: dict[Normalization, Literal["NFC", "NFKC"]] = {Normalization.NFC: "NFC", Normalization.NFKC: "NFKC"}


def clean(text: str, cfg: Cleaning) -> tuple[str | None, Counter[str]]:
    """(cleaned text or None, events): events count edits (e.g. ``boilerplate_lines``, ``pii_email``)
    and, for a rejected document, ``removed:<rule>``."""
    events: Counter[str] = Counter()
    if not cfg.enabled:
        return (text if text.strip() else None), events
    if form := _FORMS.get(cfg.unicode_normalization):
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    stripped = _strip_controls(text)
    if stripped != text:
        events["control_chars"] += 1
        text = stripped
    if cfg.strip_markup and ("<" in text or "&" in text):
        stripped = _strip_markup(text)
        if stripped != text:
            events["markup"] += 1
            text = stripped
    if cfg.remove_boilerplate:
        lines = text.split("\n")
        kept = [line for line in lines if not (line.strip() and is_boilerplate(line))]
        if len(kept) != len(lines):
            events["boilerplate_lines"] += len(lines) - len(kept)
            text = "\n".join(kept)
    if cfg.redact_pii:
        text, counts = pii.redact(text)
        events.update(counts)
    text = _BLANKS.sub("\n\n", _SPACES.sub("\n", text)).strip()
    if not text:
        events["removed:empty"] += 1
        return None, events
    failure = quality_failure(text, cfg)
    if failure:
        events[f"removed:{failure}"] += 1
        return None, events
    return text, events
