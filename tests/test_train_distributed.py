"""torchrun (gloo, 2 processes): Ctrl-C saves the last finished step exactly once, and the process group's
timeout is the configured one (``train.dist_timeout_minutes``)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_fixtures as tf
from training.config import Stage1Config, config_from_dict, to_toml
from training.stage1 import run_stage1

REPO = Path(__file__).resolve().parent.parent
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tf.Workspace:
    return tf.make_workspace(tmp_path_factory.mktemp("dist_ws"))


def _torchrun(args: list[str], **kwargs) -> subprocess.Popen:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                             str(port), *args], cwd=REPO, env=env, text=True, **kwargs)


def test_ctrl_c_under_torchrun_saves_the_last_step_once(ws, tmp_path):
    train = {"max_steps": 100000, "grad_accum": 1, "lr_scheduler": "constant", "warmup_steps": 0}
    data = tf.config_dict(ws, tmp_path / "ddp", train=train, output={"save_every": 0})
    data["model"]["device"] = "cpu"
    path = tmp_path / "ddp.toml"
    path.write_text(to_toml(config_from_dict(Stage1Config, data)), encoding="utf-8")
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        # its own session, so that the signal reaches torchrun and both processes, as a terminal's Ctrl-C does
        proc = _torchrun(["-m", "training.stage1", "--config", str(path)], stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True)
        metrics = tmp_path / "ddp" / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    text = log.read_text()
    assert proc.returncode != 0
    assert text.count("interrupted: saved step") == 1, text[-3000:]
    ckdir = tmp_path / "ddp" / "checkpoints"
    latest = json.loads((ckdir / "latest.json").read_text())
    step = latest["step"]
    assert step >= 3 and sorted(p.name for p in ckdir.glob("step_*")) == [
        f"step_{step:06d}.safetensors", f"step_{step:06d}.state.pt"]
    assert torch.load(ckdir / latest["state"], weights_only=True)["step"] == step

    # what was saved is that step, whole: one process with the same global batch reaches the same weights
    single = run_stage1(tf.stage1_config(ws, tmp_path / "single", train={**train, "max_steps": step,
                                                                         "grad_accum": 2}), log_fn=QUIET)
    saved = tf.lora_tensors(ckdir / latest["weights"])
    final = tf.lora_tensors(single.out_dir / "checkpoints" / "final.safetensors")
    assert saved.keys() == final.keys()
    for k in saved:
        assert torch.allclose(saved[k], final[k], rtol=1e-5, atol=1e-6), k


def test_process_group_timeout_is_the_configured_one(tmp_path):
    script = tmp_path / "late.py"
    script.write_text(
        "import sys, time, torch\n"
        "from training.determinism import init_distributed\n"
        "d = init_distributed(torch.device('cpu'), timeout_minutes=0.03)\n"
        "if d.rank == 1:\n"
        "    time.sleep(6)\n"
        "start = time.time()\n"
        "try:\n"
        "    torch.distributed.barrier()\n"
        "    print(f'rank {d.rank}: barrier passed', flush=True)\n"
        "except Exception as e:\n"
        "    print(f'rank {d.rank}: gave up after {time.time() - start:.1f} s: {e}', flush=True)\n", encoding="utf-8")
    proc = _torchrun([str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=120)
    line = next((x for x in out.splitlines() if x.startswith("rank 0:")), "")
    assert "gave up after" in line, out[-3000:]
    assert float(line.split("after ")[1].split(" s")[0]) < 5.0  # 1.8 s configured, not torch's default
