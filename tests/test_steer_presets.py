"""Steering presets: data shipped with the package, training on first use and the disk
cache keyed by model identity; and (slow) their effect on the embedded SmolLM2 model with
fixed seeds, each measured by a score defined in ``_preset_scores``."""

from __future__ import annotations

import pytest
import torch
from _models import tiny_model, word_tokenizer
from _preset_scores import formality_score, length_score, sentiment_score, words

from decodekit import LLM, SamplingParams
from decodekit.steering import presets as SP


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path))


def test_presets_are_package_data_with_enough_pairs():
    assert set(SP.PRESETS) >= {"brevity", "positive", "formal"}
    for name, p in SP.PRESETS.items():
        pairs = SP.preset_pairs(name)
        assert len(pairs) >= 64 and all(x["positive"] != x["negative"] for x in pairs)
        assert p.default_strength > 0
    assert SP.PRESETS["brevity"].layers(30) == list(range(8, 21))


def test_preset_vector_is_trained_once_then_read_from_the_cache(monkeypatch, tmp_path):
    model, tok = tiny_model("llama"), word_tokenizer()
    first = SP.preset_vector("formal", model, tok)
    assert first.layers == (1,) and first.metadata["preset"] == "formal"  # 2 layers: band -> [1]
    files = list((tmp_path / "steering").glob("formal-*.safetensors"))
    assert len(files) == 1

    def no_training(*a, **k):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(SP, "train_steering_vector", no_training)
    again = SP.preset_vector("formal", model, tok)
    assert again == first
    other = tiny_model("llama", seed=1)  # another model: another cache key, so it trains
    with pytest.raises(AssertionError, match="trained again"):
        SP.preset_vector("formal", other, tok)
    with pytest.raises(ValueError, match="unknown steering preset 'loud'"):
        SP.preset_vector("loud", model, tok)
    s = SP.preset_steering("formal", model, tok)
    assert s.strength == SP.PRESETS["formal"].default_strength and s.vector == first


# ----------------------------------------------------------------------------------------------
# Behaviour on the embedded model (slow: SmolLM2 on CPU)
# ----------------------------------------------------------------------------------------------
OPEN_PROMPTS = [
    "Tell me about the history of Rome.", "How do I bake bread at home?", "What makes a good friend?",
    "Explain how airplanes fly.", "Describe your ideal weekend.", "What do you think about Mondays?",
    "How can I learn to play the guitar?", "Why do people enjoy travelling?", "Tell me about the ocean.",
    "What is the best way to study for an exam?", "Describe a city at night.",
    "How do plants grow?", "What should I cook for dinner tonight?", "Tell me about your favourite season.",
    "How do computers work?", "What is it like to live in the mountains?", "Give me advice on saving money.",
    "Explain why exercise is important.", "Describe a walk in the forest.", "What makes a good teacher?",
]


@pytest.fixture(scope="module")
def smollm_llm():
    from decodekit import load

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    model, tok = load()
    yield LLM(model=model, tokenizer=tok, max_batch_size=10, max_seq_len=512)
    torch.set_num_threads(old)


def _texts(llm, n: int = len(OPEN_PROMPTS), **steering):
    """The first ``n`` open prompts, sampled with fixed seeds (temperature 0.5)."""
    params = [SamplingParams(temperature=0.5, top_p=0.9, seed=i, max_new_tokens=80) for i in range(n)]
    prompts = [[{"role": "user", "content": p}] for p in OPEN_PROMPTS[:n]]
    return llm.generate(prompts, params, **steering)


def _readable(text: str) -> bool:
    """Words, not one repeated token: at least 3 words, the commonest under half of them."""
    ws = words(text)
    return len(ws) >= 3 and max(ws.count(w) for w in set(ws)) <= len(ws) / 2


@pytest.fixture(scope="module")
def baseline(smollm_llm):
    return _texts(smollm_llm)


@pytest.mark.slow
def test_brevity_preset_cuts_length_by_30_percent(smollm_llm, baseline):
    steered = _texts(smollm_llm, steering_preset="brevity")
    base_len = sum(len(o.token_ids) for o in baseline) / len(baseline)
    new_len = sum(len(o.token_ids) for o in steered) / len(steered)
    assert new_len <= 0.7 * base_len, (base_len, new_len)
    assert sum(_readable(o.text) for o in steered) >= 0.8 * len(steered), [o.text for o in steered]
    # the score the test relies on can fail: the baseline is not shorter than itself
    assert sum(length_score(o.text) for o in baseline) > 0.7 * sum(length_score(o.text) for o in baseline)


@pytest.mark.slow
@pytest.mark.parametrize("name,score", [("positive", sentiment_score), ("formal", formality_score)])
def test_preset_moves_its_score(smollm_llm, baseline, name, score):
    """Dose response: the score rises with the preset, falls with the opposite strength
    (the negative control), and the text stays readable."""
    steered = _texts(smollm_llm, steering_preset=name)
    opposite = _texts(smollm_llm, steering_preset=name, steering_strength=-SP.PRESETS[name].default_strength)

    def mean(outs):
        return sum(score(o.text) for o in outs) / len(outs)

    base, new, neg = mean(baseline), mean(steered), mean(opposite)
    assert neg < base < new and new - neg > 0.015, (name, neg, base, new)
    assert sum(_readable(o.text) for o in steered) >= 0.8 * len(steered), [o.text for o in steered]
