"""Decoding, 16 fps resampling, 4n+1 windows, buckets, and ROI following the same frames and geometry."""
from __future__ import annotations

import math

import numpy as np
import pytest

from training.data.synthetic import render_clip, write_clip
from training.data.video_io import (ClipTooShortError, ExtractionConfig, Geometry, RoiMismatchError,
                                    VideoReadError, boxes_to_mask, bucket_size, frames_4n1, frames_to_tensor,
                                    load_clip, plan_windows, probe_video, resample_indices, write_video)


# ------------------------------------------------------------------------------------------ resampling

def test_resample_24_to_16_picks_nearest_timestamps():
    idx = resample_indices(48, 24.0, 16.0)
    assert len(idx) == 32  # 2 s at 16 fps
    assert idx[:8].tolist() == [0, 2, 3, 5, 6, 8, 9, 11]


def test_resample_identity_and_upsampling():
    assert resample_indices(40, 16.0, 16.0).tolist() == list(range(40))
    slow = resample_indices(10, 8.0, 16.0)  # 1.25 s at 8 fps -> 20 frames, each source frame twice
    assert len(slow) == 20
    assert np.bincount(slow).tolist() == [1] + [2] * 8 + [3]  # ties go to the later frame, last clamps


@pytest.mark.parametrize("n,fps", [(37, 29.97), (100, 25.0), (61, 30.0), (13, 12.5), (90, 60.0)])
def test_resample_is_nearest_monotone_and_covers_clip(n, fps):
    idx = resample_indices(n, fps, 16.0)
    times = np.arange(len(idx)) / 16.0
    assert np.all(np.diff(idx) >= 0) and idx.min() >= 0 and idx.max() <= n - 1
    # each chosen source frame is the nearest one (within half a source frame), except the clamped tail
    inside = times <= (n - 1) / fps
    assert np.all(np.abs(idx[inside] / fps - times[inside]) <= 0.5 / fps + 1e-9)
    assert times[-1] < n / fps <= times[-1] + 1 / 16 + 1e-9  # the last target frame is the last that fits


def test_frames_4n1():
    assert [frames_4n1(a, 81) for a in (0, 1, 4, 5, 8, 9, 80, 81, 200)] == [0, 1, 1, 5, 5, 9, 77, 81, 81]
    assert frames_4n1(200, 33) == 33
    assert all((frames_4n1(a, 81) - 1) % 4 == 0 for a in range(1, 300))


# ---------------------------------------------------------------------------------------------- buckets

def test_bucket_examples():
    assert bucket_size(1920, 1080, 480 * 832) == (832, 464)
    assert bucket_size(832, 480, 480 * 832) == (832, 480)
    assert bucket_size(100, 70, 480 * 832) == (96, 64)  # small clip: largest 16-multiple <= its size
    assert bucket_size(720, 1280, 480 * 832) == (464, 832)  # portrait stays portrait
    with pytest.raises(ValueError, match="smaller than one 16-pixel"):
        bucket_size(12, 40)


@pytest.mark.parametrize("target", [480 * 832, 256 * 256, 96 * 64])
def test_bucket_never_upscales_multiple_of_16_and_keeps_aspect(target):
    rng = np.random.default_rng(0)
    for w, h in rng.integers(16, 2000, size=(300, 2)):
        bw, bh = bucket_size(int(w), int(h), target)
        assert bw % 16 == 0 and bh % 16 == 0
        assert 16 <= bw <= w and 16 <= bh <= h
        assert bw * bh <= max(target, 256)
        if min(bw, bh) >= 256:  # enough 16-px steps that the aspect ratio can be kept closely
            assert abs(math.log((bw / bh) / (w / h))) < 0.07


def test_geometry_moves_boxes_with_the_pixels():
    """A white rectangle drawn in the source lands exactly where the transformed box says (resize + crop)."""
    src_w, src_h = 300, 140
    box = np.array([[110.0, 30.0, 180.0, 90.0]])
    image = np.zeros((src_h, src_w, 3), np.uint8)
    image[30:90, 110:180] = 255
    bucket = bucket_size(src_w, src_h, 128 * 64)  # wider than the bucket: needs a horizontal crop
    geometry = Geometry.for_bucket(src_w, src_h, bucket)
    assert geometry.offset[0] > 0
    out = geometry.apply(image)
    assert out.shape == (bucket[1], bucket[0], 3)
    ys, xs = np.nonzero(out[..., 0] > 127)
    x0, y0, x1, y1 = geometry.apply_boxes(box)[0]
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
    assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
    # a box entirely in the cropped-away margin disappears (NaN), it does not get squashed to the border
    assert np.isnan(geometry.apply_boxes(np.array([[0.0, 0.0, 5.0, 5.0]]))).all()


def test_boxes_to_mask_covers_fractional_pixels():
    mask = boxes_to_mask(np.array([[1.5, 0.0, 3.0, 2.0], [np.nan] * 4]), 4, 4)
    assert mask.shape == (2, 4, 4)
    assert mask[0, 0].tolist() == [0.0, 0.5, 1.0, 0.0] and mask[0, 2:].sum() == 0
    assert mask[1].sum() == 0


# ------------------------------------------------------------------------------------------ windows

@pytest.mark.parametrize("frames, expected", [
    (64, [0]),  # a 4 s clip, 61-frame windows: one window, not near-duplicates at 0/2/3
    (91, [0]), (92, [0, 31]),  # a second window once it can start half a window (31 frames) later
    (122, [0, 61]), (123, [0, 31, 62]),  # a third once all three can
    (400, [0, 170, 339]),  # a long clip: three, evenly from start to end
])
def test_uniform_windows_share_at_most_half_their_frames(frames, expected):
    windows = plan_windows(frames, ExtractionConfig(mode="uniform", max_frames=61, num_windows=3))
    starts = [w.start for w in windows]
    assert starts == expected and all(w.length == 61 for w in windows)
    assert all(b - a >= 31 for a, b in zip(starts, starts[1:]))  # at most 30 of 61 frames shared
    if len(windows) > 1:
        assert starts[-1] + 61 == frames  # spread from the start to the very end


def test_uniform_rule_is_part_of_the_cache_settings():
    """Caches written under the old placement (near-duplicate uniform windows) must not be reused."""
    uniform, head = ExtractionConfig(mode="uniform"), ExtractionConfig(mode="head")
    assert uniform.settings()["uniform_windows"] == "half-overlap" and "uniform_windows" not in head.settings()


def test_plan_windows_modes():
    head = plan_windows(100, ExtractionConfig(mode="head", max_frames=33))
    assert [(w.start, w.length) for w in head] == [(0, 33)]
    uni = plan_windows(100, ExtractionConfig(mode="uniform", max_frames=33, num_windows=3))
    assert [(w.start, w.length) for w in uni] == [(0, 33), (34, 33), (67, 33)]  # last one ends at the clip end
    slide = plan_windows(100, ExtractionConfig(mode="sliding", max_frames=33, stride=20))
    assert [w.start for w in slide] == [0, 20, 40, 60] and all(w.length == 33 for w in slide)
    short = plan_windows(30, ExtractionConfig(mode="uniform", max_frames=81, num_windows=3))
    assert [(w.start, w.length) for w in short] == [(0, 29)]  # 4n+1 <= 30: one window fits, not 0 and 1
    assert plan_windows(4, ExtractionConfig(min_frames=5)) == []
    with pytest.raises(ValueError, match="4n\\+1"):
        ExtractionConfig(max_frames=80)
    with pytest.raises(ValueError, match="mode"):
        ExtractionConfig(mode="random")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ decoding

@pytest.fixture(scope="module")
def clip24(tmp_path_factory):
    """A 2.5 s, 24 fps, 192x128 synthetic hook clip (60 frames) on disk, with its rendering."""
    folder = tmp_path_factory.mktemp("clip24")
    clip = render_clip(1, seed=5, width=192, height=128, fps=24.0, seconds=2.5)
    return write_clip(clip, folder, "hook24"), clip


def test_probe(clip24):
    path, clip = clip24
    info = probe_video(path, count=True)
    assert (info.width, info.height, info.num_frames) == (192, 128, 60)
    assert info.fps == pytest.approx(24.0) and info.duration == pytest.approx(2.5)


def test_load_clip_resamples_to_16fps_4n1_and_picks_the_right_frames(clip24):
    path, clip = clip24
    decoded = load_clip(path, ExtractionConfig(max_frames=81, target_area=192 * 128))
    assert decoded.num_resampled == 40
    (window,) = decoded.windows
    assert window.frames.shape == (37, 128, 192, 3) and window.frames.dtype == np.uint8
    assert window.source_indices.tolist() == resample_indices(60, 24.0)[:37].tolist()
    # every decoded frame is closest to the rendered frame it claims to be (h264 is lossy, so compare)
    hits = 0
    for frame, src in zip(window.frames.astype(np.float32), window.source_indices):
        errors = [np.abs(frame - clip.frames[j].astype(np.float32)).mean() for j in range(60)]
        hits += int(np.argmin(errors) == src)
    assert hits >= 35


def test_load_clip_transforms_roi_boxes_with_resize_and_resample(clip24):
    path, clip = clip24
    config = ExtractionConfig(mode="uniform", num_windows=2, max_frames=17, target_area=96 * 64)
    decoded = load_clip(path, config, roi_boxes=clip.boxes)
    assert decoded.bucket == (96, 64) and len(decoded.windows) == 2
    for window in decoded.windows:
        expected = np.array([clip.boxes[i] for i in window.source_indices]) * 0.5
        np.testing.assert_allclose(window.roi_boxes, expected, atol=1e-3)
        # the boxes really sit on the instrument: grey metal is much less saturated than tissue
        frames = window.frames.astype(np.float32)
        saturation = frames.max(-1) - frames.min(-1)
        inside = boxes_to_mask(window.roi_boxes, 64, 96) > 0.5
        assert saturation[inside].mean() < 0.75 * saturation[~inside].mean()


def test_roi_mask_video_follows_the_same_frames(tmp_path, clip24):
    path, clip = clip24
    masks = boxes_to_mask(np.array(clip.boxes), 128, 192)
    mask_path = write_video(tmp_path / "hook24.mask.mp4", [np.repeat((m[..., None] > 0.5) * 255, 3, -1).astype(np.uint8)
                                                           for m in masks], fps=24.0)
    config = ExtractionConfig(max_frames=33, target_area=96 * 64)
    window = load_clip(path, config, roi_mask=mask_path).windows[0]
    from_boxes = boxes_to_mask(np.array([clip.boxes[i] for i in window.source_indices]) * 0.5, 64, 96) > 0.5
    from_video = window.roi_mask > 0.5
    iou = (from_boxes & from_video).sum() / (from_boxes | from_video).sum()
    assert window.roi_mask.shape == (33, 64, 96) and iou > 0.85


def test_roi_mismatches_are_errors(tmp_path, clip24):
    path, clip = clip24
    with pytest.raises(RoiMismatchError, match="roi_boxes has 59 entries but the clip has 60"):
        load_clip(path, roi_boxes=clip.boxes[:-1])
    small = write_video(tmp_path / "small.mask.mp4", [np.zeros((64, 96, 3), np.uint8)] * 60, fps=24.0)
    with pytest.raises(RoiMismatchError, match="mask is 96x64"):
        load_clip(path, roi_mask=small)


def test_unreadable_and_short_clips_are_named(tmp_path, clip24):
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"\x00not a video" * 50)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        load_clip(garbage)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip24[0].read_bytes()[: clip24[0].stat().st_size // 2])
    with pytest.raises(VideoReadError, match="truncated.mp4"):
        load_clip(truncated)
    tiny = write_clip(render_clip(0, seed=1, fps=16.0, seconds=0.25), tmp_path, "tiny")  # 4 frames
    with pytest.raises(ClipTooShortError, match="4 frames"):
        load_clip(tiny, ExtractionConfig(min_frames=5))


def test_frames_to_tensor_ranges():
    frames = np.array([[[[0, 128, 255]]]], np.uint8)
    unit = frames_to_tensor(frames)
    assert unit.shape == (1, 1, 1, 3) and unit.min() == 0.0 and unit.max() == 1.0
    signed = frames_to_tensor(frames, "signed")
    assert signed.min() == -1.0 and signed.max() == 1.0
