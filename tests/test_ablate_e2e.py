"""The ablation runner end to end: tiny random A14B-style DiTs (the demo's builder), the random WAN 2.1 VAE, the
demo's hashing text encoder, LoRA-MoE files for every kind of arm, the demo's synthetic clips as the real set.

One run is interrupted after three renders, one finished clip is then cut short, and the CLI's ``main``
(``python -m training.ablate --config``, in process) resumes it: the renders ComfyUI made are counted in its
output folder (an independent count), the report's numbers are checked against hand computations (the cycle's
and the forced expert's gates per step, expert usage, the learned router's top choice by a numpy forward pass),
the clips are decoded with imageio-ffmpeg, and the report is opened in headless Chromium.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

import cdp
import eval_fixtures
import pack_fixtures
import server_harness

REPO = pack_fixtures.REPO_ROOT
NAMES = ["Scissors", "Hook/Electrocautery", "Suction", "Other"]
PROMPTS = ["腹腔镜手术中，剪刀剪开组织并游离筋膜。"]
SEEDS = [3, 4]
ARMS = ["base_only", "experts", "teacher_only", "top1", "always_on", "forced_scissors", "cycle", "n_experts_2",
        "roi_weighted", "roi_uniform"]
SIZE, FRAMES, STEPS, SHIFT = 16, 5, 4, 8.0
TIMINGS: dict[str, float] = {}


def _moe(names, seed):
    from moe_core.checkpoint import LoraMoE

    sets = {s: pack_fixtures.tiny_adapter_set(s, seed + i, names, blocks=(0, 1), ffn_blocks=(1,))
            for i, s in enumerate(("high_noise", "low_noise"))}
    return LoraMoE(list(names), sets)


def build_assets(root: Path) -> dict[str, Path]:
    """The files an ablation config names, all tiny (the VAE is the real architecture, cached per machine)."""
    from training.data.synthetic import make_synthetic_dataset
    from training.demo import build_random_wan_dit

    root.mkdir(parents=True, exist_ok=True)
    a = {"dit_high": root / "tiny_high.safetensors", "dit_low": root / "tiny_low.safetensors",
         "vae": root / "vae.safetensors", "main": root / "main.safetensors", "two": root / "two.safetensors",
         "roi": root / "roi" / "moe.safetensors", "uniform": root / "uniform" / "moe.safetensors",
         "classifier": root / "colour_classifier.pt"}
    for seed, key in ((0, "dit_high"), (1, "dit_low")):
        save_file(build_random_wan_dit(2, 128, seed=seed), str(a[key]))
    os.symlink(server_harness.cached_vae_file(), a["vae"])
    for key, names, seed in (("main", NAMES, 10), ("two", ["Scissors", "Other"], 20), ("roi", NAMES, 30),
                             ("uniform", NAMES, 40)):
        a[key].parent.mkdir(exist_ok=True)
        pack_fixtures.write_moe(_moe(names, seed), a[key])
    a["real"] = make_synthetic_dataset(root / "real", n_per_class=1, width=SIZE, height=SIZE, fps=16.0,
                                       seconds=FRAMES / 16)
    eval_fixtures.save_script(eval_fixtures.ColourClassifier(), a["classifier"])
    return a


def write_config(path: Path, a: dict[str, Path], run: Path, extra: str = "", arms=ARMS, sha256: str = "") -> Path:
    path.write_text(f"""
[ablation]
out_dir = "{run / 'out'}"
comfy_dir = "{run / 'comfy'}"
workflow = "{REPO / 'workflows' / 'wan22_a14b_t2v_lora_moe.json'}"
arms = {json.dumps(arms)}

[models]
dit_high = "{a['dit_high']}"
dit_low = "{a['dit_low']}"
vae = "{a['vae']}"
text_encoder = "demo:hash"
lora_moe = "{a['main']}"
expert_count_files = ["{a['two']}"]
roi_weighted = "{a['roi']}"
roi_uniform = "{a['uniform']}"

[render]
prompts = {json.dumps(PROMPTS, ensure_ascii=False)}
seeds = {SEEDS}
steps = {STEPS}
width = {SIZE}
height = {SIZE}
frames = {FRAMES}
cpu_threads = 1

[report]
sheet_seeds = {SEEDS}

[evaluation]
real = "{a['real']}"
classifier = "{a['classifier']}"
flow_scale = 1.0
bootstrap = 200
{extra}
{sha256}
""", encoding="utf-8")
    return path


def comfy_renders(run: Path) -> list[Path]:
    """The mp4s ComfyUI's SaveVideo wrote: one per render it ran."""
    return sorted((run / "comfy" / "output").rglob("*.mp4"))


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    from training.ablate import main, run_ablation
    from training.ablation.config import load_ablation_config

    root = tmp_path_factory.mktemp("ablate")
    t0 = time.monotonic()
    assets = build_assets(root / "assets")
    cfg_path = write_config(root / "ablate.toml", assets, root)
    TIMINGS["assets_s"] = round(time.monotonic() - t0, 1)

    # 1. interrupted after three renders
    seen: list[str] = []

    def stop_after_three(job, entry):
        seen.append(job.key)
        if len(seen) == 3:
            raise KeyboardInterrupt

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_ablation(load_ablation_config(cfg_path), log_fn=lambda s: None, on_render=stop_after_three)
    TIMINGS["interrupted_run_s"] = round(time.monotonic() - t0, 1)
    first = comfy_renders(root)
    manifest = json.loads((root / "out" / "renders.json").read_text(encoding="utf-8"))["renders"]
    # 2. one finished clip cut short (as a crash while copying would leave it): it must be rendered again
    cut = root / "out" / manifest[seen[1]]["video"]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    # 3. the command resumes it
    stdout, stderr = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["--config", str(cfg_path)])
    TIMINGS["resumed_run_s"] = round(time.monotonic() - t0, 1)
    (root / "resume.log").write_text(stdout.getvalue() + stderr.getvalue())
    assert code == 0, (stdout.getvalue() + stderr.getvalue())[-6000:]
    return {"root": root, "out": root / "out", "assets": assets, "seen": seen, "first": first,
            "second": comfy_renders(root), "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
            "report": json.loads((root / "out" / "report.json").read_text(encoding="utf-8"))}


def test_resume_renders_only_what_is_not_finished(ablation):
    total = len(ARMS) * len(PROMPTS) * len(SEEDS)
    assert len(ablation["first"]) == 3, "the interrupted run rendered three clips"
    # the resumed run rendered the 17 never rendered and the one cut short: ComfyUI's own outputs say so
    assert len(ablation["second"]) == 3 + (total - 3) + 1
    render = ablation["report"]["render"]
    assert (render["rendered"], render["skipped"], render["total"]) == (total - 2, 2, total)
    assert f"{total} ({len(ARMS)} arms x 1 prompts x 2 seeds); 2 finished in an earlier run (kept), " \
           f"{total - 2} to render" in ablation["stdout"]
    assert "=== [2/5] renders" in ablation["stdout"] and "rendering:" in ablation["stderr"], "progress is shown"


def test_every_arm_rendered_the_graph_it_is_about(ablation):
    import imageio_ffmpeg

    out, report = ablation["out"], ablation["report"]
    assert [a["name"] for a in report["arms"]] == ARMS
    frames = {}
    for key, rec in report["renders"].items():
        reader = imageio_ffmpeg.read_frames(str(out / rec["video"]))
        meta = next(reader)
        f = np.stack([np.frombuffer(x, np.uint8).reshape(SIZE, SIZE, 3) for x in reader])
        assert meta["size"] == (SIZE, SIZE) and f.shape[0] == FRAMES, key
        frames[key] = f.astype(np.float32)
        sidecar = json.loads((out / rec["video"]).with_suffix(".json").read_text(encoding="utf-8"))
        assert sidecar["seed"] in SEEDS and sidecar["prompt_id"] == "p01" and sidecar["instrument"] == "Scissors"
    for seed in SEEDS:  # the experts act on the video; seeds give other videos
        assert np.abs(frames[f"experts/p01_seed{seed}"] - frames[f"base_only/p01_seed{seed}"]).mean() > 0.2
    assert np.abs(frames["experts/p01_seed3"] - frames["experts/p01_seed4"]).mean() > 1.0

    def graph(arm):
        return json.loads((out / report["renders"][f"{arm}/p01_seed3"]["api_prompt"]).read_text(encoding="utf-8"))

    def nodes(g, kind):
        return [n for n in g.values() if n["class_type"] == kind]

    assert all("routing" not in n["inputs"] for n in nodes(graph("base_only"), "WanLoRAMoE_LoadLoRAMoE"))
    assert nodes(graph("experts"), "WanLoRAMoE_PromptRouter")[0]["inputs"]["mode"] == "learned-from-file"
    assert nodes(graph("teacher_only"), "WanLoRAMoE_PromptRouter")[0]["inputs"]["mode"] == "rule-based"
    assert nodes(graph("top1"), "WanLoRAMoE_PromptRouter")[0]["inputs"]["top_k"] == 1
    assert {n["inputs"]["preset"] for n in nodes(graph("always_on"), "WanLoRAMoE_TimestepBand")} == {"always on"}
    for arm, instrument in (("forced_scissors", "Scissors"), ("cycle", "cycle per step")):
        g = graph(arm)
        (override_id, override), = [(k, n) for k, n in g.items() if n["class_type"] == "WanLoRAMoE_GateOverride"]
        assert override["inputs"]["instrument"] == instrument
        assert all(n["inputs"]["routing"] == [override_id, 0] for n in nodes(g, "WanLoRAMoE_LoadLoRAMoE"))
    files = {arm: {n["inputs"]["lora_moe"] for n in nodes(graph(arm), "WanLoRAMoE_LoadLoRAMoE")} for arm in ARMS}
    assert files["n_experts_2"] == {"two.safetensors"} and files["experts"] == {"main.safetensors"}
    assert len(files["roi_weighted"] | files["roi_uniform"]) == 2, "two files of the same name, linked apart"
    samplers = sorted((n["inputs"]["start_at_step"], n["inputs"]["noise_seed"]) for n in nodes(graph("cycle"),
                                                                                             "KSamplerAdvanced"))
    assert samplers[0] == (0, 3) and samplers[1][0] == 3  # seed 3; by hand: t = 1, .96, .889, .727 -> split at step 3


def test_gate_schedules_and_usage_match_a_hand_computation(ablation):
    arms = {a["name"]: a for a in ablation["report"]["arms"]}
    # 4 steps, shift 8: t = 1, .96, .889, .727, all in the band's full level (t >= 0.6); high-noise DiT runs
    # steps 0-2, the low-noise DiT step 3 with a cycle of its own (each KSamplerAdvanced is a sampling run)
    onehot = [[1.0 if e == k else 0.0 for e in range(4)] for k in range(4)]
    assert arms["cycle"]["gate_schedule"] == [onehot[0], onehot[1], onehot[2], onehot[0]]
    assert arms["cycle"]["usage"] == pytest.approx([0.5, 0.25, 0.25, 0.0])
    assert arms["forced_scissors"]["gate_schedule"] == [onehot[0]] * 4
    assert arms["forced_scissors"]["usage"] == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert arms["base_only"]["usage"] == [0.0] * 4 and arms["base_only"]["gate_schedule"] == []
    # the rule router on a prompt naming only scissors: gate 1 on Scissors at every step
    assert arms["teacher_only"]["gate_schedule"] == [onehot[0]] * 4
    assert len(arms["n_experts_2"]["usage"]) == 2 and sum(arms["n_experts_2"]["usage"]) == pytest.approx(1.0)
    for name in ("experts", "top1", "always_on"):
        assert all(sum(step) == pytest.approx(1.0, abs=1e-5) for step in arms[name]["gate_schedule"]), name
        assert all(sum(g > 0 for g in step) <= (1 if name == "top1" else 2) for step in arms[name]["gate_schedule"])


def _numpy_router_top(sd, teacher, t):
    """The learned router by hand: silu(W1 [log max(w, 1e-3), t] + b1) -> W2 . + b2, then argmax."""
    x = np.concatenate([np.log(np.maximum(teacher, 1e-3)), [t]])
    h = sd["fc1.weight"].numpy() @ x + sd["fc1.bias"].numpy()
    h = h / (1 + np.exp(-h))
    return int(np.argmax(sd["fc2.weight"].numpy() @ h + sd["fc2.bias"].numpy()))


def test_router_confusion_matches_a_numpy_forward_pass(ablation):
    from moe_core.checkpoint import load_lora_moe

    conf = ablation["report"]["router_confusion"]
    moe = load_lora_moe(ablation["assets"]["main"])
    levels = [i / 20 for i in range(21)]
    assert conf["levels"] == pytest.approx(levels)
    total = np.zeros((4, 4), int)
    for set_name in ("high_noise", "low_noise"):
        cm = np.zeros((4, 4), int)
        sd = moe.sets[set_name].router
        for label, prompt in enumerate(PROMPTS):  # each prompt names one instrument: teacher one-hot
            teacher = np.eye(4)[label]
            for t in levels:
                if (t >= 0.875) == (set_name == "high_noise"):
                    cm[label, _numpy_router_top(sd, teacher, t)] += 1
        assert conf["sets"][set_name]["matrix"] == cm.tolist(), set_name
        total += cm
    assert conf["total"]["matrix"] == total.tolist() and conf["total"]["n"] == len(PROMPTS) * 21
    assert conf["total"]["agreement"] == pytest.approx(np.trace(total) / total.sum())


def test_report_has_a_table_per_metric_with_intervals(ablation):
    out, report = ablation["out"], ablation["report"]
    ev = report["evaluation"]
    assert ev is not None and report["evaluation_error"] is None
    psnr = ev["metrics"]["temporal"]
    assert set(psnr) == {"real", *ARMS}
    for arm in ARMS:
        assert psnr[arm]["warped_psnr"]["n"] == 2 and psnr[arm]["warped_psnr"]["ci"] is not None, arm
    assert ev["paired"]["experts vs base_only"]["n_pairs"] == 2
    assert set(ev["metrics"]["identity"]) == {"real", *ARMS}
    page = (out / "report.html").read_text(encoding="utf-8")
    for title in ("Temporal stability: warped_psnr", "Temporal stability: motion_px", "Identity: accuracy",
                  "Identity: macro_f1"):
        assert f"<h3>{title}</h3>" in page, title
    assert "Wilson [" in page and "real (ceiling)" in page and "base_only (reference)" in page
    assert (out / "evaluation" / "report.json").is_file()


def test_report_opens_in_chromium_with_every_image_loaded(ablation):
    out = ablation["out"]
    state, errors = cdp.report_page_state(out / "report.html", "tables: document.querySelectorAll('table').length")
    assert state["title"] == "WAN LoRA-MoE: ablation"
    srcs = [s for s, _, _ in state["images"]]
    # per seed shown a contact sheet and x-t slices; expert usage (4-expert and 2-expert files); 2 schedules per
    # arm with experts
    assert {"pictures/sheet_p01_seed3.png", "pictures/xt_p01_seed4.png", "pictures/expert_usage_1.png",
            "pictures/expert_usage_2.png", "pictures/schedule_cycle_low_noise.png"} <= set(srcs)
    assert len(srcs) == 2 * 2 + 2 + 2 * (len(ARMS) - 1)
    assert not [s for s, complete, width in state["images"] if not (complete and width > 0)], state["images"]
    assert state["tables"] >= 8 and not errors, errors


def test_contact_sheet_has_a_row_per_arm_and_x_t_slices_follow_the_clip(ablation):
    from PIL import Image

    from training.ablation.pictures import xt_slice
    from training.report import read_video

    out = ablation["out"]
    with Image.open(out / "pictures" / "sheet_p01_seed3.png") as sheet:
        assert sheet.height >= len(ARMS) * SIZE * 4, "one enlarged row per arm"
    _, frames = read_video(out / "clips" / "cycle" / "p01_seed3.mp4")
    assert np.array_equal(xt_slice(frames, 0.5), frames[:, 8, :, :])
    print("timings:", TIMINGS)


def test_a_finished_run_renders_nothing_and_starts_no_comfyui(ablation, tmp_path):
    """The run folder copied elsewhere (the fingerprints name the model files, not the folder): all finished."""
    import shutil

    from training.ablate import run_ablation
    from training.ablation.config import load_ablation_config

    out = tmp_path / "copy"
    shutil.copytree(ablation["out"], out)
    # a clip an earlier config left in an arm's folder is not this run's: never evaluated
    shutil.copyfile(out / "clips" / "cycle" / "p01_seed3.mp4", out / "clips" / "cycle" / "p09_seed0.mp4")
    cfg = load_ablation_config(ablation["root"] / "ablate.toml", [f"ablation.out_dir={out}",
                                                                 'ablation.arms=["base_only", "cycle"]'])
    lines: list[str] = []
    before = len(comfy_renders(ablation["root"]))
    result = run_ablation(cfg, log_fn=lines.append)
    assert (result.rendered, result.skipped) == (0, 4)
    assert not any("starting ComfyUI" in line for line in lines)
    assert len(comfy_renders(ablation["root"])) == before
    report = json.loads(result.report_json.read_text(encoding="utf-8"))
    assert [a["name"] for a in report["arms"]] == ["base_only", "cycle"]
    assert report["render"]["server_start_s"] is None
    assert report["evaluation"]["sets"]["cycle"]["clips"] == 2
