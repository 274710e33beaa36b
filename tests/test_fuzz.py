"""Generated input against the live server: 202 or a 4xx, never a 5xx, a hang or a crash.

Hypothesis runs in a worker thread with blocking sockets while the service runs on this test's
event loop, so each test ends with the service's own drain and final flush.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import re
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, quote_plus, urlencode

import httptools
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from support import ErrorLog, db_totals, host_port, run_service, settings_for, wait_until

INT64_MAX = 2**63 - 1
MAX_KEY_BYTES = 256
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
FUZZ = settings(
    deadline=None,
    derandomize=True,
    # The explain phase replays variations against a server whose state has moved on, and
    # prints the failing example without its arguments.
    phases=[phase for phase in Phase if phase is not Phase.explain],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Keys of valid increments start with this, so they never collide with other tests' keys in the
# session's PostgreSQL database.
PREFIX = f"fz{uuid.uuid4().hex[:6]}:"


class Unique:
    """Stands for a key used once, for increments near INT64_MAX that must not add up."""


UNIQUE = Unique()


# --- the reference: what the document says a body means ------------------------------------


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


# --- strategies: bodies --------------------------------------------------------------------

KEY_CHARS = st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"])
POOL = [
    "a",
    "A",
    "é",
    "e\u0301",  # the same text as "é" once normalised: must stay a different key
    "😀",
    "日本語",
    "with space",
    "a/b?c&d=e+f%20g#h",
    "\u200b",
    "\ufeffbom",
    "ﬁ",
    "'; DROP TABLE counters; --",
]


@st.composite
def boundary_keys(draw: st.DrawFn) -> str:
    """Keys of exactly MAX_KEY_BYTES - 1, MAX_KEY_BYTES or MAX_KEY_BYTES + 1 UTF-8 bytes."""
    char = draw(st.sampled_from(["x", "é", "€", "😀"]))
    total = MAX_KEY_BYTES + draw(st.sampled_from([-1, 0, 1]))
    room = total - len(PREFIX.encode())
    wide = room // len(char.encode())
    return PREFIX + char * wide + "x" * (room - wide * len(char.encode()))


valid_keys = st.one_of(
    st.sampled_from(POOL).map(lambda s: PREFIX + s),
    st.text(KEY_CHARS, max_size=20).map(lambda s: PREFIX + s),
    boundary_keys(),
)
invalid_keys = st.one_of(
    st.just(""),
    st.builds(
        lambda s, c: PREFIX + s + c + s,
        st.text(KEY_CHARS, max_size=5),
        st.sampled_from(["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9f"]),
    ),
    st.text(KEY_CHARS, min_size=MAX_KEY_BYTES + 1, max_size=MAX_KEY_BYTES + 40),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
small_values = st.one_of(st.integers(1, 1000), st.integers(1, 2**32))
invalid_values = st.one_of(
    st.sampled_from([0, -1, INT64_MAX + 1, -(2**63), -(2**63) - 1, 10**30]),
    st.integers(max_value=0),
    st.integers(min_value=INT64_MAX + 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 1e3, -0.0]),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.integers(1, 100).map(str),
    st.lists(st.integers(1, 5), max_size=2),
)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**25, max_value=10**40),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@dataclass(frozen=True)
class Body:
    """One POST /increment body; a `Unique` key is made unique when it is sent."""

    natural_type: str | None
    data: bytes | None = None
    fields: dict[str, object] = field(default_factory=dict)
    form: bool = False
    ascii_only: bool = True
    compact: bool = True

    def render(self, fresh_key: Iterator[str]) -> bytes:
        if self.data is not None:
            return self.data
        fields = {k: next(fresh_key) if v is UNIQUE else v for k, v in self.fields.items()}
        if self.form:
            quoting = quote_plus if self.ascii_only else quote
            return urlencode(fields, quote_via=quoting).encode()
        separators = (",", ":") if self.compact else (" , ", " : ")
        return json.dumps(fields, ensure_ascii=self.ascii_only, separators=separators).encode()


@st.composite
def increment_fields(
    draw: st.DrawFn, key: st.SearchStrategy[object], value: st.SearchStrategy[object]
) -> dict[str, object]:
    fields = {"key": draw(key), "value": draw(value)}
    if draw(st.booleans()):
        fields = dict(reversed(list(fields.items())))
    return fields


valid_fields = st.one_of(
    increment_fields(valid_keys, small_values),
    increment_fields(st.just(UNIQUE), st.integers(INT64_MAX - 2**40, INT64_MAX)),
)
broken_fields = st.one_of(
    increment_fields(invalid_keys, small_values),
    increment_fields(valid_keys, invalid_values),
    increment_fields(valid_keys, small_values).map(lambda f: {"key": f["key"]}),
    increment_fields(valid_keys, small_values).map(lambda f: {"value": f["value"]}),
    st.builds(
        lambda f, extra: {**f, "extra": extra},
        increment_fields(valid_keys, small_values),
        json_values,
    ),
)


def encoded(fields: st.SearchStrategy[dict[str, object]]) -> st.SearchStrategy[Body]:
    """Fields as a JSON body (ASCII or UTF-8, compact or spaced) or as a form body."""
    as_json = st.builds(
        lambda f, ascii_only, compact: Body(JSON, fields=f, ascii_only=ascii_only, compact=compact),
        fields,
        st.booleans(),
        st.booleans(),
    )
    as_form = st.builds(
        lambda f, plus: Body(FORM, fields=f, form=True, ascii_only=plus), fields, st.booleans()
    )
    return as_json | as_form


# Values that int() reads as numbers although the documents say no: a sign other than `-`,
# whitespace, `_` separators, digits of other scripts (Arabic-Indic, fullwidth).
LOOSE_INTEGERS = [
    "+5",
    " 5",
    "5 ",
    "\t5",
    "1_000",
    "-1_0",
    "\u0665",
    "\u0661\u0662",
    "\uff15",
    "--5",
    "-",
    "+-5",
]
form_values = st.one_of(
    st.sampled_from(LOOSE_INTEGERS),
    st.text(alphabet="0123456789-+_ \t\u0665\u0660\uff15", max_size=8),
)
loose_form_bodies = st.builds(
    lambda value, plus: Body(
        FORM, fields={"key": PREFIX + "form-value", "value": value}, form=True, ascii_only=plus
    ),
    form_values,
    st.booleans(),
)
raw_form_bodies = st.text(alphabet="keyvalu=&%+-;09aéF\x00 ", max_size=40).map(
    lambda s: Body(FORM, data=s.encode())
)
random_json_bodies = json_values.map(lambda v: Body(JSON, data=json.dumps(v).encode()))
BAD_UTF8 = [
    b"\xff",
    b"\x80",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
]
bad_utf8_keys = st.builds(
    lambda junk, where: Body(
        JSON,
        data=b'{"key":"'
        + PREFIX.encode()[:where]
        + junk
        + PREFIX.encode()[where:]
        + b'x","value":1}',
    ),
    st.sampled_from(BAD_UTF8),
    st.integers(0, len(PREFIX)),
)
odd_json = st.sampled_from(
    [
        b'{"key":"\\ud800","value":1}',
        b'{"key":"\\udfff\\ud800","value":1}',
        b'{"key":"\\u00","value":1}',
        b'{"key":"\\x41","value":1}',
        b'{"key":"k","value":NaN}',
        b'{"key":"k","value":Infinity}',
        b'{"key":"k","value":-Infinity}',
        b'{"key":"k","value":01}',
        b'{"key":"k","value":+1}',
        b'{"key":"k","value":0x1}',
        b'{"key":"k","value":1}garbage',
        b'\xef\xbb\xbf{"key":"k","value":1}',
        b'{"key":"k","value":1,}',
        b"{'key':'k','value':1}",
        b'{"key":"k"\x00,"value":1}',
        b'{"key":"k","value":' + b"9" * 5000 + b"}",
        b"[" * 5000 + b"]" * 5000,
        b'{"key":' * 3000,
        b"",
        b"null",
        b'"{\\"key\\":\\"k\\",\\"value\\":1}"',
    ]
).map(lambda data: Body(JSON, data=data))


@st.composite
def mangled(draw: st.DrawFn) -> Body:
    """A valid JSON body, truncated or with one byte replaced."""
    fields = draw(increment_fields(valid_keys, small_values))
    data = bytearray(json.dumps(fields, ensure_ascii=False).encode())
    at = draw(st.integers(0, len(data) - 1))
    if draw(st.booleans()):
        del data[at:]
    else:
        data[at] = draw(st.integers(0, 255))
    return Body(JSON, data=bytes(data))


# Mostly valid increments, so the totals check has plenty to add up.
bodies = st.one_of(
    encoded(valid_fields),
    encoded(valid_fields),
    st.one_of(
        encoded(broken_fields),
        raw_form_bodies,
        loose_form_bodies,
        random_json_bodies,
        bad_utf8_keys,
        odd_json,
        mangled(),
        st.binary(max_size=200).map(lambda data: Body(JSON, data=data)),
    ),
)
CONTENT_TYPES = [
    None,
    "",
    JSON,
    "application/json; charset=utf-8",
    "Application/JSON",
    "  application/json  ;  x=y",
    "application/json;",
    FORM,
    "application/x-www-form-urlencoded; charset=UTF-8",
    "APPLICATION/X-WWW-FORM-URLENCODED",
    "text/plain",
    "application/jsonx",
    "application/json5",
    "multipart/form-data; boundary=x",
    "*/*",
]
content_types = st.one_of(
    st.sampled_from(CONTENT_TYPES),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
)


@st.composite
def posts(draw: st.DrawFn) -> tuple[str | None, Body]:
    """A body with its natural Content-Type most of the time, any other one otherwise."""
    body = draw(bodies)
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(content_types), body
    return body.natural_type, body


# --- a blocking keep-alive client ----------------------------------------------------------


class Client:
    """http.client on one connection, reopened when the server closes it."""

    def __init__(self, url: str) -> None:
        host, port = host_port(url)
        self.conn = http.client.HTTPConnection(host, port, timeout=10)

    def send(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {} if content_type is None else {"Content-Type": content_type}
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.will_close:
            self.conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def close(self) -> None:
        self.conn.close()


def assert_error_body(status: int, headers: dict[str, str], data: bytes) -> None:
    assert 400 <= status < 500, (status, data)
    assert headers.get("content-type") == JSON, headers
    payload = json.loads(data)
    assert set(payload) == {"error", "detail"}, payload
    assert isinstance(payload["error"], str) and isinstance(payload["detail"], str), payload


# --- (a) bodies ------------------------------------------------------------------------------

# Form bodies whose value Python's int() accepts and the documents refuse: `+5` (a raw `+` is a
# space in a form, so `+5` is " 5"), `%2B5`, `1_000`, `%D9%A5` (Arabic-Indic five).
LOOSE_FORM_BODIES = [
    b"key=loose&value=+5",
    b"key=loose&value=%2B5",
    b"key=loose&value=1_000",
    b"key=loose&value=%D9%A5",
]


def test_the_form_oracle_takes_only_ascii_digits() -> None:
    """The fuzz test's reference refuses what int() would take, and reads plain digits."""
    for body in LOOSE_FORM_BODIES:
        assert expected_outcome(FORM, body) == (400, "", 0), body
    for text in LOOSE_INTEGERS:
        assert form_integer(text) is None, text
    assert form_integer("007") == 7
    assert form_integer("-9223372036854775808") == -(2**63)
    assert form_integer("1" * 21) is None


async def test_form_values_int_would_take_are_refused(tmp_path: Path, sqlite_url: str) -> None:
    """Form values outside `-?[0-9]+` that int() reads as numbers (`+5`, `%2B5`, `1_000`,
    Arabic-Indic digits) get 400 invalid_value and change nothing."""
    async with run_service(settings_for(tmp_path, sqlite_url)) as svc:
        client = Client(svc.url)
        try:
            for body in LOOSE_FORM_BODIES:
                status, _, answer = await asyncio.to_thread(
                    client.send, "POST", "/increment", body, FORM
                )
                assert status == 400, (body, status, answer)
                assert json.loads(answer)["error"] == "invalid_value", (body, answer)
            ok = await asyncio.to_thread(
                client.send, "POST", "/increment", b"key=loose&value=007", FORM
            )
            assert ok[0] == 202
        finally:
            client.close()
    assert await db_totals(sqlite_url, ["loose"]) == {"loose": 7}


async def test_generated_bodies_count_exactly(
    tmp_path: Path, db_url: str, error_log: ErrorLog
) -> None:
    """Thousands of generated bodies each get 202 or a 4xx error body as the document says, and
    the database ends with exactly the 202'd increments."""
    acked: dict[str, int] = {}
    tried: set[str] = set()
    statuses: Counter[int] = Counter()
    fresh_key = (f"{PREFIX}unique-{n}" for n in itertools.count())
    async with run_service(settings_for(tmp_path, db_url)) as svc:
        client = Client(svc.url)

        @settings(FUZZ, max_examples=1000)
        @given(st.lists(posts(), min_size=1, max_size=8))
        @example([(FORM, Body(FORM, data=data)) for data in LOOSE_FORM_BODIES])
        def bodies_are_answered(batch: list[tuple[str | None, Body]]) -> None:
            mark = len(error_log.records)
            sent = []
            for content_type, body in batch:
                data = body.render(fresh_key)
                sent.append((content_type, data))
                status, headers, answer = client.send("POST", "/increment", data, content_type)
                want, key, value = expected_outcome(content_type, data)
                statuses[status] += 1
                assert status == want, (content_type, data, status, answer)
                if status == 202:
                    assert answer == b""
                    acked[key] = acked.get(key, 0) + value
                else:
                    assert_error_body(status, headers, answer)
                tried_key = body.fields.get("key")
                # PostgreSQL text cannot even be queried with a NUL in it.
                if isinstance(tried_key, str) and "\x00" not in tried_key:
                    tried.add(tried_key)
            assert error_log.since(mark) == [], sent

        try:
            await asyncio.to_thread(bodies_are_answered)
        finally:
            client.close()
    # The generator must keep making plenty of each kind.
    assert statuses[202] > 800 and statuses[400] > 800 and statuses[415] > 200, statuses
    assert await db_totals(db_url, tried | acked.keys()) == acked


# --- (b) raw bytes ---------------------------------------------------------------------------


def raw_request(
    method: bytes = b"POST",
    target: bytes = b"/increment",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    lines = [method + b" " + target + b" " + version]
    lines += [name + b": " + value for name, value in headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


INCREMENT = b'{"key":"' + PREFIX.encode() + b'raw","value":1}'
JSON_HEADERS = [(b"Host", b"t"), (b"Content-Type", b"application/json")]
BASES = [
    raw_request(
        headers=[*JSON_HEADERS, (b"Content-Length", b"%d" % len(INCREMENT))], body=INCREMENT
    ),
    raw_request(
        headers=[(b"Host", b"t"), (b"Content-Type", FORM.encode()), (b"Content-Length", b"11")],
        body=b"key=k&value",
    ),
    raw_request(
        headers=[*JSON_HEADERS, (b"Transfer-Encoding", b"chunked")],
        body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(INCREMENT), INCREMENT),
    ),
    raw_request(
        headers=[
            *JSON_HEADERS,
            (b"Expect", b"100-continue"),
            (b"Content-Length", b"%d" % len(INCREMENT)),
        ],
        body=INCREMENT,
    ),
    raw_request(b"GET", b"/counters/" + PREFIX.encode() + b"raw", [(b"Host", b"t")]),
    raw_request(b"GET", b"/healthz", [(b"Host", b"t")]),
    raw_request(b"GET", b"/readyz", [(b"Host", b"t"), (b"Connection", b"close")]),
    raw_request(b"GET", b"/healthz", version=b"HTTP/1.0"),
]
HEADER_NAMES = [
    b"Content-Length",
    b"Transfer-Encoding",
    b"Content-Type",
    b"Expect",
    b"Connection",
    b"Upgrade",
    b"Host",
    b"Authorization",
    b"content-length",
    b"Content-Length ",
    b" Content-Length",
    b"X-\x00",
]
HEADER_VALUES = [
    b"0",
    b"5",
    b"-1",
    b"+5",
    b"0x10",
    b" 5 ",
    b"5, 5",
    b"99999999999999999999999",
    b"18446744073709551616",
    b"chunked",
    b"gzip, chunked",
    b"chunked, identity",
    b"Chunked",
    b"xchunked",
    b"100-continue",
    b"200-ok",
    b"close",
    b"keep-alive",
    b"Upgrade",
    b"websocket",
    b"h2c",
    b"Bearer x",
    b"application/json",
    b"a\x00b",
    b"a\rb",
    b"\x80\xff",
    b"",
]
header_lines = st.tuples(
    st.sampled_from(HEADER_NAMES) | st.binary(min_size=1, max_size=12),
    st.sampled_from(HEADER_VALUES) | st.binary(max_size=24),
)
CHUNK_SIZES = [
    b"zz",
    b"-1",
    b"ffffffffffffffffffff",
    b"1;ext=1",
    b"  5",
    b"5 ",
    b"",
    b"0",
    b"3",
    b"1000",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with one thing wrong."""
    data = draw(st.sampled_from(BASES))
    head, _, body = data.partition(b"\r\n\r\n")
    how = draw(st.integers(0, 6))
    if how == 0:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == 1:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if how == 2:
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if how == 3:
        extra = draw(st.lists(header_lines, min_size=1, max_size=4))
        lines = b"".join(b"\r\n" + name + b": " + value for name, value in extra)
        return head + lines + b"\r\n\r\n" + body
    if how == 4:
        size = draw(st.sampled_from(CHUNK_SIZES))
        chunk = draw(st.binary(max_size=12))
        tail = draw(st.sampled_from([b"\r\n0\r\n\r\n", b"\r\n", b"", b"0\r\n\r\n"]))
        return raw_request(
            headers=[*JSON_HEADERS, (b"Transfer-Encoding", b"chunked")],
            body=size + b"\r\n" + chunk + tail,
        )
    if how == 5:
        method = draw(
            st.sampled_from([b"CONNECT", b"HEAD", b"OPTIONS", b"PRI", b"GET", b"G\x00T", b""])
        )
        target = draw(
            st.sampled_from(
                [b"*", b"a:443", b"http://t/healthz", b"/healthz#x", b"/%ff", b"//", b""]
            )
            | st.binary(max_size=12)
        )
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1\n", b""]))
        return raw_request(method, target, [(b"Host", b"t")], version=version)
    return data + data[: draw(st.integers(0, len(data)))]  # pipelined, the second one truncated


CL = b"Content-Length"
TE = b"Transfer-Encoding"
framing = st.sampled_from(
    [
        raw_request(headers=[*JSON_HEADERS, (CL, b"21"), (CL, b"21")], body=INCREMENT),
        raw_request(headers=[*JSON_HEADERS, (CL, b"21"), (CL, b"5")], body=INCREMENT),
        raw_request(headers=[*JSON_HEADERS, (CL, b"-1")], body=INCREMENT),
        raw_request(headers=[*JSON_HEADERS, (CL, b"99999999999999999999999")], body=INCREMENT),
        raw_request(headers=[*JSON_HEADERS, (CL, b"4097")], body=INCREMENT),
        raw_request(headers=[*JSON_HEADERS, (CL, b"5"), (TE, b"chunked")], body=b"0\r\n\r\n"),
        raw_request(headers=[*JSON_HEADERS, (TE, b"chunked")], body=b"-5\r\nabc\r\n0\r\n\r\n"),
        raw_request(headers=[*JSON_HEADERS, (TE, b"chunked")], body=b"fffffffffffffffff\r\n"),
        raw_request(headers=[*JSON_HEADERS, (TE, b"chunked")], body=b"2\r\nabcdef\r\n0\r\n\r\n"),
        raw_request(headers=[*JSON_HEADERS, (TE, b"chunked"), (TE, b"chunked")], body=b"0\r\n\r\n"),
        raw_request(b"GET", b"/" + b"a" * 3000, [(b"Host", b"t")]),
        raw_request(b"GET", b"/healthz", [(b"X-%d" % i, b"v" * 50) for i in range(60)]),
        raw_request(headers=[*JSON_HEADERS, (b"Content-Length", b"5000")], body=b"x" * 5000),
        raw_request(
            headers=[*JSON_HEADERS, (b"Transfer-Encoding", b"chunked")],
            body=b"1388\r\n" + b"x" * 5000,
        ),
    ]
)
streams = st.one_of(
    st.binary(max_size=512),
    mutated(),
    framing,
    st.lists(mutated(), min_size=2, max_size=4).map(b"".join),
)


def exchange_raw(url: str, data: bytes) -> tuple[bytes, bool]:
    """Send data, half-close, read until the server closes: (bytes read, closed cleanly)."""
    host, port = host_port(url)
    with socket.create_connection((host, port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server already closed: it has answered or refused
        received = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return bytes(received), False
            if not chunk:
                return bytes(received), True
            received += chunk


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
    """What the server wrote is whole HTTP responses, none of them a 5xx."""
    if re.search(rb"(^|\n)HEAD ", sent):
        # Answers to HEAD carry Content-Length but no body, which a response parser cannot know.
        for match in re.finditer(rb"HTTP/1\.1 (\d{3}) ", received):
            assert int(match.group(1)) < 500, (sent, received)
        return
    responses = _Responses()
    try:
        responses.parser.feed_data(received)
    except httptools.HttpParserError:
        assert not clean, (sent, received)  # a reset may cut an answer short, a clean close not
    if clean:
        assert responses.begun == len(responses.done), (sent, received)
    for status, body in responses.done:
        assert status < 500, (sent, received)
        if status >= 400:
            payload = json.loads(body)
            assert set(payload) == {"error", "detail"}, (sent, received)


async def test_raw_streams_never_break_the_server(
    tmp_path: Path, sqlite_url: str, error_log: ErrorLog
) -> None:
    """Random bytes, random headers and mangled requests get whole answers or a close, never a
    5xx, a hang or a logged error, and the next client is served at once."""
    settings_ = settings_for(
        tmp_path, sqlite_url, max_body_bytes=4096, max_header_bytes=2048, request_timeout=2.0
    )
    async with run_service(settings_) as svc:
        healthy = Client(svc.url)

        @settings(FUZZ, max_examples=1500)
        @given(streams)
        def streams_are_survived(data: bytes) -> None:
            mark = len(error_log.records)
            received, clean = exchange_raw(svc.url, data)
            check_responses(data, received, clean)
            status, _, answer = healthy.send("GET", "/healthz")
            assert (status, answer) == (200, b'{"status":"ok"}'), data
            assert error_log.since(mark) == [], data

        try:
            await asyncio.to_thread(streams_are_survived)
        finally:
            healthy.close()
        server = svc.server
        assert server is not None
        await wait_until(lambda: not server.connections)
