"""``python -m training.build_manifest``: duration filter, missing/bad captions, unreadable clips, ROI sidecars."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.build_manifest import main, scan_clips
from training.data.manifest import load_manifest
from training.data.synthetic import render_clip, write_clip

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """Clips of 1 s, 3 s (16 fps), 3 s (24 fps, with ROI sidecar) and 21 s (8 fps), plus broken cases."""
    folder = tmp_path_factory.mktemp("raw")
    write_clip(render_clip(0, seed=1, width=32, height=32, seconds=1.0), folder, "short_scissors")
    write_clip(render_clip(1, seed=2, width=32, height=32, seconds=3.0), folder, "ok_hook")
    roi_clip = render_clip(2, seed=3, width=32, height=32, fps=24.0, seconds=3.0)
    write_clip(roi_clip, folder, "ok_suction")
    (folder / "ok_suction.roi.json").write_text(json.dumps(roi_clip.boxes), encoding="utf-8")
    write_clip(render_clip(3, seed=4, width=32, height=32, fps=8.0, seconds=21.0), folder, "long_grasper")
    uncaptioned = write_clip(render_clip(1, seed=5, width=32, height=32, seconds=3.0), folder, "no_caption")
    uncaptioned.with_suffix(".txt").unlink()
    (folder / "corrupt.mp4").write_bytes(b"\x00\x01garbage" * 64)
    (folder / "corrupt.txt").write_text("电凝钩止血。", encoding="utf-8")
    write_clip(render_clip(1, seed=6, width=32, height=32, seconds=3.0), folder, "latin1")
    (folder / "latin1.txt").write_bytes("cautère électrique".encode("latin-1"))
    bad_roi = write_clip(render_clip(2, seed=7, width=32, height=32, seconds=3.0), folder, "bad_roi")
    (folder / "bad_roi.roi.json").write_text(json.dumps([[0, 0, 5, 5]] * 3), encoding="utf-8")  # 3 != 48 frames
    (folder / "notes.txt").write_text("not a caption of anything", encoding="utf-8")
    assert bad_roi.exists()
    return folder


def test_scan_reports_every_rejected_clip_by_name(clip_folder, tmp_path):
    result = scan_clips(clip_folder, tmp_path / "m.jsonl", min_duration=2, max_duration=20)
    assert [e["source"] for e in result.kept] == ["ok_hook.mp4", "ok_suction.mp4"]
    assert dict(result.filtered) == {"long_grasper.mp4": "too long (21.00 s > 20 s)",
                                     "short_scissors.mp4": "too short (1.00 s < 2 s)"}
    assert result.missing_caption == ["no_caption.mp4"]
    assert [n for n, _ in result.unreadable] == ["corrupt.mp4"]
    assert result.bad_caption == [("latin1.mp4", "not UTF-8")]
    assert [n for n, _ in result.bad_roi] == ["bad_roi.mp4"] and "roi_boxes" in result.bad_roi[0][1]
    text = result.format()
    for name in ("long_grasper.mp4", "short_scissors.mp4", "no_caption.mp4", "corrupt.mp4", "latin1.mp4",
                 "bad_roi.mp4"):
        assert name in text


def test_cli_writes_a_loadable_manifest(clip_folder, tmp_path, capsys):
    out = tmp_path / "data" / "manifest.jsonl"
    assert main(["--input-dir", str(clip_folder), "--output", str(out), "--max-duration", "25"]) == 0
    printed = capsys.readouterr().out
    assert "kept 3" in printed and "short_scissors.mp4" in printed and "corrupt.mp4" in printed
    records = load_manifest(out)
    assert [r.name.rsplit("/", 1)[-1] for r in records] == ["long_grasper.mp4", "ok_hook.mp4", "ok_suction.mp4"]
    hook = records[1]
    assert not os.path.isabs(hook.name) and hook.video_path == clip_folder / "ok_hook.mp4"
    assert hook.duration == pytest.approx(3.0) and hook.num_frames == 48 and hook.caption
    suction = records[2]
    assert suction.fps == 24.0 and suction.num_frames == 72 and len(suction.roi_boxes) == 72
    assert [p.name for p in out.parent.iterdir()] == ["manifest.jsonl"]  # no temporary file left


def test_cli_with_nothing_kept_writes_nothing(clip_folder, tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert main(["--input-dir", str(clip_folder), "--output", str(out), "--min-duration", "30",
                 "--max-duration", "40"]) == 1
    assert not out.exists() and "not written" in capsys.readouterr().err


def test_module_entry_point(clip_folder, tmp_path):
    out = tmp_path / "m.jsonl"
    proc = subprocess.run([sys.executable, "-m", "training.build_manifest", "--input-dir", str(clip_folder),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "kept 2" in proc.stdout and out.is_file()
