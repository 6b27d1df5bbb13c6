"""Credentials never leave the process: storage URLs are shown with their password replaced."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# scheme://user:password@host  ->  the password part, wherever it appears in a text; greedy up
# to the last "@" of the authority, so that a raw "@" inside the password is masked too
_CREDENTIAL_IN_TEXT = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)"
                                 r"(?P<secret>[^\s/]+)@")
# ?password=... (also passwd, pwd): up to the next parameter, fragment, blank or quote
_PASSWORD_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)(?P<secret>[^&#\s'\"]+)",
                             re.I)


def redact_url(url: str | None) -> str | None:
    """The URL with any password (userinfo or ``password=`` query) replaced by ``***``."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if parts.password is None:  # rebuilding would also drop sqlite:////'s empty authority
        return redact_text(url)
    user_info, _, host = parts.netloc.rpartition("@")
    user = user_info.split(":", 1)[0]
    return redact_text(urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}")))


def redact_text(text: str) -> str:
    """Every URL password inside a free text (an error message, a log line) masked."""
    text = _CREDENTIAL_IN_TEXT.sub(lambda match: f"{match['head']}{MASK}@", text)
    return _PASSWORD_QUERY.sub(lambda match: f"{match['head']}{MASK}", text)


def redact_values(value: Any) -> Any:
    """A copy of nested dicts, lists and tuples with :func:`redact_text` applied to every string
    (a config tree before it is logged); other values are returned as they are."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_values(item) for item in value)
    return value
