"""Fixtures shared by the node, server and browser tests: importing the pack as ComfyUI does, and tiny
LoRA-MoE files that fit ``wan_fixtures``' tiny WAN DiTs.

The pack is imported from the repo root ``__init__.py`` as a package (never as top-level ``nodes``, which
is ComfyUI's module), so its nodes use the pack's own copy of ``moe_core`` (``<pack>.moe_core``). Files are
the interface between the two copies: tests build LoRA-MoE files with the top-level ``moe_core`` and the
nodes read them.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Sequence

import torch

from moe_core.checkpoint import Adapter, AdapterSet, LoraMoE, ProjectionAdapters, save_lora_moe
from moe_core.routing import LearnedRouter
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "ComfyUI-WanLoRAMoE"

#: Projections the tiny LoRA-MoE adapts in each of the tiny WAN's last blocks (dim 128, ffn 256).
TINY_PROJECTIONS = {"self_attn.q": (128, 128), "self_attn.k": (128, 128), "self_attn.v": (128, 128),
                    "self_attn.o": (128, 128), "cross_attn.q": (128, 128), "cross_attn.o": (128, 128)}
TINY_FFN = {"ffn.0": (128, 256), "ffn.2": (256, 128)}


def import_pack(module_name: str = "wlm_pack"):
    """Import the repo as a package the way ComfyUI's loader does (spec from ``<dir>/__init__.py``)."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def tiny_adapter_set(name: str, seed: int, expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES,
                     blocks: Sequence[int] = (6, 7, 8, 9), ffn_blocks: Sequence[int] = (8, 9), scale: float = 0.08,
                     router: bool = True, fingerprint: list[float] | None = None,
                     sigma_range: tuple[float, float] | None = None, model: dict | None = None) -> AdapterSet:
    g = torch.Generator().manual_seed(seed)

    def adapter(fin: int, fout: int, rank: int) -> Adapter:
        return Adapter(torch.randn(rank, fin, generator=g) * scale, torch.randn(fout, rank, generator=g) * scale,
                       float(rank))

    modules = {}
    for b in blocks:
        projections = dict(TINY_PROJECTIONS, **(TINY_FFN if b in ffn_blocks else {}))
        for proj, (fin, fout) in projections.items():
            rank = 8 if proj.endswith(".q") else 4
            modules[f"blocks.{b}.{proj}"] = ProjectionAdapters(
                fin, fout, adapter(fin, fout, rank), [adapter(fin, fout, rank) for _ in expert_names])
    router_sd = None
    if router:
        r = LearnedRouter(len(expert_names), 64)
        with torch.no_grad():
            for p in r.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        router_sd = {k: v.detach().clone() for k, v in r.state_dict().items()}
    return AdapterSet(name, modules, router=router_sd, fingerprint=fingerprint, sigma_range=sigma_range,
                      model=dict(model or {}))


def tiny_a14b_moe(fingerprints: dict[str, list[float]] | None = None, router: bool = True,
                  expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES) -> LoraMoE:
    """A LoRA-MoE with high_noise and low_noise sets for the tiny WAN (pass fingerprints for 'auto')."""
    fp = fingerprints or {}
    sets = {
        "high_noise": tiny_adapter_set("high_noise", 11, expert_names, router=router, fingerprint=fp.get("high_noise"),
                                       sigma_range=(0.875, 1.0)),
        "low_noise": tiny_adapter_set("low_noise", 12, expert_names, router=router, fingerprint=fp.get("low_noise"),
                                      sigma_range=(0.0, 0.875)),
    }
    return LoraMoE(list(expert_names), sets)


def tiny_model_record(family: str) -> dict:
    """The `model` record of a set made for ``wan_fixtures.tiny_wan_state_dict(family=...)`` (10 blocks of 128)."""
    from moe_core.families import FAMILIES

    fam = FAMILIES[family]
    return {"dim": 128, "num_layers": 10, "ffn_dim": 256, "in_dim": fam.in_dim, "out_dim": fam.out_dim,
            "family": family}


def tiny_family_moe(family: str, fingerprints: dict[str, list[float]] | None = None) -> LoraMoE:
    """A LoRA-MoE for the tiny DiT(s) of an image-to-video family, recording it: ``i2v`` a high_noise +
    low_noise pair switching at the I2V boundary t = 0.9 (pass fingerprints for 'auto'), ``ti2v`` one
    ``default`` set."""
    from moe_core.families import FAMILIES

    model = tiny_model_record(family)
    fp = fingerprints or {}
    boundary = FAMILIES[family].boundary
    if FAMILIES[family].pair:
        sets = {"high_noise": tiny_adapter_set("high_noise", 21, fingerprint=fp.get("high_noise"),
                                               sigma_range=(boundary, 1.0), model=model),
                "low_noise": tiny_adapter_set("low_noise", 22, fingerprint=fp.get("low_noise"),
                                              sigma_range=(0.0, boundary), model=model)}
    else:
        sets = {"default": tiny_adapter_set("default", 23, fingerprint=fp.get("default"), model=model)}
    return LoraMoE(list(DEFAULT_EXPERT_NAMES), sets)


def tiny_single_moe(router: bool = False) -> LoraMoE:
    return LoraMoE(list(DEFAULT_EXPERT_NAMES), {"default": tiny_adapter_set("default", 13, router=router)})


def write_moe(moe: LoraMoE, path: str | Path) -> Path:
    return save_lora_moe(moe, path)
