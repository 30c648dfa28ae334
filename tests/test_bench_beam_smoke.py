"""Smoke test of bench/beam.py at a tiny size (random tiny llama, word-level tokenizer, 2 prompts,
beam width 4, 6 new tokens): both sides run, return the same sequences, and the report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_beam_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.beam", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads((tmp_path / "beam-cpu-smoke.json").read_text())
    meta, rows = data["metadata"], data["rows"]
    assert [r["side"] for r in rows] == ["decodekit beam_search", "HF generate(num_beams)"]
    assert all(r["status"] == "ok" and r["tok_s"] > 0 and r["beams"] == 4 for r in rows)
    assert rows[0]["dk_over_side"] == 1.0 and rows[1]["dk_over_side"] > 0
    assert meta["smoke"] is True and meta["identical"] == 1.0 and meta["prompts"] == 2
    assert {"torch", "transformers", "command", "device", "cpu_count"} <= meta.keys()
    assert "Beam search benchmark" in (tmp_path / "beam-cpu-smoke.md").read_text()
