"""Steering vectors and per-request steering settings.

A :class:`SteeringVector` maps decoder-layer indices to directions in the residual stream;
a :class:`Steering` says how one request uses it (strength, which token positions, which op).
The injection lives in :mod:`decodekit.steering.hooks`, training in :mod:`decodekit.steering.train`,
files in :mod:`decodekit.steering.io`.

Layer numbering
---------------
Layer ``i`` is the i-th decoder block, 0-based (``model.model.layers[i]`` for llama-like
models); its vector is applied to that block's output, which transformers reports as
``hidden_states[i + 1]`` under ``output_hidden_states=True`` (``hidden_states[0]`` is the
embedding output).

The ops, at a steered position with hidden state ``h`` and the layer's vector ``v``
(``u = v / |v|``, and ``u = 0`` when ``v = 0``):

* ``add``:    ``h + strength * v``
* ``ablate``: ``h - (h . u) u``                              (removes the component along v)
* ``clamp``:  ``h - (h . u) u + strength * |v| * u``         (sets that component to strength |v|)

May call: :mod:`.io` (files), the validators.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .._checks import check_float, describe, is_int, is_real

__all__ = ["SteeringVector", "Steering", "POSITION_END"]

#: Exclusive end of an unbounded position range ("all", "generated", ``slice(k, None)``).
POSITION_END = 1 << 62
_FLT_MAX = 3.4028234663852886e38

_POSITION_KINDS = ("all", "prompt", "generated")
_OPS = ("add", "ablate", "clamp")

Positions = Literal["all", "prompt", "generated"] | slice
Op = Literal["add", "ablate", "clamp"]





def _direction(layer: Any, value: Any) -> tuple[int, torch.Tensor]:
    if not is_int(layer) or layer < 0:
        raise ValueError(f"steering vector layer must be an int >= 0, got {describe(layer)}")
    t = torch.as_tensor(value).detach()
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"steering vector layer {layer}: expected a real tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"steering vector layer {layer}: expected a 1-D tensor [hidden_size], "
                         f"got shape {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.float32).clone().contiguous()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"steering vector layer {layer}: every value must be finite in float32 "
                         "(got NaN or inf)")
    return int(layer), t


class SteeringVector(Mapping[int, torch.Tensor]):
    """Per-layer directions ``{layer_index: tensor[hidden_size]}`` (fp32, CPU), plus metadata.

    Parameters
    ----------
    directions : Mapping[int, Tensor | array-like]
        One 1-D direction per decoder layer (0-based), all of the same length. Copied and
        stored as fp32 on the CPU.
    model_name : str, optional
        The model the vector was made for (informational; written to files).
    method : str, optional
        How it was made (``"mean_diff"``, ``"pca"``, ...).
    metadata : Mapping[str, str], optional
        Free-form string metadata, saved with the vector.

    Notes
    -----
    Arithmetic: ``v1 + v2`` and ``v1 - v2`` act on the union of layers (a layer present in
    one operand only is kept as is, or negated); ``2 * v``, ``v * 2``, ``v / 3`` and ``-v``
    scale every layer. The result keeps metadata the operands agree on.
    """

    __hash__ = None  # type: ignore[assignment]  # mutable-looking tensors: equality, not identity

    def __init__(self, directions: Mapping[int, Any], *, model_name: str | None = None,
                 method: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        if not isinstance(directions, Mapping):
            raise ValueError(f"directions must be a mapping {{layer: tensor}}, got {describe(directions)}")
        if len(directions) == 0:
            raise ValueError("directions must name at least one layer, got an empty mapping")
        items = sorted(_direction(k, v) for k, v in directions.items())
        sizes = {t.numel() for _, t in items}
        if len(sizes) != 1:
            detail = ", ".join(f"layer {k}: {t.numel()}" for k, t in items)
            raise ValueError(f"steering vector layers disagree on hidden size ({detail})")
        for name, value in (("model_name", model_name), ("method", method)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a str or None, got {describe(value)}")
        meta = dict(metadata or {})
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"metadata must map str to str, got {k!r}: {describe(v)}")
        self._directions: dict[int, torch.Tensor] = dict(items)
        self._hidden_size = sizes.pop()
        self.model_name = model_name
        self.method = method
        self.metadata: dict[str, str] = meta

    # -- Mapping -------------------------------------------------------------------------
    def __getitem__(self, layer: int) -> torch.Tensor:
        return self._directions[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._directions)

    def __len__(self) -> int:
        return len(self._directions)

    @property
    def hidden_size(self) -> int:
        """Length of every direction."""
        return self._hidden_size

    @property
    def layers(self) -> tuple[int, ...]:
        """The steered layer indices, ascending."""
        return tuple(self._directions)

    def __repr__(self) -> str:
        return (f"SteeringVector(layers={list(self.layers)}, hidden_size={self.hidden_size}, "
                f"model_name={self.model_name!r}, method={self.method!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return (self.layers == other.layers and self.model_name == other.model_name
                and self.method == other.method and self.metadata == other.metadata
                and all(torch.equal(self[k], other[k]) for k in self.layers))

    # -- arithmetic ----------------------------------------------------------------------
    def _derived(self, directions: dict[int, torch.Tensor], other: SteeringVector | None = None
                 ) -> SteeringVector:
        def agree(a: Any, b: Any) -> Any:
            return a if b is None or a == b else (b if a is None else None)

        if other is None:
            return SteeringVector(directions, model_name=self.model_name, method=self.method,
                                  metadata=self.metadata)
        meta = {k: v for k, v in self.metadata.items() if other.metadata.get(k, v) == v}
        meta.update({k: v for k, v in other.metadata.items() if k not in self.metadata})
        return SteeringVector(directions, model_name=agree(self.model_name, other.model_name),
                              method=agree(self.method, other.method), metadata=meta)

    def _combine(self, other: Any, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.hidden_size != self.hidden_size:
            raise ValueError(f"cannot combine steering vectors of hidden size {self.hidden_size} "
                             f"and {other.hidden_size}")
        out = dict(self._directions)
        for k, t in other.items():
            out[k] = out[k] + sign * t if k in out else sign * t
        return self._derived(out, other)

    def __add__(self, other: Any) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: Any) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, scale: Any) -> SteeringVector:
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            scale = scale.item()
        if not is_real(scale):
            return NotImplemented
        scale = check_float("scale", scale, math.isfinite, "finite")
        return self._derived({k: t * scale for k, t in self.items()})

    __rmul__ = __mul__

    def __truediv__(self, divisor: Any) -> SteeringVector:
        if not is_real(divisor):
            return NotImplemented
        if divisor == 0:
            raise ZeroDivisionError("cannot divide a steering vector by 0")
        divisor = check_float("divisor", divisor, math.isfinite, "finite and non-zero")
        return self._derived({k: t / divisor for k, t in self.items()})

    def __neg__(self) -> SteeringVector:
        return self._derived({k: -t for k, t in self.items()})

    # -- checks --------------------------------------------------------------------------
    def check_fits(self, num_layers: int, hidden_size: int, what: str = "model") -> None:
        """Raise ValueError unless every layer is in ``[0, num_layers)`` and sizes match.

        Parameters
        ----------
        num_layers : int
            Number of decoder layers of the target.
        hidden_size : int
            Its residual-stream width.
        what : str
            How to name the target in the message (``"model"``, ``"draft model"``, ...).
        """
        if self.hidden_size != hidden_size:
            raise ValueError(f"steering vector hidden size {self.hidden_size} but the {what} has "
                             f"{hidden_size}")
        bad = [k for k in self.layers if k >= num_layers]
        if bad:
            raise ValueError(f"steering vector layer {bad[0]} outside the {what}'s {num_layers} decoder "
                             f"layers [0, {num_layers})")

    @classmethod
    def coerce(cls, obj: SteeringVector | Mapping[int, Any] | str | os.PathLike[str]) -> SteeringVector:
        """Return ``obj`` as a SteeringVector: itself, ``{layer: tensor}``, or a file path."""
        if isinstance(obj, SteeringVector):
            return obj
        if isinstance(obj, Mapping):
            return cls(obj)
        if isinstance(obj, (str, os.PathLike)):
            return cls.load(obj)
        raise TypeError(f"expected a SteeringVector, a {{layer: tensor}} mapping or a file path "
                        f"(.safetensors or .gguf), got {describe(obj)}")

    # -- files ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vector to ``path``: a GGUF control vector if it ends in ``.gguf``, else
        safetensors (formats: :mod:`decodekit.steering.io`)."""
        from . import io

        io.save(path, dict(self.items()), model_name=self.model_name, method=self.method,
                metadata=self.metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringVector:
        """Read a vector written by :meth:`save` (or a llama.cpp / repeng ``.gguf`` control vector)."""
        from . import io

        directions, meta = io.load(path)
        return cls(directions, **meta)


@dataclass(frozen=True)
class Steering:
    """How one request is steered.

    Parameters
    ----------
    vector : SteeringVector | Mapping[int, Tensor] | str | PathLike
        The directions; mappings and paths are converted with :meth:`SteeringVector.coerce`.
    strength : float
        Finite multiplier of the vector (``add``, ``clamp``); ignored by ``ablate``.
    positions : {"all", "prompt", "generated"} or slice
        Which tokens are steered, by ABSOLUTE position in the request (the prompt's first
        token is 0): every token, the prompt's, the generated ones (from position
        ``prompt_len`` on), or ``slice(start, stop)`` with ``start, stop >= 0`` or None and
        step None or 1.
    op : {"add", "ablate", "clamp"}
        See the module docstring for the math.
    """

    vector: SteeringVector
    strength: float = 1.0
    positions: Positions = "all"
    op: Op = "add"

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", SteeringVector.coerce(self.vector))
        strength = check_float("strength", self.strength, lambda v: abs(v) <= _FLT_MAX,
                               "a finite real number within the float32 range")
        object.__setattr__(self, "strength", strength)
        if self.op not in _OPS:
            raise ValueError(f"op must be one of {', '.join(map(repr, _OPS))}, got {describe(self.op)}")
        _check_positions(self.positions)
        for layer, v in self.vector.items():  # what the hooks add: strength * v, in float32
            if not bool(torch.isfinite(v * torch.tensor(strength, dtype=torch.float32)).all()):
                raise ValueError(f"strength {strength!r} times the vector of layer {layer} overflows "
                                 "float32")

    def digest(self) -> bytes:
        """16 bytes naming what this steering does to a position's keys and values (op,
        strength and every layer's vector; the positions are not part of it): the prefix
        cache salts the blocks it covers with this."""
        h = hashlib.blake2b(f"{self.op}:{self.strength!r}".encode(), digest_size=16)
        for layer, v in sorted(self.vector.items()):
            h.update(f"|{layer}:".encode())
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.digest()

    def position_range(self, prompt_len: int) -> tuple[int, int]:
        """Half-open range ``[lo, hi)`` of absolute positions steered, for a prompt of ``prompt_len``."""
        if not is_int(prompt_len) or prompt_len < 0:
            raise ValueError(f"prompt_len must be an int >= 0, got {describe(prompt_len)}")
        p = self.positions
        if p == "all":
            return 0, POSITION_END
        if p == "prompt":
            return 0, int(prompt_len)
        if p == "generated":
            return int(prompt_len), POSITION_END
        return (0 if p.start is None else int(p.start)), (POSITION_END if p.stop is None else int(p.stop))


def _check_positions(p: Any) -> None:
    allowed = "'all', 'prompt', 'generated' or slice(start, stop) with start, stop >= 0 or None"
    if isinstance(p, str):
        if p not in _POSITION_KINDS:
            raise ValueError(f"positions must be {allowed}, got {p!r}")
        return
    if not isinstance(p, slice):
        raise ValueError(f"positions must be {allowed}, got {describe(p)}")
    if p.step not in (None, 1):
        raise ValueError(f"positions slice step must be None or 1, got {p.step!r}")
    for name, bound in (("start", p.start), ("stop", p.stop)):
        if bound is not None and (not is_int(bound) or bound < 0):
            raise ValueError(f"positions slice {name} must be an int >= 0 or None (absolute positions, "
                             f"no negative indexing), got {describe(bound)}")
    if p.start is not None and p.stop is not None and p.start > p.stop:
        raise ValueError(f"positions slice start must be <= stop, got {p.start} > {p.stop}")
