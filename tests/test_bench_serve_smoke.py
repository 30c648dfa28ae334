"""Smoke test of bench/serve.py at a tiny size (random tiny llama, word-level tokenizer, 4 requests
of 8 tokens at 1 and 2 concurrent streaming clients, no transformers serve): the server and offline
both run, their texts are identical, the figures are sane and the report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_serve_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.serve", "--smoke", "--requests", "4", "--concurrency", "1,2",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads((tmp_path / "serve-cpu-smoke.json").read_text())
    meta, rows = data["metadata"], data["rows"]
    assert [(r["side"], r["concurrency"]) for r in rows] == [("decodekit server", 1), ("decodekit server", 2)]
    for r in rows:
        assert r["status"] == "ok" and r["identical"] == 1.0
        assert r["tok_s"] > 0 and r["req_s"] > 0 and r["offline_tok_s"] > 0 and r["server_over_offline"] > 0
        assert r["tokens"] == r["offline_tokens"] == 4 * 8 and r["token_counts"] == [8]
        assert len(r["ttft_ms"]) == len(r["itl_ms"]) == 3 and 0 < r["ttft_ms"][0] <= r["ttft_ms"][2]
        assert 0 <= r["itl_ms"][0] <= r["itl_ms"][1] <= r["itl_ms"][2]
    assert meta["identical"] == 1.0 and meta["requests"] == 4 and meta["concurrency"] == [1, 2]
    assert {"torch", "transformers", "command", "device", "cpu_count"} <= meta.keys()
    md = (tmp_path / "serve-cpu-smoke.md").read_text()
    assert "Serving benchmark" in md and "TTFT ms p50 / p90 / p99" in md
    assert "server texts identical to offline (same seeds): 100%" in md
