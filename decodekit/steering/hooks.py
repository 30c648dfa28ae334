"""Steering injection: forward hooks on the decoder layers, per-request state in device tables.

:class:`SteeringHooks` is the serving mechanism: hooks go on every decoder layer once, and a
request is steered by writing its row of small per-layer tables (``set_row``) and, before
each forward, binding the batch to its rows and token positions (``bind``). Nothing is added
or removed per request and the per-step path neither syncs nor changes tensor addresses, so
it can live inside a CUDA graph.

:func:`steer` is the one-liner for plain transformers (``model(...)``, ``model.generate``).

May call: :mod:`decodekit.engine.model_adapter` (decoder layers, hidden size, the
cache keyword), :mod:`.vector`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..engine.model_adapter import cache_from_kwargs, decoder_layers, hidden_size, model_device
from ..nvtx import nvtx_range
from .vector import Op, Positions, Steering, SteeringVector

__all__ = ["SteeringHooks", "maybe_bound", "steer"]

def _layer_terms(v: torch.Tensor, strength: float, op: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(u, w, c)`` with ``h -> h + c (h . u) u + w`` equal to ``op`` at one layer (fp32, CPU)."""
    norm = torch.linalg.vector_norm(v)
    if norm == 0:  # zero vector: every op is the identity
        return torch.zeros_like(v), torch.zeros_like(v), 0.0
    u = v / norm
    w = torch.zeros_like(v) if op == "ablate" else strength * v  # clamp: strength |v| u == strength v
    return (torch.zeros_like(v), w, 0.0) if op == "add" else (u, w, -1.0)


class SteeringHooks:
    """Forward hooks on every decoder layer of ``model``, steered per request row.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM (see :func:`decoder_layers`).
    max_rows : int
        Number of request rows (e.g. KV-cache slots); request row ``r`` uses table row ``r + 1``
        and table row 0 is all zeros (unsteered).
    device : torch.device or str, optional
        Where the tables live; default: the model's first parameter's device.
    dtype : torch.dtype, optional
        Table dtype, and the dtype the injection is computed in; default fp32, so that a bf16
        model's steered rows are computed in fp32 and rounded once. Unsteered rows come out
        bit-identical to the unhooked model either way (they get ``+ 0.0``).
    skip_idle_layers : bool
        If True (default), a hook returns at once on layers that no row steers, and skips the
        projection on layers where no row ablates or clamps. That choice is made on the host
        at call time, so a CUDA graph captured with it bakes in the layers steered at capture:
        pass False to graph-capture once and steer anything later.

    Notes
    -----
    Tables per layer ``l``: ``u[l] [max_rows + 1, H]`` (unit direction), ``w[l] [max_rows + 1, H]``
    (additive term: ``strength * v`` for add/clamp, 0 for ablate), ``c[l] [max_rows + 1, 1]``
    (projection coefficient: 0 for add, -1 for ablate/clamp), and per row the absolute
    position range ``lo, hi [max_rows + 1]`` (int64). The hook computes, with ``idx`` from
    :meth:`bind`, ``h + c[idx] (h . u[idx]) u[idx] + w[idx]``.
    """

    def __init__(self, model: torch.nn.Module, max_rows: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, skip_idle_layers: bool = True) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self._layers = decoder_layers(model)
        self.num_layers = len(self._layers)
        self.hidden_size = hidden_size(model)
        self.max_rows = max_rows
        self.device = torch.device(device) if device is not None else model_device(model)
        self.dtype = dtype
        self.skip_idle_layers = bool(skip_idle_layers)
        n, rows, h = self.num_layers, max_rows + 1, self.hidden_size
        kw = dict(device=self.device, dtype=dtype)
        self._u = torch.zeros(n, rows, h, **kw)  # [L, R+1, H]
        self._w = torch.zeros(n, rows, h, **kw)  # [L, R+1, H]
        self._c = torch.zeros(n, rows, 1, **kw)  # [L, R+1, 1]
        self._lo = torch.zeros(rows, dtype=torch.int64, device=self.device)  # [R+1]
        self._hi = torch.zeros(rows, dtype=torch.int64, device=self.device)  # [R+1]; lo == hi: never
        self._row_ids = torch.arange(rows, dtype=torch.int64, device=self.device)
        self.device = self._u.device  # "cuda" -> "cuda:0", so bind's device check compares like with like
        self._idx: torch.Tensor | None = None  # [B, q] table row per token, 0 = unsteered
        self._set_rows: set[int] = set()
        self._rows_at: list[set[int]] = [set() for _ in range(n)]  # rows with a nonzero term
        self._proj_at: list[set[int]] = [set() for _ in range(n)]  # rows with c != 0
        self._cuda = torch.cuda.is_available()
        self._every_layer = False  # set by every_layer(): inject on every layer (graph capture)
        # prepend: steering acts as part of the layer, so every other forward hook (transformers'
        # output_hidden_states recorders, installed once on first use, included) sees its result
        self._handles = [layer.register_forward_hook(functools.partial(self._hook, i), prepend=True)
                         for i, layer in enumerate(self._layers)]

    # -- per-request state (host side, not per step) -------------------------------------
    def _check_row(self, row: Any) -> int:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.max_rows:
            raise ValueError(f"row must be an int in [0, {self.max_rows}), got {row!r}")
        return row

    def set_row(self, row: int, steering: Steering | None, prompt_len: int) -> None:
        """Steer request row ``row`` with ``steering`` (None clears it).

        ``prompt_len`` is the request's prompt length, which fixes the ``"prompt"`` /
        ``"generated"`` position ranges. Everything is validated before a table is written.
        """
        self._check_row(row)
        if steering is None:
            self.clear_row(row)
            return
        if not isinstance(steering, Steering):
            raise TypeError(f"steering must be a Steering or None, got {type(steering).__name__}")
        steering.vector.check_fits(self.num_layers, self.hidden_size)
        lo, hi = steering.position_range(prompt_len)
        n, h = self.num_layers, self.hidden_size
        u, w, c = torch.zeros(n, h), torch.zeros(n, h), torch.zeros(n, 1)
        for layer, v in steering.vector.items():
            u[layer], w[layer], c[layer, 0] = _layer_terms(v, steering.strength, steering.op)
        t = row + 1
        self._u[:, t].copy_(u)
        self._w[:, t].copy_(w)
        self._c[:, t].copy_(c)
        self._lo[t] = lo
        self._hi[t] = hi
        for layer in range(n):
            nonzero = bool(w[layer].any()) or bool(c[layer, 0] != 0)
            (self._rows_at[layer].add if nonzero else self._rows_at[layer].discard)(row)
            (self._proj_at[layer].add if c[layer, 0] != 0 else self._proj_at[layer].discard)(row)
        self._set_rows.add(row)

    def clear_row(self, row: int) -> None:
        """Stop steering request row ``row``."""
        self._check_row(row)
        t = row + 1
        self._u[:, t].zero_()
        self._w[:, t].zero_()
        self._c[:, t].zero_()
        self._lo[t] = 0
        self._hi[t] = 0
        for rows in (*self._rows_at, *self._proj_at):
            rows.discard(row)
        self._set_rows.discard(row)

    @property
    def active(self) -> bool:
        """Whether any row is set."""
        return bool(self._set_rows)

    # -- per step (device side, sync-free) -----------------------------------------------
    def bind(self, first_row: int, positions: torch.Tensor) -> None:
        """Bind the next forward's batch: its row ``b`` is request row ``first_row + b``.

        Parameters
        ----------
        first_row : int
            Request row of batch row 0.
        positions : Tensor
            ``[B, q]`` int64 on the tables' device: absolute positions of the tokens fed.

        Computes ``idx [B, q] = first_row + b + 1 where lo <= pos < hi, else 0`` on the device.
        """
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.is_floating_point():
            raise ValueError("positions must be an integer tensor [B, q], got "
                             f"{getattr(positions, 'shape', type(positions).__name__)}")
        if positions.device != self.device:
            raise ValueError(f"positions must be on {self.device}, got {positions.device}")
        b = positions.shape[0]
        if isinstance(first_row, bool) or not isinstance(first_row, int) or first_row < 0 \
                or first_row + b > self.max_rows:
            raise ValueError(f"first_row must be an int with 0 <= first_row and first_row + batch ({b}) "
                             f"<= max_rows ({self.max_rows}), got {first_row!r}")
        rows = slice(first_row + 1, first_row + 1 + b)
        lo, hi = self._lo[rows].unsqueeze(1), self._hi[rows].unsqueeze(1)  # [B, 1]
        inside = (positions >= lo) & (positions < hi)
        self._idx = torch.where(inside, self._row_ids[rows].unsqueeze(1), 0)  # [B, q]

    def bind_index(self, idx: torch.Tensor) -> None:
        """Bind a precomputed table index ``[B, q]`` (int64; 0 = unsteered, ``r + 1`` = request
        row ``r``)."""
        self._idx = idx

    @property
    def bound_index(self) -> torch.Tensor | None:
        """The table index ``[B, q]`` the next forward uses (None: unbound, the hooks are inert)."""
        return self._idx

    def register_pre_hook(self, hook) -> torch.utils.hooks.RemovableHandle:
        """A forward pre-hook (``with_kwargs=True``) on the first decoder layer, which runs
        before any steering hook of the forward: the place to :meth:`bind_index`."""
        return self._layers[0].register_forward_pre_hook(hook, with_kwargs=True)

    def unbind(self) -> None:
        """Make the hooks inert until the next :meth:`bind`."""
        self._idx = None

    @contextlib.contextmanager
    def bound(self, first_row: int, positions: torch.Tensor) -> Iterator[None]:
        """``with hooks.bound(first_row, positions): model(...)``: bind, then unbind on exit."""
        self.bind(first_row, positions)
        try:
            yield
        finally:
            self.unbind()

    @property
    def capturing_every_layer(self) -> bool:
        """Inside :meth:`every_layer`."""
        return self._every_layer

    @contextlib.contextmanager
    def every_layer(self) -> Iterator[None]:
        """Inject on every layer, whichever rows are set (``skip_idle_layers`` ignored): the
        forwards inside are what a CUDA graph must hold to serve any steering set later. Rows
        bound to table row 0 still come out bit-identical (they get ``+ 0.0``)."""
        old, self._every_layer = self._every_layer, True
        try:
            yield
        finally:
            self._every_layer = old

    def _hook(self, layer: int, module: torch.nn.Module, args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        out = self.apply(layer, h)
        if out is h:
            return None
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def apply(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s output ``h [B, q, H]`` steered with the bound rows (``h`` itself
        when nothing is bound or no row steers that layer). What the forward hook does."""
        idx = self._idx
        skip = self.skip_idle_layers and not self._every_layer
        if idx is None or (skip and not self._rows_at[layer]):
            return h
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or tuple(h.shape[:2]) != tuple(idx.shape):
            raise ValueError(f"steering: layer {layer} output {getattr(h, 'shape', type(h).__name__)} does "
                             f"not match the bound positions {tuple(idx.shape)} ([B, q, H] expected)")
        if self._cuda and torch.cuda.is_current_stream_capturing():
            return self._inject(layer, h, idx)
        with nvtx_range("decodekit.steer"):
            return self._inject(layer, h, idx)

    def _inject(self, layer: int, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        x = h.to(self.dtype)  # [B, q, H]
        if not self.skip_idle_layers or self._every_layer or self._proj_at[layer]:
            u = F.embedding(idx, self._u[layer])  # [B, q, H]
            c = F.embedding(idx, self._c[layer])  # [B, q, 1]
            x = x + c * (x * u).sum(-1, keepdim=True) * u
        x = x + F.embedding(idx, self._w[layer])
        return x.to(h.dtype)

    def remove(self) -> None:
        """Take the hooks off the model (the object is unusable afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._idx = None


@contextlib.contextmanager
def maybe_bound(hooks: SteeringHooks | None, first_row: int, positions: torch.Tensor) -> Iterator[None]:
    """``hooks.bound(...)`` when some row is steered (or inside :meth:`~SteeringHooks.every_layer`:
    a graph capture); nothing at all otherwise."""
    if hooks is None or not (hooks.active or hooks.capturing_every_layer):
        yield
        return
    with hooks.bound(first_row, positions):
        yield


class _AbsolutePositions:
    """Forward pre-hook on the first decoder layer that binds ``steer``'s one row per forward.

    Positions are the layer's ``position_ids`` (per row, so left padding is handled), else
    cache length + column. A forward that starts with an empty cache starts a new sequence:
    its tokens are the prompt, so the prompt ends at each row's last position + 1.
    """

    def __init__(self, hooks: SteeringHooks, steering: Steering) -> None:
        self.hooks = hooks
        self.steering = steering
        self.prompt_end: torch.Tensor | int | None = None  # [B | 1, 1] on the device, or an int

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        b, q = h.shape[:2]
        cache = cache_from_kwargs(kwargs)
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(past, past + q, device=h.device).unsqueeze(0)  # [1, q]
        pos = pos.to(torch.int64).reshape(-1, q)
        if past == 0:
            self.prompt_end = pos[:, -1:] + 1  # left padding: the last column is a real token
        elif self.prompt_end is None:  # the block started on a filled cache: that is the prompt
            self.prompt_end = past
        p = self.steering.positions
        end = self.prompt_end
        if p == "all":
            inside = pos >= 0
        elif p == "prompt":
            inside = pos < end
        elif p == "generated":
            inside = pos >= end
        else:
            lo, hi = self.steering.position_range(0)
            inside = (pos >= lo) & (pos < hi)
        self.hooks.bind_index(inside.to(torch.int64).expand(b, q))  # table row 1 = request row 0


@contextlib.contextmanager
def steer(model: torch.nn.Module, vector: SteeringVector | Mapping[int, Any] | str | os.PathLike[str],
          strength: float = 1.0, *, positions: Positions = "all", op: Op = "add") -> Iterator[Steering]:
    """Steer every forward of ``model`` inside the block, ``model.generate`` included.

    All batch rows are steered alike, at ABSOLUTE token positions: a forward whose KV cache
    is empty (a new ``generate`` call, or a plain ``model(ids)``) starts a new sequence whose
    tokens are the prompt; later cached forwards continue it. So ``positions="generated"``
    starts exactly at the first generated token, and a slice counts from the prompt's first
    token however the tokens are split across forwards.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM.
    vector, strength, positions, op
        As in :class:`~decodekit.steering.Steering`.

    Yields
    ------
    Steering
        The validated settings.

    Notes
    -----
    Positions are read from the decoder layers' ``position_ids``, which ``generate`` derives
    from the attention mask: with LEFT padding each row counts from its first real token,
    and ``"prompt"``/``"generated"`` split at each row's own prompt end (the prompt's last
    column must be a real token, which is how ``generate`` pads). Right-padded prompts in
    ``generate`` are not supported. With ``use_cache=False`` every forward re-feeds the whole
    sequence as a fresh prompt, so ``"generated"`` never applies; pass an explicit slice
    (``positions=slice(prompt_len, None)``) to steer a cache-free re-run. Each forward reads
    the cache length on the host (free for ``DynamicCache``; a sync for ``StaticCache``), so
    serving loops should use :class:`SteeringHooks` instead. The hooks are removed on exit,
    also on exceptions.
    """
    steering = Steering(vector, strength, positions, op)
    hooks = SteeringHooks(model, max_rows=1)
    try:
        hooks.set_row(0, steering, prompt_len=0)
        binder = _AbsolutePositions(hooks, steering)
        pre = hooks.register_pre_hook(binder)
        try:
            yield steering
        finally:
            pre.remove()
    finally:
        hooks.remove()

