"""Speculative decoding: exact batched verification of drafted tokens.

:func:`verify` runs the Triton kernel (``decodekit.kernels.verify``) on CUDA or when
asked, and the torch reference :func:`verify_reference` elsewhere; both compute the
same function (same counter-based randomness), so the reference is also the test
oracle. See ``triton_kernels/verify.py`` for the rule and the references.
"""

from __future__ import annotations

import torch

from .. import reference as ref

__all__ = ["ACCEPT_LANE", "draw", "verify", "verify_reference"]

ACCEPT_LANE = 0x7FFFFFFF  # hash lane of the acceptance uniforms (never a token id)


def _uniform(seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    r = ref.random_bits_at(seed, position, torch.full_like(position, ACCEPT_LANE))
    return (r.to(torch.float32) + 0.5) * 2.0**-32


def _race(weights: torch.Tensor, seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """argmax_i w_i / E_i per row of ``weights [N, V]`` (noise keyed by seed/position)."""
    E = ref.exponential_noise(seed, position, weights.shape[1])
    key = torch.where(weights > 0, weights / E, torch.full_like(weights, -1.0))
    return key.argmax(-1)


def draw(probs: torch.Tensor, seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [N, V]`` (an exponential race keyed by ``seed [N]`` and
    ``position [N]``; int64 ``[N]``). Drafters pass a salted seed so that their draws are
    independent of the verification's."""
    return _race(probs.float(), seed.long(), position.long())


def verify_reference(
    p: torch.Tensor,
    q: torch.Tensor | None,
    draft: torch.Tensor,
    n_draft: torch.Tensor,
    seed: torch.Tensor,
    position: torch.Tensor,
    *,
    residual: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of the verification kernel (same inputs and outputs).

    ``residual="p"`` resamples from ``p`` instead of ``normalize(max(p - q, 0))`` after a
    rejection: a deliberately wrong rule, kept as the statistical tests' negative control.
    """
    B, K1, V = p.shape
    K = K1 - 1
    dev = p.device
    out = torch.full((B, K1), -1, dtype=torch.int64, device=dev)
    n_acc = torch.zeros(B, dtype=torch.int32, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    seed, position, n_draft = seed.long(), position.long(), n_draft.long()
    draft = draft.long()
    for j in range(K):
        act = alive & (j < n_draft)
        if not bool(act.any()):
            break
        d = draft[:, j].clamp(0, V - 1)
        pd = p[rows, j, d]
        qd = q[rows, j, d] if q is not None else torch.ones_like(pd)
        ok = _uniform(seed, position + j) * qd < pd
        acc = act & ok
        rej = act & ~ok
        out[acc, j] = d[acc]
        n_acc += acc.to(torch.int32)
        if bool(rej.any()):
            r = rows[rej]
            pj = p[r, j]
            if residual == "p":
                w = pj
            elif q is not None:
                w = (pj - q[r, j]).clamp(min=0)
            else:
                w = pj.scatter(1, d[r, None], 0.0)
            out[r, j] = _race(w, seed[r], position[r] + j)
        alive &= ~rej
    bonus = alive
    if bool(bonus.any()):
        r = rows[bonus]
        nb = n_draft[r]
        out[r, nb] = _race(p[r, nb], seed[r], position[r] + nb)
    return out, n_acc


def verify(
    p: torch.Tensor,
    q: torch.Tensor | None,
    draft: torch.Tensor,
    n_draft: torch.Tensor,
    seed: torch.Tensor,
    position: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify ``draft [B, K]`` (``n_draft [B]`` valid per row) against target ``p [B, K+1, V]``
    and draft ``q [B, K, V]`` (None: a drafter without a distribution, i.e. point masses).

    Returns ``(tokens int64 [B, K+1], n_accepted int32 [B])``: each row emits its
    ``n_accepted`` accepted drafts then one corrected or bonus token; the rest is -1.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if p.dim() != 3 or p.shape[1] != draft.shape[1] + 1:
        raise ValueError(f"p must be [B, K+1, V] for draft [B, K]; got {tuple(p.shape)}")
    if bool((n_draft < 0).any()) or bool((n_draft > draft.shape[1]).any()):
        raise ValueError(f"n_draft must be in [0, {draft.shape[1]}]")
    use_triton = backend == "triton" or (backend == "auto" and p.device.type == "cuda")
    if use_triton:
        from ..kernels.verify import verify as _verify

        return _verify(p.float().contiguous(), None if q is None else q.float().contiguous(),
                       draft, n_draft, seed, position)
    return verify_reference(p.float(), None if q is None else q.float(), draft, n_draft, seed,
                            position)
