"""Per-request sampling parameters: an immutable, hashable, validated :class:`SamplingParams`.

May call: the validators (:mod:`decodekit._checks`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._checks import as_items, check_float, check_int, describe, token_id
from .patterns import MAX_STOP_PATTERN_CHARS, compile_stop_pattern
from .structured.spec import GuidedDecodingParams

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "LIMITS", "MAX_SAMPLES", "RequestOutputKind", "SamplingParams"]

#: Number of tokens the token generator produces when ``SamplingParams.max_new_tokens`` is None.
DEFAULT_MAX_NEW_TOKENS = 256

_MAX_SEED = 2**63 - 1
_MAX_LOGPROBS = 20
#: Largest ``n`` / ``best_of``: samples of one prompt (each one a running request).
MAX_SAMPLES = 64
_MAX_INT32 = 2**31 - 1  # top_k, min_new_tokens, step counters live in int32 device tables
_FLT_MAX = 3.4028234663852886e38  # logit_bias values are fp32 on the device
#: Positive temperatures below this are refused: logits / T overflows fp32 (use 0 for greedy).
MIN_TEMPERATURE = 1e-5
#: Size limits of one request's settings, each refused with a ``ValueError`` naming it.
LIMITS = {
    "logit_bias entries": 65536,
    "stop strings": 64,
    "stop string characters": 1024,
    "stop_pattern characters": MAX_STOP_PATTERN_CHARS,
    "bad_words_token_ids entries": 4096,
    "bad word tokens": 128,
}
_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "detokenize", "skip_special_tokens")
# name -> (check, allowed range in words); NaN always fails.
_FLOAT_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: v == 0 or MIN_TEMPERATURE <= v < math.inf,
                    f"finite and >= 0: 0 (greedy) or >= {MIN_TEMPERATURE} (smaller ones overflow fp32)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "typical_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
}
# name -> (check, allowed range in words, None allowed)
_INT_RULES: dict[str, tuple[Callable[[int], bool], str, bool]] = {
    "top_k": (lambda v: -1 <= v <= _MAX_INT32, ">= -1 and <= 2**31 - 1 (0 or -1 disables it)", False),
    "min_new_tokens": (lambda v: 0 <= v <= _MAX_INT32, ">= 0 and <= 2**31 - 1", False),
    "max_new_tokens": (lambda v: 1 <= v <= _MAX_INT32, ">= 1 and <= 2**31 - 1, or None", True),
    "seed": (lambda v: 0 <= v <= _MAX_SEED, f"in [0, 2**63 - 1] ({_MAX_SEED}) or None", True),
    "logprobs": (lambda v: 0 <= v <= _MAX_LOGPROBS, f"in [0, {_MAX_LOGPROBS}] or None", True),
    "prompt_logprobs": (lambda v: 0 <= v <= _MAX_LOGPROBS, f"in [0, {_MAX_LOGPROBS}] or None", True),
    "n": (lambda v: 1 <= v <= MAX_SAMPLES, f"in [1, {MAX_SAMPLES}]", False),
    "best_of": (lambda v: 1 <= v <= MAX_SAMPLES, f"in [1, {MAX_SAMPLES}] or None", True),
    "truncate_prompt_tokens": (lambda v: v == -1 or 1 <= v <= _MAX_INT32,
                               ">= 1 (keep the last k prompt tokens), -1 (fit the context) or None", True),
}
# SamplingParams field -> HF GenerationConfig attribute
_HF_FIELDS = {name: name for name in ("temperature", "top_k", "top_p", "min_p", "typical_p",
                                      "repetition_penalty", "max_new_tokens", "min_new_tokens")}
_HF_FIELDS.update(bad_words_token_ids="bad_words_ids", stop="stop_strings")
_HF_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "typical_p")


def _id_set(name: str, value: Any) -> tuple[int, ...] | None:
    """Token-id collection -> sorted tuple without duplicates (None stays None)."""
    if value is None:
        return None
    return tuple(sorted({token_id(name, t) for t in as_items(name, value)}))


def _logit_bias(bias: Any) -> Mapping[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping {{token_id: bias}} or None, "
                         f"got {describe(bias)}")
    if len(bias) > LIMITS["logit_bias entries"]:
        raise ValueError(f"logit_bias must have at most {LIMITS['logit_bias entries']} entries, "
                         f"got {len(bias)}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        tid = token_id("logit_bias keys", key)
        out[tid] = check_float(f"logit_bias[{tid}]", value,
                               lambda v: v == -math.inf or -_FLT_MAX <= v <= _FLT_MAX,
                               "within the float32 range or -inf (bans the token)")
    return types.MappingProxyType(out) if out else None


def _stop_strings(stop: Any) -> tuple[str, ...] | None:
    stop = [stop] if isinstance(stop, str) else as_items("stop", stop)
    if len(stop) > LIMITS["stop strings"]:
        raise ValueError(f"stop must have at most {LIMITS['stop strings']} strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must contain non-empty strings, got {describe(s)}")
        if len(s) > LIMITS["stop string characters"]:
            raise ValueError(f"stop strings must be at most {LIMITS['stop string characters']} "
                             f"characters, got one of {len(s)}")
    return tuple(stop) or None


def _bad_words(value: Any) -> tuple[tuple[int, ...], ...] | None:
    words = []
    items = as_items("bad_words_token_ids", value)
    if len(items) > LIMITS["bad_words_token_ids entries"]:
        raise ValueError(f"bad_words_token_ids must have at most {LIMITS['bad_words_token_ids entries']} "
                         f"entries, got {len(items)}")
    for word in items:
        ids = tuple(token_id("bad_words_token_ids", t)
                    for t in as_items("bad_words_token_ids entries", word, ordered=True))
        if not ids:
            raise ValueError("bad_words_token_ids entries must be non-empty sequences of "
                             "token ids >= 0, got an empty sequence")
        if len(ids) > LIMITS["bad word tokens"]:
            raise ValueError(f"bad_words_token_ids entries must have at most {LIMITS['bad word tokens']} "
                             f"tokens, got {len(ids)}")
        words.append(ids)
    return tuple(words) or None


class RequestOutputKind(enum.Enum):
    """What :meth:`~decodekit.LLM.stream_outputs` yields for a request: ``CUMULATIVE`` the
    whole output so far at every step, ``DELTA`` only what is new since the last yield,
    ``FINAL_ONLY`` one output when the request is done."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _output_kind(value: Any) -> RequestOutputKind:
    if isinstance(value, RequestOutputKind):
        return value
    if isinstance(value, str) and value.upper() in RequestOutputKind.__members__:
        return RequestOutputKind[value.upper()]
    raise ValueError(f"output_kind must be a RequestOutputKind or one of "
                     f"{[k.lower() for k in RequestOutputKind.__members__]}, got {describe(value)}")


@dataclass(frozen=True)
class SamplingParams:
    """Validated, immutable sampling settings for one request.

    Parameters
    ----------
    temperature : float
        Softmax temperature, finite and >= 0; 0 means greedy decoding.
    top_k : int
        Keep the ``top_k`` most likely tokens; 0 or -1 disables it (-1 is stored as 0).
    top_p, typical_p : float
        Nucleus / locally-typical probability mass in (0, 1]; 1 disables the filter.
    min_p : float
        In [0, 1]: drop tokens less likely than ``min_p`` times the most likely one.
    repetition_penalty : float
        Multiplicative penalty (finite, > 0) on already-seen tokens; 1 disables it.
    frequency_penalty, presence_penalty : float
        Additive penalties in [-2, 2], per occurrence / per distinct seen token.
    logit_bias : Mapping[int, float] or None
        Added to the logits of token ids; -inf bans the token. Stored as a read-only
        ``MappingProxyType``, or None when empty.
    allowed_token_ids, stop_token_ids : Sequence[int] or None
        Only these ids may be sampled (must be non-empty) / extra ids that end generation.
        Stored as sorted tuples without duplicates (an empty ``stop_token_ids`` as None).
    bad_words_token_ids : Sequence[Sequence[int]] or None
        Non-empty token sequences that must never be generated; stored as tuple of tuples.
    min_new_tokens, max_new_tokens : int, int or None
        Length bounds; EOS/stop tokens are suppressed before ``min_new_tokens``. A None
        ``max_new_tokens`` means :data:`DEFAULT_MAX_NEW_TOKENS`.
    stop : Sequence[str] or None
        Non-empty stop strings; a single string is wrapped into a 1-tuple.
    stop_pattern : str or None
        Regular expression (RE2 syntax, matched in linear time: no lookaround or
        backreferences) that ends generation when found in the text; it must not be able to
        match an empty string.
    seed : int or None
        Per-request RNG seed in [0, 2**63 - 1].
    logprobs : int or None
        Return the top-n log-probabilities, n in [0, 20]; 0 returns only the chosen token's.
    ignore_eos, include_stop_str_in_output, detokenize, skip_special_tokens : bool
        Keep generating past EOS; keep the matched stop string / pattern in the returned text;
        output text options.
    guided_decoding : GuidedDecodingParams or None
        Constrain the output to a JSON schema, regex, choice or grammar
        (:class:`~decodekit.GuidedDecodingParams`). The request finishes (``"stop"``) when the
        grammar is complete and a stop token is drawn, even with ``ignore_eos``; where the
        grammar and this request's own masks (``logit_bias`` -inf, ``allowed_token_ids``,
        bad words, ``min_new_tokens``) leave no token in common, the grammar wins that step.
    n : int
        Outputs per prompt, in [1, 64]. The prompt is prefilled once and the request forks
        into ``best_of or n`` samples, sample ``i`` seeded ``seed + i`` (so it equals the
        request seeded ``seed + i``; the generator draws ``seed`` when it is None).
    best_of : int or None
        Samples drawn, ``n <= best_of <= 64``; the ``n`` with the highest cumulative raw
        log-probability are returned (None: ``n``).
    prompt_logprobs : int or None
        Return, for every prompt token after the first, its log-probability given the tokens
        before it (the model's raw log-softmax) and the top-k, k in [0, 20].
    output_kind : RequestOutputKind or str
        What :meth:`~decodekit.LLM.stream_outputs` yields: ``CUMULATIVE`` (default),
        ``DELTA`` or ``FINAL_ONLY``.
    truncate_prompt_tokens : int or None
        Keep only the last k prompt tokens (k >= 1), or -1: the most that fit the context
        (``max_seq_len - max_new_tokens``). ``new_context``'s keyword overrides it.

    Raises
    ------
    ValueError
        For any invalid field; the message names the field, the value and the allowed range.
        Size limits: :data:`LIMITS`.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    allowed_token_ids: Sequence[int] | None = None
    bad_words_token_ids: Sequence[Sequence[int]] | None = None
    min_new_tokens: int = 0
    max_new_tokens: int | None = None
    ignore_eos: bool = False
    stop: Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    stop_pattern: str | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    guided_decoding: GuidedDecodingParams | None = None
    n: int = 1
    best_of: int | None = None
    prompt_logprobs: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name, (ok, requirement) in _FLOAT_RULES.items():
            set_(name, check_float(name, getattr(self, name), ok, requirement))
        for name, (ok, requirement, optional) in _INT_RULES.items():
            if not (optional and getattr(self, name) is None):
                set_(name, check_int(name, getattr(self, name), ok, requirement))
        set_("top_k", max(self.top_k, 0))  # -1 and 0 both mean "off"
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be <= max_new_tokens, got min_new_tokens="
                             f"{self.min_new_tokens} > max_new_tokens={self.max_new_tokens}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool (True or False), "
                                 f"got {describe(getattr(self, name))}")
        set_("logit_bias", _logit_bias(self.logit_bias))
        set_("allowed_token_ids", _id_set("allowed_token_ids", self.allowed_token_ids))
        if self.allowed_token_ids == ():
            raise ValueError("allowed_token_ids must be None or a non-empty sequence of token "
                             "ids >= 0, got an empty sequence (nothing could be sampled)")
        set_("stop_token_ids", _id_set("stop_token_ids", self.stop_token_ids) or None)
        if self.bad_words_token_ids is not None:
            set_("bad_words_token_ids", _bad_words(self.bad_words_token_ids))
        if self.stop is not None:
            set_("stop", _stop_strings(self.stop))
        if self.stop_pattern is not None:
            compile_stop_pattern(self.stop_pattern)
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be >= n (or None), got best_of={self.best_of} < n={self.n}")
        set_("output_kind", _output_kind(self.output_kind))
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            raise ValueError(f"guided_decoding must be a GuidedDecodingParams or None, got "
                             f"{describe(self.guided_decoding)}")

    def _plain_fields(self) -> dict[str, Any]:
        """Field values by name, with ``logit_bias`` as a plain dict."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["logit_bias"] = None if self.logit_bias is None else dict(self.logit_bias)
        return out

    def __hash__(self) -> int:
        values = self._plain_fields()
        if values["logit_bias"] is not None:
            values["logit_bias"] = tuple(sorted(values["logit_bias"].items()))
        return hash(tuple(values.values()))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mappingproxy cannot be pickled or deep-copied: rebuild from plain values instead.
        return (functools.partial(type(self), **self._plain_fields()), ())

    def __repr__(self) -> str:
        values = self._plain_fields()
        parts = [f"{f.name}={values[f.name]!r}" for f in dataclasses.fields(self)
                 if values[f.name] != f.default]
        return f"{type(self).__name__}({', '.join(parts)})"

    @property
    def samples(self) -> int:
        """Samples drawn for the prompt: ``best_of or n``."""
        return self.best_of or self.n

    @property
    def is_greedy(self) -> bool:
        """True when ``temperature == 0`` (argmax decoding)."""
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """True when a repetition, frequency or presence penalty is active."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)

    @property
    def uses_filtering(self) -> bool:
        """True when sampling (not greedy) with top-k, top-p, min-p or typical-p truncation."""
        return not self.is_greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
                                       or self.typical_p < 1.0)

    def effective_top_k(self, vocab_size: int) -> int:
        """Return the top-k to apply: 0 when off, else ``min(top_k, vocab_size)``."""
        vocab_size = check_int("vocab_size", vocab_size, lambda v: v >= 1, ">= 1")
        return 0 if self.top_k <= 0 else min(self.top_k, vocab_size)

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Raise ValueError (naming field, id and range) for any token id not in [0, vocab)."""
        vocab_size = check_int("vocab_size", vocab_size, lambda v: v >= 1, ">= 1")
        bad_words = (t for word in self.bad_words_token_ids or () for t in word)
        for name, ids in (("logit_bias", self.logit_bias or ()), ("bad_words_token_ids", bad_words),
                          ("allowed_token_ids", self.allowed_token_ids or ()),
                          ("stop_token_ids", self.stop_token_ids or ())):
            for tid in ids:
                if tid >= vocab_size:
                    raise ValueError(f"{name} contains token id {tid}, outside the vocabulary "
                                     f"range [0, {vocab_size})")

    def replace(self, **changes: Any) -> SamplingParams:
        """Return a copy with ``changes`` applied, validated again like a new instance."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(cls, generation_config: Any, **overrides: Any) -> SamplingParams:
        """Build params from a ``transformers.GenerationConfig``, a dict or a similar object.

        Parameters
        ----------
        generation_config : GenerationConfig, Mapping or object
            Source of the HF attributes; missing or None attributes use this class's defaults.
        **overrides
            Field values applied after the mapping (e.g. ``seed=0``).

        Raises
        ------
        TypeError
            If an override is not a field of :class:`SamplingParams`.
        ValueError
            If ``sequence_bias`` biases a multi-token sequence, or a mapped value is invalid.

        Notes
        -----
        ``do_sample`` not True (HF's default is False) gives greedy decoding (temperature 0)
        and the sampling fields are not read. Otherwise ``temperature``, ``top_k``, ``top_p``,
        ``min_p`` and ``typical_p`` are kept as stated (a None ``top_k`` gives 0, not HF's
        generate-time default of 50). ``bad_words_ids`` -> ``bad_words_token_ids``,
        ``stop_strings`` -> ``stop``, single-token ``sequence_bias`` and ``suppress_tokens``
        (as -inf) -> ``logit_bias``. Other fields (``max_length``, beams, ``eos_token_id``,
        ``num_logprobs``, ``output_logits``, ...) are ignored.
        """
        get: Callable[[str], Any] = (
            generation_config.get if isinstance(generation_config, Mapping)
            else lambda name: getattr(generation_config, name, None))
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in overrides if k not in names]
        if unknown:
            raise TypeError(f"from_generation_config() got unknown override(s) "
                            f"{', '.join(map(repr, unknown))}; valid fields are {', '.join(names)}")
        sampling = get("do_sample") is True
        kwargs: dict[str, Any] = {} if sampling else {"temperature": 0.0}
        for name, hf_name in _HF_FIELDS.items():
            if (sampling or name not in _HF_SAMPLING_ONLY) and get(hf_name) is not None:
                kwargs[name] = get(hf_name)
        bias: dict[Any, float] = {}
        seq_bias = get("sequence_bias") or {}
        for seq, value in seq_bias.items() if isinstance(seq_bias, Mapping) else seq_bias:
            seq = [seq] if isinstance(seq, numbers.Integral) else as_items("sequence_bias", seq)
            if len(seq) != 1:
                raise ValueError(f"sequence_bias entry {tuple(seq)!r} has {len(seq)} tokens; only "
                                 f"single-token sequence biases are supported (as logit_bias)")
            bias[seq[0]] = value
        for tid in as_items("suppress_tokens", get("suppress_tokens") or ()):
            bias[tid] = -math.inf
        kwargs["logit_bias"] = bias or None
        kwargs.update(overrides)
        return cls(**kwargs)
