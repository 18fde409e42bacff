"""Browser policy: Origin and Host allow-lists, HTTPS behind proxies, cookies, log redaction."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from aiohttp import web

from realtime_lab.auth.policy import (
    SESSION_COOKIE,
    HostPolicy,
    OriginPolicy,
    RedactingFilter,
    TrustedProxies,
    expired_session_cookie,
    exposure_error,
    is_loopback,
    normalize_origin,
    origin_of,
    redact,
    request_is_https,
    session_cookie,
)
from realtime_lab.auth.tokens import TokenAuthority

# --- origins ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "normal"),
    [
        ("https://app.example", "https://app.example"),
        ("HTTPS://APP.Example", "https://app.example"),
        ("https://app.example:443", "https://app.example"),
        ("http://app.example:80", "http://app.example"),
        ("http://app.example:443", "http://app.example:443"),
        ("https://app.example:8443", "https://app.example:8443"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://[0:0:0:0:0:0:0:1]", "http://[::1]"),
        ("http://LOCALHOST.:3000", "http://localhost:3000"),
        ("null", None),
        ("", None),
        ("https://app.example/", None),
        ("https://app.example/path", None),
        ("https://app.example?x=1", None),
        ("https://user@app.example", None),
        ("https://app.example:", None),
        ("https://app.example:0", None),
        ("https://app.example:65536", None),
        ("https://app.example:http", None),
        ("https://", None),
        ("app.example", None),
        ("//app.example", None),
        (" https://app.example", None),
        ("https://app.example ", None),
        ("https://app .example", None),
        ("https://[::1", None),
        ("https://::1", None),
    ],
)
def test_normalize_origin(origin: str, normal: str | None) -> None:
    assert normalize_origin(origin) == normal


@pytest.fixture
def origins() -> OriginPolicy:
    return OriginPolicy(["https://app.example/", "http://LOCALHOST:3000", " ", ""])


SELF = "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example",
        "https://APP.EXAMPLE",
        "HTTPS://app.example:443",
        "http://localhost:3000",
        "http://127.0.0.1:8080",  # the server's own
    ],
)
def test_allowed_origins(origins: OriginPolicy, origin: str) -> None:
    assert origins.allows(origin, SELF)


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "NULL",
        "",
        "https://evil.example",
        "http://app.example",  # another scheme
        "https://app.example:8443",  # another port
        "https://app.example/",  # browsers never send a path; do not guess
        "https://app.example.evil.example",
        "https://evil.example/https://app.example",
        "https://evilapp.example",
        "https://app.example@evil.example",
        "http://localhost:3001",
        "http://localhost",
        "http://127.0.0.1:8081",
        "http://127.0.0.1",
        "https://127.0.0.1:8080",
        "*",
    ],
)
def test_refused_origins(origins: OriginPolicy, origin: str) -> None:
    assert not origins.allows(origin, SELF)


def test_server_origin_is_always_allowed_even_with_an_empty_list() -> None:
    policy = OriginPolicy()
    assert policy.allows("https://lab.example", "https://LAB.example:443")
    assert not policy.allows("https://lab.example", None)
    assert not policy.allows("https://lab.example", "not an origin")
    assert not policy.allows("null", "null")


@pytest.mark.parametrize(
    "entry", ["null", "*", "https://app.example/path", "app.example", "https://", "ftp//x"]
)
def test_bad_origin_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="not an origin"):
        OriginPolicy([entry])


@pytest.mark.parametrize(
    ("scheme", "host", "origin"),
    [
        ("https", "Lab.Example:443", "https://lab.example"),
        ("http", "127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http", "[::1]:80", "http://[::1]"),
        ("http", "", None),
        ("http", "evil.example/x", None),
    ],
)
def test_origin_of(scheme: str, host: str, origin: str | None) -> None:
    assert origin_of(scheme, host) == origin


# --- hosts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8080",
        "LOCALHOST:8080",
        "LocalHost",
        "localhost.:8080",
        "127.0.0.1",
        "127.0.0.1:1",
        "[::1]",
        "[::1]:8080",
        "[0:0::1]:8080",
        " localhost:8080 ",
    ],
)
def test_loopback_default_allows_loopback_names_with_any_port(host: str) -> None:
    assert HostPolicy([], "127.0.0.1").allows(host)


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        " ",
        "evil.example",
        "evil.example:8080",
        "EVIL.EXAMPLE",
        "localhost.evil.example",
        "evil.localhost.example",
        "127.0.0.1.nip.io",
        "127.0.0.2",  # loopback, but not one of the names
        "::1",  # an IPv6 Host must be in brackets
        "[::1",
        "[::1]x",
        "[::1]:",
        "[fe80::1%25eth0]",
        "localhost:",
        "localhost:0",
        "localhost:99999",
        "localhost:abc",
        "localhost:80:80",
        "user@localhost",
        "localhost/x",
        "localhost\r\nX-Evil: 1",
        "local host",
        "localhost..",
        "0.0.0.0",
        "192.168.1.5",
    ],
)
def test_loopback_default_refuses_other_hosts(host: str | None) -> None:
    assert not HostPolicy([], "127.0.0.1").allows(host)


@pytest.mark.parametrize("bound", ["127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""])
def test_default_without_a_specific_address_is_loopback_only(bound: str) -> None:
    policy = HostPolicy([], bound)
    assert policy.allows("localhost:8080")
    assert policy.allows("[::1]:8080")
    assert not policy.allows("evil.example")
    assert not policy.allows("192.168.1.5:8080")
    assert not policy.allows("0.0.0.0:8080")


def test_default_bound_to_a_specific_address_also_allows_that_address() -> None:
    policy = HostPolicy([], "192.168.1.5")
    assert policy.allows("192.168.1.5:8080")
    assert policy.allows("192.168.1.5")
    assert policy.allows("localhost:8080")
    assert not policy.allows("evil.example:8080")
    v6 = HostPolicy((), "2001:db8::5")
    assert v6.allows("[2001:db8::5]:8080")
    assert v6.allows("[2001:DB8:0::5]")
    assert not v6.allows("2001:db8::5")


def test_configured_hosts_replace_the_default() -> None:
    policy = HostPolicy(["lab.example", "api.example:8443", "10.0.0.7", "2001:db8::1"], "0.0.0.0")
    for host in [
        "lab.example",
        "LAB.example:1234",
        "lab.example.",
        "api.example:8443",
        "10.0.0.7:80",
        "[2001:db8::1]:80",
    ]:
        assert policy.allows(host), host
    for host in [
        "api.example",
        "api.example:443",
        "sub.lab.example",
        "lab.example.evil.example",
        "localhost",
        "evil.example",
        "",
    ]:
        assert not policy.allows(host), host


def test_star_allows_any_host() -> None:
    policy = HostPolicy(["*"], "0.0.0.0")
    assert policy.allows("evil.example")
    assert policy.allows("anything:1")


@pytest.mark.parametrize(
    "entry", ["http://lab.example", "lab example", "a/b", "lab:port", "[::1", "fe80::1%eth0"]
)
def test_bad_host_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="not a host"):
        HostPolicy([entry], "127.0.0.1")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("localhost.", True),
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.0.1", False),
        ("example.com", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("host", "has_secret", "insecure", "refused"),
    [
        ("127.0.0.1", False, False, False),
        ("localhost", False, False, False),
        ("::1", False, False, False),
        ("0.0.0.0", False, False, True),
        ("::", False, False, True),
        ("", False, False, True),
        ("192.168.1.5", False, False, True),
        ("lab.example", False, False, True),
        ("0.0.0.0", True, False, False),
        ("0.0.0.0", False, True, False),
    ],
)
def test_exposure_error(host: str, has_secret: bool, insecure: bool, refused: bool) -> None:
    message = exposure_error(host, has_secret=has_secret, insecure=insecure)
    assert (message is not None) is refused
    if message is not None:
        assert "--insecure" in message
        assert "--auth-secret" in message


# --- HTTPS behind a proxy --------------------------------------------------------------------

PROXIES = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "fd00::/8", " "])


@pytest.mark.parametrize(
    ("scheme", "peer", "proto", "https"),
    [
        ("https", None, None, True),
        ("HTTPS", "203.0.113.9", "http", True),
        ("http", "127.0.0.1", "https", True),
        ("http", "127.0.0.1", "HTTPS", True),
        ("http", "10.1.2.3", " https ", True),
        ("http", "::ffff:10.1.2.3", "https", True),
        ("http", "fd00::1", "https", True),
        ("http", "127.0.0.1", "http, https", True),  # the last hop is our proxy's word
        ("http", "127.0.0.1", "https, http", False),
        ("http", "127.0.0.1", "http", False),
        ("http", "127.0.0.1", None, False),
        ("http", "127.0.0.1", "", False),
        ("http", "203.0.113.9", "https", False),  # not a proxy of ours: spoofed
        ("http", None, "https", False),
        ("http", "garbage", "https", False),
        ("http", "", "https", False),
    ],
)
def test_request_is_https(scheme: str, peer: str | None, proto: str | None, https: bool) -> None:
    assert request_is_https(scheme, peer, proto, PROXIES) is https


def test_no_trusted_proxies_means_forwarded_proto_is_ignored() -> None:
    assert not request_is_https("http", "127.0.0.1", "https", TrustedProxies())


@pytest.mark.parametrize("entry", ["proxy.example", "10.0.0.0/33", "1.2.3"])
def test_bad_proxy_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="not an IP"):
        TrustedProxies([entry])


# --- the session cookie ----------------------------------------------------------------------


@pytest.mark.parametrize("secure", [True, False])
def test_session_cookie_attributes_through_aiohttp(secure: bool) -> None:
    response = web.Response()
    response.set_cookie(**session_cookie("tok.en.value", secure=secure, max_age=600))
    header = response.cookies[SESSION_COOKIE].OutputString()
    parts = {p.strip().split("=", 1)[0].lower(): p.strip() for p in header.split(";")}
    assert parts[SESSION_COOKIE] == f"{SESSION_COOKIE}=tok.en.value"
    assert "httponly" in parts
    assert parts["samesite"] == "SameSite=Lax"
    assert parts["path"] == "Path=/"
    assert parts["max-age"] == "Max-Age=600"
    assert ("secure" in parts) is secure
    assert "domain" not in parts  # host-only


def test_expired_session_cookie_clears_it() -> None:
    response = web.Response()
    response.set_cookie(**expired_session_cookie(secure=True))
    morsel = response.cookies[SESSION_COOKIE]
    assert morsel.value == ""
    assert morsel["max-age"] == "0"
    assert morsel["secure"] is True


def test_negative_max_age_is_refused() -> None:
    with pytest.raises(ValueError, match="max_age"):
        session_cookie("t", secure=False, max_age=-1)


# --- redaction -------------------------------------------------------------------------------

JWT = TokenAuthority("k" * 32).mint("alice", ["admin"])
TICKET = "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5"


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        (f'127.0.0.1 "GET /sse?channel=ticker&ticket={TICKET} HTTP/1.1" 200', "channel=ticker&"),
        (f"GET /ws?ticket={TICKET}&after=now", "&after=now"),
        (f"GET /ws?TICKET={TICKET}", "GET /ws?"),
        (f"GET /poll?access_token={TICKET}", "/poll?"),
        (f"Authorization: Bearer {JWT}", "Authorization: Bearer"),
        (f"authorization: bearer {TICKET}", "authorization: bearer"),
        (f"Cookie: theme=dark; {SESSION_COOKIE}={JWT}; lang=en", "theme=dark; "),
        (f'{{"ticket": "{TICKET}", "expires_in": 30}}', '"expires_in": 30'),
        (f'{{"token":"{JWT}"}}', '{"token":"'),
        (f"got {JWT} from somewhere", "from somewhere"),
        (f"alg none: {JWT.rsplit('.', 1)[0]}.", "alg none"),
        (f"--auth-secret={TICKET}", "--auth-secret="),
    ],
)
def test_redact_hides_secrets_and_keeps_the_rest(line: str, kept: str) -> None:
    out = redact(line)
    assert TICKET not in out
    for part in JWT.split("."):
        assert part not in out
    assert "[redacted]" in out
    assert kept in out
    assert redact(out) == out


def test_redact_leaves_ordinary_lines_alone() -> None:
    line = '127.0.0.1 [01/Jan/2025] "GET /api/chats?channel=user.alice&after=ab12-3" 200 512'
    assert redact(line) == line


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, list[logging.LogRecord]]]:
    records: list[logging.LogRecord] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            self.format(record)
            records.append(record)

    logger = logging.getLogger("tests.auth.redacting")
    handler = ListHandler()
    handler.setFormatter(logging.Formatter("%(message)s %(first_request_line)s"))
    redacting = RedactingFilter()
    logger.addFilter(redacting)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, records
    logger.removeHandler(handler)
    logger.removeFilter(redacting)
    logger.propagate = True


def test_redacting_filter_cleans_message_args_and_extras(
    captured: tuple[logging.Logger, list[logging.LogRecord]],
) -> None:
    logger, records = captured
    logger.info(
        "%s %s",
        "GET",
        f"/ws?ticket={TICKET}",
        extra={
            "first_request_line": f"GET /sse?ticket={TICKET}",
            "headers": {"a": f"Bearer {JWT}"},
        },
    )
    [record] = records
    assert TICKET not in record.message
    assert record.message.startswith("GET /ws?ticket=[redacted]")
    assert TICKET not in vars(record)["first_request_line"]
    assert JWT not in str(vars(record)["headers"])
