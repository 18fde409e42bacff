"""``realtime-lab token``: mint a user token for the server's secret."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Final

from realtime_lab.auth.tokens import TokenAuthority
from realtime_lab.config import ENV_PREFIX

SECRET_ENV: Final = ENV_PREFIX + "AUTH_SECRET"
DEFAULT_TTL: Final = 3600.0


def add_token_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``token`` subcommand to ``sub``; run it with ``args.func(args)`` (exit status)."""
    parser = sub.add_parser(
        "token",
        help="print a user token (JWT, HS256) for the server's secret",
        description="Print a signed user token. Send it as 'Authorization: Bearer <token>', "
        "or trade it for a ticket with POST /api/tickets.",
    )
    parser.add_argument("--user", required=True, help="the user id (1-64 of A-Z a-z 0-9 _ . : -)")
    parser.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="SCOPE",
        help="grant 'publish' and/or 'admin'; repeat the flag or give a space-separated list",
    )
    parser.add_argument(
        "--ttl",
        type=float,
        default=DEFAULT_TTL,
        metavar="SECONDS",
        help=f"seconds the token stays valid (default {DEFAULT_TTL:g})",
    )
    parser.add_argument(
        "--auth-secret",
        default=None,
        metavar="SECRET",
        help=f"the server's signing secret (env {SECRET_ENV}; prefer the environment: "
        "command lines are visible to other users)",
    )
    parser.set_defaults(func=_token)


def _token(args: argparse.Namespace) -> int:
    secret = args.auth_secret or os.environ.get(SECRET_ENV)
    if not secret:
        print(
            f"realtime-lab token: no secret: pass --auth-secret or set {SECRET_ENV}",
            file=sys.stderr,
        )
        return 2
    scopes = [scope for value in args.scope for scope in value.split()]
    try:
        token = TokenAuthority(secret).mint(args.user, scopes, ttl=args.ttl)
    except ValueError as exc:
        print(f"realtime-lab token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0
