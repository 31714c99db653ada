"""The LoRA-MoE file: round trip, atomic writes, and a clear error for every kind of bad file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_core.checkpoint import (METADATA_KEY, LoraMoEFormatError, load_lora_moe, read_safetensors,
                                 save_lora_moe)
from moe_fixtures import random_moe


@pytest.fixture
def moe_file(tmp_path):
    moe = random_moe(num_layers=10, seed=1)
    moe.sets["default"].router = {"fc1.weight": torch.randn(64, 5), "fc1.bias": torch.zeros(64),
                                  "fc2.weight": torch.randn(4, 64), "fc2.bias": torch.zeros(4)}
    return moe, save_lora_moe(moe, tmp_path / "moe.safetensors")


def test_round_trip_keeps_every_tensor_rank_and_alpha(moe_file):
    moe, path = moe_file
    back = load_lora_moe(path)
    assert back.expert_names == moe.expert_names
    assert back.defaults.to_json() == moe.defaults.to_json()
    a, b = moe.sets["default"], back.sets["default"]
    assert list(a.modules) == list(b.modules)
    for name, proj in a.modules.items():
        for x, y in zip([proj.base, *proj.experts], [b.modules[name].base, *b.modules[name].experts]):
            assert torch.equal(x.down, y.down) and torch.equal(x.up, y.up) and x.alpha == y.alpha
    assert b.modules["blocks.9.self_attn.q"].base.rank == 8
    assert b.modules["blocks.9.cross_attn.v"].experts[2].rank == 4
    assert "blocks.9.ffn.0" in b.modules and "blocks.6.ffn.0" not in b.modules
    assert torch.equal(b.router["fc2.weight"], a.router["fc2.weight"])


def test_save_is_atomic(moe_file, tmp_path, monkeypatch):
    moe, path = moe_file
    before = path.read_bytes()
    import moe_core.checkpoint as ck

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken_save)
    with pytest.raises(OSError):
        save_lora_moe(random_moe(seed=2), path)
    assert path.read_bytes() == before, "a failed save must leave the previous file intact"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file may be left behind"


def _rewrite(path, tensors=None, meta=None, mutate_meta=None):
    t, m = read_safetensors(path)
    t = tensors(t) if tensors else t
    if mutate_meta:
        data = json.loads(m[METADATA_KEY])
        mutate_meta(data)
        m[METADATA_KEY] = json.dumps(data)
    save_file(t, str(path), metadata=meta if meta is not None else m)


def test_missing_file(tmp_path):
    with pytest.raises(LoraMoEFormatError, match=r"nope\.safetensors: file not found"):
        load_lora_moe(tmp_path / "nope.safetensors")


def test_truncated_file(moe_file):
    _, path = moe_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraMoEFormatError, match="moe.safetensors: not a readable safetensors file"):
        load_lora_moe(path)


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x04\x95 this is a pickle, never unpickled")
    with pytest.raises(LoraMoEFormatError, match="model.ckpt: not a readable safetensors file"):
        load_lora_moe(p)


def test_plain_lora_is_refused_with_a_hint(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 128)}, str(p))
    with pytest.raises(LoraMoEFormatError, match="not a LoRA-MoE file.*moe_core.assemble"):
        load_lora_moe(p)


def test_unknown_version(moe_file):
    _, path = moe_file
    _rewrite(path, mutate_meta=lambda d: d.update(version=99))
    with pytest.raises(LoraMoEFormatError, match="format version 99 is not supported"):
        load_lora_moe(path)


def test_missing_key(moe_file):
    _, path = moe_file
    key = "default.blocks.5.self_attn.k.expert1.lora_up"
    _rewrite(path, tensors=lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(LoraMoEFormatError, match=f"missing tensor '{key}'"):
        load_lora_moe(path)


def test_misshaped_key(moe_file):
    _, path = moe_file
    key = "default.blocks.9.ffn.0.base.lora_down"
    _rewrite(path, tensors=lambda t: {**t, key: torch.zeros(4, 64)})
    with pytest.raises(LoraMoEFormatError, match=rf"'{key}' has shape \(4, 64\), expected \(4, 128\)"):
        load_lora_moe(path)


def test_rank_in_metadata_must_match_tensors(moe_file):
    _, path = moe_file
    _rewrite(path, mutate_meta=lambda d: d["sets"]["default"]["modules"]["blocks.3.self_attn.q"]["base"]
             .update(rank=16))
    with pytest.raises(LoraMoEFormatError, match=r"blocks.3.self_attn.q.base.lora_down' has shape \(8, 128\), "
                                                 r"expected \(16, 128\)"):
        load_lora_moe(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(moe_file, bad):
    _, path = moe_file
    key = "default.blocks.7.cross_attn.o.expert3.lora_up"

    def poison(t):
        v = t[key].clone()
        v[0, 0] = bad
        return {**t, key: v}

    _rewrite(path, tensors=poison)
    with pytest.raises(LoraMoEFormatError, match="module 'blocks.7.cross_attn.o', expert3.lora_up: contains NaN or Inf"):
        load_lora_moe(path)


def test_undeclared_tensor(moe_file):
    _, path = moe_file
    _rewrite(path, tensors=lambda t: {**t, "default.blocks.0.self_attn.q.base.lora_down": torch.zeros(8, 128)})
    with pytest.raises(LoraMoEFormatError, match="not declared by the metadata"):
        load_lora_moe(path)


def test_saved_dtype_and_metadata_is_plain_json(moe_file, tmp_path):
    moe, _ = moe_file
    p = save_lora_moe(moe, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    assert all(v.dtype in (torch.bfloat16, torch.float32) for v in load_file(str(p)).values())
    _, header = read_safetensors(p)
    meta = json.loads(header[METADATA_KEY])
    assert meta["format"] == "wan-lora-moe" and meta["version"] == 1
    assert meta["expert_names"] == ["Scissors", "Hook/Electrocautery", "Suction", "Other"]
    assert meta["sets"]["default"]["modules"]["blocks.9.self_attn.q"]["experts"][0] == {"rank": 8, "alpha": 4.0}
