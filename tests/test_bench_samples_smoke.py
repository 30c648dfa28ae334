"""Smoke test of bench/samples.py at a tiny size (random tiny llama, 3 samples of a 30-token
prompt): the samples share one prefill and equal their independently seeded twins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_samples_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.samples", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads((tmp_path / "samples-cpu-smoke.json").read_text())
    forked, alone = data["rows"]
    assert forked["status"] == alone["status"] == "ok"
    assert forked["prefill_computed"] == 30 and alone["prefill_computed"] == 3 * 30
    assert forked["identical"] == 1.0 and forked["tokens"] == alone["tokens"] == 3 * 4
    assert "Samples benchmark" in (tmp_path / "samples-cpu-smoke.md").read_text()
