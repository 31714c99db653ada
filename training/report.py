"""The demo's pictures and its report: a contact sheet of the clips, expert usage, report.md and report.html.

The report is a list of blocks (:class:`Heading`, :class:`Text`, :class:`Bullets`, :class:`Table`,
:class:`Image`, :class:`Videos`) written twice from the same blocks, as Markdown and as a self-contained HTML
page, so the two never say different things. Paths in blocks are relative to the report folder.
Pictures are drawn with Pillow (ComfyUI requires it); videos are read with imageio-ffmpeg.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from moe_core.atomic import atomic_write_text
from moe_core.schedule import EXPERT_COLOURS, default_font, font_for

# ------------------------------------------------------------------------------------------- videos


def read_video(path: str | Path) -> tuple[float, np.ndarray]:
    """(fps, uint8 RGB frames ``[N, H, W, 3]``) of a video file."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    return float(meta["fps"]), np.stack(frames)


def contact_sheet(rows: Sequence[tuple[str, np.ndarray]], path: str | Path, max_frames: int = 9,
                  min_tile_height: int = 72) -> Path:
    """One row per clip (its label, then up to ``max_frames`` evenly spaced frames), saved as PNG.

    Small frames are enlarged by an integer factor (nearest neighbour: pixels stay visible as pixels).
    """
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("contact sheet: no clips")
    h, w = rows[0][1].shape[1:3]
    scale = max(1, -(-min_tile_height // h))
    tw, th = w * scale, h * scale
    label_w, gap, head = 170, 4, 26
    cols = min(max_frames, max(len(f) for _, f in rows))
    width = label_w + cols * (tw + gap) + gap
    height = head + len(rows) * (th + gap) + gap
    sheet = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    font, small = default_font(14), default_font(11)
    picks = {}
    for r, (label, frames) in enumerate(rows):
        n = len(frames)
        idx = np.unique(np.linspace(0, n - 1, min(cols, n)).round().astype(int))
        picks[r] = idx
        y = head + gap + r * (th + gap)
        draw.text((8, y + th // 2 - 8), label, fill=(20, 20, 20), font=font)
        for c, i in enumerate(idx):
            tile = Image.fromarray(frames[i]).resize((tw, th), Image.NEAREST)
            sheet.paste(tile, (label_w + gap + c * (tw + gap), y))
    for c, i in enumerate(picks[0]):
        draw.text((label_w + gap + c * (tw + gap) + 2, 7), f"frame {i}", fill=(90, 90, 90), font=small)
    sheet.save(path)
    return Path(path)


def expert_usage_picture(rows: Sequence[tuple[str, Sequence[float]]], expert_names: Sequence[str],
                         path: str | Path, title: str) -> Path:
    """Horizontal stacked bars: for each clip, each expert's mean gate over the sampler steps."""
    from PIL import Image, ImageDraw

    label_w, bar_w, row_h, top = 170, 520, 30, 44
    width = label_w + bar_w + 90
    height = top + len(rows) * row_h + 70
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    small = default_font(12)
    draw.text((10, 10), title, fill=(20, 20, 20), font=font_for(title, 14))
    x0 = label_w
    for v in (0.0, 0.5, 1.0):
        x = x0 + v * bar_w
        draw.line([x, top - 4, x, top + len(rows) * row_h], fill=(200, 200, 200))
        draw.text((x - 8, top + len(rows) * row_h + 4), f"{v:g}", fill=(90, 90, 90), font=small)
    for r, (label, gates) in enumerate(rows):
        y = top + r * row_h
        draw.text((10, y + 7), label, fill=(20, 20, 20), font=small)
        x = float(x0)
        for e, g in enumerate(gates):
            if g <= 0:
                continue
            draw.rectangle([x, y + 5, x + g * bar_w, y + row_h - 5], fill=EXPERT_COLOURS[e % len(EXPERT_COLOURS)])
            x += g * bar_w
        total = float(sum(gates))
        if total <= 0:
            draw.text((x0 + 6, y + 7), "experts off", fill=(120, 120, 120), font=small)
        draw.text((x0 + bar_w + 8, y + 7), f"sum {total:.2f}", fill=(90, 90, 90), font=small)
    lx, ly = 10, height - 26
    for e, name in enumerate(expert_names):
        colour = EXPERT_COLOURS[e % len(EXPERT_COLOURS)]
        draw.rectangle([lx, ly + 2, lx + 16, ly + 14], fill=colour)
        draw.text((lx + 20, ly), name, fill=(30, 30, 30), font=small)
        lx += 40 + int(draw.textlength(name, font=small))
    img.save(path)
    return Path(path)


# ------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    """A paragraph; `code` spans and [text](link) links are recognised in both outputs."""

    text: str
    note: bool = False  # shown as a highlighted note


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    path: str  # relative to the report folder
    caption: str


@dataclass(frozen=True)
class Videos:
    items: tuple[tuple[str, str], ...]  # (label, relative path)


Block = Union[Heading, Text, Bullets, Table, Image, Videos]

_INLINE = re.compile(r"`([^`]+)`|\[([^\]]+)\]\(([^)\s]+)\)")


def _inline_html(text: str) -> str:
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append(f"<code>{html.escape(m.group(1))}</code>")
        else:
            out.append(f'<a href="{html.escape(m.group(3), quote=True)}">{html.escape(m.group(2))}</a>')
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Text):
            lines += [("> " if b.note else "") + b.text, ""]
        elif isinstance(b, Bullets):
            lines += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            lines.append("|" + "---|" * len(b.header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Image):
            lines += [f"![{b.caption}]({b.path})", "", f"*{b.caption}*", ""]
        elif isinstance(b, Videos):
            lines += [" · ".join(f"[{label}]({p})" for label, p in b.items), ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
.note { background: #fff6d6; border-left: 4px solid #e0b400; padding: .6em .9em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; image-rendering: pixelated; }
figcaption { color: #555; font-size: .9em; }
.videos { display: flex; flex-wrap: wrap; gap: 1em; }
.videos figure { margin: 0; } .videos video { width: 192px; image-rendering: pixelated; background: #000; }
"""


def to_html(title: str, blocks: Sequence[Block]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            parts.append(f'<p class="note">{_inline_html(b.text)}</p>' if b.note else f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            src = html.escape(b.path, quote=True)
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(b.caption, quote=True)}"></a>'
                         f"<figcaption>{_inline_html(b.caption)}</figcaption></figure>")
        elif isinstance(b, Videos):
            items = "".join(
                f'<figure><video src="{html.escape(p, quote=True)}" controls loop muted preload="metadata"></video>'
                f'<figcaption><a href="{html.escape(p, quote=True)}">{html.escape(label)}</a></figcaption></figure>'
                for label, p in b.items)
            parts.append(f'<div class="videos">{items}</div>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(out_dir: str | Path, title: str, blocks: Sequence[Block]) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` in ``out_dir``; every Image/Videos path must exist there."""
    out_dir = Path(out_dir)
    for b in blocks:
        paths = [b.path] if isinstance(b, Image) else [p for _, p in b.items] if isinstance(b, Videos) else []
        for p in paths:
            if not (out_dir / p).is_file():
                raise FileNotFoundError(f"report: {out_dir / p} does not exist")
    md = atomic_write_text(out_dir / "report.md", to_markdown(title, blocks))
    page = atomic_write_text(out_dir / "report.html", to_html(title, blocks))
    return md, page


__all__ = ["Bullets", "Heading", "Image", "Table", "Text", "Videos", "contact_sheet", "expert_usage_picture",
           "read_video", "to_html", "to_markdown", "write_report"]
