"""Start training from an existing LoRA (musubi-tuner's ``network_weights``), not from zero.

``lora.init_weights`` (or ``init_weights_high`` / ``init_weights_low`` per A14B DiT) names a plain LoRA in any
key format ``moe_core.lora_formats`` reads (musubi-tuner/kohya ``lora_unet_blocks_N_...``, diffusers-style
``lora_A``/``lora_B``, ComfyUI's ``diffusion_model....lora_down``), or a LoRA-MoE file (its base adapters). The
LoRA's tensors become the base slot's starting weights, its per-module alpha included, so the first step
starts at exactly the forward that ComfyUI's LoraLoaderModelOnly gives with that file at strength 1.

The file must fit the configured targets: every module it adapts must be a target (a module the trainer would
not train would silently be dropped, changing the forward), with the configured rank and the DiT's shapes.
Targets the file does not cover start fresh (ΔW = 0, as usual), which leaves the forward unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from moe_core.checkpoint import METADATA_KEY, Adapter, LoraMoEFormatError, load_lora_moe, read_safetensors
from moe_core.lora_formats import parse_lora

from .adapters import AdapterBank, AdapterConfigError


def init_lora_specs(cfg, dit_names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{DiT name: (config key, file)}`` for the DiTs that start from a LoRA."""
    lo = cfg.lora
    out = {}
    for name in dit_names:
        per_dit = {"high_noise": ("lora.init_weights_high", lo.init_weights_high),
                   "low_noise": ("lora.init_weights_low", lo.init_weights_low)}.get(name, ("", ""))
        if per_dit[1]:
            out[name] = per_dit
        elif lo.init_weights:
            out[name] = ("lora.init_weights", lo.init_weights)
    return out


def resolve_lora_path(spec: str, key: str) -> Path:
    """A path, or a file name in ComfyUI's ``models/loras`` folders."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p.absolute()
    try:
        import folder_paths

        hit = folder_paths.get_full_path("loras", spec)
    except Exception:  # pragma: no cover - ComfyUI's folders unavailable
        hit = None
    if hit:
        return Path(hit).absolute()
    raise AdapterConfigError(f"{key} = {spec!r}: file not found (neither a path nor a LoRA in ComfyUI's "
                             "models/loras)")


def read_init_adapters(path: Path, dit_name: str, key: str, diffusion_model=None) -> dict[str, Adapter]:
    """The adapters of a plain LoRA, or the base adapters of a LoRA-MoE file's set for ``dit_name``; a file that
    records another model family than ``diffusion_model``'s (when given) is refused."""
    from .models import recorded_family_problem

    try:
        tensors, header = read_safetensors(path)
        if METADATA_KEY not in header:
            problem = (recorded_family_problem(f"{key} = {path}", header.get("wan_lora_moe_model"), diffusion_model)
                       if diffusion_model is not None else None)
            if problem:
                raise AdapterConfigError(problem)
            return parse_lora(tensors, source=str(path))
        moe = load_lora_moe(path)
    except LoraMoEFormatError as e:
        raise AdapterConfigError(f"{key}: {e}") from None
    aset = moe.sets.get(dit_name) or (next(iter(moe.sets.values())) if len(moe.sets) == 1 else None)
    if aset is None:
        raise AdapterConfigError(f"{key} = {path}: a LoRA-MoE file with sets {list(moe.sets)} and none for the "
                                 f"{dit_name} DiT")
    problem = (recorded_family_problem(f"{key} = {path}", aset.model, diffusion_model)
               if diffusion_model is not None else None)
    if problem:
        raise AdapterConfigError(problem)
    out = {m: pa.base for m, pa in aset.modules.items() if pa.base is not None}
    if not out:
        raise AdapterConfigError(f"{key} = {path}: the LoRA-MoE file has no base adapters")
    return out


def _rank_key(module: str) -> str:
    kind = "ffn" if ".ffn." in module else module.rsplit(".", 1)[-1]
    return f"lora.rank_{kind}"


@torch.no_grad()
def apply_init_adapters(bank: AdapterBank, adapters: dict[str, Adapter], source: str, key: str) -> int:
    """Copy ``adapters`` into the base slot of ``bank``, checked against its targets; returns modules copied."""
    slots = {name: proj.slot(0) for name, proj in zip(bank.names, bank.projections)}
    extra = sorted(m for m in adapters if m not in slots)
    if extra:
        raise AdapterConfigError(
            f"{key} = {source}: the LoRA adapts {len(extra)} module(s) the config does not train, e.g. "
            f"{', '.join(extra[:4])}. Cover them with lora.target_blocks / lora.ffn_blocks / lora.projections "
            "(this trainer adapts attention q/k/v/o and ffn.0), or start from a LoRA trained on these targets")
    problems = []
    for module, ad in adapters.items():
        slot, proj = slots[module], bank.projections[bank.names.index(module)]
        if slot is None:
            problems.append(f"{module}: the bank has no base slot there")
            continue
        if ad.down.shape[1] != proj.in_features or ad.up.shape[0] != proj.out_features:
            problems.append(f"{module}: [{ad.down.shape[1]} -> {ad.up.shape[0]}] in the file, "
                            f"[{proj.in_features} -> {proj.out_features}] in the DiT (a LoRA for another model?)")
        elif ad.down.shape[0] != slot.rank:
            problems.append(f"{module}: rank {ad.down.shape[0]} in the file, {slot.rank} configured "
                            f"({_rank_key(module)} = {ad.down.shape[0]} fits the file)")
    if problems:
        raise AdapterConfigError(f"{key} = {source}: the LoRA does not fit the configured targets:\n  - "
                                 + "\n  - ".join(problems[:8])
                                 + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""))
    for module, ad in adapters.items():
        slot = slots[module]
        slot.down.copy_(ad.down.to(slot.down.dtype))
        slot.up.copy_(ad.up.to(slot.up.dtype))
        slot.alpha = float(ad.alpha)
    return len(adapters)


def load_init_lora(bank: AdapterBank, spec: str, key: str, dit_name: str,
                   log_fn: Callable[[str], None] = print, diffusion_model=None) -> int:
    """Resolve, read, check and copy the LoRA ``spec`` into ``bank``'s base slot (the whole of ``init_weights``);
    with ``diffusion_model``, a file recorded for another model family is refused."""
    path = resolve_lora_path(spec, key)
    adapters = read_init_adapters(path, dit_name, key, diffusion_model)
    n = apply_init_adapters(bank, adapters, str(path), key)
    fresh = len(bank.names) - n
    if fresh:
        log_fn(f"  {fresh} of {len(bank.names)} target modules are not in {path.name}: they start fresh (zero)")
    return n


__all__ = ["apply_init_adapters", "init_lora_specs", "load_init_lora", "read_init_adapters", "resolve_lora_path"]
