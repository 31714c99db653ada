"""The WAN 2.2 model families the pack supports, told apart by what their DiT reads and writes.

A LoRA-MoE only fits the family it was trained for: the same block names exist in all three, so without
this check a text-to-video file would silently land on the image-to-video DiT (and vice versa). The
family follows from two numbers every DiT has, the input and output channels of its patch embedding and
head, so it is known from a file's header (`moe_core.dit_info`), a loaded model or a LoRA-MoE's record:

=========  ======  =======  ==============================================================================
family     in_dim  out_dim  model
=========  ======  =======  ==============================================================================
``t2v``    16      16       WAN 2.2 T2V A14B (high/low-noise pair; also WAN 2.1 T2V), ComfyUI ``WAN21_T2V``
``i2v``    36      16       WAN 2.2 I2V A14B (pair): noisy latent + 4 mask channels + 16 start-image
                            latent channels, concatenated by ComfyUI's ``WAN21.concat_cond`` (core
                            ``WanImageToVideo``). Without CLIP image embeddings ComfyUI detects these
                            files as ``model_type`` t2v, so they load as ``WAN21_T2V`` (not ``WAN21_I2V``)
                            with ``in_dim`` 36; the concatenation follows from that width.
``ti2v``   48      48       WAN 2.2 TI2V 5B (one DiT, 48-channel WAN 2.2 VAE), ComfyUI ``WAN22_T2V``: the
                            start image is the first latent frame (core ``Wan22ImageToVideoLatent``) and
                            ``WAN22.process_timestep`` gives each frame its own timestep (0 on the start frame)
=========  ======  =======  ==============================================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

FamilyName = Literal["t2v", "i2v", "ti2v"]
#: WAN 2.2's switch from the high-noise to the low-noise DiT on the noise scale (upstream configs).
T2V_BOUNDARY = 0.875
I2V_BOUNDARY = 0.9


class ModelFamilyError(ValueError):
    """A model or file of a family this pack does not know, or of another family than expected."""


@dataclass(frozen=True)
class ModelFamily:
    """What differs between the WAN 2.2 models for this pack: conditioning, pair, VAE, clip defaults."""

    name: FamilyName
    title: str  # what messages and the README call it
    in_dim: int
    out_dim: int
    conditioning: Literal["text", "concat_image", "latent_image"]
    pair: bool  # a high-noise/low-noise DiT pair (A14B) or one DiT (5B)
    boundary: float | None  # the pair's switch on the noise scale
    vae: str  # the VAE file ComfyUI's templates use
    spatial_compression: int  # pixels per latent cell (VAE), before the DiT's 2x2 patches
    fps: int
    frames: int  # default clip length (4n + 1)
    reference: Mapping[str, int]  # the released model's shape: dim, num_layers, ffn_dim

    @property
    def latent_channels(self) -> int:
        return self.out_dim

    @property
    def image_conditioned(self) -> bool:
        return self.conditioning != "text"

    def to_json(self) -> dict[str, Any]:
        return {"family": self.name, "in_dim": self.in_dim, "out_dim": self.out_dim}


FAMILIES: dict[str, ModelFamily] = {
    "t2v": ModelFamily("t2v", "WAN 2.2 T2V A14B (text-to-video)", 16, 16, "text", True, T2V_BOUNDARY,
                       "wan_2.1_vae.safetensors", 8, 16, 81, {"dim": 5120, "num_layers": 40, "ffn_dim": 13824}),
    "i2v": ModelFamily("i2v", "WAN 2.2 I2V A14B (image-to-video)", 36, 16, "concat_image", True, I2V_BOUNDARY,
                       "wan_2.1_vae.safetensors", 8, 16, 81, {"dim": 5120, "num_layers": 40, "ffn_dim": 13824}),
    "ti2v": ModelFamily("ti2v", "WAN 2.2 TI2V 5B (text/image-to-video)", 48, 48, "latent_image", False, None,
                        "wan2.2_vae.safetensors", 16, 24, 121, {"dim": 3072, "num_layers": 30, "ffn_dim": 14336}),
}


def family_from_dims(in_dim: int, out_dim: int | None = None, what: str = "the model") -> ModelFamily:
    """The family of a DiT reading `in_dim` and writing `out_dim` latent channels (`out_dim` None: old
    records that kept only `in_dim`, which alone tells the three apart)."""
    for fam in FAMILIES.values():
        if fam.in_dim == int(in_dim) and (out_dim is None or fam.out_dim == int(out_dim)):
            return fam
    known = "; ".join(f"{f.title}: {f.in_dim} in / {f.out_dim} out" for f in FAMILIES.values())
    raise ModelFamilyError(f"{what} is a WAN DiT with {in_dim} input and {out_dim} output latent channels, "
                           f"which is none of the supported models ({known})")


def family_of_model(diffusion_model: Any, what: str = "the model") -> ModelFamily:
    """The family of a loaded `comfy.ldm.wan.model.WanModel` (its patch embedding and output width). WAN
    variants with other inputs share those widths (WAN 2.1 I2V / Fun-InP: 36 channels plus CLIP-vision image
    embeddings, ComfyUI's ``model_type`` i2v; VACE, camera, audio: subclasses), so they are refused by name."""
    model_type = getattr(diffusion_model, "model_type", "t2v")
    kind = type(diffusion_model).__name__
    if model_type != "t2v" or kind != "WanModel":
        raise ModelFamilyError(f"{what} is a WAN {model_type} {kind} (CLIP-vision image embeddings, VACE, camera or "
                               "audio inputs: WAN 2.1 I2V, Fun-InP and the like), none of the supported models (WAN "
                               "2.2 T2V A14B, I2V A14B, TI2V 5B)")
    in_dim = int(diffusion_model.patch_embedding.in_channels)
    out_dim = getattr(diffusion_model, "out_dim", None)
    return family_from_dims(in_dim, None if out_dim is None else int(out_dim), what)


def family_of_record(model: Mapping[str, Any] | None) -> ModelFamily | None:
    """The family a LoRA-MoE set (or stage-1 LoRA) records: `family`, else from `in_dim`; None if unknown
    (files written before the pack recorded either are taken as text-to-video by their users)."""
    if not model:
        return None
    name = model.get("family")
    if name is not None:
        if name not in FAMILIES:
            raise ModelFamilyError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
        return FAMILIES[name]
    if model.get("in_dim") is not None:
        return family_from_dims(int(model["in_dim"]), model.get("out_dim"), "the recorded model")
    return None


#: The integer fields of a set's `model` record (LoRA-MoE `AdapterSet.model`, stage-1 `wan_lora_moe_model`).
MODEL_INT_FIELDS = ("dim", "num_layers", "ffn_dim", "in_dim", "out_dim")


def model_record_problem(model: Any) -> str | None:
    """What is wrong with a `model` record, or None. The record is ``{dim, num_layers, ffn_dim, in_dim,
    out_dim: int, family: str}``, every field optional (older files hold fewer); `family` must be known and
    agree with `in_dim`/`out_dim` when those are given, so a file cannot claim two families at once. Other
    fields are left alone (a later pack version may record more)."""
    if not isinstance(model, Mapping):
        return f"must be an object, got {type(model).__name__}"
    for key in MODEL_INT_FIELDS:
        value = model.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            return f"field '{key}' must be a positive integer, got {value!r}"
    name = model.get("family")
    if name is not None and name not in FAMILIES:
        return f"field 'family' is {name!r}, not one of {', '.join(FAMILIES)}"
    try:
        by_dims = family_of_record({k: model.get(k) for k in ("in_dim", "out_dim")})
    except ModelFamilyError as e:
        return str(e)
    if name is not None and by_dims is not None and by_dims.name != name:
        return (f"says family '{name}' but in_dim {model.get('in_dim')} / out_dim {model.get('out_dim')} are "
                f"those of '{by_dims.name}'")
    return None


def pair_boundary(model: Mapping[str, Any] | None) -> float:
    """The high-/low-noise switch (noise level t) of the A14B pair a `model` record belongs to: the recorded
    family's (I2V 0.9), else the T2V pair's 0.875 (records without a family are text-to-video)."""
    fam = family_of_record(model)
    return fam.boundary if fam is not None and fam.boundary is not None else T2V_BOUNDARY


def family_mismatch(source: str, recorded: ModelFamily | None, actual: ModelFamily) -> str | None:
    """The message refusing a file made for one family on a model of another; None when they fit."""
    if recorded is None or recorded.name == actual.name:
        return None
    return (f"{source} was trained for {recorded.title} ({recorded.in_dim} input latent channels), but this "
            f"model is {actual.title} ({actual.in_dim}): a LoRA-MoE only fits the model family it was trained "
            "for; load the matching DiT or use a file trained for this one")


__all__ = ["FAMILIES", "I2V_BOUNDARY", "MODEL_INT_FIELDS", "ModelFamily", "ModelFamilyError", "T2V_BOUNDARY",
           "family_from_dims", "family_mismatch", "family_of_model", "family_of_record", "model_record_problem", "pair_boundary"]
