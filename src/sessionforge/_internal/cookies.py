"""The cookie that carries a client's consistency token between requests (``asgi``).

A request that committed a write answers with ``Set-Cookie: sessionforge_consistency=
<token>`` (``Max-Age`` five minutes — replicas are expected to catch up well within it
— ``Path=/``, ``HttpOnly``, ``SameSite=Lax``); the client's next requests send it back,
and ``incoming_consistency`` turns it into the request's starting consistency. A cookie
that does not parse is ignored (and logged).
"""

from __future__ import annotations

import logging
import re
from collections.abc import MutableMapping
from typing import Any, Final

from .consistency import Consistency
from .replicas import Replicas

__all__ = ["CONSISTENCY_COOKIE", "incoming_consistency", "is_cookie_name", "with_cookie"]

logger = logging.getLogger("sessionforge.asgi")

#: The cookie's default name.
CONSISTENCY_COOKIE: Final = "sessionforge_consistency"
#: How long a client keeps it, in seconds.
CONSISTENCY_COOKIE_MAX_AGE: Final = 300

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
_COOKIE_NAME: Final = re.compile(r"^[A-Za-z0-9_-]+$")


def is_cookie_name(name: str) -> bool:
    return isinstance(name, str) and _COOKIE_NAME.match(name) is not None


def incoming_consistency(scope: Scope, name: str, replicas: Replicas) -> Consistency | None:
    """The consistency a request starts with: its cookie ``name``'s, or the context's
    if that is newer. A cookie that does not parse, or names another cluster, is
    ignored (logged at DEBUG for the first: any client can send one)."""
    current = replicas.value()
    for key, value in scope.get("headers", ()):
        if key != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            cookie, _, token = part.strip().partition("=")
            if cookie != name:
                continue
            given = Consistency.parse(token)
            if given is None:
                logger.debug("ignored a %s cookie that does not parse", name)
                return current
            if not replicas.usable(given, f"a {name} cookie"):
                return current
            return given.newer(current)
    return current


def with_cookie(message: Message, name: str, consistency: Consistency) -> Message:
    cookie = (
        f"{name}={consistency.token()}; Max-Age={CONSISTENCY_COOKIE_MAX_AGE}; Path=/; "
        "HttpOnly; SameSite=Lax"
    )
    headers = [*message.get("headers", ()), (b"set-cookie", cookie.encode("latin-1"))]
    return {**message, "headers": headers}
