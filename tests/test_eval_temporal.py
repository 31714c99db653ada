"""Warped PSNR against the value the true flow gives, on clips whose motion is known exactly."""
from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
import torch

from training.evaluation.perceptual import LpipsMetric
from training.evaluation.temporal import (PSNR_CAP_DB, FlowConfig, FlowEstimator, clip_temporal, psnr_from_mse,
                                          warp)
from training.evaluation.videos import EvalInputError

H, W, N = 96, 160, 12
SHIFT = (2, 1)  # pixels per frame (x, y)


def _texture(rng, extra=60):
    tex = cv2.GaussianBlur(rng.uniform(0, 255, (H + extra, W + extra, 3)).astype(np.float32), (0, 0), 1.5)
    return (tex - tex.mean()) * 3 + 128


def _panning_clip(seed=0, noise=2.0):
    """A camera pan over a texture: frame t+1 at x is frame t at x + SHIFT, plus independent sensor noise."""
    rng = np.random.default_rng(seed)
    tex = _texture(rng)
    frames = [tex[3 + SHIFT[1] * t:3 + SHIFT[1] * t + H, 2 + SHIFT[0] * t:2 + SHIFT[0] * t + W]
              + rng.normal(0, noise, (H, W, 3)) for t in range(N)]
    return np.stack([np.clip(f, 0, 255).astype(np.uint8) for f in frames])


def _true_flow_psnr(frames):
    """The oracle: warp with the known flow, score the pixels that stay inside the frame."""
    flow = np.zeros((H, W, 2), np.float32)
    flow[..., 0], flow[..., 1] = SHIFT
    inside = np.zeros((H, W), np.uint8)
    inside[:H - SHIFT[1], :W - SHIFT[0]] = 1
    sse = sum(cv2.norm(warp(frames[t], flow), frames[t + 1], cv2.NORM_L2SQR, inside) for t in range(N - 1))
    return psnr_from_mse(sse / (3 * inside.sum() * (N - 1)))


def test_warped_psnr_matches_the_true_flow_value_on_a_translated_clip():
    frames = _panning_clip()
    truth = _true_flow_psnr(frames)
    assert 35 < truth < 45  # limited by the sensor noise, not capped
    summary = clip_temporal(frames, FlowEstimator(FlowConfig())).summary()
    assert summary["warped_psnr"] == pytest.approx(truth, abs=1.0)
    assert summary["motion_px"] == pytest.approx(np.hypot(*SHIFT), abs=0.2)
    assert summary["valid_fraction"] > 0.85
    farneback = clip_temporal(frames, FlowEstimator(FlowConfig(method="farneback", scale=1.0))).summary()
    assert farneback["warped_psnr"] == pytest.approx(truth, abs=1.5)


def test_shuffled_frames_score_low_and_a_frozen_clip_scores_the_cap():
    frames = _panning_clip()
    ordered = clip_temporal(frames, FlowEstimator()).summary()
    shuffled = clip_temporal(frames[np.random.default_rng(1).permutation(N)], FlowEstimator()).summary()
    assert shuffled["warped_psnr"] < ordered["warped_psnr"] - 5
    assert shuffled["motion_px"] > 2 * ordered["motion_px"]
    frozen = clip_temporal(np.repeat(frames[:1], 6, axis=0), FlowEstimator()).summary()
    assert frozen["warped_psnr"] == PSNR_CAP_DB and frozen["motion_px"] < 0.05  # perfect, and motionless


def test_roi_score_sees_flicker_inside_the_tip_box_only():
    frames = _panning_clip().copy()
    rng = np.random.default_rng(2)
    box = [60, 30, 100, 70]
    for t in range(N):  # an object that flickers: new random pixels every frame inside the box
        frames[t, box[1]:box[3], box[0]:box[2]] = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    boxes = np.tile(np.array(box, float), (N, 1))
    boxes[0] = np.nan  # a frame without annotation is simply not in the ROI score
    summary = clip_temporal(frames, FlowEstimator(), roi_boxes=boxes).summary()
    assert summary["warped_psnr_roi"] < 12  # independent uniform noise: 10 log10(6) = 7.8 dB expected
    assert summary["warped_psnr"] > summary["warped_psnr_roi"] + 5  # diluted by the steady rest of the frame
    assert clip_temporal(frames, FlowEstimator()).summary()["warped_psnr_roi"] is None


def test_flow_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="flow method"):
        FlowConfig(method="raft")
    with pytest.raises(ValueError, match="DIS preset"):
        FlowConfig(preset="slowest")
    with pytest.raises(ValueError, match="flow scale"):
        FlowConfig(scale=2.0)


def test_lpips_is_an_error_without_backbone_weights_or_package(tmp_path, monkeypatch):
    with pytest.raises(EvalInputError, match="no backbone weights"):
        LpipsMetric(None)
    with pytest.raises(EvalInputError, match="model file not found"):
        LpipsMetric(tmp_path / "alexnet.pth")
    weights = tmp_path / "alexnet.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, weights)
    monkeypatch.setitem(sys.modules, "lpips", None)  # the package is not installed: import fails
    with pytest.raises(EvalInputError, match="pip install lpips"):
        LpipsMetric(weights)


def test_roi_pixels_are_those_whose_centre_is_inside_the_box():
    from training.evaluation.temporal import _roi_mask

    rng = np.random.default_rng(3)
    ys, xs = np.mgrid[0:48, 0:64] + 0.5
    for _ in range(50):
        x0, y0 = rng.uniform(-5, 60, 2)
        x1, y1 = x0 + rng.uniform(0.3, 30), y0 + rng.uniform(0.3, 30)
        expected = (xs > x0) & (xs < x1) & (ys > y0) & (ys < y1)
        ours = _roi_mask(np.array([[x0, y0, x1, y1]]), 0, 48, 64)
        assert np.array_equal(np.zeros_like(expected) if ours is None else ours > 0, expected)
    assert _roi_mask(np.array([[np.nan] * 4]), 0, 48, 64) is None


def test_frames_too_small_for_optical_flow_get_a_clear_error():
    import numpy as np

    from training.evaluation.temporal import FlowConfig, FlowEstimator
    from training.evaluation.videos import EvalInputError

    with pytest.raises(EvalInputError, match=r"16x16 px are 8x8 px at flow scale 0.5.*--flow-scale 0.75"):
        FlowEstimator(FlowConfig()).prepare(np.zeros((16, 16, 3), np.uint8))
    assert FlowEstimator(FlowConfig(scale=0.75)).prepare(np.zeros((16, 16, 3), np.uint8)).shape == (12, 12)
