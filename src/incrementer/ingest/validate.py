"""Turn a request body into validated increments, or a BadRequest that says what is wrong.

The success path is one msgspec decode plus a few comparisons; diagnosis work happens only on the
error path.
"""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qsl

import msgspec

from incrementer import periods
from incrementer.store.base import INT64_MAX, INT64_MIN

FUTURE_SKEW = 60.0
"""Seconds an increment's "at" may lie ahead of this server's clock (the client's clock may run
ahead of ours by that much); further ahead is refused like a time too far in the past."""


class Increment(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    key: str
    value: int
    at: str | float | None = None
    """When it happened (RFC 3339 or seconds since the epoch): the time bucket it counts in."""


class BadRequest(Exception):
    """The client's fault: answered with a 4xx, nothing was changed."""

    def __init__(self, code: str, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status


# C0 and C1 controls and DEL: invisible in logs and dashboards, and a classic injection vector.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_INTEGER = re.compile(r"-?[0-9]{1,20}")
_FIELD_AT = re.compile(r"at `\$(?:\[\d+\])?\.(\w+)`")

# The commonest curl mistake: `curl -d '{"key":...}'` sends JSON labelled as a form.
SENT_AS_FORM = BadRequest(
    "malformed_form",
    "The body looks like JSON but was sent as a form (Content-Type: "
    "application/x-www-form-urlencoded, curl -d's default): send it with Content-Type: "
    "application/json (curl -H 'Content-Type: application/json' or curl --json).",
)

# One validated increment: the key's UTF-8 bytes (what the WAL stores), the key, the value.
Validated = tuple[bytes, str, int]


class Validator:
    """Validation rules of one service instance (key size, sign of values, how far into the
    past an increment's "at" may lie)."""

    def __init__(
        self,
        max_key_bytes: int,
        allow_negative: bool,
        max_batch_items: int,
        bucket_past: float = 3600.0,
    ) -> None:
        self.max_key_bytes = max_key_bytes
        self.min_value = INT64_MIN if allow_negative else 1
        self.max_batch_items = max_batch_items
        self.bucket_past = bucket_past
        self.decode_one = msgspec.json.Decoder(Increment).decode
        self._decode_many = msgspec.json.Decoder(list[Increment]).decode

    def json_one(self, body: bytes) -> tuple[Validated, int]:
        """The increment and its own time in ms since the epoch (0: none, it counts at its
        arrival)."""
        try:
            inc = self.decode_one(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _decode_failure(exc) from None
        item = self.check(inc.key, inc.value)
        return item, 0 if inc.at is None else self.at_ms(inc.at)

    def json_many(self, body: bytes) -> tuple[list[Validated], list[int]]:
        """The increments, and each one's own time in ms (0: none) when any has one, else []."""
        try:
            items = self._decode_many(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _decode_failure(exc) from None
        if not items:
            raise BadRequest("empty_batch", "A batch must hold at least one increment.")
        if len(items) > self.max_batch_items:
            raise BadRequest(
                "batch_too_large", f"A batch may hold at most {self.max_batch_items} increments."
            )
        check = self.check
        try:
            checked = [check(inc.key, inc.value) for inc in items]
        except BadRequest:
            # find which item, for the message: only on the error path
            for i, inc in enumerate(items):
                check(inc.key, inc.value, f"item {i}: ")
            raise AssertionError("unreachable: an item failed validation above") from None
        if all(inc.at is None for inc in items):
            return checked, []
        return checked, [
            0 if inc.at is None else self.at_ms(inc.at, f"item {i}: ")
            for i, inc in enumerate(items)
        ]

    def at_ms(self, at: str | float, where: str = "") -> int:
        """An increment's "at" in ms since the epoch: BadRequest 400 when it is not a time, 422
        when it lies more than --bucket-past before now or FUTURE_SKEW after."""
        try:
            seconds = periods.parse_time(at)
        except ValueError as exc:
            raise BadRequest("invalid_at", f"{where}Field 'at' {exc}.") from None
        now = time.time()
        if not now - self.bucket_past <= seconds <= now + FUTURE_SKEW:
            raise BadRequest(
                "at_out_of_range",
                f"{where}Field 'at' ({periods.text(seconds)}) must lie within "
                f"{self.bucket_past:g} s before this server's time ({periods.text(now)}) "
                f"and {FUTURE_SKEW:g} s after it (--bucket-past).",
                422,
            )
        return max(1, round(seconds * 1000))

    def form_one(self, body: bytes) -> Validated:
        if looks_like_json(body):
            raise SENT_AS_FORM
        try:
            pairs = parse_qsl(
                body.decode("ascii"),
                keep_blank_values=True,
                strict_parsing=True,
                errors="strict",
                max_num_fields=3,
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest("malformed_form", f"Body is not a valid form: {exc}") from None
        fields: dict[str, str] = {}
        for name, text in pairs:
            if name not in ("key", "value"):
                raise BadRequest("unknown_field", f"Unknown form field {name!r}.")
            if name in fields:
                raise BadRequest("duplicate_field", f"Form field {name!r} appears twice.")
            fields[name] = text
        for name in ("key", "value"):
            if name not in fields:
                raise BadRequest("missing_field", f"Form field {name!r} is required.")
        if not _INTEGER.fullmatch(fields["value"]):
            raise BadRequest("invalid_value", "Field 'value' must be an integer.")
        return self.check(fields["key"], int(fields["value"]))

    def check(self, key: str, value: int, where: str = "") -> Validated:
        # The common case in a few C calls: printable ASCII is exactly 0x20-0x7e, no controls.
        # Intake.accept_json repeats this test for POST /increment: keep the two the same.
        if (
            key.isascii()
            and key.isprintable()
            and 0 < len(key) <= self.max_key_bytes
            and self.min_value <= value <= INT64_MAX
        ):
            return key.encode(), key, value
        return self._check_slowly(key, value, where)

    def _check_slowly(self, key: str, value: int, where: str) -> Validated:
        if not key:
            raise BadRequest("invalid_key", f"{where}Field 'key' must not be empty.")
        if _CONTROL.search(key):
            raise BadRequest(
                "invalid_key", f"{where}Field 'key' must not contain control characters."
            )
        try:
            key_bytes = key.encode()
        except UnicodeEncodeError:
            raise BadRequest("invalid_key", f"{where}Field 'key' is not valid Unicode.") from None
        if len(key_bytes) > self.max_key_bytes:
            raise BadRequest(
                "key_too_long", f"{where}Field 'key' exceeds {self.max_key_bytes} UTF-8 bytes."
            )
        if not self.min_value <= value <= INT64_MAX:
            if value < INT64_MIN or value > INT64_MAX:
                raise BadRequest(
                    "value_out_of_range",
                    f"{where}Field 'value' must fit in a signed 64-bit integer.",
                )
            raise BadRequest("invalid_value", f"{where}Field 'value' must be a positive integer.")
        return key_bytes, key, value


def looks_like_json(body: bytes) -> bool:
    """An object or an array: never a form of ours, whose only fields are key and value."""
    return body.lstrip()[:1] in (b"{", b"[")


def _decode_failure(exc: Exception) -> BadRequest:
    # ValidationError (well-formed JSON of the wrong shape) subclasses DecodeError; invalid UTF-8
    # inside a string surfaces as UnicodeDecodeError.
    if isinstance(exc, msgspec.ValidationError):
        return _diagnose(exc)
    return BadRequest("malformed_json", f"Body is not valid JSON: {exc}")


def _diagnose(exc: msgspec.ValidationError) -> BadRequest:
    message = str(exc)
    field = _FIELD_AT.search(message)
    if "missing required field" in message:
        return BadRequest("missing_field", message)
    if "unknown field" in message:
        return BadRequest("unknown_field", message)
    if field is not None and field.group(1) == "value":
        return BadRequest("invalid_value", f"Field 'value' must be an integer: {message}")
    if field is not None and field.group(1) == "key":
        return BadRequest("invalid_key", f"Field 'key' must be a string: {message}")
    if field is not None and field.group(1) == "at":
        return BadRequest(
            "invalid_at", f"Field 'at' must be RFC 3339 text or seconds since the epoch: {message}"
        )
    return BadRequest("invalid_body", message)
