"""The dashboard's copy of the sequence rule (static/sequence.js), run by node's own test runner.

The JavaScript tests (``tests/js/*.test.mjs``) read the same table as ``test_sequence.py``; this
module runs them so that ``make test`` covers them, and skips with a reason without node.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

JS_TESTS = Path(__file__).resolve().parents[1] / "js"
NODE = shutil.which("node")


def _node_major() -> int:
    assert NODE is not None
    done = subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30)
    match = re.match(r"v(\d+)\.", done.stdout)
    return int(match.group(1)) if match else 0


@pytest.mark.skipif(NODE is None, reason="node is not installed: the JavaScript tests cannot run")
def test_the_javascript_tests_pass() -> None:
    assert NODE is not None
    if _node_major() < 20:
        pytest.skip("node is older than 20: its test runner lacks what these tests use")
    files = sorted(str(p) for p in JS_TESTS.glob("*.test.mjs"))
    assert files, f"no *.test.mjs in {JS_TESTS}"
    # The files by name rather than the directory: how a directory argument is read changed
    # between node versions (a path before 21, a glob pattern after).
    done = subprocess.run(
        [NODE, "--test", "--test-reporter=tap", *files],
        cwd=JS_TESTS.parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert re.search(r"^# pass [1-9]", done.stdout, re.MULTILINE), done.stdout[-2000:]
    assert re.search(r"^# fail 0$", done.stdout, re.MULTILINE), done.stdout[-2000:]
