"""The evaluation report: ``report.json`` (everything) and ``report.html`` (tables with intervals), atomic.

The HTML is one self-contained page (no script, no external asset) so it opens anywhere; the JSON is the
record a later tool (an ablation runner, a plot) reads. Both are rewritten atomically after each set.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from moe_core.atomic import atomic_write_text

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.ci{color:#666;font-size:.9em}.warn{color:#8a5a00}.err{color:#a00}code{background:#f6f6f6;padding:0 .2em}"""


def _json_default(value: Any):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) >= 1000 or (value != 0 and abs(value) < 0.01) else f"{value:.{digits}f}"


def _cell(entry: dict | None) -> str:
    if not entry:
        return "<td>–</td>"
    value = entry.get("value", entry.get("diff"))
    text = _num(value)
    ci = entry.get("ci")
    if ci:
        text += f' <span class="ci">[{_num(ci[0])}, {_num(ci[1])}]</span>'
    if entry.get("wilson"):
        w = entry["wilson"]
        text += f' <span class="ci">Wilson [{_num(w[0])}, {_num(w[1])}]</span>'
    n = entry.get("n", entry.get("n_pairs"))
    if n is not None:
        text += f' <span class="ci">n={n}</span>'
    return f"<td>{text}</td>"


def _metric_table(title: str, per_set: dict[str, dict]) -> str:
    if not per_set:
        return ""
    columns: list[str] = []
    for values in per_set.values():
        columns.extend(k for k in values if k not in columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = "".join(f'<tr><td class="l">{html.escape(name)}</td>' + "".join(_cell(values.get(c)) for c in columns)
                   + "</tr>" for name, values in per_set.items())
    return f'<h2>{html.escape(title)}</h2><table><tr><th class="l">set</th>{head}</tr>{rows}</table>'


def _identity_html(identity: dict[str, dict]) -> str:
    if not identity:
        return ""
    parts = [_metric_table("Identity (instrument classifier)",
                           {n: {k: v for k, v in e.items() if k in ("accuracy", "balanced_accuracy", "macro_f1")}
                            for n, e in identity.items()})]
    for name, entry in identity.items():
        if "confusion" not in entry:
            parts.append(f"<p>{html.escape(name)}: {html.escape(entry.get('note', ''))}</p>")
            continue
        classes = entry["classes"]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
        rows = "".join(f'<tr><th class="l">{html.escape(classes[i])}</th>' + "".join(f"<td>{v}</td>" for v in row)
                       + "</tr>" for i, row in enumerate(entry["confusion"]))
        parts.append(f"<h3>Confusion matrix: {html.escape(name)} (rows: reference, columns: predicted)</h3>"
                     f'<table><tr><th class="l"></th>{head}</tr>{rows}</table>')
    return "".join(parts)


def _fvd_html(video_quality: dict) -> str:
    parts = []
    for encoder, entry in video_quality.items():
        if not isinstance(entry, dict) or "arms" not in entry:
            continue
        rows = ""
        for arm, values in entry["arms"].items():
            diff = ""
            if "fvd_diff" in values:
                diff = _num(values["fvd_diff"])
                if values.get("fvd_diff_ci"):
                    lo, hi = values["fvd_diff_ci"]
                    diff += f' <span class="ci">[{_num(lo)}, {_num(hi)}]</span>'
            rows += (f'<tr><td class="l">{html.escape(arm)}</td><td>{_num(values["fvd"])}</td><td>{diff}</td>'
                     f'<td>{_num(values["kvd"])} <span class="ci">± {_num(values["kvd_std"])}</span></td></tr>')
        floor = entry.get("floor")
        if floor:
            rows += (f'<tr><td class="l">real vs real (floor, N={floor["n_clips"]})</td>'
                     f'<td>{_num(floor["fvd"])} <span class="ci">± {_num(floor["fvd_sd"])}</span></td><td></td>'
                     f'<td>{_num(floor["kvd"])} <span class="ci">± {_num(floor["kvd_sd"])}</span></td></tr>')
        protocol = entry.get("protocol", {})
        parts.append(f"<h2>Video quality: {html.escape(encoder)} (N = {entry['n_clips']} clips per set, "
                     f"{entry['n_features']} feature vectors, dim {entry['dim']})</h2>"
                     f"<p>{html.escape(str(protocol.get('resize_protocol', '')))}</p>"
                     f'<table><tr><th class="l">set</th><th>FVD</th><th>FVD − reference [paired CI]</th><th>KVD</th></tr>'
                     f"{rows}</table>")
    return "".join(parts)


def _paired_html(paired: dict) -> str:
    parts = []
    for title, entry in paired.items():
        head = f"<h3>{html.escape(title)} (difference arm − reference, paired on {entry['n_pairs']} prompt/seed keys)</h3>"
        if not entry.get("metrics"):
            parts.append(head + f"<p>{html.escape(entry.get('note', 'no shared metric'))}</p>")
            continue
        rows = "".join(f'<tr><td class="l">{html.escape(m)}</td>{_cell(v)}<td>{_num(v.get("p_boot"))}</td></tr>'
                       for m, v in entry["metrics"].items())
        mc = entry.get("mcnemar")
        extra = (f"<p>McNemar (identity): reference-only correct {mc['reference_only_correct']}, arm-only correct "
                 f"{mc['arm_only_correct']}, exact p = {_num(mc['p_value'])}</p>") if mc else ""
        parts.append(head + f'<table><tr><th class="l">metric</th><th>difference [CI]</th><th>bootstrap p</th></tr>'
                            f"{rows}</table>{extra}")
    return ("<h2>Paired comparisons</h2>" + "".join(parts)) if parts else ""


def render_html(report: dict) -> str:
    """The report as one HTML page."""
    sets = "".join(f'<tr><td class="l">{html.escape(n)}</td><td class="l">{html.escape(s["role"])}</td>'
                   f'<td>{s["evaluated"]}/{s["clips"]}</td><td>{html.escape(str(s["size"]))}</td>'
                   f'<td>{_num(s["fps"])}</td><td>{s["num_frames"]}</td>'
                   f'<td class="l">{html.escape(str(s["source"]))}</td></tr>' for n, s in report["sets"].items())
    metrics = report["metrics"]
    body = [f"<h1>Evaluation report{' (partial)' if report.get('partial') else ''}</h1>",
            f"<p>{html.escape(report['created'])}; reference arm: {html.escape(str(report['reference_arm']))}; "
            f"intervals: {int(report['config']['level'] * 100)}% bootstrap clustered by "
            f"{html.escape(report['config']['cluster'])}</p>",
            '<h2>Sets</h2><table><tr><th class="l">set</th><th class="l">role</th><th>clips</th><th>size</th>'
            f'<th>fps</th><th>frames</th><th class="l">source</th></tr>{sets}</table>',
            _fvd_html(metrics.get("video_quality", {})),
            _metric_table("Temporal stability (warped PSNR in dB, motion in px/frame)", metrics.get("temporal", {})),
            _metric_table("Tip localisation", metrics.get("tips", {})),
            _identity_html(metrics.get("identity", {})),
            _paired_html(report.get("paired", {}))]
    if report["warnings"]:
        body.append("<h2>Warnings</h2><ul>" + "".join(f'<li class="warn">{html.escape(w)}</li>'
                                                     for w in report["warnings"]) + "</ul>")
    if report["errors"]:
        body.append("<h2>Errors</h2><ul>" + "".join(f'<li class="err">{html.escape(e["where"])}: '
                                                   f'{html.escape(e["message"])}</li>' for e in report["errors"])
                    + "</ul>")
    body.append("<h2>Protocols</h2><pre>" + html.escape(json.dumps(report["protocols"], indent=2,
                                                                   ensure_ascii=False)) + "</pre>")
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` atomically; returns both paths."""
    out_dir = Path(out_dir)
    clean = _clean(report)
    json_path = atomic_write_text(out_dir / "report.json",
                                  json.dumps(clean, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    html_path = atomic_write_text(out_dir / "report.html", render_html(clean))
    return json_path, html_path


def format_summary(report: dict) -> str:
    """A plain-text summary for the terminal (FVD with its real-vs-real floor, per-set headline metrics)."""
    lines = []
    for encoder, entry in report["metrics"].get("video_quality", {}).items():
        if not isinstance(entry, dict) or "arms" not in entry:
            continue
        lines.append(f"{encoder}: N = {entry['n_clips']} clips per set")
        for arm, v in entry["arms"].items():
            diff = ""
            if v.get("fvd_diff_ci"):
                diff = f"   (vs reference {_num(v['fvd_diff'])} [{_num(v['fvd_diff_ci'][0])}, {_num(v['fvd_diff_ci'][1])}])"
            lines.append(f"  {arm:<20} FVD {_num(v['fvd'])}   KVD {_num(v['kvd'])}{diff}")
        floor = entry.get("floor")
        if floor:
            lines.append(f"  {'real vs real floor':<20} FVD {_num(floor['fvd'])} ± {_num(floor['fvd_sd'])}   "
                         f"KVD {_num(floor['kvd'])}  (N = {floor['n_clips']} per half)")
    for group in ("temporal", "tips", "identity"):
        for name, values in report["metrics"].get(group, {}).items():
            shown = []
            for key in ("warped_psnr", "warped_psnr_roi", "motion_px", "lpips", "detection_rate", "pck@10px", "iou",
                        "accuracy", "balanced_accuracy", "macro_f1"):
                entry = values.get(key)
                if isinstance(entry, dict) and "value" in entry:
                    ci = entry.get("ci")
                    shown.append(f"{key} {_num(entry['value'])}" + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else ""))
            if shown:
                lines.append(f"{group:<9} {name:<20} " + "; ".join(shown))
    for title, entry in report.get("paired", {}).items():
        for key in ("warped_psnr", "accuracy", "detection_rate"):
            v = entry.get("metrics", {}).get(key)
            if v:
                ci = v.get("ci")
                lines.append(f"paired    {title}: {key} {_num(v['diff'])}"
                             + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else ""))
    lines.extend(f"warning: {w}" for w in report["warnings"])
    lines.extend(f"error: {e['where']}: {e['message']}" for e in report["errors"])
    return "\n".join(lines)


__all__ = ["format_summary", "render_html", "write_report"]
