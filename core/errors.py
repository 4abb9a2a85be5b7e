"""The one error type a user sees: a problem they can fix, printed without a traceback, and name validation."""
from __future__ import annotations

import re


class TuneryError(Exception):
    """A problem the user can fix (bad data, bad config, unknown version). The CLI prints it without a traceback."""


class RegistryBusy(TuneryError):
    """The registry stayed locked by another process for longer than the retries wait: trying later can help."""


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str = "name") -> str:
    """Validate a model name before it becomes part of a path or a version string (`NAME:N`)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise TuneryError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name
