"""Wrong VAE / text-encoder files fail at start with the config key, the file and what the file looks like.

Layouts (key names and shapes) come from ComfyUI's own model classes built on the ``meta`` device (no weights:
UMT5-XXL and the WAN VAEs cannot be made small), the DiT from a real tiny WAN file. Runs go through the trainer's
CLI (exit status 2, message on stderr) and must stop before anything is cached.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import comfy.ldm.models.autoencoder
import comfy.ldm.wan.vae
import comfy.ldm.wan.vae2_2
import comfy.ops
import comfy.sd1_clip
import comfy.text_encoders.t5

import train_fixtures as tf
from training import stage1
from training.config import to_toml
from training.data.cache import ensure_text
from training.data.manifest import ManifestError
from training.data.synthetic import HashTextEncoder, PoolingVideoEncoder
from training.encoders import EncoderFileError, prepare
from training.model_files import (SafetensorsHeader, describe, read_header, text_encoder_kind, text_encoder_width,
                                  umt5_problem, wan_dit_layout, wan_vae_channels, wan_vae_problem)

QUIET = lambda *_: None  # noqa: E731


def _header(module_or_sd, name: str = "file.safetensors") -> SafetensorsHeader:
    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    return SafetensorsHeader(Path(name), {k: tuple(v.shape) for k, v in sd.items()}, {})


@pytest.fixture(scope="module")
def layouts():
    """Headers of the files a user might pick, laid out as ComfyUI's classes lay them out."""
    with torch.device("meta"):
        wan21 = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                         temperal_downsample=[False, True, True], dropout=0.0)
        wan22 = comfy.ldm.wan.vae2_2.WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                            attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
        sd_vae = comfy.ldm.models.autoencoder.AutoencoderKL(
            ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                      "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                      "dropout": 0.0}, embed_dim=4)
    config = json.loads((Path(comfy.text_encoders.t5.__file__).parent / "umt5_config_xxl.json").read_text())
    umt5 = comfy.text_encoders.t5.T5(config, torch.float16, "meta", comfy.ops.manual_cast)  # what CLIPLoader builds
    t5 = dict(_header(umt5).shapes, **{"shared.weight": (32128, 4096)})  # the same encoder, T5's vocabulary
    clip_l = comfy.sd1_clip.SDClipModel(device="meta").transformer  # an SD1 CLIP (ComfyUI's fallback)
    import wan_fixtures

    dit = wan_fixtures.tiny_wan_state_dict(num_layers=3)
    return {"wan21": _header(wan21), "wan22": _header(wan22), "sd_vae": _header(sd_vae), "umt5": _header(umt5),
            "t5": SafetensorsHeader(Path("t5.safetensors"), t5, {}), "clip_l": _header(clip_l),
            "dit": _header(dit)}


def test_layouts_are_classified_as_comfyui_classifies_them(layouts):
    assert text_encoder_kind(layouts["umt5"].shapes) == "T5_XXL"  # comfy.sd.detect_te_model on the header
    assert text_encoder_kind(layouts["clip_l"].shapes) == "CLIP_L"
    assert text_encoder_kind(layouts["dit"].shapes) is None  # ComfyUI would fall back to an SD1 CLIP
    assert text_encoder_width(layouts["umt5"].shapes) == 4096
    assert (wan_vae_channels(layouts["wan21"].shapes), wan_vae_channels(layouts["wan22"].shapes)) == (16, 48)
    assert wan_vae_channels(layouts["sd_vae"].shapes) is None
    dit = wan_dit_layout(layouts["dit"].shapes)
    assert (dit.dim, dit.num_layers, dit.in_channels, dit.text_dim, dit.image_to_video) == (128, 3, 16, 4096, False)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in layouts["dit"].shapes.items()}
    assert wan_dit_layout(prefixed) == dit
    described = {name: describe(h) for name, h in layouts.items()}
    assert described == {
        "wan21": "a WAN 2.1 VAE (16 latent channels)", "wan22": "a WAN 2.2 VAE (48 latent channels)",
        "sd_vae": "an image VAE (SD/SDXL/Flux style, 4 latent channels)", "umt5": "a UMT5-XXL text encoder",
        "t5": "a T5-XXL text encoder (32128-token vocabulary, as Flux and SD3 use)",
        "clip_l": "a CLIP-L text encoder (SD1.5/SDXL/Flux)", "dit": "a WAN DiT (dim 128, 3 blocks)"}
    lora = SafetensorsHeader(Path("l"), {"lora_unet_blocks_0_self_attn_q.lora_down.weight": (4, 128)}, {})
    assert describe(lora) == "a LoRA"


def test_problems_name_what_the_file_is(layouts):
    assert umt5_problem(layouts["umt5"], 4096) is None
    assert umt5_problem(layouts["dit"], 4096) == ("this file looks like a WAN DiT (dim 128, 3 blocks), not a UMT5-XXL "
                                                  "text encoder")
    assert "looks like a T5-XXL text encoder" in umt5_problem(layouts["t5"], 4096)
    assert "looks like a CLIP-L" in umt5_problem(layouts["clip_l"], 4096)
    assert umt5_problem(layouts["umt5"], 5120) == "it makes 4096-wide embeddings but the DiT takes 5120-wide text"
    assert wan_vae_problem(layouts["wan21"], 16) is None and wan_vae_problem(layouts["wan22"], 48) is None
    assert "WAN 2.2 VAE with 48 latent channels, but the DiT takes 16" in wan_vae_problem(layouts["wan22"], 16)
    assert wan_vae_problem(layouts["dit"], 16) == "this file looks like a WAN DiT (dim 128, 3 blocks), not a WAN VAE"
    assert "looks like an image VAE" in wan_vae_problem(layouts["sd_vae"], None)


def test_header_reader_matches_safetensors_and_spots_truncation(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"a.weight": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.float16)}, str(path),
              metadata={"note": "x"})
    header = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert header.shapes == {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert header.metadata == f.metadata()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_header(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04" + b"\xff" * 100)  # a zip, say
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(junk)


# ------------------------------------------------------------------------------------- through the trainer

@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tf.Workspace:
    return tf.make_workspace(tmp_path_factory.mktemp("precheck_ws"))


def _run_cli(ws, tmp_path, capsys, **data) -> tuple[int, str]:
    cfg = tf.stage1_config(ws, tmp_path / "out", data={"cache_dir": str(tmp_path / "cache"), **data})
    path = tmp_path / "run.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    status = stage1.main(["--config", str(path)])
    return status, capsys.readouterr().err


def test_a_dit_given_as_text_encoder_or_vae_is_exit_2_before_any_work(ws, tmp_path, capsys):
    status, err = _run_cli(ws, tmp_path, capsys, text_encoder=str(ws.dit))
    assert status == 2
    assert f"data.text_encoder = '{ws.dit}'" in err
    assert "looks like a WAN DiT (dim 128, 3 blocks), not a UMT5-XXL text encoder" in err
    assert not (tmp_path / "cache").exists()  # nothing was encoded

    status, err = _run_cli(ws, tmp_path, capsys, vae=str(ws.dit))
    assert status == 2 and f"data.vae = '{ws.dit}'" in err and "not a WAN VAE" in err
    assert not (tmp_path / "cache").exists()

    cut = tmp_path / "umt5_xxl_fp16.safetensors"  # an interrupted download
    cut.write_bytes(ws.dit.read_bytes()[:4000])
    status, err = _run_cli(ws, tmp_path, capsys, text_encoder=str(cut))
    assert status == 2 and "data.text_encoder" in err and "truncated" in err and "umt5_xxl_fp16" in err

    status, err = _run_cli(ws, tmp_path, capsys, vae="no_such_vae.safetensors")
    assert status == 2 and "data.vae = 'no_such_vae.safetensors': VAE not found" in err


def test_embeddings_of_the_wrong_width_are_refused_computed_or_cached(ws, tmp_path):
    # an injected encoder (no file to check) is caught at its first caption
    cfg = tf.stage1_config(ws, tmp_path / "out", data={"cache_dir": str(tmp_path / "cache1")})
    with pytest.raises(EncoderFileError, match=r"data.text_encoder = 'hash-text-v1': it made embeddings of shape "
                                               r"\[8, 768\] but the DiT takes 4096-wide text"):
        stage1.run_stage1(cfg, encoders=(PoolingVideoEncoder(), HashTextEncoder(dim=768)), log_fn=QUIET)
    # embeddings cached earlier by a wrong encoder under the same identity are found without encoding
    cache = tmp_path / "cache2"
    caption = json.loads(ws.manifest.read_text(encoding="utf-8").splitlines()[0])["caption"]
    ensure_text(cache, caption, HashTextEncoder(dim=768), "hash-text-v1", torch.bfloat16)
    cfg = tf.stage1_config(ws, tmp_path / "out", data={"cache_dir": str(cache)})
    text = HashTextEncoder()
    with pytest.raises(EncoderFileError, match=r"the cached text embedding .* has shape \[8, 768\], but the DiT "
                                               r"takes 4096-wide text"):
        prepare(cfg.data, encode_video=PoolingVideoEncoder(), encode_text=text, text_dim=4096)
    assert text.calls == 3  # the three other captions were encoded; the stale one was only read
    assert len(prepare(cfg.data, encode_video=PoolingVideoEncoder(), encode_text=text).dataset) == 4  # unchecked


def test_a_missing_manifest_names_the_config_key(ws, tmp_path):
    cfg = tf.stage1_config(ws, tmp_path / "out", data={"manifest": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ManifestError) as e:
        prepare(cfg.data)
    assert str(tmp_path / "nope.jsonl") in str(e.value) and "data.manifest" in str(e.value)
