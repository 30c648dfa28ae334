"""SteeringVector (arithmetic, files, checks) and Steering (validation, position ranges)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from decodekit.steering.vector import POSITION_END, Steering, SteeringVector

H = 8


def vec(layers, seed=0, **kw) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({k: torch.randn(H, generator=g) for k in layers}, **kw)


def test_stores_fp32_cpu_copies_sorted():
    src = torch.arange(H, dtype=torch.float64)
    v = SteeringVector({3: src, 1: np.ones(H, dtype=np.float16)})
    assert v.layers == (1, 3) and list(v) == [1, 3] and len(v) == 2
    assert v[3].dtype == torch.float32 and v[3].device.type == "cpu"
    src += 1  # a copy, not a view
    assert torch.equal(v[3], torch.arange(H, dtype=torch.float32))
    assert v.hidden_size == H


@pytest.mark.parametrize("bad, match", [
    ({}, "at least one layer"),
    ({0: torch.zeros(H), 1: torch.zeros(H + 1)}, "disagree on hidden size"),
    ({-1: torch.zeros(H)}, "layer must be an int >= 0"),
    ({0: torch.zeros(2, H)}, r"1-D tensor \[hidden_size\]"),
])
def test_constructor_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        SteeringVector(bad)


def test_arithmetic():
    a, b = vec([0, 1], seed=1), vec([1, 2], seed=2)
    s = a + b
    assert s.layers == (0, 1, 2)
    torch.testing.assert_close(s[0], a[0], rtol=0, atol=0)
    torch.testing.assert_close(s[1], a[1] + b[1])
    torch.testing.assert_close(s[2], b[2], rtol=0, atol=0)
    d = a - b
    torch.testing.assert_close(d[2], -b[2])
    torch.testing.assert_close(d[1], a[1] - b[1])
    for scaled, factor in ((2 * a, 2.0), (a * 2, 2.0), (-a, -1.0), (a / 3, 1 / 3)):
        assert scaled.layers == a.layers
        for k in a:
            torch.testing.assert_close(scaled[k], a[k] * factor)
    zero = a - a
    assert all(not t.any() for t in zero.values())


def test_arithmetic_rejects_mismatch_and_junk():
    a = vec([0])
    b = SteeringVector({0: torch.zeros(H + 1)})
    with pytest.raises(ValueError, match=f"hidden size {H} and {H + 1}"):
        a + b
    with pytest.raises(TypeError):
        a + 1
    with pytest.raises(TypeError):
        a * "x"
    with pytest.raises(ZeroDivisionError):
        a / 0
    with pytest.raises(ValueError, match="finite"):
        a * float("nan")


def test_arithmetic_keeps_agreed_metadata():
    a = vec([0], model_name="m", method="pca")
    assert (2 * a).model_name == "m" and (2 * a).method == "pca"
    b = vec([0], model_name="m", method="mean_diff")
    s = a + b
    assert s.model_name == "m" and s.method is None


def test_safetensors_round_trip(tmp_path):
    v = vec([0, 5, 2], model_name="tiny/llama", method="mean_diff", metadata={"note": "héllo", "n": "3"})
    path = tmp_path / "v.safetensors"
    v.save(path)
    w = SteeringVector.load(path)
    assert w == v
    assert w.metadata == {"note": "héllo", "n": "3"} and w.model_name == "tiny/llama"
    assert SteeringVector.load(str(path)) == v
    none = vec([1])
    none.save(tmp_path / "n.safetensors")
    back = SteeringVector.load(tmp_path / "n.safetensors")
    assert back.model_name is None and back.method is None and back.metadata == {}


def test_gguf_round_trip_and_llama_cpp_layout(tmp_path):
    v = vec([3, 1, 7], model_name="llama", method="pca", metadata={"k": "v"})
    path = tmp_path / "v.gguf"
    v.save(path)
    assert SteeringVector.load(path) == v
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    # documented convention: layer_count = number of direction tensors; direction.{i} holds
    # decodekit layer i (llama.cpp adds direction.N to the output of block N, 0-based)
    assert reader.get_field("controlvector.layer_count").contents() == 3
    names = {t.name: t for t in reader.tensors}
    assert set(names) == {"direction.1", "direction.3", "direction.7"}
    for k in v:
        t = names[f"direction.{k}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), v[k].numpy())


def test_gguf_reads_foreign_file_and_warns_on_layer_zero(tmp_path):
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")  # as repeng's export_gguf writes it
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", 2)
    for layer in (10, 11):
        writer.add_tensor(f"direction.{layer}", np.full(H, layer, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    v = SteeringVector.load(path)
    assert v.layers == (10, 11) and v.model_name == "mistral" and v.method is None
    assert torch.equal(v[11], torch.full((H,), 11.0))
    with pytest.warns(UserWarning, match="direction.0"):
        vec([0]).save(tmp_path / "zero.gguf")
    assert SteeringVector.load(tmp_path / "zero.gguf").layers == (0,)


def test_load_rejects_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        SteeringVector.load(tmp_path / "nope.safetensors")


def test_coerce(tmp_path):
    v = vec([0, 1])
    assert SteeringVector.coerce(v) is v
    assert SteeringVector.coerce(dict(v)) == SteeringVector(dict(v))
    v.save(tmp_path / "v.safetensors")
    assert SteeringVector.coerce(tmp_path / "v.safetensors") == v
    assert SteeringVector.coerce(str(tmp_path / "v.safetensors")) == v
    with pytest.raises(TypeError, match="SteeringVector"):
        SteeringVector.coerce(42)
    with pytest.raises(TypeError):
        SteeringVector.coerce([torch.zeros(H)])


def test_check_fits_names_what_differs():
    v = SteeringVector({0: torch.zeros(576), 40: torch.zeros(576)})
    with pytest.raises(ValueError, match="steering vector hidden size 576 but the model has 64"):
        v.check_fits(30, 64)
    with pytest.raises(ValueError, match=r"layer 40 outside the model's 30 decoder layers \[0, 30\)"):
        v.check_fits(30, 576)
    with pytest.raises(ValueError, match="draft model's 12"):
        v.check_fits(12, 576, what="draft model")
    v.check_fits(41, 576)


@pytest.mark.parametrize("kw, field", [
    (dict(strength=float("inf")), "strength"),
    (dict(strength=float("nan")), "strength"),
    (dict(strength="1"), "strength"),
    (dict(strength=True), "strength"),
    (dict(op="scale"), "op"),
    (dict(positions="prefix"), "positions"),
    (dict(positions=3), "positions"),
    (dict(positions=slice(0, 8, 2)), "step"),
    (dict(positions=slice(-4, None)), "start"),
    (dict(positions=slice(0, -1)), "stop"),
    (dict(positions=slice(5, 2)), "start must be <= stop"),
])
def test_steering_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        Steering(vec([0]), **kw)


def test_steering_op_message_lists_allowed():
    with pytest.raises(ValueError, match="'add', 'ablate', 'clamp'"):
        Steering(vec([0]), op="scale")


def test_steering_coerces_vector(tmp_path):
    v = vec([1])
    s = Steering({1: v[1]}, strength=2)
    assert isinstance(s.vector, SteeringVector) and s.strength == 2.0 and isinstance(s.strength, float)
    v.save(tmp_path / "v.gguf")
    assert Steering(tmp_path / "v.gguf").vector == v
    with pytest.raises(TypeError):
        Steering(None)


@pytest.mark.parametrize("positions, expected", [
    ("all", (0, POSITION_END)),
    ("prompt", (0, 7)),
    ("generated", (7, POSITION_END)),
    (slice(3, 9), (3, 9)),
    (slice(None, 4), (0, 4)),
    (slice(5, None, 1), (5, POSITION_END)),
])
def test_position_range(positions, expected):
    assert Steering(vec([0]), positions=positions).position_range(7) == expected
    assert POSITION_END == 2**62


def test_position_range_rejects_bad_prompt_len():
    with pytest.raises(ValueError, match="prompt_len"):
        Steering(vec([0])).position_range(-1)
