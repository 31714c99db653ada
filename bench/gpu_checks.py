"""The sub-checks of ``bench/gpu_check.sh``: each returns a dict of figures, at A14B size or at a small size.

* ``overhead``: ``bench_step_overhead.main`` (plain vs fused LoRA-MoE, CFG batch 2, gates change every step),
  eager or through ComfyUI's torch.compile wrapper;
* ``train``: ``bench_train_step.main --mode fused`` (this trainer's step on one DiT), with fp8 weights and
  stage 2 when asked: options the benchmark offers are used as they are (``--stage``, an ``fp8`` dtype);
  fp8 weights otherwise come from building its model through ComfyUI with a float8 weight dtype;
* ``lowvram``: a patched model, loaded through ComfyUI's UNETLoader path, run fully loaded, partially loaded
  (about half the weights resident) and with every weight streamed; outputs must equal the full load's and
  the adapters must move with the model;
* ``load_patch``: write an A14B-size LoRA-MoE (both DiTs' sets), then time reading it and patching both DiTs.

Only ``gpu_check.py`` calls these; it has made ComfyUI importable first.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

SIZES: dict[str, dict] = {
    # one WAN 2.2 A14B DiT, 480x832 x 81 frames (latent 21x60x104 = 32760 tokens), UMT5's 512 text tokens
    "a14b": dict(dim=5120, ffn=13824, layers=40, frames=21, height=60, width=104, text_tokens=512,
                 overhead_steps=3, overhead_warmup=1, train_steps=2, train_warmup=1, compile_backend="inductor",
                 lowvram_layers=2, lowvram_latent=(5, 30, 52)),
    # the same code paths on a CPU in well under a minute
    "small": dict(dim=128, ffn=256, layers=2, frames=3, height=8, width=8, text_tokens=16,
                  overhead_steps=2, overhead_warmup=1, train_steps=1, train_warmup=1, compile_backend="eager",
                  lowvram_layers=3, lowvram_latent=(3, 8, 8)),
}
PROMPT = "电凝钩切割组织。吸引吸血。"  # two instruments: two experts on, the others off


def _device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _captured(fn, *args):
    """fn(*args) with its stdout captured (and echoed to stderr for the log); returns (result, text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(*args)
    text = buf.getvalue()
    sys.stderr.write(text)
    return result, text


# ------------------------------------------------------------------------------------------- overhead

def overhead(size: str, compile_backend: str | None = None) -> dict:
    """Median step of the plain and the LoRA-MoE patched DiT; ``compile_backend`` compiles both."""
    import bench_step_overhead

    sz = SIZES[size]
    # compiling: a second interleaved warm-up round, as the first call after switching variants can compile
    warmup = sz["overhead_warmup"] + (1 if compile_backend else 0)
    argv = ["--steps", str(sz["overhead_steps"]), "--warmup", str(warmup),
            "--variants", "plain,fused", "--text-tokens", str(sz["text_tokens"])]
    if size == "a14b":
        argv.append("--a14b")
    else:
        argv += ["--dim", str(sz["dim"]), "--ffn", str(sz["ffn"]), "--layers", str(sz["layers"]),
                 "--frames", str(sz["frames"]), "--height", str(sz["height"]), "--width", str(sz["width"])]
    if compile_backend:
        argv += ["--compile", compile_backend]
    result, _ = _captured(bench_step_overhead.main, argv)
    result["argv"] = argv
    return result


# ---------------------------------------------------------------------------------------------- train

def train_bench_options() -> dict:
    """What ``bench_train_step.py`` offers, read from its ``--help``: an fp8 dtype."""
    import bench_train_step

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        bench_train_step.main(["--help"])
    text = buf.getvalue()
    dtypes = re.search(r"--dtype\s+\{([^}]*)\}", text)
    fp8 = next((c.strip() for c in (dtypes.group(1).split(",") if dtypes else []) if c.strip().startswith("fp8")),
               None)
    return {"fp8_dtype": fp8}


@contextlib.contextmanager
def _fp8_weights(module):
    """Build the benchmark's model with float8 weights (ComfyUI then computes in bf16/fp32 by manual cast,
    as for ``model.weight_dtype = "fp8_e4m3fn"`` in training)."""
    original = module.build_model

    def build_fp8(args, device, dtype, *rest, **kwargs):
        return original(args, device, torch.float8_e4m3fn, *rest, **kwargs)

    module.build_model = build_fp8
    try:
        yield
    finally:
        module.build_model = original


def train(size: str, stage: int = 1, fp8: bool = False) -> dict:
    """One DiT's training step (this trainer: fused adapters + checkpointing) and its peak memory."""
    import bench_train_step

    sz = SIZES[size]
    options = train_bench_options()
    cuda = torch.cuda.is_available()
    dtype = "bf16" if cuda else "fp32"
    argv = ["--mode", "fused", "--steps", str(sz["train_steps"]), "--warmup", str(sz["train_warmup"]),
            "--device", "cuda" if cuda else "cpu"]
    if size == "a14b":
        argv += ["--preset", "a14b"]
    else:
        argv += ["--dim", str(sz["dim"]), "--layers", str(sz["layers"]), "--ffn", str(sz["ffn"]),
                 "--frames", str(sz["frames"]), "--height", str(sz["height"]), "--width", str(sz["width"]),
                 "--tokens", str(sz["text_tokens"])]
    argv += ["--stage", str(stage)]
    fp8_via = None
    if fp8 and options["fp8_dtype"]:
        argv += ["--dtype", options["fp8_dtype"]]
        fp8_via = "bench_train_step --dtype"
    else:
        argv += ["--dtype", dtype]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with _fp8_weights(bench_train_step) if fp8 and fp8_via is None else contextlib.nullcontext():
        fp8_via = fp8_via or ("float8_e4m3fn weights through ComfyUI's model config" if fp8 else None)
        code, text = _captured(bench_train_step.main, argv)
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("{")]
    if code not in (0, None) or not lines:
        raise RuntimeError(f"bench_train_step {' '.join(argv)} exited {code} without a result")
    result = json.loads(lines[-1])
    if result.get("oom"):
        raise MemoryError(f"out of memory: bench_train_step {' '.join(argv)}")
    result.update(stage=stage, weights="float8_e4m3fn" if fp8 else dtype, compute_dtype=dtype, fp8_via=fp8_via,
                  argv=argv)
    # total peak while training (resident weights included): the figure stage 2 is held to
    result["peak_total_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    return result


# --------------------------------------------------------------------------------------------- lowvram

def _lowvram_modules(model) -> int:
    """Layers that ComfyUI casts per forward (weights streamed or cast): the lowvram-loaded ones."""
    return sum(1 for m in model.model.diffusion_model.modules() if getattr(m, "comfy_cast_weights", False))


def _adapter_placement(patched) -> list[str]:
    """Where the adapter tensors are: ComfyUI moves them (``model_patches_to``) as it loads the model."""
    from moe_core.patch import KEY

    weights = patched.get_attachment(KEY).weights
    return sorted({f"{t.device.type}:{str(t.dtype).replace('torch.', '')}" for pair in weights._ab for t in pair})


def lowvram(size: str) -> dict:
    """Full load vs ComfyUI's partial (lowvram) load of a LoRA-MoE patched DiT: same output, adapters follow."""
    import comfy.model_management as mm
    import comfy.sd

    from bench_step_overhead import build_moe, step
    from moe_core.band import DEFAULT_BAND
    from moe_core.patch import apply_lora_moe
    from moe_core.routing import rule_route
    from training.demo import build_random_wan_dit

    sz = SIZES[size]
    layers, dim, ffn = sz["lowvram_layers"], sz["dim"], sz["ffn"]
    device = _device()
    options = {"dtype": torch.bfloat16} if device.type == "cuda" else {}
    t0 = time.perf_counter()
    base = comfy.sd.load_diffusion_model_state_dict(  # what the UNETLoader node runs
        build_random_wan_dit(num_layers=layers, dim=dim, ffn_dim=ffn, seed=0), model_options=options)
    build_s = time.perf_counter() - t0
    patched = apply_lora_moe(base, build_moe(layers, dim, ffn), routing=rule_route(PROMPT), band=DEFAULT_BAND,
                             ema_beta=0.5)
    controller = patched.get_attachment("wan_lora_moe").runtime.controller
    dtype = base.model_dtype()
    gen = torch.Generator().manual_seed(0)
    frames, height, width = sz["lowvram_latent"]
    x = torch.randn(2, 16, frames, height, width, generator=gen).to(device)
    ctx = torch.randn(2, sz["text_tokens"], 4096, generator=gen).to(device, dtype)
    sigmas = (0.9, 0.4, 0.1)  # band factors 1, 0.5, 0: the gates change at every step
    size_bytes = patched.model_size()

    def load(budget: float | None) -> dict:
        mm.unload_all_models()
        if budget is None:
            mm.load_models_gpu([patched], force_full_load=True)
        else:  # what load_models_gpu does when the free memory holds only `budget` bytes of weights
            loaded = mm.LoadedModel(patched)
            loaded.model_load(budget)
            mm.current_loaded_models.insert(0, loaded)
        return {"budget_mib": None if budget is None else budget / 2 ** 20,
                "lowvram": bool(patched.model.model_lowvram), "streamed_modules": _lowvram_modules(patched),
                "resident_mib": patched.model.model_loaded_weight_memory / 2 ** 20,
                "adapters": _adapter_placement(patched)}

    def run(model) -> torch.Tensor:
        controller.reset()
        with torch.no_grad():
            out = torch.stack([step(model, x, ctx, s, load=False).float() for s in sigmas]).cpu()
        _sync()
        return out

    states = {"full": load(None)}
    full = run(patched)
    noise = float((run(patched) - full).abs().max())  # run to run, same load: GPU kernels may vary
    states["partial"] = load(0.5 * size_bytes)
    partial = run(patched)
    states["streamed"] = load(0.1)  # ComfyUI's --novram budget: every weight streamed
    streamed = run(patched)
    mm.unload_all_models()
    after_unload = _adapter_placement(patched)
    mm.load_models_gpu([base], force_full_load=True)
    plain = run(base)
    mm.unload_all_models()
    effect = float((full - plain).abs().max())
    diffs = {k: float((v - full).abs().max()) for k, v in (("partial", partial), ("streamed", streamed))}
    expected = f"{device.type}:{str(dtype).replace('torch.', '')}"
    offload = f"{patched.offload_device.type}:{str(dtype).replace('torch.', '')}"
    checks = {
        "partial_is_partial": states["partial"]["lowvram"] and 0 < states["partial"]["streamed_modules"]
        and states["partial"]["resident_mib"] > 0,
        "streamed_is_lowvram": states["streamed"]["lowvram"]
        and states["streamed"]["streamed_modules"] >= states["partial"]["streamed_modules"],
        "full_is_full": not states["full"]["lowvram"],
        "adapters_follow_load": all(s["adapters"] == [expected] for s in states.values()),
        "adapters_follow_unload": after_unload == [offload],
        "adapters_change_output": effect > 0,
        # equal to the full load: bit-equal expected; the ceiling is the larger of twice the run-to-run
        # difference and 1% of the adapters' own effect (dropped adapters would differ by all of it)
        "outputs_equal": all(d <= max(2 * noise, 0.01 * effect) for d in diffs.values()),
        "finite": bool(torch.isfinite(full).all()),
    }
    return {"layers": layers, "dim": dim, "ffn": ffn, "tokens": frames * (height // 2) * (width // 2),
            "dtype": str(dtype).replace("torch.", ""), "model_mib": size_bytes / 2 ** 20, "build_s": build_s,
            "sigmas": list(sigmas), "states": states, "adapters_after_unload": after_unload,
            "max_abs_diff": diffs, "bit_equal": {k: d == 0.0 for k, d in diffs.items()},
            "run_to_run_max_abs_diff": noise,
            "adapter_effect_max_abs": effect, "checks": checks, "passed": all(checks.values())}


# ------------------------------------------------------------------------------------------ load + patch

def _meta_wan(dim: int, ffn: int, layers: int):
    """A WAN DiT of these dims as ComfyUI builds it, on the meta device: patching reads only module shapes."""
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"image_model": "wan2.1", "model_type": "t2v", "dim": dim, "out_dim": 16, "num_heads": dim // 128,
           "ffn_dim": ffn, "num_layers": layers, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
           "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16}
    config = comfy.supported_models.WAN21_T2V(cfg)
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device=_device(), offload_device=torch.device("cpu"))


def _drop_from_page_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's cached pages, so the next read comes from the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def load_patch(size: str, workdir: Path) -> dict:
    """Read a two-set (A14B) LoRA-MoE file and patch both DiTs, as the Load LoRA-MoE nodes do."""
    from bench_step_overhead import build_moe
    from moe_core.checkpoint import A14B_BOUNDARY, AdapterSet, LoraMoE, load_lora_moe, save_lora_moe
    from moe_core.patch import KEY, apply_lora_moe
    from moe_core.routing import rule_route
    from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

    sz = SIZES[size]
    dim, ffn, layers = sz["dim"], sz["ffn"], sz["layers"]
    moe = LoraMoE(list(DEFAULT_EXPERT_NAMES), {
        "high_noise": AdapterSet("high_noise", build_moe(layers, dim, ffn).sets["default"].modules,
                                 sigma_range=(A14B_BOUNDARY, 1.0)),
        "low_noise": AdapterSet("low_noise", build_moe(layers, dim, ffn).sets["default"].modules,
                                sigma_range=(0.0, A14B_BOUNDARY))})
    path = Path(workdir) / f"lora_moe_{size}_two_sets.safetensors"
    save_lora_moe(moe, path)  # float32, as the trainer writes
    del moe
    high, low = _meta_wan(dim, ffn, layers), _meta_wan(dim, ffn, layers)
    routing = rule_route(PROMPT)
    dropped = _drop_from_page_cache(path)

    t0 = time.perf_counter()
    loaded = load_lora_moe(path)
    t1 = time.perf_counter()
    patched = [apply_lora_moe(high, loaded, adapter_set="high_noise", routing=routing),
               apply_lora_moe(low, loaded, adapter_set="low_noise", routing=routing)]
    t2 = time.perf_counter()
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for p in patched:  # what ComfyUI's model_patches_to does when it loads each DiT
        p.get_attachment(KEY).weights.to(device).to(dtype)
    _sync()
    t3 = time.perf_counter()
    warm0 = time.perf_counter()
    load_lora_moe(path)
    warm_s = time.perf_counter() - warm0
    n_params = sum(a.down.numel() + a.up.numel() for s in loaded.sets.values() for p in s.modules.values()
                   for a in [p.base, *p.experts] if a is not None)
    result = {"dims": {"dim": dim, "ffn": ffn, "layers": layers}, "file_mib": path.stat().st_size / 2 ** 20,
              "sets": sorted(loaded.sets), "modules_per_set": {k: len(s.modules) for k, s in loaded.sets.items()},
              "adapter_params": n_params, "page_cache_dropped": dropped,
              "load_s": t1 - t0, "load_warm_s": warm_s, "patch_both_s": t2 - t1, "load_patch_s": t2 - t0,
              "adapters_to_device_s": t3 - t2, "device": device.type, "path": path.name}
    path.unlink()
    return result
