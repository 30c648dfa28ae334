"""Self-speculative drafting: the target itself through a subset of its decoder layers.

No extra weights: :class:`LayerSkipDraft` names the kept layers; its drafter runs the
target's own runner with the other layers swapped for pass-throughs (layer indices, layer
types, caches and steering hooks stay the same). It reads the target's KV cache for the
context and writes the keys/values of its drafted positions into the target's free space,
which the verification forward then overwrites.

May call: the engine's runner and model adapter, :mod:`.draft_model` (the drafting loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .._checks import is_int
from ..engine.graphs import Capture, DecodeGraphs
from ..engine.model_adapter import decoder_layer_list, layers_return_tuple
from ..engine.runner import ModelRunner
from .base import check_k
from .draft_model import ModelDrafter

__all__ = ["LayerSkipDraft", "LayerSkipDrafter", "skip_layers"]


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
        elif not layers or not all(is_int(i) for i in layers):
            raise ValueError(f"LayerSkipDraft layers must be a non-empty sequence of ints, got {layers!r}")
        self.layers, self.k = layers, check_k(k)

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

    def build(self, runner: ModelRunner, sampler: Any) -> LayerSkipDrafter:
        """The drafter for a generator with this target ``runner`` and ``sampler``."""
        return LayerSkipDrafter(self, runner, sampler)

    def __repr__(self) -> str:
        return f"LayerSkipDraft(layers={self.layers!r}, k={self.k})"


class _Skip(torch.nn.Module):
    """Stands in for a skipped decoder layer: passes the hidden states through."""

    def __init__(self, tuple_out: bool) -> None:
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.tuple_out else hidden_states


class _SkipPlan:
    """The model's decoder-layer list and a copy with the skipped layers passed through,
    built once; :meth:`swapped` puts the copy in place for the length of a block."""

    def __init__(self, model: torch.nn.Module, keep: Sequence[int]) -> None:
        self.parent, self.name = decoder_layer_list(model)
        self.full = getattr(self.parent, self.name)
        tuple_out = layers_return_tuple(model)
        kept = set(keep)
        self.skipped = torch.nn.ModuleList(
            [m if i in kept else _Skip(tuple_out) for i, m in enumerate(self.full)])

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        setattr(self.parent, self.name, self.skipped)
        try:
            yield
        finally:
            setattr(self.parent, self.name, self.full)


@contextlib.contextmanager
def skip_layers(model: torch.nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """Run ``model`` with only the decoder layers ``keep`` inside the block (the others
    pass their input through; layer indices, layer types and caches stay the same)."""
    with _SkipPlan(model, keep).swapped():
        yield


class LayerSkipDrafter(ModelDrafter):
    """The drafting loop on the target's runner with the skipped layers swapped out;
    ``cost`` is the kept share of the layers. Steered by the target's own hooks on the layers
    it keeps; its draft length per slot is the target's (it shares the target's cache)."""

    def __init__(self, config: LayerSkipDraft, runner: ModelRunner, sampler: Any) -> None:
        super().__init__(runner, sampler)
        parent, name = decoder_layer_list(runner.model)
        n_layers = len(getattr(parent, name))
        self.keep = config.resolve(n_layers)
        self.cost = len(self.keep) / n_layers
        self.plan = _SkipPlan(runner.model, self.keep)
        self.graphs: DecodeGraphs | None = None
        self.steered_graphs: DecodeGraphs | None = None

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, length: torch.Tensor, kv_len: int
                ) -> torch.Tensor:
        with self.plan.swapped():
            return super().forward(ids, pos, length, kv_len)

    def enable_graphs(self, capture: Capture | None = None) -> None:
        """Decode graphs of the skipping forward per batch bucket (plain and steered) on the
        target's cache. They read the step's tokens from a buffer of their own: the target's
        newest-token buffer stays as the verification needs it."""
        r = self.runner
        size = r.cache.max_seq_len
        self.tokens = torch.zeros(r.max_slots, dtype=torch.long, device=r.device)

        def forward(pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
            with self.plan.swapped():
                return r.forward(self.tokens[: pos.shape[0], None], pos, length, 0, size)

        def steered(pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
            with r.every_hook():
                return forward(pos, length)

        pool = None if r.graphs is None else r.graphs.pool
        with torch.inference_mode():
            self.graphs = DecodeGraphs(forward, r.max_slots, r.device, capture, pool=pool,
                                       name="layer-skip draft")
            self.graphs.capture_all()
            if r.hooked:
                self.steered_graphs = DecodeGraphs(steered, r.max_slots, r.device, capture,
                                                   pool=self.graphs.pool, name="steered layer-skip draft")
                self.steered_graphs.capture_all()

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """A drafting step: a captured bucket when ready (extra rows write at the cache's last
        scratch position, overwritten before any read), else eager."""
        g = self.steered_graphs if self.runner.steered else self.graphs
        n = pos.shape[0]
        if g is None or not g.ready(n):
            return super().step(tokens, pos, kv_len)
        self.tokens[:n].copy_(tokens)
        return g.run_padded(pos, pos + 1, self.runner.cache.max_seq_len - 1)
