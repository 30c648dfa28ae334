"""Smoke test of bench/generate.py at a tiny size (random tiny llama, word-level tokenizer, B 1 and
2, 6 new tokens): the TokenGenerator vs model.generate step points with the forward alone, the
bandwidth achieved and the floor, and the LLM.generate vs model.generate_batch serve points."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _smoke import run_smoke

METADATA_KEYS = {"device", "device_slug", "torch", "triton", "transformers", "python", "command",
                 "timestamp", "timing_method", "threads", "load_avg_1m_start", "load_avg_1m_end",
                 "repeats", "models", "settings", "copy_bandwidth_gb_s", "hf_generation_config"}


def test_generate_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.generate", "--smoke", "--out", str(tmp_path)]
    run_smoke(cmd)  # exit code 0, under 4 GB at its peak
    data = json.loads((tmp_path / "generate-cpu-smoke.json").read_text())
    md = (tmp_path / "generate-cpu-smoke.md").read_text()
    assert "TokenGenerator vs model.generate" in md and "LLM.generate vs model.generate_batch" in md

    meta = data["metadata"]
    assert METADATA_KEYS <= meta.keys(), METADATA_KEYS - meta.keys()
    assert "bench.generate" in meta["command"] and meta["smoke"] is True
    assert meta["copy_bandwidth_gb_s"] > 0
    assert all(c["disable_compile"] is True for c in meta["hf_generation_config"].values())

    rows = data["rows"]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    step = [r for r in rows if r["section"] == "step"]
    assert {(r["setting"], r["batch"]) for r in step} == {
        (s, b) for s in ("greedy", "sampled") for b in (1, 2)}
    for r in step:
        assert r["decode_tokens"] == r["batch"] * 5
        for side in ("decodekit", "hf"):
            assert r[side]["tok_s"] > 0 and r[side]["prefill_ms"] > 0 and r[side]["gb_s"] > 0, r[side]
        assert r["forward_ms"] > 0 and r["ratio"] > 0 and r["ratio_median_step"] > 0
        assert r["floor_tok_s"] > r["decodekit"]["tok_s"]  # nothing beats reading the weights once
        assert 0 < r["decodekit"]["stats_forward_ms"] <= r["decodekit"]["step_ms"] * 1.5
    serve = {r["setting"]: r for r in rows if r["section"] == "serve"}
    assert set(serve) == {"greedy", "sampled"}
    for r in serve.values():
        assert r["requests"] == 4 and r["max_batch_size"] == 2
        assert r["decodekit"]["tokens"] == r["hf"]["tokens"] == 4 * 6  # EOS off on both sides
        assert r["decodekit"]["tok_s"] > 0 and r["hf"]["tok_s"] > 0 and r["ratio"] > 0
        assert r["decodekit"]["gb_s"] > 0 and r["hf"]["gb_s"] > 0 and r["floor_tok_s"] > 0
    assert 0 <= serve["greedy"]["greedy_rows_identical"] <= 1
