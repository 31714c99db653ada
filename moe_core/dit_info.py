"""What a LoRA-MoE records about the WAN DiT it belongs to, read without ComfyUI: shape and fingerprint.

- The shape (`dim`, `num_layers`, `ffn_dim`, `in_dim`, `out_dim`, the keys `training.models.model_info` writes)
  and the model `family` (`moe_core.families`: t2v, i2v, ti2v, from in/out channels) let Load LoRA-MoE refuse
  a file on a DiT of another depth, width or family, where module names alone would let a 10-layer file land
  on blocks 2-9 of a 12-layer model, or a text-to-video file on the image-to-video DiT.
- The fingerprint (a few values of `head.modulation`, which no LoRA changes) tells the two WAN 2.2 A14B
  DiTs apart, so `adapter_set = auto` picks each DiT's own set.

`read_dit_file` gets both from a DiT .safetensors by reading its header and one small tensor, so
`python -m moe_core.assemble --dit ...` works on a 28 GB A14B file without loading it.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from .families import ModelFamilyError, family_from_dims

#: How many values of `head.modulation` a fingerprint holds.
FINGERPRINT_SIZE = 32
#: A model matches a recorded fingerprint when their relative distance is below this (a DiT loaded in fp8
#: rounds each value by up to 6 %, about 3 % on average; two different DiTs are far apart)...
FINGERPRINT_TOLERANCE = 0.15
#: ... and the next closest recorded fingerprint is at least this many times farther away.
FINGERPRINT_MARGIN = 3.0

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class DitFileError(ValueError):
    """A file that is not a readable WAN DiT; the message names the file."""


def fingerprint_of(modulation: torch.Tensor, n: int = FINGERPRINT_SIZE) -> list[float]:
    """`n` evenly spaced values of a DiT's `head.modulation` (the same from a file or a loaded model)."""
    flat = modulation.detach().float().flatten().cpu()
    idx = torch.linspace(0, flat.numel() - 1, min(n, flat.numel())).long()
    return [round(float(v), 6) for v in flat[idx]]


def fingerprint_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Relative L2 distance |a - b| / |b| (infinite when the lengths differ)."""
    if len(a) != len(b) or not a:
        return math.inf
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((ta - tb).norm() / tb.norm().clamp_min(1e-12))


def closest_fingerprint(fingerprint: Sequence[float], recorded: Mapping[str, Sequence[float] | None]) -> str | None:
    """The name whose recorded fingerprint matches `fingerprint` clearly, else None.

    Clearly: within FINGERPRINT_TOLERANCE, and every other recorded fingerprint FINGERPRINT_MARGIN times
    farther, so a DiT loaded at another precision (fp8, bf16) still finds its set, and a model that is
    neither DiT finds none."""
    dist = sorted((fingerprint_distance(fingerprint, fp), name) for name, fp in recorded.items() if fp)
    if not dist or dist[0][0] > FINGERPRINT_TOLERANCE:
        return None
    if len(dist) > 1 and dist[1][0] < FINGERPRINT_MARGIN * max(dist[0][0], 1e-6):
        return None
    return dist[0][1]


def block_indices(modules: Iterable[str]) -> list[int]:
    """The DiT block numbers that module paths (`blocks.N....`) name, sorted."""
    return sorted({int(m.group(1)) for k in modules if (m := _BLOCK.match(k))})


def width_from_modules(shapes: Mapping[str, tuple[int, int]]) -> int | None:
    """The DiT width (`dim`) that adapted block projections imply: every WAN block Linear reads `dim`
    features except `ffn.2`, which writes them. `shapes[module] = (in_features, out_features)`."""
    for module, (fin, fout) in shapes.items():
        if _BLOCK.match(module):
            return fout if module.endswith(".ffn.2") else fin
    return None


@dataclass(frozen=True)
class DitFileInfo:
    model: dict[str, int | str]  # dim, num_layers, ffn_dim, in_dim, out_dim, family
    fingerprint: list[float]


def read_dit_file(path: str | os.PathLike) -> DitFileInfo:
    """Shape and fingerprint of a WAN DiT .safetensors, from its header and `head.modulation` only."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            mod_key = next((k for k in keys if k.endswith("head.modulation")), None)
            if mod_key is None:
                raise DitFileError(f"{path}: no 'head.modulation' tensor, so this is not a WAN DiT file "
                                   "(expected e.g. wan2.2_t2v_high_noise_14B_fp16.safetensors)")
            prefix = mod_key[: -len("head.modulation")]
            modulation = f.get_tensor(mod_key)
            shapes = {k[len(prefix):]: f.get_slice(k).get_shape() for k in keys if k.startswith(prefix)}
    except (SafetensorError, OSError) as e:
        raise DitFileError(f"{path}: not a readable safetensors file ({e})") from e
    layers = block_indices(shapes)
    try:
        model = {"dim": int(modulation.shape[-1]), "num_layers": len(layers),
                 "ffn_dim": int(shapes["blocks.0.ffn.0.weight"][0]),
                 "in_dim": int(shapes["patch_embedding.weight"][1]),
                 # the head writes out_dim x (1 x 2 x 2 patch) values per token
                 "out_dim": int(shapes["head.head.weight"][0]) // 4}
    except (KeyError, IndexError) as e:
        raise DitFileError(f"{path}: a 'head.modulation' but no WAN block layout ({e} missing)") from None
    try:
        model["family"] = family_from_dims(model["in_dim"], model["out_dim"], str(path)).name
    except ModelFamilyError as e:
        raise DitFileError(str(e)) from None
    if layers != list(range(len(layers))):
        raise DitFileError(f"{path}: blocks {layers[0]}..{layers[-1]} are not numbered 0..{len(layers) - 1}")
    return DitFileInfo(model, fingerprint_of(modulation))
