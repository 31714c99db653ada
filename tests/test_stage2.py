"""Stage 2 end to end on tiny models and synthetic clips: the file it writes, the frozen base, step 0, the
metrics and pictures, sampling in ComfyUI, exact resume after SIGKILL, data parallel, and bad input."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import comfy.model_management
import comfy.sd
import comfy.utils

import train_fixtures as tf
import wan_fixtures
from moe_core.band import ALWAYS_ON
from moe_core.checkpoint import load_lora_moe
from moe_core.export import bake
from moe_core.lora_formats import load_lora, save_lora
from moe_core.patch import apply_lora_moe
from moe_core.routing import manual_route, rule_route
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
from training.config import config_from_dict, to_toml
from training.stage1 import run_stage1
from training.stage2 import BaseLoraError, Stage2Hooks, run_stage2
from training.stage2_config import Stage2Config

QUIET = lambda *_: None  # noqa: E731
REPO = Path(__file__).resolve().parent.parent
NAMES = list(DEFAULT_EXPERT_NAMES)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tf.Workspace:
    return tf.make_workspace(tmp_path_factory.mktemp("stage2_ws"), clips_per_class=3)


@pytest.fixture(scope="module")
def stage1(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2_s1") / "out"
    return run_stage1(tf.stage1_config(ws, out, pair=True, train={"max_steps": 12, "learning_rate": 2e-2}),
                      log_fn=QUIET)


def s2_dict(ws, out: Path, **sections) -> dict:
    d = tf.config_dict(ws, out, pair=True, train={"max_steps": 8, "learning_rate": 2e-2})
    d["router"] = {"warm_start_steps": 40}
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


def s2_config(ws, out: Path, **sections) -> Stage2Config:
    return config_from_dict(Stage2Config, s2_dict(ws, out, **sections), "test stage-2 config")


@pytest.fixture(scope="module")
def trained(ws, stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2_run") / "out"
    cfg = s2_config(ws, out, output={"save_every": 4, "plot": True}, moe={"alpha_base": 0.9})
    return run_stage2(cfg, base_loras=stage1.loras, log_fn=QUIET)


# ----------------------------------------------------------------------------------------- the file

def test_the_file_is_a_complete_lora_moe_with_routers_and_the_configs_defaults(trained):
    moe = load_lora_moe(trained.lora_moe)
    assert moe.expert_names == NAMES and set(moe.sets) == {"high_noise", "low_noise"}
    for name, aset in moe.sets.items():
        assert aset.router is not None and aset.router["fc1.weight"].shape == (64, len(NAMES) + 1)
        assert aset.model["num_layers"] == tf.LAYERS and aset.model["dim"] == 128
        assert aset.fingerprint and aset.sigma_range == ((0.875, 1.0) if name == "high_noise" else (0.0, 0.875))
        experts = [p.experts for p in aset.modules.values()]
        assert all(e is not None for es in experts for e in es)
        assert any(float(e.up.abs().max()) > 0 for es in experts for e in es)  # the experts trained
    d = moe.defaults
    assert (d.alpha_base, d.alpha_expert, d.top_k, d.temperature, d.max_gate) == (0.9, 1.0, 2, 1.0, 1.0)
    assert d.band.to_json() == [[0.2, 0.5], [0.6, 1.0]]
    check = json.loads((trained.out_dir / "ema_check.json").read_text())
    assert d.ema_beta == check["ema_beta_written"] and check["checked"] and set(check["instruments"]) == set(NAMES)


def test_base_is_bit_identical_to_the_stage1_lora_and_never_in_the_optimizer(trained, stage1):
    moe = load_lora_moe(trained.lora_moe)
    trainer = trained.trainer
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for name in ("high_noise", "low_noise"):
        stage1_lora = load_lora(stage1.loras[name])
        aset = moe.sets[name]
        assert set(stage1_lora) <= set(aset.modules)
        for module, ad in stage1_lora.items():
            base = aset.modules[module].base
            assert torch.equal(base.down, ad.down) and torch.equal(base.up, ad.up) and base.alpha == ad.alpha
        bank = trainer.dits.by_name(name).bank
        for proj in bank.projections:
            base_slot = proj.slot(0)
            assert not base_slot.trainable and "down" in dict(base_slot.named_buffers())
            assert id(base_slot.down) not in opt_ids and id(base_slot.up) not in opt_ids
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    n_experts = sum(p.numel() for d in trainer.dits for p in d.bank.trainable_parameters())
    n_routers = sum(p.numel() for r in trainer.routers.values() for p in r.parameters())
    assert n_opt == n_experts + n_routers
    groups = {g["name"] for g in trainer.optimizer.param_groups}
    assert "router" in groups


def test_step_zero_reproduces_the_stage1_model(ws, stage1, tmp_path):
    """Before any step, the stage-2 model (base at alpha_base 1, fresh experts) is the stage-1 LoRA as
    ComfyUI's own LoRA loader applies it, on both DiTs."""
    from training.stage1 import setup_stage1

    cfg = s2_config(ws, tmp_path / "s0")
    hooks = Stage2Hooks(cfg, dict(stage1.loras), None, QUIET)
    setup = setup_stage1(cfg, hooks=hooks, log_fn=QUIET)
    trainer = setup.trainer
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 3, 4, 6, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    teacher = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    for name, t_val, dit_file in (("high_noise", 0.95, ws.dit), ("low_noise", 0.5, ws.dit_low)):
        dit = trainer.dits.activate(trainer.dits.by_name(name))
        t = torch.tensor([t_val])
        gains = trainer.spec.gains(trainer.spec.routed(teacher, teacher, t, trainer.routers[name]), t)
        assert float(gains[0, 1:].detach().abs().sum()) > 0  # experts are on: they contribute exactly nothing yet
        with torch.no_grad(), dit.adapters(gains):
            v_train = dit.predict(x, t, ctx)
        mp = comfy.sd.load_diffusion_model(str(dit_file))
        sd = comfy.utils.load_torch_file(str(stage1.loras[name]), safe_load=True)
        ref, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)
        comfy.model_management.load_models_gpu([ref])
        with torch.no_grad():
            denoised = ref.model.apply_model(x, t, c_crossattn=ctx, transformer_options={})
        v_ref = (x - denoised) / t_val
        assert torch.allclose(v_train, v_ref, atol=2e-5, rtol=1e-4), (name, (v_train - v_ref).abs().max())
    trainer.dits.release()


def test_metrics_pictures_and_validation(trained):
    lines = [json.loads(x) for x in trained.metrics.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    for key in ("loss", "diffusion_loss", "roi_loss", "teacher_kl", "load_balance", "entropy_hinge",
                "usage_entropy", "loss_total"):
        assert all(key in x and x[key] == x[key] for x in lines), key
    for n in NAMES:
        assert all(f"usage/{n}" in x and f"samples/{n}" in x for x in lines)
    assert all(sum(x[f"samples/{n}"] for n in NAMES) == 2 for x in lines)  # global batch 2, one label each
    # gates follow the teacher: a step's dispatched share per expert = its rows' share (one instrument each)
    for x in lines:
        for n in NAMES:
            assert abs(x[f"usage/{n}"] - x[f"samples/{n}"] / 2) < 0.05
    for p in trained.plots:
        with Image.open(p) as im:
            assert im.size[0] > 100
    names = {p.name for p in trained.plots}
    assert {"stage2_losses.png", "expert_usage.png", "validation_matrix.png", "gate_schedule_high_noise.png",
            "gate_schedule_low_noise.png"} <= names
    v = trained.validation
    assert v["classes"] == NAMES and len(v["plain"]["matrix"]) == 4 and v["windows"] == 4
    assert set(v["per_dit"]) == {"high_noise", "low_noise"}
    assert v["router_agreement"] >= 0.95
    assert json.loads((trained.out_dir / "validation.json").read_text())["val_loss"] == pytest.approx(v["val_loss"])
    # the trainer's fixed-sample evaluation runs the trained gates (experts on): not the experts-off loss
    trainer = trained.trainer
    with_experts = trainer.evaluate(4)
    saved, trainer.spec.alpha_expert = trainer.spec.alpha_expert, 0.0
    try:
        without = trainer.evaluate(4)
    finally:
        trainer.spec.alpha_expert = saved
    assert with_experts == with_experts and with_experts != without


def test_the_trained_file_samples_in_comfyui(trained, ws, tmp_path, wan_contexts):
    """Through ComfyUI's sampler on the low-noise DiT: forced experts differ from each other, learned routing
    runs, and a baked fixed-gate LoRA equals the MoE with those gates (ComfyUI's own LoRA loader)."""
    moe = load_lora_moe(trained.lora_moe)
    pos, neg = wan_contexts
    model = comfy.sd.load_diffusion_model(str(ws.dit_low))
    kw = dict(seed=4, steps=3, latent_shape=(1, 16, 3, 4, 6))
    forced = {n: wan_fixtures.sample(apply_lora_moe(model, moe, adapter_set="low_noise", band=ALWAYS_ON,
                                                    routing=manual_route({n: 1.0})), pos, neg, **kw)
              for n in NAMES}
    for i, a in enumerate(NAMES):
        for b in NAMES[i + 1:]:
            assert (forced[a] - forced[b]).abs().max() > 1e-6, (a, b)
    learned = apply_lora_moe(model, moe, adapter_set="low_noise",
                             routing=rule_route("电凝钩切割组织", NAMES, mode="learned"))
    assert torch.isfinite(wan_fixtures.sample(learned, pos, neg, **kw)).all()
    gates = {"Scissors": 0.25, "Suction": 0.75}
    baked = bake(moe, "low_noise", gates, alpha_base=moe.defaults.alpha_base, alpha_expert=1.0)
    path = save_lora(baked, tmp_path / "baked.safetensors")
    ref, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path), safe_load=True),
                                           1.0, 0)
    ours = apply_lora_moe(model, moe, adapter_set="low_noise", band=ALWAYS_ON, routing=manual_route(gates))
    torch.testing.assert_close(wan_fixtures.sample(ours, pos, neg, **kw), wan_fixtures.sample(ref, pos, neg, **kw),
                               atol=2e-5, rtol=0)


# --------------------------------------------------------------------------------- resume, data parallel

_KILL_DRIVER = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from moe_core.comfy_runtime import ensure_comfy
ensure_comfy(cpu=True)
import torch
torch.set_num_threads(1)
from training.config import load_config
from training.stage2 import run_stage2
from training.stage2_config import Stage2Config
cfg = load_config(Stage2Config, sys.argv[2])
def kill(step, metrics):
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
run_stage2(cfg, base_loras=[sys.argv[3], sys.argv[4]], callbacks=[kill], log_fn=lambda *_: None)
"""


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return comfy.utils.load_torch_file(str(path), safe_load=True)


def test_resume_after_sigkill_is_bit_exact_on_cpu(ws, stage1, tmp_path):
    sections = dict(output={"save_every": 2}, train={"max_steps": 7, "warmup_steps": 2},
                    moe={"rank_dropout": 0.1}, monitor={"balanced_sampler": True})
    ref = run_stage2(s2_config(ws, tmp_path / "ref", **sections), base_loras=stage1.loras, log_fn=QUIET)
    cfg = s2_config(ws, tmp_path / "run", **sections)
    toml = tmp_path / "run.toml"
    toml.write_text(to_toml(cfg), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILL_DRIVER, str(REPO), str(toml),
                           f"high_noise:{stage1.loras['high_noise']}", f"low_noise:{stage1.loras['low_noise']}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 4
    resumed = run_stage2(cfg, resume="auto", log_fn=QUIET)  # the checkpoint holds the base: no --base-lora
    assert resumed.steps == 7
    a, b = _tensors(ref.lora_moe), _tensors(resumed.lora_moe)
    assert a.keys() == b.keys() and any(".router." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    s_ref = torch.load(ref.out_dir / "checkpoints" / "final.state.pt", weights_only=True)
    s_res = torch.load(resumed.out_dir / "checkpoints" / "final.state.pt", weights_only=True)
    for pid, st in s_ref["optimizer"]["state"].items():
        for key, value in st.items():
            assert torch.equal(value, s_res["optimizer"]["state"][pid][key])
    strip = lambda line: {k: v for k, v in json.loads(line).items()  # noqa: E731
                          if k not in ("step_time_s", "samples_per_s", "dit_load_s")}
    assert [strip(x) for x in ref.metrics.read_text().splitlines()] == \
           [strip(x) for x in resumed.metrics.read_text().splitlines()]


def test_two_gloo_processes_equal_one_process(ws, stage1, tmp_path):
    """torchrun 2 x batch 1 x accumulation 2 = one process, batch 1 x 4: experts, routers and the step-level
    routing terms (usage all-reduced before the first micro-batch).

    Rule gates here: with learned gates, top-2 gives an unnamed expert a gate near 1e-3, whose tiny gradients
    differ by float rounding between the two summation orders and AdamW's division by sqrt(v) turns that into
    lr-sized steps. Rule gates are exactly 0 there; the router still trains (KL, balance, entropy), from its
    initialisation (no warm start), so its gradients are large and not dominated by rounding either."""
    router = {"routing": "rule", "warm_start_steps": 0}
    d = s2_dict(ws, tmp_path / "ddp", train={"max_steps": 4, "grad_accum": 2}, router=router)
    d["model"]["device"] = "cpu"
    path = tmp_path / "ddp.toml"
    path.write_text(to_toml(config_from_dict(Stage2Config, d)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(port), "-m", "training.stage2", "--config", str(path),
                           "--base-lora", f"high_noise:{stage1.loras['high_noise']}",
                           "--base-lora", f"low_noise:{stage1.loras['low_noise']}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = run_stage2(s2_config(ws, tmp_path / "single", train={"max_steps": 4, "grad_accum": 4},
                                  router=router), base_loras=stage1.loras, log_fn=QUIET)
    ddp, one = _tensors(tmp_path / "ddp" / "lora.safetensors"), _tensors(single.lora_moe)
    assert ddp.keys() == one.keys()
    # Only the summation order of the per-sample gradients differs. AdamW's first steps move each weight by
    # about lr * sign(gradient), so an element whose gradient is at rounding level may step the other way:
    # such elements are rare and bounded by steps x lr; every other element agrees to float rounding.
    flips, total = 0, 0
    for k in one:
        diff = (ddp[k] - one[k]).abs()
        assert float(diff.max()) <= 4 * 2 * 2e-2, k  # 4 steps x at most ~2 lr per AdamW step
        flips += int((diff > 1e-5 + 1e-4 * one[k].abs()).sum())
        total += diff.numel()
    print(f"elements beyond rounding: {flips} of {total}")
    assert flips <= total * 2e-3
    a = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in single.metrics.read_text().splitlines()]
    for x, y in zip(a, b):
        for key in ("loss", "teacher_kl", "load_balance", "usage/Scissors"):
            assert abs(x[key] - y[key]) < 1e-5, key


# -------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_get_clear_errors(ws, stage1, tmp_path):
    # a base LoRA for a model of other width
    other = tmp_path / "wide.safetensors"
    lora = load_lora(stage1.loras["low_noise"])
    from moe_core.checkpoint import Adapter

    save_lora({k: Adapter(torch.zeros(a.rank, a.down.shape[1] * 2), torch.zeros(a.up.shape[0], a.rank), a.alpha)
               for k, a in lora.items()}, other)
    with pytest.raises(BaseLoraError, match=r"wide.safetensors.*a LoRA for a model of other dimensions"):
        run_stage2(s2_config(ws, tmp_path / "a"), base_loras={"high_noise": other, "low_noise": other},
                   log_fn=QUIET)
    # a base for the other DiT of the pair (its metadata says so)
    with pytest.raises(BaseLoraError, match="trained for the low_noise DiT .* given for the high_noise DiT"):
        run_stage2(s2_config(ws, tmp_path / "b"), base_loras=[f"high_noise:{stage1.loras['low_noise']}",
                                                               f"low_noise:{stage1.loras['low_noise']}"],
                   log_fn=QUIET)
    # a base missing a set the config trains
    with pytest.raises(BaseLoraError, match=r"no base LoRA for the low_noise DiT.*--base-lora low_noise:PATH"):
        run_stage2(s2_config(ws, tmp_path / "c"), base_loras={"high_noise": stage1.loras["high_noise"]},
                   log_fn=QUIET)
    # captions naming no instrument with no fallback
    from moe_core.routing import RoutingError

    with pytest.raises(RoutingError, match="12 clip\\(s\\) have captions naming no instrument"):
        run_stage2(s2_config(ws, tmp_path / "d", moe={"expert_names": ["Needle", "Clip"],
                                                      "no_instrument": "error", "top_k": 1}),
                   base_loras=stage1.loras, log_fn=QUIET)
    # an empty held-out split
    from training.stage2_eval import HoldoutError

    with pytest.raises(HoldoutError, match="validation.holdout_clips names clips not in the data"):
        run_stage2(s2_config(ws, tmp_path / "e", validation={"holdout_clips": ["nope"]}),
                   base_loras=stage1.loras, log_fn=QUIET)
    # config-level errors name the key
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="loss.identity_classifier"):
        s2_config(ws, tmp_path / "f", loss={"identity": 0.5})
    with pytest.raises(ConfigError, match="moe.band"):
        s2_config(ws, tmp_path / "g", moe={"band": [[0.6, 1.0], [0.2, 0.5]]})
    with pytest.raises(BaseLoraError, match="router_only.*--init-moe"):
        run_stage2(s2_config(ws, tmp_path / "h", router={"train": "router_only"}), base_loras=stage1.loras,
                   log_fn=QUIET)


# ------------------------------------------------------------------------------------------ specialisation

def test_experts_specialise_on_held_out_clips_and_the_router_follows_the_teacher(tmp_path):
    """Stage 1 then stage 2 on a controlled synthetic set: one tissue background and one caption per
    instrument (the hashing text stand-in gives unrelated embeddings to different captions, so only a caption
    seen in training carries the instrument), 3 clips per instrument, one held out. The stage-1 base has rank 1
    (a base too small to keep four instruments apart: the plain LoRA's blur the mixture is for), the experts
    rank 8. On the held-out clips' instrument tips (the ROI term), each instrument's lowest loss is with its
    own expert forced, below the stage-1 model's (experts off); the learned router picks a named instrument
    for every held-out (caption, t). The whole-frame matrix is printed beside it: there the tissue, which no
    expert owns, dominates and the differences between experts are within a few 1e-4."""
    from training.data.synthetic import make_synthetic_dataset

    manifest = make_synthetic_dataset(tmp_path / "data", n_per_class=3, seed=5, width=48, height=32, fps=16.0,
                                      seconds=9 / 16, background_seed=7, one_caption_per_class=True)
    ws = tf.Workspace(tmp_path, manifest, tmp_path / "cache", tf.write_dit(tmp_path / "m" / "h.safetensors", 0),
                      tf.write_dit(tmp_path / "m" / "l.safetensors", 1))
    rank1 = {"target_blocks": 2, "ffn_blocks": 1, "rank_q": 1, "rank_k": 1, "rank_v": 1, "rank_o": 1, "rank_ffn": 1}
    s1 = run_stage1(tf.stage1_config(ws, tmp_path / "s1", pair=True, lora=rank1,
                                     train={"max_steps": 60, "learning_rate": 2e-2}), log_fn=QUIET)
    cfg = s2_config(ws, tmp_path / "s2", lora=rank1, moe={"expert_rank_scale": 8.0},
                    train={"max_steps": 80, "learning_rate": 2e-2}, router={"warm_start_steps": 50},
                    validation={"t_values": [0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.9, 0.95, 0.99]})
    v = run_stage2(cfg, base_loras=s1.loras, log_fn=QUIET).validation
    for kind in ("roi", "plain"):
        print(f"held-out {kind} loss, forced expert (rows) x class (columns):")
        for name, row in zip(NAMES, v[kind]["matrix"]):
            print(f"  {name:<20}" + " ".join(f"{x:.4f}" for x in row))
        print(f"  {'experts off':<20}" + " ".join(f"{x:.4f}" for x in v[kind]["base"]))
    roi = v["roi"]
    assert roi["diagonal_dominant"], roi["own_expert_best"]
    assert all(roi["own_expert_beats_base"]), roi["own_expert_beats_base"]
    assert v["router_agreement"] >= 0.95
