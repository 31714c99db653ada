"""The training forward is ComfyUI's inference forward: same fused LoRA-MoE code, same numbers.

Also: gradient checkpointing changes no gradient, frozen front blocks run without autograd, streamed
(offloaded) blocks and fp8 base weights train.
"""
from __future__ import annotations

import pytest
import torch

import comfy.model_management

from moe_core.checkpoint import LoraMoE
from moe_core.patch import apply_lora_moe
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
from training.adapters import AdapterBank, TargetSpec, resolve_blocks, target_linears
from training.models import Placement, TrainableDiT

CPU = torch.device("cpu")
NAMES = list(DEFAULT_EXPERT_NAMES)


def _dit(mp, seed=0, checkpointing=True, stream=0, random_up=True) -> TrainableDiT:
    dm = mp.model.diffusion_model
    n = len(dm.blocks)
    spec = TargetSpec(resolve_blocks(4, n, "t"), resolve_blocks(2, n, "f"),
                      ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                       "cross_attn.v", "cross_attn.o"), {"q": 8, "k": 4, "v": 4, "o": 4, "ffn": 4}, 1.0)
    bank = AdapterBank.fresh_base(target_linears(dm, spec), spec.modules(), 1.0, seed=seed, num_experts=len(NAMES))
    if random_up:  # a trained-looking LoRA (fresh ones have up = 0, so ΔW = 0)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in bank.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return TrainableDiT("default", mp, bank, (0.0, 1.0), Placement(CPU, CPU, stream_blocks=stream), checkpointing)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 3, 8, 8, generator=g), torch.tensor([0.4, 0.9]),
            torch.randn(2, 8, 4096, generator=g))


def _base_gains(b):
    g = torch.zeros(b, 1 + len(NAMES))
    g[:, 0] = 1.0
    return g


def test_training_forward_equals_comfyui_inference_with_the_same_adapters(tiny_wan_state_dict):
    import wan_fixtures

    dit = _dit(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()))
    x, t, ctx = _inputs()
    dit.activate()
    with torch.no_grad(), dit.adapters(_base_gains(2)):
        v_train = dit.predict(x, t, ctx)
    dit.release()

    # inference: the same adapters as a LoRA-MoE file's set, patched by moe_core and run by ComfyUI's apply_model
    moe = LoraMoE(NAMES, {"default": dit.bank.to_adapter_set("default")})
    patched = apply_lora_moe(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()), moe, alpha_base=1.0, routing=None)
    comfy.model_management.load_models_gpu([patched])
    opts = dict(patched.model_options["transformer_options"])
    opts["wrappers"] = patched.wrappers  # what the sampler adds (comfy/samplers.py, CFGGuider.sample)
    with torch.no_grad():
        denoised = patched.model.apply_model(x, t, c_crossattn=ctx, transformer_options=opts)
    v_infer = (x - denoised) / t.reshape(-1, 1, 1, 1, 1)  # ComfyUI: x0 = x_t - sigma * v
    assert torch.allclose(v_train, v_infer, atol=2e-5, rtol=1e-4), (v_train - v_infer).abs().max()
    # ... and the adapters matter (the test would be vacuous otherwise)
    plain = wan_fixtures.load_tiny_wan(tiny_wan_state_dict())
    with torch.no_grad():
        base = plain.model.apply_model(x, t, c_crossattn=ctx, transformer_options={})
    assert (base - denoised).abs().max() > 1e-3


def _loss_and_grads(dit, x, t, ctx):
    dit.activate()
    for p in dit.bank.trainable_parameters():
        p.grad = None
    with dit.adapters(_base_gains(2)):
        loss = dit.predict(x, t, ctx).pow(2).mean()
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in dit.bank.trainable_parameters()]


def test_checkpointing_and_frozen_blocks_do_not_change_gradients(tiny_wan_state_dict):
    import wan_fixtures

    x, t, ctx = _inputs(1)
    plain = _dit(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()), checkpointing=False)
    ckpt = _dit(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()), checkpointing=True)
    grad_enabled = {}
    blocks = ckpt.diffusion_model.blocks
    first = ckpt.first_adapted
    assert first == len(blocks) - 4

    def record(i):
        def hook(module, args):
            grad_enabled.setdefault(i, torch.is_grad_enabled())
        return hook

    for i in (0, first - 1, first, len(blocks) - 1):
        blocks[i].register_forward_pre_hook(record(i))
    l1, g1 = _loss_and_grads(plain, x, t, ctx)
    l2, g2 = _loss_and_grads(ckpt, x, t, ctx)
    assert torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in g1)
    assert grad_enabled[0] is False and grad_enabled[first - 1] is False  # frozen front: no autograd
    assert grad_enabled[first] is True and grad_enabled[len(blocks) - 1] is True


def test_streamed_blocks_and_fp8_base_weights_train(tiny_wan_state_dict):
    import wan_fixtures

    x, t, ctx = _inputs(2)
    ref = _dit(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()))
    streamed = _dit(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()), stream=2)
    l1, g1 = _loss_and_grads(ref, x, t, ctx)
    l2, g2 = _loss_and_grads(streamed, x, t, ctx)
    assert all(getattr(m, "comfy_cast_weights", True) for m in streamed.diffusion_model.blocks[0].modules()
               if hasattr(m, "comfy_cast_weights"))
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    with pytest.raises(ValueError, match="only blocks in front of the first adapted block"):
        _dit(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()), stream=8)

    fp8 = _dit(wan_fixtures.load_tiny_wan(tiny_wan_state_dict(), dtype=torch.float8_e4m3fn))
    assert fp8.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    l3, g3 = _loss_and_grads(fp8, x, t, ctx)
    assert torch.isfinite(l3) and all(torch.isfinite(g).all() for g in g3)
    assert abs(float(l3) - float(l1)) < 0.05 * float(l1)  # fp8 rounding of the base, same model


def test_bf16_autocast_trains(tiny_wan_state_dict):
    import wan_fixtures

    x, t, ctx = _inputs(3)
    ref = _dit(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()))
    l1, g1 = _loss_and_grads(ref, x, t, ctx)
    dit = _dit(wan_fixtures.load_tiny_wan(tiny_wan_state_dict()))
    dit.activate()
    with dit.adapters(_base_gains(2)):
        loss = dit.predict(x, t, ctx, autocast_dtype=torch.bfloat16).pow(2).mean()
        loss.backward()
    grads = [p.grad for p in dit.bank.trainable_parameters()]
    assert all(p.dtype == torch.float32 for p in dit.bank.trainable_parameters())  # fp32 master weights
    assert abs(float(loss.detach()) - float(l1)) < 0.05 * float(l1)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]),
                                                torch.cat([g.flatten() for g in g1]), dim=0)
    assert cos > 0.95
