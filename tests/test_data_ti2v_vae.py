"""The cache for WAN 2.2 TI2V 5B (family ``ti2v``) with the real WAN 2.2 VAE (random weights, ComfyUI's loader).

The WAN 2.2 VAE makes 48-channel latents at 16x spatial compression. TI2V conditions on a start image by
writing its latent into latent frame 0 (core ``Wan22ImageToVideoLatent``); the VAE is causal, so latent frame 0
of an encoded window is already that latent and the cache stores nothing extra: checked here against the node.

The VAE is big (~5.5 GB while loaded, ~13 s to load; ``wan_fixtures.wan22_vae`` keeps one per process), so the
tests are few and tiny (64x64, 5 frames). On a shared machine run this file under
``flock /tmp/wan22_vae.lock``.
"""
from __future__ import annotations

import pytest
import torch

import wan_fixtures
from training.data.cache import CachedClipDataset, ComfyVAEEncoder, VAEFamilyError, build_cache
from training.data.manifest import load_manifest
from training.data.synthetic import make_synthetic_dataset
from training.data.video_io import ExtractionConfig, frames_to_tensor, load_clip

from comfy_extras.nodes_wan import Wan22ImageToVideoLatent  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    vae = wan_fixtures.wan22_vae()
    assert vae.latent_channels == 48 and vae.spacial_compression_encode() == 16  # detected as the WAN 2.2 VAE
    return ComfyVAEEncoder(vae, path=wan_fixtures.wan22_vae_file())


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    manifest = make_synthetic_dataset(tmp_path_factory.mktemp("ti2v_data"), n_per_class=1, seed=5, width=64,
                                      height=64, seconds=0.5)
    return load_manifest(manifest)[2]


def test_ti2v_window_latent_frame_0_is_the_start_image_latent_of_Wan22ImageToVideoLatent(encoder, record, tmp_path):
    config = ExtractionConfig(mode="head", max_frames=5, target_area=64 * 64, family="ti2v")
    assert (config.target_fps, config.bucket_step) == (24.0, 32)
    summary = build_cache([record], tmp_path / "cache", encoder, config=config)
    assert (summary.computed, summary.windows) == (1, 1)
    tensors = summary.entries[0].load()
    assert tensors["latent"].shape == (48, 2, 4, 4)  # [48, F', H/16, W/16]
    assert tensors["roi_latent"].shape == (2, 4, 4) and "image_cond_latent" not in tensors
    item = CachedClipDataset(summary.entries)[0]
    assert "image_cond_latent" not in item and item["roi_latent"].shape == (2, 4, 4)

    frames = frames_to_tensor(load_clip(record.video_path, config).windows[0].frames)
    assert frames.shape == (5, 64, 64, 3)
    out = Wan22ImageToVideoLatent.execute(vae=encoder.vae, width=64, height=64, length=5, batch_size=1,
                                          start_image=frames[:1])[0]
    node_latent, mask = out["samples"], out["noise_mask"]
    assert node_latent.shape == (1, 48, 2, 4, 4) and mask[0, 0, 0].eq(0).all() and mask[0, 0, 1:].eq(1).all()
    # the node stores frame 0 raw (mask 0), like the cache: the causal VAE encodes frame 0 on its own
    torch.testing.assert_close(tensors["latent"][:, 0], node_latent[0, :, 0].float(), rtol=1e-4, atol=1e-4)
    assert tensors["latent"][:, 0].std() > 0.1  # a real encoding, not zeros on both sides


def test_the_wan22_vae_is_refused_for_the_a14b_families(encoder, record, tmp_path):
    for family in ("t2v", "i2v"):
        config = ExtractionConfig(mode="head", max_frames=5, target_area=64 * 64, family=family)
        with pytest.raises(VAEFamilyError) as err:
            build_cache([record], tmp_path / "cache", encoder, config=config)
        message = str(err.value)
        assert str(wan_fixtures.wan22_vae_file()) in message and "48-channel latents (a WAN 2.2 VAE)" in message
        assert "takes 16-channel latents from wan_2.1_vae.safetensors" in message and f"'{family}'" in message
    assert not (tmp_path / "cache").exists()  # refused before any clip was decoded or written
