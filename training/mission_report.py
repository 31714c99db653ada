"""The mission's report: pictures from the run and what they show, as report.md and report.html.

Every number in the report is measured on this run's files: the Router's detections and the Load LoRA-MoE
lines are what the nodes returned, the expert usage is the sampler's own gate computation
(``moe_core.schedule.gates_vs_steps``, i.e. ``GateController``) for each clip's routing, the file's learned
routers, the band and the steps, and pixel differences are computed on the decoded mp4s.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .report import Bullets, Heading, Image, Table, Text, Videos, contact_sheet, expert_usage_picture, read_video
from .report import write_report

DISCLAIMER = ("Tiny random models make no useful videos. The DiTs and the VAE of this demo have random weights, "
              "and small LoRAs were trained for a few dozen steps on a handful of synthetic clips, so the clips "
              "below are coloured noise. What the run shows is that every part of the pipeline works together, "
              "on the same graph and the same kind of files a real run uses.")


def step_gates(routing, moe, schedule_data: dict, split: int, steps: int, shift: float) -> list[list[float]]:
    """Each sampler step's gates of one render of the A14B graph, as its ``GateController`` computed them.

    Steps before ``split`` run on the high-noise DiT with its set's router, the rest on the low-noise DiT with
    its own, the EMA starting afresh at the split (each KSamplerAdvanced is a sampling run of its own); band and
    EMA beta are the Timestep Band nodes' (``schedule_data``: set -> their ``wlm_schedule`` output).
    """
    from moe_core.band import TimestepBand
    from moe_core.routing import LearnedRouter
    from moe_core.schedule import flow_sigmas, gates_vs_steps

    sigmas = flow_sigmas(steps, shift)
    per_step: list[list[float]] = []
    for set_name, rng in (("high_noise", range(0, split)), ("low_noise", range(split, steps))):
        data = schedule_data.get(set_name)
        if data is None or not len(rng):
            continue
        aset = moe.sets[set_name]
        router = LearnedRouter.from_state_dict(aset.router) if aset.router is not None else None
        band = TimestepBand.from_json(data["band"])
        trace = gates_vs_steps(routing, moe.expert_names, band, sigmas,
                               float(data.get("ema_beta", moe.defaults.ema_beta)), router, restart_at=[split],
                               max_gate=moe.defaults.max_gate, clip_level=moe.defaults.clip_level)
        per_step += [trace[i].gates for i in rng]
    return per_step


def clip_usage(clip, lora_moe: Path, expert_names: Sequence[str], split: int, steps: int, shift: float
               ) -> list[float]:
    """Each expert's mean gate over the sampler steps of one rendered clip (band and EMA included)."""
    from moe_core.checkpoint import load_lora_moe
    from moe_core.routing import rule_route

    if clip.spec.experts_off or not clip.router:
        return [0.0] * len(expert_names)
    moe = load_lora_moe(lora_moe)
    ui = clip.router
    routing = rule_route(clip.spec.prompt, expert_names, top_k=int(ui.get("top_k", 2)),
                         temperature=float(ui.get("temperature", 1.0)), mode=ui.get("mode", "rule"),
                         keywords=moe.expert_keywords, fallback="Other" if "Other" in expert_names else "off")
    per_step = step_gates(routing, moe, clip.schedule_data, split, steps, shift)
    if not per_step:
        return [0.0] * len(expert_names)
    return [float(v) for v in np.mean(np.array(per_step), axis=0)]


def _final(metrics: Path) -> dict[str, float]:
    """The last logged value of every loss key of a metrics.jsonl."""
    from .plots import read_metrics

    last: dict[str, float] = {}
    for row in read_metrics(metrics):
        for k, v in row.items():
            if (k == "loss" or k.startswith("loss_")) and isinstance(v, (int, float)) and v == v:
                last[k] = float(v)
    return last


def _copy(src: Path, dst: Path) -> str:
    shutil.copyfile(src, dst)
    return dst.name


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


def write_mission_report(out_dir: Path, *, mc, mode: str, clips: list, settings, split: int,
                         expert_names: Sequence[str], stage1: dict, stage2: dict, data_summary: str,
                         times: dict[str, float], config_text: str, log_fn: Callable[[str], None] = print
                         ) -> tuple[Path, Path]:
    """Pictures (contact sheet, expert usage, copied loss curves and stage-2 pictures) and the report."""
    out_dir = Path(out_dir)
    (out_dir / "config.toml").write_text(config_text, encoding="utf-8")
    decoded = {}
    for c in clips:
        fps, frames = read_video(c.video)
        decoded[c.spec.name] = (fps, frames)
    sheet = contact_sheet([(c.spec.name, decoded[c.spec.name][1]) for c in clips], out_dir / "contact_sheet.png")
    log_fn(f"contact sheet: {sheet}")
    usage = {c.spec.name: clip_usage(c, stage2["lora_moe"], expert_names, split, settings.steps, settings.shift)
             for c in clips}
    usage_png = expert_usage_picture([(n, g) for n, g in usage.items()], expert_names, out_dir / "expert_usage.png",
                                     "expert usage per clip: mean gate over the sampler steps (band and EMA included)")
    pictures = {"loss_stage1.png": p for p in stage1["plots"][:1]}
    for p in stage2["plots"]:
        name = Path(p).name
        pictures[name if name.startswith("stage2_") else f"stage2_{name}"] = Path(p)
    copied = {name: _copy(Path(src), out_dir / name) for name, src in pictures.items() if Path(src).is_file()}

    auto = next((c for c in clips if c.spec.name.endswith("auto_routed")), None)
    off = next((c for c in clips if c.spec.experts_off), None)
    instrument = [c for c in clips if not c.spec.experts_off and c is not auto]
    facts = _facts(clips, decoded, usage, expert_names, instrument, auto, off, stage1, stage2, settings)

    blocks: list = [Text(DISCLAIMER if mc.demo else "A run of the whole pipeline on the models and clips of "
                         f"`{mc.source}`.", note=True),
                    Text(f"Mode: {mode}. Total time {sum(times.values()):.0f} s: "
                         + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ".")]
    blocks += [Heading("What this run shows"), Bullets(tuple(facts))]
    blocks += [Heading("Clips"),
               Text(f"Rendered by the bundled workflow `{Path(mc.own.generate.workflow).name}` in a headless ComfyUI "
                    f"with the trained LoRA-MoE: {settings.width}x{settings.height}, {settings.frames} frames, "
                    f"{settings.steps} steps (high-noise DiT steps 0-{split - 1}, low-noise DiT steps {split}-"
                    f"{settings.steps - 1}, split where t falls below {settings.boundary:g}), shift "
                    f"{settings.shift:g}. The API graph of each clip is in [prompts/](prompts/)."),
               Image(sheet.name, "Contact sheet: one row per clip, evenly spaced frames (enlarged, nearest "
                                 "neighbour)."),
               Videos(tuple((c.spec.name, c.video.name) for c in clips)),
               Table(("clip", "prompt", "routing (Router node)", "mean gates " + " / ".join(expert_names), "time"),
                     tuple((c.spec.name, _clip_prompt(c), _router_text(c),
                            " / ".join(f"{g:.2f}" for g in usage[c.spec.name]), f"{c.seconds:.1f} s")
                           for c in clips))]
    blocks += [Heading("Gates"),
               Image(usage_png.name, "Expert usage: each expert's mean gate over the sampler steps, per clip "
                                     "(the sampler's own gate computation for the clip's routing, the file's "
                                     "learned routers, the band and the EMA).")]
    if auto is not None:
        for set_name, path in sorted(auto.schedules.items()):
            blocks.append(Image(path.name, f"Gate schedule of the auto-routed clip, {set_name} DiT: the Timestep "
                                           "Band node's picture from this run (moe_core.schedule.render_schedule)."))
    blocks += [Heading("Training")]
    if "loss_stage1.png" in copied:
        blocks.append(Image("loss_stage1.png", "Stage 1: flow-matching loss of the base LoRA (total and per DiT)."))
    for name in sorted(n for n in copied if n.startswith("stage2_")):
        blocks.append(Image(name, f"Stage 2: {Path(name).stem[len('stage2_'):].replace('_', ' ')}."))
    blocks += [Heading("Files"),
               Bullets(tuple([f"LoRA-MoE (load it with **Load LoRA-MoE**): `{_rel(stage2['lora_moe'], out_dir)}`"]
                             + [f"stage-1 base LoRA ({k}): `{_rel(v, out_dir)}`" for k, v in stage1["loras"].items()]
                             + [f"metrics: `{_rel(stage1['metrics'], out_dir)}`, "
                                f"`{_rel(stage2['metrics'], out_dir)}`",
                                "the resolved config: [config.toml](config.toml)"])),
               Heading("Data"), Bullets(tuple(" ".join(line.split()) for line in data_summary.splitlines()
                                              if line.strip()))]
    blocks.append(Heading("Workflow values substituted"))
    blocks.append(Text("The graph is the bundled workflow; only these values (and, for the experts-off clip, the "
                       "routing link) differ from the file a user loads:"))
    blocks.append(Bullets(tuple(_common_changes(clips))))
    title = "WAN LoRA-MoE: demo run" if mc.demo else "WAN LoRA-MoE: mission run"
    md, page = write_report(out_dir, title, blocks)
    log_fn(f"report: {page} and {md}")
    return md, page


def _clip_prompt(c) -> str:
    text = c.spec.prompt.replace("\n", " ")
    text = text if len(text) <= 70 else text[:67] + "..."
    return text + ("" if not c.spec.experts_off else " (experts off)")


def _router_text(c) -> str:
    if c.spec.experts_off:
        return "not connected: experts off"
    r = c.router or {}
    return f"{r.get('mode', '?')}: detected {', '.join(r.get('detected', [])) or 'none'}"


def _common_changes(clips: list) -> list[str]:
    seen: list[str] = []
    for c in clips:
        for change in c.changes:
            key = change.split(":")[0]
            if key.startswith("Prompt") or ".value" in key or ".mode" in key or "filename_prefix" in key:
                continue
            if change not in seen:
                seen.append(change)
    seen = [c for c in seen if "routing input disconnected" not in c]
    return seen + ["per clip: the prompt (String node), the Router's mode and the SaveVideo file name"]


def _facts(clips, decoded, usage, expert_names, instrument, auto, off, stage1, stage2, settings) -> list[str]:
    facts = []
    s1 = _final(stage1["metrics"])
    per_dit = ", ".join(f"{k[5:]} {v:.4f}" for k, v in sorted(s1.items()) if k.startswith("loss_"))
    facts.append(f"Stage 1 trained a base LoRA on each DiT of the pair for {stage1['steps']} steps (final losses: "
                 f"{per_dit or 'total ' + format(s1.get('loss', float('nan')), '.4f')}).")
    v = stage2.get("validation")
    s2 = f"Stage 2 trained {len(expert_names)} experts and a learned router per DiT on it for {stage2['steps']} steps"
    if v:
        s2 += (f"; on the held-out clips the loss is {v['val_loss']:.4f} routed and {v['val_loss_base']:.4f} with "
               f"the experts off (the stage-1 model)")
        if v.get("router_agreement") is not None:
            s2 += f"; the learned router agrees with the keyword teacher on {v['router_agreement']:.0%} of them"
    facts.append(s2 + ".")
    right = [c for c, e in zip(instrument, expert_names) if (c.router or {}).get("detected") == [e]]
    facts.append(f"The Router node found the named instrument in {len(right)} of {len(instrument)} instrument "
                 "prompts; in each of those clips that expert has the largest mean gate: "
                 + ("yes" if all(int(np.argmax(usage[c.spec.name])) == expert_names.index(e)
                                 for c, e in zip(instrument, expert_names)) else "no") + ".")
    if auto is not None and off is not None:
        a = decoded[auto.spec.name][1].astype(np.float32)
        o = decoded[off.spec.name][1].astype(np.float32)
        if a.shape == o.shape:
            diff = float(np.abs(a - o).mean())
            facts.append(f"Same prompt and seed with the experts on (auto-routed) and off: the frames differ by "
                         f"{diff:.1f}/255 per pixel on average, so the experts act on the video; with the experts off "
                         f"the base LoRA alone acts (mean gates all 0).")
    fps = sorted({round(decoded[c.spec.name][0], 3) for c in clips})
    counts = sorted({len(decoded[c.spec.name][1]) for c in clips})
    facts.append(f"{len(clips)} mp4s, each {counts[0] if len(counts) == 1 else counts} frames at "
                 f"{fps[0] if len(fps) == 1 else fps} fps, {settings.width}x{settings.height}, rendered by the "
                 "same A14B graph a user loads (both DiTs, both Load LoRA-MoE nodes, the band, the split at the "
                 "boundary).")
    return facts


__all__ = ["DISCLAIMER", "clip_usage", "step_gates", "write_mission_report"]
