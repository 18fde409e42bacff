"""``realtime-lab token``, driven through its argparse parser (no subprocess)."""

from __future__ import annotations

import argparse

import jwt
import pytest

from realtime_lab.auth.cli import SECRET_ENV, add_token_command
from realtime_lab.auth.tokens import TokenAuthority

SECRET = "c" * 32


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="realtime-lab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_token_command(sub)
    args = parser.parse_args(["token", *argv])
    status: int = args.func(args)
    return status


@pytest.fixture(autouse=True)
def no_secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)


def test_env_var_name() -> None:
    assert SECRET_ENV == "REALTIME_LAB_AUTH_SECRET"


def test_prints_a_token_that_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--user", "alice", "--auth-secret", SECRET]) == 0
    out, err = capsys.readouterr()
    identity = TokenAuthority(SECRET).verify(out.strip())
    assert identity.user == "alice"
    assert identity.scopes == frozenset()
    assert out.count("\n") == 1
    assert err == ""


def test_scopes_repeatable_or_space_separated(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(["--user", "a", "--scope", "publish admin", "--scope", "x", "--auth-secret", SECRET])
        == 0
    )
    identity = TokenAuthority(SECRET).verify(capsys.readouterr().out.strip())
    assert identity.scopes == {"publish", "admin", "x"}


def test_ttl_is_honoured(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--user", "a", "--ttl", "90", "--auth-secret", SECRET]) == 0
    body = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])
    assert body["exp"] - body["iat"] == 90


def test_default_ttl_is_an_hour(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--user", "a", "--auth-secret", SECRET]) == 0
    body = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])
    assert body["exp"] - body["iat"] == 3600


def test_secret_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert run(["--user", "bob"]) == 0
    assert TokenAuthority(SECRET).verify(capsys.readouterr().out.strip()).user == "bob"


def test_flag_wins_over_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "e" * 32)
    assert run(["--user", "bob", "--auth-secret", SECRET]) == 0
    assert TokenAuthority(SECRET).verify(capsys.readouterr().out.strip()).user == "bob"


@pytest.mark.parametrize("env", [None, ""])
def test_no_secret_exits_2_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: str | None
) -> None:
    if env is not None:
        monkeypatch.setenv(SECRET_ENV, env)
    assert run(["--user", "alice"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "no secret" in err
    assert "--auth-secret" in err
    assert SECRET_ENV in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--user", "a b"], "invalid user id"),
        (["--user", "a", "--ttl", "0"], "ttl"),
        (["--user", "a", "--scope", "é"], "invalid scope"),
    ],
)
def test_bad_input_exits_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run([*argv, "--auth-secret", SECRET]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err


def test_short_secret_exits_2_without_echoing_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--user", "a", "--auth-secret", "hunter2"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "at least 32 bytes" in err
    assert "hunter2" not in err


def test_user_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(["--auth-secret", SECRET])
    assert info.value.code == 2
    assert "--user" in capsys.readouterr().err
