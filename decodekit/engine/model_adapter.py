"""Everything decodekit needs to know about a transformers causal LM, in one place.

:class:`ModelAdapter` wraps a model and its tokenizer: vocabulary size, EOS ids, decoder
layers, hidden size, how the model takes a prepared attention mask (one 4D tensor, or a
dict keyed by layer type, with sliding windows), the keyword it takes its KV cache under,
prompt encoding, the one place where the model is called with a cache, and the self-test
that refuses a model whose attention does not go through the Cache API as we drive it.

What differs between the supported transformers releases is resolved here too:
transformers >= 5.2x takes the KV cache as ``cache=`` (models, decoder layers, mask
helpers) and deprecates ``past_key_values=`` (removal announced for 5.40); 5.17 takes
``past_key_values=`` only. The model's own signature decides, so a model written for either
convention runs without a deprecation warning (pinned down by ``tests/test_hf_compat.py``).

May call: :mod:`decodekit.engine.kv_cache` (the self-test's scratch cache). Used by the
runner, the steering hooks and the drafters.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .. import _checks as checks
from .kv_cache import SlotKVCache, attention_masks
from .parallel import check_pipeline_parallel, tp_size

__all__ = [
    "CACHE_KWARGS",
    "ModelAdapter",
    "cache_from_kwargs",
    "cache_kwarg",
    "decoder_layer_list",
    "decoder_layers",
    "hidden_size",
    "library_cache_kwarg",
    "mask_layout",
    "model_device",
]

# Newest name first: a layer that receives both reads the new one.
CACHE_KWARGS = ("cache", "past_key_values")

_LAYER_PATHS = ("model.layers", "layers", "model.decoder.layers", "decoder.layers", "transformer.h",
                "transformer.layers", "gpt_neox.layers", "model.language_model.layers")

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]] | torch.Tensor


# --------------------------------------------------------------------------- transformers versions
@functools.cache
def library_cache_kwarg() -> str:
    """The cache keyword of the installed transformers (read off ``LlamaModel.forward``)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: Any) -> str:
    """The keyword under which ``model``'s forward takes its KV cache.

    The model's own signature decides (``inspect.signature`` follows transformers'
    ``deprecate_kwarg`` wrappers to the real parameters); a forward that takes only
    ``**kwargs`` gets the installed library's name.
    """
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in CACHE_KWARGS:
        if name in params:
            return name
    return library_cache_kwarg()


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any | None:
    """The cache object a decoder layer (or model) was called with, under either name."""
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


# --------------------------------------------------------------------------- introspection
def _attr_path(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM, in order.

    Looks at ``model.model.layers`` (llama, qwen2/3, mistral, gemma2, phi3, ...), then
    ``model.get_decoder().layers``, then other common names (``transformer.h``, ...).
    ``ValueError`` if none of those is a non-empty ``ModuleList``.
    """
    candidates = [_attr_path(model, "model.layers")]
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(Exception):  # some wrappers raise instead of returning None
            candidates.append(getattr(get_decoder(), "layers", None))
    candidates += [_attr_path(model, p) for p in _LAYER_PATHS]
    for layers in candidates:
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(f"model: cannot find the decoder layers of {type(model).__name__} (looked for "
                     f"get_decoder().layers and {', '.join(_LAYER_PATHS)})")


def decoder_layer_list(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """``(parent, attribute)`` where ``model``'s decoder layers (a ModuleList) live."""
    layers = decoder_layers(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is layers:
                return parent, name
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def hidden_size(model: torch.nn.Module) -> int:
    """Width of the residual stream (config ``hidden_size``, else the input embeddings')."""
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        size = getattr(text, "hidden_size", None)
        if isinstance(size, int):
            return size
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and hasattr(embed, "embedding_dim"):
        return int(embed.embedding_dim)
    raise ValueError(f"model: cannot tell the hidden size of {type(model).__name__} "
                     "(no config.hidden_size nor input embeddings)")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the output embedding (which may exceed ``config.vocab_size``)."""
    emb = model.get_output_embeddings()
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def eos_token_ids(model: torch.nn.Module, tokenizer: Any, vocab: int | None = None) -> list[int]:
    """Every EOS id the tokenizer, generation config and model config name (ids outside the
    vocabulary, as some configs carry, can never be sampled and are left out)."""
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(model.config, "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return sorted(i for i in ids if vocab is None or 0 <= i < vocab)


def mask_layout(model: torch.nn.Module) -> tuple[str, dict[str, int | None]]:
    """How ``model`` takes a prepared attention mask.

    Returns ``(kind, windows)``: kind ``"mapping"`` (a dict keyed by layer type) or
    ``"single"`` (one 4D tensor for every layer); ``windows`` maps each mask key to its
    sliding window (``None`` = full attention). Read off the model's forward source.
    """
    cfg = model.config
    base = getattr(model, "model", model)
    src = inspect.getsource(type(base).forward)
    window = getattr(cfg, "sliding_window", None)
    if "causal_mask_mapping" in src:
        types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        return "mapping", {t: (window if t == "sliding_attention" else None) for t in types}
    if "create_sliding_window_causal_mask" in src and window is not None:
        return "single", {"all": window}
    return "single", {"all": None}


def learned_position_limit(model: torch.nn.Module) -> int | None:
    """Positions a model with LEARNED absolute position embeddings can encode (GPT-2's 1024),
    or None for relative schemes (RoPE, ALiBi) without a hard limit."""
    cfg = getattr(model, "config", None)
    declared = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(module, torch.nn.Embedding) and (leaf == "wpe" or "position" in leaf):
            n = int(module.num_embeddings)
            return min(n, int(declared)) if declared else n
    return None


@torch.inference_mode()
def layers_return_tuple(model: torch.nn.Module) -> bool:
    """Whether the decoder layers return a tuple (older transformers) or a tensor."""
    seen: list[bool] = []
    h = decoder_layers(model)[0].register_forward_hook(lambda m, a, out: seen.append(isinstance(out, tuple)))
    try:
        model(input_ids=torch.tensor([[1, 2]], device=model_device(model)), use_cache=False)
    finally:
        h.remove()
    return bool(seen and seen[0])


# --------------------------------------------------------------------------- the adapter
class ModelAdapter:
    """A transformers causal LM and its tokenizer, as decodekit drives them.

    Parameters
    ----------
    model, tokenizer
        Any in-memory causal LM whose attention goes through the Cache API, and its
        tokenizer (may be None for token-id prompts only). The model is moved to
        ``device``/``dtype`` and put in eval mode.
    device, dtype
        Default: the model's.

    Raises
    ------
    ValueError
        The model's forward source cannot be read (``unsupported model``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device=None, dtype=None) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
        check_pipeline_parallel(model)
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError(f"model {type(model).__name__} has no parameters")
        self.device = checks.check_device("device", device) or first.device
        self.dtype = checks.check_dtype("dtype", dtype) or first.dtype
        if (first.device, first.dtype) != (self.device, self.dtype):
            # a converted copy: the caller's model (maybe in use by another generator) stays as it is
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size(self.model)
        self.eos_token_ids = eos_token_ids(self.model, tokenizer, self.vocab_size)
        self.cache_kw = cache_kwarg(self.model)
        self.tp_size = tp_size(self.model)  # tensor parallelism: the KV cache holds this rank's heads
        self.max_positions = learned_position_limit(self.model)
        try:
            self.mask_kind, self.windows = mask_layout(self.model)
        except (TypeError, OSError) as e:
            raise ValueError(f"unsupported model {type(model).__name__}: {e}") from e

    @property
    def name(self) -> str:
        return type(self.model).__name__

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def masks(self, q_pos: torch.Tensor, length: torch.Tensor, kv_len: int):
        """The ``attention_mask`` argument for queries at ``q_pos [B, q]`` over rows of
        ``length [B]`` valid positions: one 4D mask or a dict of them."""
        return attention_masks(self.mask_kind, self.windows, q_pos, length, kv_len, self.dtype)

    def forward(self, input_ids: torch.Tensor, q_pos: torch.Tensor, length: torch.Tensor, cache: Any,
                kv_len: int, keep: int = 1, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The model over a bound slot cache: logits ``[B, keep, V]`` of the last ``keep``
        positions of ``input_ids [B, q]`` at positions ``q_pos [B, q]``. A packed forward
        (inside :func:`~decodekit.engine.attention.packed_attention`): ``input_ids [1, N]`` at
        ``positions [1, N]``, ``q_pos`` the rows' grid (for the masks)."""
        out = self.model(input_ids=input_ids, attention_mask=self.masks(q_pos, length, kv_len),
                         position_ids=q_pos if positions is None else positions, use_cache=True,
                         logits_to_keep=keep, **{self.cache_kw: cache})
        return out.logits[:, -keep:, :]

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text, chat messages (a list of ``{"role", "content"}`` dicts,
        rendered with the tokenizer's chat template and the generation prompt) or a 1-D
        sequence of token ids (list, tuple, tensor or array; ints in the vocabulary).
        Anything else is a ``ValueError`` (no silent coercion of floats, bools or bytes)."""
        if isinstance(prompt, str):
            self._need_tokenizer("a text prompt")
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, (bytes, bytearray, Mapping)) or not hasattr(prompt, "__len__"):
            raise ValueError("prompt must be text, a list of chat messages ({'role': ..., 'content': ...}) "
                             f"or a 1-D sequence of token ids, got {checks.describe(prompt)[:200]}")
        if len(prompt) and all(isinstance(m, Mapping) for m in prompt):
            self._need_tokenizer("a chat prompt")
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, Mapping) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        if getattr(prompt, "ndim", 1) != 1:
            raise ValueError(f"prompt token ids must be 1-D, got shape {tuple(prompt.shape)} "
                             "(pass one prompt per context)")
        return checks.token_ids("prompt token ids", prompt, self.vocab_size)

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer; this generator has none (pass token ids)")

    @torch.inference_mode()
    def cache_check(self, run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                    n: int = 6) -> str | None:
        """Why a prefill of ``n`` tokens then one decode step through ``run(ids [1, q],
        pos [1, q], length [1]) -> logits [1, V]`` (a cache path) disagrees with a cache-free
        forward, or None when it agrees (relative error within 1e-3 in fp32, 5e-2 else)."""
        dev = self.device
        ids = torch.arange(1, n + 2, device=dev)[None] % self.vocab_size
        pos = torch.arange(n + 1, device=dev)[None]
        try:
            ref = self.model(input_ids=ids, use_cache=False).logits[0, -2:].float()
            a = run(ids[:, :n], pos[:, :n], torch.tensor([n], device=dev))
            b = run(ids[:, n:], pos[:, n:], torch.tensor([n + 1], device=dev))
        except Exception as e:  # noqa: BLE001 - any failure means: not this way
            return f"the forward failed ({type(e).__name__}: {e})"
        got = torch.cat([a, b]).float()
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
        return None if err <= tol else f"relative error {err:.2e}"

    def self_test(self) -> None:
        """Prefill + decode through a slot cache must match a cache-free forward; otherwise
        the model's attention does not follow the Cache API as decodekit drives it
        (``ValueError``, never wrong tokens later)."""
        cache = SlotKVCache(self.model.config, 2, 64, self.device, self.dtype, tp_size=self.tp_size)

        def run(ids: torch.Tensor, pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
            cache.bind(1, pos, 64)  # slot 1: rows are not assumed to start at 0
            return self.forward(ids, pos, length, cache, 64)[:, -1]

        why = self.cache_check(run)
        if why is not None:
            raise ValueError(f"unsupported model {self.name}: its attention does not follow the Cache API "
                             f"as decodekit drives it through its slot KV cache ({why})")

    @property
    def attention_name(self) -> str | None:
        """The attention function the model's layers call now (transformers' name for it,
        e.g. ``"sdpa"`` or ``"eager"``)."""
        return self.model.config._attn_implementation

    @contextlib.contextmanager
    def attention_implementation(self, name: str) -> Iterator[None]:
        """Run the model's attention layers through the registered attention backend
        ``name`` for the duration. transformers reads ``config._attn_implementation`` at
        every attention call; ``set_attn_implementation`` would re-validate the model on
        every forward, so the config field is swapped here, the one place that does."""
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = name
        try:
            yield
        finally:
            config._attn_implementation = before
