"""The transformers internals decodekit relies on, one test each, so that a release that
changes one fails here by name (CI runs this file on the newest and on the oldest supported
transformers: `make test` and `make test-oldest`).

Each test checks the internal against transformers' own behaviour, not against decodekit:
the cache keyword a model really consumes, the kwargs its decoder layers really receive,
what ``output_hidden_states`` really reports, what ``generate`` accepts.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import ARCHS, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig

from decodekit.engine.kv_cache import SlotKVCache, attention_masks
from decodekit.engine.model_adapter import (
    CACHE_KWARGS,
    cache_from_kwargs,
    cache_kwarg,
    decoder_layers,
    library_cache_kwarg,
    mask_layout,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 9, 14, 3, 77, 41, 8, 19, 230, 6, 12, 50]])


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_keyword_is_the_one_the_model_consumes(arch):
    """The resolved keyword fills the cache without a deprecation warning; the other name
    either warns (newer transformers) or is ignored (older ones, the cache stays empty)."""
    model = tiny_model(arch)
    kw = cache_kwarg(model)
    assert kw == library_cache_kwarg() and kw in CACHE_KWARGS
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            model(IDS, use_cache=True, **{kw: cache})
    assert cache.get_seq_length() == IDS.shape[1]  # the model wrote into OUR object
    other = next(n for n in CACHE_KWARGS if n != kw)
    cache2 = DynamicCache(config=model.config)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(IDS, use_cache=True, **{other: cache2})
    deprecated = any(issubclass(w.category, FutureWarning) and other in str(w.message) for w in seen)
    assert deprecated or cache2.get_seq_length() == 0


def test_cache_keyword_of_a_custom_forward():
    """A model whose forward names one convention explicitly gets that name."""
    base = type(tiny_model("llama"))

    class Old(base):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):  # pragma: no cover
            return super().forward(input_ids, **kwargs)

    class New(base):
        def forward(self, input_ids=None, cache=None, **kwargs):  # pragma: no cover
            return super().forward(input_ids, **kwargs)

    cfg = tiny_config("llama")
    assert cache_kwarg(Old(cfg)) == "past_key_values"
    assert cache_kwarg(New(cfg)) == "cache"


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_receive_the_cache(arch):
    """Hooks read the cache from the decoder layers' kwargs (``steer()`` needs its length):
    under whatever name this transformers passes it, it must be found."""
    model = tiny_model(arch)
    layer = decoder_layers(model)[0]
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a, kw: seen.append(cache_from_kwargs(kw)), with_kwargs=True)
    try:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(IDS, use_cache=True, **{cache_kwarg(model): cache})
    finally:
        h.remove()
    assert seen and seen[0] is cache


def test_cache_from_kwargs_reads_both_names():
    c = object()
    assert cache_from_kwargs({"cache": c}) is c
    assert cache_from_kwargs({"past_key_values": c}) is c
    assert cache_from_kwargs({"cache": None, "past_key_values": c}) is c
    assert cache_from_kwargs({}) is None


EXPECTED_LAYOUT = {  # from each architecture's definition: which layers slide, and by how much
    "llama": ("single", {"all": None}),
    "qwen2": ("mapping", {"full_attention": None}),
    "qwen3": ("mapping", {"full_attention": None}),
    "mistral": ("single", {"all": 8}),
    "gemma2": ("mapping", {"full_attention": None, "sliding_attention": 8}),
    "phi3": ("single", {"all": None}),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_mask_layout_matches_the_architecture(arch):
    assert mask_layout(tiny_model(arch)) == EXPECTED_LAYOUT[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_slot_cache_and_masks_match_a_cache_free_forward(arch):
    """Prefill 12 tokens into slot 1, then decode 8 one by one (past the sliding window of 8):
    every step's logits equal the cache-free forward of the whole sequence. This exercises the
    Cache subclass API (``update``, mask sizes, layer flags) and the prepared 4D masks through
    the installed transformers' attention and mask code."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(3, 300, (1, 20), generator=g)
    with torch.no_grad():
        ref = model(seq, use_cache=False).logits[0].float()
    kind, windows = mask_layout(model)
    cache = SlotKVCache(model.config, 2, 32, "cpu", torch.float32)
    kw = cache_kwarg(model)

    def run(ids, pos, length):
        cache.bind(1, pos, 32)
        masks = attention_masks(kind, windows, pos, torch.tensor([length]), 32, torch.float32)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=masks, position_ids=pos, use_cache=True,
                         **{kw: cache}).logits[0].float()

    got = [run(seq[:, :12], torch.arange(12)[None], 12)]
    for t in range(12, 20):
        got.append(run(seq[:, t:t + 1], torch.tensor([[t]]), t + 1))
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_hidden_states_index_layer_outputs(arch):
    """``output_hidden_states`` reports layer ``i``'s output as ``hidden_states[i + 1]`` (the
    steering vectors' layer convention; the last entry is after the final norm)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_hidden_layers=3)).eval()
    outs = []
    handles = [layer.register_forward_hook(
        lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).clone()))
        for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            hs = model(IDS, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()
    assert len(hs) == 4
    for i in range(2):
        torch.testing.assert_close(hs[i + 1], outs[i])
    assert not torch.allclose(hs[3], outs[2])  # final norm applied


def test_generate_keywords_used_by_tests_and_benchmarks():
    """``prompt_lookup_num_tokens`` (HF's n-gram drafting, the speculative baseline),
    ``disable_compile``, ``output_logits`` / ``return_dict_in_generate`` (the steering oracle),
    and ``generate_batch`` (continuous batching, the generate baseline) still exist."""
    model = tiny_model("llama")
    for key in ("prompt_lookup_num_tokens", "disable_compile"):
        assert hasattr(GenerationConfig(**{key: 4 if key.startswith("prompt") else True}), key)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    kw = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0,
              attention_mask=torch.ones_like(ids), disable_compile=True)
    plain = model.generate(ids, **kw)
    lookup = model.generate(ids, prompt_lookup_num_tokens=3, **kw)
    assert torch.equal(plain, lookup)  # greedy prompt lookup is exact
    out = model.generate(ids, return_dict_in_generate=True, output_logits=True, **kw)
    assert len(out.logits) == 6 and out.logits[0].shape == (1, model.config.vocab_size)
    assert callable(getattr(model, "generate_batch", None))
