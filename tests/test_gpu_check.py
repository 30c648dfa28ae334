"""The GPU check's in-process correctness phase at toy sizes on CPU (eager graphs): CI runs the
whole check once at the end, this catches a failing phase in the default suite."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_graphs_phase_passes(gpu_check, tmp_path):
    args = argparse.Namespace(smoke=True, out=str(tmp_path), results=str(tmp_path), budget_s=600)
    res = gpu_check.phase_graphs(gpu_check.Check(args))
    assert res["ok"], res
    spec = res["archs"]["llama"]
    # every drafter kind drafted and matched HF greedy under (eager) graphs
    assert {k for k in spec if k.startswith("spec_graphs_")} == {
        "spec_graphs_ngram_equal_hf", "spec_graphs_draft_model_equal_hf", "spec_graphs_layer_skip_equal_hf"}


def test_attention_phase_passes(gpu_check, tmp_path):
    args = argparse.Namespace(smoke=True, out=str(tmp_path), results=str(tmp_path), budget_s=600)
    res = gpu_check.phase_attention(gpu_check.Check(args))
    assert res["ok"] and res["points"][0]["max_err"] < 1e-4, res
