"""Prompt→Instrument Router: find the instruments a prompt names and turn them into expert gates; optionally
(image-to-video) from the start image through a user's TorchScript classifier (``moe_core.image_routing``)."""
from __future__ import annotations

import os
from dataclasses import replace

import folder_paths
from comfy_api.latest import io

from ..moe_core.image_routing import ROUTE_FROM, class_probabilities, image_route, load_classifier
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
                # Appended, all optional: workflows saved before they existed keep working.
                io.Image.Input("image", optional=True,
                               tooltip="Image-to-video: the start image (the IMAGE that feeds WanImageToVideo or "
                               "Wan22ImageToVideoLatent). Used only when route_from is image or prompt+image; its "
                               "first frame is classified."),
                io.Combo.Input("route_from", options=list(ROUTE_FROM), default="prompt", optional=True,
                               tooltip="Where the gates come from: the prompt's keywords, the start image (the "
                               "classifier's softmax(logits / temperature)), or the mean of both; top_k applies "
                               "after."),
                io.String.Input("classifier", default="", optional=True,
                                tooltip="The instrument classifier for image routing: a TorchScript file (absolute "
                                "path, or relative to ComfyUI/models) with attributes class_names (expert names or "
                                "instrument keywords) and input_size. Never downloaded."),
                io.String.Input("classifier_sha256", default="", optional=True,
                                tooltip="The SHA-256 of the classifier file (sha256sum): the file is refused unless "
                                "its bytes match, since a TorchScript file is code."),
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
    def execute(cls, prompt, mode, top_k, temperature, no_instrument=DEFAULT_FALLBACK, image=None,
                route_from="prompt", classifier="", classifier_sha256="") -> io.NodeOutput:
        error = check_choices(mode=(mode, MODES), no_instrument=(no_instrument, FALLBACKS),
                              route_from=(route_from, ROUTE_FROM))
        if error:
            raise ValueError(error)
        k = min(int(top_k), len(DEFAULT_EXPERT_NAMES))
        routing = None
        if route_from != "image":  # the prompt alone, or its half of prompt+image
            routing = rule_route(prompt, DEFAULT_EXPERT_NAMES, fallback=no_instrument, top_k=k,
                                 temperature=float(temperature), mode=MODES[mode])
        if route_from != "prompt":
            if image is None:
                raise ValueError(f"route_from is '{route_from}' but no image is connected: connect the start image "
                                 "(the IMAGE that feeds WanImageToVideo / Wan22ImageToVideoLatent), or set "
                                 "route_from to prompt")
            clf = load_classifier(classifier_path(classifier), classifier_sha256, name=(classifier or "").strip())
            # The temperature acts once: on the classifier's logits for the rule router, inside the learned
            # router (which reads the classifier's own distribution as its teacher, as it reads a prompt's).
            probs = class_probabilities(clf, image, float(temperature) if MODES[mode] == "rule" else 1.0)
            routing = image_route(probs, DEFAULT_EXPERT_NAMES, route_from=route_from, prompt_routing=routing,
                                  top_k=k, temperature=float(temperature), mode=MODES[mode], prompt=prompt or "",
                                  classifier=clf.name)
        gates = rule_gates(routing, DEFAULT_EXPERT_NAMES)  # before the band and the EMA
        if int(top_k) > len(DEFAULT_EXPERT_NAMES):  # a file with more experts decides; keep what was asked
            routing = replace(routing, top_k=int(top_k))
        value = RoutingValue(routing, fallback=no_instrument)
        line = routing.describe(gates)
        ui = dict(value.to_ui(), gates=gates, line=line)
        return io.NodeOutput(value, line, ui={"text": [line], "wlm_routing": [ui]})


def classifier_path(value: str) -> str:
    """The classifier file as given: absolute (or ~), or relative to ComfyUI's models folder."""
    value = (value or "").strip()
    if not value:
        return ""
    path = os.path.expanduser(value)
    return path if os.path.isabs(path) else os.path.join(folder_paths.models_dir, path)
