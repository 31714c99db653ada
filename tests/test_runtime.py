"""The test harness itself: finding ComfyUI, and the tiny WAN loaded and sampled by ComfyUI's real code."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

import comfy.cli_args
import comfy.model_base
import comfy.model_management
import comfy.supported_models
import wan_fixtures
from moe_core import comfy_runtime
from moe_core.comfy_runtime import ComfyUINotFound, ComfyUIVersionError, ensure_comfy, find_comfyui


def _fake_checkout(root: Path, version: str = "0.3.64") -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "sd.py").write_text("")
    (root / "main.py").write_text("")
    (root / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return root


# --- finding ComfyUI ---------------------------------------------------------------------------------

def test_find_comfyui_honours_comfyui_path(monkeypatch, tmp_path, comfyui_root):
    monkeypatch.setenv("COMFYUI_PATH", str(comfyui_root))
    assert find_comfyui() == comfyui_root
    other = _fake_checkout(tmp_path / "OtherComfyUI")
    monkeypatch.setenv("COMFYUI_PATH", str(other))
    assert find_comfyui() == other


def test_find_comfyui_rejects_bogus_path(monkeypatch, tmp_path):
    bogus = tmp_path / "not-comfyui"
    bogus.mkdir()
    (bogus / "main.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(bogus))
    with pytest.raises(ComfyUINotFound) as info:
        find_comfyui()
    message = str(info.value)
    assert str(bogus) in message and "COMFYUI_PATH" in message
    assert "comfy/sd.py" in message  # says what is missing
    assert comfy_runtime.PINNED_COMFYUI_COMMIT[:8] in message and "git clone" in message


def test_find_comfyui_lists_every_place_tried(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/comfyui/ComfyUI there
    if comfy_runtime._enclosing_comfyui() is not None:  # this checkout lives in ComfyUI/custom_nodes
        assert find_comfyui() == comfy_runtime._enclosing_comfyui()
        return
    with pytest.raises(ComfyUINotFound) as info:
        find_comfyui()
    message = str(info.value)
    assert "COMFYUI_PATH: not set" in message
    assert "custom_nodes" in message
    assert str(tmp_path / ".cache/comfyui/ComfyUI") in message


def test_find_comfyui_finds_the_comfyui_holding_the_pack(monkeypatch, tmp_path):
    """Installed as ComfyUI/custom_nodes/<pack>, the module finds that ComfyUI without any setting."""
    import importlib.util
    import shutil

    comfy_root = _fake_checkout(tmp_path / "ComfyUI")
    module_dir = comfy_root / "custom_nodes" / "ComfyUI-WanLoRAMoE" / "moe_core"
    module_dir.mkdir(parents=True)
    shutil.copy(comfy_runtime.__file__, module_dir / "comfy_runtime.py")
    spec = importlib.util.spec_from_file_location("_wlm_installed_runtime", module_dir / "comfy_runtime.py")
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert installed.find_comfyui() == comfy_root
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "elsewhere"))  # an explicit setting still wins
    with pytest.raises(installed.ComfyUINotFound, match="elsewhere"):
        installed.find_comfyui()


def test_version_check(tmp_path, comfyui_root):
    assert comfy_runtime.check_version(comfyui_root) >= comfy_runtime.MIN_COMFYUI_VERSION
    old = _fake_checkout(tmp_path / "old", version="0.3.9")
    with pytest.raises(ComfyUIVersionError, match="0.3.9"):
        comfy_runtime.check_version(old)
    assert comfy_runtime._version_tuple("0.3.64") > comfy_runtime._version_tuple("0.3.9")


def test_ensure_comfy_is_idempotent_and_on_cpu(comfyui_root):
    assert ensure_comfy(cpu=True) == comfyui_root
    assert ensure_comfy() == comfyui_root
    assert sys.path.count(str(comfyui_root)) == 1
    assert Path(comfy.model_management.__file__).resolve().is_relative_to(comfyui_root.resolve())
    assert comfy.cli_args.args.cpu
    assert comfy.model_management.get_torch_device().type == "cpu"


# --- the tiny WAN --------------------------------------------------------------------------------------

def test_tiny_wan_loads_as_wan21(tiny_wan, tiny_wan_state_dict):
    sd = tiny_wan_state_dict()
    assert "head.modulation" in sd and "blocks.9.ffn.0.weight" in sd and "blocks.10.ffn.0.weight" not in sd
    assert isinstance(tiny_wan.model, comfy.model_base.WAN21)
    assert type(tiny_wan.model.model_config) is comfy.supported_models.WAN21_T2V
    dit = tiny_wan.model.diffusion_model
    assert len(dit.blocks) == 10 and dit.dim == 128 and dit.ffn_dim == 256 and dit.num_heads == 1
    assert sum(p.numel() for p in dit.parameters()) == sum(t.numel() for t in sd.values())
    loaded = dit.blocks[3].self_attn.q.weight
    assert torch.equal(loaded.float(), sd["blocks.3.self_attn.q.weight"].float())
    assert len(tiny_wan_state_dict()) == len(sd)  # loading did not consume the fixture's dict

    small = wan_fixtures.load_tiny_wan(tiny_wan_state_dict(num_layers=4))
    assert len(small.model.diffusion_model.blocks) == 4


def test_state_dict_is_deterministic():
    a, b = wan_fixtures.tiny_wan_state_dict(seed=3, num_layers=2), wan_fixtures.tiny_wan_state_dict(seed=3, num_layers=2)
    c = wan_fixtures.tiny_wan_state_dict(seed=4, num_layers=2)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.1.ffn.0.weight"], c["blocks.1.ffn.0.weight"])
    assert all(torch.isfinite(t).all() for t in a.values())


def test_sample_is_deterministic_per_seed(tiny_wan, wan_contexts):
    positive, negative = wan_contexts
    first = wan_fixtures.sample(tiny_wan, positive, negative, seed=7)
    again = wan_fixtures.sample(tiny_wan, positive, negative, seed=7)
    other_seed = wan_fixtures.sample(tiny_wan, positive, negative, seed=8)
    assert first.shape == wan_fixtures.DEFAULT_LATENT_SHAPE
    assert torch.isfinite(first).all() and first.std() > 0.1
    assert torch.equal(first, again)
    assert (first - other_seed).abs().mean() > 0.1


def test_sample_depends_on_the_prompt(tiny_wan, wan_contexts):
    """The model is not degenerate: the text context changes the result, through CFG and without it."""
    positive, negative = wan_contexts
    other = wan_fixtures.make_context(3)
    for cfg in (1.0, 4.0):
        a = wan_fixtures.sample(tiny_wan, positive, negative, seed=0, cfg=cfg)
        b = wan_fixtures.sample(tiny_wan, other, negative, seed=0, cfg=cfg)
        assert (a - b).abs().mean() > 1e-3, cfg


def test_split_sampling_matches_ksampler_advanced_usage(tiny_wan, wan_contexts):
    """High-noise then low-noise halves (as in the WAN 2.2 A14B template) run and give a finite latent."""
    positive, negative = wan_contexts
    high = wan_fixtures.sample(tiny_wan, positive, negative, seed=5, steps=4, start_step=0, last_step=2)
    low = wan_fixtures.sample(tiny_wan, positive, negative, seed=5, steps=4, latent=high, add_noise=False,
                              start_step=2, last_step=10000)
    assert torch.isfinite(low).all() and not torch.equal(high, low)


def test_fp8_weights_sample_on_cpu(tiny_wan_state_dict, wan_contexts):
    model = wan_fixtures.load_tiny_wan(tiny_wan_state_dict(), dtype=torch.float8_e4m3fn)
    assert model.model.diffusion_model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    out = wan_fixtures.sample(model, *wan_contexts, seed=1)
    assert torch.isfinite(out).all()


def test_four_steps_are_fast(tiny_wan, wan_contexts):
    wan_fixtures.sample(tiny_wan, *wan_contexts, seed=0)  # warm-up: first load of the model
    start = time.perf_counter()
    wan_fixtures.sample(tiny_wan, *wan_contexts, seed=1, steps=4)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"4 sampler steps took {elapsed:.2f}s"
