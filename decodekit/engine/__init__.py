"""The engine: a transformers causal LM driven one step at a time.

- :mod:`.generator`: :class:`TokenGenerator` (``new_context`` / ``next_token`` / ``release``):
  admission, the step loop, EOS commits; the only module a scheduler talks to;
- :mod:`.context`: a request's state (:class:`TextGenerationContext`);
- :mod:`.slots`: which request owns which KV-cache slot;
- :mod:`.runner`: :class:`ModelRunner`: batch inputs, the forward over the KV cache,
  uploads (:mod:`.staging`: one per step), CUDA-graph buckets (:mod:`.graphs`);
- :mod:`.model_adapter`: everything decodekit needs to know about a model;
- :mod:`.kv_cache`: the paged (and the static slot) KV cache behind transformers' ``Cache``
  API; :mod:`.blocks` (block pool, prefix-cache keys) and :mod:`.paging` (per-slot block
  tables, forks, copy on write) decide who holds which block; :mod:`.attention`: attention
  over the blocks (torch reference, the Triton kernel as a transformers backend);
- :mod:`.eos`, :mod:`.detokenize`: stop handling and streaming text on the host.

Calls go one way: generator -> runner -> cache / steering hooks -> sampler -> kernels.
This ``__init__`` imports nothing, so that lower layers (the steering hooks) can use
:mod:`.model_adapter` without importing the generator.
"""
