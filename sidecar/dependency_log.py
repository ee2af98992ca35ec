"""How a dependency's errors reach the log (SPEC 3.5): the driver's own words, once per change.

Rules that hold here:
1. `describe(exc)` is the one way an exception of a driver (asyncpg, redis-py, OS) becomes
   log text: its class name and message on one bounded line, so "password authentication
   failed for user ...", "pg_hba.conf rejects ..." or "cannot execute UPDATE in a read-only
   transaction" can be read in the log.
2. That text is scrubbed before it is returned: the password of any URL in it, any
   `password=...` pair, and every secret registered with `register_secret` (the passwords of
   the configured DSNs) become `***`. Drivers do not normally quote a DSN, but a message that
   did must not leak it.
3. `DependencyState` logs a dependency's state only when it changes (down with a new reason,
   or up again): a dependency that stays down is not news on every retry.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

MAX_MESSAGE = 200

# scheme://user:password@ -> scheme://user:***@ ; password=... / sslpassword=... -> ***
_URL_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s@]*@")
_PAIR_RE = re.compile(r"(?P<head>\b(?:ssl)?pass(?:word|wd)\s*[=:]\s*)(?:'[^']*'|\"[^\"]*\"|\S+)",
                      re.IGNORECASE)

# Passwords of the configured DSNs (Settings registers them): scrubbed wherever they appear.
_secrets: set[str] = set()


def register_secret(secret: str | None) -> None:
    """Scrub `secret` (and its percent-decoded form) from every description from now on."""
    if secret and len(secret) >= 3:  # shorter ones would blank out ordinary words
        _secrets.add(secret)
        decoded = unquote(secret)
        if len(decoded) >= 3:
            _secrets.add(decoded)


def scrub(text: str) -> str:
    text = _URL_PASSWORD_RE.sub(r"\g<head>***@", text)
    text = _PAIR_RE.sub(r"\g<head>***", text)
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def describe(exc: BaseException) -> str:
    """The error class and the driver's message, one line, bounded and scrubbed (rules 1, 2)."""
    # Scrubbed before it is cut: a secret that straddles the cut would no longer match.
    message = scrub(" ".join(str(exc).split()))
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class DependencyState:
    """`down(reason)` / `up()` of one dependency, logged once per change of state (rule 3)."""

    def __init__(self, name: str, logger: logging.Logger, *,
                 down_level: int = logging.WARNING) -> None:
        self.name = name
        self._log = logger
        self._down_level = down_level
        self.reason: str | None = None

    @property
    def is_down(self) -> bool:
        return self.reason is not None

    def down(self, reason: str, *, level: int | None = None) -> None:
        if reason != self.reason:
            self.reason = reason
            self._log.log(self._down_level if level is None else level,
                          "%s unavailable: %s", self.name, reason)

    def up(self) -> None:
        if self.reason is not None:
            self.reason = None
            self._log.info("%s available again", self.name)
