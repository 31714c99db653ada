"""Random LoRAs and LoRA-MoE files for the tiny WAN, and ComfyUI's own LoRA loader as the oracle."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import save_file

import comfy.sd
import comfy.utils

from moe_core.checkpoint import Adapter, AdapterSet, LoraMoE, ProjectionAdapters
from moe_core.lora_formats import save_lora
from moe_core.targets import default_targets, linear_shape
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

DIM, FFN = 128, 256


def random_adapters(targets: dict[str, int], seed: int, scale: float = 0.05,
                    alpha: float | None = None) -> dict[str, Adapter]:
    """A random LoRA over `targets` (module -> rank); alpha defaults to rank/2 (scale 0.5)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, rank in targets.items():
        fin, fout = linear_shape(module, DIM, FFN)
        out[module] = Adapter(torch.randn(rank, fin, generator=g) * scale,
                              torch.randn(fout, rank, generator=g) * scale,
                              rank / 2 if alpha is None else alpha)
    return out


def write_lora_file(adapters: dict[str, Adapter], path: Path, fmt: str) -> Path:
    """A plain LoRA in one of the key formats ComfyUI reads for WAN: kohya, diffusers or comfy."""
    if fmt == "comfy":
        return save_lora(adapters, path)
    sd = {}
    for module, ad in adapters.items():
        if fmt == "kohya":
            stem = "lora_unet_" + module.replace(".", "_")
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = ad.down, ad.up
            sd[f"{stem}.alpha"] = torch.tensor(ad.alpha)
        elif fmt == "diffusers":  # no alpha: scale 1, so fold alpha/rank into B
            stem = f"diffusion_model.{module}"
            sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = ad.down, ad.up * ad.scale
        else:
            raise ValueError(fmt)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def random_moe(num_layers: int = 10, seed: int = 0, sets: Sequence[str] = ("default",),
               expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES, model: dict | None = None, **target_kw) -> LoraMoE:
    """Random base + expert LoRAs over the default targets; `model` is each set's DiT record
    (e.g. ``{"family": "i2v", ...}``), empty by default (a file that records nothing)."""
    targets = default_targets(num_layers, **target_kw)
    built = {}
    for si, name in enumerate(sets):
        base = random_adapters(targets, seed * 100 + si * 10)
        experts = [random_adapters(targets, seed * 100 + si * 10 + 1 + e) for e in range(len(expert_names))]
        modules = {m: ProjectionAdapters(*linear_shape(m, DIM, FFN), base[m], [ex[m] for ex in experts])
                   for m in targets}
        built[name] = AdapterSet(name, modules, model=dict(model or {}))
    return LoraMoE(list(expert_names), built)


def set_parts(moe: LoraMoE, set_name: str = "default") -> dict[str, dict[str, Adapter]]:
    """The set's adapters as plain LoRAs: {"base": {...}, expert name: {...}}."""
    aset = moe.sets[set_name]
    parts = {"base": {m: p.base for m, p in aset.modules.items() if p.base is not None}}
    for e, name in enumerate(moe.expert_names):
        parts[name] = {m: p.experts[e] for m, p in aset.modules.items() if p.experts[e] is not None}
    return parts


def comfy_lora_reference(model, loras: Iterable[tuple[dict[str, Adapter], float]], tmp: Path):
    """`model` with each LoRA applied by ComfyUI's own loader (what LoraLoaderModelOnly runs)."""
    for i, (adapters, strength) in enumerate(loras):
        if strength == 0:
            continue
        path = save_lora(adapters, tmp / f"ref_lora_{i}_{id(adapters)}.safetensors")
        sd = comfy.utils.load_torch_file(str(path), safe_load=True)
        model, _ = comfy.sd.load_lora_for_models(model, None, sd, strength, 0)
    return model
