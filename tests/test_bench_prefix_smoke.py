"""Smoke test of bench/prefix.py at a tiny size (random tiny llama, 6 requests sharing a 40-token
prefix): decodekit with and without prefix caching and transformers' generate_batch on the same
prompts, the prompt tokens each decodekit side computed, and the memory section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _smoke import run_smoke


def test_prefix_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.prefix", "--smoke", "--out", str(tmp_path)]
    run_smoke(cmd)  # exit code 0, under 4 GB at its peak
    data = json.loads((tmp_path / "prefix-cpu-smoke.json").read_text())
    rows = {r["side"]: r for r in data["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    on, off = rows["dk prefix caching"], rows["dk no prefix caching"]
    prompts = 6 * (40 + 6)
    assert off["prefill_computed"] == prompts and off["prefix_reused"] == 0
    # the first 3 run together (nothing cached yet); the next 3 reuse the 2 full shared blocks
    assert on["prefix_reused"] == 3 * 32 and on["prefill_computed"] == prompts - 3 * 32
    assert all(r["identical"] == 1.0 for r in rows.values())  # greedy: the same tokens on every side
    mem = data["metadata"]["memory"]
    assert mem["slots_fit"] == 4 and mem["paged_fit"] >= 1
    assert "Prefix-caching benchmark" in (tmp_path / "prefix-cpu-smoke.md").read_text()
