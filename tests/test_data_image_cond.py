"""Image-to-video data: the model family (``ExtractionConfig.family`` / ``data.family``) in the cache.

* ``i2v`` (WAN 2.2 I2V A14B): every window also stores ``image_cond_latent``, checked against what core
  ``WanImageToVideo`` puts into the conditioning as ``concat_latent_image`` (real random WAN 2.1 VAE, loaded by
  ``comfy.sd.VAE``, as in ``test_data_comfy_vae``);
* ``ti2v`` defaults (24 fps, 121 frames, 32-pixel buckets) and the synthetic clips sampled at 24 fps;
* the family in the settings hash, and VAEs of the wrong family refused (encoder and file header).

The WAN 2.2 VAE itself is exercised in ``test_data_ti2v_vae`` (it needs ~5.5 GB while loaded).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_data_comfy_vae import random_wan21_vae_state_dict
from training.data.cache import (CachedClipDataset, ComfyVAEEncoder, VAEFamilyError, build_cache,
                                 start_image_frames)
from training.data.manifest import load_manifest
from training.data.synthetic import HashTextEncoder, PoolingVideoEncoder, make_synthetic_dataset
from training.data.video_io import ExtractionConfig, bucket_size, frames_to_tensor, load_clip
from training.encoders import EncoderFileError, data_family, extraction_config, precheck_encoders, video_encoder

import comfy.ldm.wan.vae  # noqa: E402
import comfy.ldm.wan.vae2_2  # noqa: E402
import comfy.sd  # noqa: E402
from comfy_extras.nodes_wan import WanImageToVideo  # noqa: E402


@pytest.fixture(scope="module")
def vae():
    return comfy.sd.VAE(sd=random_wan21_vae_state_dict())


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    manifest = make_synthetic_dataset(tmp_path_factory.mktemp("i2v_data"), n_per_class=1, seed=3, width=32,
                                      height=32)
    return load_manifest(manifest)


def test_i2v_window_stores_the_concat_latent_image_of_WanImageToVideo(vae, records, tmp_path):
    record = records[0]
    config = ExtractionConfig(mode="head", max_frames=5, target_area=32 * 32, family="i2v")
    encoder = ComfyVAEEncoder(vae)
    summary = build_cache([record], tmp_path / "cache", encoder, config=config)
    tensors = summary.entries[0].load()
    assert tensors["latent"].shape == tensors["image_cond_latent"].shape == (16, 2, 4, 4)

    frames = frames_to_tensor(load_clip(record.video_path, config).windows[0].frames)
    context = torch.zeros(1, 4, 4096)
    positive, negative, latent = WanImageToVideo.execute(
        positive=[[context, {}]], negative=[[context, {}]], vae=vae, width=32, height=32, length=5, batch_size=1,
        start_image=frames[:1]).args
    node = positive[0][1]["concat_latent_image"]
    assert node.shape == (1, 16, 2, 4, 4) and latent["samples"].shape == (1, 16, 2, 4, 4)
    torch.testing.assert_close(tensors["image_cond_latent"], node[0].float(), rtol=1e-4, atol=1e-4)
    assert positive[0][1]["concat_mask"][0, 0, 0].eq(0).all()  # the trainer builds this mask itself
    # the causal VAE: the start frame's latent is the window's latent frame 0; the gray frames differ
    torch.testing.assert_close(tensors["image_cond_latent"][:, 0], tensors["latent"][:, 0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(tensors["image_cond_latent"][:, 1], tensors["latent"][:, 1], atol=1e-2)

    item = CachedClipDataset(summary.entries)[0]
    assert torch.equal(item["image_cond_latent"], tensors["image_cond_latent"])
    again = build_cache([record], tmp_path / "cache", ComfyVAEEncoder(vae), config=config)
    assert (again.computed, again.reused) == (0, 1)


def test_start_image_frames_is_the_nodes_construction():
    frames = torch.rand(5, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    image = start_image_frames(frames)
    assert torch.equal(image[0], frames[0]) and image[1:].eq(0.5).all() and frames[1:].ne(0.5).all()


def test_family_is_part_of_the_settings_hash(records, tmp_path):
    """t2v, i2v and ti2v caches of the same clips live side by side; t2v keeps the hash it had before families."""
    record = records[1]
    base = dict(mode="head", max_frames=5, target_area=64 * 64)
    assert "family" not in ExtractionConfig(**base).settings()  # t2v caches written before families stay valid
    files = {}
    for family in ("t2v", "i2v", "ti2v", "t2v"):
        video = PoolingVideoEncoder.for_family(family)
        summary = build_cache([record], tmp_path / "cache", video, config=ExtractionConfig(**base, family=family))
        entry = summary.entries[0]
        tensors = entry.load()
        assert ("image_cond_latent" in tensors) == (family == "i2v")
        files.setdefault(family, (entry.path, summary.computed))
        if family == "t2v" and len(files) > 1:  # back to t2v: its files are reused, nothing is encoded
            assert (summary.computed, summary.reused, video.calls) == (0, 1, 0)
    assert len({path for path, _ in files.values()}) == 3 and all(c == 1 for _, c in files.values())
    # i2v and t2v share the VAE, so the family alone tells the caches apart
    assert PoolingVideoEncoder.for_family("i2v").identity == PoolingVideoEncoder.for_family("t2v").identity
    assert load_clip(record.video_path, ExtractionConfig(**base, family="ti2v")).bucket == (32, 32)


def test_ti2v_defaults_and_synthetic_clips_at_24_fps(records, tmp_path):
    t2v, ti2v = ExtractionConfig(), ExtractionConfig(family="ti2v")
    assert (t2v.target_fps, t2v.max_frames, t2v.bucket_step) == (16.0, 81, 16)
    assert (ti2v.target_fps, ti2v.max_frames, ti2v.bucket_step) == (24.0, 121, 32)
    kept = ExtractionConfig(family="ti2v", target_fps=16, max_frames=33, bucket_step=16)
    assert (kept.target_fps, kept.max_frames, kept.bucket_step) == (16.0, 33, 32)  # 16 px is too fine for 16x
    assert ExtractionConfig(max_frames=0, target_fps=None, family="ti2v") == ti2v  # 0 / None: the family's
    # multiples of 32 with the aspect closest to 16:9 (1.786; 832x448 would be 1.857), as for 16 px buckets
    assert bucket_size(1280, 720, ti2v.target_area, ti2v.bucket_step) == (800, 448)
    with pytest.raises(ValueError, match="family must be one of t2v, i2v, ti2v"):
        ExtractionConfig(family="t2v-5b")
    # the [data] section: 0 = the family's default, a value given is kept; family as the trainer sets it
    data = SimpleNamespace(extraction_mode="head", max_frames=0, min_frames=5, num_windows=3, stride=0,
                           target_fps=0.0, target_area=480 * 832, bucket_step=16, family="ti2v")
    assert (extraction_config(data).target_fps, extraction_config(data).max_frames) == (24.0, 121)
    data.max_frames, data.family = 41, "i2v"
    assert (extraction_config(data).target_fps, extraction_config(data).max_frames) == (16.0, 41)
    del data.family  # a config without the key is t2v
    assert extraction_config(data).family == "t2v"
    data.family = "auto"  # not settled from a DiT (prepare called directly): the WAN 2.2 VAE means ti2v
    assert data_family(data) == "t2v" and data_family(data, PoolingVideoEncoder.for_family("ti2v")) == "ti2v"
    assert video_encoder("demo:pooling", "ti2v").latent_channels == 48

    # the shipped synthetic clips (16 fps, 2 s) sampled at 24 fps: 48 frames, frames repeat, every tip boxed
    record = records[3]
    config = ExtractionConfig(family="ti2v", target_area=64 * 64)
    window = load_clip(record.video_path, config, roi_boxes=record.roi_boxes).windows[0]
    assert window.frames.shape == (45, 32, 32, 3) and not torch.isnan(torch.from_numpy(window.roi_boxes)).any()
    assert list(window.source_indices[:7]) == [0, 1, 1, 2, 3, 3, 4]  # round(k * 16 / 24)
    summary = build_cache([record], tmp_path / "cache", PoolingVideoEncoder.for_family("ti2v"), HashTextEncoder(),
                          config)
    item = CachedClipDataset(summary.entries)[0]
    assert item["latent"].shape == (48, 12, 2, 2) and item["roi_latent"].shape == (12, 2, 2) and item["has_roi"]
    # clips rendered at 24 fps keep every frame
    native = load_manifest(make_synthetic_dataset(tmp_path / "d24", n_per_class=1, width=32, height=32, fps=24.0,
                                                  seconds=1.0))[0]
    assert list(load_clip(native.video_path, config).windows[0].source_indices) == list(range(21))


def test_a_vae_of_another_family_is_refused_before_decoding(vae, records, tmp_path):
    wan21 = ComfyVAEEncoder(vae, path="/models/vae/wan_2.1_vae.safetensors")
    config = ExtractionConfig(mode="head", max_frames=5, target_area=32 * 32, family="ti2v")
    with pytest.raises(VAEFamilyError, match=r"VAE '/models/vae/wan_2\.1_vae\.safetensors': this VAE makes "
                                             r"16-channel latents \(a WAN 2\.1 VAE\), but WAN 2\.2 TI2V 5B .*\(family "
                                             r"'ti2v'\) takes 48-channel latents from wan2\.2_vae\.safetensors"):
        build_cache(records[:1], tmp_path / "cache", wan21, config=config)
    assert not (tmp_path / "cache").exists()

    class Undeclared:  # an encoder that does not say what it makes: refused at its first output, nothing written
        identity = "my-vae"

        def __call__(self, frames):
            return PoolingVideoEncoder.for_family("ti2v")(frames)

    with pytest.raises(VAEFamilyError, match=r"VAE 'my-vae': this VAE makes 48-channel latents \(a WAN 2\.2 VAE\)"):
        build_cache(records[:1], tmp_path / "cache", Undeclared(), config=ExtractionConfig(max_frames=5))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    with pytest.raises(VAEFamilyError, match="compresses 8x in space, but WAN 2.2 TI2V 5B"):
        build_cache(records[:1], tmp_path / "cache", PoolingVideoEncoder(channels=48, identity="p48"),
                    config=ExtractionConfig(max_frames=5, family="ti2v", target_area=32 * 32))


def _header_only_file(path: Path, module: torch.nn.Module) -> Path:
    """A valid safetensors file with ``module``'s names and shapes whose data is a hole (sparse, zeros): the
    header checks read nothing else, and a real VAE file would cost hundreds of MB per test."""
    header, offset = {}, 0
    for name, value in module.state_dict().items():
        size = value.numel() * 2
        header[name] = {"dtype": "F16", "shape": list(value.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


def test_precheck_refuses_a_vae_file_of_another_family(tmp_path):
    import wan_fixtures
    from safetensors.torch import save_file

    with torch.device("meta"):
        wan21 = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                         temperal_downsample=[False, True, True], dropout=0.0)
        wan22 = comfy.ldm.wan.vae2_2.WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                            attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    vae21 = _header_only_file(tmp_path / "wan_2.1_vae.safetensors", wan21)
    vae22 = _header_only_file(tmp_path / "wan2.2_vae.safetensors", wan22)
    i2v_dit = tmp_path / "i2v_dit.safetensors"
    save_file(wan_fixtures.tiny_wan_state_dict(num_layers=1, family="i2v"), str(i2v_dit))

    def data(vae_path, family="t2v"):
        return SimpleNamespace(vae=str(vae_path), text_encoder="demo:hash", family=family)

    assert precheck_encoders(data(vae21), i2v_dit) == 4096  # the I2V DiT (36 channels in) takes the 2.1 VAE
    assert precheck_encoders(data(vae22, "ti2v")) is None
    with pytest.raises(EncoderFileError) as err:
        precheck_encoders(data(vae21, "ti2v"))
    assert str(err.value) == (f"data.vae = {str(vae21)!r}: this VAE makes 16-channel latents (a WAN 2.1 VAE), but "
                              "WAN 2.2 TI2V 5B (text/image-to-video) (family 'ti2v') takes 48-channel latents from "
                              "wan2.2_vae.safetensors")
    with pytest.raises(EncoderFileError, match=r"48-channel latents \(a WAN 2\.2 VAE\), but WAN 2\.2 I2V A14B"):
        precheck_encoders(data(vae22), i2v_dit)  # the DiT's family decides when a DiT is known
