"""nginx with TLS and HTTP/2 in front of a test server, from ``deploy/nginx-h2.conf`` itself.

The configuration, the certificate and the access-log format are the bench's
(:mod:`realtime_lab.bench.proxy`, what ``realtime-lab bench --via h1,h2`` starts); this module
starts nginx from a test's event loop.

What ``make h2`` runs (``deploy/h2.sh``), with the ports changed: a self-signed certificate made
with the ``openssl`` command in the test's directory, the configuration copied there with the
upstream and both listen ports replaced, and nginx in the foreground as one process
(``master_process off``), so stopping it is one ``terminate()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from realtime_lab.bench.proxy import (
    ACCESS_LINE,
    Sent,
    make_certificate,
    missing,
    nginx_binary,
    sent_by_tag,
)
from realtime_lab.bench.proxy import DEPLOY_CONF as DEPLOY
from realtime_lab.bench.proxy import build_config as _build_config
from tests.conftest import free_port

__all__ = ["ACCESS_LINE", "DEPLOY", "H2Proxy", "Sent", "make_certificate", "missing"]


def build_config(upstream_port: int, h2_port: int, h1_port: int) -> str:
    """``deploy/nginx-h2.conf`` pointed at the test server, listening on the given ports (the
    bench's :func:`realtime_lab.bench.proxy.build_config`, which ``bench --via`` runs too)."""
    return _build_config(upstream_port, h2_port, h1_port)


#: The transports' paths: a stats call names a client tag too, but is not the client's stream.
TRANSPORT_PATHS: Final = ("/poll/", "/longpoll/", "/sse/", "/ws/", "/api/chats/stream")


def sent_by_client(log: str) -> dict[str, Sent]:
    """``$bytes_sent`` added up per ``client=`` tag of the transports' requests (each pane of
    the dashboard has its own tag)."""
    return sent_by_tag(log, TRANSPORT_PATHS)


@dataclass
class H2Proxy:
    """A running nginx: ``h2_url`` speaks HTTP/2 (and 1.1), ``h1_url`` HTTP/1.1 only."""

    process: subprocess.Popen[bytes]
    prefix: Path
    h2_port: int
    h1_port: int

    @property
    def h2_url(self) -> str:
        return f"https://127.0.0.1:{self.h2_port}"

    @property
    def h1_url(self) -> str:
        return f"https://127.0.0.1:{self.h1_port}"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        path = self.prefix / "access.log"
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


async def start_h2_proxy(prefix: Path, upstream_port: int) -> H2Proxy:
    """Start nginx (TLS, HTTP/2) in front of ``upstream_port``; wait until it accepts TLS.

    Skips the test when nginx, its HTTP/2 module or openssl is missing. Stop it with
    :meth:`H2Proxy.stop`.
    """
    why = missing()
    if why is not None:
        pytest.skip(why)
    binary = nginx_binary()
    assert binary is not None
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    make_certificate(prefix)
    args = [binary, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", "error.log"]
    if os.geteuid() == 0:
        # As root nginx would work as "nobody", who cannot read the test's directory.
        me = f"{pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}"
        args += ["-g", f"user {me};"]
    for attempt in range(3):  # free_port() can race with another process taking the port
        h2_port, h1_port = free_port(), free_port()
        (prefix / "nginx.conf").write_text(build_config(upstream_port, h2_port, h1_port))
        with (prefix / "stderr.log").open("ab") as output:
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        proxy = H2Proxy(process, prefix, h2_port, h1_port)
        try:
            await _wait_tls(proxy)
            return proxy
        except OSError:
            proxy.stop()
            if attempt == 2 or "Address already in use" not in proxy.error_log():
                raise
    raise AssertionError("unreachable")


async def _wait_tls(proxy: H2Proxy, timeout: float = 15.0) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    async with asyncio.timeout(timeout):
        for port in (proxy.h2_port, proxy.h1_port):
            while True:
                if proxy.process.poll() is not None:
                    raise OSError(
                        f"nginx exited with {proxy.process.returncode}: {proxy.error_log()}"
                    )
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
                except OSError:
                    await asyncio.sleep(0.02)  # polling for the listening socket, with a deadline
                    continue
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
                break
