"""Run a real nginx in front of a test server, configured from the README.

The configuration is the documented one: every ```` ```nginx ```` block of ``README.md``
whose first line is ``# context: http`` or ``# context: server`` is pasted into a minimal
``nginx.conf``; only the upstream address, the ``listen`` port and ``proxy_read_timeout``
change. Everything nginx writes (pid, logs, temp files) stays under the test's ``tmp_path``,
and it runs in the foreground as one process (``daemon off; master_process off;``) so stopping
it is one ``terminate()``.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.conftest import free_port

DOC: Final = Path(__file__).resolve().parents[2] / "README.md"
UPSTREAM_SERVER: Final = re.compile(r"^(\s*server\s+)127\.0\.0\.1:8080;", re.MULTILINE)
READ_TIMEOUT: Final = re.compile(r"\bproxy_read_timeout\s+\S+;")
_BLOCK: Final = re.compile(r"^```nginx\n(.*?)^```", re.MULTILINE | re.DOTALL)


def nginx_binary() -> str | None:
    """The nginx executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("nginx")
    if found is not None:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def lines_of(text: str) -> list[str]:
    """The configuration lines of ``text``: stripped, without comments and blank lines."""
    out = []
    for line in text.splitlines():
        code = line.split("#", 1)[0].strip()
        if code:
            out.append(re.sub(r"\s+", " ", code))
    return out


def documented_blocks() -> dict[str, list[str]]:
    """The documented configuration blocks, by context (``http`` / ``server``)."""
    blocks: dict[str, list[str]] = {"http": [], "server": []}
    for text in _BLOCK.findall(DOC.read_text(encoding="utf-8")):
        first = text.splitlines()[0].strip()
        if first.startswith("# context:"):
            blocks[first.split(":", 1)[1].strip()].append(text)
    return blocks


def build_config(
    prefix: Path,
    port: int,
    upstream_port: int,
    *,
    read_timeout: str,
    extra_server: str = "",
) -> str:
    """A whole ``nginx.conf``: the documented blocks, pointed at the test server."""
    blocks = documented_blocks()
    assert blocks["http"], f"no '# context: http' block in {DOC}"
    assert len(blocks["server"]) >= 4, f"fewer '# context: server' blocks than expected in {DOC}"
    http = "\n".join(blocks["http"])
    http, found = UPSTREAM_SERVER.subn(rf"\g<1>127.0.0.1:{upstream_port};", http)
    assert found == 1, "the documented upstream must name 127.0.0.1:8080 once"
    server = "\n".join(blocks["server"]) + extra_server
    server = READ_TIMEOUT.sub(f"proxy_read_timeout {read_timeout};", server)
    user = ""
    if os.geteuid() == 0:
        # As root, nginx would switch to "nobody" for its work, which cannot read tmp_path.
        user = f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"
    return f"""\
daemon off;
master_process off;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http}
    server {{
        listen 127.0.0.1:{port};
{server}
    }}
}}
"""


@dataclass
class Nginx:
    """A running nginx: ``url`` is ``http://127.0.0.1:PORT``."""

    process: subprocess.Popen[bytes]
    prefix: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown (SIGTERM), then SIGKILL if it does not exit within 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


async def start_nginx(
    prefix: Path, upstream_port: int, *, read_timeout: str = "1s", extra_server: str = ""
) -> Nginx:
    """Start nginx in front of ``upstream_port`` and wait until it accepts connections.

    Stop it with :meth:`Nginx.stop` (the ``nginx`` fixtures do).
    """
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    prefix.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # free_port() can race with another process taking the port
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            build_config(
                prefix, port, upstream_port, read_timeout=read_timeout, extra_server=extra_server
            )
        )
        output = (prefix / "stderr.log").open("ab")
        try:
            process = subprocess.Popen(
                [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", f"{prefix}/error.log"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        finally:
            output.close()
        nginx = Nginx(process, prefix, port)
        try:
            await _wait_listening(nginx)
            return nginx
        except OSError:
            nginx.stop()
            if attempt == 2 or "Address already in use" not in nginx.error_log():
                raise
    raise AssertionError("unreachable")


async def _wait_listening(nginx: Nginx, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if nginx.process.poll() is not None:
                raise OSError(f"nginx exited with {nginx.process.returncode}: {nginx.error_log()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", nginx.port)
            except OSError:
                await asyncio.sleep(0.02)  # polling for the listening socket, with a deadline
                continue
            writer.close()
            await writer.wait_closed()
            return
