"""Clips as a new user brings them: 25/29.97/30 fps, .mp4/.mov/.mkv, a copy cut short, Chinese captions with
a BOM and CRLF line ends, non-square (anamorphic) pixels; written by FFmpeg (imageio-ffmpeg), never by hand.

Oracles: the frames written, the FFmpeg binary's own frame count (``imageio_ffmpeg.count_frames_and_secs``)
and a square-pixel clip of the picture an anamorphic clip displays.
"""
from __future__ import annotations

from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from training.build_manifest import main, scan_clips
from training.data.cache import build_cache, read_cache_metadata
from training.data.manifest import load_manifest, parse_record
from training.data.synthetic import HashTextEncoder, PoolingVideoEncoder, render_clip
from training.data.video_io import ExtractionConfig, Geometry, bucket_size, load_clip, probe_video

CAPTION = "\ufeff腹腔镜手术中，\r\n电凝钩沿组织平面移动并电凝止血。\r\n"  # as Windows Notepad saves it


def write_ffmpeg(path: Path, frames: np.ndarray, fps: float, params: tuple[str, ...] = ()) -> Path:
    """Encode uint8 RGB frames with the FFmpeg binary (H.264, yuv420p); the container comes from the suffix."""
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=2, output_params=list(params), ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def caption(path: Path, text: str = CAPTION) -> None:
    path.with_suffix(".txt").write_bytes(text.encode("utf-8"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("realistic")
    for name, fps, seconds in (("pal.mp4", 25.0, 3.0), ("ntsc.mov", 30000 / 1001, 3.0), ("web.mkv", 30.0, 2.5)):
        clip = render_clip(1, seed=len(name), width=64, height=48, fps=fps, seconds=seconds)
        caption(write_ffmpeg(root / name, clip.frames, fps))
    # 8 s of sensor noise (every frame costs the same bytes), index at the front, then cut at 60%
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 48, 64, 3), dtype=np.uint8)
    full = write_ffmpeg(root / "full.mp4", noise, 25.0, ("-movflags", "+faststart")).read_bytes()
    (root / "cut_short.mp4").write_bytes(full[: int(len(full) * 0.6)])
    (root / "full.mp4").rename(root / "reference_full.bin")  # keep the complete copy out of the scan
    caption(root / "cut_short.mp4")
    write_ffmpeg(root / "uncaptioned.mp4", noise[:60], 25.0)
    return root


def test_frame_rates_containers_and_captions(folder, tmp_path):
    result = scan_clips(folder, tmp_path / "m.jsonl", min_duration=2, max_duration=20)
    kept = {e["source"]: e for e in result.kept}
    assert set(kept) == {"pal.mp4", "ntsc.mov", "web.mkv", "cut_short.mp4"}
    expected = {"pal.mp4": (25.0, 75), "ntsc.mov": (29.97003, 90), "web.mkv": (30.0, 75)}
    for name, (fps, frames) in expected.items():
        entry = kept[name]
        assert entry["fps"] == pytest.approx(fps, abs=1e-4) and entry["num_frames"] == frames
        assert entry["duration"] == pytest.approx(frames / fps, abs=1e-3)
        assert imageio_ffmpeg.count_frames_and_secs(str(folder / name))[0] == frames  # FFmpeg agrees
        assert entry["caption"] == "腹腔镜手术中， 电凝钩沿组织平面移动并电凝止血。"  # no BOM, no CR, one line
    assert result.missing_caption == ["uncaptioned.mp4"]
    assert not result.unreadable and not result.decoder_messages


def test_a_clip_cut_short_is_flagged_with_what_decodes(folder, tmp_path):
    result = scan_clips(folder, tmp_path / "m.jsonl", min_duration=2, max_duration=20)
    (name, line), = result.truncated
    entry = next(e for e in result.kept if e["source"] == "cut_short.mp4")
    decodes = entry["num_frames"]
    by_ffmpeg = imageio_ffmpeg.count_frames_and_secs(str(folder / "cut_short.mp4"))[0]
    assert 100 < decodes < 200 and abs(decodes - by_ffmpeg) <= 2  # OpenCV stops at the first broken frame
    assert probe_video(folder / "cut_short.mp4").num_frames == 200  # what the container (still) claims
    assert name == "cut_short.mp4" and line.startswith(
        f"the container says 200 frames (8.00 s) but only {decodes} decode ({decodes / 25:.2f} s); ffmpeg: ")
    assert "partial file" in line and "\n" not in line and "@ 0x" not in line
    assert entry["duration"] == pytest.approx(decodes / 25)
    # the manifest's count is what decoding really gets
    window = load_clip(folder / "cut_short.mp4", ExtractionConfig(max_frames=81, target_area=64 * 48)).windows[0]
    assert window.source_indices.max() < decodes
    # judged by what decodes: with a 5 s minimum the clip is filtered, and still listed as cut short
    strict = scan_clips(folder, tmp_path / "m.jsonl", min_duration=5, max_duration=20)
    assert dict(strict.filtered)["cut_short.mp4"].startswith("too short")
    assert [n for n, _ in strict.truncated] == ["cut_short.mp4"]


def test_cli_prints_one_line_per_damaged_clip_instead_of_ffmpeg_noise(folder, tmp_path, capfd):
    out = tmp_path / "manifest.jsonl"
    assert main(["--input-dir", str(folder), "--output", str(out)]) == 0
    printed, err = capfd.readouterr()
    assert "[h264 @" not in err and "[mov,mp4" not in err and "@ 0x" not in printed + err
    block = printed.split("cut short (1):\n", 1)[1].splitlines()
    assert block[0].startswith("  - cut_short.mp4: the container says 200 frames") and "ffmpeg: " in block[0]
    assert {Path(r.name).name for r in load_manifest(out)} == {"pal.mp4", "ntsc.mov", "web.mkv", "cut_short.mp4"}


def test_broken_header_is_unreadable_with_ffmpegs_reason(tmp_path):
    clip = write_ffmpeg(tmp_path / "moov_at_end.mp4", render_clip(0, seed=1, width=32, height=32).frames, 16.0)
    clip.write_bytes(clip.read_bytes()[:-200])  # the index (moov) is at the end: cutting it loses the index
    caption(clip)
    result = scan_clips(tmp_path, tmp_path / "m.jsonl")
    (name, reason), = result.unreadable
    assert name == "moov_at_end.mp4" and "ffmpeg: " in reason and "\n" not in reason


# ------------------------------------------------------------------------------------ non-square pixels

@pytest.fixture(scope="module")
def anamorphic(tmp_path_factory):
    """The same picture twice: 128x48 square pixels, and squeezed into 64x48 stored pixels shown 2:1 wide."""
    import cv2

    root = tmp_path_factory.mktemp("sar")
    shown = render_clip(2, seed=4, width=128, height=48, fps=16.0, seconds=1.0)
    squeezed = np.stack([cv2.resize(f, (64, 48), interpolation=cv2.INTER_AREA) for f in shown.frames])
    square = write_ffmpeg(root / "square.mp4", shown.frames, 16.0)
    wide = write_ffmpeg(root / "anamorphic.mp4", squeezed, 16.0, ("-aspect", "8:3"))  # SAR 2:1
    return square, wide, shown


def test_sample_aspect_ratio_is_read_and_honoured(anamorphic):
    square, wide, shown = anamorphic
    info = probe_video(wide)
    assert (info.width, info.height, info.sar, info.display_width) == (64, 48, 2.0, 128)
    config = ExtractionConfig(max_frames=9, target_area=128 * 48)
    got = load_clip(wide, config).windows[0].frames.astype(np.float32)
    want = load_clip(square, config).windows[0].frames.astype(np.float32)
    assert got.shape == want.shape == (9, 48, 128, 3)  # bucketed as the 128x48 picture it shows
    error = np.abs(got - want).mean()
    assert error < 6.0  # the same picture, less the detail the squeeze dropped
    assert np.abs(np.roll(got, 8, axis=2) - want).mean() > 2 * error  # and the comparison can tell pictures apart


def test_pal_geometry_and_boxes_follow_the_display_aspect():
    """720x576 PAL at 4:3 (SAR 16:15) buckets as 768x576; a box drawn in stored pixels lands where it shows."""
    sar = 16 / 15
    assert bucket_size(round(720 * sar), 576) == bucket_size(768, 576)
    geometry = Geometry.for_bucket(720, 576, bucket_size(768, 576, 256 * 192), sar)
    image = np.zeros((576, 720, 3), np.uint8)
    image[200:300, 300:420] = 255
    out = geometry.apply(image)
    ys, xs = np.nonzero(out[..., 0] > 127)
    x0, y0, x1, y1 = geometry.apply_boxes(np.array([[300.0, 200.0, 420.0, 300.0]]))[0]
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1 and abs(ys.min() - y0) <= 1
    assert (x1 - x0) / (y1 - y0) == pytest.approx(120 * sar / 100, rel=0.03)  # displayed proportions kept


def test_cache_entries_record_the_sample_aspect(anamorphic, tmp_path):
    square, wide, _ = anamorphic
    records = [parse_record({"video_path": str(p), "caption": "吸引器吸除积血。", "duration": 1.0, "source": "t"},
                            tmp_path) for p in (square, wide)]
    config = ExtractionConfig(max_frames=9, target_area=128 * 48)
    summary = build_cache(records, tmp_path / "cache", PoolingVideoEncoder(), HashTextEncoder(), config)
    meta = {Path(read_cache_metadata(e.path)["source_path"]).name: read_cache_metadata(e.path)
            for e in summary.entries}
    assert meta["anamorphic.mp4"]["sample_aspect"] == "2" and "sample_aspect" not in meta["square.mp4"]
    assert (meta["anamorphic.mp4"]["width"], meta["anamorphic.mp4"]["height"]) == ("128", "48")
