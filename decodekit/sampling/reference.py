"""Torch reference for every fused sampler op: the CPU path and the test oracle.

Every function here is plain, vectorised torch over a batch of rows. The Triton
kernels in :mod:`decodekit.kernels` compute the same functions; the tests compare
them element by element (probabilities) and token by token (draws):

* ``process`` kernel: :func:`process_logits` (and :func:`window_state` for its window rows);
* ``select`` kernel: :func:`filter_keep`, :func:`processed_probs_from_logits`,
  :func:`sample_from_logits`;
* ``accept`` kernel: :func:`commit_tokens`;
* ``verify`` kernel: :func:`verify_reference`;
* the drafters' draw: :func:`draw`.

The processed distribution of one row, in order (see :class:`~decodekit.SamplingParams`):

1. ``logit_bias``, ``allowed_token_ids`` and single-token bad words (one dense
   additive ``bias`` row, ``-inf`` for banned tokens), multi-token bad words
   whose prefix matches the row's recent tokens, and the ``min_new_tokens``
   suppression of EOS and ``stop_token_ids``;
2. repetition penalty (Hugging Face: over prompt and output tokens, divide
   positive logits, multiply negative ones);
3. frequency and presence penalties (OpenAI: output tokens only,
   ``logit -= frequency * count + presence * (count > 0)``);
4. temperature (greedy rows are left unscaled and take the argmax);
5. top-k, top-p, min-p, typical-p, each on the distribution left by the previous.

Randomness is a counter-based hash of (seed, position, token id): the draw is an
exponential race ``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)`` built from 32 random
bits with full relative precision at both ends, so no tail is cut off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.layout import ACCEPT_LANE, BADSEQ, FLT_MAX, I_FLAGS, I_NGEN, I_NHIST, PENALTY

__all__ = [
    "ACCEPT_LANE",
    "FLT_MAX",
    "RowState",
    "commit_tokens",
    "draw",
    "exponential_from_bits",
    "exponential_noise",
    "filter_keep",
    "process_logits",
    "processed_probs_from_logits",
    "random_bits",
    "random_bits_at",
    "sample_from_logits",
    "verify_point_masses_from_logits",
    "verify_reference",
    "window_state",
]
_M32 = 0xFFFFFFFF
_TWO_M32 = 2.0**-32


# --------------------------------------------------------------------------- randomness
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _row_keys(seed: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row from (seed int64 [B], position int64 [B])."""
    lo = seed & _M32
    hi = (seed >> 32) & _M32
    a = _mix32(hi ^ 0x68E31DA4)
    b = _mix32(lo ^ a)
    k1 = _mix32(b ^ (position & _M32))
    k2 = _mix32(k1 ^ 0x1B56C4E9)
    return k1, k2


def random_bits_at(seed: torch.Tensor, position: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in ``[0, 2**32)``) for broadcastable (seed, position, token id)."""
    k1, k2 = _row_keys(seed.to(torch.int64), position.to(torch.int64))
    h = _mix32(((token.to(torch.int64) * 0x9E3779B1) & _M32) ^ k1)
    return _mix32((h + k2) & _M32)


_TOKEN_HASH: dict[tuple[int, torch.device], torch.Tensor] = {}


def _token_hash(vocab_size: int, device: torch.device) -> torch.Tensor:
    """``(i * 0x9E3779B1) mod 2**32`` for every token id ``i`` (int64 ``[V]``): the part of
    :func:`random_bits_at` that depends on the token alone, computed once per vocabulary."""
    key = (vocab_size, device)
    if key not in _TOKEN_HASH:
        tok = torch.arange(vocab_size, dtype=torch.int64, device=device)
        _TOKEN_HASH[key] = (tok * 0x9E3779B1) & _M32
    return _TOKEN_HASH[key]


def random_bits(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """32 random bits per (row, token): int64 ``[B, V]`` in ``[0, 2**32)``.

    A pure function of (seed, position, token id): a request draws the same bits
    whatever its slot, batch size or batch-mates. (:func:`random_bits_at` over every token
    id, with the token's part of the hash precomputed.)
    """
    k1, k2 = _row_keys(seed.to(torch.int64)[:, None], position.to(torch.int64)[:, None])
    h = _mix32(_token_hash(vocab_size, seed.device)[None, :] ^ k1)
    h += k2
    h &= _M32
    return _mix32(h)


def exponential_from_bits(r: torch.Tensor) -> torch.Tensor:
    """Exp(1) variates (fp32) from 32-bit integers, precise at both ends.

    ``u = (r + 1/2) 2^-32`` is uniform on (0, 1). For ``u < 1/2`` we take ``-log u``;
    above, ``-log1p(-v)`` with ``v = 1 - u`` formed exactly from the integer, so
    small variates keep full relative precision (no tail bias).
    """
    # Selections are blends with 0/1 weights (a * 1 + b * 0 == a for finite a, b: bit for bit
    # what torch.where gives, without its slow boolean path on the CPU).
    low = (r < 2**31).to(torch.float32)
    high = 1.0 - low
    u = (r.to(torch.float32) + 0.5) * _TWO_M32
    v = ((_M32 - r).to(torch.float32) + 0.5) * _TWO_M32
    w = 1.0 - v
    lg = torch.log(u * low + w * high)  # one logarithm per variate: log u below, log w above
    # Goldberg's log1p: log1p(-v) = -v * log(w) / (w - 1), exact when w == 1 (then v itself).
    one = (w == 1.0).to(torch.float32)
    e_high = v * lg / (w - 1.0 + one) * (1.0 - one) + v * one
    return (-lg) * low + e_high * high


def exponential_noise(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``E[b, i] ~ Exp(1)`` keyed by (seed[b], position[b], i): fp32 ``[B, V]``."""
    return exponential_from_bits(random_bits(seed, position, vocab_size))


# --------------------------------------------------------------------------- state
@dataclass
class RowState:
    """Per-row sampling state gathered for one batch (all tensors on one device).

    Shapes: ``[B]`` unless noted. ``bias``/``counts`` may be ``None`` when no row uses them.
    ``counts`` holds ``2 * output_count + in_prompt`` per token (int32 ``[B, V]``).
    ``suppress`` holds token ids (``-1`` padding) banned while ``n_gen < min_new``
    (int32 ``[B, NS]``). ``badseq`` ``[B, NB, L]`` / ``badseq_len`` ``[B, NB]`` are
    multi-token bad words, checked against ``hist`` ``[B, H]`` (a ring of the last
    ``H`` tokens, ``n_hist`` written so far).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    typical_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    seed: torch.Tensor
    n_gen: torch.Tensor
    min_new: torch.Tensor
    bias: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    suppress: torch.Tensor | None = None
    badseq: torch.Tensor | None = None
    badseq_len: torch.Tensor | None = None
    hist: torch.Tensor | None = None
    n_hist: torch.Tensor | None = None
    allowed: torch.Tensor | None = None  # int32 [B, ceil(V / 32)] bitmask (guided decoding)

    @property
    def greedy(self) -> torch.Tensor:
        return self.temperature == 0


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 ``[B, ceil(V / 32)]`` (bit ``i % 32`` of word ``i // 32``) -> bool ``[B, V]``."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    return ((bitmask[:, :, None] >> bits) & 1).bool().reshape(bitmask.shape[0], -1)[:, :vocab_size]


def _badseq_bans(state: RowState, vocab_size: int) -> torch.Tensor | None:
    """Bool ``[B, V]``: last tokens of multi-token bad words whose prefix just occurred."""
    if state.badseq is None or state.badseq.shape[1] == 0:
        return None
    seq, slen, hist, nh = state.badseq.long(), state.badseq_len.long(), state.hist.long(), state.n_hist.long()
    B, NB, L = seq.shape
    H = hist.shape[1]
    j = torch.arange(L - 1, device=seq.device)
    # prefix token j of sequence s must equal the token written at n_hist - (len-1) + j.
    pos = nh[:, None, None] - (slen[:, :, None] - 1) + j[None, None, :]  # [B, NB, L-1]
    tok = hist.gather(1, (pos % max(H, 1)).clamp(min=0).reshape(B, -1)).reshape(B, NB, L - 1)
    in_prefix = j[None, None, :] < (slen[:, :, None] - 1)
    ok = (~in_prefix) | ((tok == seq[:, :, : L - 1]) & (pos >= 0))
    match = ok.all(-1) & (slen >= 2) & (nh[:, None] >= slen - 1)
    last = seq.gather(2, (slen - 1).clamp(min=0)[:, :, None])[:, :, 0]
    bans = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=seq.device)
    idx = torch.where(match, last, torch.full_like(last, vocab_size))
    bans.scatter_(1, idx, True)
    return bans[:, :vocab_size]


# --------------------------------------------------------------------------- processing
def process_logits(logits: torch.Tensor, state: RowState) -> torch.Tensor:
    """Bias, masks, penalties and temperature: fp32 ``[B, V]`` processed logits.

    NaN inputs count as ``-inf``; infinite values are clamped to ``+-FLT_MAX``
    after temperature so that a row whose every allowed token is ``-inf`` or NaN
    stays a valid (uniform over allowed tokens) distribution. Masked tokens are
    exactly ``-inf``.
    """
    B, V = logits.shape
    x = logits.float()
    banned = None
    if state.bias is not None:
        bias = state.bias.float()
        banned = bias == -math.inf
        x = x + torch.where(banned, 0.0, bias)
    if state.suppress is not None and state.suppress.shape[1] > 0:
        active = (state.n_gen < state.min_new)[:, None]
        ids = state.suppress.long()
        ids = torch.where((ids >= 0) & active, ids, torch.full_like(ids, V))
        extra = torch.zeros(B, V + 1, dtype=torch.bool, device=x.device)
        extra.scatter_(1, ids, True)
        banned = extra[:, :V] if banned is None else banned | extra[:, :V]
    bad = _badseq_bans(state, V)
    if bad is not None:
        banned = bad if banned is None else banned | bad
    if state.counts is not None:
        c = state.counts.long()
        seen = c != 0
        out = (c >> 1).float()
        rep = state.repetition_penalty[:, None].float()
        x = torch.where(seen, torch.where(x < 0, x * rep, x / rep), x)
        x = x - out * state.frequency_penalty[:, None].float()
        x = x - (out > 0).float() * state.presence_penalty[:, None].float()
    t = torch.where(state.greedy, torch.ones_like(state.temperature), state.temperature)
    if bool((t != 1.0).any()):
        x = x / t[:, None].float()
    # NaN and -inf count as the lowest finite value, +inf as the highest (a NaN input is
    # -inf before any arithmetic in the kernel; both end here).
    x = torch.nan_to_num(x, nan=-FLT_MAX, posinf=FLT_MAX, neginf=-FLT_MAX)
    if state.allowed is not None:
        # guided decoding: outside the bitmask is banned; a token the request's own masks ban
        # but the bitmask allows gets -FLT_MAX (probability 0 unless nothing else is allowed:
        # then the grammar wins, uniform over its tokens)
        ok = unpack_bitmask(state.allowed, V)
        if banned is not None:
            x = x.masked_fill(banned & ok, -FLT_MAX)
        banned = ~ok
    if banned is not None:
        x = x.masked_fill(banned, -math.inf)
    return x


CANDIDATES = 1024  # top-p / typical look at this many tokens first, then fall back to all


def _kth_largest(l: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-row k-th largest value (``k >= 1``), via topk when every k is small."""
    kmax = int(k.max())
    if kmax * 4 <= l.shape[1]:
        vals = l.topk(kmax, dim=-1).values
    else:
        vals = l.sort(-1, descending=True).values
    return vals.gather(1, (k - 1)[:, None])


def _first_reaching(v: torch.Tensor, w: torch.Tensor, target: torch.Tensor, descending: bool,
                    candidates: int = CANDIDATES):
    """Walk each row's tokens in order of ``v`` and stop once the weight ``w`` seen so far
    reaches ``target [B, 1]``. Returns ``(sorted_v [B, n], sorted_w, n)`` where the rows are
    fully covered by the first ``n`` entries (``n`` = ``candidates`` when enough, else all)."""
    V = v.shape[1]
    n = min(V, candidates)
    if n < V:
        sv, idx = v.topk(n, dim=-1, largest=descending)
        sw = w.gather(1, idx)
        if bool((sw.sum(-1, keepdim=True) >= target).all()):
            return sv, sw
    sv, idx = v.sort(-1, descending=descending)
    return sv, w.gather(1, idx)


def _filters(state: RowState) -> bool:
    """Whether any row filters (:func:`filter_keep` keeps every token otherwise)."""
    return bool((state.top_k > 0).any() | (state.top_p < 1).any() | (state.min_p > 0).any()
                | (state.typical_p < 1).any())


def filter_keep(l: torch.Tensor, state: RowState) -> torch.Tensor:
    """Bool ``[B, V]``: tokens kept by top-k, then top-p, then min-p, then typical-p.

    The semantics of transformers' warpers: top-k keeps every token >= the k-th
    largest value; top-p keeps a token when the mass strictly above it (within the
    top-k set) is below ``top_p``; min-p keeps ``p >= min_p * p_max``; typical keeps
    the tokens closest to the entropy until ``typical_p`` of the mass is covered.
    Sorting is limited to the first :data:`CANDIDATES` tokens when they already
    decide the threshold (exact; otherwise the whole row is sorted). Greedy rows
    keep everything (they take the argmax).
    """
    B, V = l.shape
    if not _filters(state):
        return torch.ones_like(l, dtype=torch.bool)
    k = state.top_k.long()
    on_k = k > 0
    m = l.amax(-1, keepdim=True)
    e = torch.exp(l - m)
    keep = torch.ones_like(l, dtype=torch.bool)
    if bool(on_k.any()):
        k = torch.where(on_k, k.clamp(max=V), torch.ones_like(k))
        kth = torch.where(on_k[:, None], _kth_largest(l, k), torch.full_like(m, -math.inf))
        keep = l >= kth
    topp = state.top_p.float()[:, None]
    if bool((topp < 1.0).any()):
        ek = e * keep  # e is finite and >= 0: the same values as a where (its boolean path is slow here)
        target = torch.where(topp < 1.0, topp * ek.sum(-1, keepdim=True), 0.0)
        # with top-k on every row, the k largest hold the kept mass (ties beyond them: the
        # coverage check falls back to more)
        n = min(CANDIDATES, int(k.max())) if bool(on_k.all()) else CANDIDATES
        sv, se = _first_reaching(torch.where(keep, l, -math.inf), ek, target, descending=True, candidates=n)
        above = se.cumsum(-1) - se
        n_p = (above < target).sum(-1, keepdim=True).clamp(min=1)
        tp = sv.gather(1, n_p - 1)
        keep &= (l >= tp) | (topp >= 1.0)
    minp = state.min_p.float()[:, None]
    if bool((minp > 0).any()):
        keep &= e >= minp
    typ = state.typical_p.float()[:, None]
    if bool((typ < 1.0).any()):
        q = e * keep
        zK = q.sum(-1, keepdim=True)
        # e > 0: masked tokens (l = -inf) would give 0 * -inf = NaN
        s1 = torch.where(keep & (e > 0), e * (l - m), 0.0).sum(-1, keepdim=True)
        ent = torch.log(zK) - s1 / zK
        c = m + torch.log(zK) - ent
        d = torch.where(keep, (l - c).abs(), torch.full_like(l, math.inf))
        target = torch.where(typ < 1.0, typ * zK, 0.0)
        sd, sq = _first_reaching(d, q, target, descending=False)
        n_t = (sq.cumsum(-1) < target).sum(-1, keepdim=True).clamp(max=sd.shape[1] - 1)
        dstar = sd.gather(1, n_t)
        if sd.shape[1] < V:  # rows whose walk ran off the candidates keep everything finite
            dstar = torch.where(sq.sum(-1, keepdim=True) >= target, dstar, math.inf)
        keep &= (d <= dstar) | (typ >= 1.0)
    return keep | state.greedy[:, None]


def _probs(l: torch.Tensor, keep: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    m = l.amax(-1, keepdim=True)
    e = torch.exp(l - m) * keep
    p = e / e.sum(-1, keepdim=True)
    onehot = torch.zeros_like(p).scatter_(1, l.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], onehot, p)


def processed_probs_from_logits(logits: torch.Tensor, state: RowState) -> torch.Tensor:
    """The processed distribution, fp32 ``[B, V]`` (one-hot at the argmax for greedy rows)."""
    l = process_logits(logits, state)
    return _probs(l, filter_keep(l, state), state.greedy)


def sample_from_logits(
    logits: torch.Tensor, state: RowState, position: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row.

    Returns ``(token_ids int64 [B], processed logits fp32 [B, V], keep bool [B, V])``.
    ``position`` (int64 ``[B]``) keys the randomness; it defaults to ``state.n_gen``.
    The exponential race ``argmax_i exp(l_i - m) / E_i`` runs over the kept tokens
    only (noise is drawn for those pairs), which is the same function as the dense race.
    """
    l = process_logits(logits, state)
    keep = filter_keep(l, state)
    B, V = l.shape
    pos = state.n_gen if position is None else position
    tok = l.argmax(-1)
    sampled = ~state.greedy
    if not bool(sampled.any()):
        return tok, l, keep
    m = l.amax(-1)
    filtered = sampled & ~keep.all(-1)
    dense = sampled & ~filtered
    if bool(dense.any()):  # every token competes: draw noise for the whole row
        r = torch.nonzero(dense).flatten()
        E = exponential_noise(state.seed[r], pos[r], V)
        tok[r] = (torch.exp(l[r] - m[r, None]) / E).argmax(-1)
    if bool(filtered.any()):  # noise only for the kept (row, token) pairs
        rows, cols = torch.nonzero(keep & filtered[:, None], as_tuple=True)
        first = _race_at(rows, cols, torch.exp(l[rows, cols] - m[rows]), state.seed, pos, B, V)
        # a row with nothing kept cannot occur for requests the sampler accepted; stay in range
        tok = torch.where(filtered & (first < V), first, tok)
    return tok, l, keep


# --------------------------------------------------------------------------- state updates
def commit_tokens(tokens: torch.Tensor, slots: torch.Tensor, iparams: torch.Tensor,
                  counts: torch.Tensor | None, hist: torch.Tensor | None, vocab_size: int) -> None:
    """Reference of the ``accept`` kernel: append ``tokens [B, n]`` (ids outside
    ``[0, V)`` skipped), column by column, to the state of distinct ``slots [B]``: step
    counter, penalty counts (+2 per output token) and bad-word history ring, in place."""
    li = slots.long()
    flags = iparams[li, I_FLAGS]
    for j in range(tokens.shape[1]):
        t = tokens[:, j].long()
        ok = (t >= 0) & (t < vocab_size)
        iparams[li, I_NGEN] += ok.to(torch.int32)
        if counts is not None:
            pen = ok & ((flags & PENALTY) != 0)
            counts[li[pen], t[pen]] += 2
        if hist is not None:
            on = ok & ((flags & BADSEQ) != 0)
            s, H = li[on], hist.shape[1]
            nh = iparams[s, I_NHIST]
            hist[s, (nh % H).long()] = t[on].to(torch.int32)
            iparams[s, I_NHIST] = nh + 1


def window_state(state: RowState, drafts: torch.Tensor, vocab_size: int,
                 penalized: torch.Tensor | None = None) -> RowState:
    """Reference of the process kernel's window rows: the :class:`RowState` of ``R * W`` rows
    from the state of ``R`` requests and their drafts ``[R, W - 1]``.

    Row ``q * W + j`` is request ``q`` as if ``drafts[q, :j]`` had been accepted: each
    draft in ``[0, V)`` adds 2 to its penalty count (rows of ``penalized [R]``, default
    all), 1 to the step counter and extends the bad-word history. The state is not
    changed.
    """
    R, K = drafts.shape
    W, V, dev = K + 1, vocab_size, drafts.device
    d = drafts.long()
    valid = (d >= 0) & (d < V)
    counted = valid[:, None, :] & (torch.arange(K, device=dev)[None, :] <
                                   torch.arange(W, device=dev)[:, None])[None]  # [R, W, K]
    n_prev = counted.sum(-1).to(torch.int32).reshape(-1)  # [R * W]
    rep = lambda t: None if t is None else t.repeat_interleave(W, dim=0)  # noqa: E731
    out = RowState(**{f: rep(getattr(state, f)) for f in state.__dataclass_fields__})
    out.n_gen = out.n_gen + n_prev
    if state.counts is not None:
        pen = counted if penalized is None else counted & penalized[:, None, None]
        add = torch.zeros(R * W, V + 1, dtype=out.counts.dtype, device=dev)
        idx = torch.where(pen, d[:, None, :], V).reshape(R * W, K)
        add.scatter_add_(1, idx, torch.full_like(idx, 2, dtype=add.dtype))
        out.counts = out.counts + add[:, :V]
    if state.badseq is not None:  # write the drafts into a copy of each ring
        on = (state.badseq_len > 0).any(-1)
        H = state.hist.shape[1]
        rank = valid.long().cumsum(-1) - 1  # history offset of each valid draft
        pos = (state.n_hist.long()[:, None] + rank) % H  # [R, K]
        write = (counted & on[:, None, None]).reshape(R * W, K)
        ring = torch.cat([out.hist, torch.zeros_like(out.hist[:, :1])], 1)
        col = torch.where(write, pos.repeat_interleave(W, dim=0), H)
        ring.scatter_(1, col, d.repeat_interleave(W, dim=0).to(ring.dtype))
        out.hist = ring[:, :H]
        out.n_hist = out.n_hist + n_prev * on.repeat_interleave(W).to(torch.int32)
    return out


# --------------------------------------------------------------------------- speculative
def _uniform(seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    r = random_bits_at(seed, position, torch.full_like(position, ACCEPT_LANE))
    return (r.to(torch.float32) + 0.5) * 2.0**-32


def _race_at(rows: torch.Tensor, cols: torch.Tensor, w: torch.Tensor, seed: torch.Tensor,
             position: torch.Tensor, n_rows: int, vocab_size: int) -> torch.Tensor:
    """The exponential race over (row, token) pairs ``(rows [P], cols [P])`` of weights
    ``w [P] > 0``, noise keyed by ``(seed[row], position[row], token)``: per row of ``n_rows``
    the token of the largest ``w / E`` (the first index among equals, as argmax takes it),
    ``vocab_size`` for a row without pairs. int64 ``[n_rows]``."""
    E = exponential_from_bits(random_bits_at(seed[rows], position[rows], cols))
    key = w / E
    best = torch.full((n_rows,), -1.0, device=w.device).scatter_reduce(0, rows, key, "amax")
    win = key == best[rows]
    first = torch.full((n_rows,), vocab_size, dtype=torch.int64, device=w.device)
    return first.scatter_reduce(0, rows[win], cols[win], "amin")


def _race(weights: torch.Tensor, seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """argmax_i w_i / E_i per row of ``weights [N, V]`` (noise keyed by seed/position; a row
    without positive weight gives 0). On the CPU, when few weights are positive (filtered
    rows), noise is drawn only for those (row, token) pairs: the same function."""
    N, V = weights.shape
    pos = weights > 0
    if weights.device.type == "cpu" and N and int(pos.sum()) * 4 < N * V:
        rows, cols = torch.nonzero(pos, as_tuple=True)
        first = _race_at(rows, cols, weights[rows, cols], seed, position, N, V)
        return torch.where(first < V, first, 0)
    E = exponential_noise(seed, position, V)
    key = weights / E  # zero weights give 0: below every positive key (a sign test is slow here)
    best = key.argmax(-1)
    if bool((key.gather(1, best[:, None]) > 0).all()):
        return best
    return torch.where(pos, key, torch.full_like(key, -1.0)).argmax(-1)  # a row without a positive key


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
    """Torch reference of the verify kernel (same inputs and outputs; see
    ``triton_kernels/verify.py`` for the rule).

    ``p [B, K+1, V]``, ``q [B, K, V]`` or None (point masses), ``draft [B, K]``,
    ``n_draft [B]``, ``seed [B]``, ``position [B]`` (step counter of the first draft).
    Returns ``(tokens int64 [B, K+1] -1 padded, n_accepted int32 [B])``.
    ``residual="p"`` resamples from ``p`` instead of ``normalize(max(p - q, 0))`` after a
    rejection: a deliberately wrong rule, kept as the statistical tests' negative control.
    """
    B, K1, V = p.shape
    dev = p.device
    out = torch.full((B, K1), -1, dtype=torch.int64, device=dev)
    n_acc = torch.zeros(B, dtype=torch.int32, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    seed, position, n_draft, draft = seed.long(), position.long(), n_draft.long(), draft.long()
    for j in range(K1 - 1):
        act = alive & (j < n_draft)
        if not bool(act.any()):
            break
        d = draft[:, j].clamp(0, V - 1)
        pd = p[rows, j, d]
        qd = q[rows, j, d] if q is not None else torch.ones_like(pd)
        ok = _uniform(seed, position + j) * qd < pd
        acc, rej = act & ok, act & ~ok
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
    if bool(alive.any()):  # the bonus token
        r = rows[alive]
        nb = n_draft[r]
        out[r, nb] = _race(p[r, nb], seed[r], position[r] + nb)
    return out, n_acc


def _take_rows(state: RowState, rows: torch.Tensor) -> RowState:
    """The state of ``rows`` (int64 indices) of ``state``."""
    return RowState(**{f: None if (v := getattr(state, f)) is None else v[rows]
                       for f in state.__dataclass_fields__})


def _numerators(logits: torch.Tensor, state: RowState
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What :func:`processed_probs_from_logits` computes for ``logits [n, V]``, kept as
    numerators ``e [n, V]`` and row sums ``z [n]`` (``p = e / z`` bit for bit), with the argmax
    ``[n]`` of the processed logits when a row is greedy (its ``p`` is one-hot there), else None."""
    l = process_logits(logits, state)
    e = torch.exp(l - l.amax(-1, keepdim=True))
    if _filters(state):
        e = e * filter_keep(l, state)
    return e, e.sum(-1), l.argmax(-1) if bool(state.greedy.any()) else None


def verify_point_masses_from_logits(
    logits: torch.Tensor,
    state: RowState,
    draft: torch.Tensor,
    n_draft: torch.Tensor,
    seed: torch.Tensor,
    position: torch.Tensor,
    *,
    first_chunk: int = 2,
    residual: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`processed_probs_from_logits` then :func:`verify_reference` with point-mass
    drafts (``q`` None), computing only what the verification reads: the same tokens for a
    fraction of the work on the CPU.

    ``logits [R * W, V]`` (row ``r * W + j``: request ``r`` at window position ``j``),
    ``state`` the window rows' state (:func:`window_state`), ``draft [R, W - 1]``,
    ``n_draft [R]``, ``seed [R]``, ``position [R]`` (step counter of the first draft).
    A request's acceptance reads only its drafts' probabilities (``u_j < p_j(d_j)``, the
    uniforms keyed by position alone) up to its first rejection, and it draws from one
    distribution -- the residual there, or the bonus position's. So the window is processed
    in chunks of positions (``first_chunk``, then doubling) over the requests still
    accepting: a request rejected early costs a few rows instead of ``W``. Returns
    ``(tokens int64 [R, W] -1 padded, n_accepted int32 [R])``. ``residual="p"``: the
    negative control of :func:`verify_reference`.
    """
    R, K = draft.shape
    W = K + 1
    N, V = logits.shape
    if N != R * W:
        raise ValueError(f"logits must be [{R * W}, V] for draft [{R}, {K}], got {tuple(logits.shape)}")
    dev = logits.device
    seed, position, n_draft = seed.long(), position.long(), n_draft.long()
    d = draft.long().clamp(0, V - 1)
    rq = torch.arange(R, device=dev)
    j = torch.arange(K, device=dev)
    u = _uniform(seed[:, None], position[:, None] + j[None, :])  # [R, K]
    drafted = j[None, :] < n_draft[:, None]
    pd = torch.zeros(R, K, device=dev)
    tok = torch.full((R,), -1, dtype=torch.int64, device=dev)
    n_acc = torch.zeros(R, dtype=torch.int64, device=dev)
    done = torch.zeros(R, dtype=torch.bool, device=dev)
    a, size = 0, max(1, first_chunk)
    while a < W and not bool(done.all()):
        b = min(a + size, W)
        cols = torch.arange(a, b, device=dev)
        need = ~done[:, None] & (cols[None, :] <= n_draft[:, None])  # [R, b - a]
        rr, cc = torch.nonzero(need, as_tuple=True)
        at = torch.full((R, b - a), -1, dtype=torch.int64, device=dev)  # chunk row of (r, j)
        at[rr, cc] = torch.arange(rr.numel(), device=dev)
        st = _take_rows(state, rr * W + a + cc)
        e, z, top = _numerators(logits[rr * W + a + cc], st)
        greedy, jp = st.greedy, a + cc
        i = torch.nonzero(jp < K).flatten()  # the chunk's rows with a draft to test
        dd = d[rr[i], jp[i]]
        p_d = e[i, dd] / z[i]
        if top is not None:
            p_d = torch.where(greedy[i], (dd == top[i]).to(p_d.dtype), p_d)
        pd[rr[i], jp[i]] = p_d
        hi = min(b, K)
        ok = (u[:, :hi] < pd[:, :hi]) & drafted[:, :hi]
        run = ok.to(torch.int64).cumprod(1).sum(1)
        fin = ~done & (run < b)  # the first position not accepted lies in this chunk
        if bool(fin.any()):
            r_f, f = rq[fin], run[fin]
            i_f = at[r_f, f - a]
            w = e[i_f] / z[i_f, None]
            if residual != "p":
                rejected = torch.nonzero(f < n_draft[fin]).flatten()
                w[rejected, d[r_f[rejected], f[rejected]]] = 0.0  # the residual of a point mass
            t = _race(w, seed[r_f], position[r_f] + f)
            if top is not None:  # greedy rows: p is one-hot at the argmax, which a rejection never removes
                t = torch.where(greedy[i_f], top[i_f], t)
            tok[r_f] = t
            n_acc[r_f] = f
            done |= fin
        a, size = b, size * 2
    return _emitted(d, n_acc, tok), n_acc.to(torch.int32)


def _emitted(draft: torch.Tensor, n_acc: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """int64 ``[R, K + 1]``: each row's first ``n_acc`` drafts, then ``tok``, then -1."""
    R, K = draft.shape
    col = torch.arange(K + 1, device=draft.device)
    dw = torch.cat([draft, torch.zeros(R, 1, dtype=torch.int64, device=draft.device)], 1)
    out = torch.where(col[None, :] < n_acc[:, None], dw, -1)
    return torch.where(col[None, :] == n_acc[:, None], tok[:, None], out)
