"""Build a training manifest from a folder of captioned clips.

    python -m training.build_manifest --input-dir data/clips --output data/manifest.jsonl \
        [--min-duration 2 --max-duration 20] [--recursive] [--count-frames]

Each clip (``.mp4 .avi .mov .mkv .webm``) needs a same-named UTF-8 caption ``<stem>.txt``. Optional
sidecars add ROI: ``<stem>.roi.json`` (a list with one ``[x0, y0, x1, y1]`` box or null per frame, or an
object with ``roi_boxes``) or a mask video ``<stem>.mask.<ext>`` (white = ROI). Clips outside the duration
range (the seeds' 2-20 s) are filtered. The manifest is written atomically and a summary names every clip
that was filtered, lacks a caption, cannot be read, or has a broken ROI sidecar, so nothing disappears
silently. Video paths are written relative to the manifest's folder.

The container's frame count is checked by seeking to its last frames (cheap); a clip cut short (an
interrupted copy whose index still reads) is counted by decoding, listed under "cut short" and judged by the
frames that really decode. What FFmpeg prints about a damaged clip is collected and shown as one line per
clip instead of raw decoder messages.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from training.data.manifest import ManifestError, parse_record, write_manifest
from training.data.video_io import VIDEO_EXTENSIONS, VideoReadError, ffmpeg_summary, native_stderr, probe_video

MASK_TAG = ".mask"


@dataclass
class ScanResult:
    """Outcome of scanning a clip folder: kept manifest entries and every rejected clip with its reason."""

    kept: list[dict[str, Any]] = field(default_factory=list)
    filtered: list[tuple[str, str]] = field(default_factory=list)
    missing_caption: list[str] = field(default_factory=list)
    bad_caption: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    bad_roi: list[tuple[str, str]] = field(default_factory=list)
    #: Clips whose stream ends before the container's frame count (also listed as kept or rejected).
    truncated: list[tuple[str, str]] = field(default_factory=list)
    #: FFmpeg's messages about other clips, one line each.
    decoder_messages: list[tuple[str, str]] = field(default_factory=list)

    def format(self) -> str:
        total = (len(self.kept) + len(self.filtered) + len(self.missing_caption) + len(self.bad_caption)
                 + len(self.unreadable) + len(self.bad_roi))
        lines = [f"scanned {total} clip(s): kept {len(self.kept)}"]
        sections = [("filtered by duration", self.filtered), ("unreadable", self.unreadable),
                    ("bad caption", self.bad_caption), ("bad ROI sidecar", self.bad_roi),
                    ("cut short", self.truncated), ("decoder messages", self.decoder_messages)]
        if self.missing_caption:
            lines.append(f"missing caption ({len(self.missing_caption)}):")
            lines.extend(f"  - {name} (no {Path(name).with_suffix('.txt').name})" for name in self.missing_caption)
        for title, items in sections:
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  - {name}: {reason}" for name, reason in items)
        return "\n".join(lines)


def _is_mask(path: Path) -> bool:
    return path.stem.endswith(MASK_TAG)


def find_clips(input_dir: Path, recursive: bool = False) -> list[Path]:
    """Video files under ``input_dir`` (sorted; hidden files and ``*.mask.*`` ROI masks excluded)."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in input_dir.glob(pattern)
                  if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")
                  and not _is_mask(p))


def _read_caption(path: Path) -> str:
    text = path.read_text(encoding="utf-8-sig").strip()
    if not text:
        raise ValueError("caption file is empty")
    return " ".join(text.split())  # one line: JSONL and the tokenizer do not need the line breaks


def _roi_fields(clip: Path) -> dict[str, Any]:
    sidecar = clip.with_name(clip.stem + ".roi.json")
    masks = [clip.with_name(clip.stem + MASK_TAG + ext) for ext in VIDEO_EXTENSIONS]
    masks = [m for m in masks if m.is_file()]
    if sidecar.is_file():
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        boxes = data.get("roi_boxes") if isinstance(data, dict) else data
        return {"roi_boxes": boxes}
    if masks:
        return {"roi_mask": masks[0]}
    return {}


def scan_clips(input_dir: str | Path, output: str | Path, min_duration: float = 2.0, max_duration: float = 20.0,
               recursive: bool = False, count_frames: bool = False) -> ScanResult:
    """Probe every clip in ``input_dir`` and return the manifest entries to keep and the rejects.

    Args:
        output: the manifest path; video paths are made relative to its folder.
        count_frames: decode every clip to count its frames exactly (clips with ROI are always counted,
            because their box lists must match the real frame count).
    """
    input_dir, out_dir = Path(input_dir).absolute(), Path(output).absolute().parent
    result = ScanResult()
    for clip in find_clips(input_dir, recursive):
        name = clip.relative_to(input_dir).as_posix()
        caption_file = clip.with_suffix(".txt")
        if not caption_file.is_file():
            result.missing_caption.append(name)
            continue
        try:
            caption = _read_caption(caption_file)
        except (UnicodeDecodeError, ValueError) as exc:
            reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
            result.bad_caption.append((name, reason))
            continue
        try:
            roi = _roi_fields(clip)
        except (OSError, ValueError) as exc:
            result.bad_roi.append((name, f"cannot read ROI sidecar: {exc}"))
            continue
        messages: list[str] = []
        try:
            with native_stderr(messages):
                info = probe_video(clip, count=count_frames or bool(roi), verify_end=True)
        except VideoReadError as exc:
            ffmpeg = ffmpeg_summary(messages)
            result.unreadable.append((name, exc.reason + (f"; ffmpeg: {ffmpeg}" if ffmpeg else "")))
            continue
        ffmpeg = ffmpeg_summary(messages)
        duration = info.duration
        if info.truncated:
            stated = info.container_frames / info.fps
            result.truncated.append((name, f"the container says {info.container_frames} frames ({stated:.2f} s) "
                                           f"but only {info.num_frames} decode ({duration:.2f} s)"
                                           + (f"; ffmpeg: {ffmpeg}" if ffmpeg else "")))
        elif ffmpeg:
            result.decoder_messages.append((name, f"ffmpeg: {ffmpeg}"))
        if duration < min_duration:
            result.filtered.append((name, f"too short ({duration:.2f} s < {min_duration:g} s)"))
            continue
        if duration > max_duration:
            result.filtered.append((name, f"too long ({duration:.2f} s > {max_duration:g} s)"))
            continue
        entry: dict[str, Any] = {"video_path": _relative(clip, out_dir), "caption": caption,
                                 "duration": round(duration, 4), "source": name, "fps": round(info.fps, 6),
                                 "num_frames": info.num_frames, "width": info.width, "height": info.height}
        if "roi_mask" in roi:
            entry["roi_mask"] = _relative(roi["roi_mask"], out_dir)
        elif "roi_boxes" in roi:
            entry["roi_boxes"] = roi["roi_boxes"]
        try:
            parse_record(entry, out_dir)  # the same validation load_manifest will apply
        except ManifestError as exc:
            result.bad_roi.append((name, f"{exc.field}: {exc.reason}"))
            continue
        result.kept.append(entry)
    return result


def _relative(path: Path, base: Path) -> str:
    import os

    try:
        return os.path.relpath(path, base).replace(os.sep, "/")
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 written, 1 nothing to write)."""
    parser = argparse.ArgumentParser(prog="python -m training.build_manifest", description=__doc__.split("\n")[0])
    parser.add_argument("--input-dir", required=True, type=Path, help="folder of clips with <stem>.txt captions")
    parser.add_argument("--output", required=True, type=Path, help="manifest to write (JSONL)")
    parser.add_argument("--min-duration", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--max-duration", type=float, default=20.0, help="seconds (default 20)")
    parser.add_argument("--recursive", action="store_true", help="also scan sub-folders")
    parser.add_argument("--count-frames", action="store_true",
                        help="decode clips to count frames exactly instead of trusting the container")
    args = parser.parse_args(argv)
    if not args.input_dir.is_dir():
        parser.error(f"--input-dir {args.input_dir} is not a folder")
    if args.min_duration > args.max_duration:
        parser.error("--min-duration is larger than --max-duration")

    result = scan_clips(args.input_dir, args.output, args.min_duration, args.max_duration, args.recursive,
                        args.count_frames)
    print(result.format())
    if not result.kept:
        print(f"no clip kept: {args.output} not written", file=sys.stderr)
        return 1
    path = write_manifest(result.kept, args.output)
    print(f"wrote {len(result.kept)} clip(s) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
