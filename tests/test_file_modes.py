"""Files the trainer and the CLIs write get the mode the umask gives every new file (0644 under the usual 022),
not the 0600 of a temporary file: a ComfyUI running as another user must be able to read LoRAs and LoRA-MoEs.

Each test runs under an unusual umask, so a hard-coded 0644 would fail as surely as 0600.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_fixtures as tf
from moe_core.atomic import current_umask

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def umask():
    """Set a umask for the test (``umask(0o027)``); the previous one is restored afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> int:
        os.umask(mask)
        return 0o666 & ~mask

    yield set_mask
    os.umask(saved)


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def test_current_umask_reads_the_process_umask(umask):
    for mask in (0o022, 0o027, 0o002, 0o077):
        umask(mask)
        assert current_umask() == mask


def test_a_training_run_writes_every_file_with_the_umask_mode(umask, tmp_path):
    from training.stage1 import run_stage1

    expected = umask(0o027)  # 0640
    ws = tf.make_workspace(tmp_path / "ws")  # clips, captions, manifest and DiT files
    cfg = tf.stage1_config(ws, tmp_path / "out", train={"max_steps": 2}, output={"save_every": 1})
    run_stage1(cfg, log_fn=lambda *_: None)
    written = {**{f"out/{k}": v for k, v in _modes(tmp_path / "out").items()},
               **{f"cache/{k}": v for k, v in _modes(ws.cache).items()},
               **{f"data/{k}": v for k, v in _modes(ws.manifest.parent).items()}}
    kinds = {"lora.safetensors", "checkpoints/final.safetensors", "checkpoints/step_000001.safetensors",
             "checkpoints/final.state.pt", "checkpoints/latest.json", "config.toml", "metrics.jsonl"}
    assert kinds <= {k.removeprefix("out/") for k in written}, sorted(written)
    assert any(k.startswith("cache/latents/") for k in written) and any(k.startswith("cache/text/") for k in written)
    assert "data/manifest.jsonl" in written and any(k.endswith(".mp4") for k in written)
    wrong = {k: oct(v) for k, v in written.items() if v != expected}
    assert not wrong, f"expected {oct(expected)}: {wrong}"


def test_lora_and_lora_moe_files(umask, tmp_path):
    import pack_fixtures
    from moe_core.checkpoint import Adapter
    from moe_core.lora_formats import save_lora

    expected = umask(0o002)  # 0664
    moe = pack_fixtures.write_moe(pack_fixtures.tiny_single_moe(), tmp_path / "moe.safetensors")
    lora = save_lora({"blocks.0.self_attn.q": Adapter(torch.zeros(2, 8), torch.zeros(8, 2), 1.0)},
                     tmp_path / "lora.safetensors")
    assert stat.S_IMODE(moe.stat().st_mode) == expected == stat.S_IMODE(lora.stat().st_mode)


def test_the_manifest_cli_in_a_new_process(umask, tmp_path):
    from training.data.synthetic import render_clip, write_clip

    umask(0o022)
    write_clip(render_clip(1, seed=2, width=32, height=32, seconds=3.0), tmp_path / "clips", "hook")
    out = tmp_path / "manifest.jsonl"
    proc = subprocess.run([sys.executable, "-m", "training.build_manifest", "--input-dir", str(tmp_path / "clips"),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.umask(0o007))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o660
