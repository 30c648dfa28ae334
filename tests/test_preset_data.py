"""Self-checks for the steering preset datasets (decodekit/steering/preset_data/*.jsonl) and the scores in

No model is needed: this only checks the data's shape and that each dataset's positive side scores better
than its negative side under the score that the matching preset is meant to move.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _preset_scores import formality_score, is_contraction, length_score, sentiment_score, words

PRESET_DIR = Path(__file__).resolve().parents[1] / "decodekit" / "steering" / "preset_data"
PRESETS = ("brevity", "positive", "formal")
MIN_PAIRS = 64


def load_pairs(name: str) -> list[dict]:
    path = PRESET_DIR / f"{name}.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def answer(text: str) -> str:
    """The text after the last ``assistant\\n`` (the whole text if there is none)."""
    return text.rsplit("assistant\n", 1)[-1]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


@pytest.mark.parametrize("name", PRESETS)
def test_dataset_shape(name):
    pairs = load_pairs(name)
    assert len(pairs) >= MIN_PAIRS
    seen = set()
    for i, pair in enumerate(pairs):
        assert set(pair) == {"positive", "negative"}, f"line {i + 1}: keys {sorted(pair)}"
        pos, neg = pair["positive"], pair["negative"]
        assert isinstance(pos, str) and isinstance(neg, str)
        assert pos.strip() and neg.strip(), f"line {i + 1}: empty side"
        assert pos != neg, f"line {i + 1}: positive == negative"
        assert (pos, neg) not in seen, f"line {i + 1}: duplicate pair"
        seen.add((pos, neg))


def test_words_tokenizer():
    assert words("Don't STOP <|im_end|> now!") == ["don't", "stop", "now"]
    assert words("It\u2019s fine") == ["it's", "fine"]
    assert words("") == []


def test_length_score_ranks():
    assert length_score("Paris.") == 1
    assert length_score("Paris.<|im_end|>") == 1
    long = "The capital of France is Paris, a beautiful and historic city on the Seine."
    assert length_score("Paris.") < length_score(long)
    assert not length_score(long) < length_score("Paris.")


def test_sentiment_score_ranks():
    good, bad = "what a wonderful happy day", "a terrible sad day"
    assert sentiment_score(good) > 0 > sentiment_score(bad)
    assert sentiment_score(good) > sentiment_score(bad)
    assert not sentiment_score(bad) > sentiment_score(good)
    assert sentiment_score("WONDERFUL") == sentiment_score("wonderful") == 1.0
    assert sentiment_score("the table is brown") == 0.0
    assert sentiment_score("") == 0.0


def test_formality_score_ranks():
    formal = "Certainly. I would kindly recommend the train; however, please book in advance."
    casual = "yeah dude it's gonna be awesome lol, don't worry about that stuff"
    assert formality_score(formal) > 0 > formality_score(casual)
    assert formality_score(formal) > formality_score(casual)
    assert not formality_score(casual) > formality_score(formal)
    assert formality_score("the table is brown") == 0.0
    assert formality_score("chillin' there") < 0
    for c in ("don't", "it's", "we're", "i'll", "you've", "i'm", "they'd"):
        assert is_contraction(c), c
    assert not is_contraction("john's") and not is_contraction("dont")


SIDE_CHECKS = {
    # preset: (score, True when a LOWER score is the positive side's target)
    "brevity": (length_score, True),
    "positive": (sentiment_score, False),
    "formal": (formality_score, False),
}


@pytest.mark.parametrize("name", PRESETS)
def test_positive_side_scores_better(name):
    score, lower_is_better = SIDE_CHECKS[name]
    pairs = load_pairs(name)
    pos = mean(score(answer(p["positive"])) for p in pairs)
    neg = mean(score(answer(p["negative"])) for p in pairs)
    if lower_is_better:
        assert pos < neg, (pos, neg)
        assert pos <= 0.5 * neg, (pos, neg)  # the contrast should be strong, not marginal
    else:
        assert pos > neg, (pos, neg)
    # Pair-wise too: the large majority of pairs must point the same way.
    agree = sum(
        (score(answer(p["positive"])) < score(answer(p["negative"])))
        if lower_is_better
        else (score(answer(p["positive"])) > score(answer(p["negative"])))
        for p in pairs
    )
    assert agree >= 0.9 * len(pairs), f"{agree}/{len(pairs)}"
