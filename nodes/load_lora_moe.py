"""Load LoRA-MoE: patch a WAN DiT (one of the A14B pair) with a LoRA-MoE file."""
from __future__ import annotations

import os

import comfy.utils
from comfy_api.latest import io

from ..moe_core.patch import apply_lora_moe, moe_info
from .common import (CATEGORY, LORA_MOE_CACHE, RoutingIO, as_routing_value, check_choices, header_summary,
                     list_lora_moe_files, node_id, resolve_lora_moe_file)

#: Combo value -> moe_core adapter set name.
ADAPTER_SETS = {"auto": "auto", "high-noise": "high_noise", "low-noise": "low_noise"}
UNCOND = ("same", "off")


class LoadLoRAMoE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("LoadLoRAMoE"),
            display_name="Load LoRA-MoE",
            category=CATEGORY,
            description=(
                "Adds a LoRA mixture-of-experts to a WAN diffusion model: a frozen base LoRA plus instrument "
                "experts whose gates come from the routing input. Use one per DiT in a WAN 2.2 A14B graph."),
            inputs=[
                io.Model.Input("model", tooltip="The WAN diffusion model (UNETLoader output), high-noise or "
                               "low-noise DiT of WAN 2.2 A14B, or a single WAN DiT."),
                io.Combo.Input("lora_moe", options=list_lora_moe_files(),
                               tooltip="LoRA-MoE file (.safetensors) from models/lora_moe, or a LoRA-MoE file "
                               "in models/loras. Build one from plain LoRAs with `python -m moe_core.assemble`."),
                io.Combo.Input("adapter_set", options=list(ADAPTER_SETS), default="auto",
                               tooltip="Which adapter set of the file to use. auto: the file's only set, or the set "
                               "recorded for this model's weights. Choose high-noise / low-noise by hand if auto "
                               "cannot tell (a file built without model fingerprints)."),
                io.Float.Input("alpha_base", default=0.7, min=0.0, max=2.0, step=0.01,
                               tooltip="Strength of the shared base LoRA (always on)."),
                io.Float.Input("alpha_expert", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Strength of the experts; each expert is further scaled by its gate and "
                               "by the timestep band."),
                RoutingIO.Input("routing", optional=True,
                                tooltip="Gates from Prompt→Instrument Router or Gate Override. Not connected: "
                                "experts off, base LoRA only."),
                io.Combo.Input("uncond", options=list(UNCOND), default="same", optional=True,
                               tooltip="Experts on the negative (unconditional) CFG pass: 'same' gates as the "
                               "prompt, or 'off' (base LoRA only there, so CFG pushes toward the experts)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the LoRA-MoE applied.")],
        )

    @classmethod
    def validate_inputs(cls, lora_moe=None, adapter_set=None, uncond=None):
        # Before anything runs: the choices are valid, the file is listed and its header is a LoRA-MoE header
        # (ComfyUI does not check V3 combo values itself). The tensors are checked when the node runs.
        error = check_choices(adapter_set=(adapter_set, ADAPTER_SETS), uncond=(uncond, UNCOND))
        if error:
            return error
        if lora_moe is not None:
            try:
                header_summary(resolve_lora_moe_file(lora_moe))
            except (ValueError, OSError) as e:
                return f"lora_moe: {e}"
        return True

    @classmethod
    def execute(cls, model, lora_moe, adapter_set, alpha_base, alpha_expert, routing=None,
                uncond="same") -> io.NodeOutput:
        error = check_choices(adapter_set=(adapter_set, ADAPTER_SETS), uncond=(uncond, UNCOND))
        if error:
            raise ValueError(error)
        path = resolve_lora_moe_file(lora_moe)
        progress = comfy.utils.ProgressBar(2)
        moe = LORA_MOE_CACHE.get(path)
        progress.update(1)
        value = as_routing_value(routing)
        resolved = value.resolve(moe) if value is not None else None
        patched = apply_lora_moe(model, moe, adapter_set=ADAPTER_SETS[adapter_set], alpha_base=alpha_base,
                                 alpha_expert=alpha_expert, routing=resolved, uncond=uncond)
        progress.update(1)
        info = moe_info(patched)
        gates = resolved.describe() if resolved is not None else "no routing: experts off (base LoRA only)"
        line = (f"{os.path.basename(lora_moe)} [{info.set_name}]: {len(info.weights.modules)} projections, "
                f"experts {', '.join(moe.expert_names)}; {gates}")
        return io.NodeOutput(patched, ui={"text": [line]})
