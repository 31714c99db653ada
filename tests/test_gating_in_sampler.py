"""Per-step gates inside ComfyUI's sampler: band, EMA, top-k, CFG rows, A14B splits, fp8, stacking, compile."""
from __future__ import annotations

import pytest
import torch

import comfy.ldm.modules.attention
import comfy.ldm.wan.model
from comfy_api.torch_helpers import set_torch_compile_wrapper
from comfy_extras.nodes_model_advanced import ModelSamplingSD3

import wan_fixtures as wf
from moe_core.band import ALWAYS_ON, DEFAULT_BAND, three_level_band
from moe_core.patch import LoraMoEModelError, apply_lora_moe, gate_trace, model_fingerprint, reconfigure
from moe_core.routing import manual_route, rule_route
from moe_fixtures import comfy_lora_reference, random_adapters, random_moe, set_parts

ATOL = 2e-5


def _learned_router(seed=0, n=4, hidden=64):
    """A router whose output swings with t, so gates change at every step."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, n + 1, generator=g) * 0.1
    w1[:, -1] = torch.randn(hidden, generator=g) * 4.0
    return {"fc1.weight": w1, "fc1.bias": torch.randn(hidden, generator=g),
            "fc2.weight": torch.randn(n, hidden, generator=g) * 0.3, "fc2.bias": torch.zeros(n)}


def test_trace_shows_band_ema_and_topk(tiny_wan, wan_contexts, wan_sample):
    moe = random_moe(seed=1)
    moe.sets["default"].router = _learned_router()
    routing = rule_route("电凝钩切割组织", mode="learned", top_k=2, temperature=1.0)
    shift1 = ModelSamplingSD3().patch(tiny_wan, shift=1.0)[0]  # WAN's default shift 8 keeps sigma high
    patched = apply_lora_moe(shift1, moe, routing=routing, ema_beta=0.7)  # the seeds' default band
    wan_sample(patched, *wan_contexts, seed=3, steps=12, scheduler="simple")
    trace = gate_trace(patched)
    assert [e["step"] for e in trace] == list(range(12))
    ema = None
    for e in trace:
        raw = torch.tensor(e["raw"])
        assert (raw > 0).sum() <= 2 and abs(raw.sum() - 1) < 1e-5, "top-2, renormalised"
        ema = raw if ema is None else 0.7 * ema + 0.3 * raw
        assert torch.allclose(torch.tensor(e["ema"]), ema, atol=1e-6), "EMA over steps, beta 0.7"
        assert e["band"] == DEFAULT_BAND.factor(e["sigma"])
        assert torch.allclose(torch.tensor(e["gates"]), ema * e["band"], atol=1e-6)
        for rows in e["rows"]:
            for row in rows["gates"]:
                assert torch.allclose(torch.tensor(row), ema * e["band"], atol=1e-6)
    bands = {e["band"] for e in trace}
    assert bands == {0.0, 0.5, 1.0}, "a 12-step schedule crosses all three levels of the seeds' band"
    assert len({tuple(e["raw"]) for e in trace}) > 6, "the learned router varies with t"
    # a second run starts the EMA afresh
    wan_sample(patched, *wan_contexts, seed=3, steps=12)
    assert gate_trace(patched)[0]["ema"] == trace[0]["raw"]


def test_cfg_rows_get_their_own_gates(tiny_wan, wan_contexts, tmp_path):
    moe = random_moe(seed=2)
    parts = set_parts(moe)
    patched = apply_lora_moe(tiny_wan, moe, alpha_base=0.8, band=ALWAYS_ON, uncond="off",
                             routing=manual_route({"Scissors": 1.0}))
    pos, neg = wan_contexts
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])

    def apply(model, context, cond_or_uncond):
        import comfy.model_management as mm
        mm.load_models_gpu([model])
        opts = {**model.model_options["transformer_options"], "cond_or_uncond": cond_or_uncond,
                "sigmas": sigma, "wrappers": model.wrappers}  # as CFGGuider.sample merges them
        with torch.no_grad():
            return model.model.apply_model(torch.cat([x] * context.shape[0]), sigma.repeat(context.shape[0]),
                                           c_crossattn=context, transformer_options=opts)

    both = apply(patched, torch.cat([neg, pos]), [1, 0])  # ComfyUI's order: negative chunk first
    rows = gate_trace(patched)[-1]["rows"][-1]
    assert rows["gates"][0] == [0.0] * 4 and rows["gates"][1] == [1.0, 0.0, 0.0, 0.0]
    ref_uncond = comfy_lora_reference(tiny_wan, [(parts["base"], 0.8)], tmp_path)
    ref_cond = comfy_lora_reference(tiny_wan, [(parts["base"], 0.8), (parts["Scissors"], 1.0)], tmp_path)
    torch.testing.assert_close(both[0:1], apply(ref_uncond, neg, [1]), atol=ATOL, rtol=0)
    torch.testing.assert_close(both[1:2], apply(ref_cond, pos, [0]), atol=ATOL, rtol=0)


def test_a14b_split_with_two_adapter_sets(tiny_wan_state_dict, wan_contexts, tmp_path):
    """Two DiTs (high/low noise), each patched with its own set; the sets are picked by fingerprint."""
    high = wf.load_tiny_wan(tiny_wan_state_dict(seed=10))
    low = wf.load_tiny_wan(tiny_wan_state_dict(seed=11))
    moe = random_moe(seed=3, sets=("high_noise", "low_noise"))
    with pytest.raises(LoraMoEModelError, match="adapter_set 'auto' cannot choose: set adapter_set to high-noise"):
        apply_lora_moe(high, moe)
    moe.sets["high_noise"].fingerprint = model_fingerprint(high)
    moe.sets["low_noise"].fingerprint = model_fingerprint(low)
    routing = manual_route({"Hook/Electrocautery": 1.0})
    band = three_level_band(0.2, 0.9, 0.5)
    ph = apply_lora_moe(high, moe, routing=routing, band=band)
    pl = apply_lora_moe(low, moe, routing=routing, band=band)
    assert ph.get_attachment("wan_lora_moe").set_name == "high_noise"
    assert pl.get_attachment("wan_lora_moe").set_name == "low_noise"
    pos, neg = wan_contexts
    steps, split = 8, 3

    def run(model_h, model_l):
        lat = wf.sample(model_h, pos, neg, seed=5, steps=steps, start_step=0, last_step=split,
                        force_full_denoise=False)
        return wf.sample(model_l, pos, neg, seed=5, steps=steps, latent=lat, add_noise=False,
                         start_step=split, last_step=10000, force_full_denoise=True)

    ours = run(ph, pl)
    trace_h, trace_l = gate_trace(ph), gate_trace(pl)
    assert [e["step"] for e in trace_h] == [0, 1, 2] and [e["step"] for e in trace_l] == [0, 1, 2, 3, 4]
    # band by noise level, not by step index: each half sees its own slice of the schedule
    assert all(e["band"] == band.factor(e["sigma"]) for e in trace_h + trace_l)
    assert {e["band"] for e in trace_h} == {1.0} and {e["band"] for e in trace_l} >= {0.5, 1.0}
    # oracle for the high half: band 1 at all its steps, so ComfyUI's loader with base + Hook is exact
    parts_h = set_parts(moe, "high_noise")
    ref_h = comfy_lora_reference(high, [(parts_h["base"], 0.7), (parts_h["Hook/Electrocautery"], 1.0)], tmp_path)
    lat_ref = wf.sample(ref_h, pos, neg, seed=5, steps=steps, start_step=0, last_step=split)
    lat_ours = wf.sample(ph, pos, neg, seed=5, steps=steps, start_step=0, last_step=split)
    torch.testing.assert_close(lat_ours, lat_ref, atol=ATOL, rtol=0)
    assert ours.shape == lat_ref.shape and torch.isfinite(ours).all()


_scaled_fp8_state_dict = wf.scaled_fp8_state_dict
_dequantized = wf.dequantized_state_dict


@pytest.mark.parametrize("kind", ["fp8", "scaled_fp8"])
def test_fp8_weights(kind, tiny_wan_state_dict, wan_contexts, wan_sample, tmp_path):
    if kind == "fp8":
        model = wf.load_tiny_wan(tiny_wan_state_dict(), dtype=torch.float8_e4m3fn)
    else:
        model = wf.load_tiny_wan(_scaled_fp8_state_dict(tiny_wan_state_dict()))
        assert model.model.diffusion_model.blocks[9].self_attn.q.scale_weight.item() != 1.0
    assert model.model.diffusion_model.blocks[9].self_attn.q.weight.dtype == torch.float8_e4m3fn
    # oracle: the same (fp8-rounded, rescaled) weights in float32, patched by ComfyUI's loader
    ref_model = wf.load_tiny_wan(_dequantized(model))
    moe = random_moe(seed=4)
    parts = set_parts(moe)
    ours = wan_sample(apply_lora_moe(model, moe, band=ALWAYS_ON, routing=manual_route({"Other": 1.0})),
                      *wan_contexts, seed=9)
    ref = wan_sample(comfy_lora_reference(ref_model, [(parts["base"], 0.7), (parts["Other"], 1.0)], tmp_path),
                     *wan_contexts, seed=9)
    plain = wan_sample(ref_model, *wan_contexts, seed=9)
    assert (ref - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert model.model.diffusion_model.blocks[9].self_attn.q.weight.dtype == torch.float8_e4m3fn


def test_stacks_with_a_core_lora_and_model_sampling_sd3(tiny_wan, wan_contexts, wan_sample, tmp_path):
    """A 4-step distillation-style LoRA from the core loader on every block, shift 5, cfg 1."""
    distill = random_adapters({f"blocks.{b}.{p}": 16 for b in range(10) for p in ("self_attn.q", "ffn.2")
                               if not p.startswith("ffn") or True}, seed=99, scale=0.03)
    distill = {m: a for m, a in distill.items() if not m.endswith("ffn.2")}
    moe = random_moe(seed=5)
    parts = set_parts(moe)
    routing = manual_route({"Scissors": 0.6, "Suction": 0.4})
    core = comfy_lora_reference(tiny_wan, [(distill, 1.0)], tmp_path)
    shifted = ModelSamplingSD3().patch(core, shift=5.0)[0]
    ours = wan_sample(apply_lora_moe(shifted, moe, band=ALWAYS_ON, routing=routing), *wan_contexts, seed=4,
                      steps=4, cfg=1.0)
    ref = comfy_lora_reference(tiny_wan, [(distill, 1.0), (parts["base"], 0.7), (parts["Scissors"], 0.6),
                                          (parts["Suction"], 0.4)], tmp_path)
    ref = ModelSamplingSD3().patch(ref, shift=5.0)[0]
    torch.testing.assert_close(ours, wan_sample(ref, *wan_contexts, seed=4, steps=4, cfg=1.0), atol=ATOL, rtol=0)
    # the other order (LoRA-MoE first, then the core loader and ModelSamplingSD3) gives the same video
    other = ModelSamplingSD3().patch(comfy_lora_reference(
        apply_lora_moe(tiny_wan, moe, band=ALWAYS_ON, routing=routing), [(distill, 1.0)], tmp_path), shift=5.0)[0]
    torch.testing.assert_close(wan_sample(other, *wan_contexts, seed=4, steps=4, cfg=1.0), ours, atol=ATOL, rtol=0)


def test_torch_compile_does_not_recompile_when_gates_change(tiny_wan_state_dict, wan_contexts, monkeypatch):
    """Gates change every step (learned router + band) yet the compiled graph is reused.

    ComfyUI's CPU attention (sub-quadratic) queries free memory through psutil, which breaks the graph in
    every block; GPUs run PyTorch SDPA, selected here as `--use-pytorch-cross-attention` would.
    """
    monkeypatch.setattr(comfy.ldm.wan.model, "optimized_attention",
                        comfy.ldm.modules.attention.attention_pytorch)
    torch._dynamo.reset()
    model = wf.load_tiny_wan(tiny_wan_state_dict(num_layers=2))
    moe = random_moe(num_layers=2, seed=6, last_blocks=1, ffn_blocks=1)
    moe.sets["default"].router = _learned_router(1)
    patched = apply_lora_moe(model, moe, routing=rule_route("吸引吸血", mode="learned"), ema_beta=0.5,
                             band=three_level_band(0.3, 0.8, 0.5))
    eager = wf.sample(patched, *wan_contexts, seed=2, steps=5, cfg=1.0)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = patched.clone()
    set_torch_compile_wrapper(compiled, backend=counting_backend)
    out = wf.sample(compiled, *wan_contexts, seed=2, steps=5, cfg=1.0)
    first = len(graphs)
    trace = gate_trace(compiled)
    assert len({tuple(e["gates"]) for e in trace}) == 5, "gates differ at every one of the 5 steps"
    out2 = wf.sample(compiled, *wan_contexts, seed=3, steps=7, cfg=1.0)
    assert first >= 1 and len(graphs) == first, f"recompiled: {first} graphs, then {len(graphs)}"
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)
    assert torch.isfinite(out2).all()
    torch._dynamo.reset()


def test_adapters_follow_the_model_dtype(tiny_wan_state_dict, wan_contexts, wan_sample):
    """ComfyUI moves the adapters with the model when it loads it (`model_patches_to`): fp32 on disk, bf16 here."""
    bf16 = wf.load_tiny_wan(tiny_wan_state_dict(), dtype=torch.bfloat16)
    moe = random_moe(seed=7)
    patched = apply_lora_moe(bf16, moe, routing=manual_route({"Other": 1.0}))
    weights = patched.get_attachment("wan_lora_moe").weights
    numel = sum(a.down.numel() + a.up.numel() for p in moe.sets["default"].modules.values()
                for a in [p.base, *p.experts])
    assert weights.nbytes() == 4 * numel, "float32 until ComfyUI loads the model"
    wan_sample(patched, *wan_contexts, seed=1, steps=2)
    assert bf16.model_dtype() == torch.bfloat16
    assert weights.nbytes() == 2 * numel, "moved to the model's dtype by ComfyUI's load"


def test_file_for_another_model_is_refused(tiny_wan_state_dict):
    model = wf.load_tiny_wan(tiny_wan_state_dict(num_layers=4))
    with pytest.raises(LoraMoEModelError, match=r"adapts 'blocks\.\d+\.self_attn\.q', which this model does not have"):
        apply_lora_moe(model, random_moe(num_layers=10))
    wide = wf.load_tiny_wan(tiny_wan_state_dict(dim=256, ffn_dim=512))
    with pytest.raises(LoraMoEModelError, match=r"as 128->128, but the model's layer is 256->256"):
        apply_lora_moe(wide, random_moe())


def test_unknown_expert_and_missing_router_are_refused(tiny_wan):
    from moe_core.routing import RoutingError
    with pytest.raises(RoutingError, match=r"names experts \['Stapler'\]"):
        apply_lora_moe(tiny_wan, random_moe(), routing=manual_route({"Stapler": 1.0}))
    with pytest.raises(LoraMoEModelError, match="no learned router"):
        apply_lora_moe(tiny_wan, random_moe(), routing=rule_route("剪刀", mode="learned"))


def test_reconfigure_changes_the_band_on_a_clone(tiny_wan, wan_contexts, wan_sample):
    patched = apply_lora_moe(tiny_wan, random_moe(seed=8), routing=manual_route({"Scissors": 1.0}))
    off_early = reconfigure(patched, band=three_level_band(0.95, 0.99, 0.0))
    assert patched.get_attachment("wan_lora_moe").config.band == DEFAULT_BAND
    wan_sample(off_early, *wan_contexts, seed=1, steps=4)
    assert [e["band"] for e in gate_trace(off_early)] == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(LoraMoEModelError, match="carries no LoRA-MoE"):
        reconfigure(tiny_wan, band=ALWAYS_ON)
