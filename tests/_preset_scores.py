"""Pure-Python scores for measuring the effect of decodekit's steering presets on generated text.

Every function is deterministic, uses only the standard library, and works on *word tokens*:

* chat-template special tokens such as ``<|im_end|>`` are removed first,
* curly apostrophes are normalised to ``'``,
* the text is lower-cased and split with :data:`WORD_RE`, i.e. runs of letters/digits with optional inner
  apostrophes, so ``"Don't stop!"`` gives ``["don't", "stop"]`` and ``"'cause"`` gives ``["cause"]``.

Scores (higher = more of the preset's target behaviour, except ``length_score`` which brevity should lower):

* :func:`length_score` -- number of word tokens.
* :func:`sentiment_score` -- (positive lexicon hits - negative lexicon hits) / max(words, 1), in [-1, 1].
* :func:`formality_score` -- (formal marker hits - informal marker hits) / max(words, 1), in [-1, 1].
"""

from __future__ import annotations

import re

__all__ = [
    "FORMAL_MARKERS",
    "INFORMAL_MARKERS",
    "NEGATIVE_WORDS",
    "POSITIVE_WORDS",
    "WORD_RE",
    "formality_score",
    "is_contraction",
    "length_score",
    "sentiment_score",
    "words",
]

WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
_SPECIAL_RE = re.compile(r"<\|[^|<>]*\|>")

POSITIVE_WORDS = frozenset(
    """
    happy happily happiness great wonderful wonderfully love loved lovely joy joyful excellent amazing
    awesome fantastic good beautiful beautifully delightful delighted glad cheerful enjoy enjoyed
    enjoying fun brilliant brilliantly best perfect perfectly pleasant kind friendly hopeful hope bright
    smile laugh laughing laughter exciting excited thrilled proud grateful superb nice delicious success
    win winning peaceful calm cozy warm comfortable healthy optimistic wow yay terrific gorgeous
    stunning charming magical incredible fabulous blessed relaxing inspiring sweet adore
    """.split()
)

NEGATIVE_WORDS = frozenset(
    """
    sad sadly sadness bad badly terrible terribly horrible horribly hate hated awful miserable gloomy
    depressing depressed angry upset worst worse boring bored dull dreary lonely tired exhausted sick
    pain painful cry crying fear afraid scary worried worry worries anxious hopeless disappointed
    disappointing disaster failure fail ugly rude cruel unhappy grim bleak dreadful dread stressful
    stressed annoying annoyed frustrated nightmare disgusting empty unpleasant ugh grumpy regret problem
    problems pessimistic despair
    """.split()
)

FORMAL_MARKERS = frozenset(
    """
    therefore however furthermore please kindly regards certainly additionally consequently moreover
    sincerely sincere indeed thus hence accordingly recommend appreciate assist assistance regarding
    shall ensure respectfully nevertheless subsequently approximately require provide advisable
    considerable courteous dear whereas pleased delighted
    """.split()
)

INFORMAL_MARKERS = frozenset(
    """
    gonna wanna gotta lol dude yeah hey cool awesome stuff kinda sorta ya yep yup nope nah omg lmao bro
    guys totally super chill legit idk tbh btw thx haha yo em ok okay ugh heck wild vibe prob
    """.split()
)

# Apostrophe suffixes that make a token a contraction. A bare "'s" is ambiguous (possessive vs. "is"), so
# it only counts after the pronouns/adverbs in _S_CONTRACTION_HEADS ("it's", "that's", "what's", ...).
_CONTRACTION_SUFFIXES = ("n't", "'re", "'ll", "'ve", "'m", "'d")
_S_CONTRACTION_HEADS = frozenset(
    "it that what where who how there here let he she everything nothing something".split()
)


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (special ``<|...|>`` tokens removed)."""
    text = _SPECIAL_RE.sub(" ", text).replace("\u2019", "'").replace("\u2018", "'").lower()
    return WORD_RE.findall(text)


def length_score(text: str) -> int:
    """Number of word tokens in ``text``; the brevity preset should make this smaller."""
    return len(words(text))


def sentiment_score(text: str) -> float:
    """(count of POSITIVE_WORDS - count of NEGATIVE_WORDS) / max(number of words, 1).

    Case-insensitive and token based, so "Happy" counts but "unhappy" only counts as negative.
    """
    toks = words(text)
    pos = sum(t in POSITIVE_WORDS for t in toks)
    neg = sum(t in NEGATIVE_WORDS for t in toks)
    return (pos - neg) / max(len(toks), 1)


def is_contraction(token: str) -> bool:
    """True for contractions such as "don't", "it's", "we're", "i'll", "you've", "i'm", "they'd"."""
    if token.endswith(_CONTRACTION_SUFFIXES):
        return True
    return token.endswith("'s") and token[:-2] in _S_CONTRACTION_HEADS


def formality_score(text: str) -> float:
    """(formal marker hits - informal marker hits) / max(number of words, 1).

    Formal markers: FORMAL_MARKERS ("therefore", "however", "furthermore", "please", "kindly", "regards",
    "certainly", "additionally", "consequently", ...). Informal markers: any contraction (see
    :func:`is_contraction`), INFORMAL_MARKERS ("gonna", "wanna", "lol", "dude", "yeah", "hey", "cool",
    "awesome", "stuff", ...), and g-dropping forms ending in "in'" ("chillin'", "somethin'").
    Higher means more formal; the formal preset should raise it.
    """
    raw = _SPECIAL_RE.sub(" ", text).replace("\u2019", "'").lower()
    toks = WORD_RE.findall(raw)
    formal = sum(t in FORMAL_MARKERS for t in toks)
    informal = sum(t in INFORMAL_MARKERS or is_contraction(t) for t in toks)
    informal += len(re.findall(r"\b[a-z]+in'(?![a-z])", raw))
    return (formal - informal) / max(len(toks), 1)
