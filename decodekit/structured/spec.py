"""What a request's output must match: :class:`GuidedDecodingParams` (EasyDeL's field names).

Immutable and hashable (a JSON schema is stored as canonical JSON text), so compiled grammars
are cached by it. Validation here is structural (exactly one mode, types, JSON that parses);
whether a schema, regex or grammar compiles is checked when the generator compiles it
(:mod:`.grammar`), also as a ``ValueError`` naming the field.

May call: nothing in decodekit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BACKENDS", "MODES", "GuidedDecodingParams"]

#: The output constraints; exactly one is set per request.
MODES = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
BACKENDS = ("auto", "xgrammar", "llguidance")
_MAX_CHOICES = 4096


def _canonical_json(name: str, value: Any) -> str:
    """A schema given as a mapping or JSON text -> canonical JSON text (sorted keys)."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{name} must be valid JSON text or a mapping, got invalid JSON: "
                             f"{exc}") from None
    if not isinstance(value, (Mapping, bool)):
        raise ValueError(f"{name} must be a JSON object (a mapping or its JSON text), got "
                         f"{type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not serialisable as JSON: {exc}") from None


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _choices(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"choice must be a sequence of strings, got {type(value).__name__}")
    if not 1 <= len(value) <= _MAX_CHOICES:
        raise ValueError(f"choice must hold 1 to {_MAX_CHOICES} strings, got {len(value)}")
    for c in value:
        if not isinstance(c, str) or not c:
            raise ValueError(f"choice entries must be non-empty strings, got {c!r}")
    return tuple(dict.fromkeys(value))  # order kept, duplicates dropped


@dataclass(frozen=True)
class GuidedDecodingParams:
    """A constraint on a request's output: set exactly one of the modes.

    Parameters
    ----------
    json : Mapping or str
        A JSON schema (a mapping or its JSON text); the output is a JSON document valid for it.
    json_object : bool
        True: the output is any JSON object.
    regex : str
        The output matches this regular expression (whole output).
    choice : Sequence[str]
        The output is exactly one of these strings.
    grammar : str
        A context-free grammar: EBNF / GBNF (rules written ``name ::= ...``, the start rule
        ``root``) or Lark (rules written ``name: ...``, the start rule ``start``).
    structural_tag : Mapping or str
        An xgrammar structural tag (JSON text or a mapping), e.g. tool calls in tags.
    backend : {"auto", "xgrammar", "llguidance"}
        ``auto``: xgrammar. ``llguidance`` (an optional package; a ``ValueError`` at compile
        time when it is missing) takes every mode but ``structural_tag``.
    disable_any_whitespace : bool
        JSON modes: no whitespace between tokens except what the compact form needs.
    disable_additional_properties : bool
        JSON schema: objects without an ``additionalProperties`` entry get ``false``.
    whitespace_pattern : str or None
        A regex for JSON whitespace (llguidance); the xgrammar backend refuses it (a
        ``ValueError`` when the grammar is compiled), as vLLM's does.

    Raises
    ------
    ValueError
        No mode or more than one, or a malformed value; the message names the field.
    """

    json: str | Mapping | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    structural_tag: str | Mapping | None = None
    backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        modes = [m for m in MODES if getattr(self, m) not in (None, False)]
        if len(modes) != 1:
            raise ValueError(f"exactly one of {', '.join(MODES)} must be set in GuidedDecodingParams, "
                             f"got {', '.join(modes) if modes else 'none'}")
        if self.json is not None:
            set_("json", _canonical_json("json", self.json))
        if self.structural_tag is not None:
            set_("structural_tag", _canonical_json("structural_tag", self.structural_tag))
        if self.json_object not in (None, True, False):
            raise ValueError(f"json_object must be a bool or None, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None:
                _text(name, getattr(self, name))
        if self.choice is not None:
            set_("choice", _choices(self.choice))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.backend!r}")
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.whitespace_pattern is not None:
            _text("whitespace_pattern", self.whitespace_pattern)

    @property
    def mode(self) -> str:
        """The mode that is set: one of :data:`MODES`."""
        return next(m for m in MODES if getattr(self, m) not in (None, False))

    def replace(self, **changes: Any) -> GuidedDecodingParams:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
