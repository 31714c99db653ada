"""Training-step benchmark: this trainer's step vs a plain full-autograd LoRA step on the same WAN DiT.

    python bench/bench_train_step.py                 # CPU, small model (default)
    python bench/bench_train_step.py --preset a14b   # WAN 2.2 A14B dims (one DiT), 480x832x81, on a GPU
    python bench/bench_train_step.py --preset ti2v5b # WAN 2.2 TI2V 5B dims, 1280x704x121 (48 channels), on a GPU
    python bench/bench_train_step.py --dim 1024 --layers 12 --frames 5 --height 16 --width 16 --steps 5

Both modes train the same adapters (the seeds' targets: last 8 blocks' self/cross-attention q,k,v,o with
ranks 8/4/4/4 and ffn.0 of the last 3 blocks, rank 4) on the same randomly initialised WAN DiT, built through
ComfyUI's model classes (``model_config.get_model``) and wrapped in a ``ModelPatcher``:

* ``fused``: this trainer (``training.models.TrainableDiT``): ``moe_core``'s fused LoRA-MoE forward as object
  patches, frozen front blocks under ``no_grad``, gradient checkpointing on the adapted blocks;
* ``plain``: a conventional LoRA: a forward hook on each target Linear adds ``up(down(x)) * scale``, the
  model runs under ordinary autograd without checkpointing.

A step is forward + flow-matching MSE + backward + AdamW. Each mode runs in a fresh subprocess; the table
gives the median step time and the peak memory *added* by training steps (GPU: ``max_memory_allocated``
above the loaded model; CPU: peak resident memory sampled every millisecond, above the loaded model), beside
``training.memory``'s estimate of it (what the trainer prints at start).

``--policies`` reports what the A14B DiT schedules (``model.dit_schedule``) cost when the idle DiT waits in
host memory: DiT switches per optimizer step, counted by simulating the trainer's own choices
(``training.dit_schedule.simulate_switches``, checked against real runs by the tests), the bytes each switch
copies to the GPU (the DiT's size at these dims), and, on a GPU, the measured time of one switch
(``TrainableDiT.activate`` from host memory; ``deactivate`` restores host copies and copies nothing back), so
the swap time per step of each policy::

    python bench/bench_train_step.py --policies                 # CPU: switches and bytes per step (small dims)
    python bench/bench_train_step.py --preset a14b --policies   # GPU: plus the measured switch time at A14B size
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = {"fused": "this trainer (fused + checkpointing)", "fused_nockpt": "fused forward, no checkpointing",
         "plain": "plain LoRA hooks, full autograd",
         "stage2": "stage 2: frozen base + 4 experts + router"}

PRESETS = {
    # dims: DiT width, blocks, FFN width; latent frames/height/width; text tokens; latent channels (in = out)
    "cpu": dict(dim=256, layers=10, ffn=1024, frames=5, height=32, width=32, tokens=64, dtype="fp32", channels=16),
    "a14b": dict(dim=5120, layers=40, ffn=13824, frames=21, height=60, width=104, tokens=512, dtype="bf16",
                 channels=16),
    # the 5B model: WAN 2.2 VAE (48 channels, 16x), 121 frames -> 31 latent frames, 704x1280 -> 44x80
    "ti2v5b": dict(dim=3072, layers=30, ffn=14336, frames=31, height=44, width=80, tokens=512, dtype="bf16",
                   channels=48),
}
GPU_PRESETS = ("a14b", "ti2v5b")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process's resident memory every millisecond while active."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build_model(args, device, dtype, init: bool = True):
    """A random WAN t2v DiT of the given dims through ComfyUI's model config + ModelPatcher (no state dict)."""
    import torch

    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    c = args.channels  # 16 (T2V A14B) or 48 (TI2V 5B, detected by ComfyUI as WAN22)
    fake = {"head.modulation": meta(1, 2, args.dim), "head.head.weight": meta(c * 4, args.dim),
            "blocks.0.ffn.0.weight": meta(args.ffn, args.dim), "patch_embedding.weight": meta(args.dim, c, 1, 2, 2)}
    for i in range(args.layers):
        fake[f"blocks.{i}.norm3.weight"] = meta(args.dim)
    config = comfy.model_detection.model_config_from_unet(fake, "")
    manual = comfy.model_management.unet_manual_cast(dtype, device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual)
    model = config.get_model(fake, "", device=device)
    if not init:
        return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(p.dtype))
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def targets(num_layers: int) -> dict[str, int]:
    from moe_core.targets import default_targets

    return default_targets(num_layers)


def run_mode(args) -> dict:
    from moe_core.comfy_runtime import ensure_comfy

    ensure_comfy(cpu=args.device == "cpu")
    import torch

    from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
    from training.adapters import AdapterBank
    from training.models import Placement, TrainableDiT
    from training.objective import noisy_input

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = device.type == "cuda"
    mp = build_model(args, device, dtype)
    dm = mp.model.diffusion_model
    mp.model.requires_grad_(False)
    tg = targets(args.layers)
    linears = {n: dm.get_submodule(n) for n in tg}
    n_experts = len(DEFAULT_EXPERT_NAMES)
    bank = AdapterBank.fresh_base(linears, tg, 1.0, seed=0, num_experts=n_experts)
    with torch.no_grad():  # non-zero up so both paths do real work (fresh LoRAs start at up = 0)
        g = torch.Generator().manual_seed(1)
        for p in bank.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    bank.to(device)
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, args.channels, args.frames, args.height, args.width, generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    ctx = torch.randn(1, args.tokens, 4096, generator=gen).to(device)
    t = torch.tensor([0.6], device=device)
    x_t, target = noisy_input(x0, noise, t)

    if args.mode == "stage2" or (args.mode == "fused" and args.stage == 2):
        forward, params = _stage2_step(dm, mp, bank, linears, tg, n_experts, device, x_t, t, ctx, target, autocast)
    elif args.mode in ("fused", "fused_nockpt"):
        dit = TrainableDiT("default", mp, bank, (0.0, 1.0), Placement(device, device),
                           gradient_checkpointing=args.mode == "fused")
        dit.activate()
        params = bank.trainable_parameters()
        gains = torch.zeros(1, 1 + n_experts)
        gains[:, 0] = 1.0

        def forward():
            with dit.adapters(gains):
                loss = (dit.predict(x_t, t, ctx, autocast) - target).pow(2).mean()
                loss.backward()
            return loss
    else:
        params = []
        hooks = []
        for i, name in enumerate(bank.names):
            slot = bank.projections[i].slot(0)
            down, up, scale = slot.down, slot.up, slot.alpha / slot.rank
            params += [down, up]

            def hook(module, inputs, output, down=down, up=up, scale=scale):
                x = inputs[0]
                return output + torch.nn.functional.linear(torch.nn.functional.linear(x, down.to(x.dtype)),
                                                           up.to(x.dtype)) * scale

            hooks.append(linears[name].register_forward_hook(hook))
        compute = mp.model.manual_cast_dtype or mp.model.get_dtype()

        def forward():
            ctx_manager = torch.autocast(device.type, dtype=autocast) if autocast else torch.enable_grad()
            with ctx_manager:
                out = dm(x_t.to(compute), t.float() * 1000, ctx.to(compute))
            loss = (out.float() - target).pow(2).mean()
            loss.backward()
            return loss

    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = forward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    times = []
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
        mon = PeakRSS().__enter__()
    # the first steps warm up kernels and create the optimizer state; their peak counts (it is the real one)
    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        mon.__exit__(None, None, None)
        peak = max(0, mon.peak - base)
    return {"mode": args.mode, "median_s": statistics.median(times), "min_s": min(times),
            "peak_added_mib": peak / 2 ** 20, "model_mib": base / 2 ** 20, "first_loss": first_loss,
            "trainable": sum(p.numel() for p in params), "tokens": args.frames * (args.height // 2) * (args.width // 2)}


def _stage2_step(dm, mp, bank, linears, tg, n_experts, device, x_t, t, ctx, target, autocast):
    """Stage 2's step on the same model and batch: the stage-1 bank's base frozen (buffers), 4 trainable experts
    (non-zero up: real work), a learned router; gates through ``moe_core.gating`` with gradients, flow loss +
    KL to the teacher + the step-level routing surrogate, as ``training.stage2_loop`` computes them."""
    import torch

    from moe_core.band import DEFAULT_BAND
    from moe_core.gating import GateSettings
    from moe_core.routing import teacher_distribution
    from training.adapters import AdapterBank, ProjectionSlots, Slot
    from training.models import Placement, TrainableDiT
    from training.moe_losses import kl_to_teacher
    from training.stage2_loop import GateSpec
    from training.stage2_router import new_router

    g = torch.Generator().manual_seed(3)
    names, projs = [], []
    for i, name in enumerate(bank.names):
        base = bank.projections[i].slot(0)
        lin = linears[name]
        slots = [Slot(base.down.cpu(), base.up.cpu(), base.alpha, trainable=False)]
        for _ in range(n_experts):
            s = Slot.new(lin.in_features, lin.out_features, tg[name], 1.0, g)
            with torch.no_grad():
                s.up.copy_(torch.randn(s.up.shape, generator=g) * 0.01)
            slots.append(s)
        names.append(name)
        projs.append(ProjectionSlots(lin.in_features, lin.out_features, slots))
    bank2 = AdapterBank(names, projs, n_experts).to(device)
    dit = TrainableDiT("default", mp, bank2, (0.0, 1.0), Placement(device, device), gradient_checkpointing=True)
    dit.activate()
    router = new_router(n_experts, 64, 0, 0).to(device)
    spec = GateSpec("learned", GateSettings(top_k=2), DEFAULT_BAND, 1.0, 1.0)
    teacher = torch.nn.functional.one_hot(torch.tensor([1]), n_experts).float().to(device)
    q = teacher_distribution(teacher)
    coeff = torch.full((n_experts,), 0.01, device=device)  # the balance/entropy surrogate's coefficients

    def forward():
        routed = spec.routed(teacher, teacher, t, router)
        with dit.adapters(spec.gains(routed, t)):
            loss = (dit.predict(x_t, t, ctx, autocast) - target).pow(2).mean()
            loss = loss + kl_to_teacher(routed.probs, q).sum() + (routed.probs * coeff).sum()
            loss.backward()
        return loss

    return forward, bank2.trainable_parameters() + list(router.parameters())


def estimate_mib(args, trainable: int) -> float:
    """What ``training.memory`` (the trainer's start-up estimate) predicts for the fused mode's added peak."""
    from training.memory import activation_bytes

    tokens = args.frames * (args.height // 2) * (args.width // 2)
    first = min(int(n.split(".")[1]) for n in targets(args.layers))
    act = activation_bytes(tokens, args.dim, args.ffn, args.layers - first, True, 2 if args.dtype == "bf16" else 4)
    return (act + 16 * trainable) / 2 ** 20


# ------------------------------------------------------------------------------------- DiT schedules

POLICIES = (("per_sample", 1), ("alternate", 1), ("alternate", 10), ("proportional", 1), ("proportional", 10))


def simulated_switches(samples_per_step: int, steps: int = 2000, seed: int = 0, shift: float = 3.0,
                       boundary: float = 0.875) -> dict[tuple[str, int], float]:
    """Mean DiT switches per optimizer step of each policy, with the trainer's defaults (shift sampling)."""
    from training.dit_schedule import DiTSchedule, simulate_switches
    from training.models import a14b_ranges
    from training.objective import TimestepSampler

    ranges = a14b_ranges(boundary)
    sampler = TimestepSampler("shift", shift)
    out = {}
    for policy, every in POLICIES:
        schedule = DiTSchedule(policy, sampler, [ranges["high_noise"], ranges["low_noise"]], seed,
                               switch_every=every)
        out[policy, every] = sum(simulate_switches(schedule, samples_per_step, steps)) / steps
    return out


def dit_bytes(args, dtype) -> int:
    """Bytes of a DiT with these dims (ComfyUI's model built on the meta device: nothing is allocated)."""
    import torch

    return sum(p.numel() * p.element_size() for p in build_model(args, torch.device("meta"), dtype, init=False)
               .model.diffusion_model.parameters())


def measure_switch(args, dtype, rounds: int = 3) -> dict[str, float]:
    """On a GPU: seconds to bring an offloaded DiT to the device (``activate``), to offload it again
    (``deactivate``: host copies restored), and, for comparison, to copy it back with ``Module.to("cpu")``."""
    import torch

    from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
    from training.adapters import AdapterBank
    from training.models import Placement, TrainableDiT

    device = torch.device(args.device)
    mp = build_model(args, device, dtype)
    dm = mp.model.diffusion_model
    mp.model.requires_grad_(False)
    tg = targets(args.layers)
    bank = AdapterBank.fresh_base({n: dm.get_submodule(n) for n in tg}, tg, 1.0, seed=0,
                                  num_experts=len(DEFAULT_EXPERT_NAMES))
    dit = TrainableDiT("high_noise", mp, bank, (0.875, 1.0), Placement(device, torch.device("cpu")))
    sync = torch.cuda.synchronize
    start = time.perf_counter()
    dm.to("cpu")  # what deactivating cost before host copies were kept (and the DiT starts offloaded)
    sync()
    copy_out = time.perf_counter() - start
    probe = next(iter(dm.parameters())).detach().clone()
    act, deact = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        dit.activate()
        sync()
        act.append(time.perf_counter() - start)
        start = time.perf_counter()
        dit.deactivate()
        sync()
        deact.append(time.perf_counter() - start)
    assert torch.equal(next(iter(dm.parameters())).detach(), probe)  # weights survive the round trips
    return {"activate_s": statistics.median(act), "deactivate_s": statistics.median(deact),
            "copy_out_s": copy_out}


def policy_report(args) -> int:
    from moe_core.comfy_runtime import ensure_comfy

    ensure_comfy(cpu=args.device == "cpu")
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    per_step = args.batch * args.grad_accum
    sw = simulated_switches(per_step, steps=args.sim_steps)
    size = dit_bytes(args, dtype)
    timing = measure_switch(args, dtype) if args.device.startswith("cuda") else None
    print(f"A14B DiT schedules, idle DiT in host memory: WAN DiT dim {args.dim}, {args.layers} blocks, ffn "
          f"{args.ffn}, {args.dtype}: {size / 2 ** 30:.2f} GiB per DiT; {per_step} samples per optimizer step "
          f"(batch {args.batch} x accumulation {args.grad_accum}), shift 3, boundary 0.875; switches simulated "
          f"over {args.sim_steps} steps")
    if timing:
        print(f"one switch on {torch.cuda.get_device_name()}: activate (host -> GPU) {timing['activate_s']:.2f} s, "
              f"deactivate {timing['deactivate_s'] * 1000:.1f} ms (host copies kept; copying the DiT back with "
              f".to('cpu') took {timing['copy_out_s']:.2f} s)")
    print(f"{'policy':<26}{'switches/step':>15}{'GiB copied/step':>17}{'swap s/step':>13}")
    for (policy, every), n in sw.items():
        name = policy + (f", every {every}" if every > 1 else "")
        t = f"{n * timing['activate_s']:.2f}" if timing else "needs GPU"
        print(f"{name:<26}{n:>15.3f}{n * size / 2 ** 30:>17.2f}{t:>13}")
    print("both DiTs resident (model.offload_idle_dit = false, or auto when they fit): 0 switches")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    for k in ("dim", "layers", "ffn", "frames", "height", "width", "tokens", "channels"):
        p.add_argument(f"--{k}", type=int)
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda for a14b and ti2v5b, else cpu)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (their peak memory counts)")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs per mode, interleaved; the best median time is reported (robust to a busy machine)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--modes", default=",".join(MODES), help=f"modes to time, comma-separated ({', '.join(MODES)})")
    p.add_argument("--policies", action="store_true",
                   help="report the A14B DiT schedules' switches (and, on a GPU, swap time) per step instead")
    p.add_argument("--grad-accum", type=int, default=8, help="--policies: accumulation steps (default 8)")
    p.add_argument("--batch", type=int, default=1, help="--policies: batch size (default 1)")
    p.add_argument("--sim-steps", type=int, default=2000, help="--policies: simulated optimizer steps")
    p.add_argument("--stage", type=int, choices=[1, 2], default=1,
                   help="with --mode fused: 2 times stage 2's step (the 'stage2' mode) instead of stage 1's")
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset or "cpu"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device is None:
        args.device = "cuda" if args.preset in GPU_PRESETS else "cpu"
    if args.policies:
        return policy_report(args)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        p.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if args.mode:
        import torch

        try:
            print(json.dumps(run_mode(args)))
        except torch.OutOfMemoryError:
            print(json.dumps({"mode": args.mode, "oom": True}))
        return 0
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for _ in range(args.rounds):
        for mode in modes:
            cmd = [sys.executable, __file__, "--mode", mode] + passthrough
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return proc.returncode
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = {}
    for m, r in runs.items():
        ok = [x for x in r if not x.get("oom")]
        rows[m] = ({**ok[0], "median_s": min(x["median_s"] for x in ok),
                    "peak_added_mib": statistics.median(x["peak_added_mib"] for x in ok)} if ok else {"oom": True})
    first = next((r for r in rows.values() if not r.get("oom")), None)
    if first is None:
        print("every mode ran out of memory at this size")
        return 1
    print(f"WAN DiT dim {args.dim}, {args.layers} blocks, ffn {args.ffn}; latent {args.frames}x{args.height}x"
          f"{args.width} ({first['tokens']} tokens), {args.tokens} text tokens, {args.dtype}, {args.device}"
          f"{f', {args.threads} thread(s)' if args.threads else ''}; {first['trainable']:,} trainable parameters; "
          f"best of {args.rounds} runs x median of {args.steps} steps")
    print(f"{'mode':<44}{'step time':>12}{'peak memory added':>20}{'first loss':>14}")
    for mode, r in rows.items():
        if r.get("oom"):
            print(f"{MODES[mode]:<44}{'out of memory':>32}")
            continue
        print(f"{MODES[mode]:<44}{r['median_s'] * 1000:>10.1f}ms{r['peak_added_mib']:>16.1f} MiB"
              f"{r['first_loss']:>14.6f}")
    f, pl = rows.get("fused", {"oom": True}), rows.get("plain", {"oom": True})
    if not f.get("oom") and args.device.startswith("cuda"):  # on the CPU, RSS also holds sub-quadratic
        # attention buffers and allocator slack: no comparison there
        print(f"training.memory's estimate of the memory this trainer adds: {estimate_mib(args, f['trainable']):.1f} "
              "MiB (activations with checkpointing + adapters and AdamW state)")
    if not f.get("oom") and not pl.get("oom"):
        print(f"this trainer / plain: time {f['median_s'] / pl['median_s']:.2f}x, memory "
              f"{(f['peak_added_mib'] / pl['peak_added_mib']) if pl['peak_added_mib'] else float('nan'):.2f}x")
    s2 = rows.get("stage2", {"oom": True})
    if not f.get("oom") and not s2.get("oom"):
        total = lambda r: r["peak_added_mib"] + r.get("model_mib", 0.0)  # noqa: E731
        print(f"stage 2 / stage 1 step: time {s2['median_s'] / f['median_s']:.2f}x (target <= 1.10x), peak memory "
              f"added {s2['peak_added_mib'] / max(f['peak_added_mib'], 1e-9):.2f}x, peak memory with the model "
              f"{total(s2) / max(total(f), 1e-9):.2f}x (target <= 1.05x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
