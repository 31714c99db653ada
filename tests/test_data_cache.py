"""Latent/text cache: reuse, invalidation of exactly what changed (counted encoder calls), atomic writes,
corrupt clips skipped and reported. Encoders are the cheap stand-ins from ``training.data.synthetic``;
the real ComfyUI VAE is exercised in ``test_data_comfy_vae.py``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data.cache import (CacheSummary, build_cache, prepare_dataset, read_cache_metadata,
                                 roi_to_latent_grid)
from training.data.manifest import load_manifest, write_manifest
from training.data.synthetic import (HashTextEncoder, PoolingVideoEncoder, make_synthetic_dataset, render_clip,
                                     write_clip)
from training.data.video_io import ExtractionConfig

CONFIG = ExtractionConfig(mode="uniform", num_windows=2, max_frames=17, target_area=64 * 64)


@pytest.fixture(scope="module")
def _rendered(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("template"), n_per_class=1, seed=3, width=64,
                                  height=64).parent


@pytest.fixture
def dataset(_rendered, tmp_path) -> Path:
    """A private copy of 4 clips (one per expert), 64x64, 2 s at 16 fps, with ROI boxes: 2 windows of 17
    frames each. Rendered once per module; each test may change its copy."""
    shutil.copytree(_rendered, tmp_path / "data")
    return tmp_path / "data" / "manifest.jsonl"


def _build(manifest: Path, cache: Path, config: ExtractionConfig = CONFIG, video=None, text=None
           ) -> tuple[CacheSummary, PoolingVideoEncoder, HashTextEncoder]:
    video = video or PoolingVideoEncoder()
    text = text or HashTextEncoder()
    summary = build_cache(load_manifest(manifest), cache, video, text, config)
    return summary, video, text


def _files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file())


def _bump(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def test_reuse_and_invalidation_recompute_only_what_changed(dataset, tmp_path):
    cache = tmp_path / "cache"
    summary, video, text = _build(dataset, cache)
    assert (video.calls, text.calls) == (8, 4)
    assert (summary.computed, summary.reused, summary.text_computed, summary.windows) == (8, 0, 4, 8)
    assert len(_files(cache)) == 12

    summary, video, text = _build(dataset, cache)  # nothing changed: nothing encoded
    assert (video.calls, text.calls) == (0, 0) and (summary.reused, summary.text_reused) == (8, 4)

    records = load_manifest(dataset)
    write_clip(render_clip(1, seed=99, width=64, height=64), records[1].video_path.parent,
               records[1].video_path.stem)  # new content for the hook clip
    _bump(records[1].video_path)
    _bump(records[2].video_path)  # same bytes, newer mtime: also recomputed
    summary, video, text = _build(dataset, cache)
    assert (video.calls, text.calls) == (4, 0) and (summary.computed, summary.reused) == (4, 4)

    lines = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines()]
    lines[0]["caption"] = "剪刀剪断系膜。"
    write_manifest(lines, dataset)
    summary, video, text = _build(dataset, cache)
    assert (video.calls, text.calls) == (0, 1) and (summary.text_computed, summary.text_reused) == (1, 3)

    other = ExtractionConfig(mode="head", max_frames=9, target_area=64 * 64)
    summary, video, _ = _build(dataset, cache, other)
    assert video.calls == 4 and summary.windows == 4  # new settings: one head window per clip
    summary, video, _ = _build(dataset, cache)  # the first settings' files are still there
    assert video.calls == 0 and summary.reused == 8

    summary, video, _ = _build(dataset, cache, video=PoolingVideoEncoder(identity="another-vae", seed=1))
    assert video.calls == 8  # another encoder identity never reuses latents


def test_cached_tensors_and_metadata(dataset, tmp_path):
    summary, _, _ = _build(dataset, tmp_path / "cache")
    entry = summary.entries[0]
    tensors = entry.load()
    assert tensors["latent"].shape == (16, 5, 8, 8) and tensors["latent"].dtype == torch.float32
    assert tensors["roi_boxes"].shape == (17, 4) and tensors["roi_latent"].shape == (5, 8, 8)
    assert tensors["source_indices"].tolist() == list(range(17))
    meta = read_cache_metadata(entry.path)
    st = entry.record.video_path.stat()
    assert meta["source_path"] == str(entry.record.video_path)
    assert meta["source_size"] == str(st.st_size) and meta["source_mtime_ns"] == str(st.st_mtime_ns)
    assert meta["format_version"] == "1" and meta["video_encoder"] == "pooling-vae-v1"
    assert json.loads(meta["settings"])["extraction"]["max_frames"] == 17
    assert (entry.window_index, entry.start, entry.num_frames, entry.bucket) == (0, 0, 17, (64, 64))
    assert summary.entries[1].start == 15


def test_roi_latent_grid_pools_space_and_groups_time():
    mask = np.zeros((9, 16, 16), np.float32)
    mask[0, :8, :8] = 1.0  # frame 0 -> latent frame 0, top-left cell
    mask[3, 8:, 8:] = 1.0  # frame 3 -> latent frame 1 (frames 1-4), bottom-right cell
    mask[6, 8:12, :8] = 1.0  # frame 6 -> latent frame 2 (frames 5-8), half of the bottom-left cell
    grid = roi_to_latent_grid(mask, (16, 3, 2, 2))
    expected = np.zeros((3, 2, 2), np.float32)
    expected[0, 0, 0], expected[1, 1, 1], expected[2, 1, 0] = 1.0, 1.0, 0.5
    np.testing.assert_allclose(grid, expected)


def test_window_roi_sits_on_the_tip(dataset, tmp_path):
    summary, _, _ = _build(dataset, tmp_path / "cache")
    for entry in summary.entries:
        tensors = entry.load()
        roi, boxes = tensors["roi_latent"], tensors["roi_boxes"]
        x0, y0, x1, y1 = boxes[0].tolist()
        cy, cx = int((y0 + y1) / 2) // 8, int((x0 + x1) / 2) // 8
        assert roi[0, cy, cx] > 0.5 and 0 < roi[0].mean() < 0.5


def test_stale_windows_are_removed_when_a_clip_gets_shorter(dataset, tmp_path):
    config = ExtractionConfig(mode="sliding", stride=4, max_frames=17, target_area=64 * 64)
    cache = tmp_path / "cache"
    summary, _, _ = _build(dataset, cache, config)
    assert summary.windows == 16  # 32 frames: starts 0, 4, 8, 12
    records = load_manifest(dataset)
    path = records[0].video_path
    write_clip(render_clip(0, seed=5, width=64, height=64, seconds=1.5), path.parent, path.stem)  # 24 frames
    lines = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines()]
    del lines[0]["roi_boxes"], lines[0]["num_frames"]
    write_manifest(lines, dataset)
    summary, video, _ = _build(dataset, cache, config)
    assert video.calls == 2 and summary.removed_stale == 2 and summary.windows == 14
    assert len(list(next(summary.entries[0].path.parent.glob("*")).parent.glob("*.safetensors"))) == 2


class _FailingEncoder(PoolingVideoEncoder):
    def __init__(self, fail_on: int):
        super().__init__()
        self.fail_on = fail_on

    def __call__(self, frames):
        if self.calls + 1 == self.fail_on:
            self.calls += 1
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().__call__(frames)


def test_encoder_exception_leaves_no_partial_file_and_the_rerun_resumes(dataset, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated"):
        _build(dataset, cache, video=_FailingEncoder(fail_on=3))
    written = _files(cache)
    assert len(written) == 3  # two complete windows of the first clip, and its caption's text file
    assert not [p for p in written if ".tmp" in p.name]
    assert all(read_cache_metadata(p) is not None for p in written)
    summary, video, text = _build(dataset, cache)
    assert (video.calls, summary.reused, text.calls) == (6, 2, 3)


def test_crash_while_writing_leaves_no_file(dataset, tmp_path, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"lat")  # a truncated header
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        _build(dataset, tmp_path / "cache")
    assert _files(tmp_path / "cache") == []

    # a damaged file at the final path (e.g. from a tool that wrote in place) is recomputed, not trusted
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    summary, _, _ = _build(dataset, tmp_path / "cache")
    victim = summary.entries[0].path
    victim.write_bytes(victim.read_bytes()[:100])
    summary, video, _ = _build(dataset, tmp_path / "cache")
    assert video.calls == 1 and summary.reused == 7  # only the damaged window is recomputed
    assert victim.stat().st_size > 100


def test_corrupt_and_short_clips_are_skipped_and_named(dataset, tmp_path):
    folder = dataset.parent / "clips"
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated" * 8)
    write_clip(render_clip(1, seed=8, width=64, height=64, seconds=0.25), folder, "blink")  # 4 frames
    lines = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines()]
    lines.insert(1, {"video_path": "clips/broken.mp4", "caption": "电凝钩止血。", "duration": 3.0, "source": "x"})
    lines.append({"video_path": "clips/blink.mp4", "caption": "吸引器吸血。", "duration": 0.25, "source": "x"})
    write_manifest(lines, dataset)
    summary, video, text = _build(dataset, tmp_path / "cache")
    skipped = dict(summary.skipped)
    assert set(skipped) == {"clips/broken.mp4", "clips/blink.mp4"}
    assert "cannot open" in skipped["clips/broken.mp4"] and "min_frames" in skipped["clips/blink.mp4"]
    assert (summary.clips_total, summary.clips_used, video.calls, text.calls) == (6, 4, 8, 4)
    report = summary.format()
    assert "clips/broken.mp4" in report and "clips/blink.mp4" in report and "skipped 2" in report


def test_encoders_need_an_identity(dataset, tmp_path):
    records = load_manifest(dataset)
    anonymous = lambda frames: torch.zeros(16, 1, 8, 8)  # noqa: E731
    with pytest.raises(ValueError, match="identity"):
        build_cache(records, tmp_path / "c", anonymous)
    summary = build_cache(records[:1], tmp_path / "c", anonymous, config=CONFIG, video_encoder_id="zeros-v1")
    assert summary.computed == 2 and summary.entries[0].text_path is None


def test_prepare_dataset_end_to_end(dataset, tmp_path):
    lines = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines()]
    lines[3]["caption"] = "视野清晰，组织表面光滑。"  # the grasper clip loses its instrument keyword
    write_manifest(lines, dataset)
    data = prepare_dataset(dataset, tmp_path / "cache", PoolingVideoEncoder(), HashTextEncoder(), CONFIG,
                           no_instrument="skip")
    assert data.labels.skipped == ["clips/grasper_00.mp4"] and len(data.dataset) == 6
    item = data.dataset[2]
    assert item["latent"].shape == (16, 5, 8, 8) and item["context"].shape == (8, 4096)
    assert item["has_roi"] and item["roi_latent"].shape == (5, 8, 8)
    assert item["primary"] == 1 and item["teacher"].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert torch.equal(item["context"], HashTextEncoder()(item["caption"]))
    report = data.format()
    assert "clips/grasper_00.mp4" in report and "6 window(s)" in report
