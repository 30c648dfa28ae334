"""Smoke test of bench/replicas.py at a tiny size (slow: it starts Ray twice): one plain
server and Ray Serve with 1 and 2 replicas all answer the same 6 seeded requests with the
same texts, exit 0 on SIGTERM, and the report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_replicas_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.replicas", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = json.loads((tmp_path / "replicas-cpu-smoke.json").read_text())["rows"]
    assert rows[0]["side"].startswith("one process") and [r["side"] for r in rows[1:]] == [
        "Ray Serve, 1 replica (1 CPU each)", "Ray Serve, 2 replicas (1 CPU each)"]
    for r in rows:
        assert r["status"] == "ok" and r["exit_code"] == 0 and r["tok_s"] > 0 and r["tokens"] == 6 * 4
    assert all(r["identical_to_one_process"] == 1.0 for r in rows[1:])
    assert "Replicas benchmark (Ray Serve)" in (tmp_path / "replicas-cpu-smoke.md").read_text()
