"""The README's first command, ``bash scripts/demo.sh --fast``, run as a user runs it, and what it writes.

One run of the fast demo (synthetic clips, a tiny random A14B-style pair, stage 1, stage 2, six clips from the
bundled workflow in a headless ComfyUI, the report) into a temporary folder, then checks on its files with
independent means: the mp4s decoded with imageio-ffmpeg, pictures opened with Pillow, the LoRA-MoE file read
with moe_core, the high/low split recomputed by hand from the flow schedule, the report opened in headless
Chromium. Plus the mission config's rules (no run needed).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import cdp
import pack_fixtures

REPO = pack_fixtures.REPO_ROOT
CLIPS = ["1_scissors", "2_hook", "3_suction", "4_grasper", "5_auto_routed", "6_experts_off"]
FAST = {"width": 32, "height": 32, "frames": 5, "steps": 4}  # training/mission.py FAST_TOML
TIMINGS: dict[str, float] = {}


def read_mp4(path: Path) -> tuple[dict, np.ndarray]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return meta, np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mission")
    sets = {"demo.work_dir": root / "work", "data.cache_dir": root / "work" / "cache",
            "stage1.output.dir": root / "stage1", "stage2.output.dir": root / "stage2",
            "mission.out_dir": root / "report",
            # relative, as in the embedded config (the demo runs from the repository root)
            "mission.comfy_dir": os.path.relpath(root / "comfyui", REPO)}
    cmd = ["bash", str(REPO / "scripts" / "demo.sh"), "--fast"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = dict(os.environ, WLM_VENV=sys.prefix, PYTHON=sys.executable)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    TIMINGS["demo_fast_s"] = round(time.monotonic() - t0, 1)
    log = proc.stdout + proc.stderr
    (root / "demo.log").write_text(log)
    assert proc.returncode == 0, f"demo.sh --fast failed ({proc.returncode}):\n{log[-6000:]}"
    return root, root / "report", proc.stdout


def test_demo_announces_each_step_and_where_everything_is(demo):
    root, out, stdout = demo
    for i, title in enumerate(["data", "models and cache", "training: stage 1, then stage 2",
                               "clips from the bundled workflow in ComfyUI", "report"], 1):
        assert f"=== [{i}/5] {title} ===" in stdout
    assert "training:" in stdout and "100%" in stdout, "training shows a progress bar"
    tail = stdout[stdout.rindex("Done in"):]
    assert f"Everything is in {out}/" in tail and "report.html" in tail
    assert str(root / "stage2" / "demo_lora_moe.safetensors") in tail


def test_clips_decode_with_the_configured_frames_fps_and_size(demo):
    _, out, _ = demo
    frames = {}
    for name in CLIPS:
        meta, f = read_mp4(out / f"{name}.mp4")
        assert meta["fps"] == 16.0 and meta["size"] == (FAST["width"], FAST["height"]), (name, meta)
        assert f.shape == (FAST["frames"], FAST["height"], FAST["width"], 3), (name, f.shape)
        assert f.std() > 1.0, f"{name} is a flat picture"
        frames[name] = f.astype(np.float32)
    # Same prompt and seed, experts on (learned routing) vs off: only the experts differ.
    assert np.abs(frames["5_auto_routed"] - frames["6_experts_off"]).mean() > 0.5


def test_the_graphs_run_are_the_bundled_workflow_with_values_substituted(demo):
    _, out, _ = demo
    workflow = json.loads((REPO / "workflows" / "wan22_a14b_t2v_lora_moe.json").read_text(encoding="utf-8"))
    ui_types = sorted(n["type"] for n in workflow["nodes"] if n["type"] not in ("MarkdownNote", "Note"))
    # the split: first step whose t = shift*u / (1 + (shift-1)*u), u = 1 - i/steps, is below 0.875
    shift, steps = 8.0, FAST["steps"]
    split = next(i for i in range(steps) if shift * (1 - i / steps) / (1 + (shift - 1) * (1 - i / steps)) < 0.875)
    assert split == 3  # by hand: t = 1, 0.955, 0.889, 0.727
    for name in CLIPS:
        prompt = json.loads((out / "prompts" / f"{name}.api.json").read_text(encoding="utf-8"))
        types = sorted(n["class_type"] for n in prompt.values())
        expected = [t for t in ui_types if t != "CLIPLoader"]
        expected = sorted("WanLoRAMoEDemoHashTextEncode" if t == "CLIPTextEncode" else t for t in expected)
        if name == "6_experts_off":
            expected.remove("WanLoRAMoE_PromptRouter")
        assert types == expected, name
        unets = {n["inputs"]["unet_name"] for n in prompt.values() if n["class_type"] == "UNETLoader"}
        assert unets == {"tiny_wan_t2v_2x128_high_noise.safetensors", "tiny_wan_t2v_2x128_low_noise.safetensors"}
        samplers = sorted((n["inputs"]["start_at_step"], n["inputs"]["end_at_step"], n["inputs"]["steps"])
                          for n in prompt.values() if n["class_type"] == "KSamplerAdvanced")
        assert samplers == [(0, split, steps), (split, 10000, steps)], samplers
        loads = [n for n in prompt.values() if n["class_type"] == "WanLoRAMoE_LoadLoRAMoE"]
        assert {n["inputs"]["lora_moe"] for n in loads} == {"demo_lora_moe.safetensors"}
        assert all(("routing" in n["inputs"]) == (name != "6_experts_off") for n in loads)


def test_the_trained_file_holds_both_sets_and_learned_routers(demo):
    from moe_core.checkpoint import load_lora_moe

    root, _, _ = demo
    moe = load_lora_moe(root / "stage2" / "demo_lora_moe.safetensors")
    assert sorted(moe.sets) == ["high_noise", "low_noise"]
    assert moe.expert_names == ["Scissors", "Hook/Electrocautery", "Suction", "Other"]
    for aset in moe.sets.values():
        assert aset.router is not None
        ups = [e.up for pa in aset.modules.values() for e in pa.experts if e is not None]
        assert ups and any(float(u.abs().max()) > 0 for u in ups), "stage 2 trained the experts (up != 0)"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.videos = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "video":
            self.videos.append(a["src"])


def test_report_links_pictures_that_load_and_states_what_the_run_shows(demo):
    from PIL import Image

    _, out, _ = demo
    page = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    refs = _Refs()
    refs.feed(page)
    md_images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(refs.images) == sorted(md_images), "report.html and report.md show the same pictures"
    assert {"contact_sheet.png", "expert_usage.png", "loss_stage1.png", "gate_schedule_5_auto_routed_high_noise.png",
            "gate_schedule_5_auto_routed_low_noise.png"} <= set(refs.images)
    assert any(i.startswith("stage2_") for i in refs.images), "stage 2's pictures are in the report"
    for src in refs.images:
        with Image.open(out / src) as im:
            im.load()
            assert im.width > 100 and im.height > 50, src
    assert sorted(refs.videos) == sorted(f"{c}.mp4" for c in CLIPS)
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.height >= len(CLIPS) * FAST["height"] and sheet.width >= FAST["frames"] * FAST["width"]
    for text in (page, md):
        assert "Tiny random models make no useful videos" in text
        assert "found the named instrument in 4 of 4 instrument prompts" in text


def test_report_opens_in_chromium_with_every_image_loaded(demo):
    _, out, _ = demo
    state, errors = cdp.report_page_state(out / "report.html")
    assert state["title"] == "WAN LoRA-MoE: demo run"
    assert len(state["images"]) >= 5
    not_loaded = [src for src, complete, width in state["images"] if not (complete and width > 0)]
    assert not not_loaded, f"images that did not load: {not_loaded}"
    assert not errors, errors


# ------------------------------------------------------------------------------------------- config

def test_mission_config_sections_go_to_their_stage(tmp_path):
    from training.config import ConfigError, config_to_dict
    from training.mission_config import load_mission_config, mission_toml

    mc = load_mission_config(None, ["stage2.train.max_steps=7", "train.cpu_threads=2", "generate.steps=6"])
    assert mc.stage1.train.max_steps == 40 and mc.stage2.train.max_steps == 7
    assert mc.stage1.train.cpu_threads == 2 and mc.stage2.train.cpu_threads == 2
    assert mc.stage2.validation.holdout_fraction == 0.25 and mc.own.generate.steps == 6
    fast = load_mission_config(None, fast=True)
    assert (fast.stage1.demo.width, fast.stage1.demo.frames, fast.own.generate.steps) == (32, 5, 4)
    # --print-config's output is a config file that gives the same run
    (tmp_path / "my.toml").write_text(mission_toml(fast), encoding="utf-8")
    again = load_mission_config(tmp_path / "my.toml")
    for part in ("stage1", "stage2", "own"):
        assert config_to_dict(getattr(again, part)) == config_to_dict(getattr(fast, part)), part
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \[trian\]"):
        load_mission_config(None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match=r"stage 1\).*train.epochs_x"):
        load_mission_config(None, ["stage1.train.epochs_x=3"])
    with pytest.raises(ConfigError, match="--fast is the demo's CI mode"):
        load_mission_config(REPO / "training" / "configs" / "stage1.toml", fast=True)
    with pytest.raises(ConfigError, match="model.dit_high and model.dit_low"):
        load_mission_config(None, ["demo.enabled=false"])
    with pytest.raises(ConfigError, match="generate.frames: must be 4n\\+1"):
        load_mission_config(None, ["generate.frames=8"])
