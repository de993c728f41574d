"""`ftcluster data scrub`: personal and secret data in every string of every record replaced by placeholders.

Secrets are matched by the shapes their issuers give them (AWS AKIA/ASIA ids, GitHub ghp_/github_pat_, ...),
most specific first, so a token is counted once under its own kind; then e-mail and IPv4 addresses; phone
numbers last, by the `phonenumbers` library (Google's libphonenumber): it accepts only numbers valid in a
numbering plan, so ages, years, dates, order numbers and prices stay as they are. Numbers without a country
prefix are read as the default region's (--phone-region). Keys are not scrubbed, only values.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import phonenumbers

from ftcluster.errors import UserError
from ftcluster.util.secrets import SECRET_PATTERNS

# (kind, pattern): the secret detectors of ftcluster.util.secrets, then personal data. A pattern with a
# `secret` group replaces only that group, keeping what names it ("Authorization: Bearer [BEARER_TOKEN]",
# "api_key=[API_KEY]"); otherwise the whole match is replaced.
_PATTERNS = [
    *SECRET_PATTERNS,
    ("email", r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b"),
    # Not one octet of a longer dotted run (a version number such as 1.2.3.4.5).
    ("ipv4", r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]*\d)"),
]
_COMPILED = [(kind, re.compile(pattern)) for kind, pattern in _PATTERNS]
KINDS = tuple(kind for kind, _ in _PATTERNS) + ("phone",)


def placeholder(kind: str) -> str:
    return f"[{kind.upper()}]"


def scrub_text(text: str, phone_region: str = "US") -> tuple[str, Counter]:
    """`text` with every match replaced by its kind's placeholder, and the count of each kind."""
    counts: Counter = Counter()
    for kind, pattern in _COMPILED:
        text, n = pattern.subn(lambda m, kind=kind: _replace(m, kind), text)
        if n:
            counts[kind] += n
    pieces, end = [], 0
    for match in phonenumbers.PhoneNumberMatcher(text, phone_region, leniency=phonenumbers.Leniency.VALID):
        pieces += [text[end:match.start], placeholder("phone")]
        end = match.end
        counts["phone"] += 1
    return "".join(pieces) + text[end:], counts


def scrub_record(value: Any, phone_region: str = "US") -> tuple[Any, Counter]:
    """Every string inside a record (turns, nested objects, lists) scrubbed; other values unchanged."""
    if isinstance(value, str):
        return scrub_text(value, phone_region)
    counts: Counter = Counter()
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out[key], found = scrub_record(item, phone_region)
            counts += found
        return out, counts
    if isinstance(value, list):
        out_list = []
        for item in value:
            scrubbed, found = scrub_record(item, phone_region)
            out_list.append(scrubbed)
            counts += found
        return out_list, counts
    return value, counts


def check_region(region: str) -> None:
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise UserError(f"--phone-region {region!r} is not a region code libphonenumber knows; use a two-letter "
                        f"code such as US, GB, DE, IN")


def _replace(match: re.Match, kind: str) -> str:
    if "secret" not in match.re.groupindex:
        return placeholder(kind)
    start, end = match.span("secret")
    whole = match.group(0)
    return whole[:start - match.start()] + placeholder(kind) + whole[end - match.start():]
