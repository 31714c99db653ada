"""Per-step cost of a LoRA-MoE patched WAN DiT over the unpatched one, side by side in one run.

    python bench/bench_step_overhead.py            # CPU default size, well under a minute
    python bench/bench_step_overhead.py --a14b     # WAN 2.2 A14B dims on a GPU (dim 5120, 40 heads,
                                                   # FFN 13824, 40 blocks, 32760 tokens = 480p x 81 frames)
    python bench/bench_step_overhead.py --a14b --compile inductor --variants plain,fused --json out.json
                                                   # each variant through ComfyUI's TorchCompileModel wrapper

Three variants share one model and are timed interleaved (A B C A B C ...), each "step" a CFG batch of 2
through ComfyUI's `apply_model` at a new noise level, so the gates change every step:
  plain  - the model as ComfyUI runs it,
  fused  - base + 4 experts through moe_core's fused forward (two matmuls per projection),
  naive  - the same adapters as one module per adapter (two matmuls per adapter, summed).
Ratios are medians over steps. Weights are random: only time matters here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moe_core.comfy_runtime import ensure_comfy  # noqa: E402

ensure_comfy()

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402

from moe_core.band import ALWAYS_ON  # noqa: E402
from moe_core.checkpoint import Adapter, AdapterSet, LoraMoE, ProjectionAdapters  # noqa: E402
from moe_core.patch import KEY, LoraMoEForward, MoERuntime, apply_lora_moe  # noqa: E402
from moe_core.routing import rule_route  # noqa: E402
from moe_core.targets import default_targets, linear_shape  # noqa: E402
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES  # noqa: E402


def build_model(dim: int, ffn: int, layers: int, device: torch.device, dtype: torch.dtype):
    """A WAN 2.1-class DiT built by ComfyUI's own model classes, with random weights on `device`."""
    cfg = {"image_model": "wan2.1", "model_type": "t2v", "dim": dim, "out_dim": 16, "num_heads": dim // 128,
           "ffn_dim": ffn, "num_layers": layers, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
           "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16}
    mc = comfy.supported_models.WAN21_T2V(cfg)
    mc.set_inference_dtype(dtype, None)
    base = mc.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in base.diffusion_model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02))
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def build_moe(layers: int, dim: int, ffn: int) -> LoraMoE:
    g = torch.Generator().manual_seed(1)
    mods = {}
    for m, r in default_targets(layers).items():
        fin, fout = linear_shape(m, dim, ffn)
        mk = lambda: Adapter(torch.randn(r, fin, generator=g) * 0.01, torch.randn(fout, r, generator=g) * 0.01, r)
        mods[m] = ProjectionAdapters(fin, fout, mk(), [mk() for _ in DEFAULT_EXPERT_NAMES])
    return LoraMoE(list(DEFAULT_EXPERT_NAMES), {"default": AdapterSet("default", mods)})


class NaiveForward(LoraMoEForward):
    """One module per adapter: y + Σ_slots gain · up(down(x)) · alpha/r, computed slot by slot."""

    def __init__(self, layer, runtime, index, layout_id, adapters):
        super().__init__(layer, runtime, index, layout_id)
        self.adapters = adapters  # [(slot, down, up, scale)]

    def __call__(self, x, *args, **kwargs):
        y = self._class_forward(self._layer(), x, *args, **kwargs)
        gains = self.runtime.gains
        for slot, down, up, scale in self.adapters:
            h = torch.nn.functional.linear(x, down.to(x.dtype))
            g = (gains[:, slot] * scale).reshape(-1, *([1] * (x.ndim - 1)))
            y = y + torch.nn.functional.linear(h, up.to(x.dtype)) * g
        return y


class NaiveRuntime(MoERuntime):
    def begin(self, x, timestep, transformer_options):
        super().begin(x, timestep, transformer_options)
        sigmas = transformer_options["sigmas"]
        self.gains = self.controller.gains(sigmas.repeat(x.shape[0] // sigmas.numel()),
                                           transformer_options.get("cond_or_uncond")).to(x.device, x.dtype)


def make_naive(fused_model, moe: LoraMoE, device):
    """The fused clone with each forward swapped for the one-module-per-adapter version."""
    m = fused_model.clone()
    info = m.get_attachment(KEY)
    rt = NaiveRuntime(info.weights, info.runtime.controller)
    aset = moe.sets["default"]
    for i, module in enumerate(info.weights.modules):
        proj = aset.modules[module]
        ads = [(s, a.down.to(device), a.up.to(device), a.scale) for s, a in enumerate([proj.base, *proj.experts])
               if a is not None]
        layer = m.get_model_object(f"diffusion_model.{module}")
        m.add_object_patch(f"diffusion_model.{module}.forward", NaiveForward(layer, rt, i, 0, ads))
    from comfy.patcher_extension import WrappersMP
    m.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, rt.diffusion_model_wrapper)
    return m


def step(model, x, ctx, sigma: float, load: bool = True):
    if load:  # the timed loop loads before starting the clock
        comfy.model_management.load_models_gpu([model])
    s = torch.tensor([sigma], device=x.device)
    opts = {**model.model_options["transformer_options"], "cond_or_uncond": [1, 0], "sigmas": s,
            "wrappers": model.wrappers}
    with torch.no_grad():
        return model.model.apply_model(x, s.repeat(2), c_crossattn=ctx, transformer_options=opts)


def _compiled_graphs() -> int:
    """Graphs torch.compile has produced so far in this process (more during timed steps = recompiles)."""
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark, prints the medians and returns them (``--json`` also writes them to a file)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a14b", action="store_true", help="A14B dims (needs a GPU with ~40 GB free)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--frames", type=int, default=5, help="latent frames")
    ap.add_argument("--height", type=int, default=16, help="latent height")
    ap.add_argument("--width", type=int, default=16, help="latent width")
    ap.add_argument("--text-tokens", type=int, default=512, help="text context length (UMT5 pads to 512)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (compiles, if any)")
    ap.add_argument("--variants", default="plain,fused,naive", help="comma-separated subset of plain,fused,naive")
    ap.add_argument("--compile", default=None, metavar="BACKEND",
                    help="torch.compile each variant as ComfyUI's TorchCompileModel node does (inductor; eager "
                         "traces without code generation)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.a14b:
        args.dim, args.ffn, args.layers, args.frames, args.height, args.width = 5120, 13824, 40, 21, 60, 104
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "plain" not in names or not set(names) <= {"plain", "fused", "naive"}:
        ap.error(f"--variants {args.variants!r}: a subset of plain,fused,naive that includes plain")
    device = comfy.model_management.get_torch_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {device} ({device_name}), {dtype}, "
          f"dim {args.dim}, ffn {args.ffn}, {args.layers} blocks, {tokens} tokens, CFG batch 2"
          f"{f', torch.compile {args.compile}' if args.compile else ''}")
    plain = build_model(args.dim, args.ffn, args.layers, device, dtype)
    moe = build_moe(args.layers, args.dim, args.ffn)
    routing = rule_route("电凝钩切割组织。吸引吸血。", temperature=2.0)
    fused = apply_lora_moe(plain, moe, routing=routing, band=ALWAYS_ON, ema_beta=0.5)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 16, args.frames, args.height, args.width, generator=gen, device=device)
    ctx = torch.randn(2, args.text_tokens, 4096, generator=gen, device=device, dtype=dtype)
    variants = {"plain": plain, "fused": fused}
    if "naive" in names:
        variants["naive"] = make_naive(fused, moe, device)
    variants = {k: variants[k] for k in names if k in variants}
    if args.compile:
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        torch._dynamo.reset()
        for k, m in list(variants.items()):
            variants[k] = m.clone()
            set_torch_compile_wrapper(variants[k], backend=args.compile)
    times: dict[str, list[float]] = {k: [] for k in variants}
    first_call: dict[str, float] = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for w in range(max(1, args.warmup)):  # warm-up, interleaved as timed: loads, casts, kernels, compilation
        for k, m in variants.items():
            comfy.model_management.load_models_gpu([m])
            sync()
            t0 = time.perf_counter()
            step(m, x, ctx, 0.99 - 0.01 * w, load=False)
            sync()
            first_call.setdefault(k, time.perf_counter() - t0)
    graphs_before = _compiled_graphs() if args.compile else 0
    for i in range(args.steps):
        sigma = 0.95 - 0.9 * i / max(1, args.steps - 1)
        for k, m in variants.items():
            comfy.model_management.load_models_gpu([m])
            sync()
            t0 = time.perf_counter()
            step(m, x, ctx, sigma, load=False)
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    adapter_mb = fused.get_attachment(KEY).weights.nbytes() / 2**20
    print("median step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items())
          + f"; adapters {adapter_mb:.1f} MiB")
    overhead = {k: 100 * (med[k] / med["plain"] - 1) for k in med if k != "plain"}
    print("   ".join(f"overhead {k}/plain: {v:+.2f}%" for k, v in overhead.items())
          + (f"   fused/naive: {med['fused'] / med['naive']:.3f}" if {"fused", "naive"} <= set(med) else ""))
    result = {"device": device_name, "dtype": str(dtype).replace("torch.", ""), "dim": args.dim, "ffn": args.ffn,
              "layers": args.layers, "tokens": tokens, "latent": [args.frames, args.height, args.width],
              "text_tokens": args.text_tokens,
              "cfg_batch": 2, "steps": args.steps, "warmup": args.warmup, "compile": args.compile,
              "median_s": med, "first_call_s": first_call, "overhead_pct": overhead, "adapters_mib": adapter_mb,
              "recompiles_in_timed_steps": _compiled_graphs() - graphs_before if args.compile else None,
              "gates_change_every_step": True}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory {result['peak_gib']:.1f} GiB")
    if args.compile:
        print(f"graphs compiled during the timed steps: {result['recompiles_in_timed_steps']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
