"""Guided decoding (structured output): the spec, the bitmask in the sampler (kernel and
reference, against xgrammar's own masking), and generation whose every output is checked by
an independent validator (jsonschema, re.fullmatch, a Lark parser, set membership).

Models: the embedded SmolLM2-135M (real outputs) and a tiny random llama over SmolLM2's
vocabulary (fast, and its outputs are anything the grammar allows)."""

from __future__ import annotations

import functools
import json
import math
import re

import jsonschema
import lark
import pytest
import torch
import xgrammar
from _helpers import bitmask_words
from _models import tiny_config
from conftest import KERNEL_DEVICE
from scipy import stats as sst
from transformers import AutoModelForCausalLM

from decodekit import GuidedDecodingParams, Sampler, SamplingParams, TokenGenerator, load
from decodekit.sampling import reference as ref


@functools.cache
def smollm():
    return load(device="cpu", dtype=torch.float32)


@functools.cache
def tiny_smol():
    """A tiny random llama over SmolLM2's vocabulary (fp32)."""
    _, tok = smollm()
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval(), tok


def _gen(model, tok, **kw) -> TokenGenerator:
    return TokenGenerator(model, tok, max_batch_size=kw.pop("max_batch_size", 8), max_seq_len=512,
                          seed=0, **kw)


def _run(gen: TokenGenerator, prompts, params) -> list:
    ctxs = [gen.new_context(p, pp) for p, pp in zip(prompts, params, strict=True)]
    batch = {c.request_id: c for c in ctxs}
    while any(not c.is_done for c in ctxs):
        gen.next_token({k: c for k, c in batch.items() if not c.is_done}, num_steps=8)
    return ctxs


# ----------------------------------------------------------------------------- the spec
def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="exactly one of"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="got regex, choice"):
        GuidedDecodingParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="json must be valid JSON"):
        GuidedDecodingParams(json="{not json")
    with pytest.raises(ValueError, match="choice"):
        GuidedDecodingParams(choice=[])
    with pytest.raises(ValueError, match="choice"):
        GuidedDecodingParams(choice="abc")
    with pytest.raises(ValueError, match="backend"):
        GuidedDecodingParams(regex="a", backend="outlines")
    with pytest.raises(ValueError, match="disable_any_whitespace"):
        GuidedDecodingParams(regex="a", disable_any_whitespace=1)
    with pytest.raises(ValueError, match="guided_decoding must be a GuidedDecodingParams"):
        SamplingParams(guided_decoding={"regex": "a"})
    a = GuidedDecodingParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    b = GuidedDecodingParams(json='{"properties": {"a": {"type": "integer"}}, "type": "object"}')
    assert a == b and hash(a) == hash(b) and a.mode == "json"
    assert hash(SamplingParams(guided_decoding=a)) == hash(SamplingParams(guided_decoding=b))
    assert GuidedDecodingParams(choice=["x", "y", "x"]).choice == ("x", "y")


def test_bad_specs_fail_at_new_context_naming_the_field():
    model, tok = tiny_smol()
    gen = _gen(model, tok)
    cases = {
        "guided_decoding.regex": GuidedDecodingParams(regex="(unclosed"),
        "guided_decoding.grammar": GuidedDecodingParams(grammar="root ::= undefined_rule"),
        "guided_decoding.json": GuidedDecodingParams(json={"type": "no-such-type"}),
        "whitespace_pattern": GuidedDecodingParams(json={"type": "object"}, whitespace_pattern=r"\s*"),
        "needs the xgrammar backend": GuidedDecodingParams(structural_tag={"type": "structural_tag"},
                                                            backend="llguidance"),
        "guided_decoding.regex does not compile": GuidedDecodingParams(regex="(x", backend="llguidance"),
    }
    for field, spec in cases.items():
        with pytest.raises(ValueError, match=re.escape(field)):
            gen.new_context("hi", SamplingParams(guided_decoding=spec))
    assert gen.running == {}
    with pytest.raises(ValueError, match="needs the generator's tokenizer"):
        _gen(model, None).new_context([5, 6], SamplingParams(guided_decoding=GuidedDecodingParams(regex="a")))


# ----------------------------------------------------------------------------- the sampler mask
def _random_allowed(B: int, V: int, seed: int, frac: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(B, V, generator=g) < frac
    allowed[:, 0] = True  # never empty
    return allowed


def test_bitmask_layout_is_xgrammars():
    allowed = _random_allowed(3, 100, 0)
    logits = torch.randn(3, 100)
    theirs = logits.clone()
    xgrammar.apply_token_bitmask_inplace(theirs, bitmask_words(allowed))
    assert torch.equal(theirs == -math.inf, ~allowed)
    assert torch.equal(ref.unpack_bitmask(bitmask_words(allowed), 100), allowed)


SETTINGS = [dict(temperature=0.0), dict(temperature=0.8, seed=1), dict(top_k=5, seed=2),
            dict(top_p=0.7, min_p=0.05, seed=3), dict(repetition_penalty=1.3, seed=4, logprobs=2),
            dict(typical_p=0.8, seed=5)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_probs_equal_xgrammar_masking_then_reference(backend):
    """Processed probabilities with the mask == xgrammar's apply_token_bitmask_inplace on the
    logits, then the plain reference; every drawn token is allowed; raw logprobs unchanged."""
    V, B = 333, len(SETTINGS)
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    s = Sampler(V, B, dev, backend=backend)
    plain = Sampler(V, B, "cpu", backend="torch")
    for b, kw in enumerate(SETTINGS):
        s.add(b, SamplingParams(**kw), [1, 2, 3])
        plain.add(b, SamplingParams(**kw), [1, 2, 3])
    slots = list(range(B))
    for step in range(3):
        logits = torch.randn(B, V, generator=torch.Generator().manual_seed(step)) * 3
        allowed = _random_allowed(B, V, 10 + step)
        mask = bitmask_words(allowed)
        masked = logits.clone()
        xgrammar.apply_token_bitmask_inplace(masked, mask)
        want = plain.probs(masked, slots)
        got = s.probs(logits.to(dev), slots, mask=mask.to(dev)).cpu()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        out = s.sample(logits.to(dev), slots, mask=mask.to(dev))
        tok = out.token_ids.cpu()
        assert allowed.gather(1, tok[:, None]).all()
        plain.sample(masked, slots)  # keep both samplers' counters in step
        if out.logprobs is not None:  # raw logprobs are the model's, not the masked ones
            raw = torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
            torch.testing.assert_close(out.logprobs.cpu(), raw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grammar_wins_when_nothing_else_is_allowed(backend):
    """The request's own masks allow only tokens the bitmask refuses: the bitmask wins
    (uniform-or-by-logit over its tokens), never a token outside it; otherwise the request's
    masks still apply inside the bitmask."""
    V = 64
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    s = Sampler(V, 2, dev, backend=backend)
    s.add(0, SamplingParams(temperature=0.0, allowed_token_ids=[5, 6]))
    s.add(1, SamplingParams(temperature=0.0, logit_bias={7: -math.inf}))
    allowed = torch.zeros(2, V, dtype=torch.bool)
    allowed[:, 7] = allowed[:, 8] = True
    logits = torch.zeros(2, V)
    logits[:, 7] = 5.0  # the model prefers 7
    tok = s.sample(logits.to(dev), [0, 1], mask=bitmask_words(allowed).to(dev)).token_ids.cpu().tolist()
    assert tok == [7, 8]  # row 0: grammar wins (argmax inside it); row 1: 7 banned by bias, 8 left


def test_unguided_rows_are_bit_identical_beside_guided_ones():
    V, B = 200, 4
    a, b = Sampler(V, B, "cpu", seed=0), Sampler(V, B, "cpu", seed=0)
    for i in range(B):
        a.add(i, SamplingParams(temperature=0.9, seed=i, logprobs=1))
        b.add(i, SamplingParams(temperature=0.9, seed=i, logprobs=1))
    allowed = _random_allowed(B, V, 3)
    allowed[1] = allowed[3] = True  # rows 1 and 3 unguided (all ones)
    for step in range(4):
        logits = torch.randn(B, V, generator=torch.Generator().manual_seed(step))
        ra = a.sample(logits, list(range(B)), mask=bitmask_words(allowed))
        rb = b.sample(logits, list(range(B)))
        for r in (1, 3):
            assert ra.token_ids[r] == rb.token_ids[r] and ra.logprobs[r] == rb.logprobs[r]


def test_masked_distribution_chi_square_with_negative_control():
    """Draws under a mask follow softmax restricted to the mask; the same test rejects the
    unmasked distribution (negative control)."""
    V, B, draws = 24, 64, 3200
    logits = torch.randn(V, generator=torch.Generator().manual_seed(7))
    allowed = _random_allowed(1, V, 8, frac=0.5)[0]
    s = Sampler(V, B, "cpu", seed=0)
    counts = torch.zeros(V)
    mask = bitmask_words(allowed[None].expand(B, V))
    for start in range(0, draws, B):
        for i in range(B):
            if start:
                s.remove(i)
            s.add(i, SamplingParams(temperature=1.0, seed=start + i))
        tok = s.sample(logits.expand(B, V).contiguous(), list(range(B)), mask=mask).token_ids
        counts += torch.bincount(tok, minlength=V).float()
    assert counts[~allowed].sum() == 0
    p_masked = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1)
    idx = allowed.nonzero().flatten()

    def pval(p: torch.Tensor) -> float:
        exp = p[idx] / p[idx].sum() * draws
        return sst.chisquare(counts[idx].numpy(), exp.numpy()).pvalue

    assert pval(p_masked) > 1e-3
    assert pval(torch.softmax(logits, -1)) < 1e-6 or pval(torch.full((V,), 1.0 / V)) < 1e-6


# ----------------------------------------------------------------------------- generation
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}},
        "required": ["name", "address"]},
    "enum_and_range": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["color", "size"]},
    "array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"]},
    "any_of": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}]}},
        "required": ["value"]},
}
REGEX = r"[a-z]{3,8}@[a-z]{2,6}\.(com|org)"
CHOICES = ["positive", "negative", "neutral"]
EBNF = 'root ::= "(" expr ")"\nexpr ::= num | num " + " num\nnum ::= [1-9] [0-9]?'
LARK_CHECK = lark.Lark('start: "(" expr ")"\nexpr: NUM | NUM " + " NUM\nNUM: /[1-9][0-9]?/')


def _check_output(spec: GuidedDecodingParams, text: str) -> None:
    if spec.json is not None:
        jsonschema.validate(json.loads(text), json.loads(spec.json))
    elif spec.regex is not None:
        assert re.fullmatch(spec.regex, text), text
    elif spec.choice is not None:
        assert text in spec.choice, text
    elif spec.grammar is not None:
        LARK_CHECK.parse(text)


def _specs() -> list[GuidedDecodingParams]:
    return ([GuidedDecodingParams(json=s) for s in SCHEMAS.values()]
            + [GuidedDecodingParams(regex=REGEX), GuidedDecodingParams(choice=CHOICES),
               GuidedDecodingParams(grammar=EBNF)])


@functools.cache
def _llg_tokenizer():
    import llguidance.hf

    model, tok = smollm()
    return llguidance.hf.from_tokenizer(tok, n_vocab=model.config.vocab_size)


def _llguidance_accepts(spec: GuidedDecodingParams, tokens: list[int]) -> None:
    """An independent matcher (llguidance) takes ``tokens`` one by one for the same spec and
    ends accepting."""
    import llguidance

    M = llguidance.LLMatcher
    if spec.json is not None:
        grammar = M.grammar_from_json_schema(spec.json, defaults={"whitespace_flexible": True})
    elif spec.regex is not None:
        grammar = M.grammar_from_regex(spec.regex)
    elif spec.choice is not None:
        grammar = M.grammar_from_regex("|".join(re.escape(c) for c in spec.choice))
    else:
        grammar = llguidance.grammar_from("gbnf", spec.grammar)
    m = M(_llg_tokenizer(), grammar, log_level=0)
    for i, t in enumerate(tokens):
        assert m.consume_token(t), (i, t, m.get_error())
    assert m.is_stopped() or m.is_accepting(), m.get_error()


@pytest.mark.parametrize("seeds", [1, pytest.param(20, marks=pytest.mark.slow)])
def test_every_output_validates_on_smollm(seeds):
    """Each spec, greedy and sampled (``seeds`` seeds), on the embedded SmolLM2: the output
    validates with an independent checker, llguidance's matcher accepts its tokens one by one,
    and the request stops (``"stop"``)."""
    model, tok = smollm()
    gen = _gen(model, tok, max_batch_size=16)
    prompt = [{"role": "user", "content": "Describe a person as JSON."}]
    jobs = [(spec, SamplingParams(temperature=0.0, max_new_tokens=120, guided_decoding=spec))
            for spec in _specs()]
    jobs += [(spec, SamplingParams(temperature=1.0, top_p=0.95, seed=s, max_new_tokens=120,
                                   guided_decoding=spec)) for spec in _specs() for s in range(seeds)]
    for i in range(0, len(jobs), 16):
        part = jobs[i:i + 16]
        for (spec, _), c in zip(part, _run(gen, [prompt] * len(part), [p for _, p in part]), strict=True):
            assert c.finish_reason == "stop", (spec.mode, c.text)
            _check_output(spec, c.text)
            _llguidance_accepts(spec, c.generated_token_ids)


def _xgrammar_accepts(gen: TokenGenerator, spec: GuidedDecodingParams, tokens: list[int]) -> None:
    """The reverse cross-check: xgrammar's matcher takes an llguidance-guided output."""
    g = gen.guidance.guide(spec.replace(backend="xgrammar"))
    for t in tokens:
        g.accept(t)
    # llguidance stops where nothing can follow, without an EOS: the grammar must be complete
    assert g.terminated or g.try_accept(gen.eos_token_ids[0]) and g.terminated


def test_llguidance_backend_outputs_validate_and_xgrammar_accepts_them():
    """backend='llguidance' (incl. whitespace_pattern, which xgrammar refuses): every output
    validates, and xgrammar's matcher accepts its tokens one by one. (xgrammar never writes
    properties a schema does not list; llguidance follows JSON Schema and may, unless
    ``disable_additional_properties``: set here so that both read the schemas alike.)"""
    model, tok = smollm()
    gen = _gen(model, tok)
    specs = [s.replace(backend="llguidance", disable_additional_properties=s.json is not None)
             for s in _specs()]
    specs.append(GuidedDecodingParams(json=SCHEMAS["enum_and_range"], backend="llguidance",
                                      whitespace_pattern=r"[ ]?"))
    prompt = [{"role": "user", "content": "Describe a person as JSON."}]
    params = [SamplingParams(temperature=0.7, seed=i, max_new_tokens=120, guided_decoding=s)
              for i, s in enumerate(specs)]
    for i in range(0, len(specs), 8):
        for spec, c in zip(specs[i:i + 8], _run(gen, [prompt] * len(params[i:i + 8]), params[i:i + 8]),
                           strict=True):
            assert c.finish_reason == "stop", (spec.mode, c.text)
            _check_output(spec, c.text)
            if spec.whitespace_pattern is None:
                _xgrammar_accepts(gen, spec, c.generated_token_ids)


def test_tiny_model_outputs_validate_and_mixed_batches_keep_unguided_rows():
    """A random model writes anything the grammar allows: still valid. The unguided
    requests of a mixed batch get the same tokens as in a batch without guided rows."""
    model, tok = tiny_smol()
    free = [SamplingParams(temperature=0.8, seed=3, max_new_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)]
    guided = [SamplingParams(temperature=0.7, seed=9, max_new_tokens=60, guided_decoding=s)
              for s in (GuidedDecodingParams(regex=REGEX), GuidedDecodingParams(choice=CHOICES),
                        GuidedDecodingParams(grammar=EBNF),
                        GuidedDecodingParams(json=SCHEMAS["enum_and_range"], disable_any_whitespace=True))]
    alone = _run(_gen(model, tok), ["hello there"] * 2, free)
    mixed = _run(_gen(model, tok), ["hello there"] * 6, free + guided)
    for a, m in zip(alone, mixed[:2], strict=True):
        assert a.generated_token_ids == m.generated_token_ids
    for c in mixed[2:]:
        assert c.finish_reason == "stop", c.text
        _check_output(c.params.guided_decoding, c.text)


def test_json_object_and_structural_tag_modes():
    """``json_object``: any JSON object; ``structural_tag``: a tag around a JSON value (SmolLM2)."""
    model, tok = smollm()
    tag = {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<answer>", "end": "</answer>",
        "content": {"type": "json_schema", "json_schema": {"type": "object", "required": ["ok"],
                                                           "properties": {"ok": {"type": "boolean"}}}}}}
    specs = [GuidedDecodingParams(json_object=True), GuidedDecodingParams(structural_tag=tag)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=120, guided_decoding=s) for s in specs]
    prompts = [[{"role": "user", "content": 'Return exactly this JSON: {"cat": "Tom", "age": 3}'}],
               [{"role": "user", "content": 'Answer exactly: <answer>{"ok": true}</answer>'}]]
    obj, tagged = _run(_gen(model, tok), prompts, params)
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict), obj.text
    m = re.fullmatch(r"<answer>(.*)</answer>", tagged.text, re.S)
    assert tagged.finish_reason == "stop" and m, tagged.text
    assert isinstance(json.loads(m.group(1))["ok"], bool)


def test_grammar_end_stops_even_with_ignore_eos_and_min_new_tokens():
    model, tok = tiny_smol()
    spec = GuidedDecodingParams(choice=["yes", "no"])
    for kw in (dict(ignore_eos=True), dict(min_new_tokens=20)):
        (c,) = _run(_gen(model, tok), ["q"], [SamplingParams(temperature=0.0, max_new_tokens=40,
                                                               guided_decoding=spec, **kw)])
        assert c.finish_reason == "stop" and c.text in ("yes", "no"), (kw, c.text)
        assert len(c.generated_token_ids) < 10


def _drafted(model, tok, prompts, params, draft) -> list:
    gen = _gen(model, tok, draft=draft, adaptive_k=False)
    return _run(gen, prompts, params), gen.spec_stats


def test_guided_speculation_is_exact_and_drafts_stay_inside_the_grammar():
    """Guided greedy output is token-identical with an n-gram drafter, a draft model and
    without one, and the drafters did draft (and get accepted) in guided rows; sampled guided
    rows with n-gram drafts validate. A repetitive regex gives the n-gram drafter matches."""
    from decodekit import DraftModel, NGramDraft

    model, tok = tiny_smol()
    spec = GuidedDecodingParams(regex="(ab ){4,12}(cd ){2,6}end")
    prompts = ["ab ab ab ab cd cd end ab ab"] * 2
    greedy = [SamplingParams(temperature=0.0, max_new_tokens=60, guided_decoding=spec)] * 2
    plain = _run(_gen(model, tok), prompts, greedy)
    torch.manual_seed(1)
    small = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok),
                                                         num_hidden_layers=1)).eval()
    for draft in (NGramDraft(k=4), DraftModel(small, k=3)):
        out, st = _drafted(model, tok, prompts, greedy, draft)
        assert [c.generated_token_ids for c in out] == [c.generated_token_ids for c in plain], draft
        # (a random draft model's unconstrained drafts rarely fit the grammar: cut to nothing)
        assert isinstance(draft, DraftModel) or (st.drafted > 0 and st.accepted > 0), (draft, st)
    sampled = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=60, guided_decoding=spec)
               for s in range(4)]
    out, st = _drafted(model, tok, prompts * 2, sampled, NGramDraft(k=4))
    assert st.drafted > 0
    for c in out:
        assert c.finish_reason == "stop"
        _check_output(spec, c.text)


def test_jump_forward_saves_steps_and_keeps_greedy_tokens():
    """Text the grammar forces (JSON keys and punctuation) enters as point-mass drafts: greedy
    tokens equal plain guided decoding, the outputs validate, and forced tokens were emitted
    (``stats.forced_tokens``: steps saved)."""
    from decodekit import NGramDraft

    model, tok = tiny_smol()
    schema = {"type": "object", "required": ["first_property_name", "second_property_name"],
              "properties": {"first_property_name": {"enum": ["red", "green"]},
                             "second_property_name": {"type": "integer", "minimum": 0, "maximum": 9}}}
    spec = GuidedDecodingParams(json=schema, disable_any_whitespace=True)
    params = [SamplingParams(temperature=0.0, max_new_tokens=80, guided_decoding=spec),
              SamplingParams(temperature=0.9, seed=4, max_new_tokens=80, guided_decoding=spec)]
    plain = _run(_gen(model, tok), ["json:"] * 2, params)
    gen = _gen(model, tok, draft=NGramDraft(k=8), adaptive_k=False)
    ctxs = [gen.new_context("json:", p) for p in params]
    forced = 0
    while any(not c.is_done for c in ctxs):
        gen.next_token({c.request_id: c for c in ctxs if not c.is_done}, num_steps=4)
        forced += gen.stats.forced_tokens
    assert ctxs[0].generated_token_ids == plain[0].generated_token_ids
    for c in ctxs:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), schema)
    assert forced >= 10, forced


def test_guided_with_steering_and_forks():
    """A steered guided request validates; forks of a guided request each validate (their
    matchers were forked)."""
    from decodekit import Steering, SteeringVector

    model, tok = tiny_smol()
    spec = GuidedDecodingParams(regex=REGEX)
    p = SamplingParams(temperature=0.0, max_new_tokens=40, guided_decoding=spec)
    gen = _gen(model, tok)
    vec = SteeringVector({0: torch.randn(model.config.hidden_size), 1: torch.randn(model.config.hidden_size)})
    c = gen.new_context("say an email", p, steering=Steering(vec, 4.0))
    while not c.is_done:
        gen.next_token({c.request_id: c}, num_steps=8)
    _check_output(spec, c.text)
    root = gen.new_context("x", SamplingParams(temperature=1.0, seed=1, max_new_tokens=40,
                                               guided_decoding=spec))
    kids = gen.fork(root, 3)
    batch = {c.request_id: c for c in [root, *kids]}
    while any(not c.is_done for c in batch.values()):
        gen.next_token({k: c for k, c in batch.items() if not c.is_done}, num_steps=4)
    for c in batch.values():
        _check_output(spec, c.text)


# ----------------------------------------------------------------------------- surfaces
def test_llm_generate_keywords_and_errors():
    from decodekit import LLM

    llm = LLM()
    out = llm.generate([[{"role": "user", "content": "Is the sky blue? Answer yes or no."}]],
                       SamplingParams(temperature=0.0, max_new_tokens=8), choice=["yes", "no"])
    assert out[0].text in ("yes", "no") and out[0].finish_reason == "stop"
    schema = SCHEMAS["enum_and_range"]
    out = llm.generate("A color and a size:", SamplingParams(temperature=0.0, max_new_tokens=40),
                       json_schema=schema)
    jsonschema.validate(json.loads(out[0].text), schema)
    with pytest.raises(ValueError, match="at most one of"):
        llm.generate("x", regex_pattern="a", choice=["a"])
    with pytest.raises(ValueError, match="regex_pattern"):
        llm.generate("x", regex_pattern="")


def test_cli_guided_flags(tmp_path):
    import subprocess
    import sys

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS["enum_and_range"]))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "decodekit", "generate", "Give a color and size.",
                               "--chat", "--temperature", "0", "--max-new-tokens", "40", "--no-stream",
                               *args],
                              capture_output=True, text=True, timeout=300)

    r = run("--json-schema", str(schema))
    assert r.returncode == 0, r.stderr[-2000:]
    jsonschema.validate(json.loads(r.stdout.rsplit("\n", 2)[0]), SCHEMAS["enum_and_range"])
    for bad in (["--json-schema", str(tmp_path / "missing.json")], ["--regex", "a", "--choice", "a"],
                ["--choice", ","]):  # refused before the model loads
        r = run(*bad)
        assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)


def test_a_grammar_the_vocabulary_cannot_spell_ends_the_request_cleanly():
    """The word-level tokenizer has no token with a space: after "w5" the regex is a dead end.
    The request ends there with EOS (a RuntimeWarning), never a token outside the grammar."""
    from _models import EOS_ID, tiny_model, word_tokenizer

    gen = TokenGenerator(tiny_model("llama"), word_tokenizer(), max_batch_size=2, max_seq_len=64, seed=0)
    spec = GuidedDecodingParams(regex="w5 w6")
    c = gen.new_context([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=10, guided_decoding=spec))
    with pytest.warns(RuntimeWarning, match="no token of this vocabulary spells"):
        gen.next_token({c.request_id: c}, num_steps=4)
    assert c.is_done and c.finish_reason == "stop" and c.generated_token_ids == [5, EOS_ID]


def test_matchers_take_token_t_after_forward_t_plus_1_is_enqueued(monkeypatch):
    """The overlap: in plain steps a guided row's token t reaches its matcher only after the
    next forward was issued (on a GPU, the host's accept and mask fill run beside it). The
    request still ends where its grammar does, with nothing after the end."""
    from decodekit.structured.grammar import Guide

    model, tok = tiny_smol()
    gen = _gen(model, tok)
    events: list[str] = []
    model.register_forward_pre_hook(lambda *_: events.append("F"))
    accept = Guide.accept
    monkeypatch.setattr(Guide, "accept", lambda self, t: (events.append("A"), accept(self, t))[1])
    spec = GuidedDecodingParams(regex=r"[a-z]{6}")
    c = gen.new_context("hello", SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True,
                                                guided_decoding=spec))
    gen.next_token({c.request_id: c}, num_steps=12)
    assert c.finish_reason == "stop" and re.fullmatch(r"[a-z]{6}", c.text), c.text
    accepts = [i for i, e in enumerate(events) if e == "A"]
    assert len(accepts) == len(c.generated_token_ids) >= 2
    for t, i in enumerate(accepts):  # token t: its own forward and the next one came first
        assert events[:i].count("F") >= t + 2, events


def test_a_failed_call_drops_tokens_the_matchers_had_not_taken_yet():
    """A forward failing mid-call (token t sampled, not yet accepted) leaves every matcher
    where the call found it: the request then goes on exactly as an undisturbed one."""
    model, tok = tiny_smol()
    spec = GuidedDecodingParams(json=SCHEMAS["enum_and_range"], disable_any_whitespace=True)
    params = SamplingParams(temperature=0.7, seed=5, max_new_tokens=60, guided_decoding=spec)
    (want,) = _run(_gen(model, tok), ["hi"], [params])

    gen = _gen(model, tok)
    c = gen.new_context("hi", params)
    gen.next_token({c.request_id: c}, num_steps=2)
    calls = {"n": 0}

    def boom(*_):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    h = model.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            gen.next_token({c.request_id: c}, num_steps=8)
    finally:
        h.remove()
    while not c.is_done:
        gen.next_token({c.request_id: c}, num_steps=8)
    assert c.generated_token_ids == want.generated_token_ids and c.text == want.text
