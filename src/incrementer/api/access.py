"""What an API key may do: its scopes per route, and its prefix against the counters a request
names (403 `forbidden` otherwise, before anything is changed or read).

- write: POST /increment, POST /increments. read: GET /counters/{key}, its series, and GET
  /counters (many keys, a listing, a top N). admin: GET /metrics, and the details of /readyz
  (which name hosts and other tenants' overflowed counters; without admin, /readyz still answers
  its codes, as it does to anyone).
- A prefix P: every key an increment or a batch names, every key a read names, starts with P; a
  listing or a top N must ask for a prefix that starts with P (one that would show other
  tenants' counters is refused whole, not narrowed: the caller learns that it asked for too
  much rather than reading a silently different answer).

A request that cannot be read (malformed JSON, a bad escape) is left to its route, which refuses
it with the usual 400 and its reason.
"""

from __future__ import annotations

from incrementer.api.listing import PARAMETERS
from incrementer.api.query import parse_query, path_key
from incrementer.api.routes import COUNTERS, FORM, JSON, SERIES, media_type
from incrementer.auth.keyring import SCOPE_ADMIN, SCOPE_READ, SCOPE_WRITE
from incrementer.http import Request
from incrementer.ingest.validate import BadRequest, Validator

ROUTE_SCOPES = {
    "increment": SCOPE_WRITE,
    "increments": SCOPE_WRITE,
    "counters": SCOPE_READ,
    "series": SCOPE_READ,
    "list": SCOPE_READ,
    "top": SCOPE_READ,
    "read_many": SCOPE_READ,
    "metrics": SCOPE_ADMIN,
}
"""The scope each protected route needs."""
SCOPE_NAMES = {SCOPE_WRITE: "write", SCOPE_READ: "read", SCOPE_ADMIN: "admin"}


def scope_refused(route: str, scopes: int) -> BadRequest | None:
    """403 when a key with `scopes` may not use route; None when it may."""
    needed = ROUTE_SCOPES.get(route, 0)
    if not needed or scopes & needed:
        return None
    return BadRequest(
        "forbidden",
        f"This API key lacks the {SCOPE_NAMES[needed]} scope this route needs.",
        403,
    )


def prefix_refused(
    prefix: str, route: str, request: Request, path: bytes, validator: Validator
) -> BadRequest | None:
    """403 when the request names a counter outside prefix; None when all are inside it, or
    when the request cannot be read (its route refuses it then)."""
    try:
        names = _named(route, request, path, validator)
    except BadRequest:
        return None
    for name in names:
        if not name.startswith(prefix):
            what = "a listing under" if route in ("list", "top") else "the counter"
            return BadRequest(
                "forbidden",
                f"This API key may only use counters whose names start with {prefix!r}; "
                f"{what} {name!r} does not.",
                403,
            )
    return None


def _named(route: str, request: Request, path: bytes, validator: Validator) -> list[str]:
    """The counter names a request names (for a listing, the prefix it asks for)."""
    if route == "increment":
        kind = media_type(request.content_type)
        if kind == JSON:
            return [validator.json_one(request.body)[0][1]]
        if kind == FORM:
            return [validator.form_one(request.body)[1]]
        return []
    if route == "increments":
        if media_type(request.content_type) != JSON:
            return []
        return [item[1] for item in validator.json_many(request.body)[0]]
    if route == "counters":
        return [path_key(path[len(COUNTERS) :], validator)]
    if route == "series":
        return [path_key(path[len(COUNTERS) : -len(SERIES)], validator)]
    if route in ("list", "top", "read_many"):
        params = parse_query(request.url, PARAMETERS, "key")
        if route == "read_many":
            return params.get("key", [])
        return params.get("prefix", [""])[:1]
    return []
