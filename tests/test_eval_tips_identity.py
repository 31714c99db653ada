"""Tip PCK/IoU and identity metrics on hand-computed cases; Wilson, McNemar and the clustered/paired bootstrap."""
from __future__ import annotations

import numpy as np
import pytest

from eval_fixtures import BrightestSpotDetector, ColourClassifier, save_script
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
from training.evaluation.identity import InstrumentClassifier, confusion_matrix, metrics_from_confusion
from training.evaluation.stats import (bootstrap_ratio, bootstrap_statistic, mcnemar_exact, paired_bootstrap_ratio,
                                       wilson_interval)
from training.evaluation.tips import TipDetector, box_iou, pck_hits, score_tips


def test_pck_threshold_is_inclusive_9_9_hit_10_1_miss():
    ref = np.array([[50.0, 50.0]] * 3)
    pred = np.array([[59.9, 50.0], [60.1, 50.0], [50.0, 50.0]])
    scores = np.array([1.0, 1.0, 0.0])  # the third frame is a missed detection
    boxes = np.tile([[0.0, 0.0, 1.0, 1.0]], (3, 1))
    sums = score_tips(scores, pred, boxes, 0.5, ref, None, diagonal=1000.0, px=[10.0], norm=[0.01])
    assert sums.hits_px == [1.0] and sums.annotated == 3
    assert sums.hits_norm == [1.0]  # 0.01 x 1000 px diagonal = 10 px: the same split
    assert sums.detected == 2 and sums.frames == 3
    summary = sums.summary([10.0], [0.01])
    assert summary["pck@10px"] == pytest.approx(1 / 3) and summary["detection_rate"] == pytest.approx(2 / 3)
    assert pck_hits(np.array([9.9, 10.0, 10.1, np.nan]), [10.0]).tolist() == [2.0]


def test_iou_hand_computed_and_missed_detections_count_zero():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 4, 4]], float)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10], [2, 2, 6, 6]], float)
    np.testing.assert_allclose(box_iou(a, b), [50 / 150, 0.0, 1.0, 4 / 28])
    ref_boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [np.nan] * 4])
    pred_boxes = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
    sums = score_tips(np.array([1.0, 0.0, 1.0]), np.zeros((3, 2)), pred_boxes, 0.5, None, ref_boxes, 100.0,
                      [10.0], [0.1])
    assert sums.box_annotated == 2 and sums.iou_sum == pytest.approx(1 / 3)  # frame 2 undetected: IoU 0
    assert sums.reference == "box centre" and sums.annotated == 2
    assert sums.summary([10.0], [0.1])["iou>=0.5"] == 0.0


def test_torchscript_detector_outputs_map_back_to_clip_pixels(tmp_path):
    path = save_script(BrightestSpotDetector(), tmp_path / "tips.pt")
    frames = np.zeros((3, 48, 96, 3), np.uint8)
    spots = [(10, 5), (50, 20), (90, 40)]
    for f, (x, y) in zip(frames, spots):
        f[y, x] = 255
    frames[2, 40, 90] = 0  # frame 2 has nothing bright: no detection
    native = TipDetector(path)
    scores, tips, boxes = native(frames)
    np.testing.assert_allclose(tips[:2], [[10.5, 5.5], [50.5, 20.5]])
    assert scores.tolist() == [1.0, 1.0, 0.0]
    np.testing.assert_allclose(boxes[0], [6.5, 1.5, 14.5, 9.5])
    frames[:, 20:28, 48:56] = 0
    for f, (x, y) in zip(frames, spots):  # bigger spots survive the 2x downscale of the letterbox
        f[max(0, y - 2):y + 2, max(0, x - 2):x + 2] = 255
    boxed = TipDetector(path, size=(48, 48), resize="letterbox")
    scores, tips, _ = boxed(frames)
    np.testing.assert_allclose(tips[:2], [[10, 5], [50, 20]], atol=2.0)  # 2 px = one input pixel


def test_classification_metrics_hand_computed():
    y_true, y_pred = [0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 0, 3]
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
    m = metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 0 + 1) / 4)
    assert m["macro_f1"] == pytest.approx((2 / 4 + 4 / 5 + 0 + 1) / 4)
    weighted = metrics_from_confusion(confusion_matrix(y_true, y_pred, 4, weights=[2, 0, 1, 1, 1, 1]))
    assert weighted["accuracy"] == pytest.approx(5 / 6)  # unit 0 counted twice, unit 1 dropped


def test_torchscript_classifier_on_frames_and_roi_crops(tmp_path):
    path = save_script(ColourClassifier(), tmp_path / "cls.pt")
    frames = np.zeros((6, 40, 80, 3), np.uint8)
    frames[:, :, :40, 0] = 200  # left half red
    frames[:, :, 40:, 2] = 200  # right half blue
    frames[:, :, :10, 0] = 255  # more red than blue over the frame
    clf = InstrumentClassifier(path, class_names=DEFAULT_EXPERT_NAMES, size=32, frames=3)
    assert int(np.argmax(clf.predict(frames))) == 0
    roi = InstrumentClassifier(path, class_names=DEFAULT_EXPERT_NAMES, size=32, mode="roi")
    boxes = np.tile([50.0, 10.0, 70.0, 30.0], (6, 1))  # inside the blue half
    assert int(np.argmax(roi.predict(frames, boxes))) == 2
    assert roi.predict(frames, np.full((6, 4), np.nan)) is None  # no tip box anywhere: nothing to classify
    wrong = InstrumentClassifier(path, class_names=("a", "b"), size=32)
    with pytest.raises(ValueError, match=r"expected \[B, 2\] logits"):
        wrong.predict(frames)


def test_wilson_interval_and_exact_mcnemar_hand_computed():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2 ** 10)
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_bootstrap_clusters_frames_of_one_video_together():
    """Ten videos of 50 identical frames: the interval is that of 10 values, not of 500."""
    rng = np.random.default_rng(0)
    video_values = rng.normal(30, 2, 10)
    num = np.repeat(video_values, 50)
    den = np.ones_like(num)
    by_video = bootstrap_ratio(num, den, np.repeat(np.arange(10), 50), n_boot=4000, seed=1)
    by_frame = bootstrap_ratio(num, den, np.arange(500), n_boot=4000, seed=1)
    width = by_video["ci"][1] - by_video["ci"][0]
    expected = 2 * 1.96 * video_values.std(ddof=0) / np.sqrt(10)  # normal approximation for 10 means
    assert width == pytest.approx(expected, rel=0.25)
    assert width > 4 * (by_frame["ci"][1] - by_frame["ci"][0])
    assert by_video["clusters"] == 10 and by_video["n"] == 500


def test_paired_bootstrap_removes_the_shared_prompt_effect():
    rng = np.random.default_rng(1)
    arm_a = rng.normal(30, 3, 40)  # prompts differ a lot ...
    arm_b = arm_a + 0.5  # ... but B beats A by exactly 0.5 dB on every prompt
    ones = np.ones(40)
    paired = paired_bootstrap_ratio(arm_a, ones, arm_b, ones, [f"p{i}" for i in range(40)], n_boot=1000)
    assert paired["diff"] == pytest.approx(0.5)
    assert paired["ci"][0] == pytest.approx(0.5) and paired["ci"][1] == pytest.approx(0.5)
    assert paired["p_boot"] == 0.0
    unpaired_a = bootstrap_ratio(arm_a, ones, [f"p{i}" for i in range(40)], n_boot=1000)
    assert unpaired_a["ci"][1] - unpaired_a["ci"][0] > 1.0  # alone, each arm is far less certain
    none = bootstrap_statistic(3, ["same"] * 3, lambda w: 0.0)
    assert none is None  # one cluster: no interval rather than a fake one
