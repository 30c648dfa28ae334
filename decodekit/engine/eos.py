"""Stop conditions of one request: :class:`EOSTracker` decides where generation ends.

It follows the shape of MAX's ``EOSTracker`` and the output conventions of vLLM: tokens are
committed (one or several at a time, e.g. from speculative decoding), the tracker finds the
first stop point among them, drops the rest, and returns the text to stream with stop strings
removed and held back while they could still be forming.

May call: :mod:`.detokenize`, the params.
"""

from __future__ import annotations

import copy
import numbers
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .. import _checks as checks
from ..params import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from ..patterns import compile_stop_pattern
from .detokenize import IncrementalDetokenizer

__all__ = ["Commit", "EOSTracker", "FinishReason", "StopReason"]

FinishReason = Literal["stop", "length"]
#: What stopped a request: an EOS / stop token id, a stop string, the ``stop_pattern`` string,
#: or the tuple of ids of a multi-token EOS sequence.
StopReason = int | str | tuple[int, ...] | None


@dataclass(frozen=True)
class Commit:
    """Result of :meth:`EOSTracker.commit`.

    Attributes
    ----------
    token_ids : tuple[int, ...]
        The committed tokens that are kept: all of them, or those up to and including the
        stop token (the EOS / stop token id, the last token of an EOS sequence, or the token
        in which a stop string or pattern match completed), or up to the length limit.
    text : str
        New text to stream (``""`` when there is none or no text is produced). The texts of
        all commits concatenate to :attr:`EOSTracker.text`.
    finished : bool
        True when this commit ended the request.
    finish_reason : {"stop", "length"} or None
        ``"stop"`` for an EOS token / sequence, stop token, stop string or pattern;
        ``"length"`` at ``max_new_tokens``; None while unfinished.
    stop_reason : int, str, tuple[int, ...] or None
        The EOS or stop token id, the stop string, the ``stop_pattern``, or the EOS sequence
        (as a tuple) that ended the request; None otherwise (also for ``"length"``).
    """

    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: StopReason


def _prefix_function(s: str) -> list[int]:
    """KMP failure table: ``f[i]`` = length of the longest proper prefix of ``s[:i + 1]`` that
    is also its suffix."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class _StopStrings:
    """Incremental matching of stop strings, one KMP automaton each: memory linear in the
    strings' lengths and O(1) amortised work per character and string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._fail = [_prefix_function(s) for s in stops]
        self._state = [0] * len(stops)  # characters of each string matched at the text's end

    def feed(self, text: str, base: int) -> tuple[int, int, str] | None:
        """Advance over ``text`` (starting at output position ``base``); return the first stop
        string completed in it as ``(end, start, string)`` (the longest of those ending at the
        same place), or None."""
        first = None
        for i, ch in enumerate(text):
            done = None
            for k, s in enumerate(self.stops):
                st, fail = self._state[k], self._fail[k]
                if st == len(s):
                    st = fail[st - 1]
                while st and s[st] != ch:
                    st = fail[st - 1]
                if s[st] == ch:
                    st += 1
                self._state[k] = st
                if st == len(s) and (done is None or len(s) > len(done)):
                    done = s
            if done is not None and first is None:
                first = (base + i + 1, base + i + 1 - len(done), done)
        return first

    def partial(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string (text
        that must be held back: it may still become a stop string)."""
        return max((st for st, s in zip(self._state, self.stops, strict=True) if st < len(s)), default=0)


class EOSTracker:
    """Track one request's generated tokens and decide where it stops.

    Parameters
    ----------
    params : SamplingParams
        Uses ``stop``, ``stop_token_ids``, ``stop_pattern``, ``include_stop_str_in_output``,
        ``ignore_eos``, ``min_new_tokens``, ``max_new_tokens``, ``skip_special_tokens`` and
        ``detokenize``.
    eos_token_ids : Iterable[int] or int
        The model's EOS token ids (any of them stops); ignored when ``params.ignore_eos``.
    eos_sequences : Iterable[Sequence[int]]
        Multi-token EOS sequences: generation stops when the generated tokens end with one of
        them (the whole sequence is the stop: kept in ``token_ids``, its text left out of the
        output). Ignored when ``params.ignore_eos``.
    tokenizer : transformers tokenizer or None
        Needed for text output and for ``stop`` / ``stop_pattern``.
    prompt_token_ids : Iterable[int] or None
        The prompt, used as left context for detokenization only.
    default_max_new_tokens : int
        Limit used when ``params.max_new_tokens`` is None.

    Raises
    ------
    ValueError
        If ``stop`` or ``stop_pattern`` is set without a tokenizer (naming the field), or an
        argument is malformed.

    Notes
    -----
    Stop points, checked for every committed token in order; the first one ends the request:

    1. From the ``min_new_tokens``-th generated token on (earlier stop points are ignored,
       the tokens are treated as ordinary text): an EOS id (unless ``ignore_eos``) or a
       ``stop_token_ids`` id (always); then a completed EOS sequence (the longest one if
       several end here); then a stop string or ``stop_pattern`` match in the new text (the
       match that ends first, then the longest).
    2. The ``max_new_tokens``-th token: ``finish_reason="length"`` (a stop point on that same
       token wins, as in vLLM).

    Output conventions (vLLM's): an EOS / stop token or EOS sequence is kept in ``token_ids``
    but its text is not in the output, unless ``include_stop_str_in_output`` (then it is
    detokenized like any token, with ``skip_special_tokens``). For a stop string the text ends
    just before it, or just after it with ``include_stop_str_in_output``; ``token_ids`` end with
    the token in which the match completed. Held-back text (see below) is flushed at the end,
    including an incomplete UTF-8 character (as U+FFFD).

    Streaming: text is held back while the end of the output could still be the start of a
    stop string or belongs to tokens that could be the start of an EOS sequence, so text that
    is later cut is never streamed. A regular expression cannot be tested for a future match,
    so ``stop_pattern`` holds nothing back: if its match begins in text that was already
    streamed, the output is cut at the end of the streamed text (text is never retracted).

    Cost: per committed token, stop strings are searched only in the window that can hold a new
    match (the held-back tail, shorter than the longest stop string, plus the new text), and the
    detokenizer decodes a window of a few tokens. ``stop_pattern`` is the exception: the regex
    is re-run on the whole output text after every token that adds text (``re.search`` from
    after the last match skipped because of ``min_new_tokens``), so it costs O(output length)
    per token.

    Without a tokenizer, or with ``detokenize=False``, no text is returned (:attr:`text` stays
    ``""``); with ``detokenize=False`` the text is still decoded internally when stop strings
    or a pattern need it.
    """

    def __init__(self, params: SamplingParams, *, eos_token_ids: Iterable[int] | int = (),
                 eos_sequences: Iterable[Sequence[int]] = (), tokenizer: Any = None,
                 prompt_token_ids: Iterable[int] | None = None,
                 default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(default_max_new_tokens, bool) or not isinstance(
                default_max_new_tokens, numbers.Integral) or default_max_new_tokens < 1:
            raise ValueError(f"default_max_new_tokens must be an int >= 1, "
                             f"got {default_max_new_tokens!r}")
        if isinstance(eos_token_ids, numbers.Integral) and not isinstance(eos_token_ids, bool):
            eos_token_ids = [eos_token_ids]
        eos_ids = set(checks.token_ids("eos_token_ids", eos_token_ids))
        seqs: list[tuple[int, ...]] = []
        for seq in checks.as_items("eos_sequences", eos_sequences):
            ids = tuple(checks.token_ids("eos_sequences entry", seq))
            if not ids:
                raise ValueError("eos_sequences must contain non-empty sequences of token ids, "
                                 "got an empty sequence")
            seqs.append(ids)
        for name in ("stop", "stop_pattern"):
            if getattr(params, name) and tokenizer is None:
                raise ValueError(f"{name} is set ({getattr(params, name)!r}) but no tokenizer "
                                 f"was given: stop strings and patterns are matched on the text")

        self._params = params
        self._eos_ids = frozenset() if params.ignore_eos else frozenset(eos_ids)
        self._stop_ids = frozenset(params.stop_token_ids or ())
        self._seqs: tuple[tuple[int, ...], ...] = () if params.ignore_eos else tuple(seqs)
        self._max_new = (int(default_max_new_tokens) if params.max_new_tokens is None
                         else params.max_new_tokens)
        self._min_new = params.min_new_tokens
        self._include_stop = params.include_stop_str_in_output

        self._stops = _StopStrings(tuple(params.stop or ()))
        self._pattern = None if params.stop_pattern is None else compile_stop_pattern(params.stop_pattern)
        self._pattern_pos = 0     # regex search start (after matches skipped by min_new_tokens)
        self._pattern_floor = 0   # matches ending at or before this are ignored

        needs_text = bool(self._stops.stops) or self._pattern is not None
        self._tokenizer = tokenizer
        self._returns_text = tokenizer is not None and params.detokenize
        self._detok = (IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                              skip_special_tokens=params.skip_special_tokens)
                       if tokenizer is not None and (params.detokenize or needs_text) else None)

        self._token_ids: list[int] = []
        self._parts: list[str] = []       # emitted (streamed) text
        self._emitted_len = 0
        self._emitted_cache: str | None = ""
        self._held = ""                   # decoded but not yet streamed
        self._chunks: list[str] = []      # text emitted by the current commit
        # EOS-sequence matching: (sequence index, tokens matched) of the partial matches, and
        # the output length (emitted + held) before each of the last max-sequence-length tokens.
        self._active: list[tuple[int, int]] = []
        self._text_len_before: deque[int] = deque(maxlen=max((len(s) for s in self._seqs),
                                                             default=1))
        self._finished = False
        self._finish_reason: FinishReason | None = None
        self._stop_reason: StopReason = None

    # ------------------------------------------------------------------ properties

    def fork(self) -> EOSTracker:
        """An independent copy of this tracker's state (the tokenizer is shared, not copied):
        a forked request goes on from the same text."""
        memo = {id(self._tokenizer): self._tokenizer}
        if self._detok is not None:
            memo |= self._detok.shared()
        return copy.deepcopy(self, memo)

    @property
    def text(self) -> str:
        """The output text streamed so far (the concatenation of all ``Commit.text``)."""
        return self._emitted_text() if self._returns_text else ""

    @property
    def token_ids(self) -> tuple[int, ...]:
        """All kept generated tokens."""
        return tuple(self._token_ids)

    @property
    def num_generated(self) -> int:
        """Number of kept generated tokens."""
        return len(self._token_ids)

    @property
    def finished(self) -> bool:
        """True once a stop point or the length limit was reached."""
        return self._finished

    @property
    def finish_reason(self) -> FinishReason | None:
        """``"stop"``, ``"length"`` or None (unfinished)."""
        return self._finish_reason

    @property
    def stop_reason(self) -> StopReason:
        """What stopped the request (see :class:`Commit`), or None."""
        return self._stop_reason

    @property
    def max_new_tokens(self) -> int:
        """The effective length limit."""
        return self._max_new

    # ------------------------------------------------------------------ commit
    def commit(self, token_ids: Iterable[int], *, stop_after: int | None = None) -> Commit:
        """Add newly generated tokens; stop at the first stop point among them.

        Parameters
        ----------
        token_ids : Iterable[int]
            One or several new tokens in generation order (several for multi-step or
            speculative decoding). Tokens after the first stop point are dropped.
        stop_after : int or None
            Index of a token that ends the request (``finish_reason="stop"``, the token as
            the stop reason, treated like a stop token) if nothing stopped it earlier: a
            guided request whose grammar terminated there, whatever ``ignore_eos`` and
            ``min_new_tokens`` say.

        Returns
        -------
        Commit
            The kept tokens, the text to stream and the finish state.

        Raises
        ------
        RuntimeError
            If the request has already finished.
        """
        if self._finished:
            raise RuntimeError(f"commit() called after the request finished "
                               f"(finish_reason={self._finish_reason!r})")
        ids = checks.token_ids("token_ids", token_ids)
        self._chunks = []
        kept: list[int] = []
        for i, tid in enumerate(ids):
            kept.append(tid)
            if self._step(tid):
                break
            if i == stop_after:
                self._finish("stop", tid, flush=True)
                break
        if not self._finished:
            self._release()
        text = "".join(self._chunks) if self._returns_text else ""
        self._chunks = []
        return Commit(tuple(kept), text, self._finished, self._finish_reason, self._stop_reason)

    # ------------------------------------------------------------------ internals
    def _emit(self, text: str) -> None:
        if text:
            self._parts.append(text)
            self._chunks.append(text)
            self._emitted_len += len(text)
            self._emitted_cache = None

    def _push(self, tid: int) -> str:
        if self._detok is None:
            return ""
        delta = self._detok.push([tid])
        self._held += delta
        return delta

    def _finish(self, reason: FinishReason, stop_reason: StopReason, *, flush: bool = False,
                cut: int | None = None) -> bool:
        if flush and self._detok is not None:
            self._held += self._detok.flush()
        if cut is not None:
            self._held = self._held[:max(cut - self._emitted_len, 0)]
        self._emit(self._held)
        self._held = ""
        self._finished = True
        self._finish_reason = reason
        self._stop_reason = stop_reason
        return True

    def _match_sequences(self, tid: int) -> tuple[int, ...] | None:
        """Advance the EOS-sequence partial matches; return the longest completed sequence."""
        if not self._seqs:
            return None
        active: list[tuple[int, int]] = []
        done: tuple[int, ...] | None = None
        for si, m in [*self._active, *((si, 0) for si in range(len(self._seqs)))]:
            seq = self._seqs[si]
            if seq[m] == tid:
                if m + 1 == len(seq):
                    if done is None or len(seq) > len(done):
                        done = seq
                else:
                    active.append((si, m + 1))
        self._active = active
        return done

    def _step(self, tid: int) -> bool:
        """Keep one token and check its stop points; return True if it finished the request."""
        self._token_ids.append(tid)
        n = len(self._token_ids)
        can_stop = n >= self._min_new
        if self._seqs:
            self._text_len_before.append(self._emitted_len + len(self._held))
        done_seq = self._match_sequences(tid)
        if can_stop and (tid in self._eos_ids or tid in self._stop_ids):
            if self._include_stop:
                self._push(tid)
            return self._finish("stop", tid, flush=True)
        if can_stop and done_seq is not None:
            if self._include_stop:
                self._push(tid)
                return self._finish("stop", done_seq, flush=True)
            return self._finish("stop", done_seq, cut=self._text_len_before[-len(done_seq)])
        old_held = len(self._held)
        delta = self._push(tid)
        stop_hit = self._stops.feed(delta, self._emitted_len + old_held) if delta else None
        if not can_stop:
            self._pattern_floor = self._emitted_len + len(self._held)
        elif delta:
            hit = self._search(stop_hit)
            if hit is not None:
                return self._finish("stop", hit[1], cut=hit[0])
        if n >= self._max_new:
            return self._finish("length", None, flush=True)
        return False

    def _search(self, stop_hit: tuple[int, int, str] | None) -> tuple[int, str] | None:
        """The first stop point ending in the newest text: the first stop string completed in
        it (``stop_hit``: end, start, string) or the first ``stop_pattern`` match (RE2, linear
        time), whichever ends first. Returns the cut position in the output text and the stop
        reason, or None."""
        best = stop_hit  # (end, start, reason), output coordinates
        if self._pattern is not None:
            text = self._emitted_text() + self._held
            m = self._pattern.search(text, self._pattern_pos)
            while m is not None and (m.end() <= self._pattern_floor or m.end() == m.start()):
                self._pattern_pos = max(m.end(), m.start() + 1)
                m = self._pattern.search(text, self._pattern_pos)
            if m is not None:
                cand = (m.end(), m.start(), self._params.stop_pattern)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is None:
            return None
        end, start, reason = best
        return max(end if self._include_stop else start, self._emitted_len), reason

    def _emitted_text(self) -> str:
        if self._emitted_cache is None:
            self._emitted_cache = "".join(self._parts)
            self._parts = [self._emitted_cache]
        return self._emitted_cache

    def _release(self) -> None:
        """Stream the held text that can no longer be cut."""
        limit = len(self._held) - min(self._stops.partial(), len(self._held))
        if self._active:
            longest = max(m for _, m in self._active)
            limit = min(limit, self._text_len_before[-longest] - self._emitted_len)
        if limit > 0:
            self._emit(self._held[:limit])
            self._held = self._held[limit:]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_generated={self.num_generated}, "
                f"max_new_tokens={self._max_new}, finished={self._finished}, "
                f"finish_reason={self._finish_reason!r}, stop_reason={self._stop_reason!r})")
