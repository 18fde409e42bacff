"""The ``realtime-lab`` command line and the settings it builds."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields

import pytest

from realtime_lab import cli
from realtime_lab.config import Settings


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Wide COLUMNS: argparse then prints one option per line, so option and env var stay together.
    return subprocess.run(
        [sys.executable, "-m", "realtime_lab", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300", **(env or {})},
        check=False,
    )


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``serve`` installs the server's log handler on the root logger: take it off again."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_top_level_help_lists_serve() -> None:
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+serve\s+serve the dashboard", done.stdout, re.MULTILINE)


def help_entries(text: str) -> dict[str, str]:
    """``{"--flag": "its whole entry"}`` from argparse's options section."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"\s{2}(-\w|--[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line.strip()
        elif current is not None and line.startswith(" " * 4):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_serve_help_lists_every_option_with_its_env_var() -> None:
    done = run_cli("serve", "--help")
    assert done.returncode == 0, done.stderr
    entries = help_entries(done.stdout)
    defaults = Settings()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        entry = entries[flag]
        assert entry.endswith(f"env REALTIME_LAB_{f.name.upper()})"), entry
        if not isinstance(getattr(defaults, f.name), bool):
            assert f"(default {getattr(defaults, f.name)};" in entry, entry
    assert len(entries) == len(fields(Settings)) + 1  # and -h


def test_bad_flag_value_exits_2() -> None:
    done = run_cli("serve", "--port", "eighty")
    assert done.returncode == 2
    assert "--port" in done.stderr


def test_bad_env_value_exits_2_naming_the_variable() -> None:
    done = run_cli("serve", env={"REALTIME_LAB_PORT": "eighty"})
    assert done.returncode == 2
    assert "REALTIME_LAB_PORT='eighty'" in done.stderr


def test_from_env_reads_every_kind_of_field() -> None:
    settings = Settings.from_env(
        {
            "REALTIME_LAB_PORT": "9001",
            "REALTIME_LAB_HEARTBEAT": "2.5",
            "REALTIME_LAB_BUS": "redis://cache:6379/1",
            "REALTIME_LAB_CHAOS": "yes",
            "REALTIME_LAB_LOG_LEVEL": "DEBUG",
            "UNRELATED": "1",
        }
    )
    assert settings.port == 9001
    assert settings.heartbeat == 2.5
    assert settings.bus == "redis://cache:6379/1"
    assert settings.chaos is True
    assert settings.log_level == "DEBUG"
    assert settings.history == Settings().history


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" on ", True),
        ("yes", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_from_env_bool(raw: str, value: bool) -> None:
    assert Settings.from_env({"REALTIME_LAB_CHAOS": raw}).chaos is value


def test_from_env_overrides_win_and_none_is_ignored() -> None:
    env = {"REALTIME_LAB_PORT": "9001", "REALTIME_LAB_HOST": "0.0.0.0"}
    settings = Settings.from_env(env, port=9002, host=None)
    assert settings.port == 9002
    assert settings.host == "0.0.0.0"


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALTIME_LAB_MAX_TOKENS", "7")
    assert Settings.from_env().max_tokens == 7


def test_from_env_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="REALTIME_LAB_HISTORY"):
        Settings.from_env({"REALTIME_LAB_HISTORY": "lots"})


def test_serve_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []
    monkeypatch.setattr("realtime_lab.app.run", seen.append)
    monkeypatch.setenv("REALTIME_LAB_PORT", "9001")
    monkeypatch.setenv("REALTIME_LAB_HEARTBEAT", "3")
    monkeypatch.setenv("REALTIME_LAB_LOG_LEVEL", "WARNING")
    assert cli.main(["serve", "--port", "9005", "--chaos", "--send-buffer", "1234"]) == 0
    (settings,) = seen
    assert settings.port == 9005
    assert settings.heartbeat == 3.0
    assert settings.chaos is True
    assert settings.send_buffer == 1234


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::"])
def test_serve_refuses_a_public_address_without_a_secret(
    host: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Settings] = []
    monkeypatch.setattr("realtime_lab.app.run", seen.append)
    monkeypatch.delenv("REALTIME_LAB_AUTH_SECRET", raising=False)
    assert cli.main(["serve", "--host", host]) == 2
    assert "--auth-secret" in capsys.readouterr().err
    assert seen == []
    # Given a secret, or told --insecure, it serves.
    assert cli.main(["serve", "--host", host, "--insecure"]) == 0
    assert cli.main(["serve", "--host", host, "--auth-secret", "k" * 32]) == 0
    assert len(seen) == 2
    assert cli.main(["serve", "--host", "127.0.0.1"]) == 0  # loopback: the open lab
