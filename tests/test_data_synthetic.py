"""Synthetic clips: deterministic, class-dependent instruments, tip boxes that really enclose the tip."""
from __future__ import annotations

import time

import numpy as np

from training.data.labels import assign_labels
from training.data.manifest import load_manifest
from training.data.synthetic import HashTextEncoder, PoolingVideoEncoder, make_synthetic_dataset, render_clip
from training.data.video_io import probe_video


def test_render_is_deterministic_and_seed_dependent():
    a, b = render_clip(2, seed=7), render_clip(2, seed=7)
    assert np.array_equal(a.frames, b.frames) and a.boxes == b.boxes and a.caption == b.caption
    c = render_clip(2, seed=8)
    assert not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (32, 64, 96, 3) and len(a.boxes) == 32  # 2 s at 16 fps


def test_boxes_enclose_the_tip_inside_the_frame():
    for label in range(4):
        clip = render_clip(label, seed=3, width=96, height=64, fps=24.0, seconds=2.5)
        assert len(clip.boxes) == 60
        for (x0, y0, x1, y1), (tx, ty) in zip(clip.boxes, clip.tips):
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 64
            assert x0 <= tx <= x1 and y0 <= ty <= y1
            assert (x1 - x0) * (y1 - y0) < 0.4 * 96 * 64  # the tip, not the whole frame


def test_instrument_shapes_differ_between_classes():
    """Same seed, same background: only the instrument changes, and each class draws something else."""
    crops = []
    for label in range(4):
        clip = render_clip(label, seed=0, width=96, height=64)
        frame = clip.frames[0].astype(np.float32)
        saturation = frame.max(-1) - frame.min(-1)
        crops.append(saturation < 40)  # grey/black instrument pixels
    for i in range(4):
        for j in range(i + 1, 4):
            assert (crops[i] ^ crops[j]).sum() > 30


def test_dataset_is_fast_and_loadable(tmp_path):
    start = time.perf_counter()
    manifest = make_synthetic_dataset(tmp_path, n_per_class=2, seed=1, fps=(16.0, 24.0))
    elapsed = time.perf_counter() - start
    assert elapsed < 30.0  # ~2 s for 8 clips on 2 idle cores; the bound only catches pathological slowness
    records = load_manifest(manifest)
    assert len(records) == 8 and all(r.roi_boxes is not None for r in records)
    report = assign_labels(records, policy="error")  # every synthetic caption names its instrument
    assert report.counts == {"Scissors": 2, "Hook/Electrocautery": 2, "Suction": 2, "Other": 2}
    for record in records:
        info = probe_video(record.video_path, count=True)
        assert info.num_frames == record.num_frames == len(record.roi_boxes)
        assert info.fps == record.fps
        assert (record.video_path.with_suffix(".txt")).read_text(encoding="utf-8").strip() == record.caption


def test_stand_in_encoders_shapes_and_determinism():
    import torch

    text = HashTextEncoder()
    a, b, c = text("电凝钩"), text("电凝钩"), text("吸引")
    assert a.shape == (8, 4096) and torch.equal(a, b) and not torch.equal(a, c) and text.calls == 3
    video = PoolingVideoEncoder()
    latent = video(torch.rand(9, 64, 96, 3))
    assert latent.shape == (16, 3, 8, 12) and video.calls == 1
