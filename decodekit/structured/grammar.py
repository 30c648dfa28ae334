"""Grammars and matchers for guided decoding, on xgrammar.

:class:`Grammars` (one per generator) builds xgrammar's tokenizer info once, with the model's
padded vocabulary and its EOS ids, and compiles each :class:`~.spec.GuidedDecodingParams`
through a cache keyed by the spec (a failed compile is a ``ValueError`` naming the field).
:class:`Guide` is one request's matcher: it fills that request's row of the token bitmask
(``int32 [B, ceil(V / 32)]``, bit ``i % 32`` of word ``i // 32`` set = token ``i`` allowed),
accepts the sampled tokens, forks, and rolls back.

May call: xgrammar (an optional dependency, imported when the first grammar is needed).
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
    """Compiles guided-decoding specs for one tokenizer and vocabulary.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        The generator's tokenizer (its vocabulary defines what each token id spells).
    vocab_size : int
        The model's logits width (may exceed the tokenizer's vocabulary: the extra ids are
        never allowed).
    eos_token_ids : Sequence[int]
        The ids that end a completed grammar.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        if tokenizer is None:
            raise ValueError("guided_decoding needs the generator's tokenizer (TokenGenerator(model, "
                             "tokenizer)), got None")
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(eos_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=True)
        self._cache: OrderedDict[GuidedDecodingParams, Any] = OrderedDict()

    def compile(self, spec: GuidedDecodingParams) -> Any:
        """The compiled grammar of ``spec`` (cached); ``ValueError`` naming the field if it does
        not compile or the backend cannot take it."""
        hit = self._cache.get(spec)
        if hit is not None:
            self._cache.move_to_end(spec)
            return hit
        compiled = self._compile(spec)
        self._cache[spec] = compiled
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return compiled

    def guide(self, spec: GuidedDecodingParams) -> Guide:
        """A fresh matcher for one request."""
        xgr = _xgrammar()
        return Guide(xgr.GrammarMatcher(self.compile(spec), max_rollback_tokens=-1), self.vocab_size)

    def _compile(self, spec: GuidedDecodingParams) -> Any:
        if spec.backend == "llguidance":
            raise ValueError("guided_decoding.backend 'llguidance' is not available in this build; use "
                             "'auto' or 'xgrammar'")
        mode = spec.mode
        if spec.whitespace_pattern is not None:
            raise ValueError("guided_decoding.whitespace_pattern is not supported by the xgrammar backend "
                             "(use disable_any_whitespace)")
        c = self._compiler
        try:
            if mode == "json":
                schema = json.loads(spec.json)
                if spec.disable_additional_properties:
                    schema = _close_objects(schema)
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


class Guide:
    """One request's grammar state: which tokens may come next, and the tokens accepted.

    ``accepted`` counts the tokens accepted so far; ``terminated`` turns True once the
    grammar is complete and a stop token was accepted (the request is then finished)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size
        self.accepted = 0

    @property
    def terminated(self) -> bool:
        return bool(self._m.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 CPU ``[B, W]``)."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        """Advance past ``token``; ``RuntimeError`` if the grammar does not allow it (the
        sampler never draws a masked token, so this is a bug, never a user error)."""
        if not self._m.accept_token(int(token)):
            raise RuntimeError(f"guided decoding: token {token} is not allowed by the grammar at this point")
        self.accepted += 1

    def try_accept(self, token: int) -> bool:
        """Advance past ``token`` if the grammar allows it; False (nothing changed) if not."""
        ok = bool(self._m.accept_token(int(token)))
        self.accepted += ok
        return ok

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` accepted tokens."""
        if n > 0:
            self._m.rollback(n)
            self.accepted -= n

    def fork(self) -> Guide:
        """An independent copy at the same point (for forked requests)."""
        g = Guide(self._m.fork(), self.vocab_size)
        g.accepted = self.accepted
        return g

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (jump-forward), without accepting them."""
        return list(self._m.find_jump_forward_tokens())
