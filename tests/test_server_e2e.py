"""End to end on a real ComfyUI server (``main.py --cpu``, loopback, temporary base directory with this pack in
custom_nodes/): node definitions, served workflows and web files, every bundled workflow run on tiny random
models to an mp4, bad inputs answered as node errors, the pack's HTTP routes, and no model left patched.

The image-to-video workflows run on tiny DiTs of their family; the TI2V one decodes with a random WAN 2.2 VAE
(``wan_fixtures.wan22_vae_file``, ~5.5 GB resident in the server while it runs, freed after): on a machine
shared with other test runs, hold ``flock /tmp/wan22_vae.lock`` around pytest.

The server is shared with test_browser.py (``server_harness.shared_server``). The bundled workflows are
converted from UI to API format with moe_core/workflow_api.py (checked against the front end's own conversion
in test_browser.py); ``server_harness.api_prompt`` lists every test-only override (tiny sizes, steps and
model files, the fixture text encoder).
"""
from __future__ import annotations

import copy
import json
import time
import urllib.parse

from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

import server_harness as H
from moe_core import workflow_api as ui_to_api

PACK = H.PACK_DIR
NODES = {
    "WanLoRAMoE_LoadLoRAMoE": ("Load LoRA-MoE", ["model", "lora_moe", "adapter_set", "alpha_base", "alpha_expert"],
                               ["routing", "uncond"]),
    "WanLoRAMoE_PromptRouter": ("Prompt→Instrument Router", ["prompt", "mode", "top_k", "temperature"],
                                ["no_instrument", "image", "route_from", "classifier", "classifier_sha256"]),
    "WanLoRAMoE_GateOverride": ("Gate Override", ["instrument", "scissors", "hook_electrocautery", "suction", "other"],
                                ["routing"]),
    "WanLoRAMoE_TimestepBand": ("Timestep Band", ["model", "preset", "start", "mid", "mid_factor", "end",
                                                  "preview_steps", "preview_shift"], []),
}
A14B, OVERRIDE, SHEET = ("wan22_a14b_t2v_lora_moe", "wan22_a14b_t2v_lora_moe_gate_override",
                         "wan22_a14b_lora_moe_comparison_sheet")
I2V, TI2V = "wan22_i2v_a14b_lora_moe", "wan22_ti2v_5b_lora_moe"
#: ComfyUI's own templates (package comfyui-workflow-templates) each image-to-video workflow follows.
CORE_TEMPLATES = {I2V: "video_wan2_2_14B_i2v", TI2V: "video_wan2_2_5B_ti2v"}
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def server():
    s = H.shared_server()
    TIMINGS["server_startup_s"] = s.startup_s or 0.0
    yield s
    H.ARTIFACTS.mkdir(exist_ok=True)
    (H.ARTIFACTS / "server_timings.json").write_text(json.dumps(TIMINGS, indent=1))
    H.release_shared_server()


def read_mp4(path) -> tuple[dict, np.ndarray]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])
    return meta, frames


def run_workflow(server, name: str, tweak=None) -> tuple[dict, dict, list[str]]:
    prompt, changes = H.api_prompt(H.load_workflow(name), server.object_info(), name)
    if tweak:
        tweak(prompt)
    t0 = time.monotonic()
    entry = server.run(prompt)
    TIMINGS[f"run_{name}_s"] = round(time.monotonic() - t0, 2)
    return entry, prompt, changes


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    return next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")


# ------------------------------------------------------------------------------------- what ComfyUI sees

def test_object_info_lists_the_four_nodes(server):
    info = server.object_info()
    for node_id, (display, required, optional) in NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        d = info[node_id]
        assert d["display_name"] == display and d["category"] == "WAN LoRA-MoE"
        assert d["input_order"]["required"] == required
        assert d["input_order"].get("optional", []) == optional
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert d["python_module"] == f"custom_nodes.{PACK}"
    options = info["WanLoRAMoE_LoadLoRAMoE"]["input"]["required"]["lora_moe"][1]["options"]
    assert [o for o in options if "/" not in o] == sorted([  # (test_server_load.py adds files in a subfolder)
        H.BROKEN_HEADER, H.NAN_WEIGHTS, H.TINY_MOE, H.TINY_SINGLE, H.TRUNCATED, H.TINY_MOE_I2V, H.TINY_MOE_TI2V])
    assert info["WanLoRAMoE_LoadLoRAMoE"]["input"]["optional"]["routing"][0] == "LORA_MOE_ROUTING"
    assert info["WanLoRAMoE_PromptRouter"]["output"] == ["LORA_MOE_ROUTING", "STRING"]


def test_workflows_and_web_files_are_served(server):
    status, listing = server.get("/workflow_templates")
    assert status == 200 and sorted(listing[PACK]) == H.workflow_names() == sorted([A14B, OVERRIDE, SHEET, I2V, TI2V])
    for name in H.workflow_names():
        status, served = server.get(f"/api/workflow_templates/{urllib.parse.quote(PACK)}/{name}.json")
        assert status == 200 and served == H.load_workflow(name)
    # The start frame the image-to-video workflows load: shipped beside them, found by LoadImage in input/.
    status, _ = server.get(f"/api/workflow_templates/{urllib.parse.quote(PACK)}/{H.START_FRAME}")
    assert status == 200
    assert H.START_FRAME in server.object_info()["LoadImage"]["input"]["required"]["image"][0]
    status, extensions = server.get("/extensions")
    assert f"/extensions/{PACK}/wan_lora_moe.js" in extensions and f"/extensions/{PACK}/schedule.js" in extensions
    status, _ = server.get(f"/extensions/{PACK}/wan_lora_moe.js")
    assert status == 200
    status, _ = server.get(f"/extensions/{PACK}/../__init__.py")
    assert status in (403, 404)


# ------------------------------------------------------------------------------------ bundled workflows

def test_a14b_workflow_renders_an_mp4(server):
    entry, prompt, changes = run_workflow(server, A14B)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert any("CLIPTextEncode -> WLMTestTextEncode" in c for c in changes)
    files = H.output_files(entry, server.base)
    assert len(files) == 1 and files[0].suffix == ".mp4" and files[0].is_file()
    meta, frames = read_mp4(files[0])
    assert meta["size"] == (H.TEST_WIDTH, H.TEST_HEIGHT) and meta["fps"] == 16.0
    assert frames.shape == (H.TEST_LENGTH, H.TEST_HEIGHT, H.TEST_WIDTH, 3) and frames.std() > 1.0
    router = entry["outputs"][nodes_of(prompt, "WanLoRAMoE_PromptRouter")[0]]["wlm_routing"][0]
    assert router["detected"] == ["Hook/Electrocautery", "Suction"]
    for nid in nodes_of(prompt, "WanLoRAMoE_LoadLoRAMoE"):
        text = entry["outputs"][nid]["text"][0]
        assert H.TINY_MOE in text and "Hook/Electrocautery 0.50" in text
    bands = [entry["outputs"][nid] for nid in nodes_of(prompt, "WanLoRAMoE_TimestepBand")]
    assert {b["wlm_schedule"][0]["set"] for b in bands} == {"high_noise", "low_noise"}
    for b in bands:
        picture = b["wlm_schedule_image"][0]
        assert (server.base / "temp" / picture["filename"]).is_file()
        status, _ = server.get(f"/view?filename={picture['filename']}&type=temp")
        assert status == 200


def test_gate_override_workflow_renders_an_mp4(server):
    entry, prompt, _ = run_workflow(server, OVERRIDE)
    assert entry["status"]["status_str"] == "success", entry["status"]
    override = entry["outputs"][nodes_of(prompt, "WanLoRAMoE_GateOverride")[0]]["wlm_routing"][0]
    assert override["gates"] == {"Scissors": 0.0, "Hook/Electrocautery": 0.0, "Suction": 1.0, "Other": 0.0}
    meta, frames = read_mp4(H.output_files(entry, server.base)[0])
    assert meta["size"] == (H.TEST_WIDTH, H.TEST_HEIGHT) and frames.shape[0] == H.TEST_LENGTH


def test_comparison_sheet_renders_six_different_tiles(server):
    entry, prompt, _ = run_workflow(server, SHEET)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(nodes_of(prompt, "WanLoRAMoE_LoadLoRAMoE")) == 12
    meta, frames = read_mp4(H.output_files(entry, server.base)[0])
    w, h = H.test_size(SHEET)
    assert meta["size"] == (3 * w, 2 * h) and meta["fps"] == 16.0 and frames.shape[0] == H.TEST_LENGTH
    tiles = [frames[:, r * h:(r + 1) * h, c * w:(c + 1) * w].astype(float) for r in range(2) for c in range(3)]
    for i in range(6):
        for j in range(i + 1, 6):
            assert np.abs(tiles[i] - tiles[j]).mean() > 0.5, f"tiles {i} and {j} are the same render"


# ---------------------------------------------------------------------- image-to-video (I2V A14B, TI2V 5B)

def _core_template(name: str) -> dict:
    from comfyui_workflow_templates import get_templates_path

    return json.loads((Path(get_templates_path()) / f"{name}.json").read_text(encoding="utf-8"))


def _values(workflow: dict, node_type: str) -> list[list]:
    return [n["widgets_values"] for n in workflow["nodes"] if n["type"] == node_type]


def test_image_to_video_workflows_follow_comfyuis_templates():
    """Model files (and their download URLs), sampling and clip format as in ComfyUI's own templates for these
    models (package comfyui-workflow-templates); only the I2V size differs (832x480, WAN's 480p, for the
    template's low-memory 640x640)."""
    for name, core_name in CORE_TEMPLATES.items():
        ours, core = H.load_workflow(name), _core_template(core_name)
        for kind in ("UNETLoader", "VAELoader", "CLIPLoader", "CreateVideo", "ModelSamplingSD3"):
            for v in _values(ours, kind):
                assert v in _values(core, kind), f"{name}: {kind} {v} not among the template's {_values(core, kind)}"

        def models(wf):
            return {(m["name"], m["url"], m["directory"]) for n in wf["nodes"]
                    for m in n.get("properties", {}).get("models", [])}
        assert models(ours) <= models(core), f"{name}: {models(ours) - models(core)}"
        assert len({m[0] for m in models(ours)}) == (4 if name == I2V else 3)  # DiT(s), text encoder, VAE
    i2v, core = H.load_workflow(I2V), _core_template(CORE_TEMPLATES[I2V])
    full = [v for v in _values(core, "KSamplerAdvanced") if v[3] == 20]  # the template's 20-step pair
    assert [v[3:] for v in _values(i2v, "KSamplerAdvanced")] == [v[3:] for v in sorted(full, key=lambda v: v[7])]
    assert [v[2:] for v in _values(i2v, "WanImageToVideo")] == [v[2:] for v in _values(core, "WanImageToVideo")][:1]
    ti2v, core = H.load_workflow(TI2V), _core_template(CORE_TEMPLATES[TI2V])
    assert [v[2:] for v in _values(ti2v, "KSampler")] == [v[2:] for v in _values(core, "KSampler")]
    assert _values(ti2v, "Wan22ImageToVideoLatent") == _values(core, "Wan22ImageToVideoLatent")
    for wf in (i2v, ti2v):
        assert _values(wf, "LoadImage") == [[H.START_FRAME, "image"]]


def test_a14b_splits_sit_where_t_crosses_the_pairs_boundary(server):
    """Every bundled A14B pair hands over from the high- to the low-noise DiT at the first step whose noise
    level is below its family's boundary (T2V 0.875, I2V 0.9), by ComfyUI's own sigmas for the workflow's
    shift, scheduler and steps."""
    import comfy.model_sampling
    import comfy.samplers

    from moe_core.families import FAMILIES

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass  # what ModelSamplingSD3 installs

    for name, family in ((A14B, "t2v"), (OVERRIDE, "t2v"), (SHEET, "t2v"), (I2V, "i2v")):
        prompt = ui_to_api.convert(H.load_workflow(name), server.object_info())
        (shift,) = {n["inputs"]["shift"] for n in prompt.values() if n["class_type"] == "ModelSamplingSD3"}
        for nid in nodes_of(prompt, "KSamplerAdvanced"):
            ks = prompt[nid]["inputs"]
            if ks["add_noise"] != "enable":
                continue
            sampling = FlowSampling(None)
            sampling.set_parameters(shift=shift, multiplier=1000)
            sigmas = comfy.samplers.calculate_sigmas(sampling, ks["scheduler"], ks["steps"])
            above = int((sigmas[:-1] >= FAMILIES[family].boundary).sum())
            assert ks["end_at_step"] == above, (f"{name}: the high-noise sampler ends at step {ks['end_at_step']}, "
                                                f"but {above} steps start at t >= {FAMILIES[family].boundary}")
            low = [prompt[k]["inputs"] for k in nodes_of(prompt, "KSamplerAdvanced")
                   if prompt[k]["inputs"]["latent_image"] == [nid, 0]]
            assert [lo["start_at_step"] for lo in low] == [above]


def _refusal(server, prompt: dict) -> tuple[set[str], str]:
    """(nodes, messages) of a prompt refused at validation (HTTP 400) or failing when run."""
    status, body = server.post_prompt(prompt)
    if status == 400:
        errors = body.get("node_errors", {})
        return set(errors), " ".join(e["details"] for v in errors.values() for e in v["errors"])
    assert status == 200, body
    err = error_of(server.wait(body["prompt_id"]))
    return {err["node_id"]}, err["exception_message"]


def test_i2v_workflow_renders_an_mp4_from_the_start_frame(server):
    entry, prompt, changes = run_workflow(server, I2V)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (image,) = nodes_of(prompt, "LoadImage")
    (cond,) = nodes_of(prompt, "WanImageToVideo")
    assert prompt[image]["inputs"]["image"] == H.START_FRAME and prompt[cond]["inputs"]["start_image"] == [image, 0]
    for nid in nodes_of(prompt, "KSamplerAdvanced"):  # both DiTs get the image-carrying conditionings
        assert prompt[nid]["inputs"]["positive"] == [cond, 0] and prompt[nid]["inputs"]["negative"] == [cond, 1]
    meta, frames = read_mp4(H.output_files(entry, server.base)[0])
    assert meta["size"] == (H.TEST_WIDTH, H.TEST_HEIGHT) and meta["fps"] == 16.0
    assert frames.shape == (H.TEST_LENGTH, H.TEST_HEIGHT, H.TEST_WIDTH, 3) and frames.std() > 1.0
    router = entry["outputs"][nodes_of(prompt, "WanLoRAMoE_PromptRouter")[0]]["wlm_routing"][0]
    assert router["detected"] == ["Hook/Electrocautery", "Suction"]
    for nid in nodes_of(prompt, "WanLoRAMoE_LoadLoRAMoE"):  # 'auto' finds each DiT's set
        unet = prompt[prompt[nid]["inputs"]["model"][0]]["inputs"]["unet_name"]
        text = entry["outputs"][nid]["text"][0]
        want = "[high-noise]" if unet == H.TINY_I2V_HIGH else "[low-noise]"
        assert text.startswith(f"{H.TINY_MOE_I2V} {want}") and "Hook/Electrocautery 0.50" in text, text
    bands = [entry["outputs"][nid]["wlm_schedule"][0] for nid in nodes_of(prompt, "WanLoRAMoE_TimestepBand")]
    assert sorted((b["set"], b["boundary"]) for b in bands) == [("high_noise", 0.9), ("low_noise", 0.9)]
    # A file made for another family is refused on these DiTs, naming both.
    nodes, message = _refusal(server, _set(_set(prompt, "WanLoRAMoE_LoadLoRAMoE", lora_moe=H.TINY_MOE_TI2V),
                                           "SaveVideo", filename_prefix="video/refused"))
    assert nodes <= set(nodes_of(prompt, "WanLoRAMoE_LoadLoRAMoE")) and nodes, nodes
    assert "TI2V 5B" in message and "I2V A14B" in message and str(server.base) not in message, message


def test_ti2v_workflow_keeps_the_start_frame_and_its_experts_act(server):
    """TI2V 5B on the random WAN 2.2 VAE (hold /tmp/wan22_vae.lock on a shared machine: ~5.5 GB): an mp4 at
    24 fps; latent frame 0 (the start frame, masked by Wan22ImageToVideoLatent) comes out as ComfyUI's node
    encoded it while the generated frames change; and the experts act on the generated frames (their gates
    follow the sampler's noise level, not the start frame's t = 0): the same graph with the experts off (base
    LoRA only) gives other generated frames."""
    H.link_wan22_vae(server.base)
    base = _base_prompt(server, TI2V)
    (latent_node,) = nodes_of(base, "Wan22ImageToVideoLatent")
    (image,) = nodes_of(base, "LoadImage")
    assert base[latent_node]["inputs"]["start_image"] == [image, 0] and base[image]["inputs"]["image"] == H.START_FRAME
    prompt = _with_saved_latent(base, "latents/ti2v")
    prompt["wlm_save_start"] = {"class_type": "SaveLatent",
                                "inputs": {"samples": [latent_node, 0], "filename_prefix": "latents/ti2v_start"}}
    try:
        t0 = time.monotonic()
        entry = server.run(prompt)
        TIMINGS[f"run_{TI2V}_s"] = round(time.monotonic() - t0, 2)
        assert entry["status"]["status_str"] == "success", entry["status"]
        video = [f for f in H.output_files(entry, server.base) if f.suffix == ".mp4"]
        meta, frames = read_mp4(video[0])
        assert meta["size"] == (H.TEST_WIDTH, H.TEST_HEIGHT) and meta["fps"] == 24.0
        assert frames.shape == (H.TEST_LENGTH, H.TEST_HEIGHT, H.TEST_WIDTH, 3) and frames.std() > 1.0
        (loader,) = nodes_of(base, "WanLoRAMoE_LoadLoRAMoE")
        text = entry["outputs"][loader]["text"][0]
        assert text.startswith(f"{H.TINY_MOE_TI2V} [single-DiT]") and "Hook/Electrocautery 0.50" in text, text
        (band,) = nodes_of(base, "WanLoRAMoE_TimestepBand")
        assert entry["outputs"][band]["wlm_schedule"][0]["boundary"] is None  # one DiT: no pair boundary
        sampled = _saved_latent(entry, server)
        start = _saved_latent({"outputs": {"wlm_save_latent": entry["outputs"]["wlm_save_start"]}}, server)
        assert sampled.shape == start.shape == (1, 48, 2, H.TEST_HEIGHT // 16, H.TEST_WIDTH // 16)
        # uni_pc's multistep update is not exactly the masked prediction, so frame 0 keeps a small residual
        # (measured: 0.3% of the start latent's mean magnitude) while the generated frames move by more than it.
        scale = float(start[:, :, 0].abs().mean())
        kept = float((sampled[:, :, 0] - start[:, :, 0]).abs().mean())
        changed = float((sampled[:, :, 1:] - start[:, :, 1:]).abs().mean())
        assert kept < 0.01 * scale and changed > max(100 * kept, scale), (kept, changed, scale)
        # Experts off: no routing into the loader; sampling only (no decode), a new SaveLatent prefix.
        off = _with_saved_latent(base, "latents/ti2v_experts_off")
        del off[loader]["inputs"]["routing"]
        for kind in ("VAEDecode", "CreateVideo", "SaveVideo"):
            for nid in nodes_of(off, kind):
                del off[nid]
        entry_off = server.run(off)
        assert entry_off["status"]["status_str"] == "success", entry_off["status"]
        sampled_off = _saved_latent(entry_off, server)
        assert float((sampled_off[:, :, 0] - start[:, :, 0]).abs().mean()) < 0.01 * scale
        effect = float((sampled_off[:, :, 1:] - sampled[:, :, 1:]).abs().mean())
        TIMINGS["ti2v_expert_effect_on_latent_mean_abs"] = round(effect, 5)
        assert effect > 1e-3, f"the experts should change the generated frames (mean |diff| {effect:.2e})"
    finally:  # give the WAN 2.2 VAE's memory back before the next tests
        server.request("POST", "/free", {"unload_models": True, "free_memory": True})


# ------------------------------------------------------------------------------------------ bad inputs

def _base_prompt(server, name=A14B):
    return H.api_prompt(H.load_workflow(name), server.object_info(), name)[0]


def _set(prompt: dict, class_type: str, **inputs) -> dict:
    p = copy.deepcopy(prompt)
    for nid in nodes_of(p, class_type):
        p[nid]["inputs"].update(inputs)
    return p


def test_bad_inputs_come_back_as_node_errors(server):
    """What the browser receives for a prompt it cannot run: HTTP 400 whose node_errors hold each problem
    once, on the input it concerns, in the widgets' words, and no server path."""
    base = _base_prompt(server)
    load_ids = set(nodes_of(base, "WanLoRAMoE_LoadLoRAMoE"))
    band_ids = set(nodes_of(base, "WanLoRAMoE_TimestepBand"))
    router_ids = set(nodes_of(base, "WanLoRAMoE_PromptRouter"))
    load = "WanLoRAMoE_LoadLoRAMoE"
    refused = {  # case: (prompt, nodes, input the error is on, message)
        "path traversal": (_set(base, load, lora_moe="../../../etc/passwd"), load_ids, "lora_moe",
                           "not in ComfyUI's 'lora_moe' or 'loras' model folders"),
        "absolute path": (_set(base, load, lora_moe="/etc/passwd"), load_ids, "lora_moe", "not in ComfyUI's"),
        "broken header": (_set(base, load, lora_moe=H.BROKEN_HEADER), load_ids, "lora_moe",
                          f"{H.BROKEN_HEADER}: not a readable safetensors file"),
        "alpha out of range": (_set(base, load, alpha_base=-1.0), load_ids, "alpha_base", "smaller than min"),
        "band start > mid": (_set(base, "WanLoRAMoE_TimestepBand", start=0.7, mid=0.5), band_ids, "mid",
                             "need 0 <= start <= mid <= end <= 1, got start=0.7, mid=0.5, end=1.0"),
        "band end > 1": (_set(base, "WanLoRAMoE_TimestepBand", end=1.5), band_ids, "end", "bigger than max of 1.0"),
        "truncated file": (_set(base, load, lora_moe=H.TRUNCATED), load_ids, "lora_moe",
                           "truncated.safetensors: not a readable safetensors file"),
        "unknown router mode": (_set(base, "WanLoRAMoE_PromptRouter", mode="psychic"), router_ids, "mode",
                                "mode: 'psychic' is not one of"),
        "set missing from file": (_set(base, load, lora_moe=H.TINY_SINGLE), load_ids, "lora_moe",
                                  f"{H.TINY_SINGLE} has no "),  # high-noise on one node, low-noise on the other
        "no learned router": (_set(_set(base, load, lora_moe=H.TINY_SINGLE, adapter_set="auto"),
                                   "WanLoRAMoE_PromptRouter", mode="learned-from-file"), load_ids, "lora_moe",
                              f"the Router's mode is learned-from-file, but {H.TINY_SINGLE} holds no learned "
                              "router: set the Router's mode to rule-based"),
    }
    over = _base_prompt(server, OVERRIDE)
    over_ids = set(nodes_of(over, "WanLoRAMoE_GateOverride"))
    refused["all-zero gates"] = (_set(over, "WanLoRAMoE_GateOverride", instrument="by weights", scissors=0.0,
                                      hook_electrocautery=0.0, suction=0.0, other=0.0), over_ids, "instrument",
                                 "instrument is 'by weights' but all four weights are 0")
    refused["negative gate"] = (_set(over, "WanLoRAMoE_GateOverride", instrument="by weights", scissors=-0.5),
                                over_ids, "scissors", "smaller than min of 0.0")
    refused["unknown instrument"] = (_set(over, "WanLoRAMoE_GateOverride", instrument="Stapler"), over_ids,
                                     "instrument", "instrument: 'Stapler'")
    for case, (prompt, node_ids, input_name, message) in refused.items():
        status, body = server.post_prompt(prompt)
        assert status == 400, f"{case}: expected HTTP 400, got {status}: {body}"
        errors = body.get("node_errors", {})
        assert set(errors) == node_ids, f"{case}: node_errors for {sorted(errors)}, expected {sorted(node_ids)}"
        for nid in node_ids:
            found = errors[nid]["errors"]
            assert len(found) == 1, f"{case}: {len(found)} errors on node {nid}: {found}"
            text = f"{found[0]['message']}: {found[0]['details']}"
            assert found[0]["extra_info"]["input_name"] == input_name, f"{case}: on {found[0]['extra_info']}"
            assert message in text, f"{case}: {message!r} not in {text}"
        assert str(server.base) not in json.dumps(body), f"{case}: a server path reached the browser"
    assert server.alive()


def test_failures_while_running_are_node_errors_and_the_server_keeps_serving(server):
    """Errors only running can find: each on its node, naming files as chosen, never by a server path."""
    base = _base_prompt(server)
    load_ids = nodes_of(base, "WanLoRAMoE_LoadLoRAMoE")
    failing = {
        "NaN weights": (_set(base, "WanLoRAMoE_LoadLoRAMoE", lora_moe=H.NAN_WEIGHTS), load_ids,
                        f"{H.NAN_WEIGHTS}: set 'high_noise', module"),
        "empty prompt": (_set(base, "PrimitiveStringMultiline", value="   "),
                         nodes_of(base, "WanLoRAMoE_PromptRouter"), "the prompt is empty"),
        # Values the front end never sends (API prompts): refused when the node runs, naming the input.
        "bad adapter set": (_set(base, "WanLoRAMoE_LoadLoRAMoE", adapter_set="medium-noise"), load_ids,
                            "adapter_set: 'medium-noise' is not one of ['auto', 'high-noise', 'low-noise']"),
        "bad uncond": (_set(base, "WanLoRAMoE_LoadLoRAMoE", uncond="never"), load_ids, "uncond: 'never'"),
        "bad band preset": (_set(base, "WanLoRAMoE_TimestepBand", preset="sometimes"),
                            nodes_of(base, "WanLoRAMoE_TimestepBand"), "preset must be one of"),
    }
    for case, (prompt, node_ids, message) in failing.items():
        entry = server.run(prompt)
        err = error_of(entry)
        assert err["node_id"] in node_ids, f"{case}: error on node {err['node_id']} ({err['node_type']})"
        assert message in err["exception_message"], f"{case}: {err['exception_message']}"
        assert str(server.base) not in err["exception_message"], f"{case}: {err['exception_message']}"
        assert server.alive(), case
    # ... and the next good prompt runs: the file's learned routers this time (the tiny file has them) and a
    # new seed, so that nothing is served from the cache.
    good = _set(_set(base, "KSamplerAdvanced", noise_seed=424242), "WanLoRAMoE_PromptRouter", mode="learned-from-file")
    entry = server.run(good)
    assert entry["status"]["status_str"] == "success", entry["status"]
    for nid in load_ids:
        assert "[learned]" in entry["outputs"][nid]["text"][0]


def _with_saved_latent(prompt: dict, prefix: str) -> dict:
    """The prompt plus a SaveLatent of the final sampler's output (what VAEDecode decodes)."""
    p = copy.deepcopy(prompt)
    decode = nodes_of(p, "VAEDecode")[0]
    p["wlm_save_latent"] = {"class_type": "SaveLatent",
                            "inputs": {"samples": p[decode]["inputs"]["samples"], "filename_prefix": prefix}}
    return p


def _saved_latent(entry: dict, server):
    import safetensors.torch

    item = entry["outputs"]["wlm_save_latent"]["latents"][0]
    path = server.base / "output" / item.get("subfolder", "") / item["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def test_no_model_is_left_patched(server):
    """A plain A14B run (the pack's nodes bypassed) gives the same latent before and after LoRA-MoE runs,
    successful and failed, on the same loaded models: ComfyUI's patch/unpatch cycle removes everything the
    pack installs. Latents, not videos, are compared: ComfyUI's WAN VAE decode of one latent is not always
    bit-identical across runs of one server (measured: the same latent decoded after the comparison sheet
    differed by 1.3/255 on average), while sampling is."""
    import torch

    base = _base_prompt(server)
    plain = copy.deepcopy(base)
    for kind in ("WanLoRAMoE_TimestepBand", "WanLoRAMoE_LoadLoRAMoE"):  # bypass the pack's nodes
        for nid in nodes_of(plain, kind):
            upstream = plain[nid]["inputs"]["model"]
            for node in plain.values():
                for key, value in node["inputs"].items():
                    if value == [nid, 0]:
                        node["inputs"][key] = upstream
            del plain[nid]
    for nid in nodes_of(plain, "WanLoRAMoE_PromptRouter"):
        del plain[nid]
    first = server.run(_with_saved_latent(_set(plain, "SaveVideo", filename_prefix="video/plain_before"),
                                          "latents/plain_before"))
    assert first["status"]["status_str"] == "success", first["status"]
    # A patched run on the same loaded models and seed (alpha_base 0.71 so that it is not served from the
    # cache), then a failing one.
    patched = server.run(_with_saved_latent(_set(_set(base, "WanLoRAMoE_LoadLoRAMoE", alpha_base=0.71),
                                                 "SaveVideo", filename_prefix="video/patched_between"),
                                            "latents/patched_between"))
    assert patched["status"]["status_str"] == "success", patched["status"]
    failed = server.run(_set(base, "WanLoRAMoE_LoadLoRAMoE", lora_moe=H.NAN_WEIGHTS))
    assert failed["status"]["status_str"] == "error", failed["status"]
    # Same plain graph, with one more (idempotent) ModelSamplingSD3 per DiT so that nothing comes from cache.
    again = copy.deepcopy(plain)
    for nid in nodes_of(plain, "ModelSamplingSD3"):
        extra = f"{nid}_again"
        again[extra] = copy.deepcopy(plain[nid])
        again[nid]["inputs"]["model"] = [extra, 0]
    second = server.run(_with_saved_latent(_set(again, "SaveVideo", filename_prefix="video/plain_after"),
                                           "latents/plain_after"))
    assert second["status"]["status_str"] == "success", second["status"]
    a, b, p = (_saved_latent(e, server) for e in (first, second, patched))
    lora_effect = float((a - p).abs().mean())
    assert lora_effect > 1e-3, f"the LoRA-MoE run should change the latent (mean |diff| {lora_effect:.2e})"
    assert torch.equal(a, b), f"plain latent changed after LoRA-MoE runs: max |diff| {float((a - b).abs().max()):.3e}"
    TIMINGS["lora_moe_effect_on_latent_mean_abs"] = round(lora_effect, 5)


# -------------------------------------------------------------------------------------- the pack's routes

def test_routes_validate_their_input(server):
    q = urllib.parse.quote
    status, body = server.get(f"/wan_lora_moe/route?prompt={q('电凝钩切割组织。吸引吸血。')}&top_k=2")
    assert status == 200 and body["detected"] == ["Hook/Electrocautery", "Suction"]
    status, body = server.get(f"/api/wan_lora_moe/route?prompt={q('剪刀')}&top_k=1&temperature=0.5")
    assert status == 200 and body["gates"]["Scissors"] > 0.99
    for bad in ("top_k=abc", "top_k=0", "temperature=-1", "temperature=inf", "no_instrument=..%2F"):
        status, body = server.get(f"/wan_lora_moe/route?prompt=hook&{bad}")
        assert status == 400 and "error" in body, bad
    status, body = server.request("POST", "/wan_lora_moe/route", {"prompt": "电凝钩" * 2000, "top_k": 2})
    assert status == 200 and body["detected"] == ["Hook/Electrocautery"], "long prompts go by POST"
    for bad in ({"prompt": "x" * 25000}, {"prompt": ["hook"]}, ["hook"], {"prompt": "hook", "top_k": "2; rm"}):
        status, body = server.request("POST", "/wan_lora_moe/route", bad)
        assert status == 400 and "error" in body, str(bad)[:60]
    status, files = server.get("/wan_lora_moe/files")
    assert status == 200 and H.TINY_MOE in files and all("/" not in f and "\\" not in f for f in files)
    status, info = server.get(f"/wan_lora_moe/file_info?name={H.TINY_MOE}")
    assert status == 200 and set(info["sets"]) == {"high_noise", "low_noise"} and info["expert_names"][0] == "Scissors"
    assert "path" not in json.dumps(info).lower()
    for evil in ("../../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/etc/passwd",
                 f"..%2Fvae%2F{H.TINY_VAE}", f"../custom_nodes/{PACK}/__init__.py"):
        status, body = server.get(f"/wan_lora_moe/file_info?name={evil}")
        assert status == 404 and "unknown" in body["error"], evil
    status, body = server.get("/wan_lora_moe/file_info?name=a%00b")
    assert status == 400
    status, body = server.get("/wan_lora_moe/file_info")
    assert status == 400
    status, body = server.get(f"/wan_lora_moe/file_info?name={H.BROKEN_HEADER}")
    assert status == 422 and "/" not in body["error"]
