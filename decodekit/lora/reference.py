"""Torch reference of the multi-adapter LoRA term: the CPU path of :class:`~decodekit.lora.LoRAHooks`
and the oracle of the Triton kernels (:mod:`decodekit.kernels.lora`).

For token ``t`` with adapter slot ``l = idx[t]``: ``delta[t] = scale[l] * (x[t] A[l]^T) B[l]^T``,
in fp32; slot 0 (no adapter) gives exact zeros and is never computed. :func:`lora_add` adds it to
a layer's output with one rounding, leaving the tokens of slot 0 untouched (bit-identical).

May call: nothing in decodekit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["lora_add", "lora_add_one", "lora_delta"]


#: With more adapters than this in a batch, :func:`lora_delta` runs dense products over every slot.
DENSE_FROM = 4


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
               idx: torch.Tensor, Bt: torch.Tensor | None = None,
               groups: Sequence[tuple[int, torch.Tensor]] | None = None,
               reduce: Callable[[torch.Tensor], None] | None = None,
               onehot: torch.Tensor | None = None, At: torch.Tensor | None = None) -> torch.Tensor:
    """The LoRA term of every token, fp32 ``[T, out]``.

    Parameters
    ----------
    x : Tensor
        ``[T, in]`` activations (any float dtype).
    A : Tensor
        ``[L + 1, r, in]`` down projections (slot 0: no adapter).
    B : Tensor
        ``[L + 1, out, r]`` up projections.
    scale : Tensor
        ``[L + 1]`` per-slot scales (``lora_alpha / r`` or ``lora_alpha / sqrt(r)``).
    idx : Tensor
        ``[T]`` integer slot of each token.
    Bt : Tensor, optional
        ``[(L + 1) r, out]``: ``B`` laid out slot by slot as ``B[l].T`` (kept by
        :class:`~decodekit.lora.LoRATables` off CUDA).
    groups : sequence of (int, Tensor), optional
        ``(slot, token rows)`` of every adapter in ``idx`` (slot 0 left out), when the caller
        knows them (the hooks do, once per forward): no look at ``idx`` on the host.
    reduce : callable, optional
        Applied in place to the shrink products (fp32, one tensor holding every token's) before
        the expand: under tensor parallelism a row-wise layer's ``x`` and ``A`` hold one rank's
        input features, and ``reduce`` sums the partial products over the ranks (an all-reduce).
    onehot : Tensor, optional
        ``[T, L + 1]`` fp32, 1 at each token's slot (the hooks make it once per forward).
    At : Tensor, optional
        ``[in, (L + 1) r]``: ``A`` laid out as ``A.view((L + 1) r, in).T`` in memory (kept by
        the tables off CUDA, with ``Bt``), for the dense shrink.

    Reads the distinct slots on the host (one sync on CUDA): a reference, not a serving path.
    One adapter, or a few of a large table: a product per adapter over its tokens. With ``Bt``
    in fp32, more than :data:`DENSE_FROM` adapters or at least a quarter of the table's slots:
    two dense products over every slot (``x [T, in] @ A [in, (L + 1) r]``, each token's own
    block kept and scaled, the rest zeroed, then ``@ Bt``), views of the tables with no copy;
    the zeroed blocks add exact zeros. (On a CPU a handful of larger products beats a dozen
    small operations per adapter.)
    """
    T, K = x.shape
    if A.dim() != 3 or B.dim() != 3 or A.shape[2] != K or B.shape[2] != A.shape[1] \
            or B.shape[0] != A.shape[0] or scale.shape != (A.shape[0],) or idx.shape != (T,):
        raise ValueError(f"lora_delta: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"scale {tuple(scale.shape)}, idx {tuple(idx.shape)} do not fit")
    if groups is None:
        groups = [(s, (idx == s).nonzero().squeeze(1)) for s in idx.unique().tolist() if s != 0]
    used = [s for s, _ in groups]
    L1, r = A.shape[0], A.shape[1]
    dense = len(used) > DENSE_FROM or (len(used) > 1 and 4 * len(used) >= L1)
    if Bt is not None and dense and x.dtype == A.dtype == Bt.dtype == torch.float32:
        h = torch.mm(x, A.view(L1 * r, K).T if At is None else At).view(T, L1, r)  # every slot's shrink
        if onehot is None:
            onehot = (idx[:, None] == torch.arange(L1, device=idx.device)[None, :]).float()
        h.mul_((onehot * scale[None, :].float())[:, :, None])  # each token's own block, scaled
        if reduce is not None:
            reduce(h)
        return torch.mm(h.view(T, L1 * r), Bt)  # [T, out]
    h = torch.zeros(T, r, dtype=torch.float32, device=x.device)  # every adapter's shrink, [T, r]
    for slot, rows in groups:
        h[rows] = x[rows].float() @ A[slot].float().T
    if reduce is not None:  # summed at once over the ranks, then expanded
        reduce(h)
    out = torch.zeros(T, B.shape[1], dtype=torch.float32, device=x.device)
    for slot, rows in groups:
        out[rows] = (h[rows] @ B[slot].float().T) * scale[slot].float()
    return out


def lora_add(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
             idx: torch.Tensor, Bt: torch.Tensor | None = None,
             groups: Sequence[tuple[int, torch.Tensor]] | None = None,
             reduce: Callable[[torch.Tensor], None] | None = None,
             onehot: torch.Tensor | None = None, At: torch.Tensor | None = None,
             keep: torch.Tensor | bool | None = None) -> torch.Tensor:
    """``y [T, out]`` plus the LoRA term of each token (:func:`lora_delta`), rounded once to
    ``y``'s dtype; tokens of slot 0 come back bit-identical. A new tensor. ``keep``: the
    adapted tokens' mask ``[T, 1]`` (bool), or True when every token has an adapter, when the
    caller knows it (default: from ``idx``)."""
    delta = lora_delta(x, A, B, scale, idx, Bt, groups, reduce, onehot, At)
    if keep is None:
        keep = (idx != 0).unsqueeze(1)
    if keep is True:
        return (y.float() + delta).to(y.dtype)  # every token has an adapter
    return torch.where(keep, (y.float() + delta).to(y.dtype), y)


def lora_add_one(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, scale: float,
                 reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """``y [T, out] + scale * (x A^T) Bt`` when every token uses one adapter (``x [T, in]``,
    ``A [r, in]``, ``Bt [r, out]``: B transposed, ``scale`` a host float): two products, the
    second adding into ``y`` (``addmm``), in fp32 and rounded once to ``y``'s dtype; ``reduce``
    as in :func:`lora_delta`. A new tensor. (The common case off CUDA: one request, or a batch
    of one tenant; :func:`lora_add` does a dozen small operations per layer for the same
    result.)"""
    T, K = x.shape
    if A.dim() != 2 or A.shape[1] != K or Bt.dim() != 2 or Bt.shape[0] != A.shape[0] \
            or tuple(y.shape) != (T, Bt.shape[1]):
        raise ValueError(f"lora_add_one: y {tuple(y.shape)}, x {tuple(x.shape)}, A {tuple(A.shape)}, "
                         f"Bt {tuple(Bt.shape)} do not fit")
    h = torch.mm(x.float(), A.float().T)  # [T, r]
    if reduce is not None:
        reduce(h)
    if y.dtype == torch.float32:
        return torch.addmm(y, h, Bt.float(), alpha=scale)
    return torch.addmm(y.float(), h, Bt.float(), alpha=scale).to(y.dtype)
