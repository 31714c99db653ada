"""The engine on the two image-conditioned WAN 2.2 families (I2V A14B, TI2V 5B), through ComfyUI's own code.

Tiny DiTs of each family (``wan_fixtures.tiny_wan_state_dict(family=...)``) are loaded by
``comfy.sd.load_diffusion_model_state_dict`` (I2V: ``WAN21`` with 36 input channels, TI2V: ``WAN22_T2V``),
conditioned as ComfyUI's core nodes condition them, and sampled by ComfyUI's sampler. The oracle is ComfyUI's
LoRA loader (``comfy.sd.load_lora_for_models``) with the same adapters merged. The start image's latent is
made by hand, exactly as ``WanImageToVideo`` / ``Wan22ImageToVideoLatent`` build theirs from the VAE's
output (the VAE itself only turns pixels into that latent; its width is fixed, so it is not tiny).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import comfy.model_management
import comfy.sample
import pack_fixtures
import wan_fixtures
from comfy.patcher_extension import WrappersMP

from moe_core import assemble, inspect as moe_inspect
from moe_core.band import ALWAYS_ON, three_level_band
from moe_core.checkpoint import LoraMoEFormatError, load_lora_moe, save_lora_moe, to_state_dict
from moe_core.dit_info import read_dit_file
from moe_core.families import FAMILIES, I2V_BOUNDARY, T2V_BOUNDARY, model_record_problem
from moe_core.lora_formats import save_lora
from moe_core.patch import LoraMoEModelError, apply_lora_moe, boundary_of, gate_trace
from moe_core.routing import manual_route, rule_route
from moe_core.targets import default_targets
from moe_fixtures import comfy_lora_reference, random_moe, set_parts

ATOL = 2e-5
SHAPE = {"dim": 128, "num_layers": 10, "ffn_dim": 256}


def record(family: str) -> dict:
    """The record of a set made for the tiny DiT of `family` (10 blocks of 128)."""
    return pack_fixtures.tiny_model_record(family)


@pytest.fixture(scope="module")
def family_sd():
    cache: dict[tuple, dict] = {}

    def make(family: str, seed: int = 0) -> dict:
        if (family, seed) not in cache:
            cache[(family, seed)] = wan_fixtures.tiny_wan_state_dict(seed, family=family)
        return dict(cache[(family, seed)])

    return make


def load(family_sd, family: str, seed: int = 0):
    return wan_fixtures.load_tiny_wan(family_sd(family, seed))


# ------------------------------------------- conditioning: the core nodes' own code on a chosen latent

def i2v_conditioning(seed: int, frames: int = 3, size: int = 8) -> tuple[list, list]:
    """(positive, negative) from core WanImageToVideo for a start image whose [start, grey frames] latent is
    random: `concat_latent_image` and `concat_mask` (0 on the start frame)."""
    g = torch.Generator().manual_seed(seed)
    concat_latent_image = torch.randn(1, 16, frames, size, size, generator=g)
    pos, neg, _ = wan_fixtures.wan_image_to_video(wan_fixtures.conditioning(wan_fixtures.make_context(1)),
                                                  wan_fixtures.conditioning(wan_fixtures.make_context(2)),
                                                  concat_latent_image)
    return pos, neg


def ti2v_latent(seed: int, frames: int = 3, size: int = 8) -> tuple[dict, torch.Tensor]:
    """The LATENT core Wan22ImageToVideoLatent makes (`samples` with the start latent in frame 0, `noise_mask`
    0 there) for a random start latent `start` [1, 48, 1, h, w] as the VAE returns it."""
    start = torch.randn(1, 48, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return wan_fixtures.wan22_image_to_video_latent(start, frames), start


def sample_latent(model, latent: dict, positive, negative, seed: int, steps: int = 4, cfg: float = 4.0):
    """What KSampler runs (`nodes.common_ksampler`: noise from the seed, the latent's `noise_mask`)."""
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", wan_fixtures.conditioning(positive),
                               wan_fixtures.conditioning(negative), samples, noise_mask=latent.get("noise_mask"),
                               disable_pbar=True, seed=seed)


def run(family: str, model, seed: int = 5):
    """One sampling run of `family`'s tiny model with its start-image conditioning."""
    if family == "i2v":
        pos, neg = i2v_conditioning(seed)
        return sample_latent(model, {"samples": torch.zeros(1, 16, 3, 8, 8)}, pos, neg, seed)
    latent, _ = ti2v_latent(seed)
    return sample_latent(model, latent, wan_fixtures.make_context(1), wan_fixtures.make_context(2), seed)


# --------------------------------------------------------------------------------- records and checks

def test_default_targets_for_the_5b_depth():
    """30 blocks (TI2V 5B): attention q,k,v,o in blocks 22-29, the FFN's first linear in 27-29."""
    t = default_targets(30)
    blocks = sorted({int(m.split(".")[1]) for m in t})
    assert blocks == list(range(22, 30))
    assert sorted(m for m in t if "ffn" in m) == [f"blocks.{b}.ffn.0" for b in (27, 28, 29)]
    assert len(t) == 8 * 8 + 3 and t["blocks.22.self_attn.q"] == 8 and t["blocks.29.cross_attn.v"] == 4
    assert default_targets(40).keys() == {m.replace(f".{b}.", f".{b + 10}.", 1) for m in t
                                           for b in [int(m.split(".")[1])]}


def test_model_records():
    assert model_record_problem(record("ti2v")) is None and model_record_problem({}) is None
    assert model_record_problem({"dim": 128, "in_dim": 36}) is None  # older records: no family
    assert "'num_layers' must be a positive integer" in model_record_problem({"num_layers": "10"})
    assert "'dim' must be a positive integer" in model_record_problem({"dim": True})
    assert "not one of t2v, i2v, ti2v" in model_record_problem({"family": "flux"})
    assert "says family 'i2v' but in_dim 16 / out_dim 16 are those of 't2v'" in \
        model_record_problem({"family": "i2v", "in_dim": 16, "out_dim": 16})
    assert "none of the supported models" in model_record_problem({"in_dim": 20})


def test_files_record_the_family_and_old_files_still_load(tmp_path, capsys):
    moe = random_moe(seed=1, model=record("i2v"))
    path = save_lora_moe(moe, tmp_path / "i2v.safetensors")
    assert load_lora_moe(path).sets["default"].model == record("i2v")
    assert moe_inspect.main([str(path)]) == 0
    assert "    model: WAN 2.2 I2V A14B (image-to-video); num_layers 10, dim 128, ffn_dim 256, in_dim 36, out_dim 16" \
        in capsys.readouterr().out
    # a damaged record is refused when the file is read, naming the file, the set and the field
    tensors, header = to_state_dict(moe)
    meta = json.loads(header["lora_moe"])
    meta["sets"]["default"]["model"]["family"] = "t2v"
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"lora_moe": json.dumps(meta)})
    with pytest.raises(LoraMoEFormatError, match=r"bad.safetensors: set 'default': the 'model' metadata says "
                                                 r"family 't2v' but in_dim 36 / out_dim 16 are those of 'i2v'"):
        load_lora_moe(tmp_path / "bad.safetensors")


def test_dit_files_and_stage1_loras_give_the_family_and_the_pair_boundary(tmp_path, family_sd):
    for family in FAMILIES:
        save_file(family_sd(family), str(tmp_path / f"{family}.safetensors"))
        assert read_dit_file(tmp_path / f"{family}.safetensors").model == record(family)
    parts = set_parts(random_moe(seed=2))
    for set_name in ("high_noise", "low_noise"):
        save_lora(parts["base"], tmp_path / f"{set_name}.safetensors")
    pair = ["--base", f"high_noise:{tmp_path / 'high_noise.safetensors'}",
            "--base", f"low_noise:{tmp_path / 'low_noise.safetensors'}"]
    # --dit of an I2V DiT: the family is recorded and the sets switch at t = 0.9
    out = tmp_path / "i2v_pair.safetensors"
    assert assemble.main(pair + ["--dit", f"high_noise:{tmp_path / 'i2v.safetensors'}",
                                 "--dit", f"low_noise:{tmp_path / 'i2v.safetensors'}", "--out", str(out)]) == 0
    moe = load_lora_moe(out)
    assert moe.sets["high_noise"].sigma_range == (I2V_BOUNDARY, 1.0)
    assert moe.sets["low_noise"].sigma_range == (0.0, I2V_BOUNDARY) and moe.sets["low_noise"].model == record("i2v")
    # stage-1 LoRAs that record their model ('wan_lora_moe_model' with family): the same, without --dit
    meta = {"wan_lora_moe_model": json.dumps(record("i2v"))}
    for set_name in ("high_noise", "low_noise"):
        save_lora(parts["base"], tmp_path / f"{set_name}.safetensors", metadata=meta)
    assert assemble.main(pair + ["--out", str(out)]) == 0
    assert load_lora_moe(out).sets["high_noise"].sigma_range == (I2V_BOUNDARY, 1.0)
    # ... and a part of one family with --dit of another is refused
    assert assemble.main(pair + ["--dit", f"high_noise:{tmp_path / 't2v.safetensors'}", "--out", str(out)]) == 2
    # old records (no family): the T2V boundary, as before
    assert assemble.sigma_range("high_noise", {"dim": 128}) == (T2V_BOUNDARY, 1.0)
    assert assemble.sigma_range("default", record("ti2v")) is None


def test_a_file_refuses_a_model_of_another_family(family_sd):
    i2v_model, t2v_model, ti2v_model = load(family_sd, "i2v"), load(family_sd, "t2v"), load(family_sd, "ti2v")
    i2v_file = random_moe(seed=3, model=record("i2v"))
    i2v_file.source = "i2v_moe.safetensors"
    with pytest.raises(LoraMoEModelError, match=r"i2v_moe.safetensors was trained for WAN 2.2 I2V A14B "
                                                r"\(image-to-video\) \(36 input latent channels\), but this model "
                                                r"is WAN 2.2 T2V A14B \(text-to-video\) \(16\)"):
        apply_lora_moe(t2v_model, i2v_file)
    with pytest.raises(LoraMoEModelError, match="this model is WAN 2.2 TI2V 5B"):
        apply_lora_moe(ti2v_model, i2v_file)
    apply_lora_moe(i2v_model, i2v_file)
    # files that record no family (older files) keep working on any family of the same shape
    for model in (i2v_model, t2v_model, ti2v_model):
        apply_lora_moe(model, random_moe(seed=3, model=dict(SHAPE)))


def test_an_i2v_file_refuses_wan21_i2v_with_clip_image_inputs():
    """WAN 2.1 I2V 14B (and Fun-InP) read 36 channels too, but also CLIP-vision embeddings (ComfyUI's
    model_type i2v): not the WAN 2.2 I2V A14B an i2v file was trained on."""
    import comfy.ldm.wan.model
    import comfy.ops

    model = comfy.ldm.wan.model.WanModel(model_type="i2v", patch_size=(1, 2, 2), in_dim=36, dim=128, ffn_dim=256,
                                         freq_dim=256, text_dim=4096, out_dim=16, num_heads=1, num_layers=10,
                                         operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in model.state_dict().items()}
    wan21_i2v = wan_fixtures.load_tiny_wan(sd)
    assert wan21_i2v.get_model_object("diffusion_model").model_type == "i2v"
    with pytest.raises(LoraMoEModelError, match=r"a WAN i2v WanModel \(CLIP-vision image embeddings.*none of the "
                                                r"supported models"):
        apply_lora_moe(wan21_i2v, random_moe(seed=3, model=record("i2v")))


def test_the_band_picture_uses_the_familys_boundary(family_sd):
    i2v = apply_lora_moe(load(family_sd, "i2v"), random_moe(seed=4, sets=("high_noise",), model=record("i2v")))
    t2v = apply_lora_moe(load(family_sd, "t2v"), random_moe(seed=4, sets=("high_noise",)))
    ti2v = apply_lora_moe(load(family_sd, "ti2v"), random_moe(seed=4, model=record("ti2v")))
    assert (boundary_of(i2v), boundary_of(t2v), boundary_of(ti2v)) == (I2V_BOUNDARY, T2V_BOUNDARY, None)


# ------------------------------------------------------------------------ noise level of the gates (TI2V)

def test_ti2v_gates_follow_the_generated_frames_not_the_start_frame(family_sd):
    """Under TI2V the DiT gets per-frame timesteps with the start frame at t = 0; the gates and the band
    follow the sampler's noise level of the generated frames, so experts stay on inside the band."""
    band = three_level_band(start=0.2, mid=0.6, mid_factor=0.5, end=1.0)
    model = load(family_sd, "ti2v")
    patched = apply_lora_moe(model, random_moe(seed=5, model=record("ti2v")), band=band,
                             routing=rule_route("剪刀剪开组织"))
    seen = []

    def spy(executor, x, timestep, *args, **kwargs):
        seen.append(timestep.detach().clone())
        return executor(x, timestep, *args, **kwargs)

    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    latent, _ = ti2v_latent(6)
    sample_latent(patched, latent, wan_fixtures.make_context(1), wan_fixtures.make_context(2), seed=6, steps=6)
    trace = gate_trace(patched)
    assert len(trace) == 6 and all(t.ndim == 2 and t.shape[1] > 1 for t in seen), "per-frame timesteps"
    assert all(float(t.min()) == 0.0 for t in seen), "the start frame's tokens have t = 0"
    inside = [s for s in trace if band.factor(s["sigma"]) > 0]
    assert len(inside) >= 4
    # the level the gates used at each step is the generated frames' t (the largest per-frame timestep)
    assert sorted(round(s["sigma"], 5) for s in trace) == sorted({round(float(t.max()) / 1000, 5) for t in seen})
    assert all(s["band"] == band.factor(s["sigma"]) for s in trace)
    for s in inside:
        assert s["gates"][0] > 0.2, s  # Scissors on: the clip's level, not the start frame's t = 0
    # a direct apply_model call (no sampler sigma in transformer_options) takes the row maximum: the same
    comfy.model_management.load_models_gpu([patched])
    sigma = torch.tensor([trace[2]["sigma"]])
    patched.get_attachment("wan_lora_moe").runtime.controller.reset()
    opts = dict(patched.model_options["transformer_options"], wrappers=patched.wrappers)
    x = torch.randn(1, 48, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        patched.model.apply_model(x, sigma, c_crossattn=wan_fixtures.make_context(1), transformer_options=opts,
                                  denoise_mask=latent["noise_mask"])
    direct = gate_trace(patched)[0]
    assert direct["sigma"] == pytest.approx(trace[2]["sigma"], abs=1e-6) and direct["band"] > 0
    assert direct["raw"] == pytest.approx(trace[0]["raw"])


# ------------------------------------------------------------------- equivalence with ComfyUI's loader

@pytest.mark.parametrize("family", ["i2v", "ti2v"])
def test_equals_comfy_lora_loader(family, family_sd, tmp_path):
    moe = random_moe(seed=7, model=record(family))
    parts = set_parts(moe)
    model = load(family_sd, family)
    plain = run(family, model)
    if family == "i2v":  # the start image reaches the DiT (36 input channels: concat_latent_image + mask)
        bare = sample_latent(model, {"samples": torch.zeros(1, 16, 3, 8, 8)}, wan_fixtures.make_context(1),
                             wan_fixtures.make_context(2), 5)
        assert (bare - plain).abs().max() > 1e-3

    # (a) experts off: LoraLoaderModelOnly with the base LoRA at alpha_base
    ours = run(family, apply_lora_moe(model, moe, alpha_base=0.7))
    ref = run(family, comfy_lora_reference(model, [(parts["base"], 0.7)], tmp_path))
    assert (ref - plain).abs().max() > 100 * ATOL, "the base LoRA must change the output"
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)

    # (b) forced gates, band covering everything: base + each expert at g_e * alpha_expert
    gates = {"Scissors": 0.25, "Suction": 0.75}
    forced = apply_lora_moe(model, moe, alpha_base=0.6, alpha_expert=1.2, band=ALWAYS_ON,
                            routing=manual_route(gates))
    ours = run(family, forced)
    loras = [(parts["base"], 0.6)] + [(parts[n], 1.2 * g) for n, g in gates.items()]
    ref = run(family, comfy_lora_reference(model, loras, tmp_path))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert (ours - run(family, apply_lora_moe(model, moe, alpha_base=0.6))).abs().max() > 100 * ATOL

    if family == "ti2v":  # (c) the start frame comes out as it went in, with the pack as without it
        _, start = ti2v_latent(5)
        torch.testing.assert_close(plain[:, :, :1], start, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours[:, :, :1], start, atol=1e-5, rtol=0)
        assert (ours[:, :, 1:] - plain[:, :, 1:]).abs().max() > 100 * ATOL


# ------------------------------------------------------------------------------------------ the nodes

@pytest.fixture
def moe_folder(tmp_path):
    """A temporary `lora_moe` model folder and temp folder registered with ComfyUI's folder_paths."""
    import folder_paths

    (tmp_path / "lora_moe").mkdir()
    (tmp_path / "temp").mkdir()
    old_temp = folder_paths.get_temp_directory()
    folder_paths.add_model_folder_path("lora_moe", str(tmp_path / "lora_moe"))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    yield tmp_path / "lora_moe"
    folder_paths.folder_names_and_paths["lora_moe"][0].remove(str(tmp_path / "lora_moe"))
    folder_paths.set_temp_directory(old_temp)


def test_load_node_refuses_another_family_and_the_band_node_draws_the_i2v_boundary(family_sd, moe_folder):
    import pack_fixtures

    N = pack_fixtures.import_pack().nodes
    save_lora_moe(random_moe(seed=8, sets=("high_noise", "low_noise"), model=record("i2v")),
                  moe_folder / "i2v_pair.safetensors")
    kw = dict(lora_moe="i2v_pair.safetensors", adapter_set="high-noise", alpha_base=0.7, alpha_expert=1.0)
    with pytest.raises(ValueError, match=r"^i2v_pair.safetensors \(high-noise set\) was trained for WAN 2.2 I2V "
                                         r"A14B .* but this model is WAN 2.2 T2V A14B"):
        N.LoadLoRAMoE.execute(model=load(family_sd, "t2v"), **kw)
    out = N.LoadLoRAMoE.execute(model=load(family_sd, "i2v"), **kw)
    assert "[high-noise] on WAN 2.2 I2V A14B (image-to-video):" in out.ui["text"][0]
    band = N.TimestepBandNode.execute(model=out.args[0], preset="seeds default", start=0.2, mid=0.6, mid_factor=0.5,
                                      end=1.0, preview_steps=8, preview_shift=5.0)
    assert band.ui["wlm_schedule"][0]["boundary"] == I2V_BOUNDARY
