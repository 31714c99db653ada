"""Pictures across arms at a fixed prompt and seed: contact sheets and x-t slices.

A contact sheet has one row per arm (``training.report.contact_sheet``). An x-t slice takes one horizontal
line of pixels through the frame (``report.slice_row`` of the height) and stacks it over time, top to bottom:
motion shows as slanted streaks, flicker as horizontal bands, a frozen clip as vertical lines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from moe_core.schedule import default_font

from ..report import contact_sheet


def xt_slice(frames: np.ndarray, row_fraction: float) -> np.ndarray:
    """``[T, W, 3]``: pixel row ``round(row_fraction * (H - 1))`` of every frame."""
    h = frames.shape[1]
    return frames[:, int(round(row_fraction * (h - 1))), :, :]


def xt_slices_picture(rows: Sequence[tuple[str, np.ndarray]], row_fraction: float, path: str | Path,
                      title: str, min_height: int = 64) -> Path:
    """One x-t slice per arm, side by side with its label (enlarged, nearest neighbour)."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("x-t slices: no clips")
    slices = [(label, xt_slice(frames, row_fraction)) for label, frames in rows]
    t, w = slices[0][1].shape[:2]
    scale_x = max(1, -(-96 // w))
    scale_y = max(1, -(-min_height // t))
    tw, th = w * scale_x, t * scale_y
    gap, head, label_h = 10, 30, 18
    cols = min(len(slices), max(1, 1100 // (tw + gap)))
    grid_rows = -(-len(slices) // cols)
    width = gap + cols * (tw + gap)
    height = head + grid_rows * (label_h + th + gap) + gap
    img = Image.new("RGB", (max(width, 360), height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    font, small = default_font(14), default_font(11)
    draw.text((gap, 8), title, fill=(20, 20, 20), font=font)
    for i, (label, sl) in enumerate(slices):
        r, c = divmod(i, cols)
        x, y = gap + c * (tw + gap), head + r * (label_h + th + gap)
        draw.text((x, y + 2), label[: max(4, tw // 6)], fill=(30, 30, 30), font=small)
        tile = Image.fromarray(np.ascontiguousarray(sl)).resize((tw, th), Image.NEAREST)
        img.paste(tile, (x, y + label_h))
    img.save(path)
    return Path(path)


def fixed_seed_pictures(clips: dict[str, np.ndarray], prompt_id: str, seed: int, row_fraction: float,
                        out_dir: Path) -> tuple[Path, Path]:
    """The contact sheet (one row per arm) and the x-t slices of one prompt at one seed."""
    rows = list(clips.items())
    sheet = contact_sheet(rows, out_dir / f"sheet_{prompt_id}_seed{seed}.png")
    h = next(iter(clips.values())).shape[1]
    xt = xt_slices_picture(rows, row_fraction, out_dir / f"xt_{prompt_id}_seed{seed}.png",
                           f"x-t slices, {prompt_id} seed {seed}: pixel row {int(round(row_fraction * (h - 1)))} "
                           "over time (top: first frame)")
    return sheet, xt


__all__ = ["fixed_seed_pictures", "xt_slice", "xt_slices_picture"]
