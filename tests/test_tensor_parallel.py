"""Tensor parallelism with transformers' own TP plan on CPU (gloo, ``torchrun
--nproc_per_node 2``): greedy, seeded, unseeded, forked, steered, n-gram speculative and
LoRA-adapted requests (mixed adapters, column- and row-wise layers; the Triton kernels in
interpreter mode and the torch path), joins and cancellations give the same tokens on both
ranks, equal to a single process (fp32); and configurations TP cannot run are refused with a
message saying what to change."""

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


def _save(arch: str, folder: Path, adapters: bool = False) -> Path:
    """The tiny model (and, with ``adapters``, two peft adapters of it: ``lora-a`` on q,v r=8,
    ``lora-b`` on q,k,o,down r=4 rsLoRA) saved to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    if adapters:
        from _peft import save_adapter

        save_adapter(model, folder / "lora-a", 1, std=0.08, r=8, target_modules=["q_proj", "v_proj"])
        save_adapter(model, folder / "lora-b", 2, std=0.08, r=4, lora_alpha=16, use_rslora=True,
                     target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])
    return folder


def _run(args: list[str], timeout: int = 240) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    r = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


@pytest.mark.parametrize("arch", [pytest.param("llama", marks=pytest.mark.slow), "qwen2"])  # qwen2: GQA
def test_two_ranks_agree_with_each_other_and_a_single_process(arch, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    model = _save(arch, tmp_path / "model", adapters=True)
    out = tmp_path / "out"
    out.mkdir()
    _run([torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), str(model), str(out)])
    _run([sys.executable, str(WORKER), str(model), str(out), "--single"])
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in ("0", "1", "single")]
    costs = [r.pop("window_cost") for r in ranks]  # timed on each rank: rank 0's must be everyone's
    assert costs[0] == costs[1], f"the ranks plan drafts with different window costs: {costs[:2]}"
    _check_lora_logits(ranks)
    assert ranks[0] == ranks[1], "the ranks diverged"
    assert ranks[0] == ranks[2], "tensor-parallel tokens differ from a single process"
    assert all(len(t) == 12 for t in ranks[0]["steered"]) and ranks[0]["steered"] != \
        [o[0] for o in ranks[0]["plain"]]


def _check_lora_logits(ranks: list[dict]) -> None:
    """One mixed forward [none, a, b, a]: Triton kernels (interpreter) and torch path on each
    rank equal the single process within fp32 summation order; without the row-wise all-reduce
    (negative control) the rows of adapter b (o, down: row-wise layers) are wrong, while the
    unadapted row and adapter a's rows (q, v: column-wise) are not touched by it."""
    import torch

    single = torch.tensor(ranks[2].pop("lora_logits_torch"))
    torch.testing.assert_close(torch.tensor(ranks[2].pop("lora_logits_triton")), single, atol=1e-4, rtol=0)
    assert single[1].sub(single[0]).abs().max() > 0.05 and single[2].sub(single[0]).abs().max() > 0.05, \
        "the adapters are too weak to show in the logits"
    for r in ranks[:2]:
        for backend in ("torch", "triton"):
            got = torch.tensor(r.pop(f"lora_logits_{backend}"))
            torch.testing.assert_close(got, single, atol=1e-4, rtol=0,
                                       msg=lambda m, b=backend: f"{b} LoRA logits under TP: {m}")
        bad = torch.tensor(r.pop("lora_logits_no_reduce"))
        torch.testing.assert_close(bad[[0, 1, 3]], single[[0, 1, 3]], atol=1e-4, rtol=0)
        assert bad[2].sub(single[2]).abs().max() > 0.05, "the negative control (no all-reduce) was not caught"
    for key in ("lora_one_rank", "lora_ngram_one_rank", "lora_skip_one_rank"):  # c: rank 0 read it, 1 not
        assert [r.pop(key) for r in ranks] == [["LOAD_ERROR", ["a", "b"]], ["LOAD_INVALID_PATH", ["a", "b"]],
                                               ["LOAD_INVALID_PATH", ["a", "b"]]]


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
        check_tensor_parallel(3, 4)
    check_tensor_parallel(2, 4)
    check_tensor_parallel(1, 3)


def test_serve_tp_rank0_serves_and_the_ranks_follow(tmp_path):
    """``torchrun --nproc_per_node 2 -m decodekit serve --tp``: rank 0 serves HTTP and sends
    each round's requests and cancellations to rank 1; seeded and greedy answers equal a
    single process's (also a request with a LoRA adapter loaded by ``--lora`` on both ranks),
    a stream dropped mid-way is cancelled on both ranks (the next answers are still right), and
    SIGTERM to rank 0 stops both ranks and torchrun with exit code 0."""
    import re
    import signal
    import threading

    import httpx
    import openai
    from _serving import start_server

    from decodekit import LLM, SamplingParams

    model = _save("llama", tmp_path / "model", adapters=True)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    args = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "decodekit", "serve", str(model), "--tp",
            "--port", "0", "--served-model-name", "tiny", "--max-batch-size", "4", "--max-seq-len", "96",
            "--shutdown-timeout", "30", "--lora", f"b={model / 'lora-b'}"]
    proc, url = start_server(args, TRITON_INTERPRET="1")
    lines = proc.lines
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        oracle = LLM(model=AutoModelForCausalLM.from_pretrained(model), max_loras=1, max_lora_rank=8,
                     tokenizer=AutoTokenizer.from_pretrained(model), max_batch_size=4, max_seq_len=96)
        prompts = ["w5 w6 w7", "w9 w10", "w40 w41 w42 w43", "w77", "w40 w41 w42 w43"]
        kw = [dict(temperature=0), dict(seed=3, top_p=0.9), dict(seed=4), dict(temperature=0),
              dict(temperature=0)]
        params = [SamplingParams(max_new_tokens=10, **k) for k in kw]
        want = [o.text for o in oracle.generate(prompts[:4], params[:4])]
        want += [oracle.generate(prompts[4], params[4], lora=str(model / "lora-b"))[0].text]
        assert want[4] != want[2], "the adapter does not change the greedy text: the test could not fail"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        got: dict[int, str] = {}

        def ask(i: int) -> None:
            extra = {"extra_body": {"lora": "b"}} if i == 4 else {}
            got[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10,
                                               **kw[i], **extra).choices[0].text
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "w8", "max_tokens": 80, "stream": True, "ignore_eos": True}) as r:
            next(r.iter_lines())  # one chunk, then the client leaves
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got.get(i) for i in range(5)] == want
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
