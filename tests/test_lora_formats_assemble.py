"""Plain LoRA files in ComfyUI's WAN key formats, and assembling them into a LoRA-MoE (CLI errors included):
what the file records about its DiTs (depth, width, fingerprint), so that `auto` finds each A14B DiT's set
and a DiT of another depth or width is refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import wan_fixtures
from moe_core import assemble
from moe_core.checkpoint import LoraMoEFormatError, load_lora_moe
from moe_core.lora_formats import load_lora, parse_lora, save_lora
from moe_core.patch import LoraMoEModelError, apply_lora_moe, check_model, model_fingerprint, select_adapter_set
from moe_core.targets import default_targets
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


# ------------------------------------------------------------------------------- what the file records

@pytest.fixture(scope="module")
def dit_files(tmp_path_factory, tiny_wan_state_dict):
    """Tiny DiT files: the A14B pair (seeds 0 / 1, 10 blocks), a third DiT (seed 2), a 12-block one, and the
    high-noise DiT again with ComfyUI's `model.diffusion_model.` key prefix."""
    d = tmp_path_factory.mktemp("dits")
    files = {"high": (0, 10), "low": (1, 10), "other": (2, 10), "deep": (0, 12)}
    out = {}
    for name, (seed, layers) in files.items():
        out[name] = d / f"{name}.safetensors"
        save_file(tiny_wan_state_dict(seed, num_layers=layers), str(out[name]))
    out["prefixed"] = d / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in tiny_wan_state_dict(0).items()}, str(out["prefixed"]))
    return out


def _loras(tmp_path, num_layers: int = 10, seed: int = 0, metadata: dict | None = None) -> dict:
    """A base and a Scissors LoRA on the default targets of a `num_layers`-block tiny DiT."""
    targets = default_targets(num_layers)
    out = {}
    for i, name in enumerate(("base", "scissors")):
        out[name] = save_lora(random_adapters(targets, seed * 10 + i), tmp_path / f"{name}_{seed}.safetensors",
                              metadata=(metadata or {}).get(name))
    return out


def test_dit_files_give_depth_width_and_the_loaded_models_fingerprint(dit_files, tiny_wan_state_dict):
    from moe_core.dit_info import DitFileError, read_dit_file

    high = read_dit_file(dit_files["high"])
    assert high.model == {"dim": 128, "num_layers": 10, "ffn_dim": 256, "in_dim": 16, "out_dim": 16, "family": "t2v"}
    assert high.fingerprint == model_fingerprint(wan_fixtures.load_tiny_wan(tiny_wan_state_dict(0)))
    assert read_dit_file(dit_files["prefixed"]) == high
    assert read_dit_file(dit_files["deep"]).model["num_layers"] == 12
    lora = save_lora(random_adapters(default_targets(10), 0), dit_files["high"].parent / "lora.safetensors")
    with pytest.raises(DitFileError, match="no 'head.modulation' tensor, so this is not a WAN DiT file"):
        read_dit_file(lora)


def test_auto_finds_each_dit_of_an_assembled_pair_at_any_precision(tmp_path, dit_files, tiny_wan_state_dict,
                                                                   capsys):
    """`--dit` at assembly: `auto` picks the high-noise set for the high-noise DiT and the low-noise set for
    the low-noise one, loaded in float32 or fp8 (the rounding moves the fingerprint by a few percent), and a
    third DiT is refused."""
    hi, lo = _loras(tmp_path, seed=1), _loras(tmp_path, seed=2)
    out = tmp_path / "pair.safetensors"
    assert assemble.main(["--base", f"high_noise:{hi['base']}", "--base", f"low_noise:{lo['base']}",
                          "--expert", f"high_noise:Scissors={hi['scissors']}",
                          "--expert", f"low_noise:Scissors={lo['scissors']}",
                          "--dit", f"high_noise:{dit_files['high']}", "--dit", f"low_noise:{dit_files['low']}",
                          "--out", str(out)]) == 0
    assert "note:" not in capsys.readouterr().err
    moe = load_lora_moe(out)
    for set_name in ("high_noise", "low_noise"):
        assert moe.sets[set_name].model == {"dim": 128, "num_layers": 10, "ffn_dim": 256, "in_dim": 16, "out_dim": 16,
                                            "family": "t2v"}
    for seed, expected in ((0, "high_noise"), (1, "low_noise")):
        for dtype in (None, torch.float8_e4m3fn):
            model = wan_fixtures.load_tiny_wan(tiny_wan_state_dict(seed), dtype=dtype)
            assert select_adapter_set(moe, model, "auto") == expected, (seed, dtype)
    other = wan_fixtures.load_tiny_wan(tiny_wan_state_dict(2))
    with pytest.raises(LoraMoEModelError, match="this model's weights are none of the DiTs its high-noise and "
                                                "low-noise sets were trained for"):
        select_adapter_set(moe, other, "auto")
    assert select_adapter_set(moe, other, "high-noise") == "high_noise"  # by hand: the user's call


def test_stage1_loras_carry_their_dit_into_the_assembled_file(tmp_path, tiny_wan_state_dict, capsys):
    """LoRAs written by this pack's stage-1 trainer record the DiT they were trained on
    (`wan_lora_moe_fingerprint`, `wan_lora_moe_set`): assembled without --dit, `auto` still works."""
    fps = {n: model_fingerprint(wan_fixtures.load_tiny_wan(tiny_wan_state_dict(seed)))
           for n, seed in (("high_noise", 0), ("low_noise", 1))}
    parts = {n: _loras(tmp_path, seed=3 + i, metadata={"base": {"wan_lora_moe_set": n, "wan_lora_moe_fingerprint":
                                                                json.dumps(fps[n])}})
             for i, n in enumerate(fps)}
    out = tmp_path / "stage1_pair.safetensors"
    assert assemble.main(["--base", f"high_noise:{parts['high_noise']['base']}",
                          "--base", f"low_noise:{parts['low_noise']['base']}", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "set 'high_noise' records no DiT depth (--dit high_noise:<DiT file> records it)" in err
    assert "fingerprint" not in err
    moe = load_lora_moe(out)
    assert moe.sets["low_noise"].fingerprint == fps["low_noise"] and moe.sets["low_noise"].model == {"dim": 128}
    low = wan_fixtures.load_tiny_wan(tiny_wan_state_dict(1))
    assert select_adapter_set(moe, low, "auto") == "low_noise"
    # The same LoRAs given for the wrong DiT, or mixed with another DiT's file, are refused at assembly.
    swapped = ["--base", f"high_noise:{parts['low_noise']['base']}",
               "--base", f"low_noise:{parts['high_noise']['base']}"]
    assert assemble.main(swapped + ["--out", str(out)]) == 2
    assert "was trained on the low_noise DiT (its metadata says so) but is given for the high_noise set" in \
        capsys.readouterr().err


def test_assembled_without_fingerprints_auto_says_what_to_do(tmp_path, tiny_wan_state_dict, capsys):
    hi, lo = _loras(tmp_path, seed=5), _loras(tmp_path, seed=6)
    out = tmp_path / "bare_pair.safetensors"
    assert assemble.main(["--base", f"high_noise:{hi['base']}", "--base", f"low_noise:{lo['base']}",
                          "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "set 'low_noise' records no DiT fingerprint (--dit low_noise:<DiT file> records it): adapter_set 'auto' " \
           "cannot pick it; choose high-noise / low-noise on each Load LoRA-MoE node" in err
    moe = load_lora_moe(out)
    model = wan_fixtures.load_tiny_wan(tiny_wan_state_dict(0))
    with pytest.raises(LoraMoEModelError, match="does not record which DiT each belongs to, so adapter_set 'auto' "
                                                "cannot choose: set adapter_set to high-noise for the high-noise DiT"):
        select_adapter_set(moe, model, "auto")
    assert select_adapter_set(moe, model, "low-noise") == "low_noise"


def test_a_file_for_another_depth_or_width_is_refused(tmp_path, dit_files, tiny_wan_state_dict):
    """A 10-block file adapts blocks 2-9, which a 12-block DiT also has: only the recorded depth can refuse it."""
    parts = _loras(tmp_path)
    out = tmp_path / "ten.safetensors"
    assert assemble.main(["--base", str(parts["base"]), "--expert", f"Scissors={parts['scissors']}",
                          "--dit", str(dit_files["high"]), "--out", str(out)]) == 0
    moe = load_lora_moe(out)
    assert moe.sets["default"].model["num_layers"] == 10
    deep = wan_fixtures.load_tiny_wan(tiny_wan_state_dict(0, num_layers=12))
    message = (f"{out}: its single-DiT set was built for a WAN DiT with 10 layers of width 128, but this model has "
               "12 layers of width 128: a LoRA-MoE only fits the model it was trained for")
    with pytest.raises(LoraMoEModelError) as e:
        apply_lora_moe(deep, moe)
    assert str(e.value) == message
    assert deep.get_attachment("wan_lora_moe") is None and not deep.object_patches
    check_model(wan_fixtures.load_tiny_wan(tiny_wan_state_dict(0)), moe, "default")  # its own depth: fine
    wide = wan_fixtures.load_tiny_wan(tiny_wan_state_dict(0, dim=256, ffn_dim=512))
    with pytest.raises(LoraMoEModelError, match="10 layers of width 128, but this model has 10 layers of width 256"):
        check_model(wide, moe, "default")
    # What the trainer records (training.models.model_info) is checked the same way.
    moe.sets["default"].model = {"dim": 128, "num_layers": 12, "ffn_dim": 256, "in_dim": 16}
    check_model(deep, moe, "default")
    with pytest.raises(LoraMoEModelError, match="with 12 layers of width 128, but this model has 10 layers"):
        check_model(wan_fixtures.load_tiny_wan(tiny_wan_state_dict(0)), moe, "default")


def test_assembly_refuses_a_dit_that_does_not_fit_the_loras(tmp_path, dit_files, tiny_wan_state_dict, capsys):
    parts = _loras(tmp_path, num_layers=12)  # blocks 4-11
    out = str(tmp_path / "x.safetensors")
    assert assemble.main(["--base", str(parts["base"]), "--dit", str(dit_files["high"]), "--out", out]) == 2
    assert f"set 'default': the LoRAs adapt block 11, but {dit_files['high']} says the DiT has 10 blocks" in \
        capsys.readouterr().err
    wide = tmp_path / "wide_dit.safetensors"
    save_file(tiny_wan_state_dict(0, dim=256, ffn_dim=512), str(wide))
    assert assemble.main(["--base", str(parts["base"]), "--dit", str(wide), "--out", out]) == 2
    assert "the LoRAs adapt a DiT of width 128, but" in capsys.readouterr().err
    fp_low = model_fingerprint(wan_fixtures.load_tiny_wan(tiny_wan_state_dict(1)))
    tagged = _loras(tmp_path, seed=7, metadata={"base": {"wan_lora_moe_fingerprint": json.dumps(fp_low)}})
    assert assemble.main(["--base", str(tagged["base"]), "--dit", str(dit_files["high"]), "--out", out]) == 2
    assert "was trained on another DiT than --dit" in capsys.readouterr().err
    assert assemble.main(["--base", str(parts["base"]), "--dit", f"low_noise:{dit_files['low']}", "--out", out]) == 2
    assert "--dit for set(s) ['low_noise'], which no --base or --expert file has" in capsys.readouterr().err
    assert assemble.main(["--base", str(parts["base"]), "--dit", str(parts["base"]), "--out", out]) == 2
    assert "not a WAN DiT file" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
