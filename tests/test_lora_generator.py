"""Per-request LoRA adapters in the generator, against peft (the oracle): mixed batches give
each row the tokens of ``PeftModel.generate`` with its adapter; rows without one are
bit-identical to a generator without LoRA support; adapters are pinned while a request names
them; the prefix cache never mixes adapters; speculation, steering and the LLM / CLI surfaces."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from _helpers import counting_capture
from _models import tiny_model, word_tokenizer
from _peft import save_adapter

from decodekit import LLM, NGramDraft, SamplingParams, Steering, TokenGenerator, steer
from decodekit.lora import LoRARequest, LoRAStatus

N = 24
PROMPTS = [[5, 9, 11, 5, 9, 17, 3, 40, 41, 42, 17, 3, 8, 8, 9, 100, 200, 31],
           [17, 3, 40, 41, 42, 17, 3, 77, 78, 79, 12, 13, 14, 5, 9, 11, 5, 9]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=N, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def base():
    return copy.deepcopy(tiny_model("llama"))


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_gen")
    a = save_adapter(base, root / "a", 1, std=0.08, r=8, target_modules=["q_proj", "v_proj"])
    b = save_adapter(base, root / "b", 2, std=0.08, r=4, lora_alpha=16, use_rslora=True,
                     target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])
    return {"a": (root / "a", a), "b": (root / "b", b)}


def _peft_greedy(oracle, prompt: list[int], n: int = N) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = oracle.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0,
                              disable_compile=True)
    return out[0, len(prompt):].tolist()


def _gen(model, adapters=None, **kw) -> TokenGenerator:
    gen = TokenGenerator(model, None, max_batch_size=kw.pop("max_batch_size", 6), max_seq_len=96, seed=0,
                         **kw)
    for name, (path, _) in (adapters or {}).items():
        res = gen.load_lora(name, path)
        assert res.status is LoRAStatus.SUCCESS, res.message
    return gen


def _run(gen, ctxs, num_steps: int = 4) -> None:
    while any(not c.is_done for c in ctxs):
        gen.next_token({c.request_id: c for c in ctxs if not c.is_done}, num_steps=num_steps)


def test_mixed_batch_matches_peft_and_plain_rows_are_bit_identical(base, adapters):
    gen = _gen(base, adapters, max_loras=2, max_lora_rank=8)
    rows = [None, "a", "b", "a"]
    ctxs = [gen.new_context(PROMPTS[i % 2], GREEDY, lora=name) for i, name in enumerate(rows)]
    _run(gen, ctxs)
    plain = _gen(base)  # no LoRA support at all, the same batch shape
    refs = [plain.new_context(PROMPTS[i % 2], GREEDY) for i in range(len(rows))]
    _run(plain, refs)
    ref = refs[0]
    assert ctxs[0].generated_token_ids == ref.generated_token_ids
    assert [lp.token_log_probabilities for lp in ctxs[0].logprobs] == \
        [lp.token_log_probabilities for lp in ref.logprobs]  # bit-identical
    for i, name in enumerate(rows[1:], 1):
        want = _peft_greedy(adapters[name][1], PROMPTS[i % 2])
        assert ctxs[i].generated_token_ids == want, (i, name)
    assert ctxs[1].generated_token_ids != ref.generated_token_ids  # the adapter matters here


def test_load_unload_statuses_and_pins(base, adapters, tmp_path):
    gen = _gen(base, max_loras=1, max_lora_rank=8)
    path_a, path_b = adapters["a"][0], adapters["b"][0]
    assert gen.load_lora("a", path_a).status is LoRAStatus.SUCCESS and gen.loras == ("a",)
    assert gen.load_lora("a", path_a).status is LoRAStatus.LOAD_NAME_EXISTS
    assert gen.load_lora("b", path_b).status is LoRAStatus.LOAD_ERROR  # the table is full
    assert gen.load_lora("c", tmp_path / "nowhere").status in (LoRAStatus.LOAD_INVALID_PATH,
                                                                LoRAStatus.LOAD_ERROR)
    assert gen.unload_lora("zzz").status is LoRAStatus.UNLOAD_NAME_NONEXISTENT
    with pytest.raises(ValueError, match="lora"):
        gen.new_context(PROMPTS[0], GREEDY, lora="b")
    ctx = gen.new_context(PROMPTS[0], GREEDY, lora="a")  # not admitted yet: already pinned
    assert gen.unload_lora("a").status is LoRAStatus.UNLOAD_ERROR
    gen.next_token({ctx.request_id: ctx})
    refused = gen.lora(LoRARequest("UNLOAD", "a"))  # (the operation's name in any case)
    assert refused.status is LoRAStatus.UNLOAD_ERROR and "in use by 1 live request" in refused.message
    _run(gen, [ctx])
    assert ctx.generated_token_ids == _peft_greedy(adapters["a"][1], PROMPTS[0])  # undisturbed
    assert gen.unload_lora("a").status is LoRAStatus.SUCCESS and gen.loras == ()
    assert gen.load_lora("b", path_b).status is LoRAStatus.SUCCESS  # the freed slot
    c2 = gen.new_context(PROMPTS[1], GREEDY, lora="b")
    gen.release(c2)  # cancelled before it ran: the pin goes too
    assert gen.unload_lora("b").status is LoRAStatus.SUCCESS
    no = _gen(base)
    assert no.load_lora("a", path_a).status is LoRAStatus.LOAD_ERROR
    with pytest.raises(ValueError, match="max_loras"):
        no.new_context(PROMPTS[0], GREEDY, lora="a")


def test_prefix_cache_never_serves_another_adapters_blocks(base, adapters):
    gen = _gen(base, adapters, max_loras=2, max_lora_rank=8, block_size=4)
    first = gen.new_context(PROMPTS[0], GREEDY)
    _run(gen, [first])
    a1 = gen.new_context(PROMPTS[0], GREEDY, lora="a")
    gen.next_token({a1.request_id: a1})
    assert gen.stats.prefix_hit_tokens == 0  # the unadapted prompt's blocks do not fit adapter a
    _run(gen, [a1])
    a2 = gen.new_context(PROMPTS[0], GREEDY, lora="a")
    gen.next_token({a2.request_id: a2})
    assert gen.stats.prefix_hit_tokens > 0  # the same adapter shares
    _run(gen, [a2])
    want = _peft_greedy(adapters["a"][1], PROMPTS[0])
    assert a1.generated_token_ids == a2.generated_token_ids == want


@pytest.mark.parametrize("kind", ["ngram", "layerskip"])
def test_speculation_keeps_each_rows_adapter(base, adapters, kind):
    from decodekit import LayerSkipDraft

    draft = NGramDraft(k=3, min_n=1) if kind == "ngram" else LayerSkipDraft(1, k=3)
    gen = _gen(base, adapters, max_loras=2, max_lora_rank=8, draft=draft, adaptive_k=False)
    rows = ["a", None, "b"]
    ctxs = [gen.new_context(PROMPTS[i % 2], GREEDY, lora=name) for i, name in enumerate(rows)]
    _run(gen, ctxs)
    assert gen.spec_stats.steps > 0
    for i, name in enumerate(rows):
        want = _peft_greedy(adapters[name][1], PROMPTS[i % 2]) if name else None
        if want is not None:
            assert ctxs[i].generated_token_ids == want, (kind, name)


def test_steering_and_lora_in_one_request(base, adapters):
    gen = _gen(base, adapters, max_loras=2, max_lora_rank=8)
    g = torch.Generator().manual_seed(4)
    vec = {0: 1.5 * torch.randn(base.config.hidden_size, generator=g)}
    ctx = gen.new_context(PROMPTS[1], GREEDY, lora="b", steering=Steering(vec, 1.0))
    _run(gen, [ctx])
    with steer(adapters["b"][1], vec, 1.0):
        want = _peft_greedy(adapters["b"][1], PROMPTS[1])
    assert ctx.generated_token_ids == want
    assert want != _peft_greedy(adapters["b"][1], PROMPTS[1])


def test_llm_and_cli_take_an_adapter(base, adapters, tmp_path):
    tok = word_tokenizer()
    llm = LLM(model=base, tokenizer=tok, max_batch_size=2, max_seq_len=96, max_loras=2, max_lora_rank=8)
    path = adapters["a"][0]
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    (out,) = llm.generate([PROMPTS[0]], params, lora=str(path))  # a folder: loaded under its path
    assert out.token_ids == _peft_greedy(adapters["a"][1], PROMPTS[0], 8)
    assert llm.generator.loras == (str(path),)
    (again,) = llm.generate([PROMPTS[0]], params, lora=str(path))  # already loaded: reused
    assert again.token_ids == out.token_ids and llm.generator.loras == (str(path),)
    with pytest.raises(ValueError, match="lora"):
        llm.generate([PROMPTS[0]], params, lora=str(tmp_path / "missing"))
    cli = [sys.executable, "-m", "decodekit", "generate", "x", "--lora"]
    r = subprocess.run([*cli, str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "lora" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    shutil.copytree(path, tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    r = subprocess.run([*cli, str(tmp_path / "bad")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "use_dora" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_adapted_batches_replay_the_hooked_graphs(base, adapters):
    """Decode graphs (simulated on CPU: captured forwards replayed on the same static buffers)
    captured before any adapter was loaded serve adapters loaded later: adapted batches replay
    the hooked set (LoRA on every target layer) and give peft's tokens."""
    replays = {"n": 0}
    counting = counting_capture(replays)
    gen = TokenGenerator(base, None, max_batch_size=4, max_seq_len=96, seed=0, cuda_graphs=False,
                         max_loras=2, max_lora_rank=8)
    gen.runner.enable_graphs(capture=counting)
    assert gen.runner.steered_graphs is not None and not gen.runner.steered_graphs.failed
    for name, (path, _) in adapters.items():
        assert gen.load_lora(name, path).ok
    rows = ["b", None, "a"]
    ctxs = [gen.new_context(PROMPTS[i % 2], GREEDY, lora=name) for i, name in enumerate(rows)]
    while any(not c.is_done for c in ctxs):
        gen.next_token({c.request_id: c for c in ctxs if not c.is_done}, num_steps=1)
    assert replays["n"] == N - 1
    for i, name in enumerate(rows):
        if name is not None:
            assert ctxs[i].generated_token_ids == _peft_greedy(adapters[name][1], PROMPTS[i % 2]), name


def test_idle_lora_support_leaves_the_layers_unhooked(base, adapters):
    """No adapted request: no hook on any layer (an idle LoRA-capable model runs as fast as a
    plain one); the hooks come with the first adapted request and go with the last."""
    q = base.model.layers[0].self_attn.q_proj
    gen = _gen(base, adapters, max_loras=2, max_lora_rank=8)
    assert not q._forward_hooks
    ctx = gen.new_context(PROMPTS[0], GREEDY, lora="a")
    gen.next_token({ctx.request_id: ctx})
    assert q._forward_hooks  # admitted with an adapter
    _run(gen, [ctx])
    assert not q._forward_hooks
