"""Loss-curve PNGs drawn with Pillow (ComfyUI's requirements have it; matplotlib is not required).

``plot_metrics(metrics.jsonl, out_dir)`` writes ``loss.png``: the loss of every logged step (light) and its
moving average (dark), one colour per series: the total loss, and for an A14B pair the loss of each DiT.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc, queue = [], 0.0, []
    for v in values:
        queue.append(v)
        acc += v
        if len(queue) > window:
            acc -= queue.pop(0)
        out.append(acc / len(queue))
    return out


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks, v = [], start
    while v <= hi + 1e-12:
        ticks.append(round(v, 12))
        v += step
    return ticks


def draw_curves(series: dict[str, tuple[list[int], list[float]]], path: str | Path, title: str = "training loss",
                size: tuple[int, int] = (900, 520), smooth: int = 10) -> Path:
    """One PNG with each series as raw points (light) and a moving average (solid)."""
    width, height = size
    left, right, top, bottom = 80, 20, 40, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys if y is not None and math.isfinite(y)]
    d.text((left, 12), title, fill="black", font=font)
    if not xs_all or not ys_all:
        d.text((left, height // 2), "no data", fill="black", font=font)
        img.save(path)
        return Path(path)
    x0, x1 = min(xs_all), max(xs_all)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = min(ys_all), max(ys_all)
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    d.rectangle([left, top, width - right, height - bottom], outline="black")
    for ty in _nice_ticks(y0, y1):
        _, yy = px(x0, ty)
        d.line([left, yy, width - right, yy], fill=(230, 230, 230))
        d.text((8, yy - 6), f"{ty:.4g}", fill="black", font=font)
    for tx in _nice_ticks(x0, x1, 6):
        xx, _ = px(tx, y0)
        d.line([xx, height - bottom, xx, height - bottom + 5], fill="black")
        d.text((xx - 10, height - bottom + 8), f"{tx:g}", fill="black", font=font)
    d.text(((width - left) // 2 + left - 20, height - 22), "step", fill="black", font=font)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        light = tuple(int(c + (255 - c) * 0.65) for c in colour)
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if not pts:
            continue
        for x, y in pts:
            cx, cy = px(x, y)
            d.ellipse([cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5], fill=light)
        avg = _moving_average([y for _, y in pts], max(1, min(smooth, len(pts) // 4 or 1)))
        line = [px(x, y) for (x, _), y in zip(pts, avg)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        d.text((width - right - 200, top + 8 + 14 * i), f"-- {name} (moving average of {max(1, min(smooth, len(pts) // 4 or 1))})",
               fill=colour, font=font)
    img.save(path)
    return Path(path)


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """``loss.png`` from a metrics log (total loss, plus one series per DiT of an A14B pair)."""
    rows = read_metrics(metrics_path)
    if not rows:
        return []
    series = {"loss": ([r["step"] for r in rows], [r["loss"] for r in rows])}
    for key in sorted({k for r in rows for k in r if k.startswith("loss_")}):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            series[key[len("loss_"):]] = ([p[0] for p in pts], [p[1] for p in pts])
    return [draw_curves(series, Path(out_dir) / "loss.png")]


__all__ = ["draw_curves", "plot_metrics", "read_metrics"]
