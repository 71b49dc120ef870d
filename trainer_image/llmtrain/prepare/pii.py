"""Redaction of personal data: e-mail addresses, phone numbers and IP addresses become placeholders."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

EMAIL = "<EMAIL>"
PHONE = "<PHONE>"
IP = "<IP_ADDRESS>"

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Candidates only; ipaddress validates them, so "1.2.3.999" or "dead:beef" prose is left alone.
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]*\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])")
# International or national numbers: optional +country code, groups separated by space, dot or
# hyphen, optional parenthesised area code; at least 7 digits overall (checked in _phone) so that
# years, versions and dates are not taken for phone numbers.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?!\w)")

# 2023-10-02, 02.10.2023, 2023/10/02: dates share the shape of short phone numbers.
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")


def _ip(match: re.Match[str]) -> str:
    text = match.group(0)
    if ":" in text:
        # "::", "1::2" and "a:b:c" are valid IPv6 but in prose they are slices, ratios and times;
        # demand at least two groups and five hex digits (fe80::1 is the shortest accepted).
        groups = [g for g in text.split("%")[0].split(":") if g]
        if len(groups) < 2 or sum(map(len, groups)) < 5:
            return text
    try:
        ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return text
    return IP


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    if _DATE.match(text):  # a date, possibly followed by an hour ("2024-11-22 15:30")
        return text
    digits = sum(c.isdigit() for c in text)
    separated = any(c in text for c in " .-()") or text.startswith("+")
    return PHONE if 7 <= digits <= 15 and separated else text


def redact(text: str) -> tuple[str, Counter[str]]:
    """Text with personal data replaced, and how many of each kind were replaced."""
    counts: Counter[str] = Counter()
    # E-mail first (its domain could look like an IPv4 address), then IPs (a dotted quad would
    # otherwise look like a phone number), phones last.
    text, n = _EMAIL.subn(EMAIL, text)
    counts["pii_email"] += n
    for pattern in (_IPV6, _IPV4):
        before = text.count(IP)
        text = pattern.sub(_ip, text)
        counts["pii_ip_address"] += text.count(IP) - before
    before = text.count(PHONE)
    text = _PHONE.sub(_phone, text)
    counts["pii_phone"] += text.count(PHONE) - before
    return text, +counts
