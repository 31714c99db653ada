"""A real ComfyUI server for the end-to-end and browser tests, on tiny random models.

``ComfyServer.start()`` builds a temporary ComfyUI base directory::

    <tmp>/custom_nodes/ComfyUI-WanLoRAMoE -> this repo (symlink)
    <tmp>/custom_nodes/wlm_test_text_encode/__init__.py   fixture node standing in for the text encoder
    <tmp>/models/diffusion_models/tiny_wan_{high,low}_noise.safetensors   tiny WAN DiTs (seeds 0 and 1)
    <tmp>/models/lora_moe/tiny_a14b.safetensors           high_noise + low_noise sets, fingerprints, routers
    <tmp>/models/lora_moe/{tiny_single,broken_header,truncated}.safetensors   for the error tests
    <tmp>/models/vae/wan21_vae_random.safetensors         the real WAN 2.1 VAE architecture, random weights
    <tmp>/models/diffusion_models/tiny_wan_i2v_{high,low}_noise.safetensors, tiny_wan_ti2v_5b.safetensors
                                                          tiny I2V A14B-layout pair (36 input channels) and TI2V
                                                          5B-layout DiT (48 channels), ``wan_fixtures``
    <tmp>/models/lora_moe/tiny_{i2v_a14b,ti2v_5b}.safetensors  LoRA-MoE files recording those families
    <tmp>/input/surgical_start_frame.png                  the image-to-video workflows' start frame (shipped
                                                          in workflows/; LoadImage lists input/)

The random WAN 2.2 VAE (1.4 GB file, ~5.5 GB resident once loaded) is only linked in by ``link_wan22_vae``,
from the TI2V test, which must run under ``flock /tmp/wan22_vae.lock`` on a shared machine.

and runs ComfyUI on it with ``training.comfy_server.ComfyServer`` (the demo's server): ``python main.py --cpu
--listen 127.0.0.1 --port <free> --base-directory <tmp> --disable-auto-launch --database-url
sqlite:///:memory:`` from the ComfyUI checkout, in its own process group, killed when the test process dies
(PR_SET_PDEATHSIG) and always stopped by ``stop()``.

One server is shared by every test module of a pytest session (``shared_server()``, reference counted),
because starting ComfyUI costs ~10-20 s on two cores.

``api_prompt(workflow, object_info, name)`` turns a bundled UI workflow into the API prompt the tests
post, with every test-only change listed in ``OVERRIDES`` (tiny sizes and steps, tiny model files, the
fixture text encoder in place of CLIPLoader + CLIPTextEncode).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import pack_fixtures
from moe_core import workflow_api as ui_to_api
import wan_fixtures
from moe_core.checkpoint import read_safetensors
from moe_core.patch import model_fingerprint
from training import comfy_server
from training.comfy_server import ServerError, output_files  # noqa: F401  (the tests use them as H.*)

REPO_ROOT = pack_fixtures.REPO_ROOT
PACK_DIR = pack_fixtures.PACK_DIR_NAME
WORKFLOW_DIR = REPO_ROOT / "workflows"
ARTIFACTS = REPO_ROOT / "test-artifacts"
FIXTURE_CACHE = Path(os.environ.get("WLM_FIXTURE_CACHE", Path.home() / ".cache" / "comfyui-wanloramoe" / "fixtures"))

TINY_HIGH = "tiny_wan_high_noise.safetensors"
TINY_LOW = "tiny_wan_low_noise.safetensors"
TINY_MOE = "tiny_a14b.safetensors"
TINY_SINGLE = "tiny_single.safetensors"
BROKEN_HEADER = "broken_header.safetensors"
TRUNCATED = "truncated.safetensors"
NAN_WEIGHTS = "nan_weights.safetensors"  # a valid header over a NaN tensor: fails when loaded
TINY_VAE = "wan21_vae_random.safetensors"
TINY_I2V_HIGH = "tiny_wan_i2v_high_noise.safetensors"
TINY_I2V_LOW = "tiny_wan_i2v_low_noise.safetensors"
TINY_TI2V = "tiny_wan_ti2v_5b.safetensors"
TINY_MOE_I2V = "tiny_i2v_a14b.safetensors"
TINY_MOE_TI2V = "tiny_ti2v_5b.safetensors"
TINY_VAE22 = "wan22_vae_random.safetensors"  # linked by link_wan22_vae() only
START_FRAME = "surgical_start_frame.png"  # shipped in workflows/, copied to the server's input/
FIXTURE_ENCODER = "WLMTestTextEncode"

# Test sizes: 32x32 pixels (16x16 per tile for the six-render comparison sheet: the real-size WAN VAE
# decodes a 32x32 clip in ~2 s on one CPU core), 5 frames (2 latent frames), 4 steps split 2 + 2.
TEST_WIDTH, TEST_HEIGHT, TEST_LENGTH, TEST_STEPS, TEST_SPLIT = 32, 32, 5, 4, 2
SHEET_TILE = 16


def test_size(name: str) -> tuple[int, int]:
    return (SHEET_TILE, SHEET_TILE) if "sheet" in name else (TEST_WIDTH, TEST_HEIGHT)

# A returning user's front-end settings: no first-run template dialog, no version check (offline), and
# canvas navigation settings already migrated (front end 1.27.10 throws while migrating them on a first run).
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Notification.ShowVersionUpdates": False,
    "Comfy.Canvas.NavigationMode": "legacy",
    "Comfy.Canvas.LeftMouseClickBehavior": "panning",
    "Comfy.Canvas.MouseWheelScroll": "zoom",
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,  # draw text at any zoom (screenshots of whole workflows)
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
}

FIXTURE_NODE = '''"""Test fixture: stands in for CLIPLoader + CLIPTextEncode (UMT5-XXL is far too large for the tests).
CONDITIONING [[randn(1, 8, 4096), {}]] seeded from the text, so equal prompts give equal conditioning."""
import hashlib

import torch


class WLMTestTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, text):
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") % (2 ** 63)
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, 8, 4096, generator=g), {}]],)


NODE_CLASS_MAPPINGS = {"WLMTestTextEncode": WLMTestTextEncode}
'''


# ------------------------------------------------------------------------------------------ fixtures

def wan21_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The WAN 2.1 VAE (dim 96, z_dim 16: what ``comfy.sd.VAE`` builds for these keys) with seeded weights."""
    import comfy.ldm.wan.vae

    vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                fan_in = max(1, p[0].numel()) if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}


def cached_vae_file() -> Path:
    """The random VAE as .safetensors, built once per machine (~250 MB, float16) and reused."""
    path = FIXTURE_CACHE / "wan21_vae_random_seed0_v1.safetensors"
    if not path.exists():
        FIXTURE_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(wan21_vae_state_dict(0), str(tmp))
        os.replace(tmp, path)
    return path


def write_models(models: Path) -> None:
    """Tiny DiTs, LoRA-MoE files (good and broken) and the random VAE under a ComfyUI models/ folder."""
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (models / "lora_moe").mkdir(parents=True, exist_ok=True)
    (models / "vae").mkdir(parents=True, exist_ok=True)
    fingerprints = {}
    for seed, name, set_name in ((0, TINY_HIGH, "high_noise"), (1, TINY_LOW, "low_noise")):
        sd = wan_fixtures.tiny_wan_state_dict(seed)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(models / "diffusion_models" / name))
        fingerprints[set_name] = model_fingerprint(wan_fixtures.load_tiny_wan(sd))
    pack_fixtures.write_moe(pack_fixtures.tiny_a14b_moe(fingerprints), models / "lora_moe" / TINY_MOE)
    # Image-to-video families: an I2V A14B-layout pair (seeds 2, 3) and a TI2V 5B-layout DiT (seed 4).
    for family, dits, moe_name in (("i2v", ((2, TINY_I2V_HIGH, "high_noise"), (3, TINY_I2V_LOW, "low_noise")),
                                    TINY_MOE_I2V),
                                   ("ti2v", ((4, TINY_TI2V, "default"),), TINY_MOE_TI2V)):
        fps = {}
        for seed, name, set_name in dits:
            sd = wan_fixtures.tiny_wan_state_dict(seed, family=family)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(models / "diffusion_models" / name))
            fps[set_name] = model_fingerprint(wan_fixtures.load_tiny_wan(sd))
        pack_fixtures.write_moe(pack_fixtures.tiny_family_moe(family, fps), models / "lora_moe" / moe_name)
    pack_fixtures.write_moe(pack_fixtures.tiny_single_moe(), models / "lora_moe" / TINY_SINGLE)
    (models / "lora_moe" / BROKEN_HEADER).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    good = (models / "lora_moe" / TINY_MOE).read_bytes()
    (models / "lora_moe" / TRUNCATED).write_bytes(good[: len(good) // 2])
    tensors, header = read_safetensors(models / "lora_moe" / TINY_MOE)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(models / "lora_moe" / NAN_WEIGHTS), metadata=header)
    _link(cached_vae_file(), models / "vae" / TINY_VAE)


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        dst.symlink_to(src)


def link_wan22_vae(base: Path) -> str:
    """Put the cached random WAN 2.2 VAE (``wan_fixtures.wan22_vae_file``, built on first use) into the server's
    models/vae and return its name there. Loading it takes ~5.5 GB: hold /tmp/wan22_vae.lock on a shared machine."""
    _link(wan_fixtures.wan22_vae_file(), base / "models" / "vae" / TINY_VAE22)
    return TINY_VAE22


# --------------------------------------------------------------------------------------------- server

class ComfyServer(comfy_server.ComfyServer):
    """The tests' server (``training.comfy_server.ComfyServer``, the demo's) on a temporary base directory
    holding the fixtures listed in the module docstring, always on the CPU."""

    def __init__(self, base: Path | None = None):
        # Tiny models: one intra-op thread is faster, above all on a busy 2-core machine (see conftest.py).
        threads = int(os.environ.get("OMP_NUM_THREADS") or os.environ.get("WLM_TEST_THREADS", "1"))
        super().__init__(base or tempfile.mkdtemp(prefix="wlm-comfy-"), cpu=True, threads=threads)

    def prepare(self) -> None:
        if (self.base / ".prepared").exists():
            return
        custom = self.base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        link = custom / PACK_DIR
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        fixture = custom / "wlm_test_text_encode"
        fixture.mkdir(exist_ok=True)
        (fixture / "__init__.py").write_text(FIXTURE_NODE)
        write_models(self.base / "models")
        (self.base / "input").mkdir(exist_ok=True)
        shutil.copyfile(WORKFLOW_DIR / START_FRAME, self.base / "input" / START_FRAME)
        user = self.base / "user" / "default"
        for d in ("workflows", "subgraphs"):
            (user / d).mkdir(parents=True, exist_ok=True)
        (user / "user.css").write_text("/* test profile */\n")
        (user / "comfy.templates.json").write_text("[]\n")  # saved node templates: none
        (user / "comfy.settings.json").write_text(json.dumps(FRONTEND_SETTINGS, indent=1))
        (self.base / ".prepared").touch()

    def cleanup(self) -> None:
        self.stop()
        if os.environ.get("WLM_KEEP_SERVER_DIR"):
            return
        shutil.rmtree(self.base, ignore_errors=True)


_shared: ComfyServer | None = None
_shared_users = 0
_shared_lock = threading.Lock()


def shared_server() -> ComfyServer:
    """The session's server, started on first use; pair every call with ``release_shared_server()``."""
    global _shared, _shared_users
    with _shared_lock:
        if _shared is None or not _shared.alive():
            _shared = ComfyServer().start()
            atexit.register(_shared.cleanup)
        _shared_users += 1
        return _shared


def release_shared_server() -> None:
    global _shared, _shared_users
    with _shared_lock:
        _shared_users -= 1
        if _shared_users <= 0 and _shared is not None:
            _shared.cleanup()
            _shared = None
            _shared_users = 0


# --------------------------------------------------------------------------------- workflows -> API

def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8"))


def workflow_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))


def _override(node_id: str, node: dict, name: str, changes: list[str]) -> dict | None:
    """Apply the test overrides to one API node (returns None to drop it). Every change is logged in `changes`."""
    kind, inputs = node["class_type"], node["inputs"]

    def setv(key: str, value: Any) -> None:
        if inputs.get(key) != value:
            changes.append(f"{node_id} {kind}.{key}: {inputs.get(key)!r} -> {value!r}")
            inputs[key] = value

    if kind == "CLIPLoader":
        changes.append(f"{node_id} CLIPLoader: dropped (UMT5-XXL replaced by the fixture encoder)")
        return None
    if kind == "CLIPTextEncode":
        changes.append(f"{node_id} CLIPTextEncode -> {FIXTURE_ENCODER} (same text, no clip input)")
        return {"class_type": FIXTURE_ENCODER, "inputs": {"text": inputs["text"]}, "_meta": node.get("_meta", {})}
    if kind == "UNETLoader":  # (ti2v before i2v: one name contains the other)
        unet = inputs["unet_name"]
        if "ti2v" in unet:
            setv("unet_name", TINY_TI2V)
        elif "i2v" in unet:
            setv("unet_name", TINY_I2V_HIGH if "high" in unet else TINY_I2V_LOW)
        else:
            setv("unet_name", TINY_HIGH if "high" in unet else TINY_LOW)
    elif kind == "VAELoader":
        setv("vae_name", TINY_VAE22 if "wan2.2_vae" in inputs["vae_name"] else TINY_VAE)
    elif kind == "WanLoRAMoE_LoadLoRAMoE":
        file = inputs["lora_moe"]
        setv("lora_moe", TINY_MOE_TI2V if "ti2v" in file else TINY_MOE_I2V if "i2v" in file else TINY_MOE)
    elif kind in ("EmptyHunyuanLatentVideo", "WanImageToVideo", "Wan22ImageToVideoLatent"):
        width, height = test_size(name)
        setv("width", width)
        setv("height", height)
        setv("length", TEST_LENGTH)
    elif kind == "KSampler":
        setv("steps", TEST_STEPS)
    elif kind == "KSamplerAdvanced":
        steps = inputs["steps"]
        setv("steps", TEST_STEPS)
        for key in ("start_at_step", "end_at_step"):
            if 0 < inputs[key] < steps:  # the split step, scaled to the test's steps
                setv(key, TEST_SPLIT)
    elif kind == "WanLoRAMoE_TimestepBand":
        setv("preview_steps", TEST_STEPS)
    elif kind == "SaveVideo":
        setv("filename_prefix", f"video/test_{name}")
    return node


def api_prompt(workflow: dict, object_info: dict, name: str) -> tuple[dict, list[str]]:
    """(API prompt for the test server, list of the overrides applied)."""
    prompt = ui_to_api.convert(workflow, object_info)
    changes: list[str] = []
    out = {}
    for nid, node in prompt.items():
        new = _override(nid, node, name, changes)
        if new is not None:
            out[nid] = new
    for nid, node in out.items():  # nothing may still point at a dropped node
        for key, value in node["inputs"].items():
            if isinstance(value, list) and value[0] not in out:
                raise AssertionError(f"{nid}.{key} links to dropped node {value[0]}")
    return out, changes


def prompt_hash(prompt: dict) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:12]
