"""Tiny randomly initialised causal LMs of real architectures, and a word-level tokenizer
over their vocabulary, for fast exact (fp32) generator tests."""

from __future__ import annotations

import functools

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 320
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3"]
EOS_ID = 2


def tiny_config(arch: str, **overrides):
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=EOS_ID)
    if arch in ("mistral", "gemma2"):
        kw["sliding_window"] = 8  # short, so the tests run past the window
    if arch == "gemma2":
        kw["head_dim"] = 16
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


@functools.cache
def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    with torch.no_grad():  # sharpen the output layer so greedy choices are not near-ties
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = 0
    return model


@functools.cache
def word_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Token i is the word ``w{i}`` (plus a space); 0 pad, 1 bos, 2 eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    for i in (0, 1, 2):
        vocab.pop(f"w{i}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: bool = False) -> list[int]:
    """transformers' own greedy continuation of one prompt (the oracle)."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, disable_compile=True,
                         max_new_tokens=max_new_tokens, min_new_tokens=0 if eos else max_new_tokens,
                         eos_token_id=EOS_ID if eos else None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
