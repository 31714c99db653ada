"""Bad ablation inputs fail before anything renders, with a message naming the config key; the arms' choice;
x-t slices on a clip of known motion. No ComfyUI server is started here.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

import pack_fixtures
from test_ablate_e2e import ARMS, build_assets, write_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("ablate_inputs") / "assets")


def run_cli(config: Path, *extra: str) -> tuple[int, str]:
    from training.ablate import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--config", str(config), *extra])
    return code, err.getvalue()


def expect_error(config: Path, *needles: str, extra: tuple[str, ...] = ()) -> None:
    code, err = run_cli(config, *extra)
    assert code == 2, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (config.parent / "run" / "out").exists(), "nothing is written before the inputs are checked"


def test_missing_file_checksum_and_unknown_arm_name_the_config_key(assets, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "a.toml", assets, run)
    missing = dict(assets, dit_low=assets["dit_low"].with_name("nope.safetensors"))
    expect_error(write_config(tmp_path / "b.toml", missing, run), "models.dit_low: model file not found",
                 "nope.safetensors")
    good = hashlib.sha256(assets["main"].read_bytes()).hexdigest()
    bad = "0" * 64
    expect_error(write_config(tmp_path / "c.toml", assets, run, sha256=f'[sha256]\nmodels.lora_moe = "{bad}"'),
                 "models.lora_moe: checksum mismatch", f"expected sha256 {bad}", f"the file has {good}")
    expect_error(write_config(tmp_path / "d.toml", assets, run,
                              sha256=f'[sha256]\nmodels.expert_count_files = ["{bad}"]'),
                 "models.expert_count_files[0]: checksum mismatch")
    expect_error(write_config(tmp_path / "e.toml", assets, run, sha256=f'[sha256]\nmodels.lora = "{good}"'),
                 "sha256.models.lora: no such file key")
    expect_error(cfg, "ablation.arms[1]: unknown arm 'top3' (did you mean 'top1'?)",
                 extra=("--set", 'ablation.arms=["experts", "top3"]'))
    expect_error(cfg, "ablation.arms[0]: arm 'n_experts_8' is not available", "models.expert_count_files",
                 extra=("--set", 'ablation.arms=["n_experts_8"]'))
    expect_error(cfg, "ablation.reference: 'base_only' is not one of the arms rendered",
                 extra=("--set", 'ablation.arms=["experts", "cycle"]'))
    expect_error(cfg, "models.roi_weighted is set but models.roi_uniform is empty",
                 extra=("--set", "models.roi_uniform="))
    expect_error(cfg, "render.instruments[0]: 'Stapler' is not an expert",
                 extra=("--set", 'render.instruments=["Stapler"]'))
    expect_error(cfg, "unknown key 'render.seed'; did you mean render.seeds?", extra=("--set", "render.seed=1"))
    expect_error(cfg, "render.frames: must be 4n+1", extra=("--set", "render.frames=6"))
    expect_error(cfg, "evaluation.classifier: model file not found",
                 extra=("--set", f"evaluation.classifier={tmp_path / 'gone.pt'}"))
    expect_error(cfg, "ablation.workflow:", "not found", extra=("--set", f"ablation.workflow={tmp_path / 'x.json'}"))


def test_a_lora_moe_file_unfit_for_the_a14b_graph_is_refused(assets, tmp_path):
    single = pack_fixtures.write_moe(pack_fixtures.tiny_single_moe(), tmp_path / "single.safetensors")
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    run = tmp_path / "run"
    expect_error(write_config(tmp_path / "a.toml", dict(assets, main=single), run),
                 "models.lora_moe:", "['default']", "missing: ['high_noise', 'low_noise']")
    expect_error(write_config(tmp_path / "b.toml", dict(assets, two=plain), run),
                 "models.expert_count_files[0]: not a usable LoRA-MoE file")


def test_arms_available_and_selected(assets, tmp_path):
    from training.ablation.arms import available_arms, select_arms
    from training.ablation.config import load_ablation_config
    from training.ablation.files import check_model_files

    cfg = load_ablation_config(write_config(tmp_path / "a.toml", assets, tmp_path / "run", arms=[]))
    files = check_model_files(cfg, lambda s: None)
    available = available_arms(files)
    assert list(available) == ["base_only", "experts", "teacher_only", "top1", "always_on", "forced_scissors",
                               "forced_hook_electrocautery", "forced_suction", "forced_other", "cycle",
                               "n_experts_2", "roi_weighted", "roi_uniform"]
    assert [a.name for a in select_arms(cfg, available)] == list(available), "empty list: every arm"
    cfg.ablation.arms = ["cycle", "forced", "base_only", "roi"]
    assert [a.name for a in select_arms(cfg, available)] == [
        "base_only", "forced_scissors", "forced_hook_electrocautery", "forced_suction", "forced_other", "cycle",
        "roi_weighted", "roi_uniform"], "groups expand; report order"
    assert set(ARMS) <= set(available)
    assert available["experts"].router_mode == "learned-from-file"
    assert available["teacher_only"].router_mode == "rule-based"


def test_the_cycle_option_is_the_gate_override_nodes():
    from training.ablation.arms import CYCLE, OVERRIDE_WEIGHTS

    pack = pack_fixtures.import_pack()
    from wlm_pack.nodes.gate_override import CYCLE as NODE_CYCLE, WEIGHT_INPUTS

    assert CYCLE == NODE_CYCLE and tuple(WEIGHT_INPUTS.values()) == OVERRIDE_WEIGHTS
    assert pack.nodes is not None


def test_x_t_slice_of_a_moving_bar_is_a_diagonal(tmp_path):
    from PIL import Image

    from training.ablation.pictures import xt_slice, xt_slices_picture

    t, h, w = 6, 5, 8
    frames = np.zeros((t, h, w, 3), np.uint8)
    for k in range(t):
        frames[k, :, k, :] = 255  # a vertical bar moving one pixel right per frame
    sl = xt_slice(frames, 0.5)
    assert sl.shape == (t, w, 3)
    assert [int(np.argmax(sl[k, :, 0])) for k in range(t)] == list(range(t)) and sl[:, :, 0].sum() == 255 * t
    path = xt_slices_picture([("bar", frames), ("still", np.repeat(frames[:1], t, 0))], 0.5, tmp_path / "xt.png",
                             "test")
    with Image.open(path) as im:
        assert im.width >= 2 * w and im.height >= t
