"""Validation renders (``output.render_every``) for WAN 2.2 TI2V 5B: one DiT, the 48-channel WAN 2.2 VAE, the start
image put into latent frame 0 by core ``Wan22ImageToVideoLatent``, clips at the family's 24 fps.

The oracle is the core node itself and the VAE: the rendered latent keeps the node's start-image latent in frame 0
(the sampler's noise mask), so the first decoded frame is the VAE's roundtrip of the start image, and another start
image gives another first frame. The VAE is the random WAN 2.2 VAE (``wan_fixtures.wan22_vae_file``), loaded once,
by the renderer, from ``data.vae`` (~5.5 GB resident): on a shared machine run this file under
``flock /tmp/wan22_vae.lock``. (The I2V and T2V renders are tested in ``test_validation_render.py``.)
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import comfy.model_management
from comfy_extras.nodes_wan import Wan22ImageToVideoLatent

import train_fixtures as tf
import wan_fixtures
from training.config import Stage1Config, config_from_dict
from training.data.synthetic import HashTextEncoder, PoolingVideoEncoder, make_synthetic_dataset
from training.report import read_video
from training.stage1 import run_stage1
from training.validation_render import RenderSettings, ValidationRenderer, decode, render_prompts, sample_prompt

QUIET = lambda *_: None  # noqa: E731
SIZE, FRAMES, STEPS = 32, 5, 3  # the WAN 2.2 VAE's 16x compression: a [48, 2, 2, 2] latent


@pytest.fixture(scope="module")
def ti2v_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("render_ti2v")
    manifest = make_synthetic_dataset(root / "data", n_per_class=1, seed=7, width=SIZE, height=SIZE, fps=24.0,
                                      seconds=FRAMES / 24)
    lines = manifest.read_text(encoding="utf-8").splitlines()
    manifest.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")  # two instruments: each render costs VAE time
    dit = root / "models" / "ti2v.safetensors"
    dit.parent.mkdir(parents=True)
    sd = wan_fixtures.tiny_wan_state_dict(2, num_layers=2, dim=128, ffn_dim=256, family="ti2v")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dit))
    ws = tf.Workspace(root, manifest, root / "cache", dit, dit)
    d = tf.config_dict(ws, root / "out", train={"max_steps": 2, "learning_rate": 2e-2},
                       output={"render_steps": STEPS, "render_every": 2})
    d["data"].update(vae=str(wan_fixtures.wan22_vae_file()), max_frames=FRAMES, target_area=SIZE * SIZE)
    cfg = config_from_dict(Stage1Config, d, "t")
    return run_stage1(cfg, encoders=(PoolingVideoEncoder.for_family("ti2v"), HashTextEncoder()), log_fn=QUIET)


def test_ti2v_renders_clips_whose_first_frame_is_the_start_image(ti2v_run, tmp_path):
    trainer = ti2v_run.trainer
    step = ti2v_run.out_dir / "renders" / "step_000002"
    record = json.loads((step / "render.json").read_text(encoding="utf-8"))
    files = [c["file"] for c in record["clips"]]
    assert len(files) == 2 and sorted(p.name for p in step.glob("*.mp4")) == sorted(files)
    fps, frames = read_video(step / files[0])
    assert fps == 24.0 and frames.shape == (FRAMES, SIZE, SIZE, 3)  # the family's fps
    assert record["family"] == "ti2v" and record["fps"] == 24.0 and record["boundary"] is None
    renderer = next(cb for cb in trainer.callbacks if isinstance(cb, ValidationRenderer))
    vae = renderer.vae
    assert vae.latent_channels == 48  # data.vae, loaded by the renderer, which leaves it to host memory again
    assert not [lm for lm in comfy.model_management.current_loaded_models if lm.model is vae.patcher]
    prompt = render_prompts(trainer, renderer.extraction)[0]
    assert record["clips"][0]["start_image"].startswith(f"{prompt.window} window 0 frame 0")

    def node_latent(image):  # the oracle: the core node on the start image
        with torch.no_grad():
            return Wan22ImageToVideoLatent.execute(vae, SIZE, SIZE, FRAMES, 1, start_image=image).args[0]["samples"]

    def roundtrip(image):  # the start image through the VAE: what frame 0 of the clip must show
        with torch.no_grad():
            return (vae.decode(vae.encode(image))[0, 0].float() * 255).clamp(0, 255).byte().numpy()

    rendered = renderer.latents[prompt.instrument]  # step 2
    assert rendered.shape == (1, 48, 2, 2, 2)
    want = node_latent(prompt.start_image)
    torch.testing.assert_close(rendered[:, :, 0], want[:, :, 0], rtol=1e-4, atol=1e-4)  # the kept start frame
    assert float((rendered[:, :, 1:] - want[:, :, 1:]).abs().max()) > 1e-2  # the rest is sampled
    first = decode(vae, rendered)[0]
    assert np.abs(first.astype(np.int16) - roundtrip(prompt.start_image).astype(np.int16)).max() <= 1

    # output.render_start_image: another picture (other size: the node resizes it) starts the clip instead
    path = tmp_path / "start.png"
    Image.fromarray(np.tile(np.array([[[200, 30, 90]]], np.uint8), (48, 64, 1))).save(path)
    other = render_prompts(trainer, renderer.extraction, path)[0]
    latent = sample_prompt(trainer, other, RenderSettings(every=2, steps=STEPS), vae=vae)
    want = node_latent(other.start_image)
    torch.testing.assert_close(latent[:, :, 0], want[:, :, 0], rtol=1e-4, atol=1e-4)
    other_first = decode(vae, latent)[0]
    assert np.abs(other_first.astype(np.int16) - first.astype(np.int16)).mean() > 5
