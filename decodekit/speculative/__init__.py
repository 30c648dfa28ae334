"""Speculative decoding: drafters propose, the target verifies a window in one forward.

- :mod:`.base`: the :class:`~.base.Drafter` protocol, :class:`~.base.Drafts`,
  :class:`SpecStats`;
- drafter configs, each built into a drafter with the target's runner and sampler:
  :class:`NGramDraft` (:mod:`.ngram`, prompt lookup), :class:`DraftModel`
  (:mod:`.draft_model`, a separate small LM with its own cache), :class:`LayerSkipDraft`
  (:mod:`.layer_skip`, the target through a subset of its layers);
- :mod:`.policy`: draft lengths per request and step, from measured verification costs;
- :mod:`.step`: the speculative step (window forward, verification, commit, logprobs).

May call: the engine's runner and model adapter, the sampler.
"""

from .base import SpecStats
from .draft_model import DraftModel
from .layer_skip import LayerSkipDraft
from .ngram import NGramDraft

__all__ = ["DraftModel", "LayerSkipDraft", "NGramDraft", "SpecStats"]
