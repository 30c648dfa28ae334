"""Attention over the paged KV cache: the torch reference and the Triton kernel behind one call.

:func:`paged_attention` computes, for queries ``q [B, H, Q, D]`` at positions ``q_pos [B, Q]``,
attention over each row's keys and values in the block cache (``[num_blocks, block_size,
kv_heads, D]``, addressed through ``block_tables [B, max_blocks]``, keys ``< seq_lens[b]``
visible, causal by position, optionally a sliding window and Gemma 2's logit soft-capping).
On CUDA it runs :mod:`decodekit.kernels.paged_attention` (only the live blocks are read, GQA
without expanding K/V, long contexts split across programs); elsewhere, or with
``backend="torch"``, :func:`paged_attention_reference`, which is also the kernels' test oracle.

As a transformers attention backend (:func:`kernel_attention`): while a forward runs inside
``kernel_attention(model, cache)``, the model's attention layers call :func:`_attention` (the
name :data:`BACKEND` registered with ``AttentionInterface``) with the block stores that
:class:`~decodekit.engine.kv_cache.PagedKVCache` returns in that mode, and the block tables,
lengths and positions come from the cache's binding. The model's own layers run unchanged.

Packed forwards (:func:`packed_attention`): a batch whose rows carry different numbers of
tokens (a speculative window's drafts) runs as one row of its ``N`` real tokens, so the
model's projections and MLPs see no padding; its attention layers call :func:`_packed`
(:data:`PACKED`), which lays the queries out on the rows' grid ``[B, H, q, D]``, runs the
model's own attention function over the cache's rows with the grid's masks, and packs the
result back to ``[1, N, H, D]``. Exact: the same numbers as the padded forward's real cells.

Grouped heads on a CPU (:func:`gqa_attention`): transformers' SDPA path copies every key and
value head once per query head it serves whenever a mask is passed (decodekit always passes
one); :func:`_sdpa` reads them in place (``enable_gqa``), the same math. SmolLM2 (9 query
heads, 3 key/value heads) on 2 cores, 8 rows over 320 positions: 630 -> 184 us per layer at
one query position, 612 -> 120 us at two.

May call: :mod:`decodekit.kernels.paged_attention`, :mod:`.kv_cache` (the binding).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["BACKEND", "GQA", "PACKED", "gqa_attention", "kernel_attention", "packed_attention",
           "paged_attention", "paged_attention_reference"]

BACKEND = "decodekit_paged"
PACKED = "decodekit_packed"
GQA = "decodekit_sdpa"
_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("decodekit_paged_cache", default=None)
_PACKING: contextvars.ContextVar[Any] = contextvars.ContextVar("decodekit_packing", default=None)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, q_pos: torch.Tensor,
                              scale: float, softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """The math of :func:`paged_attention` in plain torch (float32 inside): gather each row's
    blocks, repeat K/V per query head, mask, softmax. Queries that see no key give zeros."""
    B, H, Q, D = q.shape
    _, BS, KVH, _ = k_cache.shape
    n = block_tables.shape[1] * BS
    k = k_cache[block_tables.long()].reshape(B, n, KVH, D).transpose(1, 2).float()  # [B, KVH, n, D]
    v = v_cache[block_tables.long()].reshape(B, n, KVH, D).transpose(1, 2).float()
    k, v = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)  # [B, H, n, D]
    s = (q.float() @ k.transpose(-1, -2)) * scale  # [B, H, Q, n]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    p = torch.arange(n, device=q.device)
    qp = q_pos.long()[:, None, :, None]  # [B, 1, Q, 1]
    ok = (p < seq_lens.long()[:, None, None, None]) & (p <= qp)
    if window:
        ok &= p > qp - window
    s = s.masked_fill(~ok, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)  # a row with nothing visible: zeros
    return (w @ v).to(q.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, q_pos: torch.Tensor, scale: float,
                    softcap: float = 0.0, window: int = 0, backend: str = "auto") -> torch.Tensor:
    """Attention of ``q [B, H, Q, D]`` over a paged cache -> ``[B, H, Q, D]`` (q's dtype).

    ``backend``: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` (also on CPU
    tensors under ``TRITON_INTERPRET=1``) or ``"torch"``.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch" or (backend == "auto" and q.device.type != "cuda"):
        return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, q_pos, scale,
                                         softcap, window)
    from ..kernels.paged_attention import paged_attention as kernel

    return kernel(q, k_cache, v_cache, block_tables, seq_lens, q_pos, scale, softcap, window)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
               sliding_window: int | None = None, softcap: float | None = None, **kwargs: Any
               ) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: ``query [B, H, q, D]``, ``key``/``value``
    the layer's block stores; returns ``([B, q, H, D], None)``."""
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError(f"attention backend {BACKEND!r} called outside decodekit's kernel_attention()")
    tables, lens, q_pos = cache.attention_inputs()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = paged_attention(query, key, value, tables, lens, q_pos, scale, softcap or 0.0, sliding_window or 0,
                          backend="triton")
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def kernel_attention(adapter: Any, cache: Any) -> Iterator[None]:
    """Run the model's attention (a :class:`~decodekit.engine.model_adapter.ModelAdapter`'s)
    through the paged kernel over ``cache`` (a bound
    :class:`~decodekit.engine.kv_cache.PagedKVCache` in kernel mode) for the duration."""
    with _through(adapter, BACKEND, _attention, _ACTIVE, cache):
        yield


@contextlib.contextmanager
def _through(adapter: Any, name: str, fn: Callable[..., Any],
             state: contextvars.ContextVar[Any] | None = None, value: Any = None) -> Iterator[None]:
    """``adapter``'s model runs its attention through ``fn`` (registered as ``name``) with
    ``state`` set to ``value`` for the duration."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)  # idempotent
    token = None if state is None else state.set(value)
    try:
        with adapter.attention_implementation(name):
            yield
    finally:
        if state is not None:
            state.reset(token)


def _packed(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' attention-interface signature for a packed forward: ``query [1, H, N,
    D]`` (the batch's tokens), ``key``/``value`` the cache's rows ``[B, kv_heads, kv, D]``
    and the grid's masks; returns ``([1, N, H, D], weights)``."""
    from .kv_cache import unpack_rows

    packing = _PACKING.get()
    if packing is None:
        raise RuntimeError(f"attention backend {PACKED!r} called outside decodekit's packed_attention()")
    unpack, pack, grid, inner = packing
    out, weights = _inner(inner, module)(module, unpack_rows(query, unpack, grid), key, value,
                                         attention_mask, **kwargs)  # [B, q, H, D]
    return out.reshape(grid[0] * grid[1], *out.shape[2:]).index_select(0, pack)[None], weights


def _inner(name: str | None, module: torch.nn.Module) -> Callable[..., Any]:
    """The attention function ``name`` (a registered one, or the module's own eager one)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == GQA:
        return _sdpa
    if name is not None and name in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return ALL_ATTENTION_FUNCTIONS[name]
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if name not in (None, "eager") or fn is None:
        raise RuntimeError(f"packed forwards cannot call attention {name!r} of {type(module).__name__}")
    return fn


@contextlib.contextmanager
def packed_attention(adapter: Any, unpack: torch.Tensor, pack: torch.Tensor, grid: tuple[int, int],
                     inner: str | None = None) -> Iterator[None]:
    """Run a packed forward of ``adapter``'s model: its ``N`` tokens fill the cells ``pack [N]``
    of the rows' grid ``grid = (B, q)`` (row-major), ``unpack [B * q]`` is the inverse (``N``
    for an empty cell). The model's own attention function (or ``inner``, e.g. :data:`GQA`)
    does the work on the grid."""
    with _through(adapter, PACKED, _packed, _PACKING,
                  (unpack, pack, grid, inner or adapter.attention_name)):
        yield


def _sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attention_mask: Any, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any
          ) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with the key/value heads read in place (``enable_gqa``):
    ``query [B, H, q, D]``, ``key``/``value [B, KVH, kv, D]``, an additive ``attention_mask
    [B, 1, q, >= kv]``; returns ``([B, q, H, D], None)``. Anything it does not cover (no mask,
    dropout, soft-capping, attention sinks, other value sizes) goes to transformers' own."""
    if attention_mask is None or dropout or kwargs.get("softcap") or kwargs.get("s_aux") is not None \
            or kwargs.get("sinks") is not None or query.shape[-1] != value.shape[-1]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask[:, :, :, : key.shape[-2]], scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def gqa_attention(adapter: Any) -> Iterator[None]:
    """Run ``adapter``'s model (one whose attention is transformers' ``"sdpa"``) through
    :func:`_sdpa` for the duration."""
    with _through(adapter, GQA, _sdpa):
        yield
