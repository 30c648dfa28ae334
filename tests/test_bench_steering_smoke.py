"""Smoke test of the steering benchmark harness (bench/steering.py) at a tiny size: a random
tiny llama with an in-process word-level tokenizer, B 1 and 4, 6 new tokens, every
configuration (no hooks, idle hooks, one layer, all layers, per-request vectors, half steered)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from bench import steering as bench_steering

CONFIGS = {"none", "idle-hooks", "one-layer", "all-layers", "all-layers-per-request",
           "half-steered"}
METADATA_KEYS = {
    "device", "device_slug", "torch", "transformers", "python", "command", "timestamp",
    "threads", "load_avg_1m", "load_avg_1m_end", "repeats", "model", "max_new_tokens",
    "batches", "alpha", "layer_norms", "targets",
}


def _finite_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_steering_bench_smoke(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        rc = bench_steering.main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() sets 1 thread for --smoke
    assert rc == 0

    files = sorted(tmp_path.glob("steering-*.json"))
    assert [f.name for f in files] == ["steering-cpu-smoke.json"] or len(files) == 1, files
    md = files[0].with_suffix(".md")
    assert md.is_file()
    md_text = md.read_text()
    assert "| config | mode | B |" in md_text and "Targets" in md_text
    data = json.loads(files[0].read_text())

    meta = data["metadata"]
    assert METADATA_KEYS <= meta.keys(), METADATA_KEYS - meta.keys()
    assert meta["smoke"] is True and meta["max_new_tokens"] == 6 and meta["batches"] == [1, 4]
    assert all(_finite_positive(x) for x in meta["layer_norms"]), meta["layer_norms"]

    rows = data["rows"]
    by = {(r["config"], r["batch"]): r for r in rows}
    expected = {(c, b) for c in CONFIGS for b in (1, 4)} - {("half-steered", 1)}
    assert set(by) == expected, set(by) ^ expected
    for r in rows:
        assert r["status"] == "ok", r
        assert _finite_positive(r["tok_s"]), r
        assert len(r["decode_s_all"]) == meta["repeats"]
        assert r["deterministic"] is True, r["config"]
        assert math.isfinite(r["overhead_pct"])
    for b in (1, 4):
        assert by[("none", b)]["steered_requests"] == 0
        assert by[("one-layer", b)]["steered_layers"] == 1
        assert by[("all-layers", b)]["steered_layers"] == meta["num_layers"]
        assert by[("all-layers-per-request", b)]["steered_requests"] == b
        # (b) idle hooks: every request token-for-token identical to the hook-free baseline
        assert by[("idle-hooks", b)]["rows_identical_to_baseline"] == b
        assert by[("idle-hooks", b)]["token_agreement"] == 1.0
    # (c)-(e): steering changes the output of at least some requests
    steered = [by[(c, b)] for c in ("one-layer", "all-layers", "all-layers-per-request")
               for b in (1, 4)]
    assert any(r["rows_identical_to_baseline"] < r["batch"] for r in steered), steered
    # (f): the unsteered rows of a half-steered batch are identical to the baseline's
    half = by[("half-steered", 4)]
    assert half["steered_requests"] == 2
    assert half["unsteered_rows_identical"] == [True, True]

    tc = meta["targets"]["token_checks"]
    assert tc["idle_hooks_identical"] is True
    assert tc["half_steered_unsteered_rows_identical"] is True
    checks = {(c["config"], c["batch"]) for c in meta["targets"]["checks"]}
    assert checks == {(c, b) for c in ("one-layer", "all-layers-per-request") for b in (1, 4)}
