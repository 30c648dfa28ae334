"""Smoke test of bench/lora.py at a tiny size (random tiny llama, B 1 and 2, 4 tokens): every
configuration runs, and requests without an adapter keep the tokens of a generator without
LoRA support."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_lora_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.lora", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = json.loads((tmp_path / "lora-cpu-smoke.json").read_text())["rows"]
    assert {(r["config"], r["batch"]) for r in rows} == {("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2),
                                                          ("c", 2), ("d", 2)}
    assert all(r["status"] == "ok" and r["plain_rows_identical"] and r["tok_s"] > 0 for r in rows)
    assert "LoRA benchmark" in (tmp_path / "lora-cpu-smoke.md").read_text()
