"""Tests for decodekit.params.SamplingParams."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle

import numpy as np
import pytest

from decodekit.params import DEFAULT_MAX_NEW_TOKENS, RequestOutputKind, SamplingParams

INF = math.inf
NAN = math.nan

EXPECTED_FIELDS = [
    ("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0), ("typical_p", 1.0),
    ("repetition_penalty", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0),
    ("logit_bias", None), ("allowed_token_ids", None), ("bad_words_token_ids", None),
    ("min_new_tokens", 0), ("max_new_tokens", None), ("ignore_eos", False), ("stop", None),
    ("stop_token_ids", None), ("stop_pattern", None), ("include_stop_str_in_output", False),
    ("seed", None), ("logprobs", None), ("detokenize", True), ("skip_special_tokens", True),
    ("guided_decoding", None), ("n", 1), ("best_of", None), ("prompt_logprobs", None),
    ("output_kind", RequestOutputKind.CUMULATIVE), ("truncate_prompt_tokens", None),
]


def test_fields_order_and_defaults():
    fields = dataclasses.fields(SamplingParams)
    assert [(f.name, f.default) for f in fields] == EXPECTED_FIELDS
    p = SamplingParams()
    for name, default in EXPECTED_FIELDS:
        assert getattr(p, name) == default
    assert DEFAULT_MAX_NEW_TOKENS == 256


BAD_INPUTS = [
    # (kwargs, regex the message must contain)
    ({"temperature": -0.1}, r"temperature.*>= 0.*-0\.1"),
    ({"temperature": INF}, r"temperature.*finite.*inf"),
    ({"temperature": NAN}, r"temperature.*nan"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1\.5"),
    ({"top_p": 0.0}, r"top_p.*\(0, 1\].*0\.0"),
    ({"top_p": NAN}, r"top_p.*nan"),
    ({"min_p": -0.01}, r"min_p.*\[0, 1\]"),
    ({"min_p": 1.01}, r"min_p.*\[0, 1\].*1\.01"),
    ({"min_p": NAN}, r"min_p.*nan"),
    ({"typical_p": 0.0}, r"typical_p.*\(0, 1\]"),
    ({"typical_p": 1.1}, r"typical_p.*\(0, 1\]"),
    ({"typical_p": NAN}, r"typical_p.*nan"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty.*> 0"),
    ({"repetition_penalty": -1.0}, r"repetition_penalty.*> 0"),
    ({"repetition_penalty": INF}, r"repetition_penalty.*finite"),
    ({"repetition_penalty": NAN}, r"repetition_penalty.*nan"),
    ({"frequency_penalty": 2.01}, r"frequency_penalty.*\[-2, 2\].*2\.01"),
    ({"frequency_penalty": -2.5}, r"frequency_penalty.*\[-2, 2\]"),
    ({"frequency_penalty": NAN}, r"frequency_penalty.*nan"),
    ({"presence_penalty": 3.0}, r"presence_penalty.*\[-2, 2\]"),
    ({"presence_penalty": -INF}, r"presence_penalty.*\[-2, 2\]"),
    ({"presence_penalty": NAN}, r"presence_penalty.*nan"),
    ({"temperature": "0.5"}, r"temperature.*real number"),
    ({"top_k": -2}, r"top_k.*>= -1.*-2"),
    ({"top_k": 5.0}, r"top_k.*int"),
    ({"top_k": True}, r"top_k.*int.*True"),
    ({"top_k": None}, r"top_k.*int"),
    ({"logprobs": -1}, r"logprobs.*\[0, 20\]"),
    ({"logprobs": 21}, r"logprobs.*\[0, 20\].*21"),
    ({"logprobs": False}, r"logprobs.*int"),
    ({"min_new_tokens": -1}, r"min_new_tokens.*>= 0"),
    ({"min_new_tokens": True}, r"min_new_tokens.*int"),
    ({"max_new_tokens": 0}, r"max_new_tokens.*>= 1.*0"),
    ({"max_new_tokens": 1.5}, r"max_new_tokens.*int"),
    ({"max_new_tokens": True}, r"max_new_tokens.*int"),
    ({"min_new_tokens": 10, "max_new_tokens": 5}, r"min_new_tokens.*max_new_tokens"),
    ({"logit_bias": {1: NAN}}, r"logit_bias.*nan"),
    ({"logit_bias": {1: INF}}, r"logit_bias.*-inf.*inf"),
    ({"logit_bias": {-1: 1.0}}, r"logit_bias.*>= 0.*-1"),
    ({"logit_bias": {"a": 1.0}}, r"logit_bias.*int"),
    ({"logit_bias": {True: 1.0}}, r"logit_bias.*int"),
    ({"logit_bias": {1: "x"}}, r"logit_bias.*real number"),
    ({"logit_bias": [(1, 2.0)]}, r"logit_bias.*mapping"),
    ({"allowed_token_ids": []}, r"allowed_token_ids.*non-empty"),
    ({"allowed_token_ids": [1, -3]}, r"allowed_token_ids.*>= 0.*-3"),
    ({"allowed_token_ids": [1, 2.0]}, r"allowed_token_ids.*int"),
    ({"allowed_token_ids": 5}, r"allowed_token_ids.*sequence"),
    ({"bad_words_token_ids": [[]]}, r"bad_words_token_ids.*non-empty"),
    ({"bad_words_token_ids": [[1, -2]]}, r"bad_words_token_ids.*>= 0.*-2"),
    ({"bad_words_token_ids": [1, 2]}, r"bad_words_token_ids.*sequence"),
    ({"bad_words_token_ids": [[1, None]]}, r"bad_words_token_ids.*int"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids.*>= 0.*-1"),
    ({"stop_token_ids": [True]}, r"stop_token_ids.*int"),
    ({"stop": [""]}, r"stop must contain non-empty strings"),
    ({"stop": ["ok", 3]}, r"stop must contain non-empty strings.*3"),
    ({"stop": ""}, r"stop must contain non-empty strings"),
    ({"stop": 7}, r"stop.*sequence"),
    ({"stop_pattern": "(unclosed"}, r"stop_pattern.*valid regular expression.*unclosed"),
    ({"stop_pattern": "x*"}, r"stop_pattern.*empty string"),
    ({"stop_pattern": 5}, r"stop_pattern.*regular expression"),
    ({"seed": -1}, r"seed.*\[0, 2\*\*63 - 1\].*-1"),
    ({"seed": 2**63}, r"seed.*\[0, 2\*\*63 - 1\]"),
    ({"seed": True}, r"seed.*int"),
    ({"ignore_eos": 1}, r"ignore_eos.*bool"),
    ({"include_stop_str_in_output": "yes"}, r"include_stop_str_in_output.*bool"),
    ({"detokenize": None}, r"detokenize.*bool"),
    ({"skip_special_tokens": 0}, r"skip_special_tokens.*bool"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_INPUTS, ids=[repr(k) for k, _ in BAD_INPUTS])
def test_bad_inputs_raise_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 1}, {"top_p": 1e-6}, {"min_p": 0}, {"min_p": 1}, {"typical_p": 1.0},
        {"top_k": -1}, {"top_k": 0}, {"top_k": 1}, {"logprobs": 0}, {"logprobs": 20},
        {"temperature": 0}, {"temperature": 0.0}, {"frequency_penalty": -2},
        {"frequency_penalty": 2}, {"presence_penalty": -2.0}, {"presence_penalty": 2.0},
        {"logit_bias": {5: -INF}}, {"logit_bias": {0: 100.0, 1: -100}}, {"seed": 0},
        {"seed": 2**63 - 1}, {"max_new_tokens": 1}, {"min_new_tokens": 4, "max_new_tokens": 4},
        {"allowed_token_ids": [0]}, {"bad_words_token_ids": [[0]]}, {"stop_pattern": r"\n\n"},
        {"repetition_penalty": 1e-3},
    ],
    ids=repr,
)
def test_valid_edge_values_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        if name == "top_k":
            assert p.top_k == max(value, 0)
        elif name == "logit_bias":
            assert dict(p.logit_bias) == {k: float(v) for k, v in value.items()}
        elif name == "allowed_token_ids":
            assert p.allowed_token_ids == tuple(value)
        elif name == "bad_words_token_ids":
            assert p.bad_words_token_ids == tuple(tuple(w) for w in value)
        else:
            assert getattr(p, name) == value


def test_normalised_types():
    p = SamplingParams(temperature=1, top_p=1, logit_bias={3: 1}, frequency_penalty=0)
    for name in ("temperature", "top_p", "frequency_penalty"):
        assert type(getattr(p, name)) is float
    assert type(p.logit_bias[3]) is float
    assert SamplingParams(top_k=-1).top_k == 0


def test_numpy_scalars_are_converted():
    p = SamplingParams(
        temperature=np.float32(0.5), top_k=np.int64(40), top_p=np.float64(0.9),
        logit_bias={np.int32(7): np.float64(-1.5)}, allowed_token_ids=np.array([3, 1]),
        bad_words_token_ids=[np.array([4, 5])], stop_token_ids=[np.int64(2)],
        seed=np.uint32(11), logprobs=np.int8(5), max_new_tokens=np.int16(10),
    )
    assert p.temperature == 0.5 and type(p.temperature) is float
    assert p.top_k == 40 and type(p.top_k) is int
    assert p.top_p == 0.9 and type(p.top_p) is float
    assert list(p.logit_bias.items()) == [(7, -1.5)]
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    assert p.allowed_token_ids == (1, 3) and all(type(t) is int for t in p.allowed_token_ids)
    assert p.bad_words_token_ids == ((4, 5),)
    assert type(p.bad_words_token_ids[0][0]) is int
    assert p.stop_token_ids == (2,) and type(p.stop_token_ids[0]) is int
    assert (p.seed, p.logprobs, p.max_new_tokens) == (11, 5, 10)
    assert all(type(v) is int for v in (p.seed, p.logprobs, p.max_new_tokens))
    hash(p)


@pytest.mark.parametrize(
    "name", ["top_k", "min_new_tokens", "max_new_tokens", "seed", "logprobs", "temperature",
             "top_p", "repetition_penalty"],
)
def test_bool_rejected_for_numeric_fields(name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: True})


def test_frozen():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.logit_bias = {1: 1.0}  # type: ignore[misc]


def test_deep_immutability_and_no_aliasing():
    bias = {1: 2.0}
    allowed = [3, 4]
    bad = [[5, 6], [7]]
    stop = ["a", "b"]
    stop_ids = [8]
    p = SamplingParams(logit_bias=bias, allowed_token_ids=allowed, bad_words_token_ids=bad,
                       stop=stop, stop_token_ids=stop_ids)
    with pytest.raises(TypeError):
        p.logit_bias[1] = 5.0  # type: ignore[index]
    with pytest.raises(TypeError):
        p.logit_bias[9] = 5.0  # type: ignore[index]
    assert isinstance(p.allowed_token_ids, tuple)
    assert isinstance(p.bad_words_token_ids, tuple)
    assert all(isinstance(w, tuple) for w in p.bad_words_token_ids)
    assert isinstance(p.stop, tuple) and isinstance(p.stop_token_ids, tuple)
    # mutate the caller's objects: the params must not change
    bias[1] = -1.0
    bias[2] = 3.0
    allowed.append(9)
    bad[0].append(99)
    bad.append([100])
    stop.append("c")
    stop_ids.append(10)
    assert dict(p.logit_bias) == {1: 2.0}
    assert p.allowed_token_ids == (3, 4)
    assert p.bad_words_token_ids == ((5, 6), (7,))
    assert p.stop == ("a", "b")
    assert p.stop_token_ids == (8,)


def test_single_stop_string_is_wrapped():
    assert SamplingParams(stop="</s>").stop == ("</s>",)


def test_empty_collections_normalised_to_none():
    p = SamplingParams(logit_bias={}, stop=[], stop_token_ids=[], bad_words_token_ids=[])
    assert p.logit_bias is None and p.stop is None
    assert p.stop_token_ids is None and p.bad_words_token_ids is None
    assert p == SamplingParams()


def test_hash_and_eq():
    a = SamplingParams(temperature=0.7, logit_bias={1: 1.0, 2: -INF}, stop=["x"],
                       allowed_token_ids=[5, 3], bad_words_token_ids=[[1, 2]])
    b = SamplingParams(temperature=0.7, logit_bias={2: -INF, 1: 1}, stop=("x",),
                       allowed_token_ids=(3, 5, 5), bad_words_token_ids=((1, 2),))
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != a.replace(logit_bias={1: 1.0})
    assert a != a.replace(temperature=0.8)
    assert SamplingParams(top_k=-1) == SamplingParams(top_k=0)
    assert hash(SamplingParams(top_k=-1)) == hash(SamplingParams())
    assert SamplingParams() != SamplingParams(seed=0)
    assert {SamplingParams(): 1}[SamplingParams()] == 1


def test_pickle_and_deepcopy_round_trip():
    p = SamplingParams(temperature=0.3, logit_bias={4: -INF, 5: 0.5}, stop=["z"], seed=3)
    for q in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p), copy.copy(p)):
        assert q == p and hash(q) == hash(p)
        with pytest.raises(TypeError):
            q.logit_bias[4] = 0.0  # type: ignore[index]


def test_repr_lists_only_non_defaults():
    assert repr(SamplingParams()) == "SamplingParams()"
    r = repr(SamplingParams(temperature=0.5, top_k=40, logit_bias={3: -1.0}))
    assert r == "SamplingParams(temperature=0.5, top_k=40, logit_bias={3: -1.0})"
    assert "top_p" not in r and "skip_special_tokens" not in r
    assert repr(SamplingParams(detokenize=False)) == "SamplingParams(detokenize=False)"


def test_replace_revalidates():
    p = SamplingParams(top_p=0.9)
    q = p.replace(temperature=0.0, stop="x")
    assert q.is_greedy and q.top_p == 0.9 and q.stop == ("x",)
    assert p.temperature == 1.0
    with pytest.raises(ValueError, match="top_p"):
        p.replace(top_p=2.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=3).replace(min_new_tokens=4)
    with pytest.raises(TypeError):
        p.replace(not_a_field=1)


def test_flags():
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy
    assert not SamplingParams().uses_penalties
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(frequency_penalty=-0.5).uses_penalties
    assert SamplingParams(presence_penalty=0.1).uses_penalties
    assert not SamplingParams().uses_filtering
    assert not SamplingParams(top_k=-1).uses_filtering
    for kwargs in ({"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.05}, {"typical_p": 0.95}):
        assert SamplingParams(**kwargs).uses_filtering, kwargs
        assert not SamplingParams(temperature=0, **kwargs).uses_filtering, kwargs


def test_effective_top_k():
    assert SamplingParams().effective_top_k(100) == 0
    assert SamplingParams(top_k=-1).effective_top_k(100) == 0
    assert SamplingParams(top_k=5).effective_top_k(100) == 5
    assert SamplingParams(top_k=500).effective_top_k(100) == 100
    with pytest.raises(ValueError, match="vocab_size"):
        SamplingParams(top_k=5).effective_top_k(0)


@pytest.mark.parametrize(
    ("field", "kwargs", "bad_id"),
    [
        ("logit_bias", {"logit_bias": {3: 1.0, 10: -INF}}, 10),
        ("allowed_token_ids", {"allowed_token_ids": [0, 9, 12]}, 12),
        ("bad_words_token_ids", {"bad_words_token_ids": [[1], [2, 10]]}, 10),
        ("stop_token_ids", {"stop_token_ids": [11]}, 11),
    ],
)
def test_validate_for_vocab_rejects_out_of_range_ids(field, kwargs, bad_id):
    p = SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=rf"{field}.*{bad_id}.*\[0, 10\)"):
        p.validate_for_vocab(10)
    p.validate_for_vocab(bad_id + 1)  # a large enough vocabulary accepts the same ids


def test_validate_for_vocab_accepts_in_range_ids():
    p = SamplingParams(logit_bias={0: 1.0, 9: -INF}, allowed_token_ids=[0, 9],
                       bad_words_token_ids=[[9, 8]], stop_token_ids=[9])
    p.validate_for_vocab(10)
    SamplingParams().validate_for_vocab(1)
    with pytest.raises(ValueError, match="vocab_size"):
        p.validate_for_vocab(0)


# ---------------------------------------------------------------- from_generation_config

transformers = pytest.importorskip("transformers")


def test_from_greedy_generation_config():
    cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=32,
                                        repetition_penalty=1.3)
    p = SamplingParams.from_generation_config(cfg)
    assert p.is_greedy and p.temperature == 0.0
    assert p.max_new_tokens == 32 and p.repetition_penalty == 1.3
    assert not p.uses_filtering
    # sampling-only fields are not read for a greedy config (HF ignores them too)
    p = SamplingParams.from_generation_config({"do_sample": False, "top_p": 0.9, "top_k": 5})
    assert (p.top_p, p.top_k) == (1.0, 0)
    # an all-None (HF v5 default) config is greedy with our defaults everywhere else
    assert SamplingParams.from_generation_config(transformers.GenerationConfig()) == (
        SamplingParams(temperature=0.0))


def test_from_sampling_generation_config():
    cfg = transformers.GenerationConfig(
        do_sample=True, temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, typical_p=0.95,
        repetition_penalty=1.2, max_new_tokens=64, min_new_tokens=2,
        bad_words_ids=[[11, 12], [13]], suppress_tokens=[7, 8], stop_strings=["###", "END"],
        sequence_bias={(4,): 1.5},
    )
    p = SamplingParams.from_generation_config(cfg)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) == (0.7, 50, 0.9, 0.05, 0.95)
    assert p.repetition_penalty == 1.2
    assert (p.max_new_tokens, p.min_new_tokens) == (64, 2)
    assert p.bad_words_token_ids == ((11, 12), (13,))
    assert dict(p.logit_bias) == {7: -INF, 8: -INF, 4: 1.5}
    assert p.stop == ("###", "END")
    assert not p.is_greedy and p.uses_filtering


def test_from_generation_config_none_sampling_fields_use_defaults():
    p = SamplingParams.from_generation_config(transformers.GenerationConfig(do_sample=True))
    assert p == SamplingParams()
    p = SamplingParams.from_generation_config({"do_sample": True, "top_k": None, "top_p": 0.5})
    assert p == SamplingParams(top_p=0.5)


def test_from_generation_config_dict_and_object():
    class Cfg:
        do_sample = True
        temperature = 0.4
        stop_strings = "STOP"

    assert SamplingParams.from_generation_config(Cfg()) == SamplingParams(temperature=0.4,
                                                                          stop="STOP")
    d = {"do_sample": True, "top_k": 3, "sequence_bias": [[[9], -2.0]]}
    p = SamplingParams.from_generation_config(d)
    assert p.top_k == 3 and dict(p.logit_bias) == {9: -2.0}


def test_from_generation_config_overrides():
    cfg = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9)
    p = SamplingParams.from_generation_config(cfg, temperature=0.2, seed=5, logprobs=3)
    assert (p.temperature, p.top_p, p.seed, p.logprobs) == (0.2, 0.9, 5, 3)
    greedy = transformers.GenerationConfig(do_sample=False)
    assert SamplingParams.from_generation_config(greedy, temperature=1.0).temperature == 1.0
    with pytest.raises(TypeError, match="unknown override.*'not_a_field'.*valid fields"):
        SamplingParams.from_generation_config(cfg, not_a_field=1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config(cfg, top_p=0.0)


def test_from_generation_config_multi_token_sequence_bias_unsupported():
    cfg = transformers.GenerationConfig(do_sample=True, sequence_bias={(1, 2): 3.0})
    with pytest.raises(ValueError, match="sequence_bias.*single-token"):
        SamplingParams.from_generation_config(cfg)


def test_from_generation_config_ignores_logprob_options():
    cfg = transformers.GenerationConfig(do_sample=True, output_logits=True, num_logprobs=5)
    assert SamplingParams.from_generation_config(cfg).logprobs is None


def test_from_generation_config_invalid_values_are_reported():
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams.from_generation_config({"repetition_penalty": -1.0})
