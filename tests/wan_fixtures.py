"""A tiny but real WAN 2.x diffusion model, loaded and sampled through ComfyUI's own code.

Used by the tests (through ``conftest.py``) and reusable from scripts and ``bench/``::

    sys.path.insert(0, "<repo>/tests")
    import wan_fixtures as wf
    model = wf.load_tiny_wan(wf.tiny_wan_state_dict())
    latent = wf.sample(model, wf.make_context(1), wf.make_context(2), seed=0)

The model is ``comfy.ldm.wan.model.WanModel`` with the real WAN key layout (so ComfyUI detects it as
``WAN21`` and LoRA key conversion works as for the A14B DiTs), only narrow and shallow: dim 128
(one head, because ComfyUI derives ``heads = dim // 128``), ffn 256, 10 blocks, ~2.7M parameters.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from moe_core.comfy_runtime import ensure_comfy  # noqa: E402

ensure_comfy()  # no-op when conftest.py (cpu=True) or ComfyUI already did it

import torch  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

from training.demo import build_random_wan_dit  # noqa: E402

TEXT_DIM = 4096  # fixed by ComfyUI's WAN detection
LATENT_CHANNELS = 16
DEFAULT_LATENT_SHAPE = (1, LATENT_CHANNELS, 3, 8, 8)  # [batch, channels, frames, height, width]


def tiny_wan_state_dict(seed: int = 0, num_layers: int = 10, dim: int = 128, ffn_dim: int = 256,
                        family: str = "t2v") -> dict[str, torch.Tensor]:
    """A ``WanModel`` (t2v) state dict with deterministic hand-made weights: un-prefixed keys, as in a WAN DiT
    ``.safetensors`` file. The builder is the demo's (``training.demo.build_random_wan_dit``): linear/conv
    weights ~ N(0, 0.02), biases 0, norm weights 1, ``modulation`` ~ N(0, 0.1), one head per 128 dims.

    ``family``: ``t2v`` (default), ``i2v`` (WAN 2.2 I2V A14B layout: 36 input channels) or ``ti2v`` (WAN 2.2
    TI2V 5B layout: 48 in and out; ComfyUI loads it as ``WAN22_T2V``), see ``moe_core.families``.
    """
    return build_random_wan_dit(num_layers=num_layers, dim=dim, ffn_dim=ffn_dim, seed=seed, family=family)


def load_tiny_wan(sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None, **model_options):
    """Load a WAN state dict exactly as ComfyUI's UNETLoader does; returns a ``comfy.model_patcher.ModelPatcher``.

    ``comfy.sd.load_diffusion_model_state_dict`` *pops every key* from the dict it is given, so it gets a
    shallow copy here and ``sd`` stays usable. ``dtype`` (e.g. ``torch.float8_e4m3fn``) sets the weight
    dtype; ``None`` lets ComfyUI choose (float32 on the CPU).
    """
    options = dict(model_options)
    if dtype is not None:
        options["dtype"] = dtype
    model = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=options)
    if model is None:
        raise RuntimeError("ComfyUI did not recognise the state dict as a diffusion model")
    return model


def scaled_fp8_state_dict(sd: dict) -> dict:
    """Block Linear weights stored as fp8 with a per-layer `scale_weight`, as ComfyUI's scaled-fp8 WAN files
    (``..._fp8_scaled.safetensors``, what the bundled workflows load) are; the ``scaled_fp8`` marker key makes
    ComfyUI pick its scaled-fp8 ops."""
    out = {"scaled_fp8": torch.tensor([], dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.float().reshape(())
        else:
            out[k] = v
    return out


def dequantized_state_dict(model) -> dict:
    """The weights a model actually computes with, in float32 (the oracle's weights)."""
    out = {}
    for name, module in model.model.diffusion_model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if pname in ("scale_weight", "scale_input"):
                continue
            v = p.detach().float()
            if pname == "weight" and getattr(module, "scale_weight", None) is not None:
                v = v * module.scale_weight.float()
            out[f"{name}.{pname}" if name else pname] = v
    return out


def make_context(seed: int, tokens: int = 8, batch: int = 1) -> torch.Tensor:
    """A stand-in for UMT5 text embeddings: ``[batch, tokens, 4096]`` floats from a seeded generator."""
    return torch.randn((batch, tokens, TEXT_DIM), generator=torch.Generator().manual_seed(seed))


def conditioning(context, extra: dict | None = None) -> list:
    """ComfyUI's CONDITIONING format, ``[[tensor, {options}]]``; a list is returned unchanged."""
    if isinstance(context, list):
        return context
    return [[context, dict(extra or {})]]


def sample(model, positive, negative, seed: int, steps: int = 4, cfg: float = 4.0, sampler: str = "euler",
           scheduler: str = "simple", latent_shape: Sequence[int] = DEFAULT_LATENT_SHAPE,
           latent: torch.Tensor | None = None, denoise: float = 1.0, add_noise: bool = True,
           start_step: int | None = None, last_step: int | None = None, force_full_denoise: bool = False,
           callback=None) -> torch.Tensor:
    """Run ComfyUI's real sampler (what the KSampler / KSamplerAdvanced nodes run) and return the latent.

    ``positive``/``negative`` are context tensors ``[B, T, 4096]`` or ready CONDITIONING lists. The empty
    latent defaults to zeros of ``latent_shape`` (what EmptyHunyuanLatentVideo gives), noise comes from
    ``comfy.sample.prepare_noise(latent, seed)``. ``add_noise=False``, ``start_step``/``last_step`` and
    ``force_full_denoise`` mirror KSamplerAdvanced (``force_full_denoise=False`` = "return with leftover
    noise").
    """
    if latent is None:
        latent = torch.zeros(tuple(latent_shape))
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    if add_noise:
        noise = comfy.sample.prepare_noise(latent, seed)
    else:
        noise = torch.zeros(latent.size(), dtype=latent.dtype, layout=latent.layout, device="cpu")
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, conditioning(positive), conditioning(negative), latent,
        denoise=denoise, disable_noise=not add_noise, start_step=start_step, last_step=last_step,
        force_full_denoise=force_full_denoise, callback=callback, disable_pbar=True, seed=seed,
    )


# ------------------------------------------------------------------------------ WAN 2.2 VAE (TI2V 5B)

class GivenLatentVAE:
    """A VAE stand-in for the core image-to-video nodes: `encode` returns the given latent, so a test runs the
    nodes' own code (`WanImageToVideo`, `Wan22ImageToVideoLatent`) on a chosen latent without a real VAE."""

    def __init__(self, latent: torch.Tensor):
        self.latent = latent
        self.encoded: list[tuple[int, ...]] = []  # the shapes of the images the node encoded

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.encoded.append(tuple(image.shape))
        return self.latent.clone()


def _node_result(out) -> tuple:
    return tuple(out.result) if hasattr(out, "result") else tuple(out)


def wan_image_to_video(positive, negative, concat_latent: torch.Tensor) -> tuple[list, list, dict]:
    """Core `WanImageToVideo` (I2V A14B) for a start image whose [start, grey frames...] VAE latent is
    `concat_latent` [1, 16, F, h, w]: (positive, negative, latent) with `concat_latent_image` / `concat_mask`."""
    from comfy_extras.nodes_wan import WanImageToVideo

    frames, h, w = concat_latent.shape[-3:]
    start = torch.full((1, 8 * h, 8 * w, 3), 0.5)
    vae = GivenLatentVAE(concat_latent)
    out = _node_result(WanImageToVideo.execute(positive, negative, vae, 8 * w, 8 * h, 4 * (frames - 1) + 1, 1,
                                               start_image=start))
    assert vae.encoded == [(4 * (frames - 1) + 1, 8 * h, 8 * w, 3)], "the node encodes start + grey frames"
    return out[0], out[1], out[2]


def wan22_image_to_video_latent(start_latent: torch.Tensor, frames: int, batch_size: int = 1) -> dict:
    """Core `Wan22ImageToVideoLatent` (TI2V 5B) for a start image whose VAE latent is `start_latent`
    [1, 48, 1, h, w]: the LATENT with the start frame in latent frame 0 and its `noise_mask`."""
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent

    h, w = start_latent.shape[-2:]
    vae = GivenLatentVAE(start_latent)
    out = _node_result(Wan22ImageToVideoLatent.execute(vae, 16 * w, 16 * h, 4 * (frames - 1) + 1, batch_size,
                                                       start_image=torch.full((1, 16 * h, 16 * w, 3), 0.5)))
    assert vae.encoded == [(1, 16 * h, 16 * w, 3)], "the node encodes the start image alone"
    return out[0]


def wan22_vae_file() -> Path:
    """A random WAN 2.2 VAE ``.safetensors`` (seed 0, fp16, 1.4 GB; its width is fixed by ComfyUI's loader),
    built once and kept in ``$WLM_TEST_MODELS`` (default ``~/.cache/comfyui-wanloramoe/test-models``) so
    later test sessions reuse it; written atomically, so an interrupted build is never picked up."""
    import os

    from safetensors.torch import save_file

    from moe_core.atomic import atomic_path
    from training.demo import build_random_wan22_vae

    import comfyui_version

    root = Path(os.environ.get("WLM_TEST_MODELS", Path.home() / ".cache" / "comfyui-wanloramoe" / "test-models"))
    # keyed by ComfyUI's version: the VAE's layout is ComfyUI's, and a stale file would load as a wrong model
    path = root / f"random_wan22_vae_seed0_fp16_comfyui-{comfyui_version.__version__}.safetensors"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("random_wan22_vae_seed0_fp16*.safetensors"):  # 1.4 GB each: keep one
            old.unlink()
        with atomic_path(path) as tmp:
            save_file(build_random_wan22_vae(seed=0), str(tmp))
    return path


_WAN22_VAE = None


def wan22_vae():
    """The random WAN 2.2 VAE loaded through ComfyUI's own VAE loader (``comfy.sd.VAE``), one per process."""
    global _WAN22_VAE
    if _WAN22_VAE is None:
        import comfy.utils

        _WAN22_VAE = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(wan22_vae_file())))
    return _WAN22_VAE
