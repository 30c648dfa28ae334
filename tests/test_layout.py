"""Structure of the sampling package and the kernels: the layout imports without Triton,
every kernel launch sizes its warps through the one launch helper, kernels import nothing
from decodekit. (Function sizes and private reaches: tests/test_structure.py.)"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from decodekit.kernels import launch, layout

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "triton_kernels").glob("*.py"))

NO_TRITON = """
import sys
sys.modules["triton"] = None  # any `import triton` now fails
import torch
from decodekit import Sampler, SamplingParams, sample
from decodekit.kernels import launch, layout
s = Sampler(50, 2, "cpu")
s.add(0, SamplingParams(seed=1, top_p=0.9, bad_words_token_ids=[[1, 2]]), [1])
s.window_probs(torch.randn(1, 3, 50), [0], torch.tensor([[1, 2]]))
s.sample(torch.randn(1, 50), [0])
sample(torch.randn(2, 50), SamplingParams(seed=2))
assert "decodekit.kernels.process" not in sys.modules
print("ok", layout.MAX_CHUNKS, launch.num_warps(1024))
"""


def test_sampling_imports_and_runs_without_triton():
    out = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(layout.MAX_CHUNKS), "4"]


def test_num_warps_follow_the_block_size():
    assert [launch.num_warps(b) for b in (1, 32, 64, 256, 1024, 2048, 8192, 32768)] == \
        [1, 1, 2, 4, 4, 8, 16, 32]


@pytest.mark.parametrize("rows", [1, 3, 64, 1000])
@pytest.mark.parametrize("V", [1, 1000, 32000, 151936, 1 << 24])
def test_row_split_covers_the_row_within_the_chunk_cap(rows, V):
    per_row, chunk = launch.row_split(rows, V, torch.device("cpu"), layout.BLOCK_PROCESS)
    assert 1 <= per_row <= layout.MAX_CHUNKS
    assert chunk % layout.BLOCK_PROCESS == 0
    assert (per_row - 1) * chunk < V <= per_row * chunk  # every program has columns


def test_every_kernel_launch_sets_num_warps_from_the_launch_helper():
    """``kernel[grid](..., num_warps=go.num_warps)`` with ``go = launch(...)``, everywhere."""
    launches = 0
    for path in KERNELS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                launches += 1
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("num_warps") == "go.num_warps", (path.name, node.lineno)
                assert ast.unparse(node.func.slice) == "go.grid", (path.name, node.lineno)
    # process, hist, plan, gather, finish, select, accept, verify, paged attention, lora shrink, lora expand
    assert launches == 11


def test_kernels_import_nothing_from_decodekit():
    for path in KERNELS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not (node.module or "").startswith("decodekit"), path.name
                assert node.level <= 1, (path.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("decodekit") for a in node.names), path.name
