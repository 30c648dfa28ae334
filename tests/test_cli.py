"""The command line: the demo end to end and argparse-style errors."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decodekit", *args], capture_output=True,
                          text=True, timeout=300)


def test_demo_runs_and_checks_exactness():
    r = run("demo", "--vocab-size", "2000", "--steps", "3", "--draws", "3000")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rows = [ln for ln in lines if ln.strip()[:1].isdigit() and "  " in ln]
    assert len(rows) >= 8  # one line per demo request
    greedy = next(ln for ln in rows if "greedy" in ln)
    assert greedy.split()[-3:] == ["0", "0", "0"]  # Zipf rank 1 is token 0
    assert "exactness" in r.stdout and "-> OK" in r.stdout


def test_bad_arguments_are_argparse_errors():
    for args in (["demo", "--vocab-size", "10"], ["demo", "--steps", "x"], ["nope"], []):
        r = run(*args)
        assert r.returncode == 2, (args, r.stdout)
        assert "usage:" in r.stderr and "Traceback" not in r.stderr
