"""The gate schedule: each expert's gate against the noise level t and against the sampler's steps.

Pure functions of (band, routing, EMA beta, optional learned router) that reproduce what
`gating.GateController` does during sampling, plus a PNG renderer (Pillow, which ComfyUI already requires).
Used by the Timestep Band node's picture, by the README figure and by tests that compare it with a real
sampling run (`patch.gate_trace`).

The step axis follows ComfyUI's "simple" scheduler on WAN's flow model (`ModelSamplingDiscreteFlow`):
a table of 1000 sigmas ``sigma_i = shift·t_i / (1 + (shift−1)·t_i)`` with ``t_i = i/1000`` (i = 1..1000,
float32 as in ComfyUI), of which step x takes ``table[-(1 + int(x·1000/steps))]``, then a final 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .band import TimestepBand
from .checkpoint import A14B_BOUNDARY
from .gating import GateConfig, GateController, GateSettings, route
from .routing import LearnedRouter, Routing, expert_vector

#: WAN 2.2 A14B text-to-video: the high-noise DiT runs while t >= this, the low-noise DiT below it.
A14B_T2V_BOUNDARY = A14B_BOUNDARY

#: Line colours per expert (RGB), in expert order; repeats for more experts.
EXPERT_COLOURS = ((230, 85, 60), (60, 140, 230), (70, 180, 90), (190, 120, 220), (240, 180, 40), (40, 190, 190))


BAND_FILL, BAND_LINE = (228, 228, 228), (150, 150, 150)


class ScheduleError(ValueError):
    """Invalid steps, shift or scheduler for a schedule picture."""


def flow_sigmas(steps: int, shift: float, scheduler: str = "simple", timesteps: int = 1000) -> list[float]:
    """The ``steps + 1`` sigmas (ending in 0) ComfyUI samples a WAN model with, for ModelSamplingSD3 `shift`."""
    if scheduler != "simple":
        raise ScheduleError(f"only the 'simple' scheduler is modelled, got {scheduler!r}")
    if int(steps) != steps or steps < 1:
        raise ScheduleError(f"steps must be a positive integer, got {steps!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ScheduleError(f"shift must be > 0, got {shift!r}")
    t = (torch.arange(1, timesteps + 1, 1) / timesteps) * 1000  # as ModelSamplingDiscreteFlow.set_parameters
    t = t / 1000
    table = t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)
    ss = len(table) / steps
    return [float(table[-(1 + int(x * ss))]) for x in range(int(steps))] + [0.0]


def gates_vs_t(routing: Routing | None, expert_names: Sequence[str], band: TimestepBand,
               ts: Sequence[float], router: LearnedRouter | None = None, max_gate: float = 1.0,
               clip_level: bool = False) -> tuple[list[list[float]], list[float]]:
    """(gate per t and expert = router gate × band, band factor per t); no EMA (it depends on the steps).

    One batched call of the gate function for all t (the node redraws this on every edit)."""
    factors = [band.factor(float(t)) for t in ts]
    if routing is None:
        raw = [[0.0] * len(expert_names) for _ in ts]
    else:
        w = expert_vector(routing, expert_names)
        settings = GateSettings(temperature=routing.temperature, top_k=routing.top_k, max_gate=max_gate,
                                clip_level=clip_level)
        with torch.no_grad():
            raw = route(w.expand(len(ts), -1), torch.tensor([float(t) for t in ts]), routing.mode, router,
                        settings).gates.tolist()
    return [[g * f for g in row] for row, f in zip(raw, factors)], factors


@dataclass(frozen=True)
class StepGates:
    """The gates of one sampler step, as `GateController` computes them."""

    step: int
    sigma: float
    raw: list[float]
    ema: list[float]
    band: float
    gates: list[float]


def gates_vs_steps(routing: Routing | None, expert_names: Sequence[str], band: TimestepBand,
                   sigmas: Sequence[float], ema_beta: float = 0.9, router: LearnedRouter | None = None,
                   restart_at: Sequence[int] = (), max_gate: float = 1.0, clip_level: bool = False
                   ) -> list[StepGates]:
    """Per-step gates over a schedule (`sigmas` with or without its final 0; steps run at ``sigmas[:-1]``).

    The EMA starts afresh at step 0 and at every step in `restart_at`: each sampler call (each
    KSamplerAdvanced of an A14B split) is a new sampling run for the patched model that it uses.
    """
    if not 0.0 <= ema_beta < 1.0:
        raise ScheduleError(f"ema_beta must be in [0, 1), got {ema_beta}")
    run_sigmas = list(sigmas[:-1]) if len(sigmas) > 1 and float(sigmas[-1]) == 0.0 else list(sigmas)
    # the sampler's own controller, stepped through the schedule: the picture cannot drift from sampling
    ctrl = GateController(expert_names, GateConfig(alpha_base=0.0, alpha_expert=1.0, routing=routing, band=band,
                                                   ema_beta=ema_beta, max_gate=max_gate, clip_level=clip_level),
                          router)
    restarts = set(int(s) for s in restart_at)
    out: list[StepGates] = []
    for i, sigma in enumerate(run_sigmas):
        if i in restarts:
            ctrl.reset()
        ctrl.gains(torch.tensor([float(sigma)]), None)
        e = ctrl.trace[-1]
        out.append(StepGates(i, e["sigma"], e["raw"], e["ema"], e["band"], e["gates"]))
    return out


# ------------------------------------------------------------------------------------------- picture

#: Fonts with Chinese glyphs, tried for text that needs them (the prompts are Chinese; Pillow's own font is
#: Latin only and draws boxes): Debian/Ubuntu (fonts-wqy-zenhei, fonts-noto-cjk), Windows, macOS.
CJK_FONTS = ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
             "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc", "C:/Windows/Fonts/msyh.ttc",
             "/System/Library/Fonts/PingFang.ttc")


def default_font(size: int):
    """Pillow's own font at `size` (Latin only)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def font_for(text: str, size: int):
    """Pillow's default font, or for text with CJK characters the first installed CJK font (else the default)."""
    if any(ord(c) >= 0x2E80 for c in text):
        from PIL import ImageFont

        for path in CJK_FONTS:
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return default_font(size)


def render_schedule(routing: Routing | None, expert_names: Sequence[str], band: TimestepBand, *, steps: int = 20,
                    shift: float = 8.0, ema_beta: float = 0.9, router: LearnedRouter | None = None,
                    boundary: float | None = A14B_T2V_BOUNDARY, title: str | None = None,
                    size: tuple[int, int] = (960, 400), max_gate: float = 1.0, clip_level: bool = False):
    """The gate schedule as an RGB ``PIL.Image``: gates against t (left) and against the steps (right).

    Grey area: the band factor. Coloured: each expert's gate (router gate × band; EMA over the steps on
    the right). The dotted line marks the A14B `boundary` (high-noise DiT left of it on both panels).
    With `routing` None only the band is drawn.
    """
    from PIL import Image, ImageDraw

    width, height = size
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    small = default_font(12)
    names = list(expert_names)
    sigmas = flow_sigmas(steps, shift)
    step_gates = gates_vs_steps(routing, names, band, sigmas, ema_beta, router, max_gate=max_gate,
                                clip_level=clip_level)
    ts = [i / 200 for i in range(201)]
    t_gates, t_band = gates_vs_t(routing, names, band, ts, router, max_gate, clip_level)

    top, bottom = 48, height - 92
    panels = [(56, width // 2 - 16), (width // 2 + 40, width - 20)]
    title = title or "LoRA-MoE gate schedule"
    draw.text((12, 10), title, fill=(20, 20, 20), font=font_for(title, 15))

    def frame(x0: int, x1: int, label: str, xlabel: str) -> None:
        draw.rectangle([x0, top, x1, bottom], outline=(120, 120, 120))
        draw.text((x0, top - 18), label, fill=(40, 40, 40), font=small)
        for v in (0.0, 0.5, 1.0):
            y = bottom - v * (bottom - top)
            draw.line([x0 - 4, y, x0, y], fill=(120, 120, 120))
            draw.text((x0 - 30, y - 7), f"{v:.1f}", fill=(80, 80, 80), font=small)
        draw.text(((x0 + x1) // 2 - 40, bottom + 20), xlabel, fill=(60, 60, 60), font=small)

    def ypix(v: float) -> float:
        return bottom - max(0.0, min(1.0, v)) * (bottom - top)

    def shade(points: list[tuple[float, float]]) -> None:
        """The band factor as a grey area under its curve."""
        if points:
            draw.polygon([(points[0][0], bottom)] + points + [(points[-1][0], bottom)], fill=BAND_FILL)
            draw.line(points, fill=BAND_LINE, width=1)

    def vline(x: float) -> None:
        for y in range(top, bottom, 6):
            draw.line([x, y, x, y + 2], fill=(110, 110, 110))

    def offset(e: int) -> float:
        """Equal gates would hide each other: spread the expert lines by a pixel or two."""
        return (e - (len(names) - 1) / 2) * 2.0

    # Left: against t, noise (t = 1) on the left as sampling runs.
    x0, x1 = panels[0]
    frame(x0, x1, "gate vs noise level t", "t (1 = pure noise  ->  0 = clean)")

    def xt(t: float) -> float:
        return x0 + (1.0 - t) * (x1 - x0)

    for t in (1.0, 0.75, 0.5, 0.25, 0.0):
        draw.text((xt(t) - 10, bottom + 4), f"{t:g}", fill=(80, 80, 80), font=small)
    shade([(xt(t), ypix(f)) for t, f in zip(ts, t_band)])
    if boundary is not None:
        vline(xt(boundary))
        draw.text((xt(boundary) + 3, top + 2), "high | low-noise DiT", fill=(110, 110, 110), font=small)
    if routing is not None:
        for e in range(len(names)):
            colour = EXPERT_COLOURS[e % len(EXPERT_COLOURS)]
            draw.line([(xt(t), ypix(g[e]) + offset(e)) for t, g in zip(ts, t_gates)], fill=colour, width=2)

    # Right: against the steps of this schedule (step lines are held for the duration of the step).
    x0, x1 = panels[1]
    frame(x0, x1, f"gate per step ({steps} steps, simple, shift {shift:g})", "sampler step")
    n = len(step_gates)

    def xs(i: float) -> float:
        return x0 + i / n * (x1 - x0)

    for i in sorted({0, n // 2, n}):
        draw.text((xs(i) - 4, bottom + 4), str(i), fill=(80, 80, 80), font=small)
    band_pts: list[tuple[float, float]] = []
    for s in step_gates:
        band_pts += [(xs(s.step), ypix(s.band)), (xs(s.step + 1), ypix(s.band))]
    shade(band_pts)
    if boundary is not None:
        vline(xs(next((s.step for s in step_gates if s.sigma < boundary), n)))
    if routing is not None:
        for e in range(len(names)):
            colour = EXPERT_COLOURS[e % len(EXPERT_COLOURS)]
            pts: list[tuple[float, float]] = []
            for s in step_gates:
                pts += [(xs(s.step), ypix(s.gates[e]) + offset(e)), (xs(s.step + 1), ypix(s.gates[e]) + offset(e))]
            draw.line(pts, fill=colour, width=2)

    for x0, x1 in panels:
        draw.rectangle([x0, top, x1, bottom], outline=(120, 120, 120))

    # Legend.
    lx, ly = 56, height - 44
    entries = [("band factor", BAND_LINE)]
    if routing is not None:
        entries += [(name, EXPERT_COLOURS[e % len(EXPERT_COLOURS)]) for e, name in enumerate(names)]
    for label, colour in entries:
        draw.line([lx, ly + 8, lx + 22, ly + 8], fill=colour, width=3)
        draw.text((lx + 26, ly), label, fill=(30, 30, 30), font=small)
        lx += 40 + int(draw.textlength(label, font=small))
    draw.text((56, height - 22), f"band: {band.describe()}", fill=(90, 90, 90), font=small)
    return img
