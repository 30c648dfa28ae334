"""Grammars and matchers for guided decoding, on xgrammar (default) or llguidance.

:class:`Grammars` (one per generator) builds xgrammar's tokenizer info once, with the model's
padded vocabulary and its EOS ids, and compiles each :class:`~.spec.GuidedDecodingParams`
through a cache keyed by the spec (a failed compile is a ``ValueError`` naming the field).
:class:`Guide` is one request's matcher: it fills that request's row of the token bitmask
(``int32 [B, ceil(V / 32)]``, bit ``i % 32`` of word ``i // 32`` set = token ``i`` allowed),
accepts the sampled tokens, forks, and rolls back.

May call: xgrammar and llguidance (optional dependencies, imported when first needed).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from .spec import GuidedDecodingParams

__all__ = ["Grammars", "Guide", "bitmask_words"]

_CACHE_SIZE = 256  # compiled grammars kept per generator


def bitmask_words(vocab_size: int) -> int:
    """Words per bitmask row: ``ceil(V / 32)``."""
    return -(-vocab_size // 32)


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise ValueError("guided_decoding needs the xgrammar package: pip install 'decodekit[guided]'") \
            from exc
    return xgrammar


def _close_objects(schema: Any) -> Any:
    """A JSON schema with ``additionalProperties: false`` on every object that sets none."""
    if isinstance(schema, dict):
        out = {k: _close_objects(v) for k, v in schema.items()}
        if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_close_objects(v) for v in schema]
    return schema


class Grammars:
    """Compiles guided-decoding specs for one tokenizer and vocabulary, on either backend.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        The generator's tokenizer (its vocabulary defines what each token id spells).
    vocab_size : int
        The model's logits width (may exceed the tokenizer's vocabulary: the extra ids are
        never allowed).
    eos_token_ids : Sequence[int]
        The ids that end a completed grammar.

    The backends' tokenizer views are built on first use: xgrammar's for ``"auto"`` and
    ``"xgrammar"``, llguidance's (an optional package) for ``"llguidance"``.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        if tokenizer is None:
            raise ValueError("guided_decoding needs the generator's tokenizer (TokenGenerator(model, "
                             "tokenizer)), got None")
        self._tokenizer = tokenizer
        self.vocab_size, self.eos_token_ids = vocab_size, tuple(eos_token_ids)
        self._xgr_compiler: Any = None
        self._llg_tokenizer: Any = None
        self._cache: OrderedDict[GuidedDecodingParams, Any] = OrderedDict()

    def compile(self, spec: GuidedDecodingParams) -> Any:
        """The compiled grammar of ``spec`` (cached); ``ValueError`` naming the field if it does
        not compile or the backend cannot take it."""
        hit = self._cache.get(spec)
        if hit is not None:
            self._cache.move_to_end(spec)
            return hit
        compiled = self._compile_llg(spec) if spec.backend == "llguidance" else self._compile_xgr(spec)
        self._cache[spec] = compiled
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return compiled

    def guide(self, spec: GuidedDecodingParams) -> Guide:
        """A fresh matcher for one request."""
        compiled = self.compile(spec)
        if spec.backend == "llguidance":
            import llguidance

            m = _LlgMatcher(llguidance.LLMatcher(self._llg_tokenizer, compiled, log_level=0),
                            bitmask_words(self.vocab_size))
        else:
            m = _XgrMatcher(_xgrammar().GrammarMatcher(compiled, max_rollback_tokens=-1))
        return Guide(m, self.vocab_size, self.eos_token_ids)

    def _compile_xgr(self, spec: GuidedDecodingParams) -> Any:
        mode = spec.mode
        if spec.whitespace_pattern is not None:
            raise ValueError("guided_decoding.whitespace_pattern is not supported by the xgrammar backend "
                             "(use disable_any_whitespace, or backend='llguidance')")
        if self._xgr_compiler is None:
            xgr = _xgrammar()
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=list(self.eos_token_ids) or None)
            self._xgr_compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
        c = self._xgr_compiler
        try:
            if mode == "json":
                schema = _schema(spec)
                return c.compile_json_schema(json.dumps(schema),
                                             any_whitespace=not spec.disable_any_whitespace)
            if mode == "json_object":
                return c.compile_json_schema('{"type": "object"}', strict_mode=False,
                                             any_whitespace=not spec.disable_any_whitespace)
            if mode == "regex":
                return c.compile_regex(spec.regex)
            if mode == "choice":
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec.choice))
            if mode == "grammar":
                if "::=" in spec.grammar:
                    return c.compile_grammar(spec.grammar)
                return c.compile_lark(spec.grammar)
            return c.compile_structural_tag(spec.structural_tag)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/its own
            raise ValueError(f"guided_decoding.{mode} does not compile: {str(exc).strip()[:500]}") from None

    def _compile_llg(self, spec: GuidedDecodingParams) -> str:
        """llguidance's grammar text for ``spec``, validated against the tokenizer."""
        try:
            import llguidance
            import llguidance.hf
        except ImportError as exc:
            raise ValueError("guided_decoding.backend 'llguidance' needs the llguidance package: "
                             "pip install 'decodekit[guided]'") from exc
        if self._llg_tokenizer is None:
            eos = list(self.eos_token_ids) or None
            try:
                self._llg_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size,
                                                                   eos_token=eos)
            except TypeError:  # older llguidance (1.0) takes one EOS id
                self._llg_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size,
                                                                   eos_token=eos[0] if eos else None)
        M, mode = llguidance.LLMatcher, spec.mode
        opts: dict[str, Any] = {"whitespace_flexible": not spec.disable_any_whitespace}
        if spec.whitespace_pattern is not None:
            opts["whitespace_pattern"] = spec.whitespace_pattern
        try:
            if mode in ("json", "json_object"):
                schema = _schema(spec) if mode == "json" else {"type": "object"}
                grammar = M.grammar_from_json_schema(json.dumps(schema), defaults=opts)
            elif mode == "regex":
                grammar = M.grammar_from_regex(spec.regex)
            elif mode == "choice":
                grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in spec.choice))
            elif mode == "grammar":
                grammar = llguidance.grammar_from("grammar", spec.grammar)
            else:
                raise ValueError("guided_decoding.structural_tag needs the xgrammar backend")
            err = M.validate_grammar(grammar, self._llg_tokenizer)
        except ValueError as exc:
            if "structural_tag" in str(exc):
                raise
            err = str(exc)
        if err and not err.startswith("WARNING"):
            raise ValueError(f"guided_decoding.{mode} does not compile: {err.strip()[:500]}")
        return grammar


def _schema(spec: GuidedDecodingParams) -> Any:
    schema = json.loads(spec.json)
    return _close_objects(schema) if spec.disable_additional_properties else schema


class _XgrMatcher:
    """xgrammar's ``GrammarMatcher`` behind the methods :class:`Guide` uses."""

    def __init__(self, m: Any) -> None:
        self.m = m

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:  # False: refused, state unchanged
        return bool(self.m.accept_token(token))

    def rollback(self, n: int) -> None:
        self.m.rollback(n)

    def fork(self) -> _XgrMatcher:
        return _XgrMatcher(self.m.fork())

    def terminated(self) -> bool:
        return bool(self.m.is_terminated())

    def forced(self) -> list[int]:
        return list(self.m.find_jump_forward_tokens())


class _LlgMatcher:
    """llguidance's ``LLMatcher`` behind the same methods (same bitmask layout)."""

    def __init__(self, m: Any, words: int) -> None:
        self.m, self.words = m, words

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        r = bitmask[row]
        if not r.is_contiguous() or r.dtype != torch.int32 or r.numel() != self.words:
            raise ValueError("bitmask rows must be contiguous int32 of ceil(V / 32) words")
        self.m.unsafe_compute_mask_ptr(r.data_ptr(), self.words * 4)

    def accept(self, token: int) -> bool:  # False: refused, state unchanged
        return self.m.try_consume_tokens([token]) == 1

    def rollback(self, n: int) -> None:
        self.m.rollback(n)

    def fork(self) -> _LlgMatcher:
        return _LlgMatcher(self.m.deep_copy(), self.words)

    def terminated(self) -> bool:
        return bool(self.m.is_stopped())

    def forced(self) -> list[int]:
        return list(self.m.compute_ff_tokens())


class Guide:
    """One request's grammar state: which tokens may come next, and the tokens accepted.

    ``accepted`` counts the tokens accepted so far; ``terminated`` turns True once the
    grammar is complete and a stop token was accepted (the request is then finished), or
    once ``dead``: the grammar needed text no token of the vocabulary spells (the request
    then ends with an EOS token, and a ``RuntimeWarning``)."""

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> None:
        self._m = matcher
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.accepted = 0
        self.dead = False

    @property
    def terminated(self) -> bool:
        return self.dead or self._m.terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 CPU ``[B, W]``); False
        (the row left all-zero) when the grammar allows no token of the vocabulary."""
        self._m.fill(bitmask, row)
        return bool(bitmask[row].any())

    def fill_or_end(self, bitmask: torch.Tensor, row: int) -> None:
        """:meth:`fill`; at a dead end the row allows only the EOS ids and the guide is
        ``dead`` (the request stops at the next token)."""
        if self.fill(bitmask, row) or self.dead:
            return
        import warnings

        warnings.warn("guided decoding: the grammar needs text that no token of this vocabulary spells; "
                      "the request ends here with an EOS token", RuntimeWarning, stacklevel=2)
        self.dead = True
        for t in self.eos_token_ids or (0,):
            bit = 1 << (t % 32)
            bitmask[row, t // 32] |= bit - (1 << 32 if bit >= 1 << 31 else 0)  # as int32

    def accept(self, token: int) -> None:
        """Advance past ``token``; ``RuntimeError`` if the grammar does not allow it (the
        sampler never draws a masked token, so this is a bug, never a user error). A dead
        guide takes its EOS without advancing."""
        if self.dead:
            return
        if not self._m.accept(int(token)):
            raise RuntimeError(f"guided decoding: token {token} is not allowed by the grammar at this point")
        self.accepted += 1

    def try_accept(self, token: int) -> bool:
        """Advance past ``token`` if the grammar allows it; False (nothing changed) if not."""
        ok = self._m.accept(int(token))
        self.accepted += ok
        return ok

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` accepted tokens."""
        if n > 0:
            self._m.rollback(n)
            self.accepted -= n

    def fork(self) -> Guide:
        """An independent copy at the same point (for forked requests)."""
        g = Guide(self._m.fork(), self.vocab_size, self.eos_token_ids)
        g.accepted, g.dead = self.accepted, self.dead
        return g

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (jump-forward), without accepting them."""
        return self._m.forced()
