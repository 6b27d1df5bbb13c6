"""Credentials never leave the process: URLs are shown with their password replaced by ``***``.

A URL's password is what the parser that connects with it reads: SQLAlchemy's
(:func:`sqlalchemy.engine.make_url`, which Optuna and MLflow's database stores use) for a database
URL, RFC 3986 (:func:`urllib.parse.urlsplit`, as requests/urllib3 read it) for any other. The two
disagree on raw ``/``, ``@``, ``#`` and ``?`` in a password (SQLAlchemy reads a password up to the
first ``@``, RFC 3986 ends the authority at ``/``, ``?`` or ``#`` and takes the last ``@``), so a
database URL they read differently is refused (:func:`check_unambiguous`): percent-encode the
password or give it in the environment.

Masking covers every reading: the whole user-info (up to the URL's last ``@``) of a URL in which
either parser finds a password, and ``password=`` (``passwd``, ``pwd``) query values. Every
password found is also remembered, so that :func:`redact_text` masks it, raw or percent-encoded,
wherever it turns up later in a free text (an error message from a library, a log line) even
where no URL around it can be recognised, e.g. a password with a blank in a message.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from sqlalchemy.engine import URL, make_url

from regflow.errors import ConfigError

MASK = "***"
MIN_REMEMBERED = 4  # shorter passwords are masked in URLs only, not in every text
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
# ?password=... (also passwd, pwd): up to the next parameter, fragment, blank or quote
_PASSWORD_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)(?P<secret>[^&#\s'\"]+)",
                             re.I)
_remembered: set[str] = set()


def is_database_url(url: str) -> bool:
    """Whether SQLAlchemy connects with this URL: its scheme names a SQLAlchemy dialect (and
    driver), whatever the rest of the URL holds."""
    scheme, separator, _ = url.partition("://")
    if not separator or not _SCHEME.match(url):
        return False
    try:
        URL.create(scheme).get_dialect()
    except Exception:  # NoSuchModuleError, or ArgumentError for a malformed scheme
        return False
    return True


def _readings(url: str) -> tuple[tuple[Any, ...] | None, tuple[Any, ...] | None]:
    """(user, password, host, port, database) as SQLAlchemy and as RFC 3986 read ``url``; None
    where a parser refuses it. Text fields are percent-decoded, hosts lower-cased."""
    try:
        parsed = make_url(url)
        sqlalchemy = (parsed.username, parsed.password, (parsed.host or "").lower() or None,
                      parsed.port, parsed.database)
    except Exception:  # ArgumentError, or ValueError for a port that is not a number
        sqlalchemy = None
    try:
        parts = urlsplit(url)
        rfc3986 = (None if parts.username is None else unquote(parts.username),
                   None if parts.password is None else unquote(parts.password),
                   parts.hostname or None, parts.port, unquote(parts.path[1:]) or None)
    except ValueError:  # a port that is not a number, a bad IPv6 host
        rfc3986 = None
    return sqlalchemy, rfc3986


def remember_secret(secret: str | None) -> None:
    """Mask ``secret`` (raw and percent-encoded) in every later :func:`redact_text`."""
    if secret and len(secret) >= MIN_REMEMBERED:
        _remembered.update({secret, quote(secret, safe=""), quote(secret)})


def _remember(url: str, readings: tuple[tuple[Any, ...] | None, ...]) -> set[str]:
    """Remember (and return) every password of ``url``: each parser's, decoded, and RFC 3986's
    as written."""
    passwords = {reading[1] for reading in readings if reading is not None and reading[1]}
    try:
        as_written = urlsplit(url).password
    except ValueError:
        as_written = None
    for password in passwords | {as_written}:
        remember_secret(password)
    return passwords


def redact_url(url: str | None) -> str | None:
    """The URL with any password (user-info or ``password=`` query) replaced by ``***``.

    Where either parser finds a password, or a parser cannot read the URL at all, everything
    between ``://`` and the URL's last ``@`` becomes ``user:***`` (the user as written before
    the first ``:``); an unreadable URL without ``@`` keeps only its scheme. SQLAlchemy's reading
    counts for database URLs only (``http://`` with no host is readable, and named as it is).
    The passwords found are remembered for :func:`redact_text`.
    """
    if not url:
        return url
    if _SCHEME.match(url):
        readings = _readings(url)
        passwords = _remember(url, readings)
        head, rest = url.split("://", 1)
        unreadable = None in (readings if is_database_url(url) else readings[1:])
        if "@" in rest and (passwords or unreadable):
            user_info, _, host = rest.rpartition("@")
            url = f"{head}://{user_info.split(':', 1)[0]}:{MASK}@{host}"
        elif unreadable:
            url = f"{head}://{MASK}"
    return _PASSWORD_QUERY.sub(lambda match: f"{match['head']}{MASK}", url)


def check_unambiguous(url: str, field: str) -> None:
    """Refuse a database URL that SQLAlchemy and RFC 3986 read differently.

    Both readings (user, password, host, port, database; percent-decoded) must agree, so that the
    password regflow masks is the one SQLAlchemy sends. URLs that are not database URLs (http,
    file, models:/...) pass unchecked.

    Raises:
        ConfigError: the readings differ, or SQLAlchemy cannot read the URL; the message names
            ``field`` and shows the URL masked.
    """
    if not is_database_url(url):
        return
    sqlalchemy, rfc3986 = _readings(url)
    _remember(url, (sqlalchemy, rfc3986))
    if sqlalchemy is None or sqlalchemy != rfc3986:
        raise ConfigError(
            f"{field}: {redact_url(url)}: SQLAlchemy and RFC 3986 read the user, password or "
            "host of this URL differently (a raw '/', '@', '#', '?' or '%' in the password?); "
            "percent-encode the password (e.g. '/' as %2F, '@' as %40) or give it in the "
            "environment (REGFLOW_STORAGE_PASSWORD)")


def redact_text(text: str) -> str:
    """A free text (an error message, a log line) with every password masked: those of the URLs
    in it and those remembered before (raw or percent-encoded) wherever they are, then the URLs'
    user-info (:func:`redact_url`)."""
    for match in _URL_IN_TEXT.finditer(text):
        _remember(match[0], _readings(match[0]))
    for secret in sorted(_remembered, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL_IN_TEXT.sub(lambda match: redact_url(match[0]), text)
    return _PASSWORD_QUERY.sub(lambda match: f"{match['head']}{MASK}", text)


def redact_value(text: str) -> str:
    """A config value: the whole string read as one URL when it starts like one (its password
    may hold blanks), then as a free text."""
    return redact_text(redact_url(text) if _SCHEME.match(text) else text)


def redact_values(value: Any) -> Any:
    """A copy of nested dicts, lists and tuples with :func:`redact_value` applied to every string
    (a config tree before it is logged); other values are returned as they are."""
    if isinstance(value, str):
        return redact_value(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_values(item) for item in value)
    return value
