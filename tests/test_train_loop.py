"""The training loop on tiny WAN DiTs loaded through ComfyUI and synthetic clips: the loss falls, resume is
exact, two data-parallel processes (torchrun, gloo) equal one process, the A14B pair trains each sample on the
DiT that owns its noise level."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_fixtures as tf
from training.config import to_toml
from training.stage1 import run_stage1, setup_stage1

REPO = Path(__file__).resolve().parent.parent
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tf.Workspace:
    return tf.make_workspace(tmp_path_factory.mktemp("train_ws"))


def _loras_equal(a: dict[str, Path], b: dict[str, Path]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        ta, tb = tf.lora_tensors(a[name]), tf.lora_tensors(b[name])
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k} differs"


def test_loss_falls(ws, tmp_path):
    cfg = tf.stage1_config(ws, tmp_path / "out", train={"max_steps": 25, "learning_rate": 1e-2, "batch_size": 2,
                                                        "grad_accum": 1, "warmup_steps": 0,
                                                        "lr_scheduler": "constant"})
    setup = setup_stage1(cfg, log_fn=QUIET)
    trainer = setup.trainer
    before = trainer.evaluate(num_samples=16)
    result = trainer.train()
    after = trainer.evaluate(num_samples=16)
    print(f"eval loss before {before:.4f} after {after:.4f}")
    assert after < 0.9 * before, (before, after)
    assert result.steps == 25 and len(result.losses) == 25
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 26))
    assert {"loss", "lr", "grad_norm", "step_time_s", "samples_per_s", "epoch", "t_mean"} <= lines[0].keys()


def test_resume_is_exact(ws, tmp_path):
    train = {"max_steps": 6, "warmup_steps": 2}
    ref = run_stage1(tf.stage1_config(ws, tmp_path / "ref", train=train, output={"save_every": 2}), log_fn=QUIET)

    # crash (any exception) after step 5: the last checkpoint is step 4; resume from there
    def crash(step, metrics):
        if step == 5:
            raise RuntimeError("simulated crash")

    cfg = tf.stage1_config(ws, tmp_path / "run", train=train, output={"save_every": 2})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage1(cfg, callbacks=[crash], log_fn=QUIET)
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4
    with pytest.raises(Exception, match="already holds a run"):  # a new run would overwrite: refused
        run_stage1(cfg, log_fn=QUIET)
    resumed = run_stage1(cfg, resume="auto", log_fn=QUIET)
    assert resumed.steps == 6
    _loras_equal(ref.loras, resumed.loras)
    s_ref = torch.load(ref.out_dir / "checkpoints" / "final.state.pt", weights_only=True)
    s_res = torch.load(resumed.out_dir / "checkpoints" / "final.state.pt", weights_only=True)
    for pid, st in s_ref["optimizer"]["state"].items():
        for key, value in st.items():
            assert torch.equal(value, s_res["optimizer"]["state"][pid][key])
    assert s_ref["scheduler"] == s_res["scheduler"]
    ref_lines = (ref.out_dir / "metrics.jsonl").read_text().splitlines()
    res_lines = (resumed.out_dir / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in ("step_time_s", "samples_per_s")}
    assert [strip(x) for x in ref_lines] == [strip(x) for x in res_lines]  # step 5 logged once, same numbers

    # Ctrl-C between checkpoints: the trainer saves the last finished step itself
    def interrupt(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    cfg2 = tf.stage1_config(ws, tmp_path / "ctrl_c", train=train, output={"save_every": 0})
    with pytest.raises(KeyboardInterrupt):
        run_stage1(cfg2, callbacks=[interrupt], log_fn=QUIET)
    assert json.loads((tmp_path / "ctrl_c" / "checkpoints" / "latest.json").read_text())["step"] == 3
    explicit = tmp_path / "ctrl_c" / "checkpoints" / "step_000003.state.pt"  # --resume PATH
    _loras_equal(ref.loras, run_stage1(cfg2, resume=str(explicit), log_fn=QUIET).loras)


def test_resume_refuses_a_changed_run(ws, tmp_path):
    cfg = tf.stage1_config(ws, tmp_path / "run", train={"max_steps": 3}, output={"save_every": 1, "keep_last": 1})
    run_stage1(cfg, log_fn=QUIET)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["final.safetensors", "final.state.pt", "latest.json", "step_000002.safetensors",
                     "step_000002.state.pt"]  # keep_last = 1: step 1 pruned, the final one kept
    changed = tf.stage1_config(ws, tmp_path / "run", train={"max_steps": 3, "learning_rate": 5e-4})
    with pytest.raises(Exception, match="train.learning_rate = 0.001 then, 0.0005 now"):
        run_stage1(changed, resume="auto", log_fn=QUIET)
    bigger = tf.stage1_config(ws, tmp_path / "run", train={"max_steps": 3, "grad_accum": 4})
    with pytest.raises(Exception, match="global batch 2"):
        run_stage1(bigger, resume="auto", log_fn=QUIET)


def test_two_gloo_processes_equal_one_process(ws, tmp_path):
    """`torchrun --nproc_per_node 2 -m training.stage1` (2 x batch 1 x accumulation 2) = 1 process, batch 1 x 4.

    On an A14B pair, so steps where a DiT gets no sample at all (nothing to update: AdamW must skip it, as
    a single process does) are covered too.
    """
    ddp_cfg = tf.config_dict(ws, tmp_path / "ddp", pair=True, train={"max_steps": 4, "grad_accum": 2})
    ddp_cfg["model"]["device"] = "cpu"
    from training.config import Stage1Config, config_from_dict

    path = tmp_path / "ddp.toml"
    path.write_text(to_toml(config_from_dict(Stage1Config, ddp_cfg)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(port), "-m", "training.stage1", "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "global batch 4 (2 process(es))" in proc.stdout

    single = run_stage1(tf.stage1_config(ws, tmp_path / "single", pair=True,
                                         train={"max_steps": 4, "grad_accum": 4}), log_fn=QUIET)
    one_lines = [json.loads(x) for x in single.metrics.read_text().splitlines()]
    assert any(x["samples_high_noise"] == 0 for x in one_lines)  # a step in which the high DiT is idle
    worst = 0.0
    for name in ("high_noise", "low_noise"):
        ddp = tf.lora_tensors(tmp_path / "ddp" / f"lora_{name}.safetensors")
        one = tf.lora_tensors(single.loras[name])
        assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora_up" in k)  # it trained
        for k in one:
            # Only the order of summing the per-sample gradients differs ((g0+g2)+(g1+g3) vs g0+g1+g2+g3),
            # so the weights agree to float32 rounding, amplified a little by AdamW's division by sqrt(v).
            assert torch.allclose(ddp[k], one[k], rtol=1e-5, atol=1e-6), (name, k)
            worst = max(worst, float((ddp[k] - one[k]).abs().max()))
    print(f"max |ddp - single| weight difference: {worst:.3g}")
    ddp_lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ddp_lines, one_lines):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["t_mean"] == pytest.approx(b["t_mean"])
        assert (a["samples_high_noise"], a["samples_low_noise"]) == (b["samples_high_noise"], b["samples_low_noise"])


def test_a14b_pair_routes_each_sample_to_its_dit(ws, tmp_path):
    from moe_core.checkpoint import load_lora_moe
    from moe_core.patch import select_adapter_set

    cfg = tf.stage1_config(ws, tmp_path / "pair", pair=True, train={"max_steps": 4, "grad_accum": 4})
    setup = setup_stage1(cfg, log_fn=QUIET)
    trainer = setup.trainer
    assert setup.trainer.dits.names == ["high_noise", "low_noise"]
    for position in range(32):
        row = trainer._prepare_row(position)
        assert row["dit"] == (0 if float(row["t"]) >= 0.875 else 1)
    result = trainer.train()
    lines = [json.loads(x) for x in result.metrics.read_text().splitlines()]
    n_high = sum(x["samples_high_noise"] for x in lines)
    n_low = sum(x["samples_low_noise"] for x in lines)
    assert n_high > 0 and n_low > 0 and n_high + n_low == 16
    moe = load_lora_moe(result.checkpoint.with_name("final.safetensors"))
    assert set(moe.sets) == {"high_noise", "low_noise"}
    assert moe.sets["high_noise"].sigma_range == (0.875, 1.0)
    for d in trainer.dits:  # the node's "auto" choice recognises each DiT from the file's fingerprints
        assert select_adapter_set(moe, d.mp, "auto") == d.name

    only_high = tf.stage1_config(ws, tmp_path / "high", pair=True, model={"train_dits": ["high_noise"]},
                                 train={"max_steps": 1})
    s2 = setup_stage1(only_high, log_fn=QUIET)
    assert s2.trainer.dits.names == ["high_noise"] and s2.trainer.sampler.t_min == 0.875
    assert all(float(s2.trainer._prepare_row(p)["t"]) >= 0.875 for p in range(16))


def test_tensorboard_events_match_the_jsonl_log(ws, tmp_path, monkeypatch, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_stage1(tf.stage1_config(ws, tmp_path / "tb", train={"max_steps": 3},
                                         output={"tensorboard": True}), log_fn=QUIET)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    logged = [json.loads(x) for x in result.metrics.read_text().splitlines()]
    for key in ("loss", "lr", "grad_norm", "t_mean"):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [x["step"] for x in logged] == [1, 2, 3]
        assert [e.value for e in scalars] == pytest.approx([x[key] for x in logged], rel=1e-6)

    # without the tensorboard package: one clear warning, and the run goes on with metrics.jsonl
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    caplog.clear()
    again = run_stage1(tf.stage1_config(ws, tmp_path / "no_tb", train={"max_steps": 3},
                                        output={"tensorboard": True}), log_fn=QUIET)
    warnings = [r for r in caplog.records if "tensorboard package is not installed" in r.getMessage()]
    assert len(warnings) == 1 and again.steps == 3 and not (tmp_path / "no_tb" / "tensorboard").exists()
