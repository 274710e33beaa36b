"""The reference the fuzz tests judge the server by, written from the README and openapi.json
(not from the server's code): what answer a body must get, and what a whole answer is."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl

import httptools

INT64_MAX = 2**63 - 1
MAX_KEY_BYTES = 256
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


# --- what the document says a body means ----------------------------------------------------------


def expected_outcome(content_type: str | None, body: bytes) -> tuple[int, str, int]:
    """(202, key, value) for a valid increment, else (status, "", 0) with 400 or 415."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == JSON:
        parsed = _json_increment(body)
    elif media == FORM:
        parsed = _form_increment(body)
    else:
        return 415, "", 0
    if parsed is None:
        return 400, "", 0
    key, value = parsed
    try:
        key_bytes = key.encode()
    except UnicodeEncodeError:
        return 400, "", 0
    if not key or CONTROL.search(key) or len(key_bytes) > MAX_KEY_BYTES:
        return 400, "", 0
    if not 1 <= value <= INT64_MAX:
        return 400, "", 0
    return 202, key, value


def _json_increment(body: bytes) -> tuple[str, int] | None:
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if type(obj) is not dict or set(obj) != {"key", "value"}:
        return None
    key, value = obj["key"], obj["value"]
    if type(key) is not str or type(value) is not int:  # bool is not an int here, nor is 1.0
        return None
    return key, value


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _form_increment(body: bytes) -> tuple[str, int] | None:
    try:
        pairs = parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=True,
            errors="strict",
            max_num_fields=3,
        )
    except ValueError:
        return None
    fields = dict(pairs)
    if len(pairs) != 2 or set(fields) != {"key", "value"}:
        return None
    value = form_integer(fields["value"])
    return None if value is None else (fields["key"], value)


ASCII_DIGITS = "0123456789"
# The server also refuses more than 20 digits, even zero-padded ones whose value fits: a guard
# against parsing huge numbers that the documents do not state.
MAX_DIGITS = 20


def form_integer(text: str) -> int | None:
    """A form field's integer as README and openapi.json define it: an optional `-`, then ASCII
    digits (no `+`, spaces, `_` or other scripts' digits, all of which Python's int() takes).
    Worked out digit by digit, so it shares nothing with the server's parsing."""
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    if not 1 <= len(digits) <= MAX_DIGITS:
        return None
    value = 0
    for char in digits:
        if char not in ASCII_DIGITS:
            return None
        value = value * 10 + ASCII_DIGITS.index(char)
    return -value if negative else value


def assert_error_body(status: int, headers: dict[str, str], data: bytes) -> None:
    """A 4xx with the documented error body: JSON holding the strings `error` and `detail`."""
    assert 400 <= status < 500, (status, data)
    assert headers.get("content-type") == JSON, headers
    payload = json.loads(data)
    assert set(payload) == {"error", "detail"}, payload
    assert isinstance(payload["error"], str) and isinstance(payload["detail"], str), payload


# --- what a whole answer to a byte stream is ------------------------------------------------------


class _Responses:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, bytes]] = []
        self.begun = 0
        self.body = b""

    def on_message_begin(self) -> None:
        self.begun += 1
        self.body = b""

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self.body))


def check_responses(sent: bytes, received: bytes, clean: bool) -> None:
    """What the server wrote is whole HTTP responses, none of them a 5xx but 501, the README's
    answer to a method the server does not know (a mutated `POST` can spell one)."""
    if re.search(rb"(^|\n)HEAD ", sent):
        # Answers to HEAD carry Content-Length but no body, which a response parser cannot know.
        for match in re.finditer(rb"HTTP/1\.1 (\d{3}) ", received):
            assert _not_a_failure(int(match.group(1))), (sent, received)
        return
    responses = _Responses()
    try:
        responses.parser.feed_data(received)
    except httptools.HttpParserError:
        assert not clean, (sent, received)  # a reset may cut an answer short, a clean close not
    if clean:
        assert responses.begun == len(responses.done), (sent, received)
    for status, body in responses.done:
        assert _not_a_failure(status), (sent, received)
        if status >= 400:
            payload = json.loads(body)
            assert set(payload) == {"error", "detail"}, (sent, received)


def _not_a_failure(status: int) -> bool:
    return status < 500 or status == 501
