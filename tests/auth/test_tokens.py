"""User tokens: what verifies, and every way an attacker's token must not."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest

from realtime_lab.auth.tokens import (
    ADMIN,
    LEEWAY_S,
    MAX_TOKEN_LENGTH,
    PUBLISH,
    Identity,
    TokenAuthority,
    is_valid_user,
)
from realtime_lab.errors import AuthError, RealtimeLabError, Unauthenticated

SECRET = "s" * 32
OTHER_SECRET = "o" * 32


@pytest.fixture
def authority() -> TokenAuthority:
    return TokenAuthority(SECRET)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], key: str | None = SECRET) -> str:
    """A compact JWS with any header, HMAC-SHA256-signed with ``key`` (or unsigned)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if key is None:
        return signing_input + "."
    mac = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": int(time.time()) + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def refused(authority: TokenAuthority, token: str, code: str = "invalid-token") -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        authority.verify(token)
    assert info.value.code == code
    return info.value


# --- what verifies ---------------------------------------------------------------------------


def test_mint_then_verify_round_trips_user_and_scopes(authority: TokenAuthority) -> None:
    token = authority.mint("alice", [PUBLISH, ADMIN])
    identity = authority.verify(token)
    assert identity == Identity("alice", frozenset({PUBLISH, ADMIN}))
    assert identity.has(PUBLISH)
    assert identity.has(ADMIN)
    assert identity.channel == "user.alice"


def test_token_without_scope_grants_nothing(authority: TokenAuthority) -> None:
    identity = authority.verify(authority.mint("bob"))
    assert identity.scopes == frozenset()
    assert not identity.has(PUBLISH)
    assert not identity.has(ADMIN)


def test_scope_claim_is_space_separated(authority: TokenAuthority) -> None:
    token = jwt.encode(claims(scope="publish  other\tadmin"), SECRET, algorithm="HS256")
    assert authority.verify(token).scopes == {"publish", "other", "admin"}


def test_minted_token_is_hs256_with_sub_iat_exp(authority: TokenAuthority) -> None:
    token = authority.mint("alice", ["publish"], ttl=120)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    body = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert body["sub"] == "alice"
    assert body["scope"] == "publish"
    assert body["exp"] - body["iat"] == 120
    assert abs(body["iat"] - time.time()) < 5


def test_expiry_within_leeway_is_accepted(authority: TokenAuthority) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 1), SECRET, algorithm="HS256")
    assert LEEWAY_S >= 2
    assert authority.verify(token).user == "alice"


@pytest.mark.parametrize("user", ["a", "alice", "A-Z_0.9:x", "x" * 64, "user:42", "bot.one"])
def test_valid_user_ids(authority: TokenAuthority, user: str) -> None:
    assert is_valid_user(user)
    assert authority.verify(authority.mint(user)).user == user


# --- attacker cases --------------------------------------------------------------------------


def test_alg_none_is_refused(authority: TokenAuthority) -> None:
    for alg in ("none", "None", "NONE"):
        refused(authority, forge({"alg": alg, "typ": "JWT"}, claims(), key=None))
        # Unsigned, but with a signature segment that would match HS256 over the same input.
        refused(authority, forge({"alg": alg}, claims()))


def test_wrong_key_is_refused(authority: TokenAuthority) -> None:
    token = jwt.encode(claims(), OTHER_SECRET, algorithm="HS256")
    refused(authority, token)
    refused(authority, TokenAuthority(OTHER_SECRET).mint("alice"))


def test_rs256_header_is_refused_even_when_hmac_signed_with_the_secret(
    authority: TokenAuthority,
) -> None:
    # Algorithm confusion: the "public key" used as an HMAC key. The header names RS256.
    refused(authority, forge({"alg": "RS256", "typ": "JWT"}, claims()))


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_are_refused(authority: TokenAuthority, alg: str) -> None:
    refused(authority, jwt.encode(claims(), SECRET + "x" * 32, algorithm=alg))
    refused(authority, jwt.encode(claims(), SECRET * 2, algorithm=alg))


def test_header_alg_must_be_exactly_hs256(authority: TokenAuthority) -> None:
    refused(authority, forge({"alg": "hs256"}, claims()))
    assert authority.verify(forge({"alg": "HS256"}, claims())).user == "alice"


def test_expired_token_has_its_own_code(authority: TokenAuthority) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 3600), SECRET, algorithm="HS256")
    error = refused(authority, token, "token-expired")
    assert isinstance(error, AuthError)
    assert isinstance(error, RealtimeLabError)


def test_expiry_beyond_leeway_is_refused(authority: TokenAuthority) -> None:
    exp = int(time.time() - LEEWAY_S - 5)
    refused(authority, jwt.encode(claims(exp=exp), SECRET, algorithm="HS256"), "token-expired")


@pytest.mark.parametrize("missing", ["sub", "exp"])
def test_missing_required_claim_is_refused(authority: TokenAuthority, missing: str) -> None:
    body = claims()
    del body[missing]
    refused(authority, jwt.encode(body, SECRET, algorithm="HS256"))


@pytest.mark.parametrize("sub", [42, 4.2, True, ["alice"], {"id": "alice"}, None])
def test_non_string_sub_is_refused(authority: TokenAuthority, sub: object) -> None:
    body = claims()
    body["sub"] = sub
    refused(authority, forge({"alg": "HS256"}, body))


@pytest.mark.parametrize(
    "sub",
    ["", "x" * 65, "a b", "alice/../bob", "user.*", "é", "alice\n", "a,b", "a>b", "al\x00ice", " "],
)
def test_bad_user_id_is_refused(authority: TokenAuthority, sub: str) -> None:
    assert not is_valid_user(sub)
    refused(authority, forge({"alg": "HS256"}, claims(sub=sub)))


@pytest.mark.parametrize(
    ("exp", "code"),
    [
        ("9999999999", "invalid-token"),  # PyJWT alone would take int("9999999999")
        ([9999999999], "invalid-token"),
        ({"t": 1}, "invalid-token"),
        (True, "token-expired"),  # PyJWT reads int(True) == 1 and int(False) == 0: long gone
        (False, "token-expired"),
        (1e400, "invalid-token"),  # json: Infinity
    ],
)
def test_non_numeric_exp_is_refused(authority: TokenAuthority, exp: object, code: str) -> None:
    refused(authority, forge({"alg": "HS256"}, claims(exp=exp)), code)


def test_float_exp_is_accepted(authority: TokenAuthority) -> None:
    token = forge({"alg": "HS256"}, claims(exp=float(time.time() + 600)))
    assert authority.verify(token).user == "alice"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_token_from_the_future_is_refused(authority: TokenAuthority, claim: str) -> None:
    body = claims(**{claim: int(time.time()) + 3600})
    refused(authority, jwt.encode(body, SECRET, algorithm="HS256"))


@pytest.mark.parametrize("scope", [["publish"], 1, {"publish": True}])
def test_non_string_scope_is_refused(authority: TokenAuthority, scope: object) -> None:
    refused(authority, forge({"alg": "HS256"}, claims(scope=scope)))


def test_tampered_payload_is_refused(authority: TokenAuthority) -> None:
    header, _, signature = authority.mint("alice").split(".")
    payload = b64(json.dumps(claims(scope="admin publish")).encode())
    refused(authority, f"{header}.{payload}.{signature}")


def test_huge_token_is_refused_before_parsing(authority: TokenAuthority) -> None:
    padded = jwt.encode(claims(pad="x" * MAX_TOKEN_LENGTH), SECRET, algorithm="HS256")
    error = refused(authority, padded)
    assert "longer than" in str(error)
    refused(authority, "a" * 10_000_000)


@pytest.mark.parametrize(
    "token", ["", "   ", "a.b", "a.b.c", "Bearer x.y.z", "....", "eyJ.eyJ.", "\x00", "é.é.é"]
)
def test_garbage_is_refused(authority: TokenAuthority, token: str) -> None:
    refused(authority, token)


def test_non_string_token_is_refused(authority: TokenAuthority) -> None:
    token = authority.mint("alice").encode()
    refused(authority, token)  # type: ignore[arg-type]


def test_audience_we_do_not_serve_is_refused(authority: TokenAuthority) -> None:
    refused(authority, jwt.encode(claims(aud="another-service"), SECRET, algorithm="HS256"))


def test_error_messages_never_contain_the_token(authority: TokenAuthority) -> None:
    # "crit" makes PyJWT quote a header value in its message: it must not reach ours.
    cases = [
        (jwt.encode(claims(), OTHER_SECRET, algorithm="HS256"), "invalid-token"),
        (jwt.encode(claims(exp=1), SECRET, algorithm="HS256"), "token-expired"),
        (forge({"alg": "HS256", "crit": ["evil\nline"]}, claims()), "invalid-token"),
    ]
    for token, code in cases:
        error = refused(authority, token, code)
        text = str(error) + repr(error)
        assert "evil" not in text
        for part in token.split("."):
            assert part not in text


# --- minting and the secret ------------------------------------------------------------------


@pytest.mark.parametrize("user", ["", "a b", "x" * 65, "é"])
def test_mint_refuses_bad_user(authority: TokenAuthority, user: str) -> None:
    with pytest.raises(ValueError, match="invalid user id"):
        authority.mint(user)


@pytest.mark.parametrize("scope", ["", "a b", "é", "x" * 65])
def test_mint_refuses_bad_scope(authority: TokenAuthority, scope: str) -> None:
    with pytest.raises(ValueError, match="invalid scope"):
        authority.mint("alice", [scope])


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan")])
def test_mint_refuses_bad_ttl(authority: TokenAuthority, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        authority.mint("alice", ttl=ttl)


@pytest.mark.parametrize("secret", ["", "short", "x" * 31, b"x" * 31])
def test_short_secret_is_refused(secret: str | bytes) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenAuthority(secret)


def test_bytes_and_str_secrets_agree() -> None:
    token = TokenAuthority(SECRET).mint("alice")
    assert TokenAuthority(SECRET.encode()).verify(token).user == "alice"


def test_repr_hides_the_secret(authority: TokenAuthority) -> None:
    assert SECRET not in repr(authority)
