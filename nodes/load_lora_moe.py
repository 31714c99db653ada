"""Load LoRA-MoE: patch a WAN DiT (one of the A14B pair) with a LoRA-MoE file."""
from __future__ import annotations

from dataclasses import replace

import comfy.utils
from comfy_api.latest import io

from ..moe_core.families import ModelFamilyError, family_of_model
from ..moe_core.patch import SET_LABELS, adapter_set_problem, apply_lora_moe, moe_info, select_adapter_set
from .common import (CATEGORY, LORA_MOE_CACHE, RoutingIO, as_routing_value, check_choices, file_signature,
                     header_summary, list_lora_moe_files, named_as, node_id, resolve_lora_moe_file)
from .router import MODES
from .validation import linked_node, sibling_values

#: Combo value -> moe_core adapter set name (the labels are moe_core's, so messages use the same words).
ADAPTER_SETS = {"auto": "auto", **{SET_LABELS[n]: n for n in ("high_noise", "low_noise")}}
UNCOND = ("same", "off")
LEARNED = next(label for label, mode in MODES.items() if mode == "learned")


def _no_router(name: str, set_label: str | None) -> str:
    where = f" for its {set_label} set" if set_label else ""
    return (f"the Router's mode is {LEARNED}, but {name} holds no learned router{where}: set the Router's mode "
            "to rule-based")


def file_problem(name: str | None, adapter_set: str | None = None, learned: bool = False) -> str | None:
    """What is wrong with LoRA-MoE file `name` for this node, from its header alone: not listed, not a
    LoRA-MoE, no such adapter set, 'auto' unable to choose, or no learned router for a Router in
    learned-from-file mode. `adapter_set` and `learned` are checked when known (not linked)."""
    if name is None:  # linked: checked when the node runs
        return None
    try:
        sets = header_summary(resolve_lora_moe_file(name), name)["sets"]
    except (ValueError, OSError) as e:
        return str(e)
    if adapter_set not in ADAPTER_SETS:  # unknown here (linked) or invalid (execute says so)
        return None
    problem = adapter_set_problem(name, {n: s["fingerprint"] for n, s in sets.items()}, ADAPTER_SETS[adapter_set])
    if problem or not learned:
        return problem
    chosen = ADAPTER_SETS[adapter_set]
    if chosen != "auto" and not sets[chosen]["learned_router"]:
        return _no_router(name, adapter_set)
    if chosen == "auto" and not any(s["learned_router"] for s in sets.values()):
        return _no_router(name, None)
    return None


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
            hidden=[io.Hidden.unique_id],  # validation reads this node's other values (validation.py)
        )

    @classmethod
    def validate_inputs(cls, lora_moe):
        # One argument, so that ComfyUI shows each problem once, on lora_moe (validation.py). Before anything
        # runs: the file is listed and its header is a LoRA-MoE header, adapter_set can pick a set of it, and
        # a Router in learned-from-file mode finds a learned router. The tensors are checked when it runs.
        router = linked_node(cls, "routing")
        learned = (router is not None and router.get("class_type") == node_id("PromptRouter")
                   and (router.get("inputs") or {}).get("mode") == LEARNED)
        return file_problem(lora_moe, sibling_values(cls, "adapter_set").get("adapter_set"), learned) or True

    @classmethod
    def fingerprint_inputs(cls, lora_moe=None, **_):
        return file_signature(lora_moe)  # a file replaced under the same name is loaded again

    @classmethod
    def execute(cls, model, lora_moe, adapter_set, alpha_base, alpha_expert, routing=None,
                uncond="same") -> io.NodeOutput:
        error = check_choices(adapter_set=(adapter_set, ADAPTER_SETS), uncond=(uncond, UNCOND))
        if error:
            raise ValueError(error)
        path = resolve_lora_moe_file(lora_moe)
        progress = comfy.utils.ProgressBar(2)
        with named_as(lora_moe, path):  # errors name the file as chosen, never by its server path
            moe = replace(LORA_MOE_CACHE.get(path), source=lora_moe)
            progress.update(1)
            value = as_routing_value(routing)
            resolved = value.resolve(moe) if value is not None else None
            set_name = select_adapter_set(moe, model, ADAPTER_SETS[adapter_set])
            if resolved is not None and resolved.mode == "learned" and moe.sets[set_name].router is None:
                raise ValueError(_no_router(lora_moe, SET_LABELS[set_name] if len(moe.sets) > 1 else None))
            patched = apply_lora_moe(model, moe, adapter_set=set_name, alpha_base=alpha_base,
                                     alpha_expert=alpha_expert, routing=resolved, uncond=uncond)
        progress.update(1)
        info = moe_info(patched)
        gates = resolved.describe() if resolved is not None else "no routing: experts off (base LoRA only)"
        try:
            on = f" on {family_of_model(model.get_model_object('diffusion_model')).title}"
        except (ModelFamilyError, AttributeError):
            on = ""
        line = (f"{lora_moe} [{SET_LABELS.get(info.set_name, info.set_name)}]{on}: {len(info.weights.modules)} "
                f"projections, experts {', '.join(moe.expert_names)}; {gates}")
        return io.NodeOutput(patched, ui={"text": [line]})
