"""nginx with TLS and HTTP/2 in front of the bench's server: ``deploy/nginx-h2.conf`` itself.

What ``make h2`` runs (``deploy/h2.sh``), for one bench run: a self-signed certificate made with
the ``openssl`` command, the configuration copied into a folder of its own with the upstream and
both listen ports replaced, and nginx in the foreground as one process (``master_process off``),
so stopping it is one SIGTERM and its CPU time is one ``/proc`` file. Its access log is in the
configuration's ``realtime_lab`` format (``$bytes_sent $body_bytes_sent ...`` per request), which
:func:`sent_by_tag` adds up per ``client=`` tag: what nginx sent the client, HPACK headers and
HTTP/2 frames included, TLS records not.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from realtime_lab.bench.server import _die_with_parent, cpu_seconds, free_port, stop_process
from realtime_lab.errors import RealtimeLabError

#: The configuration ``make h2`` runs (the repository's; the bench runs from a checkout).
DEPLOY_CONF: Final = Path(__file__).resolve().parents[2] / "deploy" / "nginx-h2.conf"
_UPSTREAM: Final = re.compile(r"^(\s*server\s+)127\.0\.0\.1:8080;", re.MULTILINE)
_LISTEN_H2: Final = re.compile(r"^(\s*listen\s+)127\.0\.0\.1:8443( ssl http2;)", re.MULTILINE)
_LISTEN_H1: Final = re.compile(r"^(\s*listen\s+)127\.0\.0\.1:8444( ssl;)", re.MULTILINE)
_WORKER_CONNECTIONS: Final = re.compile(r"worker_connections\s+\d+;")

#: One line of the ``realtime_lab`` access-log format of ``deploy/nginx-h2.conf``.
ACCESS_LINE: Final = re.compile(
    r'"(?P<method>\S+) (?P<uri>\S+) (?P<protocol>HTTP/[\d.]+)" (?P<status>\d+) '
    r"(?P<bytes_sent>\d+) (?P<body_bytes_sent>\d+) (?P<request_length>\d+)"
)


class ProxyError(RealtimeLabError):
    """nginx (or openssl) is missing, or nginx did not start."""


def nginx_binary() -> str | None:
    """The nginx executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("nginx")
    if found is not None:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def missing() -> str | None:
    """Why nginx with HTTP/2 cannot run here (install what it names), or None."""
    binary = nginx_binary()
    if binary is None:
        return "nginx is not installed (Debian: apt-get install nginx-light)"
    if shutil.which("openssl") is None:
        return "openssl is not installed (it makes the self-signed certificate)"
    version = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False)
    if "--with-http_v2_module" not in version.stderr:
        return f"{binary} has no HTTP/2 module (--with-http_v2_module)"
    if not DEPLOY_CONF.is_file():
        return f"{DEPLOY_CONF} is not there (run the bench from a checkout of the repository)"
    return None


def make_certificate(directory: Path) -> None:
    """``cert.pem`` and ``key.pem`` for localhost and 127.0.0.1, as ``deploy/h2.sh`` makes them."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip


def build_config(
    upstream_port: int, h2_port: int, h1_port: int, *, worker_connections: int = 1024
) -> str:
    """``deploy/nginx-h2.conf`` pointed at ``upstream_port``, listening on the given ports.

    Raises:
        ProxyError: the file no longer has the lines this replaces.
    """
    text = DEPLOY_CONF.read_text(encoding="utf-8")
    for pattern, replacement in (
        (_UPSTREAM, rf"\g<1>127.0.0.1:{upstream_port};"),
        (_LISTEN_H2, rf"\g<1>127.0.0.1:{h2_port}\g<2>"),
        (_LISTEN_H1, rf"\g<1>127.0.0.1:{h1_port}\g<2>"),
        (_WORKER_CONNECTIONS, f"worker_connections {worker_connections};"),
    ):
        text, found = pattern.subn(replacement, text)
        if found != 1:
            raise ProxyError(f"{DEPLOY_CONF} must have one {pattern.pattern!r}")
    return text


@dataclass
class Sent:
    """What nginx sent for the requests of one client tag (its access log, added up)."""

    requests: int = 0
    bytes: int = 0  # $bytes_sent: everything (for HTTP/2: HEADERS and DATA frames, HPACK)
    body: int = 0  # $body_bytes_sent: the bodies; bytes - body is headers and framing
    protocols: frozenset[str] = frozenset()


def sent_by_tag(log: str, paths: tuple[str, ...] = ("/",)) -> dict[str, Sent]:
    """``$bytes_sent`` and ``$body_bytes_sent`` added up per ``client=`` tag of the requests
    (of those whose path starts with one of ``paths``)."""
    totals: dict[str, Sent] = {}
    for line in log.splitlines():
        match = ACCESS_LINE.search(line)
        if match is None:
            continue
        uri = urlsplit(match["uri"])
        if not uri.path.startswith(paths):
            continue
        tag = parse_qs(uri.query).get("client", [None])[0]
        if tag is None:
            continue
        before = totals.get(tag, Sent())
        totals[tag] = Sent(
            before.requests + 1,
            before.bytes + int(match["bytes_sent"]),
            before.body + int(match["body_bytes_sent"]),
            before.protocols | {match["protocol"]},
        )
    return totals


class NginxProxy:
    """One nginx in front of ``upstream_port``: :attr:`h2_port` speaks HTTP/2 (and 1.1 to a
    client without ``h2`` in its ALPN), :attr:`h1_port` HTTP/1.1 only, the same TLS.

    :meth:`start` it, read :meth:`access_log` and :meth:`cpu`, :meth:`stop` it (also a context
    manager). Everything it writes stays in ``prefix``.
    """

    def __init__(self, prefix: Path, upstream_port: int, *, worker_connections: int = 1024) -> None:
        self.prefix = prefix
        self.upstream_port = upstream_port
        self.worker_connections = worker_connections
        self.h2_port = 0
        self.h1_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def port(self, via: str) -> int:
        """The port of ``via`` (``h2`` or ``h1``)."""
        return self.h2_port if via == "h2" else self.h1_port

    def start(self, timeout: float = 15.0) -> None:
        """Start nginx and wait until both ports accept TLS.

        Raises:
            ProxyError: nginx, its HTTP/2 module or openssl is missing, or nginx did not start
                (its error log is in :attr:`prefix`).
        """
        why = missing()
        if why is not None:
            raise ProxyError(why)
        binary = nginx_binary()
        assert binary is not None
        (self.prefix / "temp").mkdir(parents=True, exist_ok=True)
        if not (self.prefix / "cert.pem").exists():
            make_certificate(self.prefix)
        args = [binary, "-p", f"{self.prefix}/", "-c", str(self.prefix / "nginx.conf")]
        args += ["-e", "error.log"]
        if os.geteuid() == 0:
            # As root nginx would work as "nobody", who may not read the prefix: stay who we are.
            me = f"{pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}"
            args += ["-g", f"user {me};"]
        for _attempt in range(3):  # a free port can be taken between the probe and the bind
            self.h2_port, self.h1_port = free_port(), free_port()
            config = build_config(
                self.upstream_port,
                self.h2_port,
                self.h1_port,
                worker_connections=self.worker_connections,
            )
            (self.prefix / "nginx.conf").write_text(config)
            with (self.prefix / "stderr.log").open("ab") as output:
                self.proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    preexec_fn=_die_with_parent,  # the coordinator runs no threads (see runner)
                )
            if self._wait_tls(timeout):
                return
            self.stop()
        raise ProxyError(f"nginx did not start: {self.error_log()[-2000:]}")

    def _wait_tls(self, timeout: float) -> bool:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        for port in (self.h2_port, self.h1_port):
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                if time.monotonic() > deadline:
                    return False
                try:
                    with (
                        socket.create_connection(("127.0.0.1", port), timeout=2.0) as raw,
                        context.wrap_socket(raw),
                    ):
                        break
                except OSError:
                    time.sleep(0.02)  # polling for the listening socket, with a deadline
        return True

    def cpu(self) -> float | None:
        """CPU seconds nginx has used so far (None when it is not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        return cpu_seconds(self.proc.pid)

    def access_log(self) -> str:
        """The access log so far (one line per finished request)."""
        path = self.prefix / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Wait until the access log has not grown for ``quiet`` s (at most ``timeout`` s).

        nginx logs a request once it notices its client went away, a moment after the client
        closed; a fast shutdown (:meth:`stop`) logs none of those still open.
        """
        path = self.prefix / "access.log"
        deadline = time.monotonic() + timeout
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_size = path.stat().st_size if path.exists() else 0
            if now_size != size:
                size, since = now_size, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.05)  # polling a file nginx appends to, with a deadline

    def rotate(self) -> None:
        """Start the access log afresh (between two runs on the same nginx)."""
        path = self.prefix / "access.log"
        if path.exists():
            path.write_text("")  # nginx appends (O_APPEND): truncating keeps its descriptor

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGTERM), then SIGKILL if it does not exit in time. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout)

    def __enter__(self) -> NginxProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# The bench's points through nginx ------------------------------------------------------------

#: What ``--via`` takes: straight to the server (the default), or through nginx with TLS over
#: HTTP/1.1 (its HTTP/1.1-only port) or HTTP/2.
VIAS: Final = ("direct", "h1", "h2")
#: The transports that go through nginx (openai and the baseline are read by the C client,
#: which speaks no TLS).
VIA_TRANSPORTS: Final = ("sse", "ws", "longpoll", "poll", "fetch")
#: The measures of a point through nginx, summarised over its runs.
SUMMARY_KEYS: Final = (
    "bytes_down_per_token",
    "bytes_up_per_token",
    "nginx_bytes_per_token",
    "nginx_head_bytes_per_request",
    "nginx_requests_per_token",
    "nginx_cpu_us_per_token",
)


def via_points(points: list[dict[str, Any]], vias: list[str]) -> list[dict[str, Any]]:
    """Each point once per ``via`` (``direct`` unchanged), side by side; a label says the via:
    ``sse via h2``."""
    if vias == ["direct"]:
        return points
    out = []
    for point in points:
        for via in vias:
            label = point["label"] if via == "direct" else f"{point['label']} via {via}"
            out.append({**point, "via": via, "label": label})
    return out


def check_vias(
    vias: list[str],
    transports: list[str],
    *,
    url: str | None,
    compression: list[str],
    processes: int = 1,
) -> str | None:
    """Why these ``--via`` points cannot run, or None."""
    if not vias or set(vias) - set(VIAS):
        return f"--via takes {', '.join(VIAS)}, not {vias}"
    if vias == ["direct"]:
        return None
    if url is not None:
        return "--via puts nginx in front of the bench's own server: not with --url"
    others = sorted(set(transports) - set(VIA_TRANSPORTS))
    if others:
        return f"--via h1/h2 drives {', '.join(VIA_TRANSPORTS)}, not {', '.join(others)}"
    if compression != ["off"]:
        return "--via h1/h2 measures uncompressed streams: not with --compression"
    if processes > 1:
        return "--via h1/h2 puts nginx in front of one server process: not with --processes"
    return missing()


class Front:
    """What a point's load clients connect to: the server itself, or nginx in front of it.

    :func:`front` makes one per run; :meth:`route` points the workers' ``open`` commands at it,
    :meth:`mark` reads nginx's CPU time at the window's edges, and once nginx has stopped
    :meth:`measures` reads its access log.
    """

    def __init__(self, via: str, nginx: NginxProxy | None) -> None:
        self.via = via
        self.nginx = nginx
        self.cpu: list[float | None] = []
        self.log = ""

    def route(self, commands: list[dict[str, Any] | None]) -> None:
        """Send the workers' clients through nginx (direct: leave the commands as they are)."""
        if self.nginx is None:
            return
        port = self.nginx.port(self.via)
        for command in commands:
            if command is not None:
                command.update(
                    port=port,
                    ports=[port],
                    host="127.0.0.1",
                    host_header=f"127.0.0.1:{port}",
                    via=self.via,
                    native=None,  # the C client speaks no TLS
                )

    def mark(self) -> None:
        """Read nginx's CPU seconds (call at the window's start and end)."""
        self.cpu.append(None if self.nginx is None else self.nginx.cpu())

    def measures(
        self, tag: str, closed: list[dict[str, Any]], window: dict[str, Any]
    ) -> dict[str, Any]:
        """nginx's view of the run: ``$bytes_sent`` of the tag's requests over the tokens its
        clients received in their whole lives, headers and framing per request, requests per
        token, nginx's CPU per token of the window. Empty for a direct point."""
        if self.nginx is None:
            return {"via": "direct"}
        sent = sent_by_tag(self.log).get(tag, Sent())
        life = sum(int(reply.get("life_tokens", 0)) for reply in closed)
        events = int(window.get("events") or 0)
        cpu = self.cpu
        nginx_cpu = None
        if len(cpu) >= 2 and cpu[0] is not None and cpu[1] is not None:
            nginx_cpu = cpu[1] - cpu[0]
        return {
            "via": self.via,
            "life_tokens": life,
            "nginx_requests": sent.requests,
            "nginx_bytes": sent.bytes,
            "nginx_body_bytes": sent.body,
            "nginx_protocols": sorted(sent.protocols),
            "nginx_bytes_per_token": sent.bytes / life if life else None,
            "nginx_head_bytes_per_request": (sent.bytes - sent.body) / sent.requests
            if sent.requests
            else None,
            "nginx_requests_per_token": sent.requests / life if life else None,
            "nginx_cpu_us_per_token": nginx_cpu / events * 1e6
            if nginx_cpu is not None and events
            else None,
        }


@contextmanager
def front(out: Path, upstream_port: int, via: str, clients: int) -> Iterator[Front]:
    """nginx in front of ``upstream_port`` for one run of a ``via`` point (``direct``: none).

    Its folder is ``out/nginx-VIA`` (certificate, configuration, logs: the last run's stay);
    it is stopped, and its access log read, when the block ends.

    Raises:
        ProxyError: nginx did not start.
    """
    if via == "direct":
        yield Front(via, None)
        return
    # Each client's connection counts twice (its side and the upstream's), HTTP/2 streams too.
    nginx = NginxProxy(out / f"nginx-{via}", upstream_port, worker_connections=4 * clients + 256)
    nginx.prefix.mkdir(parents=True, exist_ok=True)
    nginx.rotate()
    nginx.start()
    seen = Front(via, nginx)
    try:
        yield seen
    finally:
        nginx.settle()  # the requests whose clients just closed, logged
        nginx.stop()
        seen.log = nginx.access_log()


__all__ = [
    "DEPLOY_CONF",
    "SUMMARY_KEYS",
    "VIAS",
    "VIA_TRANSPORTS",
    "Front",
    "NginxProxy",
    "ProxyError",
    "Sent",
    "check_vias",
    "front",
    "make_certificate",
    "missing",
    "nginx_binary",
    "sent_by_tag",
    "via_points",
]
