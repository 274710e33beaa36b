"""URLs the service is given (its database's and its rate-limit store's, and their secrets): parsed,
checked and redacted here, below every other module, so that the settings can refuse a bad URL at
construction and every log line, error and health answer can print one without its password.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, unquote, unquote_plus, urlsplit

ACCEPTED_FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "postgresql://user:password@host:port/dbname or postgres://..."
)


def parse_database_url(url: str) -> tuple[str, str]:
    """("sqlite", filesystem path) or ("postgresql", asyncpg DSN); ValueError for anything else."""
    if url.startswith("sqlite:///"):
        # Everything after the third slash is the path, verbatim: no query string or percent
        # decoding, so any filename the filesystem allows works as written.
        path = url[len("sqlite:///") :]
        if not path or path.endswith("/"):
            raise ValueError(f"database URL {url!r} names no SQLite file; use {ACCEPTED_FORMS}")
        if path == ":memory:":
            # The writer and the reader are separate connections: each would see its own empty DB.
            raise ValueError(
                f"database URL {url!r}: in-memory SQLite is not supported, name a file; "
                f"use {ACCEPTED_FORMS}"
            )
        return "sqlite", path
    scheme = url.partition("://")[0].lower()
    if scheme in ("postgresql", "postgres") and "://" in url:
        _check_postgres_url(url)
        return "postgresql", url
    raise ValueError(f"unsupported database URL {redact_url(url)!r}; use {ACCEPTED_FORMS}")


def _check_postgres_url(url: str) -> None:
    """A PostgreSQL URL must name its host and its database. libpq and asyncpg fill anything left
    out from PG* environment variables and defaults (a local socket, a database named after the
    user): `postgresql://` alone would quietly migrate and write to whatever that finds."""
    shown = redact_url(url)
    parts = _split(url, "database URL", ACCEPTED_FORMS)
    query = dict(parse_qsl(parts.query))
    if not (parts.hostname or query.get("host")):
        raise ValueError(
            f"database URL {shown!r} names no host (write it even for localhost; a socket "
            f"directory goes in ?host=/path); use {ACCEPTED_FORMS}"
        )
    if not (parts.path.strip("/") or query.get("dbname")):
        raise ValueError(f"database URL {shown!r} names no database; use {ACCEPTED_FORMS}")


def _split(url: str, what: str, forms: str) -> SplitResult:
    """The URL's parts; ValueError, naming `what` and the URL without its password, for a port
    that is not a number in range."""
    try:
        parts = urlsplit(url)
        if "," not in parts.netloc:  # several host:port pairs (failover) are the driver's to read
            parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError:
        raise ValueError(
            f"{what} {redact_url(url)!r}: the port must be a number from 1 to 65535; use {forms}"
        ) from None
    return parts


REDIS_FORMS = "redis://[:password@]host[:port][/db] or rediss://... (TLS)"


def check_redis_url(url: str) -> None:
    """A Redis URL (the rate-limit store) names its host; its database, if given, is a number.
    ValueError, naming the URL without its password, for anything else."""
    shown = redact_url(url)
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis", "rediss") or "://" not in url:
        raise ValueError(f"unsupported rate-limit store URL {shown!r}; use {REDIS_FORMS}")
    parts = _split(url, "rate-limit store URL", REDIS_FORMS)
    if not parts.hostname:
        raise ValueError(f"rate-limit store URL {shown!r} names no host; use {REDIS_FORMS}")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(
            f"rate-limit store URL {shown!r}: the database must be a number; use {REDIS_FORMS}"
        )


def database_identity(url: str) -> str:
    """Which database a URL names, as far as telling one from another needs: an SQLite file's
    absolute path, or a PostgreSQL database's name. Not PostgreSQL's host and port: one
    database is reached under several (a proxy, a failover, a renamed host), while two of one
    name on two servers are rare; never a user, a password or an option."""
    engine, target = parse_database_url(url)
    if engine == "sqlite":
        return "sqlite:///" + str(Path(target).resolve())
    parts = urlsplit(url)
    return "postgresql:///" + (parts.path.strip("/") or dict(parse_qsl(parts.query))["dbname"])


# Query parameters libpq and asyncpg read a secret from (their names are case-sensitive there;
# compared case-insensitively here, to redact too much rather than too little).
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def redact_url(url: str) -> str:
    """The URL with every secret (the userinfo password, `password=` and `sslpassword=` query
    parameters) replaced by ***, safe for logs, error messages and health output."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    query = "&".join(
        f"{name}=***" if sep and unquote_plus(name).strip().lower() in SECRET_PARAMETERS else piece
        for piece in parts.query.split("&")
        for name, sep, _ in [piece.partition("=")]
    )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing secret; geturl() would also normalize sqlite:/// away
    return parts._replace(netloc=netloc, query=query).geturl()


def url_secrets(url: str) -> list[str]:
    """The secret values in url, as written and decoded, for scrubbing messages that might
    quote them (a driver's error about a malformed URL)."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return []
    for piece in parts.query.split("&"):
        name, sep, value = piece.partition("=")
        if sep and unquote_plus(name).strip().lower() in SECRET_PARAMETERS:
            found += [value, unquote_plus(value)]
    found += [unquote(secret) for secret in found]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """text with every secret of url replaced by ***."""
    for secret in url_secrets(url):
        text = text.replace(secret, "***")
    return text
