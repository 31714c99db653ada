"""Assets of the CPU demo (``python -m training.stage1 --demo``): synthetic clips and tiny random models.

Everything is written into ``demo.work_dir`` once and reused by later demo runs:

* ``data/manifest.jsonl`` + ``data/clips/*.mp4``: synthetic laparoscopy-like clips (``training.data.synthetic``)
  with Chinese captions and tip ROI boxes;
* ``models/tiny_wan_t2v_<layers>x<dim>.safetensors``: a WAN text-to-video DiT with the real key layout but
  few, narrow blocks and random weights; it is loaded through ``comfy.sd.load_diffusion_model`` like any WAN
  DiT. With ``pair=True`` (the mission demo, ``training.mission``) two of them, ``..._high_noise`` and
  ``..._low_noise``, with different random weights: a stand-in for the WAN 2.2 A14B pair, so both DiTs, the
  t = 0.875 boundary and the adapter-set choice of each DiT are exercised;
* ``models/random_wan21_vae.safetensors``: a WAN 2.1 VAE (its architecture is fixed by ComfyUI's loader, so
  it has the real ~127M parameters) with random weights, stored in fp16 (~250 MB), loaded by ``comfy.sd.VAE``.

The text encoder is the hashing stand-in (``demo:hash``): UMT5-XXL cannot be made small.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger("training")

DIT_FILE = "tiny_wan_t2v.safetensors"
VAE_FILE = "random_wan21_vae.safetensors"


def build_random_wan_dit(num_layers: int = 4, dim: int = 128, ffn_dim: int | None = None, seed: int = 0,
                         family: str = "t2v") -> dict[str, torch.Tensor]:
    """State dict of a random ``WanModel`` (float32), un-prefixed keys as in WAN files.

    ``family`` (``moe_core.families``): ``t2v`` (16 latent channels in and out), ``i2v`` (36 in: WAN 2.2 I2V
    A14B, no CLIP image embedding, as the released files) or ``ti2v`` (48 in and out: WAN 2.2 TI2V 5B)."""
    import comfy.ldm.wan.model
    import comfy.ops

    from moe_core.families import FAMILIES

    fam = FAMILIES[family]
    ffn_dim = ffn_dim or 2 * dim
    model = comfy.ldm.wan.model.WanModel(
        model_type="t2v", patch_size=(1, 2, 2), in_dim=fam.in_dim, dim=dim, ffn_dim=ffn_dim, freq_dim=256,
        text_dim=4096, out_dim=fam.out_dim, num_heads=max(1, dim // 128), num_layers=num_layers,
        operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
    with torch.no_grad():
        for _, module in model.named_modules():
            is_norm = isinstance(module, norm_types) or type(module).__name__.endswith("RMSNorm")
            for name, param in module.named_parameters(recurse=False):
                if name == "modulation":
                    values = torch.randn(param.shape, generator=gen) * 0.1
                elif name == "bias":
                    values = torch.zeros(param.shape)
                elif is_norm:
                    values = torch.ones(param.shape)
                else:
                    values = torch.randn(param.shape, generator=gen) * 0.02
                param.copy_(values.to(param.dtype))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def build_random_wan_vae(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """State dict of a WAN 2.1 VAE with random weights (fan-in scaled normal, norms 1, biases 0)."""
    import comfy.ldm.wan.vae

    model = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                     temperal_downsample=[False, True, True], dropout=0.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
            elif name.endswith("gamma") or name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def build_random_wan22_vae(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """State dict of a WAN 2.2 VAE (48 latent channels, 16x spatial compression: TI2V 5B) with random weights.

    ComfyUI's loader fixes its width (dim 160: ~705M parameters, 1.4 GB in fp16, ~10 s to build on 2 cores),
    so tests build it once per session; encoding or decoding a few 64x64 frames takes seconds on the CPU."""
    import comfy.ldm.wan.vae2_2

    model = comfy.ldm.wan.vae2_2.WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                        temperal_downsample=[False, True, True], dropout=0.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
            elif name.endswith("gamma") or name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from moe_core.checkpoint import atomic_save_safetensors

    atomic_save_safetensors(tensors, path, {"note": "random weights for the wan-lora-moe demo; not a model"})


def demo_dit_paths(cfg, pair: bool = False) -> dict[str, Path]:
    """Where the demo's random DiT(s) live: ``{"default": path}`` or ``{"high_noise": ..., "low_noise": ...}``."""
    demo = cfg.demo
    stem = Path(demo.work_dir) / "models" / f"tiny_wan_t2v_{demo.dit_layers}x{demo.dit_dim}"
    if not pair:
        return {"default": stem.with_suffix(".safetensors")}
    return {name: stem.with_name(f"{stem.name}_{name}.safetensors") for name in ("high_noise", "low_noise")}


def demo_clips(cfg, log_fn=print) -> Path:
    """Render the demo's synthetic clips (unless those of the same settings exist); returns the manifest.

    The settings they were rendered with are kept beside the manifest, so a changed ``demo.clips_per_class``,
    size or frame count renders them again instead of silently reusing clips of another shape.
    """
    from .data.synthetic import make_synthetic_dataset
    from moe_core.atomic import atomic_write_text

    demo = cfg.demo
    root = Path(demo.work_dir) / "data"
    manifest = root / "manifest.jsonl"
    stamp = root / "demo_settings.json"
    wanted = {"clips_per_class": demo.clips_per_class, "width": demo.width, "height": demo.height,
              "frames": demo.frames, "seed": 0, "fps": 16.0}
    try:
        have = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        have = None
    if manifest.is_file() and have == wanted:
        return manifest
    if manifest.is_file():
        log_fn(f"demo: the clips in {root} were rendered with other settings ({have}); rendering them again")
        shutil.rmtree(root / "clips", ignore_errors=True)
        manifest.unlink()
    log_fn(f"demo: rendering {4 * demo.clips_per_class} synthetic clips ({demo.clips_per_class} per instrument, "
           f"{demo.width}x{demo.height}, {demo.frames} frames) into {root}")
    make_synthetic_dataset(root, n_per_class=demo.clips_per_class, seed=0, width=demo.width,
                           height=demo.height, fps=16.0, seconds=demo.frames / 16.0)
    atomic_write_text(stamp, json.dumps(wanted) + "\n")
    return manifest


def prepare_demo(cfg, log_fn=print, pair: bool | None = None):
    """Create the demo assets (if missing) and return ``cfg`` with empty model/data paths filled in.

    ``pair``: two DiTs (high- and low-noise, seeds 0 and 1) filled into ``model.dit_high`` / ``dit_low``
    instead of one into ``model.dit``; None: a pair when the config already names one (no single DiT is
    written for it).
    """
    if pair is None:
        pair = bool(cfg.model.dit_high)
    from .encoders import DEMO_TEXT

    demo = cfg.demo
    models = Path(demo.work_dir) / "models"
    manifest = demo_clips(cfg, log_fn)
    dits = demo_dit_paths(cfg, pair)
    for seed, (name, dit) in enumerate(dits.items()):
        if not dit.is_file():
            what = "" if name == "default" else f" {name}"
            log_fn(f"demo: writing a tiny random WAN{what} DiT ({demo.dit_layers} blocks, dim {demo.dit_dim}) "
                   f"to {dit}")
            _save(build_random_wan_dit(demo.dit_layers, demo.dit_dim, seed=seed), dit)
    vae = models / VAE_FILE
    if not vae.is_file():
        log_fn(f"demo: writing a random WAN 2.1 VAE (fp16, ~250 MB) to {vae}")
        _save(build_random_wan_vae(), vae)
    model = cfg.model
    if not (model.dit or model.dit_high):
        if pair:
            model = dataclasses.replace(model, dit_high=str(dits["high_noise"]), dit_low=str(dits["low_noise"]))
        else:
            model = dataclasses.replace(model, dit=str(dits["default"]))
    data = cfg.data
    data = dataclasses.replace(data, manifest=data.manifest or str(manifest), vae=data.vae or str(vae),
                               text_encoder=data.text_encoder or DEMO_TEXT)
    return dataclasses.replace(cfg, model=model, data=data)


__all__ = ["build_random_wan22_vae", "build_random_wan_dit", "build_random_wan_vae", "demo_clips", "demo_dit_paths", "prepare_demo"]
