"""Smoke test of bench/sampler.py at a tiny size: decodekit, its torch reference and the HF chain
timed next to the one-read floor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METADATA_KEYS = {"device", "device_slug", "torch", "triton", "transformers", "python", "command",
                 "timestamp", "copy_bandwidth", "timing_method", "load_avg_1m_start", "load_avg_1m_end"}


def test_sampler_bench_quick(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.sampler", "--quick", "--batch", "1", "--vocab", "1000",
           "--settings", "greedy", "all", "--dists", "peaked", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads((tmp_path / "sampler-cpu.json").read_text())
    assert "| setting | logits |" in (tmp_path / "sampler-cpu.md").read_text()

    meta = data["metadata"]
    assert METADATA_KEYS <= meta.keys(), METADATA_KEYS - meta.keys()
    assert "bench.sampler" in meta["command"]
    assert meta["copy_bandwidth"]["bytes_per_s"] > 0

    rows = data["rows"]
    assert {(r["setting"], r["dist"], r["batch"], r["vocab"]) for r in rows} == {
        ("greedy", "peaked", 1, 1000), ("all", "peaked", 1, 1000)}
    for row in rows:
        for impl in ("decodekit", "torch_ref", "hf_chain"):
            assert row["status"][impl] == "ok", (impl, row["status"])
            assert row["times_us"][impl] > 0, (impl, row)
        assert row["floor_us"] > 0 and row["decodekit_over_floor"] > 1
        assert row["ratios"]["torch_ref"] > 0 and row["ratios"]["hf_chain"] > 0
        assert row["times_us"]["flashinfer"] is None  # CPU


def test_sampler_bench_passes(tmp_path: Path) -> None:
    """``--passes``: the kernels' own pass counts (the interpreter on CPU), banded vs pivot
    search, and the bytes per row that follow from them."""
    cmd = [sys.executable, "-m", "bench.sampler", "--passes", "--vocab", "4096", "--settings",
           "topk_topp", "temp", "--dists", "flat", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = {r["setting"]: r for r in json.loads((tmp_path / "sampler-passes-cpu.json").read_text())["rows"]}
    assert rows["topk_topp"]["banded"]["passes"] == 3 < rows["topk_topp"]["pivot"]["passes"]
    assert rows["temp"]["banded"]["passes"] == rows["temp"]["pivot"]["passes"] == 1
    assert rows["temp"]["banded"]["bytes_per_row"] == 4096 * 2  # one read of the bf16 logits
    assert rows["topk_topp"]["banded"]["bytes_per_row"] == 4096 * (2 + 4 + 2 * 4)
