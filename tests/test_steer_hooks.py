"""SteeringHooks (per-row device tables, sync-free bind) and the steer() context manager."""

from __future__ import annotations

import functools
import types

import pytest
import torch
from _models import ARCHS, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from decodekit.engine.model_adapter import decoder_layers
from decodekit.steering.hooks import SteeringHooks, steer
from decodekit.steering.vector import Steering, SteeringVector

H = 64
T = 7  # tokens per test sequence


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def model4(arch: str):
    """A 4-layer tiny model: layers 1 and 2 are steered and still reported pre-norm."""
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(tiny_config(arch, num_hidden_layers=4)).eval()


def rand_vector(layers, seed=0, scale=1.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({k: scale * torch.randn(H, generator=g) for k in layers})


def tokens(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (batch, T), generator=g)


def arange_positions(batch: int, n: int = T) -> torch.Tensor:
    return torch.arange(n).expand(batch, n).contiguous()


def apply_op(h: torch.Tensor, v: torch.Tensor, strength: float, op: str) -> torch.Tensor:
    """Plain-torch reference of one op on h [..., H]."""
    if op == "add":
        return h + strength * v
    norm = v.norm()
    u = v / norm if norm > 0 else torch.zeros_like(v)
    out = h - (h @ u)[..., None] * u
    return out if op == "ablate" else out + strength * norm * u


def forward(model, ids, hooks=None, first_row=0, positions=None):
    with torch.no_grad():
        if hooks is None:
            return model(ids, output_hidden_states=True)
        pos = arange_positions(ids.shape[0]) if positions is None else positions
        with hooks.bound(first_row, pos):
            return model(ids, output_hidden_states=True)


class RawOutputs:
    """Forward hooks prepended after the steering hooks exist: they see each layer's raw output."""

    def __init__(self, model):
        self.outputs = {}
        self.handles = [layer.register_forward_hook(functools.partial(self._record, i), prepend=True)
                        for i, layer in enumerate(decoder_layers(model))]

    def _record(self, i, module, args, output):
        self.outputs[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("op", ["add", "ablate", "clamp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_op_at_exactly_the_selected_positions(arch, op):
    model = model4(arch)
    ids = tokens(2, seed=3)
    v = rand_vector([1, 2], seed=4, scale=0.5)
    strength = 1.7
    hooks = SteeringHooks(model, max_rows=3)
    raw = RawOutputs(model)
    try:
        # batch row 0 -> request row 1 (slice of positions), batch row 1 -> request row 2 (prompt of 3)
        hooks.set_row(1, Steering(v, strength, positions=slice(2, 5), op=op), prompt_len=4)
        hooks.set_row(2, Steering(v, strength, positions="prompt", op=op), prompt_len=3)
        base = forward(model, ids).hidden_states
        out = forward(model, ids, hooks, first_row=1).hidden_states
    finally:
        hooks.remove()
        raw.remove()
    assert torch.equal(out[1], base[1])  # layer 0, before the first steered layer: untouched
    selected = torch.zeros(2, T, dtype=torch.bool)
    selected[0, 2:5] = True
    selected[1, 0:3] = True
    for layer in (1, 2):
        h_raw, h = raw.outputs[layer], out[layer + 1]
        assert torch.equal(h[~selected], h_raw[~selected])  # nowhere else
        expected = apply_op(h_raw[selected], v[layer], strength, op)
        torch.testing.assert_close(h[selected], expected, atol=1e-5, rtol=1e-5)
        u = v[layer] / v[layer].norm()
        along = h[selected] @ u
        if op == "add":
            torch.testing.assert_close(h[selected] - h_raw[selected],
                                       (strength * v[layer]).expand(int(selected.sum()), H))
        elif op == "ablate":
            torch.testing.assert_close(along, torch.zeros_like(along), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(along, torch.full_like(along, strength * float(v[layer].norm())),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_rows_alone(arch):
    model = tiny_model(arch)
    ids = tokens(4, seed=5)
    a, b = rand_vector([0, 1], seed=6), rand_vector([1], seed=7, scale=2.0)
    settings = [Steering(a, 1.5), None, Steering(b, op="ablate", positions="generated"),
                Steering(a, -1.0, positions=slice(1, 4), op="clamp")]
    hooks = SteeringHooks(model, max_rows=6)
    try:
        for r, s in enumerate(settings):
            hooks.set_row(r + 2, s, prompt_len=3)  # rows 2..5: exercises first_row
        base = forward(model, ids)
        mixed = forward(model, ids, hooks, first_row=2)
        alone = [forward(model, ids[r:r + 1], hooks, first_row=r + 2) for r in range(4)]
    finally:
        hooks.remove()
    # the unsteered row is bit-identical to an unhooked run of the same batch
    assert torch.equal(mixed.logits[1], base.logits[1])
    for hs_mixed, hs_base in zip(mixed.hidden_states, base.hidden_states, strict=True):
        assert torch.equal(hs_mixed[1], hs_base[1])
    for r in range(4):
        torch.testing.assert_close(mixed.logits[r], alone[r].logits[0], atol=1e-5, rtol=1e-5)
    for r in (0, 2, 3):
        assert not torch.allclose(mixed.logits[r], base.logits[r], atol=1e-3)
    # ablate on "generated" with prompt_len 3 leaves the prompt's logits alone
    torch.testing.assert_close(mixed.logits[2, :3], base.logits[2, :3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["add", "ablate", "clamp"])
def test_strength_zero_and_cancelled_vector_give_baseline(op):
    model = tiny_model("qwen2")
    ids = tokens(2, seed=8)
    v = rand_vector([0, 1], seed=9)
    base = forward(model, ids).logits
    hooks = SteeringHooks(model, max_rows=2)
    try:
        hooks.set_row(0, Steering(v - v, 3.0, op=op), prompt_len=2)
        hooks.set_row(1, Steering(v, 0.0, op="add"), prompt_len=2)
        assert hooks.active
        assert torch.equal(forward(model, ids, hooks).logits, base)
    finally:
        hooks.remove()


def test_set_row_validates_before_writing_and_clear_row():
    model = tiny_model("llama")
    ids = tokens(1, seed=10)
    base = forward(model, ids).logits
    hooks = SteeringHooks(model, max_rows=2)
    try:
        hooks.set_row(0, Steering(rand_vector([1], seed=11)), prompt_len=2)
        steered = forward(model, ids, hooks).logits
        with pytest.raises(ValueError, match="layer 5 outside the model's 2 decoder layers"):
            hooks.set_row(0, Steering(rand_vector([0, 5])), prompt_len=2)
        with pytest.raises(ValueError, match="hidden size 32 but the model has 64"):
            hooks.set_row(0, Steering({0: torch.ones(32)}), prompt_len=2)
        assert torch.equal(forward(model, ids, hooks).logits, steered)  # nothing was written
        with pytest.raises(ValueError, match="row must be an int in"):
            hooks.set_row(2, None, prompt_len=0)
        with pytest.raises(ValueError, match="first_row"):
            hooks.bind(2, arange_positions(1))
        hooks.clear_row(0)
        assert not hooks.active
        assert torch.equal(forward(model, ids, hooks).logits, base)
    finally:
        hooks.remove()


def test_bind_computes_table_index_on_device():
    hooks = SteeringHooks(tiny_model("llama"), max_rows=4)
    try:
        v = rand_vector([0])
        hooks.set_row(1, Steering(v, positions="generated"), prompt_len=3)
        hooks.set_row(2, Steering(v, positions=slice(1, 3)), prompt_len=3)
        positions = torch.tensor([[2, 3, 4], [0, 1, 2], [5, 6, 7]])
        hooks.bind(1, positions)  # batch rows -> request rows 1, 2, 3 -> table rows 2, 3, 4
        assert torch.equal(hooks.bound_index, torch.tensor([[0, 2, 2], [0, 3, 3], [0, 0, 0]]))
        hooks.unbind()
        assert hooks.bound_index is None
    finally:
        hooks.remove()


def test_bind_and_injection_never_read_device_data():
    """On the meta device there is no data: any host sync (.item(), nonzero, masks) would raise."""
    model = tiny_model("llama")
    hooks = SteeringHooks(model, max_rows=2, device="meta")
    try:
        hooks.set_row(0, Steering(rand_vector([0, 1]), op="clamp", positions="generated"), prompt_len=2)
        hooks.bind(0, torch.zeros(2, 5, dtype=torch.int64, device="meta"))
        h = torch.empty(2, 5, H, device="meta")
        out = hooks.apply(1, h)
        assert out.shape == (2, 5, H) and out.device.type == "meta"
    finally:
        hooks.remove()


def test_hooks_work_under_inference_mode():
    model = tiny_model("phi3")
    ids = tokens(2, seed=12)
    v = rand_vector([1], seed=13)
    hooks = SteeringHooks(model, max_rows=2)
    try:
        hooks.set_row(0, Steering(v, 2.0, op="clamp"), prompt_len=3)
        expected = forward(model, ids, hooks).logits
        with torch.inference_mode(), hooks.bound(0, arange_positions(2)):
            got = model(ids).logits
        assert torch.equal(got, expected)
    finally:
        hooks.remove()


class TupleLayer(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.lin = torch.nn.Linear(n, n)

    def forward(self, x):
        return self.lin(x), "extra"


class TupleModel(torch.nn.Module):
    """transformers <= 4.x style: decoder layers return (hidden_states, ...)."""

    def __init__(self, n: int = 16, layers: int = 2):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=n)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(TupleLayer(n) for _ in range(layers))
        self.seen = []

    def forward(self, x):
        for layer in self.model.layers:
            x, extra = layer(x)
            self.seen.append(extra)
        return x


@pytest.mark.parametrize("op", ["add", "clamp"])
def test_tuple_returning_layers(op):
    torch.manual_seed(0)
    model = TupleModel()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        h0 = model.model.layers[0](x)[0]
        expected_h0 = apply_op(h0, torch.ones(16), 0.5, op)
        expected = model.model.layers[1](expected_h0)[0]
        hooks = SteeringHooks(model, max_rows=1)
        hooks.set_row(0, Steering({0: torch.ones(16)}, 0.5, op=op), prompt_len=0)
        with hooks.bound(0, arange_positions(1, 3).expand(1, 3)):
            got = model(x[:1])
        hooks.remove()
    torch.testing.assert_close(got, expected[:1], atol=1e-6, rtol=1e-6)
    assert model.seen[-2:] == ["extra", "extra"]


def test_decoder_layers():
    for arch in ARCHS:
        model = tiny_model(arch)
        assert decoder_layers(model) is model.model.layers
    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


# --- steer() with generate -----------------------------------------------------------------

N_NEW = 5


def greedy(model, ids, mask=None, **kw):
    out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                         do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, eos_token_id=None,
                         pad_token_id=0, use_cache=True, return_dict_in_generate=True, output_logits=True,
                         **kw)
    return out.sequences, torch.stack(out.logits, 1)  # [B, P + N], [B, N, V]


def equivalent_slice(positions, prompt_len):
    if isinstance(positions, slice):
        return positions
    return {"generated": slice(prompt_len, None), "prompt": slice(0, prompt_len)}.get(positions, positions)


@pytest.mark.parametrize("positions", ["generated", "prompt", "all", slice(3, 8)])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_steer_generate_matches_cache_free_rerun(arch, positions):
    model = tiny_model(arch)
    ids = tokens(2, seed=14)[:, :5]
    v = rand_vector([0, 1], seed=15, scale=0.7)
    with steer(model, v, 2.0, positions=positions):
        seqs, logits = greedy(model, ids)
    with torch.no_grad(), steer(model, v, 2.0, positions=equivalent_slice(positions, 5)):
        rerun = model(seqs, use_cache=False).logits[:, 4:-1]  # logits that chose each new token
    torch.testing.assert_close(logits, rerun, atol=1e-4, rtol=1e-4)
    assert torch.equal(seqs[:, 5:], rerun.argmax(-1))


def test_steer_generated_leaves_prompt_untouched():
    model = tiny_model("qwen3")
    ids = tokens(2, seed=16)[:, :5]
    v = rand_vector([0, 1], seed=17, scale=2.0)
    base_seqs, base_logits = greedy(model, ids)
    with steer(model, v, 3.0, positions="generated"):
        seqs, logits = greedy(model, ids)
    assert torch.equal(logits[:, 0], base_logits[:, 0])  # from the prompt's last token
    assert torch.equal(seqs[:, :6], base_seqs[:, :6])
    assert not torch.allclose(logits[:, 1:], base_logits[:, 1:], atol=1e-3)  # generated ones change


def test_steer_generated_with_left_padding_counts_per_row():
    model = tiny_model("llama")
    v = rand_vector([0, 1], seed=18, scale=1.5)
    short, long = [7, 8, 9], [20, 21, 22, 23, 24]
    ids = torch.tensor([[0, 0] + short, long])
    mask = (ids != 0).long()
    with steer(model, v, 2.0, positions="generated"):
        seqs, _ = greedy(model, ids, mask)
        alone = [greedy(model, torch.tensor([p]))[0][0, len(p):] for p in (short, long)]
    assert torch.equal(seqs[0, 5:], alone[0]) and torch.equal(seqs[1, 5:], alone[1])


def _hook_counts(model):
    # (torch has no public way to count a module's hooks)
    return [(len(layer._forward_hooks), len(layer._forward_pre_hooks)) for layer in decoder_layers(model)]


def test_steer_removes_hooks_on_exit_and_on_exception():
    model = tiny_model("mistral")
    ids = tokens(1, seed=19)
    before = _hook_counts(model)
    base = forward(model, ids).logits
    v = rand_vector([1], seed=20)
    with steer(model, v, 4.0):
        assert _hook_counts(model) != before
        assert not torch.allclose(forward(model, ids).logits, base)
    assert _hook_counts(model) == before
    with pytest.raises(RuntimeError, match="boom"), steer(model, v):
        raise RuntimeError("boom")
    assert _hook_counts(model) == before
    with pytest.raises(ValueError, match="hidden size 8 but the model has 64"), \
            steer(model, {0: torch.ones(8)}):
        raise AssertionError("steer() accepted a vector of the wrong hidden size")
    with pytest.raises(ValueError, match="positions"), steer(model, v, positions="middle"):
        raise AssertionError("steer() accepted positions='middle'")
    assert _hook_counts(model) == before
    assert torch.equal(forward(model, ids).logits, base)


def test_bf16_model_unsteered_rows_bit_identical():
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval().to(torch.bfloat16)
    ids = tokens(2, seed=21)
    hooks = SteeringHooks(model, max_rows=2)  # fp32 tables
    raw = RawOutputs(model)
    try:
        v = rand_vector([0], seed=22)
        hooks.set_row(0, Steering(v, 1.0, op="clamp"), prompt_len=2)
        base = forward(model, ids)
        out = forward(model, ids, hooks)
    finally:
        hooks.remove()
        raw.remove()
    assert torch.equal(out.logits[1], base.logits[1])
    expected = apply_op(raw.outputs[0][0].float(), v[0], 1.0, "clamp").to(torch.bfloat16)
    assert torch.equal(out.hidden_states[1][0], expected)  # computed in fp32, rounded once
