#!/usr/bin/env python
"""Write the bundled UI-format workflows into workflows/ (a maintenance tool; the JSON files are what ships).

    python scripts/build_workflows.py            # node definitions from an in-process ComfyUI (needs the venv)
    python scripts/build_workflows.py --object-info http://127.0.0.1:8188/object_info
    python scripts/build_workflows.py --start-frame  # also render workflows/surgical_start_frame.png again

The image-to-video workflows load ``surgical_start_frame.png`` (rendered here when missing, from the pack's
synthetic clip renderer); ComfyUI's LoadImage finds it once copied to ``ComfyUI/input/``.

Widget values are written by input name and placed in the front end's order using ComfyUI's node
definitions (scripts/workflow_graph.py, the same rules as moe_core/workflow_api.py), so a change of a node's
inputs shows up here as an error instead of as a silently shifted value. Positions and sizes are laid out by hand below. After
regenerating, run the browser test: it loads every workflow in the real front end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from workflow_graph import Graph, Node, object_info_from, object_info_inprocess  # noqa: E402

OUT_DIR = REPO / "workflows"

# Model files (names as in ComfyUI's own WAN 2.2 A14B template) and where they go.
HF = "https://huggingface.co/Comfy-Org"
UNET_HIGH = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
UNET_LOW = "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
LORA_MOE = "surgical_lora_moe_a14b.safetensors"
MODEL_URLS = {
    UNET_HIGH: (f"{HF}/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/{UNET_HIGH}", "diffusion_models"),
    UNET_LOW: (f"{HF}/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/{UNET_LOW}", "diffusion_models"),
    VAE: (f"{HF}/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/vae/{VAE}", "vae"),
    TEXT_ENCODER: (f"{HF}/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/{TEXT_ENCODER}",
                   "text_encoders"),
}
# Image-to-video (names as in ComfyUI's video_wan2_2_14B_i2v and video_wan2_2_5B_ti2v templates).
UNET_I2V_HIGH = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
UNET_I2V_LOW = "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
UNET_TI2V = "wan2.2_ti2v_5B_fp16.safetensors"
VAE_22 = "wan2.2_vae.safetensors"  # the 48-channel WAN 2.2 VAE (TI2V 5B only; I2V A14B uses the 2.1 VAE)
LORA_MOE_I2V = "surgical_lora_moe_i2v_a14b.safetensors"
LORA_MOE_TI2V = "surgical_lora_moe_ti2v_5b.safetensors"
for _name in (UNET_I2V_HIGH, UNET_I2V_LOW, UNET_TI2V):
    MODEL_URLS[_name] = (f"{HF}/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/{_name}",
                         "diffusion_models")
MODEL_URLS[VAE_22] = (f"{HF}/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/vae/{VAE_22}", "vae")
#: The start frame the image-to-video workflows load (LoadImage lists ComfyUI/input/): a frame of the pack's
#: synthetic clip renderer (training/data/synthetic.py), shipped beside the workflows; copy it to input/.
START_FRAME = "surgical_start_frame.png"
START_FRAME_SEED, START_FRAME_LABEL = 3, 1  # the electrocautery hook the prompt names

PROMPT = ("腹腔镜手术视野，电凝钩沿胆囊三角切割组织，吸引器吸除渗血，组织表面湿润反光，镜头稳定，细节清晰。\n"
          "Laparoscopic view: an electrocautery hook dissects tissue while a suction device clears the blood.")
NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
            "丑陋的，残缺的，多余的手指，杂乱的背景，静止不动的画面")

# Sampling as in ComfyUI's A14B template (20 steps, cfg 3.5, shift 8), split where t crosses WAN 2.2's
# t2v boundary 0.875: with shift 8 and the simple scheduler, steps 0-10 have t >= 0.875.
STEPS, CFG, SHIFT, SPLIT = 20, 3.5, 8.0, 11
WIDTH, HEIGHT, LENGTH, FPS = 832, 480, 81, 16
SEED = 20251122
# I2V A14B as in ComfyUI's template (20 steps, cfg 3.5, shift 8, euler/simple, 16 fps, 81 frames; 832x480
# here, the template's 640x640 is a low-memory default), split where t crosses the i2v boundary 0.9:
# with shift 8, steps 0-9 have t >= 0.9 (tests/test_server_e2e.py checks both splits against ComfyUI's
# own sigmas).
I2V_SPLIT = 10
I2V_WIDTH, I2V_HEIGHT = 832, 480
# TI2V 5B as in ComfyUI's template: one KSampler, 20 steps, cfg 5, uni_pc/simple, shift 8, 1280x704,
# 121 frames at 24 fps.
TI2V_STEPS, TI2V_CFG, TI2V_SHIFT, TI2V_SAMPLER = 20, 5.0, 8.0, "uni_pc"
TI2V_WIDTH, TI2V_HEIGHT, TI2V_LENGTH, TI2V_FPS = 1280, 704, 121, 24

FILES_NOTE = f"""## WAN 2.2 A14B + LoRA-MoE: model files

```
ComfyUI/models/
├── diffusion_models/
│   ├── {UNET_HIGH}
│   └── {UNET_LOW}
├── lora_moe/            (or loras/)
│   └── {LORA_MOE}
├── text_encoders/
│   └── {TEXT_ENCODER}
└── vae/
    └── {VAE}
```

- WAN files: [Comfy-Org/Wan_2.2_ComfyUI_Repackaged]({HF}/Wan_2.2_ComfyUI_Repackaged) (text encoder from
  [Wan_2.1_ComfyUI_repackaged]({HF}/Wan_2.1_ComfyUI_repackaged)).
- The LoRA-MoE file is yours: train it with this pack's trainer, or assemble it from plain LoRAs with
  `python -m moe_core.assemble` (see the pack's README). One file holds both adapter sets
  (high-noise and low-noise); each **Load LoRA-MoE** picks its set.
"""

ROUTING_NOTE = """## Routing from the prompt

The prompt lives in one **String (Multiline)** node that feeds both the text encoder and the
**Prompt→Instrument Router**, so the experts always follow what the prompt says.
Keywords (Chinese or English): 剪刀 / scissors → Scissors; 电凝钩, 电凝, hook → Hook/Electrocautery;
吸引 / suction → Suction; 抓钳, 分离钳, grasper, forceps … → Other. No keyword → Other (see *no_instrument*).

**Timestep Band** sets where the experts act on the noise level t (default: off below 0.2, half
strength to 0.6, full above) and draws each expert's gate per step; the dotted line is the
high/low-noise boundary (t = 0.875): at shift 8 and 20 steps, steps 0-10 have t >= 0.875, so the
high-noise KSamplerAdvanced ends at step 11 and the low-noise one starts there. Change steps or shift,
and move the split to where the band picture's dotted line falls.
"""

I2V_FILES_NOTE = f"""## WAN 2.2 I2V A14B + LoRA-MoE: model files

```
ComfyUI/models/
├── diffusion_models/
│   ├── {UNET_I2V_HIGH}
│   └── {UNET_I2V_LOW}
├── lora_moe/            (or loras/)
│   └── {LORA_MOE_I2V}
├── text_encoders/
│   └── {TEXT_ENCODER}
└── vae/
    └── {VAE}
ComfyUI/input/
└── {START_FRAME}   (the start frame; or load your own)
```

- WAN files: [Comfy-Org/Wan_2.2_ComfyUI_Repackaged]({HF}/Wan_2.2_ComfyUI_Repackaged) (text encoder from
  [Wan_2.1_ComfyUI_repackaged]({HF}/Wan_2.1_ComfyUI_repackaged)). I2V uses the WAN **2.1** VAE.
- The start frame ships in the pack's `workflows/` folder: copy it to `ComfyUI/input/`.
- The LoRA-MoE file must be trained for **I2V A14B** (a T2V file is refused: the DiTs read 36 latent
  channels, not 16). One file holds both adapter sets; *adapter_set* `auto` picks each DiT's set.
"""

TI2V_FILES_NOTE = f"""## WAN 2.2 TI2V 5B + LoRA-MoE: model files

```
ComfyUI/models/
├── diffusion_models/
│   └── {UNET_TI2V}
├── lora_moe/            (or loras/)
│   └── {LORA_MOE_TI2V}
├── text_encoders/
│   └── {TEXT_ENCODER}
└── vae/
    └── {VAE_22}
ComfyUI/input/
└── {START_FRAME}   (the start frame; or load your own)
```

- WAN files: [Comfy-Org/Wan_2.2_ComfyUI_Repackaged]({HF}/Wan_2.2_ComfyUI_Repackaged) (text encoder from
  [Wan_2.1_ComfyUI_repackaged]({HF}/Wan_2.1_ComfyUI_repackaged)). TI2V needs the 48-channel
  **WAN 2.2 VAE**; the WAN 2.1 VAE does not fit it.
- The start frame ships in the pack's `workflows/` folder: copy it to `ComfyUI/input/`. Without a start
  image (remove the link to *start_image*) the same graph is text-to-video.
- The LoRA-MoE file must be trained for **TI2V 5B** (one DiT, one adapter set).
"""

I2V_ROUTING_NOTE = """## Start frame and routing

**WanImageToVideo** encodes the start frame and adds it (with a mask) to both conditionings; both DiTs
read it. The prompt lives in one **String (Multiline)** node that feeds the text encoder and the
**Prompt→Instrument Router**, so the experts follow what the prompt says.

The I2V pair switches DiTs at t = 0.9 (T2V: 0.875): at shift 8 and 20 steps, steps 0-9 have t >= 0.9,
so the high-noise KSamplerAdvanced ends at step 10 and the low-noise one starts there. Change steps or
shift, and move the split to where the band picture's dotted line falls.
"""

TI2V_ROUTING_NOTE = """## Start frame and routing

**Wan22ImageToVideoLatent** puts the start frame's latent into frame 0 of the latent and masks it, so
the 5B DiT sees that frame at t = 0 and generates the others. The experts' gates and the Timestep Band
follow the **sampler's noise level of the generated frames** (the sigma of each step), not the start
frame's t = 0.

The prompt lives in one **String (Multiline)** node that feeds the text encoder and the
**Prompt→Instrument Router**. One DiT, one KSampler (uni_pc, 20 steps, shift 8, as ComfyUI's template).
"""

OVERRIDE_NOTE = """## Choosing the instrument by hand

**Gate Override** replaces what the router detected: pick one *instrument* (its expert gets gate 1),
or set *instrument* to "by weights" and give each expert a weight (normalised to sum 1; all zero is an
error). The Router stays connected so its detection is still shown, but the gates are yours.
"""

SHEET_NOTE = """## Band / gate comparison sheet

One seed, one prompt, six renders, tiled 3 × 2 into one video:

| experts off (base LoRA only) | auto (routed from the prompt) | Scissors forced |
|---|---|---|
| **Hook/Electrocautery forced** | **Suction forced** | **Other forced** |

Every column uses its own pair of **Load LoRA-MoE** nodes (high-noise and low-noise DiT) on the same
loaded models; ComfyUI caches the shared nodes. Change the band on a column with a **Timestep Band**
after its loaders. Lower the resolution / length first: this sheet renders six videos.
"""


GREEN = ("#232", "#353")
PURPLE = ("#323", "#535")


def prompt_nodes(g: Graph, n: dict, x: int, y: int) -> dict:
    """The shared prompt String (column x) feeding the positive text encoding, and the negative one, both on
    `n["clip"]`; added to `n`, which is returned."""
    n["prompt"] = g.add("PrimitiveStringMultiline", (x, y), (420, 160), "Prompt (shared)",
                        {"value": PROMPT}, color=GREEN)
    n["pos"] = g.add("CLIPTextEncode", (x, y + 200), (420, 80), "CLIP Text Encode (Positive Prompt)",
                     {"text": ""}, color=GREEN)
    n["neg"] = g.add("CLIPTextEncode", (x, y + 320), (420, 150), "CLIP Text Encode (Negative Prompt)",
                     {"text": NEGATIVE}, color=PURPLE)
    g.connect(n["prompt"], 0, n["pos"], "text")
    g.connect(n["clip"], 0, n["pos"], "clip")
    g.connect(n["clip"], 0, n["neg"], "clip")
    return n


def shared_inputs(g: Graph, x: int = 0, y: int = 0):
    """Loaders (column x), the shared prompt and both text encodings (column x + 370); returns the nodes."""
    n = {}
    n["unet_high"] = g.add("UNETLoader", (x, y), (330, 82), "Load Diffusion Model (high noise)",
                           {"unet_name": UNET_HIGH, "weight_dtype": "default"})
    n["unet_low"] = g.add("UNETLoader", (x, y + 130), (330, 82), "Load Diffusion Model (low noise)",
                          {"unet_name": UNET_LOW, "weight_dtype": "default"})
    n["clip"] = g.add("CLIPLoader", (x, y + 260), (330, 106), None,
                      {"clip_name": TEXT_ENCODER, "type": "wan", "device": "default"})
    n["vae"] = g.add("VAELoader", (x, y + 420), (330, 58), None, {"vae_name": VAE})
    n["latent"] = g.add("EmptyHunyuanLatentVideo", (x, y + 530), (330, 130), None,
                        {"width": WIDTH, "height": HEIGHT, "length": LENGTH, "batch_size": 1})
    return prompt_nodes(g, n, x + 370, y)


def model_sampling(g: Graph, model_high: Node, model_low: Node, x: int, y_high: int, y_low: int):
    ms_high = g.add("ModelSamplingSD3", (x, y_high), (260, 58), "ModelSamplingSD3 (high noise)", {"shift": SHIFT})
    ms_low = g.add("ModelSamplingSD3", (x, y_low), (260, 58), "ModelSamplingSD3 (low noise)", {"shift": SHIFT})
    g.connect(model_high, 0, ms_high, "model")
    g.connect(model_low, 0, ms_low, "model")
    return ms_high, ms_low


def sampler_pair(g: Graph, n: dict, ms_high: Node, ms_low: Node, x: int, y_high: int, y_low: int,
                 suffix: str = "", size=(300, 330), split: int = SPLIT, cond: tuple | None = None,
                 latent: tuple | None = None):
    """The two KSamplerAdvanced split at the pair's boundary (step `split`); returns the final sampler and both
    samplers. `cond` = (node, positive slot, negative slot) and `latent` = (node, slot) default to the text
    encodings and the empty latent (I2V: WanImageToVideo's outputs)."""
    cond = cond or (None, None, None)
    positive = (cond[0], cond[1]) if cond[0] is not None else (n["pos"], 0)
    negative = (cond[0], cond[2]) if cond[0] is not None else (n["neg"], 0)
    latent = latent or (n["latent"], 0)
    ks_high = g.add("KSamplerAdvanced", (x, y_high), size, f"KSampler high noise (steps 0-{split - 1}){suffix}",
                    {"add_noise": "enable", "noise_seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
                     "scheduler": "simple", "start_at_step": 0, "end_at_step": split,
                     "return_with_leftover_noise": "enable"})
    ks_low = g.add("KSamplerAdvanced", (x, y_low), size, f"KSampler low noise (steps {split}-{STEPS - 1}){suffix}",
                   {"add_noise": "disable", "noise_seed": 0, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
                    "scheduler": "simple", "start_at_step": split, "end_at_step": 10000,
                    "return_with_leftover_noise": "disable"})
    for ks, ms in ((ks_high, ms_high), (ks_low, ms_low)):
        g.connect(ms, 0, ks, "model")
        g.connect(positive[0], positive[1], ks, "positive")
        g.connect(negative[0], negative[1], ks, "negative")
    g.connect(latent[0], latent[1], ks_high, "latent_image")
    g.connect(ks_high, 0, ks_low, "latent_image")
    return ks_low, [ks_high, ks_low]


def decode(g: Graph, n: dict, latent: Node, x: int, y: int, title: str | None = None) -> Node:
    dec = g.add("VAEDecode", (x, y), (220, 46), title)
    g.connect(latent, 0, dec, "samples")
    g.connect(n["vae"], 0, dec, "vae")
    return dec


def save_video(g: Graph, images: Node, x: int, y: int, prefix: str, size=(400, 420), fps: int = FPS):
    vid = g.add("CreateVideo", (x, y), (270, 78), None, {"fps": fps})
    save = g.add("SaveVideo", (x, y + 120), size, None, {"filename_prefix": prefix, "format": "mp4", "codec": "h264"})
    g.connect(images, 0, vid, "images")
    g.connect(vid, 0, save, "video")
    return vid, save


def loader(g: Graph, model: Node, routing: Node | None, x: int, y: int, which: str, suffix: str = "",
           adapter_set: str | None = None, lora_moe: str = LORA_MOE) -> Node:
    """Load LoRA-MoE on one DiT; `which` 'high'/'low' for a pair (the set of that name unless `adapter_set`),
    '' for a single DiT."""
    title = f"Load LoRA-MoE ({which} noise){suffix}" if which else f"Load LoRA-MoE{suffix}"
    node = g.add("WanLoRAMoE_LoadLoRAMoE", (x, y), (340, 250), title,
                 {"lora_moe": lora_moe, "adapter_set": adapter_set or f"{which}-noise", "alpha_base": 0.7,
                  "alpha_expert": 1.0, "uncond": "same"})
    g.connect(model, 0, node, "model")
    if routing is not None:
        g.connect(routing, 0, node, "routing")
    return node


def router(g: Graph, n: dict, x: int, y: int) -> Node:
    r = g.add("WanLoRAMoE_PromptRouter", (x, y), (420, 400), None,
              {"prompt": "", "mode": "rule-based", "top_k": 2, "temperature": 1.0, "no_instrument": "Other"})
    g.connect(n["prompt"], 0, r, "prompt")
    return r


def band(g: Graph, model: Node, x: int, y: int, title: str, steps: int = STEPS, shift: float = SHIFT) -> Node:
    b = g.add("WanLoRAMoE_TimestepBand", (x, y), (420, 400), title,
              {"preset": "three-level", "start": 0.2, "mid": 0.6, "mid_factor": 0.5, "end": 1.0,
               "preview_steps": steps, "preview_shift": shift})
    g.connect(model, 0, b, "model")
    return b


def build_a14b(info: dict, override: bool) -> dict:
    """Two rows, high-noise DiT on top and low-noise DiT below: loader -> LoRA-MoE -> band -> shift -> sampler."""
    name = "wan22_a14b_t2v_lora_moe_gate_override" if override else "wan22_a14b_t2v_lora_moe"
    g = Graph(name, info, MODEL_URLS)
    g.note(FILES_NOTE, (-500, 0), (460, 500), "Model files")
    n = shared_inputs(g)
    r = router(g, n, 370, 510)
    routing = r
    if override:
        o = g.add("WanLoRAMoE_GateOverride", (370, 960), (420, 300), None,
                  {"instrument": "Suction", "scissors": 1.0, "hook_electrocautery": 1.0, "suction": 1.0, "other": 1.0})
        g.connect(r, 0, o, "routing")
        routing = o
        g.note(OVERRIDE_NOTE, (-500, 540), (460, 280), "Gate Override")
    else:
        g.note(ROUTING_NOTE, (-500, 540), (460, 360), "Routing")
    y_high, y_low = 0, 460
    lo_high = loader(g, n["unet_high"], routing, 830, y_high, "high")
    lo_low = loader(g, n["unet_low"], routing, 830, y_low, "low")
    b_high = band(g, lo_high, 1210, y_high, "Timestep Band (high noise)")
    b_low = band(g, lo_low, 1210, y_low, "Timestep Band (low noise)")
    ms_high, ms_low = model_sampling(g, b_high, b_low, 1670, y_high, y_low)
    latent, samplers = sampler_pair(g, n, ms_high, ms_low, 1970, y_high, y_low)
    dec = decode(g, n, latent, 2310, y_high)
    save_video(g, dec, 2310, y_high + 90, "video/wan_lora_moe_override" if override else "video/wan_lora_moe")
    g.group("LoRA-MoE on both DiTs", [lo_high, lo_low, b_high, b_low])
    return g.to_json()


def build_sheet(info: dict) -> dict:
    """Six columns pairs (one per variant) in two bands of three, stitched 3 x 2 into one video."""
    g = Graph("wan22_a14b_lora_moe_comparison_sheet", info, MODEL_URLS)
    g.note(FILES_NOTE, (-500, 0), (460, 500), "Model files")
    g.note(SHEET_NOTE, (-500, 540), (460, 330), "Comparison sheet")
    n = shared_inputs(g)
    r = router(g, n, 370, 510)
    variants: list[tuple[str, Node | None]] = [("experts off", None), ("auto", r)]
    for k, instrument in enumerate(("Scissors", "Hook/Electrocautery", "Suction", "Other")):
        o = g.add("WanLoRAMoE_GateOverride", (0, 720 + k * 290), (330, 250), f"Gate Override: {instrument}",
                  {"instrument": instrument})
        variants.append((instrument, o))
    # ModelSamplingSD3 before the loaders: one pair shared by all variants (the order of the two patches
    # does not matter).
    ms_high, ms_low = model_sampling(g, n["unet_high"], n["unet_low"], 370, 960, 1060)
    decodes = []
    for k, (label, routing) in enumerate(variants):
        x = 850 + (k % 3) * 720
        y = (k // 3) * 980
        lo_high = loader(g, ms_high, routing, x, y, "high", f" [{label}]")
        lo_low = loader(g, ms_low, routing, x, y + 290, "low", f" [{label}]")
        latent, samplers = sampler_pair(g, n, lo_high, lo_low, x + 370, y, y + 290, f" [{label}]", size=(300, 270))
        dec = decode(g, n, latent, x + 370, y + 600, f"VAE Decode [{label}]")
        decodes.append(dec)
        g.group(f"{k + 1}. {label}", [lo_high, lo_low, *samplers, dec])
    # 3 x 2 tiling: row 1 = off | auto | Scissors, row 2 = Hook | Suction | Other.
    x0 = 850 + 3 * 720
    stitches = []

    def stitch(a: Node, b: Node, direction: str, y: int) -> Node:
        s = g.add("ImageStitch", (x0 + 290 * (len(stitches) % 2), y), (270, 150), None,
                  {"direction": direction, "match_image_size": True, "spacing_width": 0, "spacing_color": "white"})
        g.connect(a, 0, s, "image1")
        g.connect(b, 0, s, "image2")
        stitches.append(s)
        return s

    row1 = stitch(stitch(decodes[0], decodes[1], "right", 0), decodes[2], "right", 0)
    row2 = stitch(stitch(decodes[3], decodes[4], "right", 200), decodes[5], "right", 200)
    sheet = stitch(row1, row2, "down", 400)
    save_video(g, sheet, x0, 620, "video/wan_lora_moe_sheet", size=(560, 480))
    return g.to_json()


def image_inputs(g: Graph, unets: list[tuple[str, str]], vae: str, x: int = 0, y: int = 0) -> dict:
    """Image-to-video inputs: DiT loaders, text encoder, VAE and the start frame (column x), the shared prompt
    and both text encodings (column x + 370); returns the nodes (``unet_<key>`` per entry of `unets`)."""
    n = {}
    for k, (key, name) in enumerate(unets):
        title = f"Load Diffusion Model ({key} noise)" if key in ("high", "low") else "Load Diffusion Model"
        n[f"unet_{key}"] = g.add("UNETLoader", (x, y + 130 * k), (330, 82), title,
                                 {"unet_name": name, "weight_dtype": "default"})
    y1 = y + 130 * len(unets)
    n["clip"] = g.add("CLIPLoader", (x, y1), (330, 106), None,
                      {"clip_name": TEXT_ENCODER, "type": "wan", "device": "default"})
    n["vae"] = g.add("VAELoader", (x, y1 + 160), (330, 58), None, {"vae_name": vae})
    n["image"] = g.add("LoadImage", (x, y1 + 270), (330, 330), "Start frame (copy it to ComfyUI/input/)",
                       {"image": START_FRAME})
    return prompt_nodes(g, n, x + 370, y)


def build_i2v(info: dict) -> dict:
    """WAN 2.2 I2V A14B: as the T2V A14B workflow, with WanImageToVideo (start frame -> both conditionings and
    the latent) in place of the empty latent, 'auto' adapter sets, the split at t = 0.9."""
    g = Graph("wan22_i2v_a14b_lora_moe", info, MODEL_URLS)
    g.note(I2V_FILES_NOTE, (-500, 0), (460, 560), "Model files")
    g.note(I2V_ROUTING_NOTE, (-500, 600), (460, 330), "Start frame and routing")
    n = image_inputs(g, [("high", UNET_I2V_HIGH), ("low", UNET_I2V_LOW)], VAE)
    r = router(g, n, 370, 510)
    g.connect(n["image"], 0, r, "image")  # used when route_from is image or prompt+image
    cond = g.add("WanImageToVideo", (370, 960), (420, 210), None,
                 {"width": I2V_WIDTH, "height": I2V_HEIGHT, "length": LENGTH, "batch_size": 1})
    g.connect(n["pos"], 0, cond, "positive")
    g.connect(n["neg"], 0, cond, "negative")
    g.connect(n["vae"], 0, cond, "vae")
    g.connect(n["image"], 0, cond, "start_image")
    y_high, y_low = 0, 460
    lo_high = loader(g, n["unet_high"], r, 830, y_high, "high", adapter_set="auto", lora_moe=LORA_MOE_I2V)
    lo_low = loader(g, n["unet_low"], r, 830, y_low, "low", adapter_set="auto", lora_moe=LORA_MOE_I2V)
    b_high = band(g, lo_high, 1210, y_high, "Timestep Band (high noise)")
    b_low = band(g, lo_low, 1210, y_low, "Timestep Band (low noise)")
    ms_high, ms_low = model_sampling(g, b_high, b_low, 1670, y_high, y_low)
    ks_low, _ = sampler_pair(g, n, ms_high, ms_low, 1970, y_high, y_low, split=I2V_SPLIT,
                             cond=(cond, "positive", "negative"), latent=(cond, "latent"))
    dec = decode(g, n, ks_low, 2310, y_high)
    save_video(g, dec, 2310, y_high + 90, "video/wan_lora_moe_i2v")
    g.group("LoRA-MoE on both DiTs", [lo_high, lo_low, b_high, b_low])
    return g.to_json()


def build_ti2v(info: dict) -> dict:
    """WAN 2.2 TI2V 5B: one DiT, Wan22ImageToVideoLatent (start frame in latent frame 0 + noise mask), one
    KSampler, the WAN 2.2 VAE, 24 fps."""
    g = Graph("wan22_ti2v_5b_lora_moe", info, MODEL_URLS)
    g.note(TI2V_FILES_NOTE, (-500, 0), (460, 560), "Model files")
    g.note(TI2V_ROUTING_NOTE, (-500, 600), (460, 330), "Start frame and routing")
    n = image_inputs(g, [("5b", UNET_TI2V)], VAE_22)
    r = router(g, n, 370, 510)
    g.connect(n["image"], 0, r, "image")  # used when route_from is image or prompt+image
    latent = g.add("Wan22ImageToVideoLatent", (370, 960), (420, 170), None,
                   {"width": TI2V_WIDTH, "height": TI2V_HEIGHT, "length": TI2V_LENGTH, "batch_size": 1})
    g.connect(n["vae"], 0, latent, "vae")
    g.connect(n["image"], 0, latent, "start_image")
    lo = loader(g, n["unet_5b"], r, 830, 0, "", adapter_set="auto", lora_moe=LORA_MOE_TI2V)
    b = band(g, lo, 1210, 0, "Timestep Band", steps=TI2V_STEPS, shift=TI2V_SHIFT)
    ms = g.add("ModelSamplingSD3", (1670, 0), (260, 58), None, {"shift": TI2V_SHIFT})
    g.connect(b, 0, ms, "model")
    ks = g.add("KSampler", (1970, 0), (300, 330), None,
               {"seed": SEED, "steps": TI2V_STEPS, "cfg": TI2V_CFG, "sampler_name": TI2V_SAMPLER,
                "scheduler": "simple", "denoise": 1.0})
    g.connect(ms, 0, ks, "model")
    g.connect(n["pos"], 0, ks, "positive")
    g.connect(n["neg"], 0, ks, "negative")
    g.connect(latent, 0, ks, "latent_image")
    dec = decode(g, n, ks, 2310, 0)
    save_video(g, dec, 2310, 90, "video/wan_lora_moe_ti2v", fps=TI2V_FPS)
    g.group("LoRA-MoE on the 5B DiT", [lo, b])
    return g.to_json()


def write_start_frame(path: Path, force: bool = False) -> bool:
    """Render the shipped start frame (one frame of a synthetic hook clip at the TI2V size; the I2V workflow
    scales it to its own size) unless it exists; True if written."""
    if path.exists() and not force:
        return False
    from PIL import Image

    from training.data.synthetic import render_clip

    clip = render_clip(START_FRAME_LABEL, seed=START_FRAME_SEED, width=TI2V_WIDTH, height=TI2V_HEIGHT, fps=16.0,
                       seconds=0.5)
    Image.fromarray(clip.frames[len(clip.frames) // 2]).save(path, optimize=True)
    return True


WORKFLOWS = {
    "wan22_a14b_t2v_lora_moe": lambda info: build_a14b(info, override=False),
    "wan22_a14b_t2v_lora_moe_gate_override": lambda info: build_a14b(info, override=True),
    "wan22_a14b_lora_moe_comparison_sheet": build_sheet,
    "wan22_i2v_a14b_lora_moe": build_i2v,
    "wan22_ti2v_5b_lora_moe": build_ti2v,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--object-info", help="URL or JSON file of /object_info (default: in-process ComfyUI)")
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--start-frame", action="store_true",
                    help=f"render {START_FRAME} again even if it exists (it is rendered when missing)")
    args = ap.parse_args()
    info = object_info_from(args.object_info) if args.object_info else object_info_inprocess()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = out / START_FRAME
    if write_start_frame(frame, force=args.start_frame):
        print(f"wrote {frame.relative_to(REPO) if frame.is_relative_to(REPO) else frame}")
    for name, build in WORKFLOWS.items():
        path = out / f"{name}.json"
        path.write_text(json.dumps(build(info), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
