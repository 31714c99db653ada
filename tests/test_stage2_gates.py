"""One gate function for training and sampling: stage 2's gains are the sampler's gains, and a training
forward is ComfyUI's forward with the same file, caption and noise level (experts on, default band)."""
from __future__ import annotations

import pytest
import torch

import comfy.model_management

import pack_fixtures
import wan_fixtures
from moe_core.band import DEFAULT_BAND
from moe_core.gating import GateConfig, GateController, GateSettings
from moe_core.patch import apply_lora_moe, moe_info
from moe_core.routing import LearnedRouter, rule_route
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
from training.adapters import AdapterBank
from training.models import Placement, TrainableDiT
from training.stage2_loop import GateSpec

NAMES = list(DEFAULT_EXPERT_NAMES)
CAPTIONS = ["电凝钩切割组织", "剪刀剪开腹膜，吸引器吸除积血", "剪刀、电凝钩和吸引器", "腹腔镜下观察"]
CPU = torch.device("cpu")


def _router(seed: int = 3) -> LearnedRouter:
    torch.manual_seed(seed)
    r = LearnedRouter(len(NAMES))
    with torch.no_grad():  # make it depend on t visibly
        r.fc1.weight.mul_(3.0)
    return r


@pytest.mark.parametrize("mode", ["rule", "learned"])
@pytest.mark.parametrize("max_gate", [1.0, 0.9])
def test_training_gains_equal_the_samplers_gains(mode, max_gate):
    router = _router()
    settings = GateSettings(temperature=0.8, top_k=2, max_gate=max_gate)
    spec = GateSpec(mode, settings, DEFAULT_BAND, alpha_base=0.7, alpha_expert=1.3)
    for caption in CAPTIONS:
        routing = rule_route(caption, NAMES, mode=mode, top_k=2, temperature=0.8)
        teacher = torch.tensor([[routing.weights[n] for n in NAMES]])
        for t in (0.1, 0.25, 0.55, 0.7, 0.95):
            tt = torch.tensor([t])
            train = spec.gains(spec.routed(teacher, teacher, tt, router), tt)
            ctrl = GateController(NAMES, GateConfig(alpha_base=0.7, alpha_expert=1.3, routing=routing,
                                                    band=DEFAULT_BAND, max_gate=max_gate), router.eval())
            infer = ctrl.gains(torch.tensor([t, t]), [1, 0])  # a CFG pair, as the sampler batches it
            assert torch.allclose(train.expand(2, -1), infer, atol=1e-6), (caption, t, train, infer)
            router.train()


def test_rule_gates_are_exactly_zero_for_unnamed_instruments_in_training_too():
    spec = GateSpec("rule", GateSettings(top_k=2), DEFAULT_BAND, 1.0, 1.0)
    teacher = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    g = spec.gains(spec.routed(teacher, teacher, torch.tensor([0.9]), None), torch.tensor([0.9]))
    assert g.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0]]


def test_training_forward_equals_comfyui_forward_with_the_same_file_caption_and_t(tiny_wan_state_dict):
    moe = pack_fixtures.tiny_single_moe(router=True)
    aset = moe.sets["default"]
    caption = "剪刀剪开腹膜，吸引器吸除积血"
    mp = wan_fixtures.load_tiny_wan(tiny_wan_state_dict())
    bank = AdapterBank.from_adapter_set(aset, len(NAMES))
    dit = TrainableDiT("default", mp, bank, (0.0, 1.0), Placement(CPU, CPU), gradient_checkpointing=True)
    router = LearnedRouter.from_state_dict(aset.router)
    d = moe.defaults
    spec = GateSpec("learned", GateSettings(d.temperature, d.top_k, d.max_gate, d.clip_level), d.band,
                    d.alpha_base, d.alpha_expert)
    routing = rule_route(caption, NAMES, mode="learned", top_k=d.top_k, temperature=d.temperature)
    teacher = torch.tensor([[routing.weights[n] for n in NAMES]])
    patched = apply_lora_moe(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()), moe, routing=routing)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    checked = 0
    for t_val in (0.3, 0.7, 0.95):  # half band, full band, high noise
        t = torch.tensor([t_val])
        dit.activate()
        with torch.no_grad(), dit.adapters(spec.gains(spec.routed(teacher, teacher, t, router), t)):
            v_train = dit.predict(x, t, ctx)
        dit.release()
        comfy.model_management.load_models_gpu([patched])
        moe_info(patched).runtime.controller.reset()  # a new sampling run: the EMA starts at this step's gates
        opts = dict(patched.model_options["transformer_options"])
        opts["wrappers"] = patched.wrappers
        with torch.no_grad():
            denoised = patched.model.apply_model(x, t, c_crossattn=ctx, transformer_options=opts)
        v_infer = (x - denoised) / t_val
        assert torch.allclose(v_train, v_infer, atol=3e-5, rtol=1e-4), (t_val, (v_train - v_infer).abs().max())
        checked += 1
    # the experts matter at these settings (otherwise the comparison says nothing about the gates)
    off = apply_lora_moe(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()), moe, routing=None)
    comfy.model_management.load_models_gpu([off])
    with torch.no_grad():
        base = off.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx,
                                     transformer_options={**off.model_options["transformer_options"],
                                                          "wrappers": off.wrappers})
        comfy.model_management.load_models_gpu([patched])
        moe_info(patched).runtime.controller.reset()
        on = patched.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx,
                                       transformer_options={**patched.model_options["transformer_options"],
                                                            "wrappers": patched.wrappers})
    assert checked == 3 and (on - base).abs().max() > 1e-4
