"""Sampling with a LoRA-MoE equals ComfyUI's own LoRA loader applying the same adapters (the oracle).

Tiny random WAN DiTs are loaded through `comfy.sd.load_diffusion_model_state_dict` and sampled with
ComfyUI's sampler; the LoRA-MoE is assembled from plain LoRA files in each key format ComfyUI reads.
"""
from __future__ import annotations

import pytest
import torch

from moe_core import assemble, export, inspect as moe_inspect
from moe_core.band import ALWAYS_ON
from moe_core.checkpoint import load_lora_moe
from moe_core.patch import apply_lora_moe, gate_trace
from moe_core.routing import manual_route, rule_route
from moe_fixtures import comfy_lora_reference, random_moe, set_parts, write_lora_file

ATOL = 2e-5


def _assemble_from(fmt: str, tmp_path, moe):
    parts = set_parts(moe)
    args = ["--base", str(write_lora_file(parts["base"], tmp_path / f"base_{fmt}.safetensors", fmt))]
    for i, name in enumerate(moe.expert_names):
        path = write_lora_file(parts[name], tmp_path / f"expert{i}_{fmt}.safetensors", fmt)
        args += ["--expert", f"{name}={path}"]
    out = tmp_path / f"moe_{fmt}.safetensors"
    assert assemble.main(args + ["--out", str(out)]) == 0
    return load_lora_moe(out), parts


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "comfy"])
def test_equals_comfy_loader_for_each_key_format(fmt, tmp_path, tiny_wan, wan_contexts, wan_sample):
    moe, parts = _assemble_from(fmt, tmp_path, random_moe(seed=3))
    pos, neg = wan_contexts
    plain = wan_sample(tiny_wan, pos, neg, seed=7)

    # experts off: exactly LoraLoaderModelOnly with the base LoRA at strength alpha_base
    ours = wan_sample(apply_lora_moe(tiny_wan, moe, alpha_base=0.7), pos, neg, seed=7)
    ref = wan_sample(comfy_lora_reference(tiny_wan, [(parts["base"], 0.7)], tmp_path), pos, neg, seed=7)
    assert (ref - plain).abs().max() > 100 * ATOL, "the base LoRA must change the output"
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)

    # one-hot gate: base + that expert at alpha_expert
    one_hot = apply_lora_moe(tiny_wan, moe, alpha_base=0.7, alpha_expert=0.9, band=ALWAYS_ON,
                             routing=manual_route({"Suction": 1.0}))
    ref = comfy_lora_reference(tiny_wan, [(parts["base"], 0.7), (parts["Suction"], 0.9)], tmp_path)
    torch.testing.assert_close(wan_sample(one_hot, pos, neg, seed=7), wan_sample(ref, pos, neg, seed=7),
                               atol=ATOL, rtol=0)


def test_top2_rule_routing_equals_weighted_experts(tmp_path, tiny_wan, wan_contexts, wan_sample):
    moe, parts = _assemble_from("kohya", tmp_path, random_moe(seed=4))
    pos, neg = wan_contexts
    routing = rule_route("电凝钩切割组织。吸引吸血。抓钳牵拉。", temperature=2.0, top_k=2)
    patched = apply_lora_moe(tiny_wan, moe, alpha_base=0.6, alpha_expert=1.2, band=ALWAYS_ON, routing=routing)
    ours = wan_sample(patched, pos, neg, seed=11)
    gates = gate_trace(patched)[0]["gates"]
    # three instruments named under top-2: they tie, and ties are kept (never broken by index order)
    assert [round(g, 6) for g in gates] == [0.0, 0.333333, 0.333333, 0.333333] and abs(sum(gates) - 1) < 1e-6
    loras = [(parts["base"], 0.6)] + [(parts[n], 1.2 * g) for n, g in zip(moe.expert_names, gates)]
    ref = wan_sample(comfy_lora_reference(tiny_wan, loras, tmp_path), pos, neg, seed=11)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_export_bakes_gates_into_a_plain_lora(tmp_path, tiny_wan, wan_contexts, wan_sample, capsys):
    moe, _ = _assemble_from("comfy", tmp_path, random_moe(seed=5))
    src = tmp_path / "moe_comfy.safetensors"
    out = tmp_path / "baked.safetensors"
    assert export.main([str(src), "--gates", "Scissors=0.25,Other=0.75", "--alpha-base", "0.5",
                        "--dtype", "float32", "--out", str(out)]) == 0
    from moe_core.lora_formats import load_lora
    baked = load_lora(out)
    pos, neg = wan_contexts
    ref = wan_sample(comfy_lora_reference(tiny_wan, [(baked, 1.0)], tmp_path), pos, neg, seed=2)
    ours = wan_sample(apply_lora_moe(tiny_wan, moe, alpha_base=0.5, alpha_expert=1.0, band=ALWAYS_ON,
                                     routing=manual_route({"Scissors": 0.25, "Other": 0.75})), pos, neg, seed=2)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert moe_inspect.main([str(src)]) == 0
    text = capsys.readouterr().out
    assert "experts: Scissors, Hook/Electrocautery, Suction, Other" in text
    assert "set default: 67 modules in blocks 2-9 (67 with experts)" in text


def test_input_model_untouched_and_clones_sample_one_after_another(tmp_path, tiny_wan, wan_contexts, wan_sample):
    moe = random_moe(seed=6)
    pos, neg = wan_contexts
    plain = wan_sample(tiny_wan, pos, neg, seed=1)
    a = apply_lora_moe(tiny_wan, moe, routing=manual_route({"Scissors": 1.0}), band=ALWAYS_ON)
    b = apply_lora_moe(tiny_wan, moe, routing=manual_route({"Other": 1.0}), band=ALWAYS_ON)
    assert tiny_wan.object_patches == {} and "wan_lora_moe" not in tiny_wan.attachments
    out_a, out_b = wan_sample(a, pos, neg, seed=1), wan_sample(b, pos, neg, seed=1)
    assert (out_a - out_b).abs().max() > 1e-3, "different gates must give different videos"
    torch.testing.assert_close(wan_sample(a, pos, neg, seed=1), out_a, atol=0, rtol=0)
    torch.testing.assert_close(wan_sample(tiny_wan, pos, neg, seed=1), plain, atol=0, rtol=0)
    # nothing left behind on the shared diffusion model once the plain model is loaded again
    layer = tiny_wan.model.diffusion_model.blocks[9].self_attn.q
    assert "LoraMoEForward" not in type(layer.__dict__.get("forward", layer.forward)).__name__
    assert a.get_attachment("wan_lora_moe").runtime.ab is None
