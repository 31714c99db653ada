"""Gate Override: fix the expert gates by hand (one chosen instrument, a weight per expert, or the experts in
turn, one per sampler step)."""
from __future__ import annotations

import math

from comfy_api.latest import io

from ..moe_core.routing import cycle_route, manual_route
from ..moe_core.vocabulary import DEFAULT_EXPERT_NAMES
from .common import (CATEGORY, RoutingIO, RoutingValue, as_routing_value, check_choices, instrument_label,
                     node_id)
from .validation import sibling_values

BY_WEIGHTS = "by weights"
#: The training-free "LoRA Switch" baseline: expert (step mod N) alone at each sampler step.
CYCLE = "cycle per step"
#: Widget id per default expert (ids must be plain identifiers; the labels carry the full names).
WEIGHT_INPUTS = {"Scissors": "scissors", "Hook/Electrocautery": "hook_electrocautery", "Suction": "suction",
                 "Other": "other"}
assert tuple(WEIGHT_INPUTS) == DEFAULT_EXPERT_NAMES


def check_weights(weights: dict[str, float]) -> str | None:
    """The error message for gate weights that cannot be normalised, or None."""
    bad = {k: v for k, v in weights.items() if v is None or not math.isfinite(v) or v < 0}
    if bad:
        return f"gate weights must be finite and >= 0, got {bad}"
    if sum(weights.values()) <= 0:
        return (f"instrument is '{BY_WEIGHTS}' but all four weights are 0: set at least one weight above 0, or "
                "choose one instrument")
    return None


class GateOverride(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        weights = [
            io.Float.Input(wid, display_name=instrument_label(name), default=1.0, min=0.0, max=1.0, step=0.05,
                           tooltip=f"Gate weight of the {name} expert when instrument is '{BY_WEIGHTS}' "
                           "(weights are normalised to sum 1).")
            for name, wid in WEIGHT_INPUTS.items()
        ]
        return io.Schema(
            node_id=node_id("GateOverride"),
            display_name="Gate Override",
            category=CATEGORY,
            description="Fixes the expert gates by hand, replacing what the router detected.",
            inputs=[
                RoutingIO.Input("routing", optional=True,
                                tooltip="Optional: a Router's output whose gates are replaced (its prompt and "
                                "detection stay in the description)."),
                io.Combo.Input("instrument", options=[BY_WEIGHTS, *DEFAULT_EXPERT_NAMES, CYCLE], default=BY_WEIGHTS,
                               tooltip="Force one expert (gate 1, the others 0), use the weights below, or "
                               f"'{CYCLE}': each sampler step gives one expert gate 1, in turn (LoRA Switch)."),
                *weights,
            ],
            outputs=[
                RoutingIO.Output(display_name="routing", tooltip="Connect to Load LoRA-MoE's routing input."),
                io.String.Output(display_name="gates", tooltip="The fixed gates, as text."),
            ],
            hidden=[io.Hidden.unique_id],  # validation reads the weights (validation.py)
        )

    @classmethod
    def _weights(cls, instrument, values: dict[str, float]) -> dict[str, float]:
        if instrument != BY_WEIGHTS:
            return {n: (1.0 if n == instrument else 0.0) for n in DEFAULT_EXPERT_NAMES}
        return {n: values[wid] for n, wid in WEIGHT_INPUTS.items()}

    @classmethod
    def validate_inputs(cls, instrument):
        # One argument, so that ComfyUI shows each problem once, on instrument (see validation.py). ComfyUI
        # itself refuses a weight outside 0..1, on that weight; left here: all four weights zero.
        error = check_choices(instrument=(instrument, (BY_WEIGHTS, *DEFAULT_EXPERT_NAMES, CYCLE)))
        if error or instrument != BY_WEIGHTS:
            return error or True
        values = sibling_values(cls, *WEIGHT_INPUTS.values())
        try:
            weights = {n: float(values[wid]) for n, wid in WEIGHT_INPUTS.items()}
        except (KeyError, TypeError, ValueError):  # linked, or not a number (ComfyUI says so)
            return True
        if any(not 0.0 <= w <= 1.0 for w in weights.values()):  # out of range: ComfyUI says so, on the weight
            return True
        return check_weights(weights) or True

    @classmethod
    def execute(cls, instrument, scissors, hook_electrocautery, suction, other, routing=None) -> io.NodeOutput:
        error = check_choices(instrument=(instrument, (BY_WEIGHTS, *DEFAULT_EXPERT_NAMES, CYCLE)))
        if error:
            raise ValueError(error)
        base = as_routing_value(routing)
        if instrument == CYCLE:
            fixed = cycle_route(base=base.routing if base is not None else None)
        else:
            weights = cls._weights(instrument, {"scissors": scissors, "hook_electrocautery": hook_electrocautery,
                                                "suction": suction, "other": other})
            error = check_weights(weights)
            if error:
                raise ValueError(error)
            fixed = manual_route(weights, base=base.routing if base is not None else None)
        value = RoutingValue(fixed, fallback=base.fallback if base is not None else RoutingValue(fixed).fallback)
        line = fixed.describe()
        return io.NodeOutput(value, line, ui={"text": [line], "wlm_routing": [dict(value.to_ui(), line=line)]})
