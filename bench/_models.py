"""Models and prompts of the benchmarks: ``--model embedded`` (decodekit's SmolLM2-135M-Instruct),
a local folder or GGUF file, or ``random:<name>`` (a randomly initialised model of a real
architecture, written here, with a word-level tokenizer: no files, no hub); prompts from
``bench/data``."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._harness import DTYPES, default_model_name

DATA = Path(__file__).resolve().parent / "data"

#: Architectures of ``random:<name>`` (``LlamaConfig`` fields); pad 0, bos 1, eos 2.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct's config
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                    tie_word_embeddings=True, max_position_embeddings=8192,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # Llama-3.2-1B's shape
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                     tie_word_embeddings=True, max_position_embeddings=8192),
    # Qwen2.5-0.5B's shape (as a Llama: no attention bias), for its vocabulary
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # the smoke tests' model
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024),
}


@dataclass
class Workload:
    """A model, its tokenizer and how prompts become token ids."""

    name: str
    description: str
    model: Any
    tokenizer: Any
    dtype_name: str
    encode: Callable[[str], list[int]]
    pad_id: int

    def encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def step_bytes(self, rows: float, context: float) -> float:
        """Bytes one decode forward reads: every parameter once (as gpt-fast counts) plus the K and
        V of ``context`` positions, all layers, for each of ``rows`` requests."""
        c = self.model.config.get_text_config()
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        itemsize = next(self.model.parameters()).element_size()
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return weights + rows * context * 2 * c.num_hidden_layers * kv_heads * head_dim * itemsize


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer for ids ``0 .. vocab_size - 1`` (``w<i>``; 0 pad, 1 bos, 2 eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(3, vocab_size)} | {"<pad>": 0, "<s>": 1, "</s>": 2}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def random_model(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Any:
    """``LlamaForCausalLM`` of ``RANDOM_CONFIGS[name]``, random init; the output layer is scaled
    4x so that greedy choices are not near-ties (the greedy identity checks need margins)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name not in RANDOM_CONFIGS:
        raise SystemExit(f"--model random:{name}: choose from {', '.join(RANDOM_CONFIGS)}")
    torch.manual_seed(seed)
    cfg = LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, **RANDOM_CONFIGS[name])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to(dtype).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


def hashed_words(vocab_size: int) -> Callable[[str], list[int]]:
    """Text -> one id per word (crc32 of the word into ``[3, vocab_size)``): a prompt's length and
    its repetitions survive, for models without a real tokenizer."""
    return lambda text: [3 + zlib.crc32(w.encode()) % (vocab_size - 3) for w in text.split()]


def chat_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Text -> the ids of one user turn through the chat template (with the generation prompt)."""
    def encode(text: str) -> list[int]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        return [int(t) for t in (ids["input_ids"] if hasattr(ids, "keys") else ids)]
    return encode


def load_workload(spec: str, device: torch.device, dtype_name: str | None = None) -> Workload:
    """The model ``spec`` names (see the module docstring), on ``device``."""
    dtype_name = dtype_name or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        model = random_model(name, dtype, device)
        V = RANDOM_CONFIGS[name]["vocab_size"]
        c = RANDOM_CONFIGS[name]
        desc = (f"random init, {name} shape ({c['num_hidden_layers']} layers, hidden "
                f"{c['hidden_size']}, V={V}); prompts: one id per word")
        return Workload(spec, desc, model, word_tokenizer(V), dtype_name, hashed_words(V), 0)
    import decodekit

    model, tok = decodekit.load(None if spec == "embedded" else spec, device=device, dtype=dtype)
    desc = f"{default_model_name()} (embedded)" if spec == "embedded" else spec
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = chat_encoder(tok) if getattr(tok, "chat_template", None) else (
        lambda t: tok(t)["input_ids"])
    return Workload(spec, desc, model, tok, dtype_name, enc, int(pad))


def chat_prompts() -> list[str]:
    """The 32 one-turn chat prompts (generate, steering)."""
    return [ln for ln in (DATA / "chat_prompts.txt").read_text().splitlines() if ln.strip()]


def prompt_set(name: str, field: str = "text") -> dict[str, list[str]]:
    """``bench/data/<name>.jsonl`` (``{"kind", "text"}`` per line, optionally ``"task"``) as
    kind -> the lines' ``field`` (a missing task is the kind)."""
    out: dict[str, list[str]] = {}
    for line in (DATA / f"{name}.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["kind"], []).append(row.get(field, row["kind"]))
    return out
