"""Smoke test of the speculative-decoding benchmark harness (bench/speculative.py) at a tiny
size: a random tiny llama with an in-process word-level tokenizer, repetitive token prompts,
B 1 and 2, 12 new tokens, with and without NGramDraft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METADATA_KEYS = {
    "device", "device_slug", "torch", "transformers", "python", "command", "timestamp",
    "threads", "load_avg_1m", "load_avg_1m_end", "repeats", "model", "max_new_tokens",
    "k_sweep", "targets",
}


def test_speculative_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.speculative", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    files = sorted(tmp_path.glob("speculative-*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").is_file()
    data = json.loads(files[0].read_text())

    meta = data["metadata"]
    assert METADATA_KEYS <= meta.keys(), METADATA_KEYS - meta.keys()
    assert "bench.speculative" in meta["command"]
    assert meta["smoke"] is True and meta["max_new_tokens"] == 12
    assert meta["targets"]["greedy_mismatches_total"] == 0

    rows = data["rows"]
    points = {(r["kind"], r["setting"], r["batch"], r["k"]) for r in rows}
    assert {("copy", "greedy", 1, k) for k in (2, 4, 6)} <= points
    assert {(kind, s, b, 4) for kind in ("copy", "open") for s in ("greedy", "t0.7")
            for b in (1, 2)} <= points
    for row in rows:
        assert row["status"] == "ok", row["status"]
        for side in ("plain", "spec"):
            assert row[side]["tok_s"] > 0, (side, row[side])
            assert all(0 < g <= row["requests_per_repeat"] * 12
                       for g in row[side]["generated_tokens_all"]), row[side]
        assert row["speedup"] > 0
        assert 0.0 <= row["spec"]["acceptance_rate"] <= 1.0
        if row["setting"] == "greedy":
            assert row["greedy_requests_compared"] > 0
            assert row["greedy_mismatches"] == 0, row
        else:
            assert row["greedy_mismatches"] is None
    copy_greedy = [r for r in rows if r["kind"] == "copy" and r["setting"] == "greedy"]
    assert any(r["spec"]["accepted"] > 0 for r in copy_greedy)  # the drafter did something
