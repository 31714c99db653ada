"""The gates behind each arm: per-step gates and expert usage, gate-schedule pictures, router confusion.

All of it is the sampler's own gate computation (``moe_core.schedule.gates_vs_steps``, i.e. ``GateController``)
for the routing each arm ran with, the file's learned routers and the band and EMA that the Timestep Band
nodes reported for the render (``training.mission_report.step_gates``): no second copy of the gate maths.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from moe_core.band import TimestepBand
from moe_core.checkpoint import LoraMoE
from moe_core.gating import GateSettings, route
from moe_core.routing import LearnedRouter, expert_vector, rule_route
from moe_core.schedule import render_schedule

from ..generate import boundary_step
from ..mission_report import step_gates
from .arms import Arm, arm_routing
from .files import A14B_SETS


def render_steps(record: dict, boundary: float) -> tuple[int, float, int]:
    """(steps, shift, split) of a finished render."""
    s = record["settings"]
    return int(s["steps"]), float(s["shift"]), boundary_step(int(s["steps"]), float(s["shift"]), boundary)


def arm_usage(arm: Arm, records: Sequence[dict], moe: LoraMoE, boundary: float) -> list[float]:
    """Each expert's mean gate over the sampler steps, averaged over the arm's renders (0 with experts off)."""
    rows = []
    for rec in records:
        routing = arm_routing(arm, rec["prompt"], moe, rec.get("router"))
        if routing is None:
            rows.append([0.0] * moe.num_experts)
            continue
        steps, shift, split = render_steps(rec, boundary)
        per_step = step_gates(routing, moe, rec.get("schedule_data") or {}, split, steps, shift)
        rows.append(np.mean(np.array(per_step), axis=0).tolist() if per_step else [0.0] * moe.num_experts)
    return [float(v) for v in np.mean(np.array(rows), axis=0)] if rows else [0.0] * moe.num_experts


def per_step_table(arm: Arm, record: dict, moe: LoraMoE, boundary: float) -> list[list[float]]:
    """The gates of every step of one render (the schedule the arm used)."""
    routing = arm_routing(arm, record["prompt"], moe, record.get("router"))
    if routing is None:
        return []
    steps, shift, split = render_steps(record, boundary)
    return step_gates(routing, moe, record.get("schedule_data") or {}, split, steps, shift)


def schedule_pictures(arm: Arm, record: dict, moe: LoraMoE, boundary: float, out_dir: Path) -> dict[str, Path]:
    """The gate schedule of one render per DiT (``render_schedule``: the Timestep Band node's picture)."""
    routing = arm_routing(arm, record["prompt"], moe, record.get("router"))
    if routing is None:
        return {}
    steps, shift, _ = render_steps(record, boundary)
    out = {}
    for set_name in A14B_SETS:
        data = (record.get("schedule_data") or {}).get(set_name)
        if data is None:
            continue
        aset = moe.sets[set_name]
        router = LearnedRouter.from_state_dict(aset.router) if aset.router is not None else None
        title = f"{arm.name}, {set_name.replace('_', '-')} DiT: {arm.what}"
        img = render_schedule(routing, moe.expert_names, TimestepBand.from_json(data["band"]), steps=steps,
                              shift=shift, ema_beta=float(data.get("ema_beta", moe.defaults.ema_beta)), router=router,
                              boundary=boundary, title=title if len(title) <= 105 else title[:102] + "...",
                              size=(900, 360))
        path = out_dir / f"schedule_{arm.name}_{set_name}.png"
        img.save(path)
        out[set_name] = path
    return out


def router_confusion(moe: LoraMoE, prompts: Sequence[str], instruments: Sequence[str | None], levels: int,
                     boundary: float) -> dict:
    """The learned router's top choice against each prompt's instrument, over prompts and noise levels.

    Noise levels t are ``levels`` points evenly over [0, 1]; each goes to the DiT that runs it (high-noise set
    for t >= boundary). Rows: the prompt's instrument; columns: the router's top choice (argmax of its
    probabilities, before top-k). Prompts without one known instrument are left out and listed.
    """
    names = list(moe.expert_names)
    n = len(names)
    ts = [i / (levels - 1) for i in range(levels)]
    out: dict = {"experts": names, "levels": ts, "sets": {}, "excluded_prompts": [], "per_level": []}
    if any(moe.sets[s].router is None for s in A14B_SETS):
        out["note"] = "the file has no learned router in both sets"
        return out
    usable = []
    for i, (p, inst) in enumerate(zip(prompts, instruments)):
        if inst is None or inst not in names:
            out["excluded_prompts"].append(i)
        else:
            usable.append((p, names.index(inst)))
    total = np.zeros((n, n), int)
    per_level: dict[float, list[int]] = defaultdict(lambda: [0, 0])
    d = moe.defaults
    settings = GateSettings(temperature=d.temperature, top_k=n, max_gate=1.0, clip_level=d.clip_level)
    for set_name in A14B_SETS:
        router = LearnedRouter.from_state_dict(moe.sets[set_name].router)
        mine = [t for t in ts if (t >= boundary) == (set_name == "high_noise")]
        cm = np.zeros((n, n), int)
        for prompt, label in usable:
            teacher = expert_vector(rule_route(prompt, names, keywords=moe.expert_keywords,
                                               fallback="Other" if "Other" in names else "off"), names)
            if not mine or float(teacher.sum()) <= 0:
                continue
            probs = route(teacher[None].expand(len(mine), -1), torch.tensor(mine), "learned", router, settings).probs
            for t, top in zip(mine, probs.argmax(-1).tolist()):
                cm[label, top] += 1
                per_level[t][0] += int(top == label)
                per_level[t][1] += 1
        total += cm
        out["sets"][set_name] = {"matrix": cm.tolist(), "n": int(cm.sum()),
                                 "agreement": float(np.trace(cm) / cm.sum()) if cm.sum() else None,
                                 "levels": mine}
    out["total"] = {"matrix": total.tolist(), "n": int(total.sum()),
                    "agreement": float(np.trace(total) / total.sum()) if total.sum() else None}
    out["per_level"] = [{"t": t, "set": "high_noise" if t >= boundary else "low_noise",
                         "agreement": per_level[t][0] / per_level[t][1] if per_level[t][1] else None,
                         "n": per_level[t][1]} for t in ts]
    return out


__all__ = ["arm_usage", "per_step_table", "render_steps", "router_confusion", "schedule_pictures"]
