"""NVTX ranges under one ``decodekit`` domain, cheap enough to leave on.

Range names are dotted (``decodekit.step``, ``decodekit.prefill``, ``decodekit.forward``,
``decodekit.sample``); numbers go in the payload, not the name. With the ``nvtx``
package installed the ranges carry the ``decodekit`` domain; otherwise they go through
``torch.cuda.nvtx``. Without CUDA they cost one function call.

Capture: ``nsys profile -t cuda,nvtx --cuda-graph-trace=node python your_loop.py``.

Calls nothing else in decodekit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["nvtx_range", "push", "pop"]

try:  # the nvtx package gives real domains and payloads
    import nvtx as _nvtx

    _DOMAIN = _nvtx.get_domain("decodekit")
except Exception:  # pragma: no cover - optional dependency
    _nvtx = None
    _DOMAIN = None


def _enabled() -> bool:
    return torch.cuda.is_available()


def push(name: str, payload: int | None = None) -> None:
    """Open range ``name`` (e.g. ``"decodekit.step"``)."""
    if not _enabled():
        return
    if _DOMAIN is not None:
        attrs = _DOMAIN.get_event_attributes(message=name, payload=payload)
        _DOMAIN.push_range(attrs)
    else:
        torch.cuda.nvtx.range_push(name if payload is None else f"{name}")


def pop() -> None:
    """Close the innermost range."""
    if not _enabled():
        return
    if _DOMAIN is not None:
        _DOMAIN.pop_range()
    else:
        torch.cuda.nvtx.range_pop()


@contextlib.contextmanager
def nvtx_range(name: str, payload: int | None = None) -> Iterator[None]:
    """``with nvtx_range("decodekit.step", batch_size):`` — balanced even on exceptions."""
    push(name, payload)
    try:
        yield
    finally:
        pop()
