"""One short run that measures the GPU targets; at a small size on a CPU, so the tests run it too.

    bash bench/gpu_check.sh OUTDIR              # A14B size on a GPU (about 8 minutes), small size on a CPU
    python bench/gpu_check.py OUTDIR --small    # the same, small size anywhere (well under a minute of work)
    python bench/gpu_check.py OUTDIR --only lowvram,load_patch --budget lowvram=120

Writes ``OUTDIR/gpu_check.json`` (every figure), ``OUTDIR/gpu_check.md`` (a short table with the targets) and
``OUTDIR/gpu_check.log``. Each sub-check (``gpu_checks.py``) has its own time budget and its own status (ok,
failed, timeout, skipped): a failing check is recorded and the run goes on. On a GPU each check runs in its own
process (clean memory figures, a hard time limit); on a CPU all run in this process.

Targets (A14B size): LoRA-MoE overhead < 1 % of an unpatched step; stage-2 step <= 1.10x the stage-1 time and
<= 1.05x its peak memory; reading + patching a two-DiT LoRA-MoE < 1 s; lowvram output equal to a full load.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (str(REPO), str(REPO / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SCHEMA = "wan-lora-moe-gpu-check/1"
TARGETS = {"overhead_pct_max": 1.0, "stage2_time_ratio_max": 1.10, "stage2_peak_ratio_max": 1.05,
           "load_patch_s_max": 1.0}
# name: (budget in seconds at A14B size, at small size). Run in this order; the riskiest (compile) last.
CHECKS: dict[str, tuple[float, float]] = {
    "load_patch": (60, 120),
    "lowvram": (90, 120),
    "overhead_eager": (110, 180),
    "train_stage1": (75, 120),
    "train_stage2": (75, 120),
    "train_stage1_fp8": (80, 120),
    "train_stage2_fp8": (80, 120),
    "overhead_compile": (240, 300),
}
DEADLINE_S = {"a14b": 470, "small": 1500}  # the whole run; a check that cannot start in time is skipped
MIN_START_S = 15


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


class CheckTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the code under test swallows it."""


# ------------------------------------------------------------------------------------------- running

def setup_comfy(size: str) -> None:
    """ComfyUI importable; PyTorch attention, as ComfyUI picks on NVIDIA GPUs (on a CPU it replaces the
    sub-quadratic attention, which guards torch.compile on the free memory and so recompiles every step).
    Small size: one CPU thread (on a shared, busy CPU more threads make tiny models many times slower)."""
    import torch

    from moe_core.comfy_runtime import ensure_comfy

    if size == "small":
        torch.set_num_threads(1)
    ensure_comfy()
    args = sys.modules["comfy.cli_args"].args
    if "comfy.model_management" not in sys.modules:
        args.use_pytorch_cross_attention = True


def check_function(name: str, size: str, workdir: Path):
    import gpu_checks

    sz = gpu_checks.SIZES[size]
    table = {
        "load_patch": lambda: gpu_checks.load_patch(size, workdir),
        "lowvram": lambda: gpu_checks.lowvram(size),
        "overhead_eager": lambda: gpu_checks.overhead(size),
        "overhead_compile": lambda: gpu_checks.overhead(size, sz["compile_backend"]),
        "train_stage1": lambda: gpu_checks.train(size, stage=1),
        "train_stage2": lambda: gpu_checks.train(size, stage=2),
        "train_stage1_fp8": lambda: gpu_checks.train(size, stage=1, fp8=True),
        "train_stage2_fp8": lambda: gpu_checks.train(size, stage=2, fp8=True),
    }
    return table[name]


def _cleanup() -> None:
    import gc

    import torch

    import comfy.model_management as mm

    mm.unload_all_models()
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    gc.collect()
    mm.soft_empty_cache()


def run_in_process(name: str, size: str, budget: float, workdir: Path, log) -> dict:
    """Run one check here, stopped by an alarm after `budget` seconds (checked between Python operations)."""
    def on_alarm(signum, frame):
        raise CheckTimeout(f"over its {budget:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_timer = signal.setitimer(signal.ITIMER_REAL, budget)  # an outer alarm (pytest-timeout) resumes after
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            result = check_function(name, size, workdir)()
        entry = {"status": "ok", "result": result}
    except CheckTimeout as e:
        entry = {"status": "timeout", "error": str(e)}
    except Exception as e:  # recorded, and the run goes on
        entry = {"status": "failed", "error": _error(e), "traceback": traceback.format_exc()[-3000:]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer_timer[0] - (time.perf_counter() - t0), 0.001),
                             outer_timer[1])
    entry["seconds"] = time.perf_counter() - t0
    with contextlib.suppress(Exception):
        _cleanup()
    return entry


def run_isolated(name: str, size: str, budget: float, workdir: Path, log_path: Path) -> dict:
    """Run one check in a fresh Python process, killed after `budget` seconds."""
    result_file = workdir / f"{name}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), str(workdir), "--child", name, "--size", size,
           "--result", str(result_file)]
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n===== {name} ({size}, budget {budget:.0f} s) =====\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "error": f"over its {budget:.0f} s budget",
                    "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    if result_file.is_file():
        entry = json.loads(result_file.read_text())
        result_file.unlink()
    else:
        tail = log_path.read_text(errors="replace")[-1500:]
        entry = {"status": "failed", "error": f"process exited {code} without a result", "log_tail": tail}
    entry["seconds"] = seconds
    return entry


def child_main(name: str, size: str, result_path: Path, workdir: Path) -> int:
    setup_comfy(size)
    try:
        entry = {"status": "ok", "result": check_function(name, size, workdir)()}
    except Exception as e:
        traceback.print_exc()
        entry = {"status": "failed", "error": _error(e), "traceback": traceback.format_exc()[-3000:]}
    result_path.write_text(json.dumps(entry, default=str))
    return 0


# ------------------------------------------------------------------------------------------- report

def environment() -> dict:
    import torch

    from moe_core.comfy_runtime import comfyui_version, find_comfyui

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "device": "cpu", "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   gpu_count=torch.cuda.device_count())
    try:
        root = find_comfyui()
        env.update(comfyui=str(root), comfyui_version=comfyui_version(root))
    except Exception as e:
        env["comfyui"] = f"not found: {e}"
    with contextlib.suppress(Exception):
        env["pack_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    return env


def _ms(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s >= 0.1 else f"{s * 1000:.1f} ms"


def _mib(m: float | None) -> str:
    return "?" if m is None else (f"{m / 1024:.1f} GiB" if m >= 1024 else f"{m:.0f} MiB")


def summarize(checks: dict, size: str) -> list[dict]:
    """Rows of the table: figure, value, target and whether it is met (targets apply at A14B size)."""
    at_size = size == "a14b"
    rows: list[dict] = []

    def ok(name):
        c = checks.get(name, {})
        return c.get("result") if c.get("status") == "ok" else None

    def row(check, figure, value, target, met):
        applies = met is not None and (at_size or target.startswith("equal"))  # correctness holds at any size
        rows.append({"check": check, "figure": figure, "value": value, "target": target,
                     "met": bool(met) if applies else None})

    for name, label in (("overhead_eager", "eager"), ("overhead_compile", "torch.compile")):
        r = ok(name)
        if r:
            pct = r["overhead_pct"]["fused"]
            value = (f"{pct:+.2f} % (plain {_ms(r['median_s']['plain'])}, LoRA-MoE {_ms(r['median_s']['fused'])}, "
                     f"{r['dtype']}, {r['tokens']} tokens, CFG 2)")
            target, met = f"< {TARGETS['overhead_pct_max']:g} %", pct < TARGETS["overhead_pct_max"]
            if r.get("compile"):
                value += (f"; first call {r['first_call_s']['plain']:.0f} s / {r['first_call_s']['fused']:.0f} s; "
                          f"recompiles while gates change: {r['recompiles_in_timed_steps']}")
                target += ", no recompiles"
                met = met and r["recompiles_in_timed_steps"] == 0
            row(name, f"step overhead, {label}", value, target, met)
    for fp8 in (False, True):
        tag = "_fp8" if fp8 else ""
        s1, s2 = ok(f"train_stage1{tag}"), ok(f"train_stage2{tag}")
        for stage, r in ((1, s1), (2, s2)):
            if r:
                peak = (f"peak {_mib(r['peak_total_mib'])} (+{_mib(r['peak_added_mib'])} over the model)"
                        if r.get("peak_total_mib") else f"peak +{_mib(r['peak_added_mib'])} over the model")
                row(f"train_stage{stage}{tag}", f"training step, stage {stage}, {r['weights']} weights",
                    f"{_ms(r['median_s'])}/step, {peak}, {r['tokens']} tokens", "—", None)
        if s1 and s2:
            t_ratio = s2["median_s"] / s1["median_s"]
            key = "peak_total_mib" if s1.get("peak_total_mib") else "peak_added_mib"
            m_ratio = s2[key] / s1[key] if s1[key] else float("nan")
            row(f"train_stage2{tag}", f"stage 2 / stage 1, {s1['weights']} weights",
                f"time {t_ratio:.2f}x, peak memory {m_ratio:.2f}x ({'total' if key == 'peak_total_mib' else 'added'})",
                f"<= {TARGETS['stage2_time_ratio_max']:.2f}x time, <= {TARGETS['stage2_peak_ratio_max']:.2f}x memory",
                t_ratio <= TARGETS["stage2_time_ratio_max"] and m_ratio <= TARGETS["stage2_peak_ratio_max"])
    r = ok("lowvram")
    if r:
        p = r["states"]["partial"]
        row("lowvram", "lowvram partial load of a patched DiT",
            f"max |diff| vs full load: {r['max_abs_diff']['partial']:.3g} ({p['streamed_modules']} layers streamed, "
            f"{_mib(p['resident_mib'])} resident), {r['max_abs_diff']['streamed']:.3g} (all streamed), run to run "
            f"{r['run_to_run_max_abs_diff']:.3g}; adapters {', '.join(p['adapters'])} while loaded, "
            f"{', '.join(r['adapters_after_unload'])} after; adapters' own effect {r['adapter_effect_max_abs']:.3g}",
            "equal to the full load; adapters move with the model", r["passed"])
    r = ok("load_patch")
    if r:
        row("load_patch", f"read + patch both DiTs ({r['file_mib']:.0f} MiB file, {len(r['sets'])} sets)",
            f"{r['load_patch_s']:.3f} s (read {r['load_s']:.3f} s{'' if r['page_cache_dropped'] else ', cached'}, "
            f"patch {r['patch_both_s']:.3f} s); adapters to {r['device']} {r['adapters_to_device_s']:.3f} s",
            f"< {TARGETS['load_patch_s_max']:g} s", r["load_patch_s"] < TARGETS["load_patch_s_max"])
    for name, c in checks.items():
        if c.get("status") != "ok":
            rows.append({"check": name, "figure": c["status"], "value": c.get("error") or c.get("note", ""),
                         "target": "", "met": None})
    return rows


def markdown(report: dict) -> str:
    env = report["env"]
    head = (f"# WAN LoRA-MoE GPU check\n\nsize **{report['size']}** · {env.get('device')} · torch {env.get('torch')}"
            f"{' · CUDA ' + env['cuda'] if env.get('cuda') else ''} · ComfyUI {env.get('comfyui_version', '?')} · "
            f"pack {env.get('pack_commit') or '?'} · {report['started_utc']} · {report['wall_s']:.0f} s\n")
    if report["size"] != "a14b":
        head += "\nSmall size: the figures test the script, not the targets (those hold at A14B size).\n"
    lines = ["", "| check | figure | value | target | met |", "|---|---|---|---|---|"]
    mark = {True: "yes", False: "**no**", None: ""}
    for r in report["summary"]:
        lines.append(f"| {r['check']} | {r['figure']} | {str(r['value']).replace('|', '/')} | {r['target']} | "
                     f"{mark[r['met']]} |")
    status = ", ".join(f"{k} {v['status']} ({v.get('seconds', 0):.0f} s)" for k, v in report["checks"].items())
    return head + "\n".join(lines) + f"\n\nChecks: {status}.\n"


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--small", dest="size", action="store_const", const="small", help="small size (CPU default)")
    size.add_argument("--a14b", dest="size", action="store_const", const="a14b", help="A14B size (GPU default)")
    size.add_argument("--size", dest="size", choices=["small", "a14b"], help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help=f"comma-separated checks to run (of {', '.join(CHECKS)})")
    ap.add_argument("--skip", default="", help="comma-separated checks to leave out")
    ap.add_argument("--budget", action="append", default=[], metavar="CHECK=SECONDS", help="override a budget")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (a14b 470, small 1500)")
    iso = ap.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="each check in its own process (GPU default)")
    iso.add_argument("--in-process", dest="isolate", action="store_false", help="all checks here (CPU default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child, args.size, args.result, args.outdir)

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available()
    args.size = args.size or ("a14b" if cuda else "small")
    args.isolate = cuda if args.isolate is None else args.isolate
    names = [n for n in (args.only.split(",") if args.only else CHECKS) if n]
    unknown = [n for n in names + [n for n in args.skip.split(",") if n] if n not in CHECKS]
    if unknown:
        ap.error(f"unknown check(s) {unknown}; the checks are {', '.join(CHECKS)}")
    names = [n for n in CHECKS if n in names and n not in args.skip.split(",")]
    budgets = {n: CHECKS[n][0 if args.size == "a14b" else 1] for n in CHECKS}
    for item in args.budget:
        key, _, value = item.partition("=")
        if key not in CHECKS or not value:
            ap.error(f"--budget {item!r}: expected CHECK=SECONDS with CHECK one of {', '.join(CHECKS)}")
        budgets[key] = float(value)
    deadline = args.deadline or DEADLINE_S[args.size]
    args.outdir.mkdir(parents=True, exist_ok=True)
    log_path = args.outdir / "gpu_check.log"
    log_path.write_text("")
    if not args.isolate:
        setup_comfy(args.size)
    import gpu_checks

    print(f"GPU check, size {args.size}, {'one process per check' if args.isolate else 'in one process'}, "
          f"deadline {deadline:.0f} s: {', '.join(names)}", flush=True)
    checks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = Path(tmp)
        for name in names:
            left = deadline - (time.perf_counter() - t_start)
            if left < MIN_START_S:
                entry = {"status": "skipped", "note": f"no time left in the {deadline:.0f} s deadline"}
            else:
                budget = min(budgets[name], left)
                if args.isolate:
                    entry = run_isolated(name, args.size, budget, workdir, log_path)
                else:
                    with open(log_path, "a") as log:
                        log.write(f"\n===== {name} ({args.size}, budget {budget:.0f} s) =====\n")
                        entry = run_in_process(name, args.size, budget, workdir, log)
                entry["budget_s"] = budget
            checks[name] = entry
            print(f"  {name:<18} {entry['status']:<8} {entry.get('seconds', 0):6.1f} s"
                  f"{'  ' + (entry.get('error') or entry.get('note') or '') if entry['status'] != 'ok' else ''}",
                  flush=True)
    report = {"schema": SCHEMA, "size": args.size, "isolated": args.isolate, "started_utc": started,
              "deadline_s": deadline, "env": environment(), "dims": gpu_checks.SIZES[args.size], "targets": TARGETS,
              "checks": checks}
    report["wall_s"] = time.perf_counter() - t_start
    report["summary"] = summarize(checks, args.size)
    report["all_ok"] = all(c["status"] in ("ok", "skipped") for c in checks.values()) and all(
        r["met"] is not False for r in report["summary"])
    (args.outdir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(report)
    (args.outdir / "gpu_check.md").write_text(md)
    print(md)
    print(f"wrote {args.outdir / 'gpu_check.json'} and gpu_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
