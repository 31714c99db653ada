"""The pack's ComfyUI nodes (V3 schema), one module per node, each a thin layer over ``moe_core``."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .gate_override import GateOverride
from .load_lora_moe import LoadLoRAMoE
from .router import PromptInstrumentRouter
from .routes import register_with_server
from .timestep_band import TimestepBandNode

NODES: list[type[io.ComfyNode]] = [LoadLoRAMoE, PromptInstrumentRouter, GateOverride, TimestepBandNode]


class WanLoRAMoEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


__all__ = ["NODES", "GateOverride", "LoadLoRAMoE", "PromptInstrumentRouter", "TimestepBandNode",
           "WanLoRAMoEExtension", "register_with_server"]
