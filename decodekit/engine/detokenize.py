"""Streaming (incremental) detokenization that is safe for multi-byte UTF-8 and byte tokens.

:class:`IncrementalDetokenizer` turns a growing list of generated token ids into text, a
chunk at a time, with the prefix/read offset scheme used by vLLM and TGI: only a small window
of recent tokens is decoded per step, and text is held back while it ends in an incomplete
UTF-8 sequence (a byte-fallback or byte-level token that is only part of a character).

Calls only the tokenizer it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["PROMPT_CONTEXT_TOKENS", "IncrementalDetokenizer"]

#: Number of trailing prompt tokens decoded as left context for the first output tokens.
PROMPT_CONTEXT_TOKENS = 5

# A UTF-8 character is at most 4 bytes, so an incomplete one at the end of the text holds at
# most 3 bytes: its lead byte lies in the last 3 tokens (every token that decodes to bytes
# holds at least one), and the text before that token is complete unless it is invalid UTF-8.
# When more than _MAX_HELD_TOKENS tokens are held back and no split point before the last 3
# tokens gives complete text, that text is invalid UTF-8 which no later token can repair, and
# it is emitted (as U+FFFD).
_MAX_HELD_TOKENS = 8
_INCOMPLETE_TAIL_TOKENS = 3
_REPLACEMENT_CHAR = "\ufffd"


def _new_suffix(prefix_text: str, full_text: str) -> str:
    """Return the part of ``full_text`` after ``prefix_text``.

    When ``prefix_text`` is not a prefix of ``full_text`` (a decoder that rewrites text across
    token boundaries) the text after their longest common prefix is returned, so that no new
    character is lost.
    """
    if full_text.startswith(prefix_text):
        return full_text[len(prefix_text):]
    common = 0
    for a, b in zip(prefix_text, full_text, strict=False):
        if a != b:
            break
        common += 1
    return full_text[common:]


class IncrementalDetokenizer:
    """Convert generated token ids to text incrementally (streaming).

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase or tokenizers.Tokenizer
        Any Hugging Face tokenizer (fast, slow/Python backend) or a raw ``tokenizers.Tokenizer``;
        only its ``decode`` is used. Tokenization-space clean-up is turned off (it rewrites
        text across token boundaries and is not what the model generated).
    prompt_token_ids : list[int] or None
        The prompt; its last :data:`PROMPT_CONTEXT_TOKENS` tokens (from the first one that
        starts a character) are decoded as left context so that the first output token keeps
        its leading space (SentencePiece ``▁`` decoders strip it at the start of a text). They
        are not part of :attr:`token_ids` or :attr:`text`. Without a prompt the text equals
        ``tokenizer.decode(token_ids)``; with one it equals the part of
        ``tokenizer.decode(prompt + token_ids)`` after the decoded prompt.
    skip_special_tokens : bool
        Drop special tokens from the text (passed to ``decode``).

    Notes
    -----
    The state is the token list and two offsets into it: ``prefix_offset`` (start of a short
    window of already-emitted tokens used as context) and ``read_offset`` (end of the emitted
    tokens). Each :meth:`push` decodes ``tokens[prefix_offset:]`` (the decode of
    ``tokens[prefix_offset:read_offset]`` is cached) and emits the text after the prefix text,
    unless it ends in U+FFFD: then an incomplete multi-byte character is held back until a later
    token completes it. After an emission the window moves forward, so the work per push is
    proportional to the new tokens plus a window of a few tokens, never to the whole output.
    A run of tokens that decodes to no text (e.g. skipped special tokens) extends the window
    instead of moving it. If more than a few tokens in a row cannot be completed to valid
    UTF-8, the invalid part is emitted as U+FFFD (it can never become valid), which keeps the
    window bounded.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Iterable[int] | None = None, *,
                 skip_special_tokens: bool = True) -> None:
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"tokenizer must be a tokenizer with a decode() method, "
                             f"got {type(tokenizer).__name__}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = bool(skip_special_tokens)
        self._raw = _is_raw_tokenizer(tokenizer)
        self._backend = tokenizer if self._raw else _fast_backend(tokenizer)
        context = [] if prompt_token_ids is None else [int(t) for t in prompt_token_ids]
        context = context[-PROMPT_CONTEXT_TOKENS:] if PROMPT_CONTEXT_TOKENS else []
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        # Start the context at a character boundary: some decoders (SentencePiece byte
        # fallback) turn a whole run of byte tokens into U+FFFD when it begins mid-character.
        for start in range(len(context)):
            if not self._decode(context[start:]).startswith(_REPLACEMENT_CHAR):
                self._prefix_offset = start
                break
        self._prefix_text: str | None = None  # cached decode of ids[prefix_offset:read_offset]
        self._parts: list[str] = []
        self._text_cache: str | None = ""

    # ------------------------------------------------------------------ internals

    def shared(self) -> dict[int, object]:
        """A ``copy.deepcopy`` memo that keeps the tokenizer objects shared: a copy of this
        detokenizer (a forked request's) copies only its own offsets and ids."""
        return {id(self._tokenizer): self._tokenizer, id(self._backend): self._backend}

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:  # the Rust decoder directly: no per-call Python conversions
            return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens,
                                      clean_up_tokenization_spaces=False)

    def _window_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        return self._prefix_text

    def _emit(self, end: int, window_text: str) -> str:
        """Emit the text of ``ids[read_offset:end]``; ``window_text`` decodes
        ``ids[prefix_offset:end]``."""
        delta = _new_suffix(self._window_prefix_text(), window_text)
        if delta:
            self._prefix_offset, self._read_offset = self._read_offset, end
            self._prefix_text = None
            self._parts.append(delta)
            self._text_cache = None
        else:  # no visible text (yet): keep the context window, move the read offset only
            self._read_offset = end
            self._prefix_text = window_text
        return delta

    # ------------------------------------------------------------------ public API
    def push(self, token_ids: Iterable[int]) -> str:
        """Append generated tokens and return the text they finalise.

        Parameters
        ----------
        token_ids : Iterable[int]
            New token ids (one or several).

        Returns
        -------
        str
            The newly complete text; may be ``""`` (e.g. the tokens end inside a multi-byte
            character, whose bytes are held back until it is complete).
        """
        self._ids.extend(int(t) for t in token_ids)
        end = len(self._ids)
        if end == self._read_offset:
            return ""
        window_text = self._decode(self._ids[self._prefix_offset:end])
        if not window_text.endswith(_REPLACEMENT_CHAR):
            return self._emit(end, window_text)
        # The incomplete character starts in one of the last few tokens: emit the complete
        # text before it (if these tokens bring any).
        for split in range(end - 1, max(self._read_offset, end - _INCOMPLETE_TAIL_TOKENS - 1),
                           -1):
            head = self._decode(self._ids[self._prefix_offset:split])
            if not head.endswith(_REPLACEMENT_CHAR):
                return self._emit(split, head)
        if end - self._read_offset <= _MAX_HELD_TOKENS:
            return ""
        # Too long to be one incomplete character: the text before the last tokens is invalid
        # UTF-8 that no later token can repair; emit it.
        split = end - _INCOMPLETE_TAIL_TOKENS
        return self._emit(split, self._decode(self._ids[self._prefix_offset:split]))

    def flush(self) -> str:
        """Emit whatever is held back, even an incomplete character (as U+FFFD).

        Call it once at the end of generation. Returns the text it adds to :attr:`text`.
        """
        end = len(self._ids)
        if end == self._read_offset:
            return ""
        return self._emit(end, self._decode(self._ids[self._prefix_offset:end]))

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the :meth:`push`/:meth:`flush`
        results)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._parts)
            self._parts = [self._text_cache] if self._text_cache else []
        return self._text_cache

    @property
    def token_ids(self) -> tuple[int, ...]:
        """All generated token ids pushed so far (without the prompt context)."""
        return tuple(self._ids[self._num_context:])

    @property
    def num_pending_tokens(self) -> int:
        """Number of pushed tokens whose text is still held back."""
        return len(self._ids) - self._read_offset

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_tokens={len(self._ids) - self._num_context}, "
                f"prefix_offset={self._prefix_offset}, read_offset={self._read_offset}, "
                f"pending={self.num_pending_tokens})")


def _is_raw_tokenizer(tokenizer: Any) -> bool:
    """True for a ``tokenizers.Tokenizer`` (whose decode has no clean-up argument)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        return False
    return isinstance(tokenizer, Tokenizer)


def _fast_backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a stock fast transformers tokenizer (exactly that
    class, so ``backend.decode(ids, skip_special_tokens=s)`` equals
    ``tokenizer.decode(ids, skip_special_tokens=s, clean_up_tokenization_spaces=False)``), else
    None: a subclass may decode its own way and keeps its ``decode``."""
    try:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast as Fast
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        return None
    if type(tokenizer) is not Fast:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None
