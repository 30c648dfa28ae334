"""Smoke test of the speculative-decoding benchmark harness (bench/speculative.py) at a tiny
size: a random tiny llama with an in-process word-level tokenizer, repetitive token prompts,
B 1 and 2, 12 new tokens, with and without each drafter (NGramDraft, LayerSkipDraft after
the subset search, DraftModel with a random tiny draft)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METADATA_KEYS = {
    "device", "device_slug", "torch", "transformers", "python", "command", "timestamp",
    "threads", "load_avg_1m", "load_avg_1m_end", "repeats", "model", "max_new_tokens",
    "k_sweep", "targets", "drafters", "layerskip_search",
}
DRAFTERS = {"ngram", "layerskip", "model"}


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_speculative_bench_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.speculative", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    files = sorted(tmp_path.glob("speculative-*.json"))
    assert len(files) == 1, files
    md = files[0].with_suffix(".md")
    assert md.is_file()
    md_text = md.read_text()
    assert "| drafter | kind |" in md_text
    assert "LayerSkip subset search" in md_text
    data = json.loads(files[0].read_text())

    meta = data["metadata"]
    assert METADATA_KEYS <= meta.keys(), METADATA_KEYS - meta.keys()
    assert "bench.speculative" in meta["command"]
    assert meta["smoke"] is True and meta["max_new_tokens"] == 12
    assert meta["drafter_option"] == "all"
    assert {d["name"] for d in meta["drafters"]} == DRAFTERS
    targets = meta["targets"]
    assert targets["greedy_mismatches_total"] == 0
    assert DRAFTERS <= targets.keys()

    rows = data["rows"]
    assert {r["drafter"] for r in rows} == DRAFTERS
    points = {(r["drafter"], r["kind"], r["setting"], r["batch"], r["k"]) for r in rows}
    assert {("ngram", "copy", "greedy", 1, k) for k in (2, 4, 6)} <= points
    assert {("ngram", kind, s, b, 4) for kind in ("copy", "open") for s in ("greedy", "t0.7")
            for b in (1, 2)} <= points
    ls_rows = [r for r in rows if r["drafter"] == "layerskip"]
    assert {(r["kind"], r["setting"], r["batch"]) for r in ls_rows} == {
        ("open", s, b) for s in ("greedy", "t0.7") for b in (1, 2)}
    dm_rows = [r for r in rows if r["drafter"] == "model"]
    assert {(r["kind"], r["setting"], r["batch"], r["k"]) for r in dm_rows} == {
        ("open", "greedy", b, 4) for b in (1, 2)}

    for row in rows:
        assert row["status"] == "ok", row["status"]
        for side in ("plain", "spec"):
            assert _finite(row[side]["tok_s"]) and row[side]["tok_s"] > 0, (side, row[side])
            assert _finite(row[side]["tokens_per_step"]), row[side]
            assert all(0 < g <= row["requests_per_repeat"] * 12
                       for g in row[side]["generated_tokens_all"]), row[side]
        assert _finite(row["speedup"]) and row["speedup"] > 0
        assert 0.0 <= row["spec"]["acceptance_rate"] <= 1.0
        if row["setting"] == "greedy":
            assert row["greedy_requests_compared"] > 0
            assert row["greedy_mismatches"] == 0, row
        else:
            assert row["greedy_mismatches"] is None
        if row["drafter"] != "ngram" and row["batch"] == 1:  # the model drafters ran
            assert row["spec"]["drafted"] > 0, row
            assert _finite(row["spec"]["mean_accepted_length"]), row["spec"]
            assert row["spec"]["mean_accepted_length"] >= 1.0
    copy_greedy = [r for r in rows if r["drafter"] == "ngram" and r["kind"] == "copy"
                   and r["setting"] == "greedy"]
    assert any(r["spec"]["accepted"] > 0 for r in copy_greedy)  # the drafter did something

    # the layer-skip search: 2 subsets of the tiny model's 2 layers x k in {2, 3, 4}
    search = meta["layerskip_search"]
    assert search["n_layers"] == 2 and search["candidates"] == len(search["entries"]) == 6
    assert search["greedy_mismatches"] == 0
    for e in search["entries"]:
        assert e["status"] == "ok", e
        assert e["greedy_mismatches"] == 0, e
        assert 0 < e["kept_layers"] < 2 and e["k"] in (2, 3, 4)
        assert _finite(e["tok_s"]) and _finite(e["speedup_est"]) and e["drafted"] > 0, e
        assert 0.0 <= e["acceptance_rate"] <= 1.0
    timed = [e for e in search["entries"] if "timed" in e]
    assert len(timed) == 2
    for e in timed:
        assert _finite(e["timed"]["speedup"]) and e["timed"]["greedy_mismatches"] == 0, e
    best = search["best"]
    assert best["speedup"] == max(e["timed"]["speedup"] for e in timed)
    assert all(r["layers"] == best["layers"] and r["k"] == best["k"] for r in ls_rows)
