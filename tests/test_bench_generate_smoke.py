"""Smoke test of the token-generator benchmark harness (bench/generate.py) at a tiny size:
a random tiny llama with an in-process word-level tokenizer, B 1 and 2, 4 new tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METADATA_KEYS = {
    "device", "device_slug", "torch", "transformers", "python", "command", "timestamp",
    "threads", "load_avg_1m", "load_avg_1m_end", "repeats", "models", "settings",
}


def test_generate_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.generate", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    files = sorted(tmp_path.glob("generate-*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").is_file()
    data = json.loads(files[0].read_text())

    meta = data["metadata"]
    assert METADATA_KEYS <= meta.keys(), METADATA_KEYS - meta.keys()
    assert "bench.generate" in meta["command"]
    assert meta["smoke"] is True

    rows = data["rows"]
    assert {(r["setting"], r["batch"]) for r in rows} == {
        ("greedy", 1), ("sampled", 1), ("greedy", 2), ("sampled", 2),
    }
    for row in rows:
        assert row["status"] == {"decodekit": "ok", "hf": "ok", "forward": "ok"}, row["status"]
        assert row["max_new_tokens"] == 4
        assert row["decode_tokens"] == row["batch"] * 3
        for side in ("decodekit", "hf"):
            assert row[side]["tok_s"] > 0, (side, row[side])
            assert row[side]["prefill_ms"] > 0, (side, row[side])
        assert row["forward_ms"] > 0
        assert row["ratio"] > 0 and row["ratio_median_step"] > 0
        assert set(row["overhead_us"]) == {"decodekit", "hf"}
