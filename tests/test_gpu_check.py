"""The GPU check (bench/gpu_check.sh) run at its small size on the CPU: every sub-check, its JSON and its table.

The figures at this size mean nothing for the targets; what is tested is that the script measures what it says
(lowvram output against the full load as oracle, fp8 weights really used, no recompiles while gates change,
the file's adapter count against a hand count) and that a failing or slow check is recorded, not fatal.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
import gpu_checks  # noqa: E402
from moe_core.targets import default_targets, linear_shape  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory, comfyui_root):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "COMFYUI_PATH": str(comfyui_root)}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "--small"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    data["_md"] = (out / "gpu_check.md").read_text()
    data["_log"] = (out / "gpu_check.log").read_text()
    return data


def _result(report, name):
    check = report["checks"][name]
    assert check["status"] == "ok", check
    assert check["seconds"] <= check["budget_s"] + 5
    return check["result"]


def test_every_check_ran_at_small_size(report):
    assert report["schema"] == gpu_check.SCHEMA and report["size"] == "small" and report["isolated"] is False
    assert list(report["checks"]) == list(gpu_check.CHECKS)
    for name, check in report["checks"].items():  # stage 2's step included
        assert check["status"] == "ok", (name, check)
    env = report["env"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["comfyui_version"]
    assert report["targets"] == {"overhead_pct_max": 1.0, "stage2_time_ratio_max": 1.10,
                                 "stage2_peak_ratio_max": 1.05, "load_patch_s_max": 1.0}


def test_overhead_eager_and_compiled(report):
    eager, compiled = _result(report, "overhead_eager"), _result(report, "overhead_compile")
    for r in (eager, compiled):
        assert set(r["median_s"]) == {"plain", "fused"} and all(v > 0 for v in r["median_s"].values())
        assert r["overhead_pct"]["fused"] == pytest.approx(100 * (r["median_s"]["fused"] / r["median_s"]["plain"] - 1))
        assert r["gates_change_every_step"] and r["tokens"] == 3 * 4 * 4 and r["layers"] == 2
    assert eager["compile"] is None and eager["recompiles_in_timed_steps"] is None
    assert compiled["compile"] == "eager"
    assert compiled["recompiles_in_timed_steps"] == 0, "gates changing every step must not recompile"


def test_training_steps_and_fp8(report):
    bf, fp8 = _result(report, "train_stage1"), _result(report, "train_stage1_fp8")
    assert bf["weights"] == "fp32" and fp8["weights"] == "float8_e4m3fn" and bf["stage"] == fp8["stage"] == 1
    for r in (bf, fp8):
        assert r["median_s"] > 0 and math.isfinite(r["first_loss"]) and r["trainable"] > 0
    # same seeds and data: only the float8 rounding of the weights changes the first loss
    assert fp8["first_loss"] != bf["first_loss"]
    assert fp8["first_loss"] == pytest.approx(bf["first_loss"], rel=0.2)


def test_lowvram_output_equals_full_load(report):
    r = _result(report, "lowvram")
    full, partial, streamed = (r["states"][k] for k in ("full", "partial", "streamed"))
    assert not full["lowvram"] and full["streamed_modules"] == 0
    assert partial["lowvram"] and partial["resident_mib"] > 0
    assert 0 < partial["streamed_modules"] < streamed["streamed_modules"] and streamed["resident_mib"] == 0
    # the full load is the oracle; on the CPU in float32 the streamed path computes the very same numbers
    assert r["max_abs_diff"] == {"partial": 0.0, "streamed": 0.0} and r["run_to_run_max_abs_diff"] == 0.0
    assert r["adapter_effect_max_abs"] > 1e-4, "the adapters change the output, so dropping them would show"
    assert all(s["adapters"] == ["cpu:float32"] for s in r["states"].values())
    assert r["passed"] and all(r["checks"].values())


def test_load_patch_reads_both_sets(report):
    r = _result(report, "load_patch")
    targets = default_targets(2)
    assert r["sets"] == ["high_noise", "low_noise"] and r["modules_per_set"] == {"high_noise": len(targets),
                                                                                 "low_noise": len(targets)}
    per_set = sum(5 * rank * sum(linear_shape(m, 128, 256)) for m, rank in targets.items())  # base + 4 experts
    assert r["adapter_params"] == 2 * per_set
    assert r["load_patch_s"] == pytest.approx(r["load_s"] + r["patch_both_s"])
    tensor_bytes = 2 * per_set * 4  # float32, as the trainer writes; the rest is the JSON header
    assert tensor_bytes < r["file_mib"] * 2 ** 20 < tensor_bytes + 2 ** 18


def test_table_and_summary(report):
    md = report["_md"]
    assert "| check | figure | value | target | met |" in md and "size **small**" in md
    rows = {(r["check"], r["figure"]): r for r in report["summary"]}
    lowvram = next(r for (c, _), r in rows.items() if c == "lowvram")
    assert lowvram["met"] is True, "correctness holds at any size"
    perf = [r for r in report["summary"] if r["check"] in ("overhead_eager", "load_patch")]
    assert len(perf) == 2 and all(r["met"] is None for r in perf), "A14B targets are not judged at small size"
    for name in ("overhead_eager", "overhead_compile", "lowvram", "load_patch", "train_stage1"):
        assert f"| {name} |" in md
    assert "===== lowvram (small" in report["_log"]


def test_failures_and_timeouts_are_recorded(tmp_path, monkeypatch):
    """A slow check times out, a broken one fails, the others still run and the report is written."""
    threads = torch.get_num_threads()

    def broken(size, compile_backend=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_checks, "overhead", broken)
    try:
        code = gpu_check.main([str(tmp_path / "out"), "--small", "--in-process", "--only",
                               "load_patch,lowvram,overhead_eager", "--budget", "lowvram=0.01"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    checks = data["checks"]
    assert checks["load_patch"]["status"] == "ok"
    assert checks["lowvram"]["status"] == "timeout" and checks["lowvram"]["seconds"] < 5
    assert checks["overhead_eager"]["status"] == "failed" and checks["overhead_eager"]["error"] == "RuntimeError: boom"
    assert data["all_ok"] is False
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| lowvram | timeout |" in md and "| overhead_eager | failed | RuntimeError: boom |" in md
    # on a GPU each check is its own process, killed at its budget
    entry = gpu_check.run_isolated("load_patch", "small", 1.0, tmp_path, tmp_path / "isolated.log")
    assert entry["status"] == "timeout" and entry["seconds"] < 10
