"""Tensor parallelism with transformers' own TP plan on CPU (gloo, ``torchrun
--nproc_per_node 2``): greedy, seeded, unseeded, forked, steered and n-gram speculative
requests, joins and cancellations give the same tokens on both ranks, equal to a single
process (fp32); and configurations TP cannot run are refused with a message saying what to
change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _models import tiny_config, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).with_name("_tp_worker.py")
REPO = Path(__file__).resolve().parents[1]


def _save(arch: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def _run(args: list[str], timeout: int = 240) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    r = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_ranks_agree_with_each_other_and_a_single_process(arch, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    model = _save(arch, tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    _run([torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), str(model), str(out)])
    _run([sys.executable, str(WORKER), str(model), str(out), "--single"])
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in ("0", "1", "single")]
    assert ranks[0] == ranks[1], "the ranks diverged"
    assert ranks[0] == ranks[2], "tensor-parallel tokens differ from a single process"
    assert all(len(t) == 12 for t in ranks[0]["steered"]) and ranks[0]["steered"] != \
        [o[0] for o in ranks[0]["plain"]]


def test_bad_tensor_parallel_configurations_say_what_to_change():
    from decodekit.engine.parallel import check_tensor_parallel

    with pytest.raises(ValueError, match="not divisible by tp_size 3"):
        check_tensor_parallel(3, 4, 0)
    with pytest.raises(ValueError, match="max_loras=0"):
        check_tensor_parallel(2, 4, 2)
    check_tensor_parallel(2, 4, 0)
    check_tensor_parallel(1, 3, 8)
