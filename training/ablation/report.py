"""The ablation report: ``report.json`` (everything), ``report.html`` and ``report.md`` (the same blocks).

Sections: the arms and their renders; one table per metric (each arm's value with its interval, and its paired
difference to the reference arm with interval and bootstrap p), read from ``training.evaluation``'s results;
contact sheets and x-t slices at fixed seeds across arms; expert usage and the gate schedules each arm used;
the learned router's top choice against the prompts' instruments. Pages are ``training.report`` blocks, so the
HTML has no script and no external asset.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from moe_core.atomic import atomic_write_text
from moe_core.schedule import flow_sigmas

from ..evaluation.report import _clean, _json_default
from ..report import Bullets, Heading, Image, Table, Text, write_report

REPORT_FORMAT = "wan-lora-moe-ablation"
TITLE = "WAN LoRA-MoE: ablation"


def num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) >= 1000 or (value != 0 and abs(value) < 0.01) else f"{value:.{digits}f}"


def _ci(ci: Sequence[float] | None) -> str:
    return f"[{num(ci[0])}, {num(ci[1])}]" if ci else "–"


def _set_label(name: str, reference: str | None) -> str:
    return "real (ceiling)" if name == "real" else f"{name} (reference)" if name == reference else name


def metric_tables(ev: dict) -> list:
    """One table per metric: rows are the sets, with value, interval, n and the paired difference."""
    blocks: list = []
    ref = ev.get("reference_arm")
    metrics = ev.get("metrics", {})
    paired = ev.get("paired", {})
    level = int(round(100 * ev.get("config", {}).get("level", 0.95)))
    header = ("set", "value", f"{level}% CI", "n", "− reference", f"{level}% CI (paired)", "bootstrap p")
    for group, title in (("temporal", "Temporal stability"), ("tips", "Tip localisation")):
        per_set = metrics.get(group, {})
        names: list[str] = []
        for values in per_set.values():
            names += [k for k in values if k not in names]
        for metric in names:
            rows = []
            for s, values in per_set.items():
                e = values.get(metric)
                if not e:
                    continue
                d = paired.get(f"{s} vs {ref}", {}).get("metrics", {}).get(metric) or {}
                rows.append((_set_label(s, ref), num(e.get("value")), _ci(e.get("ci")), str(e.get("n", "")),
                             num(d.get("diff")) if d else "", _ci(d.get("ci")) if d else "",
                             num(d.get("p_boot")) if d else ""))
            blocks += [Heading(f"{title}: {metric}", 3), Table(header, tuple(rows))]
    identity = metrics.get("identity", {})
    for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
        rows = []
        for s, e in identity.items():
            v = e.get(metric)
            if not v:
                continue
            d = paired.get(f"{s} vs {ref}", {}).get("metrics", {}).get(metric) or {}
            ci = _ci(v.get("ci")) + (f"; Wilson {_ci(v['wilson'])}" if v.get("wilson") else "")
            rows.append((_set_label(s, ref), num(v.get("value")), ci, str(v.get("n", "")),
                         num(d.get("diff")) if d else "", _ci(d.get("ci")) if d else "",
                         num(d.get("p_boot")) if d else ""))
        if rows:
            blocks += [Heading(f"Identity: {metric}", 3), Table(header, tuple(rows))]
    for encoder, entry in metrics.get("video_quality", {}).items():
        if not isinstance(entry, dict) or "arms" not in entry:
            continue
        rows = [(_set_label(a, ref), num(v.get("fvd")), num(v.get("fvd_diff")) if "fvd_diff" in v else "",
                 _ci(v.get("fvd_diff_ci")), f"{num(v.get('kvd'))} ± {num(v.get('kvd_std'))}",
                 _ci(v.get("kvd_diff_ci"))) for a, v in entry["arms"].items()]
        floor = entry.get("floor")
        if floor:
            rows.append((f"real vs real (floor, N={floor['n_clips']})",
                         f"{num(floor['fvd'])} ± {num(floor['fvd_sd'])}",
                         "", "", f"{num(floor['kvd'])} ± {num(floor['kvd_sd'])}", ""))
        blocks += [Heading(f"Video quality: {encoder} (N = {entry['n_clips']} clips per set)", 3),
                   Table(("set", "FVD", "FVD − reference", f"{level}% CI (paired)", "KVD", "KVD − reference CI"),
                         tuple(rows))]
    return blocks


def abbreviations(names: Sequence[str]) -> list[str]:
    """Short unique labels for the expert names (first letters, longer where two would clash)."""
    for n in range(1, max(len(x) for x in names) + 1):
        short = [x[:n] for x in names]
        if len(set(short)) == len(short):
            return short
    return list(names)


def schedule_table(arms: list, per_step: dict[str, list[list[float]]], usage: dict[str, dict], sigmas: list[float],
                   split: int) -> list:
    """The gates each arm used at every sampler step (the steps each DiT actually runs), as a table."""
    rows = []
    names_of = {a: e["experts"] for e in usage.values() for a in e["rows"]}
    for arm in arms:
        gates = per_step.get(arm.name) or []
        short = abbreviations(names_of.get(arm.name, []))
        cells = [", ".join(f"{short[i]} {g:.2f}" for i, g in enumerate(step) if g >= 0.005) or "off"
                 for step in gates]
        rows.append((arm.name, *(cells or ["off"] * len(sigmas))))
    header = ("arm", *(f"{k} (t {sigmas[k]:.3f}, {'high' if k < split else 'low'})" for k in range(len(sigmas))))
    legends = sorted({f"{s} = {n}" for e in usage.values() for s, n in zip(abbreviations(e["experts"]), e["experts"])})
    return [Table(header, tuple(rows)), Text("Experts: " + "; ".join(legends) + ". Each step shows the gates of the "
                                             "DiT that runs it (band, EMA and top-k applied); off: all gates 0.")]


def confusion_blocks(conf: dict) -> list:
    names = conf.get("experts", [])
    if conf.get("note"):
        return [Text(f"No confusion matrix: {conf['note']}.")]
    blocks: list = []
    for title, entry in [(f"{s.replace('_', '-')} DiT (t in {', '.join(num(t, 2) for t in e['levels'])})", e)
                         for s, e in conf["sets"].items()] + [("both DiTs", conf["total"])]:
        rows = tuple((names[i], *(str(v) for v in row), str(sum(row))) for i, row in enumerate(entry["matrix"]))
        agreement = "–" if entry.get("agreement") is None else f"{entry['agreement']:.0%}"
        blocks += [Text(f"{title}: the router's top choice agrees with the prompt's instrument in {agreement} of "
                        f"{entry['n']} (prompt, noise level) pairs."),
                   Table(("prompt's instrument \\ router's top choice", *names, "total"), rows)]
    levels = [e for e in conf.get("per_level", []) if e["n"]]
    if levels:
        blocks.append(Table(("t", "DiT", "agreement", "n"), tuple(
            (num(e["t"], 2), e["set"].replace("_", "-"), "–" if e["agreement"] is None else f"{e['agreement']:.0%}",
             str(e["n"])) for e in levels)))
    if conf.get("excluded_prompts"):
        blocks.append(Text("Left out (no single instrument named, none given in render.instruments): prompts "
                           + ", ".join(f"p{i + 1:02d}" for i in conf["excluded_prompts"]) + "."))
    return blocks


def write_ablation_report(out_dir: Path, *, cfg, arms: list, records: dict[str, dict], stats, evaluation: dict | None,
                          evaluation_error: str | None, usage: dict[str, dict], confusion: dict,
                          sheets: list[tuple[str, int, Path, Path]], schedules: dict[str, dict[str, Path]],
                          per_step: dict[str, list[list[float]]], split: int, settings: dict,
                          config_text: str) -> tuple[Path, Path, Path]:
    """Write report.json, report.html and report.md; returns their paths."""
    out_dir = Path(out_dir)
    rel = lambda p: str(Path(p).relative_to(out_dir))  # noqa: E731
    by_arm: dict[str, list[dict]] = {}
    for rec in records.values():
        by_arm.setdefault(rec["arm"], []).append(rec)
    ref = cfg.ablation.reference
    blocks: list = [
        Text(f"{len(arms)} arms × {len(cfg.render.prompts)} prompts × {len(cfg.render.seeds)} seeds, rendered by "
             f"`{Path(cfg.ablation.workflow).name}` in a headless ComfyUI: {settings.get('width')}x"
             f"{settings.get('height')}, {settings.get('frames')} frames, {settings.get('steps')} steps (high-noise "
             f"DiT steps 0-{split - 1}, low-noise DiT from step {split}), shift {settings.get('shift'):g}. "
             f"This run rendered {stats.rendered} clip(s) and kept {stats.skipped} finished earlier. Clips: "
             "[clips/](clips/) (one folder per arm, each with its API graphs in prompts/); the evaluation's own "
             "report: [evaluation/report.html](evaluation/report.html)."),
        Heading("Arms"),
        Table(("arm", "what it changes", "LoRA-MoE file", "clips", "mean render time"), tuple(
            (a.name + (" (reference)" if a.name == ref else ""), a.what,
             (by_arm.get(a.name) or [{}])[0].get("lora_moe", "–"), str(len(by_arm.get(a.name, []))),
             f"{sum(r['seconds'] for r in by_arm.get(a.name, [])) / max(1, len(by_arm.get(a.name, []))):.1f} s")
            for a in arms)),
        Heading("Metrics"),
    ]
    if evaluation is None:
        blocks.append(Text(f"The evaluation failed: {evaluation_error}", note=True))
    else:
        blocks.append(Text("`training.evaluation` on every arm" + (" and the real clips (the ceiling)"
                                                                   if "real" in evaluation.get("sets", {}) else "")
                           + f"; differences are each arm minus the reference arm `{evaluation.get('reference_arm')}`, "
                             "paired on the same prompts and seeds; intervals are bootstrap intervals clustered by "
                             f"{evaluation.get('config', {}).get('cluster', 'video')}."))
        blocks += metric_tables(evaluation)
        if evaluation.get("warnings"):
            blocks += [Heading("Evaluation warnings", 3), Bullets(tuple(evaluation["warnings"][:30]))]
        if evaluation.get("errors"):
            blocks += [Heading("Evaluation errors", 3),
                       Bullets(tuple(f"{e['where']}: {e['message']}" for e in evaluation["errors"]))]
    blocks.append(Heading("Contact sheets and x–t slices at fixed seeds"))
    for prompt_id, seed, sheet, xt in sheets:
        text = cfg.render.prompts[int(prompt_id[1:]) - 1]
        blocks += [Image(rel(sheet), f"{prompt_id} seed {seed}, one row per arm: “{text[:90]}”"),
                   Image(rel(xt), f"{prompt_id} seed {seed}: x–t slices per arm (row "
                                  f"{cfg.report.slice_row:g} of the height, time downwards).")]
    blocks.append(Heading("Gates"))
    for title, entry in usage.items():
        blocks.append(Image(rel(entry["picture"]), f"Expert usage ({title}): each expert's mean gate over the "
                                                   "sampler steps, averaged over the arm's prompts (band and EMA "
                                                   "included, as the sampler computes them)."))
    blocks.append(Text(f"The gates used at each sampler step (first prompt, seed {cfg.render.seeds[0]}):"))
    blocks += schedule_table(arms, per_step, usage, flow_sigmas(int(settings["steps"]), float(settings["shift"]))[:-1],
                             split)
    for arm in arms:
        for set_name, path in sorted(schedules.get(arm.name, {}).items()):
            blocks.append(Image(rel(path), f"Gate schedule of `{arm.name}`, {set_name.replace('_', '-')} DiT (first "
                                           "prompt; `moe_core.schedule.render_schedule`, the Timestep Band node's "
                                           "picture: its per-step panel runs this DiT's gates over every step)."))
    blocks.append(Heading("Router vs instrument"))
    blocks.append(Text("The learned router of the main LoRA-MoE file: its top choice (before top-k) against the "
                       "instrument each prompt names, over the prompts and noise levels t, each level on the DiT "
                       "that runs it."))
    blocks += confusion_blocks(confusion)
    blocks += [Heading("Config"), Text("The config of this run: [config.toml](config.toml).")]

    atomic_write_text(out_dir / "config.toml", config_text)
    md, page = write_report(out_dir, TITLE, blocks)
    data = {"format": REPORT_FORMAT, "version": 1, "config_source": cfg.source,
            "arms": [dict(a.to_json(), clips=len(by_arm.get(a.name, [])),
                          usage=next((e["rows"][a.name] for e in usage.values() if a.name in e["rows"]), None),
                          expert_names=next((e["experts"] for e in usage.values() if a.name in e["rows"]), None),
                          gate_schedule=per_step.get(a.name), schedule_pictures={k: rel(v) for k, v in
                                                                                 schedules.get(a.name, {}).items()})
                     for a in arms],
            "reference": ref, "render": {"settings": settings, "split": split, "rendered": stats.rendered,
                                         "skipped": stats.skipped, "total": stats.total,
                                         "seconds": round(stats.seconds, 1), "server_start_s": stats.server_start_s},
            "renders": records, "evaluation": evaluation, "evaluation_error": evaluation_error,
            "router_confusion": confusion,
            "pictures": {"sheets": [{"prompt_id": p, "seed": s, "sheet": rel(a), "xt": rel(b)}
                                    for p, s, a, b in sheets],
                         "usage": {k: rel(v["picture"]) for k, v in usage.items()}}}
    js = atomic_write_text(out_dir / "report.json", json.dumps(_clean(data), indent=1, ensure_ascii=False,
                                                               default=_json_default) + "\n")
    return js, page, md


__all__ = ["REPORT_FORMAT", "confusion_blocks", "metric_tables", "write_ablation_report"]
