"""Plain LoRA files in ComfyUI's WAN key formats, and assembling them into a LoRA-MoE (CLI errors included)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from moe_core import assemble
from moe_core.checkpoint import LoraMoEFormatError, load_lora_moe
from moe_core.lora_formats import load_lora, parse_lora
from moe_fixtures import random_adapters, write_lora_file

TARGETS = {"blocks.8.self_attn.q": 8, "blocks.9.ffn.0": 4, "blocks.9.cross_attn.k": 4}


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "comfy"])
def test_each_format_reads_back_the_same_delta(fmt, tmp_path):
    ads = random_adapters(TARGETS, seed=1)
    back = load_lora(write_lora_file(ads, tmp_path / f"{fmt}.safetensors", fmt))
    assert set(back) == set(TARGETS)
    for m, a in ads.items():
        expected = a.scale * a.up @ a.down  # ΔW as ComfyUI merges it
        torch.testing.assert_close(back[m].scale * back[m].up @ back[m].down, expected, atol=1e-6, rtol=0)
    if fmt == "diffusers":  # no alpha: scale 1
        assert all(b.alpha == b.rank for b in back.values())


@pytest.mark.parametrize("key, message", [
    ("transformer.blocks.0.attn1.to_q.lora_A.weight", "unsupported LoRA key format"),
    ("lora_unet_blocks_0_self_attn_norm_q.lora_down.weight", "not a Linear layer of a WAN DiT"),
    ("diffusion_model.blocks.0.self_attn.q.dora_scale", "DoRA, LoHa, LoKr"),
])
def test_unsupported_keys_are_named(key, message):
    with pytest.raises(LoraMoEFormatError, match=message):
        parse_lora({key: torch.zeros(4, 128)}, source="x.safetensors")


def test_half_a_lora_and_bad_values():
    with pytest.raises(LoraMoEFormatError, match="'blocks.0.self_attn.q' lacks its lora_up/lora_B"):
        parse_lora({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 128)})
    bad = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 128),
           "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.full((128, 4), float("nan"))}
    with pytest.raises(LoraMoEFormatError, match="up weight has NaN/Inf"):
        parse_lora(bad)
    bad["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] = torch.zeros(128, 8)
    with pytest.raises(LoraMoEFormatError, match=r"inconsistent ranks, down \(4, 128\) vs up \(128, 8\)"):
        parse_lora(bad)


def test_assemble_a14b_pair_and_partial_experts(tmp_path, capsys):
    paths = {}
    for i, name in enumerate(["base_high", "base_low", "scissors_high", "other_low"]):
        paths[name] = write_lora_file(random_adapters(TARGETS, seed=10 + i), tmp_path / f"{name}.safetensors",
                                      "kohya")
    out = tmp_path / "pair.safetensors"
    assert assemble.main(["--base", f"high_noise:{paths['base_high']}", "--base", f"low_noise:{paths['base_low']}",
                          "--expert", f"high_noise:Scissors={paths['scissors_high']}",
                          "--expert", f"low_noise:Other={paths['other_low']}", "--out", str(out)]) == 0
    moe = load_lora_moe(out)
    assert list(moe.sets) == ["high_noise", "low_noise"]
    assert moe.sets["high_noise"].sigma_range == (0.875, 1.0) and moe.sets["low_noise"].sigma_range == (0.0, 0.875)
    high = moe.sets["high_noise"].modules["blocks.8.self_attn.q"]
    assert high.experts[0] is not None and high.experts[1:] == [None, None, None]
    low = moe.sets["low_noise"].modules["blocks.8.self_attn.q"]
    assert low.experts[3] is not None and low.experts[0] is None
    assert "wrote" in capsys.readouterr().out


def test_assemble_errors_name_the_problem(tmp_path, capsys):
    base = write_lora_file(random_adapters(TARGETS, seed=1), tmp_path / "base.safetensors", "comfy")
    other = tmp_path / "wide.safetensors"
    save_file({"diffusion_model.blocks.8.self_attn.q.lora_down.weight": torch.zeros(8, 256),
               "diffusion_model.blocks.8.self_attn.q.lora_up.weight": torch.zeros(256, 8)}, str(other))
    out = str(tmp_path / "x.safetensors")
    assert assemble.main(["--base", str(base), "--expert", f"Scissors={other}", "--out", out]) == 2
    assert "Scissors LoRA is 256->256 but another part is 128->128" in capsys.readouterr().err
    assert assemble.main(["--base", str(base), "--expert", f"Stapler={base}", "--out", out]) == 2
    assert "experts ['Stapler'] are not among the expert names" in capsys.readouterr().err
    assert assemble.main(["--base", str(base), "--expert", str(base), "--out", out]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert assemble.main(["--base", str(tmp_path / "missing.safetensors"), "--out", out]) == 2
    assert "missing.safetensors: file not found" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
