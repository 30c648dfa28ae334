"""Smoke test of bench/guided.py at a tiny size (random tiny llama, word tokenizer, B=2): the
guided and unguided sides run, the batch stays full, the report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_guided_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.guided", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = json.loads((tmp_path / "guided-cpu-smoke.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["batch"] == 2
    assert rows[0]["guided_step_ms"] > 0 and rows[0]["fill_us"] > 0
    jf = json.loads((tmp_path / "guided-cpu-smoke.json").read_text())["metadata"]["jump_forward"]
    assert jf["identical"] and jf["forced_tokens"] > 0 and jf["jf_steps"] < jf["plain_steps"], jf
    assert "Guided-decoding benchmark" in (tmp_path / "guided-cpu-smoke.md").read_text()
