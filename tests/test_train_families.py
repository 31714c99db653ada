"""The trainer on WAN 2.2 I2V A14B and TI2V 5B: its forward is ComfyUI's sampling forward, and both stages run.

The key proof: for tiny DiTs of each family, loaded through ComfyUI's own loader, the trainer's DiT call
(``TrainableDiT.flow_sample`` + ``predict``) gets the same input, timestep and result as the model call of
ComfyUI's sampler, with the conditioning the real core nodes produce (``WanImageToVideo`` with a random WAN 2.1
VAE for I2V; the latent and noise mask of ``Wan22ImageToVideoLatent`` for TI2V) and ComfyUI's own conditioning
path (``comfy.samplers`` turning the CONDITIONING into model conds, ``KSamplerX0Inpaint`` keeping the start
frame, ``WAN22.process_timestep``). Adapters off, a stage-1 LoRA (ComfyUI's LoRA loader as the oracle) and
stage-2 gates (the pack's LoRA-MoE patch as the sampler runs it) all match.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils

import moe_fixtures as mf
import wan_fixtures
from moe_core.band import ALWAYS_ON, TimestepBand
from moe_core.checkpoint import load_lora_moe
from moe_core.families import FAMILIES
from moe_core.gating import slot_gains
from moe_core.patch import apply_lora_moe
from moe_core.routing import manual_route
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
from training.adapters import AdapterBank
from training.models import Placement, TrainableDiT, load_dit, model_info

LAYERS = 2
NAMES = list(DEFAULT_EXPERT_NAMES)
QUIET = lambda *_: None  # noqa: E731


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def _write_dit(path: Path, family: str, seed: int) -> Path:
    sd = wan_fixtures.tiny_wan_state_dict(seed, num_layers=LAYERS, dim=128, ffn_dim=256, family=family)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family_dits")
    return {"i2v_high": _write_dit(root / "i2v_high.safetensors", "i2v", 0),
            "i2v_low": _write_dit(root / "i2v_low.safetensors", "i2v", 1),
            "ti2v": _write_dit(root / "ti2v.safetensors", "ti2v", 2)}


@pytest.fixture(scope="module")
def wan21_vae():
    """A random WAN 2.1 VAE through ComfyUI's VAE class (the real architecture; ComfyUI fixes its width)."""
    from training.demo import build_random_wan_vae

    return comfy.sd.VAE(sd=build_random_wan_vae(seed=0))


# ------------------------------------------------------------------------------------- the oracle

def capture_dit_inputs(diffusion_model, seen: dict):
    """Record the first (latent, timestep) the DiT is called with into ``seen["dit"]``."""
    def hook(module, args, kwargs):
        seen.setdefault("dit", (args[0].detach().clone(), args[1].detach().clone()))

    return diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)


def comfy_model_call(mp, x_t: torch.Tensor, sigma: float, positive, negative, latent_image: torch.Tensor,
                     noise_mask: torch.Tensor | None = None):
    """One model call of ComfyUI's sampler on the noisy latent ``x_t`` at ``sigma`` (cfg 1), as any sampler step
    makes it: ``comfy.sample.sample_custom`` prepares the conds from the CONDITIONING (``encode_model_conds``
    -> ``extra_conds``: I2V's ``c_concat``, TI2V's ``denoise_mask``), the model wrapper keeps the start frame
    (``KSamplerX0Inpaint``), ``apply_model`` calls the DiT. Returns ``(denoised, dit_inputs)``: what the sampler
    gets back and the DiT's positional inputs (latent, timestep)."""
    seen = {}

    def one_call(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * x.new_ones([x.shape[0]])
        seen["denoised"] = model(x_t.to(x), s, **(extra_args or {}))
        return seen["denoised"]

    hook = capture_dit_inputs(mp.model.diffusion_model, seen)
    try:
        sampler = comfy.samplers.KSAMPLER(one_call)
        sigmas = torch.tensor([sigma, 0.0])
        comfy.sample.sample_custom(mp, torch.zeros_like(latent_image), 1.0, sampler, sigmas, positive, negative,
                                   latent_image, noise_mask=noise_mask, disable_pbar=True, seed=0)
    finally:
        hook.remove()
    return seen["denoised"], seen["dit"]


def sampler_state(mp, latent: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """The noisy latent at noise ``t`` as ComfyUI's sampler makes it from a latent (``process_latent_in``, then
    the model's ``noise_scaling``: ``sigma·noise + (1 − sigma)·latent``)."""
    return mp.model.model_sampling.noise_scaling(torch.tensor([t]), noise, mp.model.process_latent_in(latent))


def trainable(path: Path, moe, name: str = "default") -> TrainableDiT:
    """The DiT as the trainer loads it (``load_dit``), with the random LoRA-MoE's base and experts as its bank
    (the experts trainable, as in stage 2)."""
    mp = load_dit(path)
    bank = AdapterBank.from_adapter_set(moe.sets["default"], len(NAMES), range(1, 1 + len(NAMES)))
    cpu = torch.device("cpu")
    return TrainableDiT(name, mp, bank, (0.0, 1.0), Placement(cpu, cpu, offload_idle=False),
                        gradient_checkpointing=True, source=str(path))


def trainer_call(dit: TrainableDiT, gains, latent, noise, t, context, image_cond=None, start=None):
    """The trainer's DiT call for one sample: ``(clean estimate, DiT inputs)``."""
    seen = {}
    hook = capture_dit_inputs(dit.diffusion_model, seen)
    try:
        dit.activate()
        sample = dit.flow_sample(latent, noise, torch.tensor([t]), image_cond,
                                 None if start is None else torch.tensor([start]))
        with torch.no_grad(), dit.adapters(gains):
            v = dit.predict_sample(sample, context)
    finally:
        hook.remove()
    return sample, sample.clean_estimate(v), seen["dit"]


GATES = {"Scissors": 0.25, "Suction": 0.75}


#: a band whose factor depends on t (0.5 from 0.2, 1 from 0.9): the gates must see the sampler's sigma, also when
#: a TI2V start frame makes the DiT's timestep per frame (0 there)
BAND = TimestepBand(((0.2, 0.5), (0.9, 1.0)))


def _variants(dit: TrainableDiT, mp, moe, tmp: Path, t: float):
    """(name, trainer gains, oracle model): adapters off, the stage-1 LoRA alone, stage-2 gates at noise ``t``
    (trainer: ``slot_gains`` with the band's factor at the sample's t, as stage 2 computes them)."""
    n = len(NAMES)
    off = torch.zeros(1, 1 + n)
    lora = off.clone()
    lora[0, 0] = 1.0
    lora_ref = mf.comfy_lora_reference(mp, [(mf.set_parts(moe)["base"], 1.0)], tmp)
    gates = torch.tensor([[GATES.get(x, 0.0) for x in NAMES]])
    moe_gains = slot_gains(gates, BAND.factors(torch.tensor([t])), 0.7, 1.0)
    moe_ref = apply_lora_moe(mp, moe, adapter_set="default", alpha_base=0.7, alpha_expert=1.0,
                             routing=manual_route(GATES), band=BAND)
    return [("off", off, mp), ("stage-1 LoRA", lora, lora_ref), ("stage-2 gates", moe_gains, moe_ref)]


def _differ(results) -> None:
    """The adapter variants change the prediction (so each comparison tested the adapters, not just the DiT)."""
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            assert (results[i] - results[j]).abs().max() > 1e-4, (i, j)


def _inputs(shape, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(1, 8, 4096, generator=g)


# --------------------------------------------------------------------------------------------- I2V

def test_i2v_training_forward_is_comfyuis_sampling_forward(dit_files, wan21_vae, tmp_path):
    """I2V A14B: the trainer's DiT input is x_t with the mask and start-image channels that ComfyUI's model
    concatenates for core WanImageToVideo's conditioning; same input, timestep and result at both noise sides."""
    from comfy_extras.nodes_wan import WanImageToVideo

    length, size = 5, 32
    g = torch.Generator().manual_seed(7)
    start_image = torch.rand(1, size, size, 3, generator=g)
    latent, noise, ctx = _inputs((1, 16, 2, 4, 4), 8)
    out = WanImageToVideo.execute([[ctx, {}]], [[torch.zeros_like(ctx), {}]], wan21_vae, size, size, length, 1,
                                  start_image=start_image)
    positive, negative, empty = out.args if hasattr(out, "args") else out
    cond = positive[0][1]
    assert cond["concat_mask"][0, 0, 0].max() == 0 and cond["concat_mask"][0, 0, 1:].min() == 1
    image_cond = cond["concat_latent_image"]  # what the cache stores per window (image_cond_latent)
    assert image_cond.shape == latent.shape

    for key, t in (("i2v_high", 0.95), ("i2v_low", 0.5)):
        moe = mf.random_moe(LAYERS, seed=3)
        dit = trainable(dit_files[key], moe)
        assert dit.family.name == "i2v" and model_info(dit.mp)["family"] == "i2v"
        mp = comfy.sd.load_diffusion_model(str(dit_files[key]))
        x_t = sampler_state(mp, latent, noise, t)
        results = []
        for name, gains, ref in _variants(dit, mp, moe, tmp_path, t):
            sample, clean, (x_in, ts) = trainer_call(dit, gains, latent, noise, t, ctx, image_cond=image_cond)
            results.append(clean)
            denoised, (x_ref, ts_ref) = comfy_model_call(ref, x_t, t, positive, negative, empty["samples"])
            assert x_in.shape[1] == 36 and torch.equal(x_in, x_ref), (key, name)  # 16 + 4 mask + 16 image
            assert torch.equal(ts, ts_ref), (key, name)
            torch.testing.assert_close(clean, denoised, atol=2e-5, rtol=1e-4, msg=f"{key} {name}")
        _differ(results)
        dit.release()


def test_i2v_sample_without_its_start_image_is_refused(dit_files):
    moe = mf.random_moe(LAYERS, seed=3)
    dit = trainable(dit_files["i2v_high"], moe)
    latent, noise, _ = _inputs((1, 16, 2, 4, 4), 1)
    with pytest.raises(ValueError, match="image_cond_latent"):
        dit.flow_sample(latent, noise, torch.tensor([0.9]))
    dit.release()


# -------------------------------------------------------------------------------------------- TI2V

def wan22_start_latent(start_latent: torch.Tensor, frames: int, batch_size: int = 1):
    """What core ``Wan22ImageToVideoLatent`` returns for a start image whose VAE latent is ``start_latent``."""
    return wan_fixtures.wan22_image_to_video_latent(start_latent, frames, batch_size)


@pytest.mark.parametrize("start", [True, False], ids=["start-frame", "text-only"])
def test_ti2v_training_forward_is_comfyuis_sampling_forward(dit_files, tmp_path, start):
    """TI2V 5B with a start frame: latent frame 0 is the clean start latent, the DiT gets per-frame timesteps
    (0 there, from WAN22.process_timestep) and the sampler returns that frame unchanged; the trainer's input,
    timesteps and clean estimate equal the sampler's. Without a start frame it is plain text-to-video (one
    timestep per row), as ComfyUI samples an empty latent."""
    latent, noise, ctx = _inputs((1, 48, 3, 4, 4), 9)
    t = 0.75
    moe = mf.random_moe(LAYERS, seed=4)
    dit = trainable(dit_files["ti2v"], moe)
    assert dit.family.name == "ti2v"
    mp = comfy.sd.load_diffusion_model(str(dit_files["ti2v"]))
    assert type(mp.model).__name__ == "WAN22"
    if start:
        node = wan22_start_latent(latent[:, :, :1], latent.shape[2])
        latent_image, noise_mask = node["samples"], node["noise_mask"]
    else:
        latent_image, noise_mask = torch.zeros_like(latent), None  # Wan22ImageToVideoLatent without an image
    x_t = sampler_state(mp, latent, noise, t)  # the generated frames' state; the sampler puts frame 0 back
    results = []
    for name, gains, ref in _variants(dit, mp, moe, tmp_path, t):
        sample, clean, (x_in, ts) = trainer_call(dit, gains, latent, noise, t, ctx, start=start)
        results.append(clean)
        denoised, (x_ref, ts_ref) = comfy_model_call(ref, x_t, t, [[ctx, {}]], [[torch.zeros_like(ctx), {}]],
                                                     latent_image, noise_mask)
        assert torch.equal(x_in, x_ref), name
        assert torch.equal(ts, ts_ref), name
        if start:
            assert ts.shape == (1, 3) and ts[0, 0] == 0 and torch.all(ts[0, 1:] == 750.0)
            assert torch.equal(clean[:, :, 0], mp.model.process_latent_in(latent)[:, :, 0])
            assert sample.loss_weights[0, 0, 0].max() == 0 and sample.loss_weights[0, 0, 1:].min() == 1
        else:
            assert ts.shape == (1,) and sample.loss_weights is None
        torch.testing.assert_close(clean, denoised, atol=2e-5, rtol=1e-4, msg=name)
    _differ(results)
    dit.release()


# ------------------------------------------------------------------------------ stage 1 and stage 2 runs

def _toml(path: Path, data: dict) -> Path:
    """A config file as a user writes one (every value a TOML scalar, list or table)."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _run_config(root: Path, family: str, dits: dict[str, Path], manifest: Path, out: Path, stage: int) -> dict:
    model = ({"dit_high": str(dits["i2v_high"]), "dit_low": str(dits["i2v_low"])} if family == "i2v"
             else {"dit": str(dits["ti2v"])})
    cfg = {"model": model,
           "data": {"manifest": str(manifest), "cache_dir": str(root / "cache"), "vae": "demo:pooling",
                    "text_encoder": "demo:hash", "max_frames": 9, "target_area": 64 * 32},
           "lora": {"target_blocks": 2, "ffn_blocks": 1},
           "train": {"seed": 0, "max_steps": 3 if stage == 1 else 2, "batch_size": 1, "grad_accum": 2,
                     "learning_rate": 2e-2, "mixed_precision": "no"},
           "output": {"dir": str(out), "name": f"s{stage}", "save_every": 0, "progress": False, "plot": False,
                      "tensorboard": False}}
    if stage == 2:
        cfg["router"] = {"warm_start_steps": 10}
        cfg["validation"] = {"t_values": [0.5, 0.95]}
    return cfg


@pytest.mark.parametrize("family", ["i2v", "ti2v"])
def test_stage1_and_stage2_cli_runs_write_files_of_the_family(family, dit_files, tmp_path, capsys):
    """``python -m training.stage1`` / ``training.stage2`` (their ``main``) on tiny DiTs of the family and clips
    cached for it: the LoRAs and LoRA-MoE files record the family (I2V: the pair split at t = 0.9), load with
    moe_core and apply to a DiT of that family, and are refused by a text-to-video DiT."""
    from training.data.synthetic import make_synthetic_dataset
    from training import stage1, stage2

    manifest = make_synthetic_dataset(tmp_path / "data", n_per_class=2, seed=5, width=64, height=32, fps=16.0,
                                      seconds=9 / 16)
    out1, out2 = tmp_path / "s1", tmp_path / "s2"
    cfg1 = _toml(tmp_path / "stage1.toml", _run_config(tmp_path, family, dit_files, manifest, out1, 1))
    assert stage1.main(["--config", str(cfg1)]) == 0
    fam = FAMILIES[family]
    sets = ["high_noise", "low_noise"] if fam.pair else ["default"]
    loras = {s: out1 / (f"s1_{s}.safetensors" if fam.pair else "s1.safetensors") for s in sets}
    for s, path in loras.items():
        meta = comfy.utils.safetensors_header(str(path), max_size=1 << 20)
        record = json.loads(json.loads(meta)["__metadata__"]["wan_lora_moe_model"])
        assert record["family"] == family and record["in_dim"] == fam.in_dim and record["out_dim"] == fam.out_dim
    resolved = (out1 / "config.toml").read_text(encoding="utf-8")
    assert f'family = "{family}"' in resolved
    ck1 = load_lora_moe(out1 / "checkpoints" / "final.safetensors")
    if fam.pair:
        assert ck1.sets["high_noise"].sigma_range == (0.9, 1.0) and ck1.sets["low_noise"].sigma_range == (0.0, 0.9)

    cfg2 = _toml(tmp_path / "stage2.toml", _run_config(tmp_path, family, dit_files, manifest, out2, 2))
    args = ["--config", str(cfg2)] + [x for s, p in loras.items() for x in ("--base-lora", f"{s}:{p}")]
    assert stage2.main(args) == 0, capsys.readouterr().err
    moe = load_lora_moe(next(out2.glob("*.safetensors")))
    assert set(moe.sets) == set(sets)
    for s in sets:
        assert moe.sets[s].model["family"] == family and moe.sets[s].router is not None
    key = "i2v_low" if fam.pair else "ti2v"
    model = comfy.sd.load_diffusion_model(str(dit_files[key]))
    patched = apply_lora_moe(model, moe, adapter_set=sets[-1], routing=manual_route({"Hook/Electrocautery": 1.0}),
                             band=ALWAYS_ON)
    x = torch.randn(1, fam.out_dim, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(1))
    plain = comfy_model_call(model, x, 0.5, [[ctx, {}]], [[ctx, {}]], torch.zeros_like(x))[0]
    moe_out = comfy_model_call(patched, x, 0.5, [[ctx, {}]], [[ctx, {}]], torch.zeros_like(x))[0]
    assert torch.isfinite(moe_out).all() and (moe_out - plain).abs().max() > 1e-6
    t2v = wan_fixtures.load_tiny_wan(wan_fixtures.tiny_wan_state_dict(0, num_layers=LAYERS))
    with pytest.raises(Exception, match="family|trained for"):
        apply_lora_moe(t2v, moe, adapter_set=sets[-1])
    # the trainer refuses them too, as a stage-1 start (lora.init_weights) or stage 2's base / --init-moe
    from training.adapters import AdapterConfigError
    from training.config import config_from_dict
    from training.init_lora import read_init_adapters
    from training.stage2 import BaseLoraError, Stage2Hooks
    from training.stage2_config import Stage2Config

    dm = t2v.model.diffusion_model
    with pytest.raises(AdapterConfigError, match=f"trained for {re.escape(fam.title)}"):
        read_init_adapters(loras[sets[-1]], sets[-1], "lora.init_weights", dm)
    cfg = config_from_dict(Stage2Config, _run_config(tmp_path, family, dit_files, manifest, out2, 2), "test")
    with pytest.raises(BaseLoraError, match=f"trained for {re.escape(fam.title)}"):
        Stage2Hooks(cfg, {"*": loras[sets[-1]]}, None, QUIET)._base_for(sets[-1], dm)
    with pytest.raises(BaseLoraError, match=f"trained for {re.escape(fam.title)}"):
        Stage2Hooks(cfg, {}, next(out2.glob("*.safetensors")), QUIET).make_bank(sets[-1], dm, None, 0)


# ------------------------------------------------------------------------ configs, checks, start frames

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"


@pytest.mark.parametrize("name, family", [("stage1_i2v_a14b", "i2v"), ("stage2_i2v_a14b", "i2v"),
                                          ("stage1_ti2v_5b", "ti2v"), ("stage2_ti2v_5b", "ti2v")])
def test_shipped_family_configs_parse(name, family):
    from training.config import Stage1Config, load_config
    from training.stage2_config import Stage2Config

    cfg = load_config(Stage1Config if name.startswith("stage1") else Stage2Config, CONFIGS / f"{name}.toml")
    fam = FAMILIES[family]
    assert cfg.data.family == family and cfg.data.vae == fam.vae
    assert (cfg.data.max_frames, cfg.data.target_fps) == (fam.frames, float(fam.fps))
    assert cfg.data.bucket_step % (2 * fam.spatial_compression) == 0
    if family == "i2v":
        assert cfg.model.dit_high == "wan2.2_i2v_high_noise_14B_fp16.safetensors"
        assert cfg.model.dit_low == "wan2.2_i2v_low_noise_14B_fp16.safetensors" and cfg.model.boundary == "auto"
    else:
        assert cfg.model.dit == "wan2.2_ti2v_5B_fp16.safetensors" and not cfg.model.dit_high
        assert cfg.objective.start_frame_probability == 0.5
    if name.startswith("stage2"):
        assert cfg.objective.t_min == 0.2  # stage 2's own defaults are kept


def _cfg(**sections):
    from training.config import Stage1Config, config_from_dict

    base = {"data": {"manifest": "m.jsonl", "vae": "demo:pooling", "text_encoder": "demo:hash"}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return config_from_dict(Stage1Config, base, "test config")


def test_the_family_comes_from_the_dit_and_a_mismatch_is_refused(dit_files, tmp_path):
    from training.stage1 import TrainingSetupError, memory_plan, resolve_family

    pair = {"dit_high": str(dit_files["i2v_high"]), "dit_low": str(dit_files["i2v_low"])}
    cfg, fam = resolve_family(_cfg(model=pair))
    assert fam.name == "i2v" and cfg.data.family == "i2v" and cfg.model.boundary == 0.9
    assert (cfg.data.max_frames, cfg.data.target_fps) == (81, 16.0)
    cfg, fam = resolve_family(_cfg(model={"dit": str(dit_files["ti2v"])}, data={"max_frames": 9}))
    assert fam.name == "ti2v" and (cfg.data.max_frames, cfg.data.target_fps) == (9, 24.0)
    # the memory estimate counts the 5B model's 32-pixel tokens: 3 latent frames x (64 x 32) / 32^2
    est, _ = memory_plan(dataclasses_replace(cfg, data={"target_area": 64 * 32}), torch.device("cpu"), QUIET)
    assert est.tokens == 6
    with pytest.raises(TrainingSetupError, match=r"data.family = 't2v'.*I2V A14B"):
        resolve_family(_cfg(model=pair, data={"family": "t2v"}))
    with pytest.raises(TrainingSetupError, match="one DiT, not a high/low-noise pair: set model.dit"):
        resolve_family(_cfg(model={"dit_high": str(dit_files["ti2v"]), "dit_low": str(dit_files["ti2v"])}))
    # an old config's explicit T2V boundary on the I2V pair is refused; another value is a warning
    with pytest.raises(TrainingSetupError, match=r"model.boundary = 0.875 is the WAN 2.2 T2V A14B.*t = 0.9"):
        resolve_family(_cfg(model=dict(pair, boundary=0.875)))
    said = []
    cfg, _ = resolve_family(_cfg(model=dict(pair, boundary=0.8)), said.append)
    assert cfg.model.boundary == 0.8 and any(l.startswith("warning: model.boundary = 0.8") for l in said)
    said = []
    resolve_family(_cfg(model={"dit": str(dit_files["ti2v"])}, data={"target_fps": 16}), said.append)
    assert any("warning: data.target_fps = 16" in l and "24 fps" in l for l in said), said
    t2v = _write_dit(tmp_path / "t2v.safetensors", "t2v", 0)
    with pytest.raises(TrainingSetupError, match="different families"):
        resolve_family(_cfg(model={"dit_high": str(t2v), "dit_low": str(dit_files["i2v_low"])}))


def dataclasses_replace(cfg, **sections):
    import dataclasses

    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


def test_a_cache_of_another_family_is_refused_before_training():
    from training.stage1 import TrainingSetupError, check_data_fits

    t2v_item = {"latent": torch.zeros(16, 2, 4, 4), "name": "clip_a"}
    with pytest.raises(TrainingSetupError, match=r"clip_a has no image_cond_latent.*data.family = \"i2v\""):
        check_data_fits([t2v_item], FAMILIES["i2v"])
    with pytest.raises(TrainingSetupError, match="16 channels but WAN 2.2 TI2V 5B"):
        check_data_fits([t2v_item], FAMILIES["ti2v"])
    check_data_fits([dict(t2v_item, image_cond_latent=torch.zeros(16, 2, 4, 4))], FAMILIES["i2v"])


def test_ti2v_samples_draw_their_start_frame_and_its_frame_is_not_trained(dit_files, tmp_path):
    """Each TI2V sample draws (from its own position's generator) whether it keeps its start frame, with
    objective.start_frame_probability; start-frame and plain rows run in separate chunks; the loss ignores the
    prediction on a kept frame. Other families draw nothing (their random streams are unchanged)."""
    from training.loop import LoopSettings, Trainer
    from training.models import DiTSet
    from training.objective import TimestepSampler, per_sample_loss

    g = torch.Generator().manual_seed(0)
    data = [{"latent": torch.randn(48, 3, 4, 4, generator=g), "context": torch.randn(8, 4096, generator=g)}
            for _ in range(4)]
    moe = mf.random_moe(LAYERS, seed=4)
    dit = trainable(dit_files["ti2v"], moe)
    shares = {}
    for p in (0.0, 0.5, 1.0):
        trainer = Trainer(DiTSet([dit]), data, TimestepSampler(), LoopSettings(start_frame_probability=p),
                          tmp_path / f"p{p}", {})
        rows = [trainer._prepare_row(i) for i in range(64)]
        shares[p] = sum(r["start_frame"] for r in rows) / len(rows)
        again = trainer._prepare_row(5)
        assert again["start_frame"] == rows[5]["start_frame"] and torch.equal(again["noise"], rows[5]["noise"])
        for _, chunk in trainer._groups(rows[:8]):
            assert len({r["start_frame"] for r in chunk}) == 1
    assert shares[0.0] == 0.0 and shares[1.0] == 1.0 and 0.3 < shares[0.5] < 0.7
    sample = trainer.flow_sample(dit, rows[:1])
    with torch.no_grad(), dit.adapters(torch.zeros(1, 5)):
        pred = dit.predict_sample(sample, data[0]["context"][None])
    moved = pred.clone()
    moved[:, :, 0] += 5.0
    assert torch.equal(per_sample_loss(pred, sample.target, sample.loss_weights),
                       per_sample_loss(moved, sample.target, sample.loss_weights))
    # a one-latent-frame window (a 1-frame clip) is never all start frame: it trains as text-to-video
    short = [{"latent": d["latent"][:, :1], "context": d["context"]} for d in data]
    trainer = Trainer(DiTSet([dit]), short, TimestepSampler(), LoopSettings(start_frame_probability=1.0),
                      tmp_path / "short", {})
    rows = [trainer._prepare_row(i) for i in range(4)]
    assert not any(r["start_frame"] for r in rows)
    assert torch.isfinite(per_sample_loss(pred, sample.target, torch.zeros_like(sample.loss_weights))).all()
    dit.release()
    t2v_dit = TrainableDiT("default", load_dit(_write_dit(tmp_path / "t2v.safetensors", "t2v", 0)),
                           AdapterBank.from_adapter_set(moe.sets["default"], len(NAMES), [1]), (0.0, 1.0),
                           Placement(torch.device("cpu"), torch.device("cpu"), offload_idle=False))
    t2v_data = [{"latent": d["latent"][:16], "context": d["context"]} for d in data]
    row = Trainer(DiTSet([t2v_dit]), t2v_data, TimestepSampler(), LoopSettings(), tmp_path / "t2v", {})._prepare_row(0)
    assert "start_frame" not in row
    t2v_dit.release()


def test_a_wan21_i2v_dit_with_clip_vision_inputs_is_refused(tmp_path):
    """WAN 2.1 I2V (CLIP-vision image embeddings: ComfyUI's model_type i2v) is none of the supported families."""
    import comfy.ldm.wan.model
    import comfy.ops

    from training.models import ModelFileError

    model = comfy.ldm.wan.model.WanModel(model_type="i2v", patch_size=(1, 2, 2), in_dim=36, dim=128, ffn_dim=256,
                                         freq_dim=256, text_dim=4096, out_dim=16, num_heads=1, num_layers=1,
                                         operations=comfy.ops.disable_weight_init)
    path = tmp_path / "wan21_i2v.safetensors"
    save_file({k: torch.zeros(v.shape).contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ModelFileError, match="CLIP-vision image embeddings"):
        load_dit(path)
