"""Manifest loading: every line validated, errors name the file, line and field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data.manifest import ClipRecord, ManifestError, load_manifest, write_manifest


def _line(**overrides):
    obj = {"video_path": "clips/a.mp4", "caption": "电凝钩电凝止血。", "duration": 3.0, "source": "case01"}
    obj.update(overrides)
    return {k: v for k, v in obj.items() if v is not ...}


def _write(path: Path, lines) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
                    encoding="utf-8")
    return path


def test_valid_manifest_resolves_relative_paths_and_keeps_extras(tmp_path):
    manifest = _write(tmp_path / "m.jsonl", [
        _line(),
        "",  # blank lines are ignored
        _line(video_path="clips/b.mp4", instrument_label=2, roi_boxes=[[1, 2, 3, 4], None], num_frames=2,
              fps=16, width=96),
        _line(video_path="/abs/c.mp4", roi_mask="masks/c.mask.mp4"),
    ])
    records = load_manifest(manifest, check_files=False)
    assert [r.line for r in records] == [1, 3, 4]
    a, b, c = records
    assert a.video_path == tmp_path / "clips" / "a.mp4" and a.name == "clips/a.mp4"
    assert a.instrument_label is None and a.roi_boxes is None
    assert b.instrument_label == 2 and b.roi_boxes == ((1.0, 2.0, 3.0, 4.0), None) and b.extra == {"width": 96}
    assert c.video_path == Path("/abs/c.mp4") and c.roi_mask == tmp_path / "masks" / "c.mask.mp4"
    assert b.where == f"{manifest}:3"


@pytest.mark.parametrize("bad_line, line_no, field, message", [
    ('{"video_path": "a.mp4", "caption": "x"', 2, None, "invalid JSON"),
    (_line(caption=...), 2, "caption", "missing required field"),
    (_line(duration=...), 2, "duration", "missing required field"),
    (_line(caption="  "), 2, "caption", "non-empty"),
    (_line(duration=-1), 2, "duration", "positive"),
    (_line(duration="3s"), 2, "duration", "positive"),
    (_line(source=5), 2, "source", "string"),
    (_line(instrument_label=4), 2, "instrument_label", "out of range 0..3"),
    (_line(instrument_label=True), 2, "instrument_label", "integer"),
    (_line(instrument_label="Hook"), 2, "instrument_label", "integer"),
    (_line(roi_boxes=[[1, 2, 3, 4]] * 3, num_frames=4), 2, "roi_boxes", "has 3 entries but the clip has num_frames=4"),
    (_line(roi_boxes=[[1, 2, 3]]), 2, "roi_boxes", "frame 0"),
    (_line(roi_boxes=[None, [5, 5, 2, 9]]), 2, "roi_boxes", "frame 1: box .* is empty"),
    (_line(roi_boxes=[[0, 0, 1, 1]], roi_mask="m.mp4"), 2, "roi_boxes", "not both"),
    (_line(roi_mask=""), 2, "roi_mask", "path"),
    (_line(num_frames=0), 2, "num_frames", "positive integer"),
    ('[1, 2]', 2, None, "expected a JSON object"),
    (_line(video_path="clips/ok.mp4"), 2, "video_path", "already listed on line 1"),
])
def test_errors_name_file_line_and_field(tmp_path, bad_line, line_no, field, message):
    manifest = _write(tmp_path / "bad.jsonl", [_line(video_path="clips/ok.mp4"), bad_line])
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(manifest, check_files=False)
    err = info.value
    assert err.path == manifest and err.line == line_no and err.field == field
    text = str(err)
    assert text.startswith(f"{manifest}:{line_no}")
    if field:
        assert f"field '{field}'" in text


def test_empty_manifest_and_missing_file_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="empty"):
        load_manifest(empty)
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "nope.jsonl")


def test_check_files_reports_missing_clip_with_line(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"x")
    manifest = _write(tmp_path / "m.jsonl", [_line(), _line(video_path="clips/gone.mp4")])
    with pytest.raises(ManifestError, match="file not found") as info:
        load_manifest(manifest)
    assert info.value.line == 2 and info.value.field == "video_path"


def test_custom_expert_count_changes_label_range(tmp_path):
    manifest = _write(tmp_path / "m.jsonl", [_line(instrument_label=2)])
    with pytest.raises(ManifestError, match="out of range 0..1"):
        load_manifest(manifest, expert_names=("A", "B"), check_files=False)


def test_write_roundtrip_is_atomic_and_relative(tmp_path, monkeypatch):
    manifest = _write(tmp_path / "in.jsonl", [_line(roi_boxes=[[0, 0, 2, 2], None], instrument_label=1)])
    records = load_manifest(manifest, check_files=False)
    out = tmp_path / "sub" / "out.jsonl"
    write_manifest(records, out)
    text = out.read_text(encoding="utf-8")
    assert "电凝钩" in text and '"../clips/a.mp4"' in text  # Chinese kept readable, path relative to out/
    again = load_manifest(out, check_files=False)
    assert [(r.video_path, r.caption, r.roi_boxes, r.instrument_label) for r in again] == \
           [(r.video_path, r.caption, r.roi_boxes, r.instrument_label) for r in records]

    # a failure while writing leaves the previous manifest untouched and no temporary file behind
    import moe_core.atomic as atomic

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_manifest([ClipRecord(video_path=tmp_path / "x.mp4", caption="c", duration=1.0, source="s",
                                   name="x.mp4")], out)
    assert out.read_text(encoding="utf-8") == text
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]
    with pytest.raises(ManifestError, match="empty"):
        write_manifest([], tmp_path / "never.jsonl")
    assert not (tmp_path / "never.jsonl").exists()
