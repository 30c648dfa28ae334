"""train_steering_vector: mean difference, PCA, padding invariance, input validation."""

from __future__ import annotations

import pytest
import torch
from _models import tiny_model, word_tokenizer

from decodekit.steering.train import train_steering_vector

pytestmark = pytest.mark.usefixtures("one_thread")


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Prompts of varied lengths; positive ends in w50, negative in w60 (sometimes one word longer)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prefix = " ".join(f"w{t}" for t in torch.randint(3, 300, (2 + i % 4,), generator=g).tolist())
        extra = " w7" if i % 3 == 0 else ""
        pairs.append((f"{prefix} w50", f"{prefix}{extra} w60"))
    return pairs


def tokenizer(side: str = "right"):
    tok = word_tokenizer.__wrapped__()  # a fresh instance: the cached one is shared
    tok.padding_side = side
    return tok


def state(model, tok, text: str, layer: int, token: int = -1) -> torch.Tensor:
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[layer + 1][0, token]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_mean_diff_is_the_mean_hidden_state_difference(arch):
    model, tok = tiny_model(arch), tokenizer()
    pairs = make_pairs(6)
    v = train_steering_vector(model, tok, pairs, layers="0-1", batch_size=4)
    assert v.layers == (0, 1) and v.method == "mean_diff" and v.model_name == arch
    for layer in (0, 1):
        expected = torch.stack([state(model, tok, p, layer) - state(model, tok, n, layer)
                                for p, n in pairs]).mean(0)
        torch.testing.assert_close(v[layer], expected, atol=1e-5, rtol=1e-5)


def test_token_index_selects_real_tokens():
    model, tok = tiny_model("qwen2"), tokenizer("left")
    pairs = [{"positive": "w5 w6 w7 w8", "negative": "w9 w10 w11"},
             {"positive": "w12 w13", "negative": "w14 w15"}]
    for token in (0, -2):
        v = train_steering_vector(model, tok, pairs, layers=[1], token_index=token, model_name="mine")
        expected = torch.stack([state(model, tok, d["positive"], 1, token)
                                - state(model, tok, d["negative"], 1, token) for d in pairs]).mean(0)
        torch.testing.assert_close(v[1], expected, atol=1e-5, rtol=1e-5)
        assert v.model_name == "mine" and v.metadata["token_index"] == str(token)


def test_pca_aligns_with_mean_diff_and_has_its_norm():
    model, tok = tiny_model("llama"), tokenizer()
    pairs = make_pairs(12, seed=1)
    mean = train_steering_vector(model, tok, pairs, layers=[0, 1])
    pca = train_steering_vector(model, tok, pairs, layers=[0, 1], method="pca")
    assert pca.method == "pca"
    for layer in (0, 1):
        cos = torch.nn.functional.cosine_similarity(pca[layer], mean[layer], dim=0)
        assert cos > 0.9, f"layer {layer}: cosine {cos:.3f}"
        torch.testing.assert_close(pca[layer].norm(), mean[layer].norm())
    # sign: swapping positives and negatives flips the direction
    flipped = train_steering_vector(model, tok, [(n, p) for p, n in pairs], layers=[0], method="pca")
    torch.testing.assert_close(flipped[0], -pca[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_padding_invariance(side, method):
    model, tok = tiny_model("mistral"), tokenizer(side)
    pairs = make_pairs(8, seed=2)
    one = train_steering_vector(model, tok, pairs, layers="1", method=method, batch_size=1)
    many = train_steering_vector(model, tok, pairs, layers="1", method=method, batch_size=16)
    torch.testing.assert_close(one[1], many[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(pairs=[]), "at least one"),
    (dict(pairs="w5 w6"), "sequence of"),
    (dict(pairs=[("w5",)]), r"pairs\[0\]"),
    (dict(pairs=[{"positive": "w5"}]), r"pairs\[0\]"),
    (dict(method="svd"), "method must be one of 'mean_diff', 'pca'"),
    (dict(layers="0-5"), r"layer 2 outside the model's 2 decoder layers \[0, 2\)"),
    (dict(layers=[3]), "layer 3 outside"),
    (dict(layers=[]), "at least one decoder layer"),
    (dict(layers="a-b"), "range string"),
    (dict(layers=[0.5]), "layers must be ints"),
    (dict(token_index=5), "token_index 5 is outside"),
    (dict(token_index=-6), "token_index -6 is outside"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_inputs(kw, match):
    args = dict(pairs=[("w5 w6 w7", "w5 w6 w8")], layers=[0])
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        train_steering_vector(tiny_model("llama"), tokenizer(), **args)
