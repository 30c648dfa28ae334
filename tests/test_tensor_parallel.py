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


@pytest.mark.parametrize("arch", [pytest.param("llama", marks=pytest.mark.slow), "qwen2"])  # qwen2: GQA
def test_two_ranks_agree_with_each_other_and_a_single_process(arch, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    model = _save(arch, tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    _run([torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), str(model), str(out)])
    _run([sys.executable, str(WORKER), str(model), str(out), "--single"])
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in ("0", "1", "single")]
    costs = [r.pop("window_cost") for r in ranks]  # timed on each rank: rank 0's must be everyone's
    assert costs[0] == costs[1], f"the ranks plan drafts with different window costs: {costs[:2]}"
    assert ranks[0] == ranks[1], "the ranks diverged"
    assert ranks[0] == ranks[2], "tensor-parallel tokens differ from a single process"
    assert all(len(t) == 12 for t in ranks[0]["steered"]) and ranks[0]["steered"] != \
        [o[0] for o in ranks[0]["plain"]]


@pytest.mark.slow
def test_guided_decoding_and_ensembles_agree_across_ranks(tmp_path):
    """Guided requests (regex, choice, JSON schema; greedy and seeded: each rank's grammar
    matchers mask the same tokens) and an ensemble with a replicated member, on a tiny Llama
    over SmolLM2's vocabulary: both ranks equal each other and a single process; the guided
    texts match their grammars."""
    import re

    import torch
    from transformers import AutoModelForCausalLM

    from decodekit import load

    _, tok = load()
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=0)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "out"
    out.mkdir()
    _run([torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), str(folder), str(out), "--guided"])
    _run([sys.executable, str(WORKER), str(folder), str(out), "--single", "--guided"])
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in ("0", "1", "single")]
    assert ranks[0] == ranks[1], "the ranks diverged"
    assert ranks[0] == ranks[2], "tensor-parallel tokens differ from a single process"
    code, choice, person, _ = ranks[0]["guided_text"]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", code) and choice in ("yes", "no", "maybe"), (code, choice)
    assert isinstance(json.loads(person)["ok"], bool), person


@pytest.mark.slow
def test_pipeline_parallel_models_are_refused_with_what_to_use(tmp_path):
    """transformers' pipeline stages (DistributedConfig(pp_size=2)) drop the KV cache the
    generator passes by keyword: refused on every rank, naming tensor parallelism instead."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    model = _save("llama", tmp_path / "model")
    _run([torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), str(model), str(tmp_path), "--pp"])
    for r in (0, 1):
        message = (tmp_path / f"pp-rank-{r}.txt").read_text()
        assert "pipeline parallelism is not supported" in message and "tp_plan" in message, message


def test_bad_tensor_parallel_configurations_say_what_to_change():
    from decodekit.engine.parallel import check_tensor_parallel

    with pytest.raises(ValueError, match="not divisible by tp_size 3"):
        check_tensor_parallel(3, 4, 0)
    with pytest.raises(ValueError, match="max_loras=0"):
        check_tensor_parallel(2, 4, 2)
    check_tensor_parallel(2, 4, 0)
    check_tensor_parallel(1, 3, 8)


def test_serve_tp_rank0_serves_and_the_ranks_follow(tmp_path):
    """``torchrun --nproc_per_node 2 -m decodekit serve --tp``: rank 0 serves HTTP and sends
    each round's requests and cancellations to rank 1; seeded and greedy answers equal a
    single process's, a stream dropped mid-way is cancelled on both ranks (the next answers
    are still right), and SIGTERM to rank 0 stops both ranks and torchrun with exit code 0."""
    import re
    import signal
    import threading

    import httpx
    import openai
    from _serving import start_server

    from decodekit import LLM, SamplingParams

    model = _save("llama", tmp_path / "model")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    args = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "decodekit", "serve", str(model), "--tp",
            "--port", "0", "--served-model-name", "tiny", "--max-batch-size", "4", "--max-seq-len", "96",
            "--shutdown-timeout", "30"]
    proc, url = start_server(args, TRITON_INTERPRET="1")
    lines = proc.lines
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        oracle = LLM(model=AutoModelForCausalLM.from_pretrained(model),
                     tokenizer=AutoTokenizer.from_pretrained(model), max_batch_size=4, max_seq_len=96)
        prompts = ["w5 w6 w7", "w9 w10", "w40 w41 w42 w43", "w77"]
        kw = [dict(temperature=0), dict(seed=3, top_p=0.9), dict(seed=4), dict(temperature=0)]
        params = [SamplingParams(max_new_tokens=10, **k) for k in kw]
        want = [o.text for o in oracle.generate(prompts, params)]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        got: dict[int, str] = {}

        def ask(i: int) -> None:
            got[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10,
                                               **kw[i]).choices[0].text
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "w8", "max_tokens": 80, "stream": True, "ignore_eos": True}) as r:
            next(r.iter_lines())  # one chunk, then the client leaves
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got.get(i) for i in range(4)] == want
        leader = re.search(r"pid=(\d+)", "".join(lines))
        os.kill(int(leader.group(1)), signal.SIGTERM)  # rank 0 stops; it tells rank 1, torchrun exits 0
        assert proc.wait(90) == 0, "".join(lines)[-3000:]
        assert "shut down" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_generate_tp_prints_once_and_equals_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m decodekit generate ... --tp``: rank 0 prints the text
    and the summary once (the other rank is quiet), and the greedy text is one process's."""
    model = _save("llama", tmp_path / "model")  # (a saved qwen2 folder reloads the word tokenizer as Qwen2's)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    args = ["generate", "w5 w6 w7", "--model", str(model), "--temperature", "0", "--max-new-tokens", "8",
            "--no-stream"]
    one = subprocess.run([sys.executable, "-m", "decodekit", *args], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=240)
    tp = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "decodekit", *args, "--tp"],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0 and tp.returncode == 0, one.stderr[-2000:] + tp.stderr[-4000:]
    summaries = [line for line in tp.stdout.splitlines() if line.startswith("[") and "tokens/s" in line]
    assert len(summaries) == 1 and "8 tokens" in summaries[0], tp.stdout
    assert tp.stdout.splitlines()[0] == one.stdout.splitlines()[0], (tp.stdout, one.stdout)
