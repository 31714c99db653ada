"""Timestep Band: where on the noise scale the experts act, on a model that already carries a LoRA-MoE."""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..moe_core.band import ALWAYS_ON, DEFAULT_BAND, BandError, TimestepBand, three_level_band
from ..moe_core.patch import SET_LABELS, boundary_of, moe_info, reconfigure
from ..moe_core.routing import LearnedRouter
from ..moe_core.schedule import flow_sigmas, gates_vs_steps, gates_vs_t, render_schedule
from .common import CATEGORY, node_id
from .validation import sibling_values

PRESETS = ("three-level", "seeds default", "file default", "always on")
#: Points of the t grid sent to the web extension (raw router gates; it multiplies by the band it draws).
UI_GRID = 101


def make_band(preset: str, start: float, mid: float, mid_factor: float, end: float,
              file_default: TimestepBand | None = None) -> TimestepBand:
    if preset == "three-level":
        return three_level_band(start=start, mid=mid, mid_factor=mid_factor, end=end)
    if preset == "seeds default":
        return DEFAULT_BAND
    if preset == "always on":
        return ALWAYS_ON
    if preset == "file default":
        if file_default is None:
            raise BandError("'file default' needs the model's LoRA-MoE file")
        return file_default
    raise BandError(f"preset must be one of {list(PRESETS)}, got {preset!r}")


class TimestepBandNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        t_tip = " (noise level t: 1 = pure noise at the first step, 0 = clean; used by 'three-level' only)"
        return io.Schema(
            node_id=node_id("TimestepBand"),
            display_name="Timestep Band",
            category=CATEGORY,
            description=("Sets where on the noise scale the experts act (the base LoRA is not affected), and "
                         "shows the gate schedule: each expert's gate against t and against the steps."),
            inputs=[
                io.Model.Input("model", tooltip="A model from Load LoRA-MoE (or after it, e.g. ModelSamplingSD3)."),
                io.Combo.Input("preset", options=list(PRESETS), default="three-level",
                               tooltip="three-level: the four values below. seeds default: off below t 0.2, "
                               "50% up to 0.6, full above. file default: the band stored in the LoRA-MoE file. "
                               "always on: experts at full strength at every step."),
                io.Float.Input("start", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Experts are off below this noise level" + t_tip),
                io.Float.Input("mid", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="From start to mid the experts act at mid_factor, from mid to end at full "
                               "strength" + t_tip),
                io.Float.Input("mid_factor", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Expert strength between start and mid" + t_tip),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Experts are off above this noise level" + t_tip),
                io.Int.Input("preview_steps", default=20, min=1, max=200,
                             tooltip="Picture only: the step count to draw the per-step gates for (set it to "
                             "your sampler's steps). Changing it re-runs the nodes after this one."),
                io.Float.Input("preview_shift", default=8.0, min=0.1, max=100.0, step=0.1,
                               tooltip="Picture only: the ModelSamplingSD3 shift of your graph, for the "
                               "per-step axis ('simple' scheduler)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with this band.")],
            hidden=[io.Hidden.unique_id],  # validation reads the other band values (validation.py)
        )

    @classmethod
    def validate_inputs(cls, mid):
        # One argument, so that ComfyUI shows a bad band once (see validation.py), on mid: every ordering
        # rule of the three-level band involves it. ComfyUI itself checks start, mid_factor and end against
        # 0..1; a bad preset (API prompts only) is refused when the node runs.
        if mid is None:
            return True
        if not 0.0 <= mid <= 1.0:
            return f"mid must be between 0 and 1, got {mid}"
        values = sibling_values(cls, "preset", "start", "mid_factor", "end")
        if values.get("preset") != "three-level":
            return True
        try:
            start, mid_factor, end = (float(values[k]) for k in ("start", "mid_factor", "end"))
        except (KeyError, TypeError, ValueError):  # linked, or not a number (ComfyUI says so)
            return True
        if not all(0.0 <= v <= 1.0 for v in (start, mid_factor, end)):  # ComfyUI says so, on that input
            return True
        try:
            three_level_band(start=start, mid=mid, mid_factor=mid_factor, end=end)
        except BandError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, preset, start, mid, mid_factor, end, preview_steps=20,
                preview_shift=8.0) -> io.NodeOutput:
        info = moe_info(model)  # LoraMoEModelError if the model carries no LoRA-MoE
        band = make_band(preset, start, mid, mid_factor, end, info.moe.defaults.band)
        out = reconfigure(model, band=band)
        config = moe_info(out).config
        aset = info.moe.sets[info.set_name]
        router = LearnedRouter.from_state_dict(aset.router) if aset.router is not None else None
        names = info.moe.expert_names
        boundary = boundary_of(out)  # the A14B pair's switch (T2V 0.875, I2V 0.9); None for one DiT
        routing = config.routing
        title = f"{SET_LABELS.get(info.set_name, info.set_name)}: " + (
            routing.describe() if routing is not None else "no routing (experts off)")
        cap = dict(max_gate=config.max_gate, clip_level=config.clip_level)  # the file's gate settings
        picture = render_schedule(routing, names, band, steps=preview_steps, shift=preview_shift,
                                  ema_beta=config.ema_beta, router=router, boundary=boundary, title=title, **cap)
        image = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]
        ts = [i / (UI_GRID - 1) for i in range(UI_GRID)]
        raw_vs_t, _ = gates_vs_t(routing, names, ALWAYS_ON, ts, router, **cap)
        steps = gates_vs_steps(routing, names, band, flow_sigmas(preview_steps, preview_shift), config.ema_beta,
                               router, **cap)
        data = {"experts": list(names), "band": band.to_json(), "band_text": band.describe(),
                "ema_beta": config.ema_beta, "set": info.set_name, "boundary": boundary,
                "routing": routing.describe() if routing is not None else None,
                "raw_vs_t": raw_vs_t, "step_gates": [s.gates for s in steps]}
        # The picture is saved like a preview image, but under its own key: the web extension draws the same
        # schedule live on the node, so the front end need not show it twice. API users find it in /history.
        picture_file = ui.PreviewImage(image, cls=cls).as_dict()["images"]
        return io.NodeOutput(out, ui={"wlm_schedule": [data], "wlm_schedule_image": picture_file,
                                      "text": [band.describe()]})
