"""What a stage-2 run leaves besides the file: the EMA check and the pictures (losses, usage, validation
matrix, learned gate schedules).

EMA check: at inference the gates are EMA-smoothed across sampler steps (β from the file), while training
used the router's gates at each step's own t. For a router whose gates vary with t, the EMA lags behind them.
The check replays the bundled workflow's schedule (20 steps, shift 8, A14B split at the boundary: each
DiT's sampler call restarts the EMA) through the sampler's own gate controller for a one-instrument prompt
per expert, and measures the largest gap between EMA'd and per-step gates. Above ``router.ema_tolerance``
the file's default ``ema_beta`` is written as 0, so the file samples with the gates it was trained with.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from moe_core.band import ALWAYS_ON
from moe_core.routing import rule_route
from moe_core.schedule import flow_sigmas, gates_vs_steps, render_schedule
from moe_core.vocabulary import keywords_for

from .plots import draw_curves, read_metrics

CHECK_STEPS, CHECK_SHIFT = 20, 8.0  # the bundled A14B workflow's schedule


def instrument_prompts(names: list[str], keywords: dict | None) -> dict[str, str]:
    """One prompt per expert: its first keyword (what a user types to ask for that instrument)."""
    kw = keywords_for(names, keywords)
    return {n: kw[n][0] for n in names}


def ema_check(trainer, cfg) -> dict[str, Any]:
    beta = float(trainer.defaults.ema_beta)
    d = trainer.defaults
    out: dict[str, Any] = {"ema_beta": beta, "steps": CHECK_STEPS, "shift": CHECK_SHIFT,
                           "tolerance": cfg.router.ema_tolerance, "instruments": {}}
    if not trainer.routers:
        return {**out, "checked": False, "reason": "no learned router in the file", "max_gap": 0.0,
                "ema_beta_written": beta}
    names = list(trainer.expert_names)
    sigmas = flow_sigmas(CHECK_STEPS, CHECK_SHIFT)[:-1]
    boundary = trainer.dits.boundary
    runs: list[tuple[str, list[float]]] = []
    if boundary is not None and len(trainer.dits.names) > 0 and "default" not in trainer.routers:
        runs = [("high_noise", [s for s in sigmas if s >= boundary]), ("low_noise", [s for s in sigmas if s < boundary])]
    else:
        runs = [(next(iter(trainer.routers)), sigmas)]
    max_gap = 0.0
    for name, prompt in instrument_prompts(names, trainer.expert_keywords).items():
        routing = rule_route(prompt, names, keywords=trainer.expert_keywords, mode="learned", top_k=d.top_k,
                             temperature=d.temperature)
        steps = []
        for set_name, run in runs:
            router = trainer.routers.get(set_name)
            if router is None or not run:
                continue
            router_eval = router.eval()
            for s in gates_vs_steps(routing, names, ALWAYS_ON, run + [0.0], beta, router_eval,
                                    max_gate=d.max_gate, clip_level=d.clip_level):
                gap = max(abs(a - b) for a, b in zip(s.ema, s.raw))
                steps.append({"dit": set_name, "sigma": s.sigma, "raw": s.raw, "ema": s.ema, "gap": gap})
            router.train()
        gap = max((s["gap"] for s in steps), default=0.0)
        max_gap = max(max_gap, gap)
        out["instruments"][name] = {"prompt": prompt, "max_gap": gap, "steps": steps}
    written = 0.0 if (beta > 0 and max_gap > cfg.router.ema_tolerance) else beta
    return {**out, "checked": True, "max_gap": max_gap, "ema_beta_written": written}


def _matrix_picture(validation: dict, path: Path) -> Path:
    """Heatmaps of the held-out loss, forced expert (rows) × clip class (columns), base and routed below: the
    whole frame, and (when the clips have tip boxes) the ROI term, stacked."""
    tiles = [_matrix_tile(validation, kind) for kind in ("plain", "roi") if kind in validation]
    img = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)), "white")
    y = 0
    for tile in tiles:
        img.paste(tile, (0, y))
        y += tile.height
    img.save(path)
    return path


def _matrix_tile(validation: dict, kind: str) -> Image.Image:
    plain = validation[kind]
    experts, classes = validation["experts"], validation["classes"]
    rows = [(f"expert: {e}", plain["matrix"][i]) for i, e in enumerate(experts)]
    rows += [("experts off (stage 1)", plain["base"]), ("routed", plain["routed"])]
    cell_w, cell_h, left, top = 130, 34, 190, 70
    img = Image.new("RGB", (left + cell_w * len(classes) + 20, top + cell_h * len(rows) + 40), "white")
    d = ImageDraw.Draw(img)
    what = "whole frame" if kind == "plain" else "ROI (instrument tip cells)"
    d.text((10, 10), f"held-out flow loss, {what}: forced expert x clip class (lower is better; box = best per "
                     "class)", fill="black")
    values = [v for _, r in rows for v in r]
    lo, hi = min(values), max(values)
    for j, c in enumerate(classes):
        d.text((left + j * cell_w + 6, top - 22), f"class: {c}"[:20], fill="black")
    best = [min(range(len(experts)), key=lambda e: plain["matrix"][e][j]) for j in range(len(classes))]
    for i, (label, vals) in enumerate(rows):
        y = top + i * cell_h
        d.text((8, y + 10), label[:28], fill="black")
        for j, v in enumerate(vals):
            f = 0.0 if hi == lo else (v - lo) / (hi - lo)
            colour = (int(255 * f), int(200 * (1 - f)) + 40, 90)
            x = left + j * cell_w
            d.rectangle([x, y, x + cell_w - 4, y + cell_h - 4], fill=colour)
            if i < len(experts) and best[j] == i:
                d.rectangle([x, y, x + cell_w - 4, y + cell_h - 4], outline="black", width=3)
            d.text((x + 8, y + 10), f"{v:.4f}", fill="white")
    return img


def write_stage2_pictures(trainer, cfg, out_dir: Path, validation: dict | None) -> list[Path]:
    rows = read_metrics(trainer.metrics_path)
    out: list[Path] = []
    if rows:
        series = {}
        for key in ("diffusion_loss", "roi_loss", "teacher_kl", "load_balance", "entropy_hinge", "val_loss"):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                series[key] = ([p[0] for p in pts], [p[1] for p in pts])
        out.append(draw_curves(series, out_dir / "stage2_losses.png", title="stage 2 loss terms"))
        usage = {}
        for name in trainer.expert_names:
            pts = [(r["step"], r[f"usage/{name}"]) for r in rows if f"usage/{name}" in r]
            usage[name] = ([p[0] for p in pts], [p[1] for p in pts])
        out.append(draw_curves(usage, out_dir / "expert_usage.png",
                               title="expert usage per step (share of the gate mass)"))
    if validation is not None and "plain" in validation:
        out.append(_matrix_picture(validation, out_dir / "validation_matrix.png"))
    names = list(trainer.expert_names)
    d = trainer.defaults
    for set_name, router in trainer.routers.items():
        router.eval()
        tiles = []
        for name, prompt in instrument_prompts(names, trainer.expert_keywords).items():
            routing = rule_route(prompt, names, keywords=trainer.expert_keywords, mode="learned", top_k=d.top_k,
                                 temperature=d.temperature)
            tiles.append(render_schedule(routing, names, d.band, steps=CHECK_STEPS, shift=CHECK_SHIFT,
                                         ema_beta=d.ema_beta, router=router,
                                         title=f"learned router ({set_name}), prompt {prompt!r} ({name})",
                                         size=(960, 360), max_gate=d.max_gate, clip_level=d.clip_level,
                                         boundary=trainer.dits.boundary if set_name != "default" else None))
        router.train()
        sheet = Image.new("RGB", (960, 360 * len(tiles)), "white")
        for i, tile in enumerate(tiles):
            sheet.paste(tile, (0, 360 * i))
        path = out_dir / f"gate_schedule_{set_name}.png"
        sheet.save(path)
        out.append(path)
    return out


__all__ = ["ema_check", "instrument_prompts", "write_stage2_pictures"]
