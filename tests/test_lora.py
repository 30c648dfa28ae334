"""Per-request LoRA adapters (decodekit.lora) against peft, the oracle.

Two adapters are trained-looking (lora_B randomised: peft starts it at zero) and saved with
``save_pretrained``; a mixed batch of rows [none, A, B, A] through the hooked plain model must
give each row the logits of ``PeftModel`` with that row's adapter alone, and rows without an
adapter the unhooked model's bits. Then the statuses of every refusal, and the Triton kernels
against the torch reference (in the interpreter on CPU).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from _models import tiny_model
from _peft import save_adapter
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from decodekit.engine.model_adapter import cache_kwarg
from decodekit.lora import (
    LoRAError,
    LoRAHooks,
    LoRAOperation,
    LoRARequest,
    LoRAStatus,
    LoRATables,
    read_adapter,
)

LOAD, UNLOAD = LoRAOperation.LOAD, LoRAOperation.UNLOAD
ATOL = 1e-3  # fp32 logits: ours (batch of 4) against peft (batch of 1)


_save_adapter = save_adapter


CONFIG_A = dict(r=8, target_modules=["q_proj", "v_proj"])
CONFIG_B = dict(r=4, lora_alpha=16, use_rslora=True,
                target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])


@pytest.fixture(scope="module")
def base():
    return copy.deepcopy(tiny_model("llama"))


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    oracle_a = _save_adapter(base, root / "a", 1, **CONFIG_A)
    oracle_b = _save_adapter(base, root / "b", 2, **CONFIG_B)
    return {"a": (root / "a", oracle_a), "b": (root / "b", oracle_b), "root": root}


@pytest.fixture
def served(base, adapters):
    """Tables (2 slots, rank 8) with A and B loaded, and hooks over 8 rows; removed afterwards."""
    tables = LoRATables(base, max_loras=2, max_lora_rank=8)
    hooks = LoRAHooks(base, tables, max_rows=8, backend="torch")
    for name in ("a", "b"):
        r = tables.handle(LoRARequest(LOAD, name, adapters[name][0]))
        assert r.ok, r.message
    yield tables, hooks
    hooks.remove()


def _ids(B: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (B, n), generator=g)


def _mixed_logits(model, hooks, ids, first_row=0):
    with torch.no_grad(), hooks.bound(first_row, ids.shape):
        return model(ids).logits


ROWS = [None, "a", "b", "a"]


def _set_rows(hooks, first_row=0):
    for i, name in enumerate(ROWS):
        hooks.set_row(first_row + i, name)


def _check_against_peft(logits, plain, ids, adapters, base):
    assert torch.equal(logits[0], plain[0]), "a row without adapter must be bit-identical"
    for row, name in enumerate(ROWS):
        if name is None:
            continue
        with torch.no_grad():
            want = adapters[name][1](input_ids=ids[row: row + 1]).logits[0]
        torch.testing.assert_close(logits[row], want, atol=ATOL, rtol=0)
        assert (want - plain[row]).abs().max() > 0.05, "the adapter must change the logits"


def test_mixed_batch_prefill_matches_peft(base, adapters, served, one_thread):
    tables, hooks = served
    _set_rows(hooks)
    ids = _ids(4, 6)
    with torch.no_grad():
        plain = base(ids).logits  # unbound: the hooks are inert
    _check_against_peft(_mixed_logits(base, hooks, ids), plain, ids, adapters, base)


@pytest.mark.parametrize("name", ["a", "b"])
def test_batch_of_one_adapter_matches_peft(base, adapters, served, name, one_thread):
    """Every bound row the same adapter (the torch path's two-product fast path), prefill then
    cached decode steps: peft's logits for each row; hooks only on the layers it targets."""
    tables, hooks = served
    for row in range(3):
        hooks.set_row(row, name)
    hooked = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and m._forward_hooks}
    want_layers = {"a": {"q_proj", "v_proj"}, "b": {"q_proj", "k_proj", "o_proj", "down_proj"}}[name]
    assert {n.rsplit(".", 1)[-1] for n in hooked} == want_layers
    ids = _ids(3, 7, seed=2)
    got = _cached_steps(base, hooks, ids, 0, 4)
    with torch.no_grad():
        want = adapters[name][1](input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (want - base(ids).logits).abs().max() > 0.05


def _cached_steps(model, hooks, ids, first_row, prefill):
    """Logits of a prefill of ``prefill`` tokens then single-token steps over a DynamicCache, the
    forwards bound to rows ``first_row ..`` (``hooks`` None: unhooked)."""
    cache = DynamicCache(config=model.config)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    chunks = [ids[:, :prefill]] + [ids[:, t: t + 1] for t in range(prefill, ids.shape[1])]
    out = []
    with torch.no_grad():
        for chunk in chunks:
            if hooks is None:
                out.append(model(chunk, **kw).logits)
                continue
            with hooks.bound(first_row, chunk):
                out.append(model(chunk, **kw).logits)
    return torch.cat(out, 1)


def test_mixed_batch_decode_steps_match_peft(base, adapters, served, one_thread):
    """Prefill 5 tokens then 3 single-token steps with a KV cache, rows 2..5 of the table."""
    tables, hooks = served
    _set_rows(hooks, first_row=2)
    ids = _ids(4, 8, seed=1)
    plain = _cached_steps(base, None, ids, 2, 5)
    _check_against_peft(_cached_steps(base, hooks, ids, 2, 5), plain, ids, adapters, base)


def test_kernel_backend_matches_torch_backend_on_the_model(base, adapters, one_thread):
    tables = LoRATables(base, max_loras=2, max_lora_rank=8)
    for name in ("a", "b"):
        assert tables.handle(LoRARequest(LOAD, name, adapters[name][0])).ok
    ids = _ids(4, 3, seed=2)
    with torch.no_grad():
        plain = base(ids).logits
    out = {}
    for backend in ("torch", "triton"):
        hooks = LoRAHooks(base, tables, max_rows=4, backend=backend)
        try:
            _set_rows(hooks)
            out[backend] = _mixed_logits(base, hooks, ids)
        finally:
            for row in range(4):
                hooks.clear_row(row)
            hooks.remove()
    torch.testing.assert_close(out["triton"], out["torch"], atol=1e-4, rtol=0)
    assert torch.equal(out["triton"][0], plain[0])


def test_bf16_model_rows_without_adapter_are_bit_identical(base, adapters, one_thread):
    model = copy.deepcopy(base).to(torch.bfloat16)
    tables = LoRATables(model, max_loras=2, max_lora_rank=8)
    assert tables.A[0].dtype == torch.bfloat16
    for name in ("a", "b"):
        assert tables.handle(LoRARequest(LOAD, name, adapters[name][0])).ok
    ids = _ids(4, 3, seed=6)
    with torch.no_grad():
        plain = model(ids).logits
        want = adapters["b"][1](input_ids=ids[2:3]).logits[0]  # fp32 peft
    out = {}
    for backend in ("torch", "triton"):
        hooks = LoRAHooks(model, tables, max_rows=4, backend=backend)
        try:
            _set_rows(hooks)
            out[backend] = _mixed_logits(model, hooks, ids)
        finally:
            hooks.remove()
        assert torch.equal(out[backend][0], plain[0]), backend
        # bf16 model against fp32 peft (the adapter itself moves these logits by ~3)
        assert (out[backend][2].float() - want).abs().max() < 0.1, backend
    torch.testing.assert_close(out["triton"], out["torch"], atol=0.1, rtol=0.02)


PATTERNS = {
    "rank_alpha": dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 32},
                       target_modules=["q_proj", "v_proj", "up_proj"]),
    "regex": dict(r=4, target_modules=r".*\.(q_proj|up_proj)"),
    "layers": dict(r=4, target_modules=["k_proj", "down_proj"], layers_to_transform=[1]),
    "exclude": dict(r=4, target_modules=["q_proj", "gate_proj"],
                    exclude_modules=["model.layers.0.mlp.gate_proj"]),
}


@pytest.mark.parametrize("case", list(PATTERNS))
def test_config_patterns_match_peft(base, tmp_path, case, one_thread):
    oracle = _save_adapter(base, tmp_path / "p", 3, **PATTERNS[case])
    tables = LoRATables(base, max_loras=1, max_lora_rank=8)
    hooks = LoRAHooks(base, tables, max_rows=1, backend="torch")
    try:
        assert tables.handle(LoRARequest(LOAD, "p", tmp_path / "p")).ok
        hooks.set_row(0, "p")
        ids = _ids(1, 5, seed=3)
        with torch.no_grad():
            want = oracle(input_ids=ids).logits
        torch.testing.assert_close(_mixed_logits(base, hooks, ids), want, atol=ATOL, rtol=0)
    finally:
        hooks.remove()


# -- statuses ---------------------------------------------------------------------------------
def test_load_unload_reload_and_names(base, adapters, served, one_thread):
    tables, hooks = served
    assert tables.names == ("a", "b")
    r = tables.handle(LoRARequest(LOAD, "a", adapters["b"][0]))
    assert r.status is LoRAStatus.LOAD_NAME_EXISTS and "'a'" in r.message
    r = tables.handle(LoRARequest(UNLOAD, "zzz"))
    assert r.status is LoRAStatus.UNLOAD_NAME_NONEXISTENT
    r = tables.handle(LoRARequest(LOAD, "c", adapters["a"][0]))
    assert r.status is LoRAStatus.LOAD_ERROR and "max_loras" in r.message  # full
    _set_rows(hooks)
    ids = _ids(4, 4, seed=4)
    before = _mixed_logits(base, hooks, ids)
    r = tables.handle(LoRARequest(UNLOAD, "a"))
    assert r.status is LoRAStatus.UNLOAD_ERROR and "in use" in r.message
    for row in (1, 3):
        hooks.clear_row(row)
    assert tables.handle(LoRARequest("unload", "a")).ok
    assert tables.names == ("b",)
    with pytest.raises(ValueError, match="no LoRA adapter named 'a'"):
        hooks.set_row(1, "a")
    assert tables.handle(LoRARequest("load", "a", str(adapters["a"][0]))).ok  # back into slot 1
    _set_rows(hooks)
    assert torch.equal(_mixed_logits(base, hooks, ids), before)


def test_request_validation():
    with pytest.raises(ValueError, match="operation"):
        LoRARequest("reload", "a", "/x")
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest(LOAD, "", "/x")
    assert LoRARequest("load", "a", "/x").operation is LOAD


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> Path:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _edit_weights(path: Path, edit) -> Path:
    f = path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))
    return path


def _first(tensors: dict, kind: str) -> str:
    return sorted(k for k in tensors if kind in k)[0]


def _broken_adapters(base, adapters, root: Path) -> dict[str, tuple[Path | None, LoRAStatus, str]]:
    a = adapters["a"][0]
    inv, path_ = LoRAStatus.LOAD_INVALID_ADAPTER, LoRAStatus.LOAD_INVALID_PATH
    (root / "empty").mkdir()
    trunc = _copy(a, root / "trunc")
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return {
        "missing": (root / "nope", path_, "lora_path"),
        "none": (None, path_, "lora_path"),
        "empty": (root / "empty", path_, "adapter_config.json"),
        "dora_cfg": (_edit_config(_copy(a, root / "dora"), use_dora=True), inv, "use_dora"),
        "bias": (_edit_config(_copy(a, root / "bias"), bias="all"), inv, "bias"),
        "mts": (_edit_config(_copy(a, root / "mts"), modules_to_save=["lm_head"]), inv, "modules_to_save"),
        "no_match": (_edit_config(_copy(a, root / "nm"), target_modules=["qq_proj"]), inv, "target_modules"),
        "bad_json": (_edit_config(_copy(a, root / "bj")), inv, "adapter_config.json"),
        "truncated": (trunc, inv, "adapter_model.safetensors"),
        "shape": (_edit_weights(_copy(a, root / "shape"),
                                lambda t: t.update({(k := _first(t, "lora_A")): t[k][:, :-1].contiguous()})),
                  inv, "do not fit"),
        "missing_key": (_edit_weights(_copy(a, root / "mk"), lambda t: t.pop(_first(t, "lora_B"))),
                        inv, "missing key"),
        "extra_key": (_edit_weights(_copy(a, root / "ek"),
                                    lambda t: t.update({"base_model.model.lm_head.lora_A.weight":
                                                        torch.ones(8, 64)})),
                      inv, "target_modules does not target"),
        "nan": (_edit_weights(_copy(a, root / "nan"), lambda t: t[_first(t, "lora_B")].fill_(float("nan"))),
                inv, "non-finite"),
        "rank": (_edit_config(_copy(a, root / "rank"), r=16), inv, "r: rank 16 is above max_lora_rank 8"),
    }


def test_refusals_name_the_field_and_leave_loaded_adapters_alone(base, adapters, served, tmp_path,
                                                                  one_thread):
    tables, hooks = served
    assert tables.handle(LoRARequest(UNLOAD, "b")).ok  # one free slot: refusals are not "table full"
    broken = _broken_adapters(base, adapters, tmp_path)
    (broken["bad_json"][0] / "adapter_config.json").write_text("{not json")
    hooks.set_row(0, "a")
    ids = _ids(1, 4, seed=5)
    before = _mixed_logits(base, hooks, ids)
    for case, (path, status, needle) in broken.items():
        r = tables.handle(LoRARequest(LOAD, "x", path))
        assert r.status is status and needle in r.message, (case, r)
        assert tables.names == ("a",), case
        assert torch.equal(_mixed_logits(base, hooks, ids), before), case


@pytest.mark.parametrize("case", ["dora", "lm_head", "embedding", "rank"])
def test_real_peft_adapters_the_runtime_refuses(base, tmp_path, case, one_thread):
    config = {"dora": dict(r=4, use_dora=True, target_modules=["q_proj"]),
              "lm_head": dict(r=4, target_modules=["q_proj", "lm_head"]),
              "embedding": dict(r=4, target_modules=["embed_tokens"]),
              "rank": dict(r=16, target_modules=["q_proj"])}[case]
    needle = {"dora": "use_dora", "lm_head": "target_modules: 'lm_head'",
              "embedding": "target_modules: 'model.embed_tokens'", "rank": "above max_lora_rank 8"}[case]
    _save_adapter(base, tmp_path / case, 4, **config)
    tables = LoRATables(base, max_loras=1, max_lora_rank=8)
    r = tables.handle(LoRARequest(LOAD, case, tmp_path / case))
    assert r.status is LoRAStatus.LOAD_INVALID_ADAPTER and needle in r.message, r
    with pytest.raises(LoRAError) as e:
        read_adapter(tmp_path / case, tables.shapes, 8, tables.model_modules)
    assert e.value.status is LoRAStatus.LOAD_INVALID_ADAPTER


def test_restricted_targets_refuse_other_layers(base, adapters):
    tables = LoRATables(base, max_loras=1, max_lora_rank=8, target_modules=["q_proj", "k_proj"])
    assert len(tables.target_names) == 4
    r = tables.handle(LoRARequest(LOAD, "a", adapters["a"][0]))  # targets v_proj too
    assert r.status is LoRAStatus.LOAD_INVALID_ADAPTER and "v_proj" in r.message
    with pytest.raises(ValueError, match="target_modules"):
        LoRATables(base, max_loras=1, max_lora_rank=8, target_modules=["lm_head"])


def test_hooks_skip_when_no_bound_row_has_an_adapter(base, served, monkeypatch):
    tables, hooks = served
    calls = []
    monkeypatch.setattr(LoRAHooks, "apply", lambda self, *a: calls.append(1))
    hooks.set_row(5, "a")  # outside the bound rows
    ids = _ids(2, 3)
    with torch.no_grad():
        plain = base(ids).logits
    assert torch.equal(_mixed_logits(base, hooks, ids), plain) and not calls
    with hooks.maybe_bound(0, ids.shape):  # some row is active: binds
        assert hooks.bound_rows == (0, 2)
    hooks.set_row(1, "b")  # B targets q/k/o/down only
    _mixed_logits(base, hooks, ids)
    assert len(calls) == 2 * 4  # 2 layers x (q, k, o, down)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_module_without_adapters_is_bit_identical(base, served, backend):
    tables, _ = served
    hooks = LoRAHooks(base, tables, max_rows=2, backend=backend)
    ids = _ids(2, 3)
    try:
        with torch.no_grad():
            plain = base(ids).logits
            with hooks.every_module(), hooks.bound(0, ids):
                got = base(ids).logits
        assert torch.equal(got, plain)
    finally:
        hooks.remove()


def test_hooks_validate_rows_and_shapes(base, served):
    tables, hooks = served
    with pytest.raises(ValueError, match="row"):
        hooks.set_row(8, "a")
    with pytest.raises(ValueError, match="slot"):
        hooks.set_row(0, 0 + tables.num_slots)
    with pytest.raises(ValueError, match="first_row"):
        hooks.bind(6, (3, 1))
    hooks.set_row(0, "a")
    with pytest.raises(ValueError, match="does not match the bound batch"), torch.no_grad(), \
            hooks.bound(0, (1, 2)):
        base(_ids(1, 3))
    assert tables.users(tables.slot_of("a")) == 1
    hooks.set_row(0, "b")
    assert tables.users(tables.slot_of("a")) == 0 and tables.users(tables.slot_of("b")) == 1
    assert hooks.active
    hooks.remove()  # releases the rows' adapters
    assert tables.users(tables.slot_of("b")) == 0 and not hooks.active


def test_cpu_tables_keep_b_transposed_in_step(base, adapters, served):
    """Off CUDA the tables keep ``Bt`` (B slot by slot, transposed) and ``At`` (A's slots side by
    side, transposed) for the dense CPU path: they follow every load and unload."""
    tables, _ = served

    def consistent() -> bool:
        return all(torch.equal(bt, b.transpose(1, 2).reshape(-1, b.shape[1]))
                   for bt, b in zip(tables.Bt, tables.B, strict=True)) and \
            all(torch.equal(at, a.reshape(-1, a.shape[2]).T)
                for at, a in zip(tables.At, tables.A, strict=True))

    assert tables.Bt is not None and consistent() and any(bt.any() for bt in tables.Bt)
    assert any(at.any() for at in tables.At)
    assert tables.handle(LoRARequest(UNLOAD, "b")).ok and consistent()
    assert tables.handle(LoRARequest(LOAD, "b", adapters["b"][0])).ok and consistent()
