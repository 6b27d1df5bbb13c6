"""Credentials never leave the process: storage URLs are shown with their password replaced."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# scheme://user:password@host  ->  the password part, wherever it appears in a text
_CREDENTIAL_IN_TEXT = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<secret>[^@\s/]+)@")
_PASSWORD_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)(?P<secret>[^&\s]+)", re.I)


def redact_url(url: str | None) -> str | None:
    """The URL with any password (userinfo or ``password=`` query) replaced by ``***``."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if parts.password is not None:
        user_info, _, host = netloc.rpartition("@")
        user = user_info.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}"
    return redact_text(urlunsplit(parts._replace(netloc=netloc)))


def redact_text(text: str) -> str:
    """Every URL password inside a free text (an error message, a log line) masked."""
    text = _CREDENTIAL_IN_TEXT.sub(lambda match: f"{match['head']}{MASK}@", text)
    return _PASSWORD_QUERY.sub(lambda match: f"{match['head']}{MASK}", text)
