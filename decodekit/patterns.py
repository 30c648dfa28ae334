"""Stop patterns: regular expressions matched in linear time (RE2), never by backtracking.

Python's ``re`` backtracks: a pattern such as ``(\\S+\\s*)+!`` takes time exponential in
the text it fails on, and the EOS tracker searches the output after every token, so one
request could block a whole batch. Stop patterns are therefore compiled with Google's RE2
(package ``google-re2``), whose matching time is linear in the text. RE2 has no
backreferences and no lookaround; such patterns are refused at validation with a
``ValueError``, as are patterns longer than :data:`MAX_STOP_PATTERN_CHARS` and patterns that
can match an empty string (``x*``, ``^``, ``\\b``: they would stop generation at once).

Calls nothing else in decodekit.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["MAX_STOP_PATTERN_CHARS", "compile_stop_pattern"]

#: Longest stop pattern accepted (characters).
MAX_STOP_PATTERN_CHARS = 1024
_MAX_PROGRAM_BYTES = 8 << 20  # RE2's memory budget for one compiled pattern
# Texts on which a pattern must not produce an empty match (anchors, word boundaries, x*).
_PROBES = ("", "a", " ", "a b", "word. Word!\n", "0 1", "\t-\n")


def _re2() -> Any:
    try:
        import re2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ValueError("stop_pattern needs the google-re2 package (`pip install google-re2`): "
                         "decodekit matches stop patterns without backtracking") from e
    return re2


@functools.lru_cache(maxsize=256)
def compile_stop_pattern(pattern: str) -> Any:
    """The compiled RE2 pattern (``search(text, pos)`` -> match with ``start()``/``end()``).

    Raises
    ------
    ValueError
        Not a string, too long, not valid RE2 syntax (lookaround and backreferences are
        not supported), or able to match an empty string.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"stop_pattern must be a regular expression string or None, got "
                         f"{pattern!r} ({type(pattern).__name__})")
    if len(pattern) > MAX_STOP_PATTERN_CHARS:
        raise ValueError(f"stop_pattern must be at most {MAX_STOP_PATTERN_CHARS} characters, "
                         f"got {len(pattern)}")
    re2 = _re2()
    options = re2.Options()
    options.log_errors = False
    options.max_mem = _MAX_PROGRAM_BYTES
    try:
        compiled = re2.compile(pattern, options)
    except Exception as exc:  # re2.error: syntax RE2 does not accept
        raise ValueError(f"stop_pattern must be a valid regular expression (RE2 syntax: no lookaround "
                         f"or backreferences), got {pattern!r}: {exc}") from None
    for probe in _PROBES:
        for pos in range(len(probe) + 1):
            m = compiled.search(probe, pos)
            if m is not None and m.end() == m.start():
                raise ValueError(f"stop_pattern must not match an empty string (it would stop "
                                 f"generation at once; e.g. x*, ^, $, \\b), got {pattern!r}")
    return compiled
