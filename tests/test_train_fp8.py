"""Training on ComfyUI's scaled-fp8 DiT files (``wan2.2_t2v_*_14B_fp8_scaled.safetensors``, what the bundled
workflows load): the weights stay fp8 with their per-layer scales, and the run equals one on a float32 file of
the dequantised weights (what those fp8 layers compute with): same losses, same LoRA."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

import train_fixtures as tf
import wan_fixtures as wf
from training.stage1 import run_stage1

QUIET = lambda *_: None  # noqa: E731


def test_scaled_fp8_dit_trains_like_its_dequantised_weights(tmp_path):
    ws = tf.make_workspace(tmp_path / "ws")
    scaled = wf.scaled_fp8_state_dict(wf.tiny_wan_state_dict(0, num_layers=tf.LAYERS, dim=128, ffn_dim=256))
    fp8_path = tmp_path / "tiny_fp8_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in scaled.items()}, str(fp8_path))
    deq_path = tmp_path / "tiny_dequantised.safetensors"
    save_file({k: v.contiguous() for k, v in wf.dequantized_state_dict(wf.load_tiny_wan(scaled)).items()},
              str(deq_path))

    runs = {}
    for name, path in (("fp8", fp8_path), ("dequantised", deq_path)):
        cfg = tf.stage1_config(ws, tmp_path / name, model={"dit": str(path)},
                               train={"max_steps": 4, "learning_rate": 1e-2})
        runs[name] = run_stage1(cfg, log_fn=QUIET)
    q = runs["fp8"].trainer.dits.dits[0].diffusion_model.blocks[2].self_attn.q
    assert q.weight.dtype == torch.float8_e4m3fn and float(q.scale_weight) not in (0.0, 1.0)  # really scaled fp8

    losses = {n: [json.loads(x)["loss"] for x in r.metrics.read_text().splitlines()] for n, r in runs.items()}
    assert len(losses["fp8"]) == 4
    torch.testing.assert_close(torch.tensor(losses["fp8"]), torch.tensor(losses["dequantised"]), rtol=1e-5, atol=0)
    a, b = (tf.lora_tensors(r.loras["default"]) for r in (runs["fp8"], runs["dequantised"]))
    assert a.keys() == b.keys() and any(float(v.abs().max()) > 1e-3 for k, v in a.items() if "lora_up" in k)
    # the fp8 layers rescale in their own order, so the forward differs by float32 rounding (the losses agree to
    # 1e-5); AdamW's sign-like first steps turn that into at most ~1e-5 on elements with near-zero gradients,
    # against updates of 1e-2 per step
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |fp8 - dequantised| LoRA difference: {worst:.3g}")
    assert worst < 3e-5
