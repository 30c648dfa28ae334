"""Model drafters: a separate small LM (:class:`DraftModel`) and the shared drafting loop.

Draft token ``j`` is drawn from the sampler-processed draft distribution ``q`` (the
request's own settings; penalties count the earlier drafts of the window, which are
accepted tentatively and rolled back) with counter-based randomness on a hash stream of
its own (the seed xor :data:`DRAFT_SALT`), so verification with ``(p, q)`` is exact.

:class:`ModelDrafter` is the loop; :class:`DraftModelDrafter` runs it on the draft model's
own :class:`~decodekit.engine.runner.ModelRunner` (its own slot KV cache, kept in step with
the target's by length bookkeeping: a draft that fell behind catches up in its next
forward). The layer-skip drafter (:mod:`.layer_skip`) runs the same loop on the target.

May call: the engine's runner and model adapter, the sampler, the steering vector types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..engine.model_adapter import ModelAdapter, hidden_size
from ..engine.runner import ModelRunner
from ..steering.vector import Steering, SteeringVector
from .base import NO_LIMIT, DraftRequest, Drafts, check_k

__all__ = ["DRAFT_SALT", "DraftModel", "DraftModelDrafter", "ModelDrafter"]

DRAFT_SALT = 0x2545F4914F6CDD1D  # xor-ed into the seed: draft draws use their own hash stream


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
        self.model, self.tokenizer, self.k = model, tokenizer, check_k(k)

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

    def build(self, runner: ModelRunner, sampler: Any) -> DraftModelDrafter:
        """The drafter for a generator with this target ``runner`` and ``sampler``."""
        self.check_vocab(runner.adapter.vocab_size, runner.adapter.tokenizer)
        return DraftModelDrafter(self, runner, sampler)

    def __repr__(self) -> str:
        return f"DraftModel({type(self.model).__name__}, k={self.k})"


class ModelDrafter:
    """Autoregressive drafting of ``K`` tokens per row with a model, over slots ``0..n-1``.

    Subclasses say which runner drafts (:attr:`runner`), how its cache stands per slot
    (:meth:`draft_lengths`) and how one forward runs (:meth:`forward`).
    """

    cost: float = 1.0
    prior = (0.6, 0.6)  # acceptance before any evidence (first token, then each next)

    def __init__(self, runner: ModelRunner, sampler: Any) -> None:
        self.runner, self.sampler = runner, sampler

    # -- what subclasses define ------------------------------------------------------------
    def draft_lengths(self, lengths: Sequence[int]) -> list[int]:
        """Tokens in the drafting cache per slot, given the target's ``lengths``."""
        return list(lengths)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, length: torch.Tensor, kv_len: int
                ) -> torch.Tensor:
        """Logits ``[n, V]`` of each slot row's last input (slots ``0..n-1``)."""
        return self.runner.forward(ids, pos, length, 0, kv_len)[:, -1]

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One drafting step over slots ``0..n-1``: ``tokens [n]`` at ``pos [n]`` (device);
        logits ``[n, V]``. Eager here; a drafter on a runner of its own replays its graphs."""
        return self.forward(tokens[:, None], pos[:, None], pos + 1, kv_len)

    def enable_graphs(self, capture=None) -> None:
        """Nothing captured by default (the layer-skip drafter swaps layers per forward)."""

    def confident(self, slot: int, tokens: Sequence[int]) -> bool:
        """A model's drafts carry no such signal before they are drafted."""
        return False

    def evidence(self, slot: int, tokens: Sequence[int]) -> int:
        """None (see :meth:`confident`)."""
        return 0

    def available(self, slot: int, tokens: Sequence[int]) -> int:
        """No limit of its own: a model drafts as many tokens as it is asked for."""
        return NO_LIMIT

    # -- the loop --------------------------------------------------------------------------
    def first_inputs(self, requests: Sequence[DraftRequest], lengths: Sequence[int], n: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(ids, pos) [n, W]`` of the first draft forward: each row's tokens not yet in
        the drafting cache (right-aligned, ending with its newest token; pads before them write
        at free positions); other slots in ``0..n-1`` write at their own free positions."""
        have = self.draft_lengths(lengths)
        size = self.runner.cache.max_seq_len
        W = max(r.length - have[r.slot] + 1 for r in requests)
        ids = torch.zeros(n, W, dtype=torch.long)
        pos = torch.zeros(n, W, dtype=torch.long)
        for slot in range(n):
            pos[slot] = have[slot] + torch.arange(W)
        for r in requests:
            start, w = have[r.slot], r.length + 1 - have[r.slot]
            ids[r.slot, W - w:] = torch.tensor(list(r.tokens[start: r.length + 1]), dtype=torch.long)
            pos[r.slot, W - w:] = torch.arange(start, r.length + 1)
            pos[r.slot, : W - w] = r.length + 1 + torch.arange(W - w)
        return ids, pos.clamp_(max=size - 1)

    def propose(self, requests: Sequence[DraftRequest], lengths: Sequence[int]) -> Drafts | None:
        """Draft ``K = max(budget)`` tokens per row (row ``r`` keeps ``budget[r]``, the rest -1).
        The sampler state is left as it was."""
        sp, dev = self.sampler, self.runner.device
        budgets = [r.budget for r in requests]
        K = max(budgets)
        if K == 0:
            return None
        n = max(r.slot for r in requests) + 1
        size = self.runner.cache.max_seq_len
        slots = [r.slot for r in requests]
        idx, n_draft = self.runner.upload(slots), self.runner.upload(budgets)
        ids, pos_h = self.first_inputs(requests, lengths, n)
        last = pos_h[:, -1].to(dev)  # [n] position of each slot's last input
        pos = pos_h.to(dev)
        kv_len = self.runner.kv_len(int(pos_h.max()) + K + 1)
        logits = self.forward(ids.to(dev), pos, pos[:, -1] + 1, kv_len)
        cur = torch.zeros(n, dtype=torch.long, device=dev)
        greedy = sp.all_greedy(slots)
        drafts, qs = [], []
        try:
            for j in range(K):
                q = sp.probs(logits.index_select(0, idx), slots)  # [R, V]
                x = q.argmax(-1) if greedy else sp.draw(q, slots, salt=DRAFT_SALT)  # greedy q is one-hot
                x = torch.where(n_draft > j, x, -1)
                sp.accept(slots, x)  # tentatively, so penalties see the earlier drafts
                drafts.append(x)
                qs.append(q)
                if j + 1 < K:
                    cur.index_copy_(0, idx, x.clamp(min=0))
                    logits = self.step(cur, (last + (j + 1)).clamp(max=size - 1), kv_len)
        finally:  # the sampler state is left as it was, also when a forward fails
            if drafts:
                sp.rollback(slots, torch.stack(drafts, 1))
        return Drafts(torch.stack(drafts, 1), budgets, torch.stack(qs, 1))

    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], steering: Sequence[Any]) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def truncate(self, slot: int, length: int) -> None:
        """Nothing to cut: a drafter on the target's own cache (layer skip) keeps no state."""

    def committed(self, requests: Sequence[DraftRequest], accepted: Sequence[int], window: int) -> None:
        pass


class DraftModelDrafter(ModelDrafter):
    """A :class:`DraftModel` on its own runner; ``cost`` is its share of the parameters.

    Steered like the target on the layers it has when its hidden size is the target's
    (verification always uses the steered target, so outputs stay exact either way)."""

    def __init__(self, config: DraftModel, target: ModelRunner, sampler: Any) -> None:
        adapter = ModelAdapter(config.model, config.tokenizer, target.device, target.dtype)
        if adapter.tp_size > 1 and adapter.tp_size != target.adapter.tp_size:
            raise ValueError(f"the draft model is sharded over {adapter.tp_size} ranks and the target over "
                             f"{target.adapter.tp_size}: load the draft with the target's tp_plan in the "
                             "same torchrun job, or unsharded (every rank then holds all of it)")
        steer = target.hooks is not None and _hidden(adapter) == target.hooks.hidden_size
        runner = ModelRunner(adapter, target.max_slots, target.cache.max_seq_len, steering=steer)
        super().__init__(runner, sampler)
        self.cost = adapter.num_parameters() / max(1, target.adapter.num_parameters())
        self.length = [0] * target.max_slots  # tokens in the draft cache per slot

    def draft_lengths(self, lengths: Sequence[int]) -> list[int]:
        return list(self.length)

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """A drafting step on the draft runner: a decode graph of the bucket when captured."""
        return self.runner.decode_at(tokens, pos, kv_len)

    def enable_graphs(self, capture=None) -> None:
        """Decode graphs of the draft model per batch bucket (plain and steered)."""
        self.runner.enable_graphs(capture)

    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], steering: Sequence[Any]) -> None:
        for s, p, st in zip(slots, prompts, steering, strict=True):
            self._steer(s, st, len(p))
        self.runner.prefill(prompts, slots[0])
        for s, p in zip(slots, prompts, strict=True):
            self.length[s] = len(p)

    def release(self, slot: int) -> None:
        self.length[slot] = 0
        self._steer(slot, None, 0)

    def truncate(self, slot: int, length: int) -> None:
        self.length[slot] = min(self.length[slot], length)

    def committed(self, requests: Sequence[DraftRequest], accepted: Sequence[int], window: int) -> None:
        """The draft cache holds the newest token and the drafts up to ``window - 2``, so it is
        valid for ``a + 1`` new tokens, at most ``window``."""
        for r, a in zip(requests, accepted, strict=True):
            self.length[r.slot] = r.length + min(a + 1, window)

    def _steer(self, slot: int, steering: Steering | None, prompt_len: int) -> None:
        hooks = self.runner.hooks
        if hooks is None:
            return
        sub = {} if steering is None else {i: v for i, v in steering.vector.items() if i < hooks.num_layers}
        if not sub:
            hooks.clear_row(slot)
            return
        vec = SteeringVector(sub, model_name=steering.vector.model_name, method=steering.vector.method)
        hooks.set_row(slot, dataclasses.replace(steering, vector=vec), prompt_len)



def _hidden(adapter: ModelAdapter) -> int | None:
    try:
        return hidden_size(adapter.model)
    except ValueError:
        return None
