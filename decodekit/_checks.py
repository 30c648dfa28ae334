"""One set of argument validators for the whole package.

Every public entry point checks its input with these and raises ``ValueError`` naming
the argument and the allowed range (never a traceback from deep inside, never a silent
coercion of a bool or float into an int).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
               "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16}

__all__ = [
    "as_items",
    "check_device",
    "check_dtype",
    "check_float",
    "check_int",
    "describe",
    "int_at_least",
    "is_int",
    "is_real",
    "token_id",
    "token_ids",
]


def describe(value: Any) -> str:
    """``repr`` plus type name, for error messages."""
    return f"{value!r} ({type(value).__name__})"


def is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number that is not a bool (ints, floats, numpy scalars)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, ok: Callable[[int], bool] = lambda v: True,
              requirement: str = "") -> int:
    """``int(value)`` if it is an integer (not bool) with ``ok(value)``, else ``ValueError``."""
    want = f"an int {requirement}" if requirement else "an int"
    if not is_int(value):
        raise ValueError(f"{name} must be {want}, got {describe(value)}")
    value = int(value)
    if not ok(value):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return value


def int_at_least(name: str, value: Any, lo: int) -> int:
    """An int ``>= lo``."""
    return check_int(name, value, lambda v: v >= lo, f">= {lo}")


def check_float(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> float:
    """``float(value)`` for a real number (not bool, not NaN) with ``ok(value)``."""
    if not is_real(value):
        raise ValueError(f"{name} must be a real number {requirement}, got {describe(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range (10**400)
        raise ValueError(f"{name} must be {requirement}, got an int too large for a float") from None
    if math.isnan(value) or not ok(value):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return value


def token_id(name: str, value: Any) -> int:
    """A token id: an int >= 0."""
    return check_int(name, value, lambda v: v >= 0, "token id >= 0")


def as_items(name: str, value: Any, ordered: bool = False) -> list[Any]:
    """Materialise a collection argument (list, tuple, range, numpy array, tensor, ...);
    ``ordered`` refuses sets, whose order is arbitrary."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    unordered = ordered and isinstance(value, (set, frozenset))
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable) or unordered:
        raise ValueError(f"{name} must be a sequence, got {describe(value)}")
    return list(value)


def token_ids(name: str, value: Any, vocab_size: int | None = None) -> list[int]:
    """A sequence of token ids, each in ``[0, vocab_size)`` when the size is given."""
    out = [token_id(f"{name} entry", t) for t in as_items(name, value, ordered=True)]
    if vocab_size is not None:
        for t in out:
            if t >= vocab_size:
                raise ValueError(f"{name} entry {t} outside [0, {vocab_size})")
    return out


def check_dtype(name: str, value: Any) -> torch.dtype | None:
    """None, a floating ``torch.dtype`` or one of :data:`DTYPE_NAMES` (``"bfloat16"``, ...)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in DTYPE_NAMES:
            raise ValueError(f"{name} must be one of {sorted(DTYPE_NAMES)} or a torch dtype, "
                             f"got {value!r}")
        return DTYPE_NAMES[value]
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{name} must be a floating torch dtype or one of {sorted(DTYPE_NAMES)}, "
                         f"got {describe(value)}")
    return value


def check_device(name: str, value: Any) -> torch.device | None:
    """None or a device that exists here (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...)."""
    if value is None:
        return None
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be a torch device such as 'cpu' or 'cuda', "
                         f"got {describe(value)}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {str(dev)!r} but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} is {str(dev)!r} but there are {torch.cuda.device_count()} "
                             "CUDA devices")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"{name} must be 'cpu' or a CUDA device, got {str(dev)!r}")
    return dev
