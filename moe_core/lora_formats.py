"""Plain WAN LoRA files in the key formats ComfyUI's own LoRA loader accepts, read and written.

- musubi-tuner / kohya: `lora_unet_blocks_7_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha`
- diffusers-style:     `diffusion_model.blocks.7.self_attn.q.lora_A.weight`, `.lora_B.weight` (alpha optional)
- ComfyUI trainer:     `diffusion_model.blocks.7.self_attn.q.lora_down.weight`, `.lora_up.weight`, `.alpha`
A missing alpha means scale 1 (alpha = rank), as in ComfyUI.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .checkpoint import Adapter, LoraMoEFormatError, atomic_save_safetensors, read_safetensors

# WAN's Linear layers, as dotted module paths (kohya names are these with '.' -> '_').
_BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                  "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")
_OTHER_LINEARS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                  "time_projection.1", "head.head", "img_emb.proj.1", "img_emb.proj.3")
_KOHYA_BLOCK = re.compile(r"^blocks_(\d+)_(.+)$")
_KOHYA_TO_DOTTED = {n.replace(".", "_"): n for n in _BLOCK_LINEARS}
_KOHYA_OTHER = {n.replace(".", "_"): n for n in _OTHER_LINEARS}
_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down",
             "lora_B.weight": "up", "alpha": "alpha"}


def module_from_key(key: str) -> tuple[str, str] | None:
    """(module path, part) of a LoRA key, part in down/up/alpha; None if the key is no LoRA part."""
    for suffix, part in _SUFFIXES.items():
        if key.endswith("." + suffix):
            stem = key[: -len(suffix) - 1]
            break
    else:
        return None
    if stem.startswith("lora_unet_"):
        name = stem[len("lora_unet_"):]
        m = _KOHYA_BLOCK.match(name)
        if m and m.group(2) in _KOHYA_TO_DOTTED:
            return f"blocks.{m.group(1)}.{_KOHYA_TO_DOTTED[m.group(2)]}", part
        if name in _KOHYA_OTHER:
            return _KOHYA_OTHER[name], part
        raise LoraMoEFormatError(f"key '{key}': '{name}' is not a Linear layer of a WAN DiT")
    if stem.startswith("diffusion_model."):
        return stem[len("diffusion_model."):], part
    raise LoraMoEFormatError(
        f"key '{key}': unsupported LoRA key format; expected 'lora_unet_blocks_N_...' (musubi/kohya) or "
        "'diffusion_model.blocks.N...' (diffusers-style or ComfyUI trainer) as ComfyUI's LoRA loader reads for WAN")


def parse_lora(tensors: dict[str, torch.Tensor], source: str = "<memory>") -> dict[str, Adapter]:
    """Adapters by module path from a plain LoRA state dict, validated."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        try:
            hit = module_from_key(key)
        except LoraMoEFormatError as e:
            raise LoraMoEFormatError(f"{source}: {e}") from None
        if hit is None:
            raise LoraMoEFormatError(
                f"{source}: key '{key}' is not a LoRA down/up/alpha tensor (DoRA, LoHa, LoKr and full-weight "
                "diffs are not supported as LoRA-MoE parts)")
        module, part = hit
        if part in parts.setdefault(module, {}):
            raise LoraMoEFormatError(f"{source}: module '{module}' has its {part} tensor twice (mixed formats?)")
        parts[module][part] = t
    if not parts:
        raise LoraMoEFormatError(f"{source}: holds no LoRA tensors")
    out: dict[str, Adapter] = {}
    for module, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            missing = "lora_down/lora_A" if "down" not in p else "lora_up/lora_B"
            raise LoraMoEFormatError(f"{source}: module '{module}' lacks its {missing} weight")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2:
            raise LoraMoEFormatError(f"{source}: module '{module}' is not a Linear LoRA "
                                     f"(down {tuple(down.shape)}, up {tuple(up.shape)})")
        if up.shape[1] != down.shape[0]:
            raise LoraMoEFormatError(f"{source}: module '{module}': inconsistent ranks, down "
                                     f"{tuple(down.shape)} vs up {tuple(up.shape)}")
        for name, t in (("down", down), ("up", up)):
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise LoraMoEFormatError(f"{source}: module '{module}' {name} weight has NaN/Inf or is not float")
        alpha = float(p["alpha"].float().item()) if "alpha" in p else float(down.shape[0])
        out[module] = Adapter(down.float(), up.float(), alpha)
    return out


def load_lora(path: str | os.PathLike) -> dict[str, Adapter]:
    tensors, _ = read_safetensors(path)
    return parse_lora(tensors, source=str(path))


def save_lora(adapters: dict[str, Adapter], path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              metadata: dict[str, str] | None = None) -> Path:
    """Write a plain LoRA in the ComfyUI key format (`diffusion_model.<module>.lora_down.weight`, ...)."""
    tensors: dict[str, torch.Tensor] = {}
    for module, ad in adapters.items():
        tensors[f"diffusion_model.{module}.lora_down.weight"] = ad.down.detach().to("cpu", dtype).contiguous()
        tensors[f"diffusion_model.{module}.lora_up.weight"] = ad.up.detach().to("cpu", dtype).contiguous()
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(float(ad.alpha))
    return atomic_save_safetensors(tensors, path, metadata)
