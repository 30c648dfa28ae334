"""Smoke test of bench/steering.py at a tiny size (random tiny llama, word-level tokenizer, B 1 and
4, 6 new tokens): every configuration, the hook checks and the token checks against no steering."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from bench import steering as bench_steering

CONFIGS = {"none", "idle-hooks", "one-layer", "all-layers", "all-layers-per-request", "half-steered"}
METADATA_KEYS = {"device", "device_slug", "torch", "transformers", "python", "command", "timestamp",
                 "timing_method", "threads", "load_avg_1m_start", "load_avg_1m_end", "repeats", "model",
                 "max_new_tokens", "batches", "alpha", "layer_norms", "targets"}


def test_steering_bench_smoke(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        assert bench_steering.main(["--smoke", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # --smoke runs on 1 thread
    data = json.loads((tmp_path / "steering-cpu-smoke.json").read_text())
    md = (tmp_path / "steering-cpu-smoke.md").read_text()
    assert "| config | mode | B |" in md and "Targets" in md

    meta, rows = data["metadata"], data["rows"]
    assert METADATA_KEYS <= meta.keys(), METADATA_KEYS - meta.keys()
    assert meta["smoke"] is True and meta["max_new_tokens"] == 6 and meta["batches"] == [1, 4]
    assert all(math.isfinite(x) and x > 0 for x in meta["layer_norms"])
    by = {(r["config"], r["batch"]): r for r in rows}
    assert set(by) == {(c, b) for c in CONFIGS for b in (1, 4)} - {("half-steered", 1)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tok_s"] > 0 and r["gb_s"] > 0 and math.isfinite(r["overhead_pct"])
        assert len(r["decode_s_all"]) == meta["repeats"] and r["deterministic"] is True
    for b in (1, 4):
        assert by[("none", b)]["steered_requests"] == 0
        assert by[("one-layer", b)]["steered_layers"] == 1
        assert by[("all-layers", b)]["steered_layers"] == meta["num_layers"]
        assert by[("all-layers-per-request", b)]["steered_requests"] == b
        assert by[("idle-hooks", b)]["rows_identical_to_baseline"] == b  # idle hooks change nothing
        assert by[("idle-hooks", b)]["token_agreement"] == 1.0
    steered = [by[(c, b)] for c in ("one-layer", "all-layers", "all-layers-per-request") for b in (1, 4)]
    assert any(r["rows_identical_to_baseline"] < r["batch"] for r in steered)
    half = by[("half-steered", 4)]
    assert half["steered_requests"] == 2 and half["unsteered_rows_identical"] == [True, True]
    tc = meta["targets"]
    assert tc["idle_hooks_identical"] is True and tc["half_steered_unsteered_rows_identical"] is True
    assert {(c["config"], c["batch"]) for c in tc["checks"]} == {
        (c, b) for c in ("one-layer", "all-layers-per-request") for b in (1, 4)}
