"""Validation renders (``output.render_every``) in stage 1 and stage 2, on a tiny random A14B pair and a random
WAN 2.1 VAE (the real architecture, through ComfyUI's loader).

The oracle of a render is the node path: the checkpoint written at that step, loaded by ``moe_core``'s
``apply_lora_moe`` onto DiTs freshly loaded by ComfyUI, sampled by ComfyUI's sampler (ModelSamplingSD3, two
KSamplerAdvanced passes split at the boundary). Renders must leave training as it was: the metrics and final
LoRAs of a run with renders equal those of the same run without. The cache is made with the pooling stand-in
encoder (the VAE's encoder is slow on a CPU and plays no part in a T2V render); decoding uses the real VAE.

I2V A14B (a tiny pair with 36 input channels): the render is the I2V workflow's graph, core ``WanImageToVideo`` on
the instrument's first window's first frame (cut from the clip independently here) with the pair split at the I2V
boundary 0.9; another start image (``output.render_start_image``) changes the clip; stage 2 finds the start frames
through its training split. TI2V 5B needs the big WAN 2.2 VAE: ``test_validation_render_ti2v.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import comfy.model_management
from comfy_extras.nodes_model_advanced import ModelSamplingSD3

import train_fixtures as tf
import wan_fixtures
from moe_core.checkpoint import load_lora_moe
from moe_core.patch import apply_lora_moe
from moe_core.routing import rule_route
from training.config import ConfigError, Stage1Config, config_from_dict
from training.data.synthetic import HashTextEncoder, PoolingVideoEncoder, make_synthetic_dataset
from training.data.video_io import write_video
from training.demo import build_random_wan_vae
from training.generate import boundary_step
from training.mission import _slug
from training.models import load_dit
from training.report import read_video
from training.stage1 import main as stage1_main, run_stage1
from training.stage2 import run_stage2
from training.stage2_config import Stage2Config
from training.validation_render import (RenderSettings, ValidationRenderer, decode, render_prompts,
                                        sample_prompt)

QUIET = lambda *_: None  # noqa: E731
SIZE, FRAMES = 16, 5  # 16x16 pixels, 5 frames: a [16, 2, 2, 2] latent (decoding is the slow part)
STEPS = 3  # at shift 8: two high-noise steps, then one low-noise step
TIMING = ("step_time_s", "samples_per_s", "dit_load_s")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tf.Workspace:
    root = tmp_path_factory.mktemp("render_ws")
    manifest = make_synthetic_dataset(root / "data", n_per_class=1, seed=5, width=SIZE, height=SIZE, fps=16.0,
                                      seconds=FRAMES / 16)
    return tf.Workspace(root, manifest, root / "cache", tf.write_dit(root / "models" / "high.safetensors", 0),
                        tf.write_dit(root / "models" / "low.safetensors", 1))


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("render_vae") / "random_wan21_vae.safetensors"
    save_file(build_random_wan_vae(seed=0), str(path))
    return path


def encoders():
    return PoolingVideoEncoder(), HashTextEncoder()


def config_dict(ws, vae_file, out: Path, **output) -> dict:
    d = tf.config_dict(ws, out, pair=True, train={"max_steps": 3, "learning_rate": 2e-2},
                       output={"render_steps": STEPS, "save_every": 2, **output})
    d["data"].update(vae=str(vae_file), max_frames=FRAMES, target_area=SIZE * SIZE)
    d["model"]["dit_schedule"] = "alternate"  # each DiT trains before the render at step 2
    return d


def metrics(result) -> list[dict]:
    lines = [json.loads(x) for x in Path(result.metrics).read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING} for m in lines]


def renderer_of(trainer) -> ValidationRenderer:
    return next(cb for cb in trainer.callbacks if isinstance(cb, ValidationRenderer))


@pytest.fixture(scope="module")
def stage1_runs(ws, vae_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("render_s1")
    torch.manual_seed(1234)  # both runs start from the same global RNG state (compared at the end)
    rendered = run_stage1(config_from_dict(Stage1Config, config_dict(ws, vae_file, root / "r", render_every=2), "t"),
                          encoders=encoders(), log_fn=QUIET)
    torch.manual_seed(1234)
    plain = run_stage1(config_from_dict(Stage1Config, config_dict(ws, vae_file, root / "p"), "t"),
                       encoders=encoders(), log_fn=QUIET)
    return rendered, plain


@pytest.fixture(scope="module")
def stage2_runs(ws, vae_file, stage1_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("render_s2")
    loras = stage1_runs[0].loras
    runs = []
    for name, every in (("r", 2), ("p", 0)):
        d = config_dict(ws, vae_file, root / name, render_every=every, name="moe")
        d.update(router={"warm_start_steps": 10}, validation={"holdout_fraction": 0.0})
        cfg = config_from_dict(Stage2Config, d, "t")
        runs.append(run_stage2(cfg, base_loras=loras, encoders=encoders(), log_fn=QUIET))
    return runs


# ------------------------------------------------------------------------------------------- oracle

@pytest.fixture(scope="module")
def plain_dits(ws):
    return {"high_noise": load_dit(ws.dit), "low_noise": load_dit(ws.dit_low)}


def node_path_latent(plain_dits, moe_path: Path | None, prompt, routing_mode: str | None,
                     alpha_base: float | None = None) -> torch.Tensor:
    """What the bundled workflow's graph samples: Load LoRA-MoE per DiT (from the checkpoint file), then
    ModelSamplingSD3 (shift 8), KSamplerAdvanced high (noise, leftover noise) and low (no noise)."""
    moe = load_lora_moe(moe_path) if moe_path is not None else None
    split = boundary_step(STEPS, 8.0, 0.875)
    passes = [p for p in (("high_noise", 0, split), ("low_noise", split, STEPS)) if p[2] > p[1]]
    x = torch.zeros((1, *prompt.latent_shape))
    for k, (name, start, end) in enumerate(passes):
        model = plain_dits[name]
        if moe is not None:
            routing = None
            if routing_mode is not None:
                d = moe.defaults
                routing = rule_route(prompt.caption, moe.expert_names, keywords=moe.expert_keywords,
                                     fallback=prompt.instrument, top_k=d.top_k, temperature=d.temperature,
                                     mode=routing_mode)
            model = apply_lora_moe(model, moe, adapter_set=name, routing=routing, alpha_base=alpha_base)
        model = ModelSamplingSD3().patch(model, 8.0)[0]
        x = wan_fixtures.sample(model, prompt.context[None], torch.zeros_like(prompt.context[None]), seed=0,
                                steps=STEPS, cfg=1.0, latent=x, add_noise=k == 0, start_step=start, last_step=end,
                                force_full_denoise=k == len(passes) - 1)
    return x.float()


def assert_not_loaded_by_comfy(trainer):
    models = {id(d.mp.model) for d in trainer.dits}
    assert not [lm for lm in comfy.model_management.current_loaded_models if id(lm.model.model) in models]


# ------------------------------------------------------------------------------------------- stage 1

def test_stage1_renders_clips_per_instrument_at_every_nth_step(stage1_runs, tmp_path):
    rendered, _ = stage1_runs
    renders = rendered.out_dir / "renders"
    assert sorted(p.name for p in renders.iterdir()) == ["step_000002"]  # 3 steps, every 2
    step = renders / "step_000002"
    names = rendered.trainer.expert_names
    assert sorted(p.name for p in step.glob("*.mp4")) == sorted(f"{_slug(n)}.mp4" for n in names)
    renderer = renderer_of(rendered.trainer)
    vae = renderer.vae
    for name in names:
        fps, frames = read_video(step / f"{_slug(name)}.mp4")
        assert fps == 16.0 and frames.shape == (FRAMES, SIZE, SIZE, 3)  # 1 + 4 * (2 latent frames - 1)
        # the file holds the VAE's decoding of the sampled latent (H.264 is lossy, worst of all on the noise a
        # random VAE makes: compared with the same frames through the same writer)
        again = write_video(tmp_path / f"{_slug(name)}.mp4", decode(vae, renderer.latents[name]), 16.0)
        assert np.abs(frames.astype(np.int16) - read_video(again)[1].astype(np.int16)).mean() < 1.0
    with Image.open(step / "contact_sheet.png") as sheet:
        assert sheet.size[0] > SIZE * FRAMES and sheet.size[1] > SIZE * len(names)


def test_stage1_renders_change_nothing_in_training(stage1_runs):
    rendered, plain = stage1_runs
    assert len(metrics(rendered)) == 3 and metrics(rendered) == metrics(plain)
    for name, path in rendered.loras.items():
        a, b = tf.lora_tensors(path), tf.lora_tensors(plain.loras[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ComfyUI's noise seeds the global generator; the state a resume restores is the one without renders
    states = [torch.load(r.out_dir / "checkpoints" / "final.state.pt", weights_only=True)["rng"] for r in stage1_runs]
    assert torch.equal(states[0]["torch"], states[1]["torch"]) and states[0]["numpy"] == states[1]["numpy"]
    assert_not_loaded_by_comfy(rendered.trainer)


def test_stage1_render_is_the_node_path_with_that_steps_checkpoint(stage1_runs, plain_dits):
    rendered, _ = stage1_runs
    trainer = rendered.trainer
    renderer = renderer_of(trainer)
    checkpoint = rendered.out_dir / "checkpoints" / "step_000002.safetensors"
    settings = RenderSettings(every=2, steps=STEPS)
    for prompt in render_prompts(trainer):
        got = renderer.latents[prompt.instrument]  # rendered at step 2, during training
        want = node_path_latent(plain_dits, checkpoint, prompt, None, alpha_base=1.0)
        torch.testing.assert_close(got, want, rtol=0.0, atol=1e-6)
        # the base LoRA at strength 0 is the plain model, and the trained adapters make a difference
        off = sample_prompt(trainer, prompt, settings, alpha_base=0.0)
        torch.testing.assert_close(off, node_path_latent(plain_dits, None, prompt, None), rtol=0.0, atol=1e-6)
        final = sample_prompt(trainer, prompt, settings)
        assert float((final - off).abs().max()) > 1e-3
    assert_not_loaded_by_comfy(trainer)


def test_a_demo_vae_is_refused_at_start_naming_the_key(ws, tmp_path, capsys):
    d = config_dict(ws, "demo:pooling", tmp_path / "o", render_every=5)
    with pytest.raises(ConfigError, match=r"output\.render_every.*data\.vae = 'demo:pooling'"):
        config_from_dict(Stage1Config, d, "t")
    toml = tmp_path / "run.toml"
    toml.write_text('[data]\nvae = "demo:pooling"\n[output]\nrender_every = 5\n', encoding="utf-8")
    assert stage1_main(["--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "output.render_every" in err and "stand-in" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- stage 2

def test_stage2_renders_routed_clips_and_change_nothing(stage2_runs, plain_dits):
    rendered, plain = stage2_runs
    assert len(metrics(rendered)) == 3 and metrics(rendered) == metrics(plain)
    a, b = load_lora_moe(rendered.lora_moe), load_lora_moe(plain.lora_moe)
    for name, aset in a.sets.items():
        for module, pa in aset.modules.items():
            other = b.sets[name].modules[module]
            assert all(torch.equal(x.up, y.up) and torch.equal(x.down, y.down)
                       for x, y in zip(pa.experts, other.experts))
        assert all(torch.equal(v, b.sets[name].router[k]) for k, v in aset.router.items())
    step = rendered.out_dir / "renders" / "step_000002"
    trainer = rendered.trainer
    assert sorted(p.name for p in step.glob("*.mp4")) == sorted(f"{_slug(n)}.mp4" for n in trainer.expert_names)
    fps, frames = read_video(step / f"{_slug(trainer.expert_names[0])}.mp4")
    assert fps == 16.0 and frames.shape == (FRAMES, SIZE, SIZE, 3)

    renderer = renderer_of(trainer)
    checkpoint = rendered.out_dir / "checkpoints" / "step_000002.safetensors"
    settings = RenderSettings(every=2, steps=STEPS)
    for prompt in render_prompts(trainer):
        # the learned router of each DiT routes the caption, with the file's defaults, at step 2's weights
        want = node_path_latent(plain_dits, checkpoint, prompt, "learned")
        torch.testing.assert_close(renderer.latents[prompt.instrument], want, rtol=0.0, atol=1e-6)
        routed = sample_prompt(trainer, prompt, settings)
        off = sample_prompt(trainer, prompt, settings, experts=False)
        torch.testing.assert_close(off, node_path_latent(plain_dits, rendered.lora_moe, prompt, None),
                                   rtol=0.0, atol=1e-6)
        assert float((routed - off).abs().max()) > 1e-4  # the trained experts act in the render
    assert_not_loaded_by_comfy(trainer)


# ------------------------------------------------------------------------------ I2V A14B

I2V_STEPS = 4  # at shift 8 the I2V boundary 0.9 splits 2 + 2 (the T2V boundary 0.875 would split 3 + 1)


@pytest.fixture(scope="module")
def i2v_run(vae_file, tmp_path_factory):
    """Stage 1 on a tiny I2V A14B pair (36 input channels), rendering at step 2 with the random WAN 2.1 VAE."""
    root = tmp_path_factory.mktemp("render_i2v")
    manifest = make_synthetic_dataset(root / "data", n_per_class=1, seed=7, width=SIZE, height=SIZE, fps=16.0,
                                      seconds=FRAMES / 16)
    dits = {}
    for name, seed in (("high", 0), ("low", 1)):
        sd = wan_fixtures.tiny_wan_state_dict(seed, num_layers=2, dim=128, ffn_dim=256, family="i2v")
        dits[name] = root / "models" / f"i2v_{name}.safetensors"
        dits[name].parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(dits[name]))
    ws = tf.Workspace(root, manifest, root / "cache", dits["high"], dits["low"])
    d = tf.config_dict(ws, root / "out", pair=True, train={"max_steps": 3, "learning_rate": 2e-2},
                       output={"render_steps": I2V_STEPS, "save_every": 2, "render_every": 2})
    d["data"].update(vae=str(vae_file), max_frames=FRAMES, target_area=SIZE * SIZE)
    d["model"]["dit_schedule"] = "alternate"
    cfg = config_from_dict(Stage1Config, d, "t")
    result = run_stage1(cfg, encoders=(PoolingVideoEncoder.for_family("i2v"), HashTextEncoder()), log_fn=QUIET)
    return result, ws


def first_frame(ws, window: str) -> torch.Tensor:
    """Frame 0 of the clip's first window, cut independently of the renderer: [1, H, W, 3] in [0, 1]."""
    from training.data.manifest import load_manifest
    from training.data.video_io import ExtractionConfig, frames_to_tensor, load_clip

    record = next(r for r in load_manifest(ws.manifest) if r.name == window)
    config = ExtractionConfig(mode="head", max_frames=FRAMES, target_area=SIZE * SIZE, family="i2v")
    return frames_to_tensor(load_clip(record.video_path, config).windows[0].frames[:1]).float()


def i2v_node_path(plain_dits, checkpoint: Path, prompt, vae, start_image: torch.Tensor) -> torch.Tensor:
    """The I2V A14B workflow's graph: WanImageToVideo (start image), Load LoRA-MoE per DiT from the checkpoint,
    ModelSamplingSD3 (shift 8), KSamplerAdvanced high then low, split at the I2V boundary 0.9."""
    from comfy_extras.nodes_wan import WanImageToVideo

    c, f, h, w = prompt.latent_shape
    positive, negative, latent = WanImageToVideo.execute(
        [[prompt.context[None], {}]], [[torch.zeros_like(prompt.context[None]), {}]], vae, width=8 * w,
        height=8 * h, length=1 + 4 * (f - 1), batch_size=1, start_image=start_image).args
    moe = load_lora_moe(checkpoint)
    split = boundary_step(I2V_STEPS, 8.0, 0.9)
    x = latent["samples"]
    for k, (name, start, end) in enumerate((("high_noise", 0, split), ("low_noise", split, I2V_STEPS))):
        model = apply_lora_moe(plain_dits[name], moe, adapter_set=name, routing=None, alpha_base=1.0)
        model = ModelSamplingSD3().patch(model, 8.0)[0]
        x = wan_fixtures.sample(model, positive, negative, seed=0, steps=I2V_STEPS, cfg=1.0, latent=x,
                                add_noise=k == 0, start_step=start, last_step=end, force_full_denoise=k == 1)
    return x.float()


def test_i2v_renders_are_the_workflow_with_WanImageToVideo_and_the_clips_first_frame(i2v_run):
    result, ws = i2v_run
    trainer = result.trainer
    step = result.out_dir / "renders" / "step_000002"
    names = trainer.expert_names
    assert sorted(p.name for p in step.glob("*.mp4")) == sorted(f"{_slug(n)}.mp4" for n in names)
    fps, frames = read_video(step / f"{_slug(names[0])}.mp4")
    assert fps == 16.0 and frames.shape == (FRAMES, SIZE, SIZE, 3)
    record = json.loads((step / "render.json").read_text(encoding="utf-8"))
    assert record["family"] == "i2v" and record["boundary"] == 0.9
    renderer = renderer_of(trainer)
    plain = {"high_noise": load_dit(ws.dit), "low_noise": load_dit(ws.dit_low)}
    checkpoint = result.out_dir / "checkpoints" / "step_000002.safetensors"
    for prompt, clip in zip(render_prompts(trainer, renderer.extraction), record["clips"]):
        assert clip["instrument"] == prompt.instrument
        assert clip["start_image"].startswith(f"{prompt.window} window 0 frame 0")  # says where it came from
        image = first_frame(ws, prompt.window)
        assert torch.equal(prompt.start_image, image)
        want = i2v_node_path(plain, checkpoint, prompt, renderer.vae, image)
        torch.testing.assert_close(renderer.latents[prompt.instrument], want, rtol=0.0, atol=1e-6)
    assert_not_loaded_by_comfy(trainer)


def test_i2v_render_follows_the_start_image(i2v_run, tmp_path):
    result, _ = i2v_run
    trainer = result.trainer
    renderer = renderer_of(trainer)
    prompt = render_prompts(trainer, renderer.extraction)[0]
    settings = RenderSettings(every=2, steps=I2V_STEPS)
    again = sample_prompt(trainer, prompt, settings, vae=renderer.vae)  # final weights, conditioning made anew
    kept = sample_prompt(trainer, prompt, settings, inputs=renderer.inputs[prompt.instrument])
    torch.testing.assert_close(again, kept, rtol=0.0, atol=1e-6)
    # output.render_start_image: another picture (other size: the node resizes it) gives another clip
    path = tmp_path / "start.png"
    Image.fromarray(np.tile(np.array([[[200, 30, 90]]], np.uint8), (24, 40, 1))).save(path)
    other = render_prompts(trainer, renderer.extraction, path)[0]
    assert other.start_source == str(path) and other.start_image.shape == (1, 24, 40, 3)
    changed = sample_prompt(trainer, other, settings, vae=renderer.vae)
    assert changed.shape == again.shape and float((changed - again).abs().max()) > 1e-3
    assert_not_loaded_by_comfy(trainer)


def test_i2v_stage2_renders_from_its_training_split_and_a_bad_start_image_fails_at_start(i2v_run, tmp_path):
    import dataclasses

    from training.validation_render import attach_renderer

    result, ws = i2v_run
    d = tf.config_dict(ws, tmp_path / "s2", pair=True, train={"max_steps": 2, "learning_rate": 2e-2},
                       output={"render_steps": I2V_STEPS, "render_every": 2, "name": "moe"},
                       router={"warm_start_steps": 10}, validation={"holdout_fraction": 0.0})
    d["data"].update(vae=str(renderer_of(result.trainer).vae_path), max_frames=FRAMES, target_area=SIZE * SIZE)
    cfg = config_from_dict(Stage2Config, d, "t")
    run = run_stage2(cfg, base_loras=result.loras, encoders=(PoolingVideoEncoder.for_family("i2v"), HashTextEncoder()),
                     log_fn=QUIET)
    step = run.out_dir / "renders" / "step_000002"
    record = json.loads((step / "render.json").read_text(encoding="utf-8"))
    assert len(record["clips"]) == len(run.trainer.expert_names) == len(list(step.glob("*.mp4")))
    for clip in record["clips"]:  # the Subset of stage 2's training split leads back to each window's clip
        assert clip["start_image"].startswith(f"{clip['window']} window 0 frame 0")
    renderer = renderer_of(run.trainer)
    for prompt in renderer.prompts:
        assert torch.equal(prompt.start_image, first_frame(ws, prompt.window))
    assert_not_loaded_by_comfy(run.trainer)

    missing = tmp_path / "no_such_frame.png"
    bad = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, render_start_image=str(missing)))
    with pytest.raises(ValueError, match=r"output\.render_start_image = .*no_such_frame\.png"):
        attach_renderer(run.trainer, bad, QUIET)
