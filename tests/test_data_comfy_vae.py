"""The real ComfyUI WAN 2.1 VAE (random weights, loaded by ``comfy.sd.VAE``) behind ``ComfyVAEEncoder``.

The VAE's width is fixed (dim 96, ~127M parameters), so it is built once per module and fed tiny windows
(5 frames of 32x32 encode in well under 2 s on 2 idle CPU cores; 9 frames of 64x64 take ~4 s). The text
encoder (UMT5-XXL) cannot be made small through ComfyUI's loaders; cache tests use ``HashTextEncoder``.
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_core.comfy_runtime import ensure_comfy
from training.data.cache import ComfyVAEEncoder, build_cache
from training.data.manifest import load_manifest
from training.data.synthetic import make_synthetic_dataset
from training.data.video_io import ExtractionConfig, frames_to_tensor, load_clip

ensure_comfy(cpu=True)

import comfy.ldm.wan.vae  # noqa: E402
import comfy.sd  # noqa: E402


def random_wan21_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of a ``WanVAE(dim=96, z_dim=16)`` with seeded weights (ComfyUI's ops skip init).

    Norm scales 1, biases 0, other weights N(0, 1/fan_in) so activations stay O(1) through the network.
    """
    model = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                     temperal_downsample=[False, True, True], dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for name, value in model.state_dict().items():
        if name.endswith("gamma"):
            sd[name] = torch.ones_like(value)
        elif value.ndim == 1:
            sd[name] = torch.zeros_like(value)
        else:
            sd[name] = torch.randn(value.shape, generator=generator) / math.sqrt(value[0].numel())
    return sd


@pytest.fixture(scope="module")
def vae():
    loaded = comfy.sd.VAE(sd=random_wan21_vae_state_dict())
    assert isinstance(loaded.first_stage_model, comfy.ldm.wan.vae.WanVAE)  # detected as the WAN 2.1 VAE
    assert loaded.latent_channels == 16 and loaded.spacial_compression_encode() == 8
    return loaded


def test_adapter_matches_the_vae_on_signed_pixels(vae):
    """ComfyVAEEncoder feeds [0, 1] frames; VAE.encode maps them to [-1, 1] and to [1, C, F, H, W] itself."""
    encoder = ComfyVAEEncoder(vae)
    frames = torch.rand(5, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    latent = encoder(frames)
    assert latent.shape == (16, 2, 4, 4) and latent.dtype == torch.float32 and torch.isfinite(latent).all()
    with torch.inference_mode():
        direct = vae.first_stage_model.encode((frames * 2 - 1).permute(3, 0, 1, 2)[None].to(vae.vae_dtype))
    torch.testing.assert_close(latent, direct[0].float(), rtol=1e-4, atol=1e-4)
    assert encoder.identity == ComfyVAEEncoder(vae).identity and encoder.identity.startswith("comfy-vae:")
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        encoder(frames[None])  # 5-D input would make VAE.encode crop the frame axis
    with pytest.raises(ValueError, match="multiple of 8"):
        encoder(torch.rand(5, 36, 32, 3))  # VAE.encode would silently centre-crop to 32


def test_build_cache_with_the_real_vae(vae, tmp_path):
    manifest = make_synthetic_dataset(tmp_path / "data", n_per_class=1, seed=2, width=32, height=32)
    record = load_manifest(manifest)[1]
    config = ExtractionConfig(mode="head", max_frames=5, target_area=32 * 32)
    encoder = ComfyVAEEncoder(vae)
    summary = build_cache([record], tmp_path / "cache", encoder, config=config)
    assert (summary.computed, summary.windows) == (1, 1)
    tensors = summary.entries[0].load()
    assert tensors["latent"].shape == (16, 2, 4, 4) and tensors["roi_latent"].shape == (2, 4, 4)
    window = load_clip(record.video_path, config).windows[0]
    torch.testing.assert_close(tensors["latent"], encoder(frames_to_tensor(window.frames)))
    again = build_cache([record], tmp_path / "cache", ComfyVAEEncoder(vae), config=config)
    assert (again.computed, again.reused) == (0, 1)
