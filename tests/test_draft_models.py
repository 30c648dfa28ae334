"""Model drafters: DraftModel (own slot KV cache) and LayerSkipDraft (the target through a
subset of its layers): draft = target accepts everything, the draft cache catches up after
steps without drafting, vocabulary checks, layer subsets, the embedded model, and the
joint distribution of three tokens with a real draft distribution q."""

from __future__ import annotations

import pytest
import torch
from _models import hf_greedy, tiny_config, tiny_model, word_tokenizer
from test_speculative import e2e_pvalue, near_copy
from transformers import AutoModelForCausalLM

from decodekit import DraftModel, LayerSkipDraft, SamplingParams, TokenGenerator
from decodekit.engine.model_adapter import decoder_layer_list
from decodekit.speculative.layer_skip import skip_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _drive(gen, ctxs, num_steps=1, toggle=None):
    step = 0
    while any(not c.is_done for c in ctxs):
        if toggle is not None:
            toggle(step, ctxs)
        gen.next_token({c.request_id: c for c in ctxs if not c.is_done}, num_steps=num_steps)
        step += 1


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_draft_equal_to_target_accepts_everything(arch):
    """q == p: every draft is accepted and each verification emits k + 1 tokens, for greedy
    and for sampled rows with penalties and filters (the window's penalties must agree)."""
    model, k, blocks = tiny_model(arch), 3, 4
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=3, max_seq_len=64,
                         draft=DraftModel(model), num_speculative_tokens=k, adaptive_k=False)
    n = 1 + blocks * (k + 1)  # the prefill's token, then full blocks
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5,
                             seed=3, max_new_tokens=n, ignore_eos=True),
              SamplingParams(temperature=0.7, min_p=0.1, frequency_penalty=0.4, seed=4,
                             max_new_tokens=n, ignore_eos=True)]
    ctxs = [gen.new_context([1, 5 + i, 6, 7], p) for i, p in enumerate(params)]
    # batch cap on CPU: one k budget per step, so run the rows one at a time
    for c in ctxs:
        _drive(gen, [c])
    for c in ctxs:
        st = c.spec_stats
        assert (st.drafted, st.accepted, st.steps) == (blocks * k, blocks * k, blocks)
        assert st.acceptance_rate == 1.0 and st.mean_accepted_length == k + 1
        assert st.accepted_per_position == [blocks] * k
    assert ctxs[0].generated_token_ids == hf_greedy(model, ctxs[0].prompt_token_ids, n)


def test_draft_cache_catches_up_after_steps_without_drafting():
    """With speculation switched off for some steps the draft's own cache falls behind;
    the next draft forward must feed the missing tokens (else a draft equal to the target
    would stop agreeing with it)."""
    model = tiny_model("llama")
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=96,
                         draft=DraftModel(model), num_speculative_tokens=2, adaptive_k=False)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    ctx = gen.new_context([1, 9, 10, 11], params)

    def toggle(step, ctxs):
        ctxs[0].speculate = (step // 3) % 2 == 1  # 3 plain steps, 3 speculative, ...

    _drive(gen, [ctx], num_steps=2, toggle=toggle)
    assert ctx.generated_token_ids == hf_greedy(model, ctx.prompt_token_ids, 40)
    assert ctx.spec_stats.drafted > 0 and ctx.spec_stats.acceptance_rate == 1.0


def test_draft_model_vocabulary_must_match():
    model = tiny_model("llama")
    other = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=330)).eval()
    with pytest.raises(ValueError, match="vocabulary size 330 != target vocabulary size 320"):
        TokenGenerator(model, word_tokenizer(), draft=DraftModel(other))
    renamed = word_tokenizer(320)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(renamed.get_vocab())
    vocab["zz"] = vocab.pop("w17")  # same size, one token string differs
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other_tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>")
    with pytest.raises(ValueError, match=r"token strings differ.*'zz'.*'w17'"):
        TokenGenerator(model, word_tokenizer(), draft=DraftModel(near_copy(model, 0.1), other_tok))
    gen = TokenGenerator(model, word_tokenizer(), draft=DraftModel(near_copy(model, 0.1), word_tokenizer()))
    assert gen.spec_k == 4


def test_layer_skip_validation():
    model = tiny_model("llama")  # 2 decoder layers
    for bad, msg in ((0, ">= 1"), ([], "non-empty"), ("1", "int or a sequence"), (True, "int or")):
        with pytest.raises(ValueError, match=msg):
            LayerSkipDraft(bad)
    for bad, msg in ((2, "must be < the model's 2"), ([0, 1], "keeps every layer"), ([5], r"\[0, 2\)")):
        with pytest.raises(ValueError, match=msg):
            TokenGenerator(model, word_tokenizer(), draft=LayerSkipDraft(bad))
    with pytest.raises(ValueError, match="k must be"):
        LayerSkipDraft(1, k=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_skip_layers_is_the_model_without_those_layers(arch):
    """The draft forward is exactly the model with the skipped layers removed (same
    weights, the kept layers' own layer types), and the original layers come back."""
    model = tiny_model(arch)
    cfg = tiny_config(arch, num_hidden_layers=1)
    if hasattr(cfg, "layer_types"):
        cfg.layer_types = [model.config.layer_types[1]]
    short = AutoModelForCausalLM.from_config(cfg).eval()
    sd = {k: v for k, v in model.state_dict().items() if ".layers.0." not in k}
    sd = {k.replace(".layers.1.", ".layers.0."): v for k, v in sd.items()}
    short.load_state_dict(sd)
    ids = torch.tensor([[1, 5, 9, 33, 7, 8, 21, 4, 4, 12, 50]])
    parent, name = decoder_layer_list(model)
    before = list(getattr(parent, name))
    with torch.no_grad():
        with skip_layers(model, [1]):
            got = model(ids, use_cache=False).logits
        want = short(ids, use_cache=False).logits
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, full)
    assert list(getattr(parent, name)) == before
    with pytest.raises(RuntimeError):  # restored after an error too
        with skip_layers(model, [1]):
            raise RuntimeError("boom")
    assert list(getattr(parent, name)) == before


@pytest.fixture(scope="module")
def smollm():
    from decodekit import load

    return load()


def test_embedded_model_self_draft_and_layer_skip(smollm):
    """SmolLM2: the model as its own DraftModel accepts every draft; LayerSkipDraft gives
    the same greedy tokens as plain decoding."""
    model, tok = smollm
    prompt = [{"role": "user", "content": "Name three colours of the rainbow."}]
    params = SamplingParams(temperature=0, max_new_tokens=25)
    out = {}
    for name, draft in (("plain", None), ("self", DraftModel(model, k=3)),
                        ("skip", LayerSkipDraft(list(range(0, 30, 2)), k=3))):
        gen = TokenGenerator(model, tok, max_batch_size=1, max_seq_len=256, draft=draft,
                             adaptive_k=False)
        ctx = gen.new_context(prompt, params)
        _drive(gen, [ctx])
        out[name] = (ctx.generated_token_ids, gen.spec_stats)
    assert out["self"][0] == out["plain"][0] and out["skip"][0] == out["plain"][0]
    assert out["self"][1].drafted > 0 and out["self"][1].acceptance_rate == 1.0
    assert out["skip"][1].drafted > 0


# ----------------------------------------------------------------------------------------------
# End-to-end distribution with a real draft distribution q (DraftModel)
# ----------------------------------------------------------------------------------------------
def _draft(model):
    return DraftModel(near_copy(model, 1.0, seed=5), k=2)  # acceptance about 0.6 here


@pytest.mark.slow
def test_joint_distribution_with_draft_model_matches_target(monkeypatch):
    assert e2e_pvalue(15_000, False, monkeypatch, _draft, rows=2) > 1e-4


@pytest.mark.slow
def test_joint_distribution_with_draft_model_negative_control(monkeypatch):
    assert e2e_pvalue(15_000, True, monkeypatch, _draft, rows=2) < 1e-6
