"""Model drafters for speculative decoding.

* :class:`DraftModel`: a separate, smaller causal LM with the target's vocabulary and its
  own slot KV cache, kept in step with the target's by length bookkeeping.
* :class:`LayerSkipDraft`: the target itself run through a subset of its decoder layers
  (self-speculative decoding; no extra weights). It reads the target's KV cache for the
  context and writes its own keys/values of the drafted positions into the target's
  free space, which the verification forward then overwrites.

Both have a distribution ``q``: draft token ``j`` is drawn from the sampler-processed
draft distribution (the request's own settings; penalties count the earlier drafts of
the window) with counter-based randomness on a hash stream of its own, so verification
with ``(p, q)`` is exact (:func:`decodekit.speculative.verify`).

:class:`DraftRunner` is the generator-side machinery; users only build the two configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator, Sequence

import torch

from .hf_compat import cache_kwarg
from .kv_cache import SlotKVCache, attention_masks, mask_layout
from .steer_hooks import SteeringHooks, decoder_layers, maybe_bound
from .steering import Steering, SteeringVector

__all__ = ["DraftModel", "DraftRunner", "LayerSkipDraft", "decoder_layer_list"]

DRAFT_SALT = 0x2545F4914F6CDD1D  # xor-ed into the seed: draft draws use their own hash stream


def _check_k(k) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return k


class DraftModel:
    """A separate draft LM (e.g. a small model of the target's family).

    Parameters
    ----------
    model : transformers causal LM
        Must produce logits over the target's vocabulary (same size). Runs on the
        generator's device and dtype, with its own slot KV cache.
    tokenizer : optional
        The draft's tokenizer; when given, its token strings must equal the target's.
        Without it the draft is assumed to share the target's tokenizer.
    k : int
        Default draft length (``num_speculative_tokens`` overrides it).
    """

    def __init__(self, model, tokenizer=None, *, k: int = 4) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"DraftModel needs a transformers model, got {type(model).__name__}")
        self.model, self.tokenizer, self.k = model, tokenizer, _check_k(k)

    def check_vocab(self, vocab_size: int, tokenizer) -> None:
        """``ValueError`` saying what differs when the draft's vocabulary is not the target's."""
        emb = self.model.get_output_embeddings()
        n = int(emb.weight.shape[0]) if emb is not None else int(self.model.config.vocab_size)
        if n != vocab_size:
            raise ValueError(f"draft model vocabulary size {n} != target vocabulary size {vocab_size}: "
                             "the draft must share the target's vocabulary")
        if self.tokenizer is None or tokenizer is None:
            return
        mine, theirs = self.tokenizer.get_vocab(), tokenizer.get_vocab()
        if mine != theirs:
            only_d = sorted(set(mine) - set(theirs))[:3]
            only_t = sorted(set(theirs) - set(mine))[:3]
            moved = [t for t in set(mine) & set(theirs) if mine[t] != theirs[t]][:3]
            raise ValueError(
                "draft tokenizer's token strings differ from the target's "
                f"(draft {len(mine)} tokens, target {len(theirs)}; only in draft: {only_d}, "
                f"only in target: {only_t}, different ids: {moved})"
            )

    def __repr__(self) -> str:
        return f"DraftModel({type(self.model).__name__}, k={self.k})"


class LayerSkipDraft:
    """Self-speculative drafter: the target through a subset of its decoder layers.

    Parameters
    ----------
    layers : int or sequence of int
        An int ``N`` keeps the first ``N`` decoder layers (early exit); a sequence keeps
        exactly those 0-based layer indices (e.g. skip every other middle layer). The
        final norm and the output head always run.
    k : int
        Default draft length.
    """

    def __init__(self, layers: int | Sequence[int], *, k: int = 4) -> None:
        if isinstance(layers, bool) or not isinstance(layers, (int, Sequence)) or isinstance(layers, str):
            raise ValueError(f"LayerSkipDraft layers must be an int or a sequence of ints, got {layers!r}")
        if isinstance(layers, int):
            if layers < 1:
                raise ValueError(f"LayerSkipDraft layers must be >= 1, got {layers}")
        elif not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"LayerSkipDraft layers must be a non-empty sequence of ints, got {layers!r}")
        self.layers, self.k = layers, _check_k(k)

    def resolve(self, n_layers: int) -> list[int]:
        """The kept layer indices for a model of ``n_layers`` decoder layers."""
        if isinstance(self.layers, int):
            if self.layers >= n_layers:
                raise ValueError(f"LayerSkipDraft layers={self.layers} must be < the model's "
                                 f"{n_layers} decoder layers (a draft must skip something)")
            return list(range(self.layers))
        keep = sorted(set(self.layers))
        if keep[0] < 0 or keep[-1] >= n_layers:
            raise ValueError(f"LayerSkipDraft layers {keep} outside the model's decoder layers "
                             f"[0, {n_layers})")
        if len(keep) == n_layers:
            raise ValueError("LayerSkipDraft keeps every layer: a draft must skip something")
        return keep

    def __repr__(self) -> str:
        return f"LayerSkipDraft(layers={self.layers!r}, k={self.k})"


def decoder_layer_list(model) -> tuple[torch.nn.Module, str]:
    """``(parent, attribute)`` where ``model``'s decoder layers (a ModuleList) live."""
    layers = decoder_layers(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is layers:
                return parent, name
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


class _Skip(torch.nn.Module):
    """Stands in for a skipped decoder layer: passes the hidden states through."""

    def __init__(self, tuple_out: bool) -> None:
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.tuple_out else hidden_states


def _skip_plan(model, keep: Sequence[int], tuple_out: bool):
    """``(parent, attribute, full layer list, list with the skipped layers passed through)``."""
    parent, name = decoder_layer_list(model)
    full = getattr(parent, name)
    kept = set(keep)
    swapped = torch.nn.ModuleList([m if i in kept else _Skip(tuple_out) for i, m in enumerate(full)])
    return parent, name, full, swapped


@contextlib.contextmanager
def _swapped(parent, name: str, full, swapped) -> Iterator[None]:
    parent._modules[name] = swapped
    try:
        yield
    finally:
        parent._modules[name] = full


@contextlib.contextmanager
def skip_layers(model, keep: Sequence[int], tuple_out: bool) -> Iterator[None]:
    """Run ``model`` with only the decoder layers ``keep`` inside the block (the others
    pass their input through; layer indices, layer types and caches stay the same)."""
    with _swapped(*_skip_plan(model, keep, tuple_out)):
        yield


class DraftRunner:
    """Drafting for a :class:`~decodekit.TokenGenerator` (internal).

    ``propose`` runs ``K`` draft forwards over the generator's slot range and returns
    the drafts and their processed distributions; ``committed`` does the draft cache's
    length bookkeeping after verification. ``cost`` estimates one drafted token's cost as
    a fraction of a target forward (kept layers, or the draft's share of the parameters).
    """

    def __init__(self, gen, draft: DraftModel | LayerSkipDraft) -> None:
        self.gen, self.draft = gen, draft
        if isinstance(draft, DraftModel):
            draft.check_vocab(gen.vocab_size, gen.tokenizer)
            self.model = draft.model.to(device=gen.device, dtype=gen.dtype).eval()
            self.cache = SlotKVCache(self.model.config, gen.max_batch_size, gen.cache.max_seq_len,
                                     gen.device, gen.dtype)
            self.layout = mask_layout(self.model)
            self.cache_kw = cache_kwarg(self.model)
            self.keep = None
            n_draft = sum(p.numel() for p in self.model.parameters())
            self.cost = n_draft / max(1, sum(p.numel() for p in gen.model.parameters()))
            self.hooks = None  # steered like the target where it has the layer (same hidden size)
            if gen._steer is not None:
                with contextlib.suppress(ValueError):
                    hooks = SteeringHooks(self.model, gen.max_batch_size, gen.device)
                    if hooks.hidden_size == gen._steer.hidden_size:
                        self.hooks = hooks
                        weakref.finalize(self, hooks.remove)
                    else:
                        hooks.remove()
        else:
            parent, name = decoder_layer_list(gen.model)
            self.keep = draft.resolve(len(getattr(parent, name)))
            self.cost = len(self.keep) / len(getattr(parent, name))
            self.cache = None
            self.hooks = None  # the kept layers carry the target's own steering hooks
            tuple_out = self._probe_tuple_out(gen.model, getattr(parent, name)[0])
            self._plan = _skip_plan(gen.model, self.keep, tuple_out)  # built once, swapped per forward

    @staticmethod
    @torch.inference_mode()
    def _probe_tuple_out(model, layer) -> bool:
        seen: list[bool] = []
        h = layer.register_forward_hook(lambda m, a, out: seen.append(isinstance(out, tuple)))
        try:
            dev = next(model.parameters()).device
            model(input_ids=torch.tensor([[1, 2]], device=dev), use_cache=False)
        finally:
            h.remove()
        return bool(seen and seen[0])

    @property
    def own_cache(self) -> bool:
        return self.cache is not None

    # ------------------------------------------------------------------ forwards
    def _forward(self, ids, pos, length, kv_len):
        """Draft logits ``[n, V]`` of each slot row's last position (slots ``0..n-1``)."""
        gen = self.gen
        if self.cache is None:
            with _swapped(*self._plan):
                return gen._forward(ids, pos, length, 0, kv_len)
        self.cache.bind(0, pos, kv_len)
        with maybe_bound(self.hooks, 0, pos):
            out = self.model(input_ids=ids, attention_mask=attention_masks(*self.layout, pos, length, kv_len,
                                                                          gen.dtype),
                             position_ids=pos, use_cache=True, logits_to_keep=1,
                             **{self.cache_kw: self.cache})
        return out.logits[:, -1, :]

    def prefill(self, ids, pos, lengths, first_slot: int, kv_len: int, run) -> None:
        """Prefill the draft's own cache with the prompts the target just prefilled."""
        if self.cache is None:
            return
        self.cache.bind(first_slot, pos, kv_len)
        with maybe_bound(self.hooks, first_slot, pos):
            self.model(input_ids=ids, attention_mask=attention_masks(*self.layout, pos, lengths, kv_len,
                                                                     self.gen.dtype),
                       position_ids=pos, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        for c in run:
            c.draft_length = len(c.prompt_token_ids)

    def set_steering(self, slot: int, steering: Steering | None, prompt_len: int) -> None:
        """Steer a DraftModel's row with the request's vector, on the layers it has (a
        LayerSkipDraft shares the target's hooks; a draft of another hidden size runs
        unsteered: verification always uses the steered target, so outputs stay exact)."""
        if self.hooks is None:
            return
        sub = {} if steering is None else {
            i: v for i, v in steering.vector.items() if i < self.hooks.num_layers}
        if not sub:
            self.hooks.clear_row(slot)
            return
        vec = SteeringVector(sub, model_name=steering.vector.model_name, method=steering.vector.method)
        self.hooks.set_row(slot, dataclasses.replace(steering, vector=vec), prompt_len)

    def _first_inputs(self, rows, seen, n: int):
        """Inputs of the first draft forward: each row's tokens not yet in the draft cache
        (right-aligned; pads before them write at free positions) ending with its newest
        token; other slots in ``0..n-1`` write at their own free positions."""
        gen = self.gen
        size = (self.cache or gen.cache).max_seq_len
        row_of = {c.slot: (c, s) for c, s in zip(rows, seen, strict=True)}
        W = 1 if self.cache is None else max(c.length - c.draft_length + 1 for c in rows)
        ids = torch.zeros(n, W, dtype=torch.long)
        pos = torch.zeros(n, W, dtype=torch.long)
        for slot in range(n):
            owner = gen._slot_owner[slot]
            if slot in row_of:
                c, s = row_of[slot]
                start = c.length if self.cache is None else c.draft_length
                w = c.length + 1 - start
                ids[slot, W - w:] = torch.tensor(s[start: c.length + 1])
                pos[slot, W - w:] = torch.arange(start, c.length + 1)
                pos[slot, : W - w] = c.length + 1 + torch.arange(W - w)
            else:
                free = 0 if owner is None else (owner.length if self.cache is None else owner.draft_length)
                pos[slot] = free + torch.arange(W)
        pos.clamp_(max=size - 1)
        if self.cache is None:  # the newest tokens are already on the device
            return gen._last_tok[:n, None], pos
        return ids, pos

    def propose(self, rows, seen: list[list[int]], rooms: list[int]):
        """Draft ``K = max(rooms)`` tokens per row (row ``r`` keeps ``rooms[r]``, the rest is -1).

        Returns ``(drafts int64 [R, K], q fp32 [R, K, V])``: the drafted tokens and the
        processed distributions they were drawn from. Sampler state is left unchanged.
        """
        gen, sp = self.gen, self.gen.sampler
        K = max(rooms)
        n = max(c.slot for c in rows) + 1
        size = (self.cache or gen.cache).max_seq_len
        slots = [c.slot for c in rows]
        idx = gen._upload(slots)
        n_draft = gen._upload(rooms)
        ids, pos_h = self._first_inputs(rows, seen, n)
        last = pos_h[:, -1].to(gen.device)  # [n] position of each slot's last input
        pos = pos_h.to(gen.device)
        kv_len = gen._kv_len(int(pos_h.max()) + K + 1)
        logits = self._forward(ids.to(gen.device), pos, pos[:, -1] + 1, kv_len)
        cur = torch.zeros(n, dtype=torch.long, device=gen.device)
        greedy = sp.all_greedy(slots)
        drafts, qs = [], []
        for j in range(K):
            q = sp.probs(logits.index_select(0, idx), slots)  # [R, V]
            x = q.argmax(-1) if greedy else sp.draw(q, slots, salt=DRAFT_SALT)  # greedy q: one-hot
            x = torch.where(n_draft > j, x, -1)
            sp.accept(slots, x)  # tentatively, so penalties see the earlier drafts
            drafts.append(x)
            qs.append(q)
            if j + 1 < K:
                cur.index_copy_(0, idx, x.clamp(min=0))
                p = (last + (j + 1)).clamp(max=size - 1)[:, None]
                logits = self._forward(cur[:, None], p, p[:, 0] + 1, kv_len)
        dpad = torch.stack(drafts, 1)
        sp.rollback(slots, dpad)
        return dpad, torch.stack(qs, 1)

    def committed(self, rows, K: int, accepted: list[int]) -> None:
        """After verification (before the rows' lengths advance): the draft cache holds the
        newest token and the drafts up to ``K - 2``, so it is valid for ``a + 1`` new tokens,
        at most ``K``."""
        if self.cache is None:
            return
        for c, a in zip(rows, accepted, strict=True):
            c.draft_length = c.length + min(a + 1, K)
