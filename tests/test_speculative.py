"""Speculative decoding in the generator, for each drafter (NGramDraft, DraftModel,
LayerSkipDraft): greedy outputs identical to non-speculative greedy (batched, joining
requests, penalties over the draft window), stops inside an accepted block, metrics,
draft = target accepting everything, and the embedded model."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import hf_greedy, tiny_model, word_tokenizer

from decodekit import DraftModel, LayerSkipDraft, NGramDraft, SamplingParams, TokenGenerator

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], list(range(10, 21)) * 2, [30, 31, 32, 30, 31],
           [40, 41, 42, 43, 40, 41]]


def near_copy(model, noise: float, seed: int = 0):
    """A draft that agrees with ``model`` often but not always: its weights plus noise."""
    torch.manual_seed(seed)
    draft = type(model)(copy.deepcopy(model.config)).eval()  # (deepcopy would copy hooks too)
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return draft


def make_draft(kind: str, model, k: int = 4):
    """One drafter of each kind for ``model`` (a 2-layer tiny model)."""
    if kind == "ngram":
        return NGramDraft(n=2, k=k)
    if kind == "model":
        return DraftModel(near_copy(model, 0.15), k=k)
    if kind == "self":
        return DraftModel(model, k=k)
    return LayerSkipDraft([1], k=k)


DRAFTERS = ["ngram", "model", "layerskip"]
CPU_COST = {1: 1.0, 2: 1.8, 17: 2.0, 64: 5.0}  # a fixed verification cost table: reproducible plans


def _run(gen, prompts, params, join_at=1):
    ctxs = [gen.new_context(p, sp) for p, sp in zip(prompts, params, strict=True)]
    running = {c.request_id: c for c in ctxs[:2]}
    waiting = list(ctxs[2:])
    step = 0
    while running or waiting:
        while waiting and step >= join_at and len(running) < gen.max_batch_size:
            c = waiting.pop(0)
            running[c.request_id] = c
        for rid, r in gen.next_token(running, num_steps=1 + step % 2).items():
            if r.is_done:
                gen.release(running.pop(rid))
        step += 1
    return ctxs


def test_ngram_proposals():
    d = NGramDraft(n=2, k=3)
    assert d.propose([1, 2, 3, 4, 1, 2]) == [3, 4, 1]
    assert d.propose([1, 2, 3, 9, 2]) == [3, 9, 2]  # falls back to a 1-token match
    assert d.propose([1, 2, 3]) == []
    assert d.propose([7, 7, 7, 7], k=2) == [7]  # the most recent match, even if short
    assert d.propose([4, 7, 7, 5, 4, 7], k=2) == [7, 5]
    with pytest.raises(ValueError, match="k"):
        NGramDraft(k=0)


@pytest.mark.parametrize("kind", DRAFTERS)
@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_greedy_identical_to_hf_with_joins(arch, kind):
    model = tiny_model(arch)
    # full-length drafts every step (the cost model would never draft with a same-size model)
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=3, max_seq_len=64,
                         draft=make_draft(kind, model), adaptive_k=False)
    news = [12, 9, 14, 10]
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in news]
    ctxs = _run(gen, PROMPTS, params)
    for c, n in zip(ctxs, news, strict=True):
        assert c.generated_token_ids == hf_greedy(model, c.prompt_token_ids, n)
    st = gen.spec_stats
    assert st.drafted > 0 and 0 <= st.accepted <= st.drafted
    assert st.mean_accepted_length == pytest.approx(1 + st.accepted / st.steps)


@pytest.mark.parametrize("kind", DRAFTERS)
def test_penalties_see_the_draft_window(kind):
    """Greedy with penalties is deterministic: speculation must give the same tokens, which
    needs each draft position's distribution to count the earlier drafts of its window and
    never the rejected ones."""
    model = tiny_model("llama")
    params = [SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True,
                             repetition_penalty=1.02, frequency_penalty=0.05, presence_penalty=0.02)
              for _ in PROMPTS]
    plain = TokenGenerator(model, word_tokenizer(), max_batch_size=3, max_seq_len=64)
    spec = TokenGenerator(model, word_tokenizer(), max_batch_size=3, max_seq_len=64,
                          draft=NGramDraft(n=1, k=4) if kind == "ngram" else make_draft(kind, model),
                          adaptive_k=False)
    want = [c.generated_token_ids for c in _run(plain, PROMPTS, params)]
    got = [c.generated_token_ids for c in _run(spec, PROMPTS, params)]
    assert got == want
    assert spec.spec_stats.drafted > 0 and spec.spec_stats.accepted > 0


@pytest.mark.parametrize("kind", ["ngram", "self", "layerskip"])
def test_stops_inside_an_accepted_block(kind):
    model = tiny_model("llama")
    tok = word_tokenizer()
    base = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    plain = TokenGenerator(model, tok, max_batch_size=2, max_seq_len=64)
    ref = _run(plain, PROMPTS[:1], [base])[0].generated_token_ids
    stop_tok = ref[5]
    cut = ref.index(stop_tok)
    draft = NGramDraft(n=1, k=6) if kind == "ngram" else make_draft(kind, model, k=6)
    spec = TokenGenerator(model, tok, max_batch_size=2, max_seq_len=64, draft=draft)
    c = _run(spec, PROMPTS[:1], [base.replace(stop_token_ids=[stop_tok])])[0]
    assert c.generated_token_ids == ref[: cut + 1] and c.finish_reason == "stop"
    c = _run(spec, PROMPTS[:1], [base.replace(max_new_tokens=7)])[0]
    assert c.generated_token_ids == ref[:7] and c.finish_reason == "length"
    words = tok.decode(ref[3:5]).strip()
    c = _run(spec, PROMPTS[:1], [base.replace(stop=[words])])[0]
    assert words not in c.text and c.finish_reason == "stop"
    assert len(c.generated_token_ids) <= 5


def test_speculation_per_request_switch_and_errors():
    model = tiny_model("llama")
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64,
                         draft=NGramDraft(n=2, k=3))
    ctx = gen.new_context(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=8,
                                                     ignore_eos=True))
    ctx.speculate = False
    while not ctx.is_done:
        gen.next_token({ctx.request_id: ctx})
    assert ctx.spec_stats.drafted == 0
    assert ctx.generated_token_ids == hf_greedy(model, PROMPTS[0], 8)
    with pytest.raises(TypeError, match="NGramDraft, DraftModel or LayerSkipDraft"):
        TokenGenerator(model, word_tokenizer(), draft="ngram")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        TokenGenerator(model, word_tokenizer(), draft=NGramDraft(), num_speculative_tokens=0)


@pytest.mark.parametrize("kind", DRAFTERS)
def test_sampled_requests_stay_valid_and_seeded(kind):
    """Sampling with speculation: tokens in range, reproducible for a seed."""
    model = tiny_model("llama")
    runs = []
    for _ in range(2):
        gen = TokenGenerator(model, word_tokenizer(), max_batch_size=3, max_seq_len=64,
                             draft=make_draft(kind, model, k=3), window_cost=CPU_COST)
        params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_new_tokens=10,
                                 ignore_eos=True) for s in range(4)]
        runs.append([c.generated_token_ids for c in _run(gen, PROMPTS, params)])
    assert runs[0] == runs[1]
    assert all(0 <= t < 320 for r in runs[0] for t in r) and all(len(r) == 10 for r in runs[0])


def test_embedded_model_copy_prompt(smollm):
    model, tok = smollm
    text = ("The quick brown fox jumps over the lazy dog. The dog was not amused, and it barked "
            "at the fox until the fox ran away into the forest, where it met a family of rabbits "
            "who invited it for tea.")
    prompt = [{"role": "user",
               "content": f"Repeat the following text exactly, word for word:\n\n{text}"}]
    out = {}
    for name, draft in (("plain", None), ("ngram", NGramDraft(n=3, k=5))):
        gen = TokenGenerator(model, tok, max_batch_size=1, max_seq_len=512, draft=draft)
        ctx = gen.new_context(prompt, SamplingParams(temperature=0, max_new_tokens=60))
        while not ctx.is_done:
            gen.next_token({ctx.request_id: ctx})
        out[name] = (ctx.generated_token_ids, gen.spec_stats)
    assert out["ngram"][0] == out["plain"][0]
    assert out["ngram"][1].acceptance_rate > 0.5 and out["ngram"][1].mean_accepted_length > 2


@pytest.fixture(scope="module")
def smollm():
    from decodekit import load

    return load()


# ----------------------------------------------------------------------------------------------
# End-to-end distribution: the joint law of the first three generated tokens
# ----------------------------------------------------------------------------------------------
E2E_V = 7
E2E_PROMPT = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]  # repetitive: the n-gram drafter always proposes


def _e2e_model():
    from _models import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=E2E_V)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(2.0)
    return model


def _exact_joint(model, params) -> torch.Tensor:
    """P(t1, t2, t3) from cache-free forwards and the sampler's processed distribution."""
    from decodekit import processed_probs

    V = E2E_V
    joint = torch.zeros(V, V, V, dtype=torch.float64)
    with torch.no_grad():
        def probs(seq):
            logits = model(torch.tensor([seq])).logits[:, -1].float()
            return processed_probs(logits, params)[0].double()

        p1 = probs(E2E_PROMPT)
        for a in range(V):
            if p1[a] == 0:
                continue
            p2 = probs(E2E_PROMPT + [a])
            for b in range(V):
                if p2[b] == 0:
                    continue
                joint[a, b] = p1[a] * p2[b] * probs(E2E_PROMPT + [a, b])
    return joint.flatten()


def _spec_samples(model, params, n: int, draft, rows: int) -> torch.Tensor:
    """First three tokens of ``n`` seeded requests, ``rows`` at a time (the draft policy
    off: always speculate)."""
    gen = TokenGenerator(model, word_tokenizer(E2E_V), max_batch_size=32, max_seq_len=32,
                         draft=draft, adaptive_k=False)
    out = []
    seeds = iter(range(n))
    waiting = n
    running = {}
    while waiting or running:
        while waiting and len(running) < rows:
            c = gen.new_context(E2E_PROMPT, params.replace(seed=next(seeds)))
            running[c.request_id] = c
            waiting -= 1
        for rid, r in gen.next_token(running).items():
            if r.is_done:
                c = running.pop(rid)
                gen.release(c)
                out.append(c.generated_token_ids[:3])
    assert gen.spec_stats.drafted > 0 and 0 < gen.spec_stats.accepted < gen.spec_stats.drafted
    t = torch.tensor(out)
    return t[:, 0] * E2E_V * E2E_V + t[:, 1] * E2E_V + t[:, 2]


def _joint_pvalue(samples: torch.Tensor, expected: torch.Tensor) -> float:
    from scipy import stats

    obs = torch.bincount(samples, minlength=expected.numel()).double()
    if bool((obs[expected == 0] > 0).any()):
        return 0.0
    exp = expected * obs.sum()
    big = exp >= 5
    o = torch.cat([obs[big], obs[~big].sum(0, keepdim=True)])
    e = torch.cat([exp[big], exp[~big].sum(0, keepdim=True)])
    keep = e > 0
    return float(stats.chisquare(o[keep].numpy(), (e[keep] * o[keep].sum() / e[keep].sum()).numpy())
                 .pvalue)


def e2e_pvalue(n: int, broken: bool, monkeypatch, draft_of=None, rows: int = 32) -> float:
    """Chi-square p-value of the speculative joint law of three tokens against the exact
    one; ``broken``: the negative control (resample from p after a rejection).
    ``draft_of(model)`` makes the drafter (default: n-gram, which always proposes here)."""
    import decodekit.sampling.reference as ref  # point-mass drafts on the CPU: its fused path
    import decodekit.sampling.sampler as G  # Sampler.verify calls this module's verify
    from decodekit.sampling import verify_reference

    if broken:
        monkeypatch.setattr(G, "verify", lambda *a, **k: verify_reference(*a, residual="p"))
        fused = ref.verify_point_masses_from_logits
        monkeypatch.setattr(ref, "verify_point_masses_from_logits",
                            lambda *a, **k: fused(*a, **k, residual="p"))
    model = _e2e_model()
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=3, ignore_eos=True)
    draft = NGramDraft(n=2, k=3) if draft_of is None else draft_of(model)
    return _joint_pvalue(_spec_samples(model, params, n, draft, rows), _exact_joint(model, params))


@pytest.mark.slow
def test_joint_distribution_of_three_tokens_matches_target(monkeypatch):
    assert e2e_pvalue(40_000, False, monkeypatch) > 1e-4


@pytest.mark.slow
def test_joint_distribution_negative_control_is_rejected(monkeypatch):
    assert e2e_pvalue(40_000, True, monkeypatch) < 1e-6


@pytest.mark.parametrize("mode", ["raw", "processed"])
@pytest.mark.parametrize("kind", ["ngram", "model"])
def test_logprobs_on_speculative_steps_match_plain_decoding(kind, mode):
    model = tiny_model("llama")
    params = [SamplingParams(temperature=0, max_new_tokens=14, ignore_eos=True, logprobs=n,
                             repetition_penalty=1.1) for n in (2, 0, None, 3)]
    runs = []
    for draft in (None, make_draft(kind, model)):
        gen = TokenGenerator(model, word_tokenizer(), max_batch_size=3, max_seq_len=64, draft=draft,
                             logprobs_mode=mode, adaptive_k=False)
        runs.append((_run(gen, PROMPTS, params), gen.spec_stats))
    (plain, _), (spec, st) = runs
    assert st.accepted > 0
    for a, b, sp in zip(plain, spec, params, strict=True):
        assert a.generated_token_ids == b.generated_token_ids
        if sp.logprobs is None:
            assert a.logprobs == [] and b.logprobs == []
            continue
        assert len(b.logprobs) == len(a.logprobs) == 14
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            torch.testing.assert_close(torch.tensor(y.token_log_probabilities),
                                       torch.tensor(x.token_log_probabilities), atol=1e-4, rtol=0)
            assert set(y.top_log_probabilities[0]) == set(x.top_log_probabilities[0])


def _scan_oracle(cfg: NGramDraft, toks: list[int], k: int, anchor: int | None) -> tuple[list[int], int]:
    """The proposal and agreement by brute force: every occurrence of the longest matching
    suffix, the continuation nearest to the anchor within [-BACK, +AHEAD] (ties: the later)
    else the latest; the agreement is how far back the tokens before it equal the last ones."""
    from decodekit.speculative.ngram import AHEAD, BACK, MAX_AGREEMENT

    L = len(toks)
    for m in range(min(cfg.n, L - 1), cfg.min_n - 1, -1):
        conts = [i + m for i in range(L - m) if toks[i:i + m] == toks[L - m:]]
        if conts:
            near = [] if anchor is None else [c for c in conts if anchor - BACK <= c <= anchor + AHEAD]
            c = max(near, key=lambda c: (-abs(c - anchor), c)) if near else conts[-1]
            ag = max(t for t in range(0, MAX_AGREEMENT + 1) if t <= c and toks[c - t:c] == toks[L - t:])
            return toks[c:c + min(k, cfg.k)], ag
    return [], 0


def test_ngram_match_agreement_anchor_and_confidence():
    """NGramIndex.match equals the brute-force lookup (proposal and agreement, with and
    without an anchor) on random streams that copy their source; the drafter is confident on a
    long agreement only."""
    import random

    from decodekit.speculative.base import DraftRequest
    from decodekit.speculative.ngram import CONFIDENT_AGREEMENT, NGramIndex

    rng = random.Random(1)
    anchored = 0
    for _ in range(300):
        cfg = NGramDraft(n=rng.randint(1, 4), k=6)
        src = [rng.randrange(5) for _ in range(rng.randint(1, 60))]
        toks = src + [rng.randrange(5) for _ in range(rng.randint(0, 5))] + src[: rng.randint(1, len(src))]
        idx = NGramIndex(cfg)
        idx.extend(toks)
        for anchor in (None, rng.randrange(len(toks) + 10)):
            m = idx.match(6, anchor)
            assert (m.tokens, m.agreement) == _scan_oracle(cfg, toks, 6, anchor), (toks, anchor)
            assert m.tokens == cfg.propose(toks, 6, anchor)
            anchored += anchor is not None and m.tokens != idx.match(6).tokens
    assert anchored > 20  # the anchor changes the answer often
    drafter = NGramDraft(n=3, k=8).build(type("R", (), {"device": torch.device("cpu")})(), None)
    text = list(range(100, 140))
    assert drafter.confident(0, text + [7] + text[:CONFIDENT_AGREEMENT])  # copying the source again
    assert not drafter.confident(1, text + [7] + text[:2])
    # evidence classes: 2 * min(agreement, 4) - 1, + 1 at the anchor; 0 without a match
    assert drafter.evidence(2, text + [7] + text[:2]) == 3
    assert drafter.evidence(3, text + [7] + text[:CONFIDENT_AGREEMENT + 3]) == 2 * CONFIDENT_AGREEMENT - 1
    assert drafter.evidence(4, text + [7, 8]) == 0
    drafter.anchors[5] = (1, len(text) + 2)  # copying from position 1 when the request had 42 tokens
    assert drafter.evidence(5, text + [7, 100, 101]) == 2 * 2 - 1 + 1  # "100 101" continues at 2: near
    drafter.anchors[6] = (30, len(text) + 2)
    assert drafter.evidence(6, text + [7, 100, 101]) == 2 * 2 - 1  # the anchor points elsewhere
    # what a draft can hold: nothing without a match, k at most, what is left of the source near the end
    assert drafter.available(4, text + [7, 8]) == 0
    assert drafter.available(2, text + [7] + text[:2]) == 8  # 38 tokens of the source left: k
    tail = text + [7] + text[-3:]  # "137 138 139" matched where the text ends: 4 tokens follow it
    assert drafter.available(7, tail) == 4
    assert drafter.propose([DraftRequest(7, tail, 8)], [0]).lengths == [4]  # what the draft then holds


def test_ngram_anchor_follows_the_source_through_a_correction():
    """A request copying a passage replaces a token (a spelling fix): the next short suffix
    occurs all over the passage, and the anchored lookup takes the occurrence where the copy
    stands, where the latest occurrence would jump ahead."""
    from decodekit.speculative.base import DraftRequest

    THE, FIX = 1, 99
    src = [10, 11, 12, THE, 13, 14, 15, 16, THE, 17, 18, 19, THE, 20, 21]
    prompt = [5, 6] + src + [7, 8]
    drafter = NGramDraft(n=3, k=8).build(type("R", (), {"device": torch.device("cpu")})(), None)
    drafter.admit([0], [prompt], [None])
    copy = [10, 11]  # the model copies 10, 11, then writes FIX for 12
    d = drafter.propose([DraftRequest(0, prompt + copy, 8)], [len(prompt) + 1])
    assert d.tokens[0, : d.lengths[0]].tolist() == [12, THE, 13, 14, 15, 16, THE, 17]
    # verified: first draft token rejected, FIX emitted instead; the model then writes THE
    drafter.committed([DraftRequest(0, prompt + copy, 8)], [0], d.tokens.shape[1])
    seen = prompt + copy + [FIX, THE]
    d = drafter.propose([DraftRequest(0, seen, 8)], [len(seen) - 1])
    assert d.tokens[0, : d.lengths[0]].tolist() == [13, 14, 15, 16, THE, 17, 18, 19]
    assert NGramDraft(n=3, k=8).propose(seen) == [20, 21, 7, 8, 10, 11, FIX, THE]  # latest: elsewhere


def test_ngram_rejected_guess_does_not_move_the_anchor():
    """A request copies a list whose lines share words (the model rewrites one line's end): a
    one-token match (THEM) proposes the continuation of another line, which is rejected; the
    next lookup (WITH) still takes the occurrence where the copy stands. The control, a
    drafter that anchors at every draft (the old rule), follows the wrong guess."""
    from decodekit.speculative.base import DraftRequest

    THEM, WITH = 1, 2
    line1 = [10, 11, 12, 13, 14]
    line2 = [20, 21, 22, WITH, 23, 24, 25]  # "toss the slices with olive oil"
    line3 = [30, 38, 39, 44, 45, 46, THEM, 31, 32, 33, 34, 35, 36, 37]  # "... spread them in a layer"
    line4 = [40, WITH, 41, 42, 43]  # "sprinkle with rosemary"
    prompt = [5, 6] + line1 + line2 + line3 + line4 + [7]

    def run(old_rule: bool) -> list[int]:
        drafter = NGramDraft(n=3, k=8).build(type("R", (), {"device": torch.device("cpu")})(), None)
        drafter.admit([0], [prompt], [None])
        seen = prompt + line1 + [20]  # copied line 1 and the start of line 2
        req = DraftRequest(0, seen, 8)
        d = drafter.propose([req], [len(seen) - 1])
        assert d.tokens[0, :2].tolist() == [21, 22]
        drafter.committed([req], [1], d.tokens.shape[1])  # 21 accepted, then THEM (not 22)
        seen = seen + [21, THEM]
        req = DraftRequest(0, seen, 8)
        d = drafter.propose([req], [len(seen) - 1])
        assert d.tokens[0, : d.lengths[0]].tolist()[:2] == [31, 32]  # line 3's continuation of THEM
        drafter.committed([req], [0], d.tokens.shape[1])  # rejected: the model writes WITH
        if old_rule:  # anchored at the rejected draft's source
            drafter.anchors[0] = (prompt.index(31), len(seen))
        seen = seen + [WITH]
        d = drafter.propose([DraftRequest(0, seen, 8)], [len(seen) - 1])
        return d.tokens[0, : d.lengths[0]].tolist()

    assert run(old_rule=False)[:3] == [23, 24, 25]  # line 2, where the copy stands
    assert run(old_rule=True)[:3] == [41, 42, 43]  # line 4: dragged by the wrong guess


def test_ngram_index_agrees_with_the_scan():
    """The per-request index gives NGramDraft.propose's answer (the plain scan, the oracle)
    on random token streams grown a few tokens at a time, after truncations and after a
    stream that is not a continuation; a control index fed other tokens disagrees."""
    import random

    from decodekit.speculative.ngram import NGramIndex

    rng = random.Random(0)
    checked = disagree = 0
    for _ in range(60):
        cfg = NGramDraft(n=rng.randint(1, 4), k=rng.randint(1, 8), min_n=1)
        idx, other = NGramIndex(cfg), NGramIndex(cfg)
        toks: list[int] = []
        for _ in range(40):
            toks += [rng.randrange(6) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.1:
                toks = toks[: rng.randint(0, len(toks))]
                idx.truncate(len(toks))
            if rng.random() < 0.05:
                toks = [rng.randrange(6) for _ in range(rng.randint(1, 20))]  # a new request
            idx.extend(toks)
            other.extend(toks[:-1] + [(toks[-1] + 1) % 6] if toks else [])
            anchor = rng.choice([None, rng.randrange(len(toks) + 4)])
            for k in (1, 3, 8):
                assert idx.propose(k, anchor) == cfg.propose(toks, k, anchor), (toks, k, anchor)
                checked += 1
                disagree += other.propose(k, anchor) != cfg.propose(toks, k, anchor)
    assert checked == 60 * 40 * 3 and disagree > 100


class _Words:
    """A stub tokenizer that decodes ids to fixed texts (for the drafter's token kinds)."""

    def __init__(self, texts: dict[int, str], vocab: int) -> None:
        self.texts, self.vocab = texts, vocab

    def __len__(self) -> int:
        return self.vocab

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return [self.texts.get(i[0], f" w{i[0]}") for i in ids]


def _lookup(texts: dict[int, str] | None, vocab: int = 200):
    """An NGramDraft drafter built on a stub runner (with a tokenizer of ``texts``, or none)."""
    tok = None if texts is None else _Words(texts, vocab)
    adapter = type("A", (), {"tokenizer": tok, "vocab_size": vocab})()
    runner = type("R", (), {"device": torch.device("cpu"), "adapter": adapter})()
    return NGramDraft(n=3, k=12).build(runner, None)


def _step(drafter, seen: list[int], accepted: int) -> list[int]:
    """One speculative step of slot 0: the draft for ``seen``, verified with ``accepted``
    tokens accepted."""
    from decodekit.speculative.base import DraftRequest

    req = DraftRequest(0, seen, 12)
    d = drafter.propose([req], [len(seen) - 1])
    out = [] if d is None else d.tokens[0, : d.lengths[0]].tolist()
    if d is not None:
        drafter.committed([req], [accepted], d.tokens.shape[1])
    return out


def test_token_kinds_from_the_tokenizer_texts():
    """A word is whitespace then a letter or digit, a part starts with one, the rest (line
    breaks, dashes, punctuation, special tokens) is layout; ids past the tokenizer are layout;
    no tokenizer, no kinds."""
    from decodekit.speculative.ngram import MARK, PART, WORD, token_kinds

    tok = _Words({0: " The", 1: "ding", 2: "\n", 3: "-", 4: ".", 5: " 42", 6: "<|im_end|>", 7: " ", 8: "é"},
                 9)
    assert token_kinds(tok, 11) == [WORD, PART, MARK, MARK, MARK, WORD, MARK, MARK, PART, MARK, MARK]
    assert token_kinds(object(), 4) is None
    # kept per tokenizer while its size holds: decoded once; a token added is decoded again
    calls = []
    decode = tok.batch_decode
    tok.batch_decode = lambda ids: calls.append(len(ids)) or decode(ids)
    assert token_kinds(tok, 11) is token_kinds(tok, 11) and calls == []
    tok.texts[9], tok.vocab = " and", 10
    assert token_kinds(tok, 11)[9] == WORD and calls == [10]


def test_ngram_learns_a_left_out_layout_span():
    """A request turns a dashed list into prose: the model writes the next line's first word
    where the source has a line break and a dash. The next draft continues that line, and the
    drafts after it skip the break and dash at every later line end (one window crosses two
    lines), while skipping stays right; once the model keeps a break, the skip misses and is
    dropped (the draft copies the break again). Without the learned skip (control: the drafter
    is told nothing of the rejection) the draft runs into the break."""
    NL, DASH, DOT = 2, 3, 4
    texts = {NL: "\n", DASH: "-", DOT: "."}
    lines = [[10 + 10 * i + j for j in range(4)] + [DOT] for i in range(5)]  # 5 lines of 4 words
    src = [x for ln in lines for x in [NL, DASH] + ln]
    prompt = [5, 6] + src + [7]
    drafter = _lookup(texts)
    drafter.admit([0], [prompt], [None])
    seen = prompt + lines[0][:2]  # the model copies line 1's first words
    assert _step(drafter, seen, 3) == lines[0][2:] + [NL, DASH] + lines[1] + [NL, DASH]
    seen += lines[0][2:] + [lines[1][0]]  # accepted up to the dot, then line 2's word for the break
    d = _step(drafter, seen, 12)
    assert d == lines[1][1:] + lines[2] + lines[3][:3]  # from line 2 on, the break and dash skipped
    skip = drafter.skips[0][0]
    assert skip.tokens == (NL, DASH) and (skip.hits, skip.misses) == (2, 0)  # both skips accepted
    seen += d + [lines[3][3]]
    d = _step(drafter, seen, 1)  # the model keeps a break this time: the token after the skip rejected
    assert d[:3] == [DOT] + lines[4][:2] and (skip.hits, skip.misses) == (2, 1)
    skip.misses = 3  # more misses than hits: no longer skipped
    fresh = _lookup(texts)
    fresh.admit([0], [prompt], [None])
    fresh.skips[0] = [skip]
    fresh.anchors[0] = (prompt.index(lines[3][3]), len(seen))
    assert _step(fresh, seen, 0)[:4] == [DOT, NL, DASH, lines[4][0]]
    control = _lookup(texts)  # told nothing of the rejection: runs into the break
    control.admit([0], [prompt], [None])
    assert _step(control, prompt + lines[0] + [lines[1][0]], 0)[3:6] == [DOT, NL, DASH]


def test_ngram_does_not_learn_to_skip_words():
    """A model that leaves a word out moves the anchor past it, but the word is not skipped in
    later drafts (only layout spans are); without token kinds any span is learned."""
    words = [20, 21, 22, 23, 24, 25, 21, 26, 27, 28, 29, 30, 31, 32, 33]
    prompt = [5, 6] + words + [7]
    for texts, learned in (({}, False), (None, True)):
        drafter = _lookup(texts)
        drafter.admit([0], [prompt], [None])
        seen = prompt + words[:2]
        assert _step(drafter, seen, 1)[:2] == [22, 23]  # 22 accepted, 23 rejected
        seen += [22, 24]  # the model left 23 out
        assert _step(drafter, seen, 2)[:3] == [25, 21, 26]  # the copy resumes after 24
        assert bool(drafter.skips.get(0)) is learned


def test_ngram_resyncs_after_a_corrected_word():
    """A spelling fix: the source has " bul" "ding" where the model writes " building" (not in
    the source). With token kinds the next draft continues at the source's next word (" has
    four ..."); punctuation written where the source has a word (an insertion) keeps the copy
    at that word. Without a tokenizer (control) there is no lookup hit after the fix."""
    THE, BUL, DING, HAS, FOUR, FLOORS, AND, TOP, BUILDING, DOT = 30, 31, 32, 33, 34, 35, 36, 37, 90, 4
    texts = {DING: "ding", DOT: "."}
    src = [40, 41, THE, BUL, DING, HAS, FOUR, FLOORS, AND, TOP, 42, 43, 44]
    prompt = [5, 6] + src + [7]
    for texts_, resync in ((texts, True), (None, False)):
        drafter = _lookup(texts_)
        drafter.admit([0], [prompt], [None])
        seen = prompt + [40, 41]
        assert _step(drafter, seen, 1)[:3] == [THE, BUL, DING]  # THE accepted, BUL rejected
        seen += [THE, BUILDING]
        d = _step(drafter, seen, 0)
        assert (d[:3] == [HAS, FOUR, FLOORS]) is resync
        if not resync:
            assert d == []
    drafter = _lookup(texts)
    drafter.admit([0], [prompt], [None])
    seen = prompt + [40, 41]
    assert _step(drafter, seen, 1)[:2] == [THE, BUL]
    seen += [THE, DOT]  # punctuation where the source's word BUL stands
    assert _step(drafter, seen, 0)[:3] == [BUL, DING, HAS]
