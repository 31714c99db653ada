"""What a model file is, read from its safetensors header alone, so a wrong file fails before any work.

Given a WAN DiT as ``data.text_encoder``, ComfyUI's CLIP loader does not refuse it: it falls back to a
randomly initialised SD1 CLIP, the cache fills with ``[77, 768]`` embeddings, and training dies minutes or
hours later with a matrix-shape error. The header of a ``.safetensors`` file (8 bytes of length, then JSON
with every tensor's name, dtype, shape and byte range) says what the file holds without reading a single
weight, so the trainer checks the VAE and the text encoder at start, as it checks the DiTs, and says what
the file looks like instead ("this file looks like a WAN DiT (dim 5120, 40 blocks), not a UMT5-XXL text
encoder").

The rules are ComfyUI's own: text encoders are classified by ``comfy.sd.detect_te_model`` (run on
shape-only ``meta`` tensors), the WAN VAE by the keys ``comfy.sd.VAE`` looks for, the DiT by the keys
``comfy.model_detection`` reads. Files in other formats (``.pt``, ``.ckpt``, ``.gguf``) are not checked
here: only loading them can tell.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
#: Token vocabulary of UMT5-XXL (WAN's text encoder) and of the original T5-XXL (Flux, SD3).
UMT5_VOCAB = 256384
T5_VOCAB = 32128
#: Prefixes under which checkpoints and some repackaged files store a diffusion model.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

Layout = Mapping[str, tuple[int, ...]]


class HeaderError(ValueError):
    """The file is not a readable safetensors file (truncated download, another format)."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """Tensor shapes and header metadata of a safetensors file."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def is_safetensors(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SAFETENSORS_SUFFIXES


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse the header of a safetensors file (no tensor data is read).

    Raises:
        HeaderError: unreadable header, or data ranges beyond the end of the file (a truncated download).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise HeaderError(f"{path}: {size} bytes, too short for a safetensors file")
        length = struct.unpack("<Q", head)[0]
        if length > 100_000_000:
            raise HeaderError(f"{path}: not a safetensors file (its first 8 bytes are no header length)")
        if 8 + length > size:
            raise HeaderError(f"{path}: truncated (an interrupted download or copy?) or not a safetensors file: "
                              f"its header alone needs {8 + length:,} bytes, the file has {size:,}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeaderError(f"{path}: not a safetensors file (unreadable header: {exc})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for name, info in header.items():
        try:
            shapes[name] = tuple(int(s) for s in info["shape"])
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise HeaderError(f"{path}: not a safetensors file (bad entry for tensor {name!r})") from None
    if 8 + length + end > size:
        raise HeaderError(f"{path}: truncated: the header describes {8 + length + end:,} bytes but the file has "
                          f"{size:,} (an interrupted download or copy)")
    return SafetensorsHeader(path, shapes, {str(k): str(v) for k, v in metadata.items()})


# ------------------------------------------------------------------------------------------ the kinds

@dataclass(frozen=True)
class DiTLayout:
    """What the trainer needs to know of a WAN DiT before loading it."""

    dim: int
    num_layers: int
    in_channels: int
    text_dim: int
    image_to_video: bool
    out_channels: int | None = None  # latent channels the head writes (16; TI2V 5B 48); None if unknown

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents the DiT denoises (its output; its input adds I2V's image channels)."""
        return self.out_channels if self.out_channels is not None else self.in_channels


def _strip(layout: Layout, prefixes: tuple[str, ...]) -> Layout:
    for prefix in prefixes:
        if any(k.startswith(prefix + "head.modulation") for k in layout):
            return {k[len(prefix):]: v for k, v in layout.items() if k.startswith(prefix)}
    return layout


def wan_dit_layout(layout: Layout) -> DiTLayout | None:
    """The DiT's sizes when ``layout`` is a WAN DiT (the keys ``comfy.model_detection`` reads), else None."""
    sd = _strip(layout, DIT_PREFIXES)
    if "head.modulation" not in sd or "blocks.0.self_attn.q.weight" not in sd:
        return None
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    patch = sd.get("patch_embedding.weight", (0, 0))
    text = sd.get("text_embedding.0.weight", (0, 4096))
    head = sd.get("head.head.weight")  # [out_dim x 2x2 patch, dim]
    return DiTLayout(dim=int(sd["head.modulation"][-1]), num_layers=len(blocks), in_channels=int(patch[1]),
                     text_dim=int(text[1]), image_to_video="img_emb.proj.1.weight" in sd,
                     out_channels=None if head is None else int(head[0]) // 4)


def wan_vae_channels(layout: Layout) -> int | None:
    """Latent channels of a WAN VAE as ``comfy.sd.VAE`` detects it (2.1: 16, 2.2: 48), else None."""
    if "decoder.middle.0.residual.0.gamma" not in layout:
        return None
    return 48 if "decoder.upsamples.0.upsamples.0.residual.2.weight" in layout else 16


def text_encoder_kind(layout: Layout) -> str | None:
    """ComfyUI's name for the text encoder in ``layout`` (``comfy.sd.detect_te_model``), e.g. ``T5_XXL``."""
    import torch

    from moe_core.comfy_runtime import ensure_comfy

    ensure_comfy()
    import comfy.sd

    meta = {k: torch.empty(v, device="meta") for k, v in layout.items()}
    kind = comfy.sd.detect_te_model(meta)
    return None if kind is None else kind.name


def text_encoder_width(layout: Layout) -> int | None:
    """Width of the embeddings a T5-style encoder produces (its ``d_model``)."""
    for key in ("encoder.final_layer_norm.weight", "shared.weight"):
        if key in layout:
            return int(layout[key][-1])
    return None


_TE_NAMES = {"CLIP_L": "a CLIP-L text encoder (SD1.5/SDXL/Flux)", "CLIP_H": "a CLIP-H text encoder (SD2)",
             "CLIP_G": "a CLIP-G text encoder (SDXL/SD3)", "T5_XL": "a T5-XL text encoder",
             "T5_BASE": "a T5-base text encoder", "T5_XXL_OLD": "an old T5-XXL text encoder (Cosmos)",
             "BYT5_SMALL_GLYPH": "a ByT5 text encoder"}


def describe(header: SafetensorsHeader) -> str:
    """A short phrase saying what the file looks like: ``a WAN DiT (dim 5120, 40 blocks)``, ``a LoRA``, ..."""
    layout = header.shapes
    keys = list(layout)
    if not keys:
        return "an empty file (no tensors)"
    if "lora_moe" in header.metadata:
        return "a LoRA-MoE file"
    if any(re.search(r"lora_(down|up|A|B)\b|\.lora\.", k) for k in keys):
        return "a LoRA"
    if any(k.startswith("model.diffusion_model.") for k in keys) and \
            any(k.startswith(("first_stage_model.", "vae.")) for k in keys):
        return "a full checkpoint (diffusion model, VAE and maybe text encoder in one file)"
    dit = wan_dit_layout(layout)
    if dit is not None:
        kind = "an image-to-video WAN DiT" if dit.image_to_video else "a WAN DiT"
        return f"{kind} (dim {dit.dim}, {dit.num_layers} blocks)"
    channels = wan_vae_channels(layout)
    if channels is not None:
        return f"a WAN {'2.2' if channels == 48 else '2.1'} VAE ({channels} latent channels)"
    if "decoder.conv_in.weight" in layout:
        return f"an image VAE (SD/SDXL/Flux style, {layout['decoder.conv_in.weight'][1]} latent channels)"
    te = text_encoder_kind(layout)
    if te == "T5_XXL":
        vocab = layout.get("shared.weight", (0,))[0]
        if vocab == T5_VOCAB:
            return f"a T5-XXL text encoder ({T5_VOCAB}-token vocabulary, as Flux and SD3 use)"
        return "a UMT5-XXL text encoder"
    if te is not None:
        return _TE_NAMES.get(te, f"a {te.replace('_', '-')} language-model text encoder")
    if any(k.split(".")[0] in ("double_blocks", "joint_blocks", "input_blocks", "transformer_blocks")
           or k.startswith("model.diffusion_model.") for k in keys):
        return "a diffusion model of another family (not WAN)"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return "a VAE of another model"
    return f"an unrecognised model (keys such as {', '.join(sorted(keys)[:3])})"


def umt5_problem(header: SafetensorsHeader, text_dim: int | None) -> str | None:
    """Why ``header`` is not a UMT5-XXL text encoder for a DiT taking ``text_dim``-wide text (None: it is)."""
    layout = header.shapes
    if text_encoder_kind(layout) != "T5_XXL" or layout.get("shared.weight", (0,))[0] == T5_VOCAB:
        return f"this file looks like {describe(header)}, not a UMT5-XXL text encoder"
    width = text_encoder_width(layout)
    if text_dim is not None and width is not None and width != text_dim:
        return f"it makes {width}-wide embeddings but the DiT takes {text_dim}-wide text"
    return None


def wan_vae_problem(header: SafetensorsHeader, in_channels: int | None) -> str | None:
    """Why ``header`` is not the WAN VAE of a DiT with ``in_channels`` latent channels (None: it is)."""
    channels = wan_vae_channels(header.shapes)
    if channels is None:
        return f"this file looks like {describe(header)}, not a WAN VAE"
    if in_channels is not None and channels != in_channels:
        return (f"this is a WAN {'2.2' if channels == 48 else '2.1'} VAE with {channels} latent channels, but the "
                f"DiT takes {in_channels} (WAN 2.1 and 2.2 A14B use the 2.1 VAE, 16 channels; the 2.2 5B model "
                "the 2.2 VAE, 48)")
    return None


__all__ = ["DiTLayout", "HeaderError", "SafetensorsHeader", "T5_VOCAB", "UMT5_VOCAB", "describe", "is_safetensors",
           "read_header", "text_encoder_kind", "text_encoder_width", "umt5_problem", "wan_dit_layout",
           "wan_vae_channels", "wan_vae_problem"]
