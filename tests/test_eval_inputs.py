"""Bad inputs give clear errors or stated warnings; partial results are kept; the CLI runs end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eval_fixtures import (BrightestSpotDetector, ColourClassifier, TinyI3D, save_script, write_plain_clip,
                           write_synthetic_arm)
from training import evaluate as cli
from training.evaluation import EvalConfig, evaluate
from training.evaluation.features import ModelFileError, load_torchscript, sha256_file
from training.evaluation.videos import EvalInputError, load_clip_set


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    """Three annotated synthetic sets (real, a, b) sharing prompt/seed names, and the three tiny models."""
    root = tmp_path_factory.mktemp("eval")
    for name, offset in (("real", 100), ("a", 0), ("b", 7)):
        write_synthetic_arm(root / name, seed_offset=offset)
    save_script(TinyI3D(), root / "i3d.pt")
    save_script(ColourClassifier(), root / "cls.pt")
    save_script(BrightestSpotDetector(), root / "det.pt")
    return root


def test_missing_model_wrong_checksum_and_not_torchscript(tmp_path, arms):
    with pytest.raises(ModelFileError, match=r"I3D: model file not found: .*nothere\.pt .*nothing is downloaded"):
        load_torchscript(tmp_path / "nothere.pt", role="I3D")
    good = sha256_file(arms / "cls.pt")
    assert load_torchscript(arms / "cls.pt", good, "classifier") is not None
    with pytest.raises(ModelFileError, match=f"checksum mismatch .*expected sha256 {'0' * 64}, the file has {good}"):
        load_torchscript(arms / "cls.pt", "0" * 64, "classifier")
    with pytest.raises(ModelFileError, match="not a SHA-256 hex digest"):
        load_torchscript(arms / "cls.pt", "abc", "classifier")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="junk.pt is not a loadable TorchScript file"):
        load_torchscript(junk, role="tip detector")
    # evaluate() checks every model before decoding anything
    with pytest.raises(ModelFileError, match="video encoder 'i3d': model file not found"):
        evaluate({"a": arms / "a"}, arms / "real", EvalConfig(i3d=str(tmp_path / "missing.pt")))


def test_folder_problems_are_named(tmp_path):
    with pytest.raises(EvalInputError, match="does not exist"):
        load_clip_set("a", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(EvalInputError, match=r"set 'a': no videos in .*empty \(looked for \.mp4"):
        load_clip_set("a", tmp_path / "empty")
    one = tmp_path / "one"
    write_plain_clip(one / "only.mp4")
    with pytest.raises(EvalInputError, match="1 readable clip.* need at least 2"):
        load_clip_set("a", one)
    (one / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(EvalInputError, match=r"1 readable clip\(s\) .* \(1 unreadable\)"):
        load_clip_set("a", one)
    write_plain_clip(one / "second.mp4", seed=1)
    clip_set = load_clip_set("a", one)
    assert [c.name for c in clip_set.clips] == ["only.mp4", "second.mp4"]
    assert clip_set.skipped[0][0] == "broken.mp4"
    assert any("skipped broken.mp4" in w for w in clip_set.warnings)


def test_differing_sizes_lengths_and_fps_warn_or_fail_in_strict_mode(tmp_path):
    folder = tmp_path / "mixed"
    write_plain_clip(folder / "a.mp4")
    write_plain_clip(folder / "b.mp4", seed=1)
    write_plain_clip(folder / "c.mp4", width=80, frames=10, fps=24.0)
    clip_set = load_clip_set("mixed", folder)
    text = "\n".join(clip_set.warnings)
    assert "clips differ in size: 64x48 (2 clips: a.mp4, b.mp4); 80x48 (1 clip: c.mp4)" in text
    assert "clips differ in length: 12 frames" in text and "10 frames (1 clip: c.mp4)" in text
    assert "clips differ in frame rate: 16 fps" in text and "24 fps (1 clip: c.mp4)" in text
    with pytest.raises(EvalInputError, match="clips differ in size.*strict mode"):
        load_clip_set("mixed", folder, strict=True)


def test_sidecar_and_name_conventions(tmp_path):
    folder = tmp_path / "arm"
    write_plain_clip(folder / "cut_seed3.mp4")
    write_plain_clip(folder / "other.mp4", seed=1)
    (folder / "other.json").write_text(json.dumps({"prompt_id": "cut", "seed": 4, "prompt": "电凝钩切割组织"}))
    (folder / "cut_seed3.txt").write_text("剪刀剪开组织", encoding="utf-8")
    clips = {c.name: c for c in load_clip_set("arm", folder).clips}
    assert clips["cut_seed3.mp4"].key == "cut#3" and clips["cut_seed3.mp4"].label == 0  # Scissors, from caption
    assert clips["other.mp4"].key == "cut#4" and clips["other.mp4"].label == 1 and clips["other.mp4"].label_source == "prompt"
    (folder / "other.json").write_text(json.dumps({"roi_boxes": [[0, 0, 5, 5], [3, 3, 1, 1]]}))
    with pytest.raises(EvalInputError, match=r"other\.json: field 'roi_boxes': frame 1: box .* is empty"):
        load_clip_set("arm", folder)
    (folder / "other.json").write_text(json.dumps({"instrument": "Laser"}))
    with pytest.raises(EvalInputError, match="unknown instrument 'Laser'"):
        load_clip_set("arm", folder)
    (folder / "other.json").write_text(json.dumps({"seed": 3, "prompt_id": "cut"}))
    with pytest.raises(EvalInputError, match="same prompt and seed"):
        load_clip_set("arm", folder)


def test_partial_results_kept_when_an_arm_or_a_metric_fails(tmp_path, arms):
    (tmp_path / "empty").mkdir()
    config = EvalConfig(i3d=str(arms / "i3d.pt"), bootstrap=50, fvd_bootstrap=0, floor_splits=2)
    report = evaluate({"a": arms / "a", "gone": tmp_path / "empty"}, arms / "real", config, tmp_path / "out")
    assert any(e["where"] == "gone" and "no videos" in e["message"] for e in report["errors"])
    assert report["metrics"]["temporal"]["a"]["warped_psnr"]["n"] == 8  # the good arm is complete
    assert "a" in report["metrics"]["video_quality"]["i3d"]["arms"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["errors"] == report["errors"] and not saved["partial"]
    # An arm too small for FVD still gets its other metrics; the FVD problem is stated.
    small = tmp_path / "small"
    small.mkdir()
    for name in ("p0_seed0", "p1_seed0"):
        for ext in (".mp4", ".json"):
            (small / f"{name}{ext}").write_bytes((arms / "a" / f"{name}{ext}").read_bytes())
    report = evaluate({"small": small}, small, EvalConfig(i3d=str(arms / "i3d.pt"), bootstrap=20, fvd_bootstrap=0))
    assert "too few for a real-vs-real floor" in " ".join(report["warnings"])
    assert report["metrics"]["temporal"]["small"]["warped_psnr"]["n"] == 2


def test_cli_end_to_end_with_all_metrics(tmp_path, arms, capsys):
    out = tmp_path / "report"
    code = cli.main(["--arm", f"a={arms / 'a'}", "--arm", f"b={arms / 'b'}", "--real", str(arms / "real"),
                     "--out", str(out), "--i3d", str(arms / "i3d.pt"), "--i3d-sha256", sha256_file(arms / "i3d.pt"),
                     "--classifier", str(arms / "cls.pt"), "--classifier-input", "roi", "--classifier-size", "32",
                     "--detector", str(arms / "det.pt"), "--detector-stride", "2", "--bootstrap", "100",
                     "--fvd-bootstrap", "5", "--floor-splits", "2", "--workers", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "real vs real floor" in printed and "warped_psnr" in printed
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["format"] == "wan-lora-moe-eval" and report["reference_arm"] == "a"
    assert set(report["sets"]) == {"real", "a", "b"} and report["sets"]["real"]["role"] == "real (ceiling)"
    paired = report["paired"]["b vs a"]
    assert paired["n_pairs"] == 8 and "warped_psnr" in paired["metrics"] and "mcnemar" in paired
    tips = report["metrics"]["tips"]["a"]
    assert set(tips) >= {"detection_rate", "pck@10px", "pck@0.02diag", "iou"}
    identity = report["metrics"]["identity"]["real"]
    assert identity["labelled"] == 8 and len(identity["confusion"]) == 4
    assert identity["classes"] == ["Scissors", "Hook/Electrocautery", "Suction", "Other"]
    assert "wilson" in identity["accuracy"]
    fvd = report["metrics"]["video_quality"]["i3d"]
    assert fvd["n_clips"] == 8 and fvd["protocol"]["resize"] == "letterbox"
    assert "whole frame kept" in fvd["protocol"]["resize_protocol"]
    assert report["clips"]["a"][0]["roi_source"] == "annotation"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Paired comparisons</h2>" in html and "real vs real (floor" in html and "Confusion matrix" in html


def test_cli_errors_exit_2_with_the_reason(tmp_path, arms, capsys):
    assert cli.main(["--arm", f"a={arms / 'a'}", "--lpips"]) == 2
    assert "no backbone weights" in capsys.readouterr().err
    assert cli.main(["--arm", f"a={tmp_path / 'none'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--real", str(arms / "real")])  # no arm


def test_roi_from_detector_when_clips_have_no_annotation(tmp_path, arms):
    folder = tmp_path / "plain"
    write_synthetic_arm(folder, prompts=2, seeds=1, annotate=False)
    config = EvalConfig(detector=str(arms / "det.pt"), detector_stride=3, bootstrap=0)
    report = evaluate({"plain": folder}, None, config)
    rows = report["clips"]["plain"]
    assert all(r["roi_source"] == "detector" and r["temporal"]["warped_psnr_roi"] is not None for r in rows)
    assert all(r["tips"]["annotated_frames"] == 0 and r["tips"]["detection_rate"] is not None for r in rows)
    assert np.isfinite(report["metrics"]["tips"]["plain"]["detection_rate"]["value"])
