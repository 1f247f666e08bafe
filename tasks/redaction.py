"""Passwords out of anything shown or recorded: URLs and free text that may contain them.

Standard library and SQLAlchemy only (no MLflow, no Prefect), so the CLI can use it before the heavy
imports."""

from __future__ import annotations

import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# scheme://user:PASSWORD@host... inside free text; the password runs to the last '@' of the URL, so one
# containing '@' or '/' is hidden whole.
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*):\S*@(?=[^@\s]*(?:\s|$))")


def redact(text: str) -> str:
    """Hide passwords in URLs anywhere in `text` (postgresql://user:secret@host -> user:***@host)."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def redact_url(url: str) -> str:
    """One database or server URL with its password replaced by *** (SQLAlchemy's own rendering)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return redact(url)
    if parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)
