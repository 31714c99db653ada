"""Instrument labels: from the manifest or the caption (shared vocabulary), multi-hot teachers, no-instrument report."""
from __future__ import annotations

from pathlib import Path

import pytest

from moe_core.vocabulary import DEFAULT_EXPERT_NAMES, DEFAULT_FALLBACK, detect_instruments, keywords_for
from training.data.labels import NoInstrumentError, assign_labels, detect_label, label_distribution, label_for
from training.data.manifest import ClipRecord
from training.data.synthetic import CAPTIONS, NO_INSTRUMENT_CAPTION

HOOK, SCISSORS, SUCTION, OTHER = 1, 0, 2, 3


def _rec(name: str, caption: str, label: int | None = None) -> ClipRecord:
    return ClipRecord(video_path=Path("/data") / name, caption=caption, duration=3.0, source="s", name=name,
                      instrument_label=label)


def test_caption_labels_match_the_shared_vocabulary():
    keywords = keywords_for(DEFAULT_EXPERT_NAMES)
    captions = [c for group in CAPTIONS for c in group] + [
        "电凝钩切割组织。吸引吸血。", "吸引清理术野。抓钳抓取组织。", "Bipolar cautery of a vessel",
        NO_INSTRUMENT_CAPTION]
    for caption in captions:
        found = detect_instruments(caption, keywords)
        label = detect_label(caption)
        if not found:
            assert label is None
            continue
        assert label.origin == "caption" and list(label.experts) == found
        assert label.primary == DEFAULT_EXPERT_NAMES.index(found[0])
        assert [DEFAULT_EXPERT_NAMES[i] for i, s in enumerate(label.teacher) if s > 0] == found


def test_multi_instrument_caption_gives_equal_shares_and_first_detected_primary():
    label = detect_label("电凝钩切割组织。吸引吸血。")
    assert label.teacher == (0.0, 0.5, 0.5, 0.0) and label.primary == HOOK
    label = detect_label("剪刀剪开，电凝钩止血，吸引器吸血。")
    assert label.teacher == pytest.approx((1 / 3, 1 / 3, 1 / 3, 0.0)) and label.primary == SCISSORS
    # a grasper caption is Other only
    assert detect_label("抓钳抓取胆囊。").teacher == (0.0, 0.0, 0.0, 1.0)


def test_manifest_label_wins_over_caption():
    label = label_for(_rec("a.mp4", "电凝钩止血。", label=SUCTION))
    assert label.origin == "manifest" and label.primary == SUCTION and label.teacher == (0.0, 0.0, 1.0, 0.0)


def test_no_instrument_policies_report_clips_by_name():
    records = [_rec("hook.mp4", CAPTIONS[HOOK][0]), _rec("plain_1.mp4", NO_INSTRUMENT_CAPTION),
               _rec("both.mp4", "电凝钩切割组织。吸引吸血。"), _rec("plain_2.mp4", "视野清晰。"),
               _rec("labelled.mp4", "视野清晰。", label=SCISSORS)]

    skip = assign_labels(records, policy="skip")
    assert skip.no_instrument == ["plain_1.mp4", "plain_2.mp4"] and skip.skipped == skip.no_instrument
    assert [r.name for r, _ in skip.labelled] == ["hook.mp4", "both.mp4", "labelled.mp4"]
    assert skip.counts == {"Scissors": 1, "Hook/Electrocautery": 2, "Suction": 0, "Other": 0}
    assert skip.teacher_mass == {"Scissors": 1.0, "Hook/Electrocautery": 1.5, "Suction": 0.5, "Other": 0.0}
    assert skip.multi_instrument == ["both.mp4"]
    text = skip.format()
    assert "plain_1.mp4" in text and "plain_2.mp4" in text and "skipped" in text

    fallback = assign_labels(records, policy="fallback")
    assert fallback.no_instrument == ["plain_1.mp4", "plain_2.mp4"] and fallback.skipped == []
    assert len(fallback.labelled) == 5
    plain = {r.name: label for r, label in fallback.labelled}["plain_1.mp4"]
    assert plain.origin == "fallback" and DEFAULT_EXPERT_NAMES[plain.primary] == DEFAULT_FALLBACK
    assert fallback.counts["Other"] == 2

    with pytest.raises(NoInstrumentError) as info:
        assign_labels(records, policy="error")
    assert info.value.clips == ["plain_1.mp4", "plain_2.mp4"]
    assert "plain_2.mp4" in str(info.value)
    with pytest.raises(ValueError, match="policy"):
        assign_labels(records, policy="ignore")  # type: ignore[arg-type]


def test_custom_experts_and_keywords():
    names = ("Cutter", "Other")
    records = [_rec("a.mp4", "使用超声刀切割"), _rec("b.mp4", "吸引")]
    report = assign_labels(records, names, custom_keywords={"Cutter": ["超声刀"]}, policy="fallback", fallback="Other")
    assert [label.primary for _, label in report.labelled] == [0, 1] and report.no_instrument == ["b.mp4"]
    with pytest.raises(ValueError, match="fallback expert"):
        assign_labels(records, names, policy="fallback", fallback="Missing")


def test_label_distribution_lists_every_expert():
    labels = [detect_label(CAPTIONS[HOOK][0]), detect_label(CAPTIONS[HOOK][1]), detect_label(CAPTIONS[OTHER][0])]
    assert label_distribution(labels) == {"Scissors": 0, "Hook/Electrocautery": 2, "Suction": 0, "Other": 1}
