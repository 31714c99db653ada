"""Prompt→Instrument Router: find the instruments a prompt names and turn them into expert gates."""
from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..moe_core.routing import rule_gates, rule_route
from ..moe_core.vocabulary import DEFAULT_EXPERT_NAMES, DEFAULT_FALLBACK, DEFAULT_INSTRUMENTS
from .common import CATEGORY, RoutingIO, RoutingValue, check_choices, node_id

#: Combo value -> moe_core router mode.
MODES = {"rule-based": "rule", "learned-from-file": "learned"}
FALLBACKS = (DEFAULT_FALLBACK, "off", "error")
_KEYWORDS = "; ".join(f"{i.name}: {', '.join(i.keywords[:3])}" for i in DEFAULT_INSTRUMENTS)


class PromptInstrumentRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("PromptRouter"),
            display_name="Prompt→Instrument Router",
            category=CATEGORY,
            description=("Detects the surgical instruments a prompt names (Chinese or English keywords) and "
                         "turns them into expert gates for Load LoRA-MoE."),
            inputs=[
                io.String.Input("prompt", multiline=True, default="",
                                placeholder="电凝钩切割组织。吸引吸血。",
                                tooltip="The video prompt. Connect the same String node that feeds the text "
                                "encoder so both always agree. Keywords: " + _KEYWORDS),
                io.Combo.Input("mode", options=list(MODES), default="rule-based",
                               tooltip="rule-based: gates shared equally among the instruments found. "
                               "learned-from-file: the LoRA-MoE file's trained router refines the rule gates per "
                               "noise level (resolved by Load LoRA-MoE; an error if the file has no router)."),
                io.Int.Input("top_k", default=2, min=1, max=8,
                             tooltip="Keep at most this many experts active (the seeds use 2)."),
                io.Float.Input("temperature", default=1.0, min=0.05, max=10.0, step=0.05,
                               tooltip="Softmax temperature of the router: below 1 sharpens, above 1 flattens "
                               "the gates."),
                io.Combo.Input("no_instrument", options=list(FALLBACKS), default=DEFAULT_FALLBACK, optional=True,
                               tooltip="When the prompt names no known instrument: route to the 'Other' expert, "
                               "turn the experts 'off' (base LoRA only), or stop with an 'error'."),
            ],
            outputs=[
                RoutingIO.Output(display_name="routing", tooltip="Connect to Load LoRA-MoE's routing input."),
                io.String.Output(display_name="detected", tooltip="What was detected and the resulting gates."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode):
        # One argument, so that ComfyUI reports a bad mode once, on mode (see validation.py); a bad
        # no_instrument value (API prompts only) is refused when the node runs.
        return check_choices(mode=(mode, MODES)) or True

    @classmethod
    def execute(cls, prompt, mode, top_k, temperature, no_instrument=DEFAULT_FALLBACK) -> io.NodeOutput:
        error = check_choices(mode=(mode, MODES), no_instrument=(no_instrument, FALLBACKS))
        if error:
            raise ValueError(error)
        routing = rule_route(prompt, DEFAULT_EXPERT_NAMES, fallback=no_instrument,
                             top_k=min(int(top_k), len(DEFAULT_EXPERT_NAMES)), temperature=float(temperature),
                             mode=MODES[mode])
        gates = rule_gates(routing, DEFAULT_EXPERT_NAMES)  # before the band and the EMA
        if int(top_k) > len(DEFAULT_EXPERT_NAMES):  # a file with more experts decides; keep what was asked
            routing = replace(routing, top_k=int(top_k))
        value = RoutingValue(routing, fallback=no_instrument)
        line = routing.describe(gates)
        ui = dict(value.to_ui(), gates=gates, line=line)
        return io.NodeOutput(value, line, ui={"text": [line], "wlm_routing": [ui]})
