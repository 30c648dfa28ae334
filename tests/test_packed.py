"""Packed verification windows and grouped key/value heads on a CPU.

- A speculative window whose rows draft different lengths (and with a free slot between
  them) runs packed: only its real tokens go through the model (:mod:`decodekit.engine.attention`).
  Every architecture, both cache kinds: greedy tokens equal transformers' ``generate`` and
  the raw logprobs of sampled requests equal a cache-free transformers forward.
- The grouped-heads attention equals transformers' own SDPA function.
- Negative control: a model whose layers mix batch rows outside attention fails the
  runner's check and keeps padded windows (and still decodes exactly).
- The draft plan of a packed window gives each row its own length; ``WindowCost.packed``.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from _models import VOCAB, hf_greedy, tiny_model, word_tokenizer

from decodekit import DraftModel, NGramDraft, SamplingParams, TokenGenerator
from decodekit.engine.attention import _sdpa
from decodekit.speculative.policy import DraftPolicy, WindowCost

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3"]
FLAT = {1: 1.0, 13: 1.0, (4, 1): 1.0, (4, 13): 1.0, (4, 13, 16): 1.0}  # drafting always pays


def _grids(model: torch.nn.Module) -> tuple[list[tuple[int, int, int]], object]:
    """``(rows, width, tokens)`` of every packed forward of ``model`` (from its input and mask)."""
    seen: list[tuple[int, int, int]] = []

    def hook(_m, args, kw):
        ids, mask = kw.get("input_ids"), kw.get("attention_mask")
        mask = next(iter(mask.values())) if isinstance(mask, dict) else mask
        if ids is not None and mask is not None and mask.shape[0] * mask.shape[2] != ids.numel():
            seen.append((mask.shape[0], mask.shape[2], ids.shape[1]))
    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def _hf_logprobs(model, tokens: list[int], n_prompt: int) -> list[float]:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), -1)
    return [lp[p - 1, tokens[p]].item() for p in range(n_prompt, len(tokens))]


def _repeating_prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Prompts that repeat a phrase (prompt lookup drafts from them, by different lengths)."""
    out = []
    for i in range(n):
        phrase = [rng.randrange(3, VOCAB) for _ in range(4 + 3 * i)]
        out.append(phrase * 3 + phrase[: i + 1])
    return out


@pytest.mark.parametrize("kv_cache", ["paged", "slots"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_windows_decode_as_transformers(arch, kv_cache, one_thread):
    model = tiny_model(arch)
    rng = random.Random(arch + kv_cache)
    prompts = _repeating_prompts(rng, 4)
    # the target as its own draft model, every row drafting all its budget allows (fewer near
    # its end: different lengths); the free slot 1 is a row of the grids after the first step
    gen = TokenGenerator(copy.deepcopy(model), word_tokenizer(), max_batch_size=4, max_seq_len=96,
                         draft=DraftModel(copy.deepcopy(model), k=12), adaptive_k=False, kv_cache=kv_cache)
    assert gen.runner.packs_windows
    seen, handle = _grids(gen.runner.model)
    params = [SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True),  # leaves a free slot
              SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True, seed=5, logprobs=0),
              SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, logprobs=0)]
    ctxs = [gen.new_context(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    try:
        live = dict(enumerate(ctxs))
        while live:
            gen.next_token({c.request_id: c for c in live.values()})
            for i in [i for i, c in live.items() if c.is_done]:
                gen.release(live.pop(i))
    finally:
        handle.remove()
    assert gen.spec_stats.accepted > 0
    # ragged windows ran packed (their tokens rounded up to a multiple of 8), some after the
    # request in slot 1 left: a free row inside the grid
    assert seen and all(t % 8 == 0 and t < rows * width for rows, width, t in seen), seen
    assert gen.runner.packs_windows and any(rows == 4 for rows, _w, _t in seen), seen
    for i in (0, 3):
        assert ctxs[i].generated_token_ids == hf_greedy(model, prompts[i], 16), i
    for i in (0, 2, 3):
        got = [x for lp in ctxs[i].logprobs for x in lp.token_log_probabilities]
        want = _hf_logprobs(model, ctxs[i].tokens, len(prompts[i]))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("heads, kv_heads, q", [(6, 2, 1), (6, 2, 4), (4, 4, 3), (8, 1, 2)])
def test_grouped_heads_attention_equals_transformers_sdpa(heads, kv_heads, q):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    g = torch.Generator().manual_seed(heads * 10 + q)
    B, D, kv = 3, 16, 40
    query = torch.randn(B, heads, q, D, generator=g)
    key, value = torch.randn(B, kv_heads, kv, D, generator=g), torch.randn(B, kv_heads, kv, D, generator=g)
    mask = torch.zeros(B, 1, q, kv + 8)  # wider than the keys, as a model's may be
    mask[..., 30:] = torch.finfo(torch.float32).min
    mask[1, ..., :5] = torch.finfo(torch.float32).min
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = heads // kv_heads, True, False
    want, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask[..., :kv], scaling=0.3)
    got, _ = _sdpa(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.shape == (B, q, heads, D)


def test_a_model_mixing_rows_outside_attention_keeps_padded_windows(one_thread):
    """Negative control for the runner's check: a layer that mixes the rows of a batch (as a
    mixture of experts with a token capacity can) sees one row in a packed forward and
    several padded; the check finds the difference, windows stay padded, and a request
    alone still decodes as transformers does."""
    def mixing(model):
        def pre(_m, args, kw):
            h = kw.get("hidden_states", args[0] if args else None)
            h = h + 0.5 * h.mean(0, keepdim=True)
            if "hidden_states" in kw:
                return args, {**kw, "hidden_states": h}
            return (h, *args[1:]), kw
        model.model.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
        return model

    model = mixing(copy.deepcopy(tiny_model("llama")))  # (the cached model stays as it is)
    gen = TokenGenerator(mixing(copy.deepcopy(tiny_model("llama"))), word_tokenizer(), max_batch_size=3,
                         max_seq_len=96, draft=NGramDraft(n=2, k=6), window_cost=FLAT)
    assert not gen.runner.packs_windows
    control = TokenGenerator(tiny_model("llama"), word_tokenizer(), max_batch_size=3, max_seq_len=96,
                             draft=NGramDraft(n=2, k=6), window_cost=FLAT)
    assert control.runner.packs_windows  # the same model without the mixing layer packs
    prompt = _repeating_prompts(random.Random(3), 2)[1]
    ctx = gen.new_context(prompt, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True), "a")
    while not ctx.is_done:
        gen.next_token({"a": ctx})
    assert ctx.generated_token_ids == hf_greedy(model, prompt, 12)


def test_packed_plan_gives_each_row_its_own_length():
    """A packed window prices each row's drafts by the tokens they add: a request that copies
    (its drafter is confident: h 0.9, runs go on with 0.9) drafts all 8 while the others (h
    0.05) draft only what the runner's rounding to a multiple of 8 tokens carries anyway
    (4 + 8 = 12 -> 16: four tokens; with a cap of 3, 4 + 3 -> 8: one): (4 + 5.2) / 2.0
    expected tokens per unit, where a token beyond those adds 0.05 for ~0.06. Padded, every
    row is as wide as the longest anyway, so they all draft the same, and less: every
    position costs four rows."""
    cost = WindowCost({1: 1.0, 2: 1.05, 9: 1.8, (4, 1): 1.5, (4, 2): 1.9, (4, 4): 2.3, (4, 9): 3.4,
                       (4, 2, 5): 1.6, (4, 4, 7): 1.75, (4, 9, 12): 2.0})
    slots, caps = [0, 1, 2, 3], [8, 8, 8, 8]
    sure = [True, False, False, False]  # row 0's drafter is confident: h >= 0.9
    packed = DraftPolicy(8, 0.0, cost, prior=(0.05, 0.9)).plan(slots, caps, sure, packed=True)
    assert packed[0] == 8 and sum(packed[1:]) == 4, packed
    padded = DraftPolicy(8, 0.0, cost, prior=(0.05, 0.9)).plan(slots, caps, sure)
    assert padded == padded[:1] * 4 and 0 < padded[0] < 8, padded
    # caps bound each row; nobody sure: nothing pays
    capped = DraftPolicy(8, 0.0, cost, prior=(0.05, 0.9)).plan(slots, [3, 8, 8, 8], sure, packed=True)
    assert capped[0] == 3 and sum(capped[1:]) == 1, capped
    assert DraftPolicy(8, 0.0, cost, prior=(0.05, 0.9)).plan(slots, caps, [False] * 4, packed=True) == [0] * 4


def test_window_cost_packed_interpolates_by_tokens():
    cost = WindowCost({1: 1.0, (8, 1): 2.0, (8, 17): 5.5, (8, 17, 24): 3.0})
    assert cost.packed(8, 17, 24) == pytest.approx(3.0)
    assert cost.packed(8, 17, 136) == pytest.approx(5.5)
    assert cost.packed(8, 17, 80) == pytest.approx(3.0 + 2.5 * (80 - 24) / (136 - 24))
    assert cost.packed(8, 1, 8) == pytest.approx(2.0) and cost.packed(1, 5, 5) == pytest.approx(cost(1, 5))
    assert WindowCost(cost.table()).packed(8, 17, 80) == pytest.approx(cost.packed(8, 17, 80))
    assert WindowCost({1: 1.0, (8, 17): 5.5}).packed(8, 17, 24) == pytest.approx(5.5)  # no packed points
    with pytest.raises(ValueError, match="window_cost"):
        WindowCost({1: 1.0, (8, 17, 30): 3.0})  # a packed key is (rows, width, rows + width - 1)
    # the sampler's work per position and row, relative to the one-token forward
    cells = WindowCost({1: 2.0, "cell": 0.02})
    assert cells.sampling(8, 17) == pytest.approx(0.01 * 136)
    assert WindowCost(cells.table()).cell == pytest.approx(0.01)
    with pytest.raises(ValueError, match="cell"):
        WindowCost({1: 1.0, "cell": -0.1})


def test_the_samplers_work_shortens_packed_drafts():
    """Every row of a window is sampled at the longest draft's width: with that work priced
    (a "cell" cost), one confident row's draft stops paying for the sampling of seven other
    rows at its width (8 x 9 cells x 0.01 = 0.72 one-token forwards), while a small cell cost
    leaves the plan as it was."""
    table = {1: 1.0, 9: 1.8, (8, 1): 1.9, (8, 9): 4.0, (8, 9, 16): 2.4}
    slots, caps, sure = list(range(8)), [8] * 8, [True] + [False] * 7

    def plan(cell: float) -> list[int]:
        return DraftPolicy(8, 0.0, WindowCost({**table, "cell": cell}), prior=(0.05, 0.8)).plan(
            slots, caps, sure, packed=True)
    assert plan(0.0) == plan(0.002) == [8] + [0] * 7
    assert plan(0.01) == [0] * 8


def test_packed_plan_weighs_each_width_on_its_own():
    """The window's width is a step in its cost: here the confident row's second token
    (expects 0.45) would make the grid, and the sampler's work, one position wider for all
    eight rows, while the seven other rows' first tokens (0.12 each) fit the two-position
    grid the first token already opened: every row drafts one. (Taking tokens in order of
    their gain alone priced those seven at the wider grid and drafted [3, 1, ..., 1].)"""
    table = {1: 1.0, 2: 1.0, 3: 1.06, 4: 1.42, (8, 1): 1.92, (8, 2): 2.02, (8, 4): 2.43, (8, 2, 9): 1.98,
             (8, 4, 11): 2.23}
    policy = DraftPolicy(4, 0.0, WindowCost(table), prior=(0.12, 0.5))
    assert policy.plan(list(range(8)), [4] * 8, [True] + [False] * 7, packed=True) == [1] * 8
