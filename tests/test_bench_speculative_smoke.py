"""Smoke tests of bench/speculative.py and tools/layerskip_search.py at a tiny size (random
tiny llama, word-level tokenizer, 12 new tokens): every drafter against plain decoding, HF prompt
lookup and plain generate at B=1, greedy outputs identical to plain decoding; the subset search."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METADATA_KEYS = {"device", "device_slug", "torch", "triton", "transformers", "python", "command",
                 "timestamp", "timing_method", "load_avg_1m_start", "load_avg_1m_end", "repeats", "model",
                 "max_new_tokens", "k_sweep", "hf_prompt_lookup", "layerskip", "best_vs_best"}


def _run(tmp_path: Path, module: str) -> dict:
    cmd = [sys.executable, "-m", module, "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(next(tmp_path.glob("*.json")).read_text())


def _pos(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_speculative_bench_smoke(tmp_path: Path) -> None:
    data = _run(tmp_path, "bench.speculative")
    meta, rows = data["metadata"], data["rows"]
    assert METADATA_KEYS <= meta.keys(), METADATA_KEYS - meta.keys()
    assert meta["smoke"] is True and meta["max_new_tokens"] == 12 and meta["greedy_mismatches"] == 0
    assert len(meta["best_vs_best"]) == 4 + 4  # (copy, open) x settings: B=1 best vs best, B=2
    assert "Best vs best" in next(tmp_path.glob("*.md")).read_text()
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]

    sides = {(r["drafter"], r["kind"], r["setting"], r["batch"], r["side"]) for r in rows}
    b1 = {"plain", "ngram k=8", "ngram k=16", "hf", "hf lookup K=4", "hf lookup K=10"}
    for kind in ("copy", "open"):
        for st in ("greedy", "t0.7"):
            assert {("ngram", kind, st, 1, s) for s in b1} <= sides
            assert {("ngram", kind, st, 2, s) for s in ("plain", "ngram k=16")} <= sides
            assert {("layerskip", "open", st, b, s) for b in (1, 2) for s in ("plain", "layerskip k=3")} \
                <= sides
    assert {("model", "open", "greedy", b, "model k=4") for b in (1, 2)} <= sides
    for r in rows:
        assert _pos(r["tok_s"]) and _pos(r["speedup"]) and _pos(r["gb_s"]) and _pos(r["floor_tok_s"]), r
        assert r["tokens_per_step"] >= 1.0
        speculative = r["side"] != "plain" and not r["side"].startswith("hf")
        # each speculative side records the window costs its generator measured, (1, 1) = 1
        assert (r["window_cost"] is not None) == speculative, r
        assert not speculative or [1, 1, 1.0] in r["window_cost"], r["window_cost"]
        if r["setting"] == "greedy" and r["side"] not in ("plain", "hf"):
            assert r["greedy_compared"] > 0
            if not r["side"].startswith("hf"):
                assert r["greedy_mismatches"] == 0, r  # speculation never changes greedy tokens
        if r["side"] != "plain" and not r["side"].startswith("hf") and r["batch"] == 1 \
                and r["drafter"] != "ngram":
            assert r["drafted"] > 0, r  # the model drafters ran (--smoke turns the draft policy off)
    copy_greedy = [r for r in rows if r["side"].startswith("ngram") and r["kind"] == "copy"
                   and r["setting"] == "greedy"]
    assert any(r["accepted"] > 0 for r in copy_greedy)


def test_layerskip_search_smoke(tmp_path: Path) -> None:
    data = _run(tmp_path, "tools.layerskip_search")
    meta, entries = data["metadata"], data["rows"]
    assert meta["n_layers"] == 2 and len(entries) == 2 * 3  # 2 subsets of 2 layers x k in {2, 3, 4}
    assert all(e["status"] == "ok" and e["greedy_mismatches"] == 0 for e in entries), entries
    timed = [e for e in entries if "timed_speedup" in e]
    assert len(timed) == 2 and all(_pos(e["timed_speedup"]) for e in timed)
    assert meta["best"]["timed_speedup"] == max(e["timed_speedup"] for e in timed)
    assert meta["best_flags"].startswith("--layerskip-layers ")
