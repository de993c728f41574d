"""Secrets (tokens, keys, passwords) found by their name or their shape, and masked as `***`.

Every file, log line, dashboard entry and --dry-run that shows a config, a command line or an environment
goes through here first. A value is a secret when the key or variable that holds it has a secret-looking
name part (HF_TOKEN, wandb.api_key, dbPassword, AUTHORIZATION...) or when it is shaped like a token an
issuer hands out (AWS, GitHub, OpenAI, Slack, Hugging Face, JWT, Bearer, a URL's password ...). `ftcluster data scrub`
uses the same detectors.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# (kind, pattern), most specific first. A pattern with a `secret` group matches only that group as the
# secret, keeping what names it ("Authorization: Bearer ***", "api_key=***"); otherwise the whole match is
# the secret. Lookarounds instead of \b where tokens may end in '-' or '_'.
SECRET_PATTERNS = [
    ("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}"),
    ("aws_access_key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    ("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})(?![A-Za-z0-9_])"),
    ("openai_key", r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])"),
    ("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}(?![A-Za-z0-9-])"),
    ("hf_token", r"\bhf_[A-Za-z0-9]{30,}\b"),
    # A password inside a URL (https://user:PASSWORD@host/..., redis://:PASSWORD@host): only the password is
    # masked, the scheme, user and host stay readable. A port (host:8080/...) has no '@' after it: not a match.
    ("url_password", r"(?i)\b[a-z][a-z0-9+.-]*://[^\s/?#@:]*:(?P<secret>[^\s/?#@]+)@"),
    ("bearer_token", r"\b[Bb]earer\s+(?P<secret>[A-Za-z0-9._~+/-]{16,}=*)"),
    ("api_key", r"(?i)(?<![a-z0-9])(?:api[_-]?key|api[_-]?secret|access[_-]?token|auth[_-]?token|secret[_-]?key|"
                r"client[_-]?secret|private[_-]?key)[\"']?\s*[:=]\s*[\"']?(?P<secret>[^\s\"',;\[\]]{8,})"),
    ("password", r"(?i)(?<![a-z0-9])(?:password|passwd)[\"']?\s*[:=]\s*[\"']?(?P<secret>[^\s\"',;\[\]]{6,})"),
]
_COMPILED = [re.compile(pattern) for _, pattern in SECRET_PATTERNS]

# Name parts (split at punctuation and camelCase) that mark a secret. Plurals are left out on purpose:
# max_new_tokens and num_virtual_tokens are counts. AUTHOR is not AUTH.
_SECRET_PARTS = {"TOKEN", "KEY", "SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASSPHRASE", "CREDENTIAL",
                 "CREDENTIALS", "APIKEY", "PRIVATEKEY", "ACCESSKEY", "SECRETKEY", "COOKIE"}
_SECRET_SUFFIXES = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS")
_NAME_PARTS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z0-9]+(?![a-z])")
# An override or option as written on a command line: [+|++|~]key=value, --option=value.
_ASSIGNMENT = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<key>[^=\s'\"]+)=(?P<value>.*)$", re.S)


def is_secret_name(name: str) -> bool:
    """HF_TOKEN, WANDB_API_KEY, launcher.runtime_env.env_vars.HF_TOKEN, dbPassword, AUTHORIZATION: True;
    TOKENIZERS_PARALLELISM, max_new_tokens, author, keyboard: False."""
    for part in _NAME_PARTS.findall(str(name)):
        part = part.upper()
        if part in _SECRET_PARTS or part.endswith(_SECRET_SUFFIXES):
            return True
        if part.startswith("AUTH") and part not in ("AUTHOR", "AUTHORS", "AUTHORED"):
            return True
    return False


def has_secret_shape(text: str) -> bool:
    return any(pattern.search(text) for pattern in _COMPILED)


def redact_text(text: str) -> str:
    """`text` with every token-shaped value replaced by ***."""
    for pattern in _COMPILED:
        text = pattern.sub(_mask_match, text)
    return text


def redact(value: Any, secret: bool = False) -> Any:
    """A copy of a plain value (dicts, lists, scalars, as from OmegaConf.to_container) with every value under
    a secret-looking key, and every token-shaped substring, replaced by ***. Booleans, None and empty strings
    stay: they hold no secret, and config.yaml keeps loading."""
    if isinstance(value, dict):
        return {key: redact(item, secret or is_secret_name(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item, secret) for item in value]
    if secret and _holds_value(value):
        return MASK
    return redact_text(value) if isinstance(value, str) else value


def redact_args(args: list[str]) -> list[str]:
    """A command line's arguments with secrets masked: the value of `key=value` (a Hydra override, an
    --option=value) whose key looks secret, the argument after a secret-looking `--option`, and every
    token-shaped value anywhere."""
    out, mask_next = [], False
    for arg in args:
        if mask_next and not arg.startswith("-"):
            out.append(MASK if arg else arg)
            mask_next = False
            continue
        mask_next = False
        assignment = _ASSIGNMENT.match(arg)
        if assignment and is_secret_name(assignment["key"]) and assignment["value"] not in ("", "null"):
            out.append(f"{assignment['prefix']}{assignment['key']}={MASK}")
        else:
            out.append(redact_text(arg))
            mask_next = arg.startswith("-") and not assignment and is_secret_name(arg)
    return out


def find_secrets(value: Any, where: str = "") -> list[str]:
    """The dotted keys (list items as key[i]) of a plain value that hold a secret, by name or by shape.
    An already masked value (***) under a secret name still counts: it stands for one."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if is_secret_name(key) and _holds_value(item):
                found.append(path)
            else:
                found += find_secrets(item, path)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found += find_secrets(item, f"{where}[{i}]")
    elif isinstance(value, str) and has_secret_shape(value):
        found.append(where)
    return found


def without_secrets(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """A copy of a plain value with every secret left out, and the dotted keys (list items as key[i]) it left
    out: values under a secret-looking name, token-shaped strings, and strings already masked (a `***` read
    back from a config.yaml). For a file meant to be run again (a sweep's best.yaml): a *** kept there would
    be used as the token itself, while a key left out is asked for again."""
    removed: list[str] = []
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if (is_secret_name(key) and _holds_value(item)) or _secret_text(item):
                removed.append(path)
                continue
            kept[key], inner = without_secrets(item, path)
            removed += inner
        return kept, removed
    if isinstance(value, (list, tuple)):
        kept_items = []
        for i, item in enumerate(value):
            path = f"{where}[{i}]"
            if _secret_text(item):
                removed.append(path)
                continue
            item, inner = without_secrets(item, path)
            kept_items.append(item)
            removed += inner
        return kept_items, removed
    return value, removed


def _secret_text(value: Any) -> bool:
    return isinstance(value, str) and (MASK in value or has_secret_shape(value))


def _holds_value(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_holds_value(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_value(v) for v in value)
    return value is not None and not isinstance(value, bool) and value != ""


def _mask_match(match: re.Match) -> str:
    if "secret" not in match.re.groupindex:
        return MASK
    start, end = match.span("secret")
    whole = match.group(0)
    return whole[:start - match.start()] + MASK + whole[end - match.start():]
