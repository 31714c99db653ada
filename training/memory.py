"""How much GPU and host memory a configured run needs, estimated before anything big is loaded.

The trainer prints this at start (and decides ``model.offload_idle_dit = "auto"`` with it). The parts:

* **DiT weights** from the files' safetensors headers (no tensor is read): every tensor's size at the dtype
  ComfyUI stores it in (``model.weight_dtype``; "default" keeps an fp8 file in fp8 and stores others in 16 bits
  on a GPU, 32 on the CPU; the patch embedding and fp8 scales stay float32). Blocks streamed from host
  memory (``model.stream_blocks``) are not on the GPU.
* **Adapters and AdamW**: 16 bytes per trainable parameter (float32 weights, gradients and two moments).
* **Activations** of one micro-batch of the largest bucket, ``L`` video tokens (latent frames x height/2 x
  width/2), width ``D``, FFN width ``F``, ``n`` blocks from the first adapted one on: with gradient
  checkpointing, each of the ``n`` blocks keeps its float32 input (``4·L·D`` bytes) and one block at a time is
  recomputed with autograd (about ``L·(40·D + 4·F)`` bytes in 16-bit compute); without checkpointing all ``n``
  keep theirs. An estimate: attention kernels, allocator fragmentation and ComfyUI's own buffers add some.
* A fixed allowance for the CUDA context and workspaces.

Host memory, per process: a DiT is loaded into host memory (one at a time, and under ``torchrun`` one process
of a machine at a time) and then either moved to the GPU or, if it is the idle DiT of an offloaded pair, kept
there; when its weights are stored as in the file, they are the file's memory-mapped pages, shared by every
process of the machine. Encoding the cache (first process only) loads the VAE and the text encoder.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

GIB = 2 ** 30
CUDA_OVERHEAD = int(1.5 * GIB)  # CUDA context, cuBLAS/attention workspaces
HOST_BASELINE = int(3 * GIB)  # Python, torch, ComfyUI imported
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_WEIGHT_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8_e4m3fn": 1, "fp8_e5m2": 1}


@dataclass
class DiTFileInfo:
    """What a DiT file's header says: tensor shapes and dtypes, and the WAN dimensions."""

    path: Path
    file_bytes: int
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # key -> (dtype, shape)
    dim: int
    ffn_dim: int
    num_layers: int

    @property
    def family(self) -> str:
        """The WAN 2.2 family (``moe_core.families``) from the patch embedding's input and the head's output
        channels: ``t2v`` (16/16), ``i2v`` (36/16) or ``ti2v`` (48/48, the 5B model: dim 3072, 30 blocks)."""
        from moe_core.families import family_from_dims

        from .model_files import wan_dit_layout

        layout = wan_dit_layout({k: shape for k, (_, shape) in self.tensors.items()})
        if layout is None or not layout.in_channels:
            return "t2v"
        return family_from_dims(layout.in_channels, layout.out_channels, str(self.path)).name

    def _sizes(self, weight_dtype: str, cuda: bool):
        """(key, elements, bytes per element in the file, bytes per element once loaded) per tensor."""
        fp8_file = any(d.startswith("F8") for d, _ in self.tensors.values())
        for key, (dtype, shape) in self.tensors.items():
            if key == "scaled_fp8":
                continue  # a marker, not a weight
            in_file = _DTYPE_BYTES.get(dtype, 4)
            if key.startswith("patch_embedding.") or key.endswith((".scale_weight", ".scale_input")):
                size = 4  # WAN builds its patch embedding in float32; fp8 scales are float32
            elif weight_dtype != "default":
                size = _WEIGHT_DTYPE_BYTES[weight_dtype]  # ComfyUI stores every other tensor in that dtype
            elif fp8_file:
                size = 1  # ComfyUI picks the file's fp8 as the model's dtype
            else:
                size = 2 if cuda else 4
            yield key, _numel(shape), in_file, size

    def stored_bytes(self, weight_dtype: str, cuda: bool, skip_blocks: int = 0) -> int:
        """Bytes of the weights once loaded, leaving out the first ``skip_blocks`` blocks."""
        return sum(n * size for key, n, _, size in self._sizes(weight_dtype, cuda)
                   if (_block_index(key) if _block_index(key) is not None else skip_blocks) >= skip_blocks)

    def file_backed_bytes(self, weight_dtype: str, cuda: bool) -> int:
        """Bytes of the loaded weights stored as in the file: those an offloaded DiT keeps as the file's
        memory-mapped pages (:meth:`training.models.TrainableDiT.back_with_file`)."""
        return sum(n * size for _, n, in_file, size in self._sizes(weight_dtype, cuda) if size == in_file)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _block_index(key: str) -> int | None:
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "blocks" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def read_dit_header(path: str | os.PathLike) -> DiTFileInfo:
    """Shapes and dtypes from a safetensors header (8 bytes of length, then JSON): nothing else is read."""
    path = Path(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    tensors = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    mod = next((s for k, (d, s) in tensors.items() if k.endswith("head.modulation")), None)
    ffn = next((s for k, (d, s) in tensors.items() if k.endswith("blocks.0.ffn.0.weight")), None)
    layers = {b for b in (_block_index(k) for k in tensors) if b is not None}
    if mod is None or ffn is None:
        raise ValueError(f"{path}: no head.modulation / blocks.0.ffn.0.weight: not a WAN DiT")
    return DiTFileInfo(path, path.stat().st_size, tensors, int(mod[-1]), int(ffn[0]), len(layers))


@dataclass
class MemoryEstimate:
    """Bytes per part; ``gpu`` and ``host`` are the totals (host: per process, plus ``shared_host``)."""

    gpu_parts: dict[str, int] = field(default_factory=dict)
    host_parts: dict[str, int] = field(default_factory=dict)
    shared_host: int = 0
    resident_pair: bool = False
    trainable_params: int = 0
    tokens: int = 0

    @property
    def gpu(self) -> int:
        return sum(self.gpu_parts.values())

    @property
    def host(self) -> int:
        return sum(self.host_parts.values())

    def format(self) -> str:
        gpu = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.gpu_parts.items() if v)
        host = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.host_parts.items() if v)
        shared = (f"; plus {self.shared_host / GIB:.1f} GiB of memory-mapped DiT file pages, shared by this "
                  "machine's processes" if self.shared_host else "")
        return (f"memory needed (estimate): GPU {self.gpu / GIB:.1f} GiB ({gpu}); host RAM per process "
                f"{self.host / GIB:.1f} GiB at peak ({host}){shared}")


def activation_bytes(tokens: int, dim: int, ffn_dim: int, blocks_with_grad: int, checkpointing: bool,
                     compute_bytes: int = 2, batch_size: int = 1) -> int:
    """Activation memory of one micro-batch (see the module docstring for the model)."""
    one_block = tokens * (40 * dim + 4 * ffn_dim) * compute_bytes // 2
    if checkpointing:
        per_sample = blocks_with_grad * tokens * dim * 4 + one_block
    else:
        per_sample = blocks_with_grad * one_block
    return batch_size * per_sample


def estimate_memory(dits: Sequence[DiTFileInfo], *, weight_dtype: str, cuda: bool, offload_idle: bool,
                    stream_blocks: int, trainable_params: int, tokens: int, first_adapted: int,
                    checkpointing: bool, compute_bytes: int, batch_size: int,
                    encoder_bytes: int = 0) -> MemoryEstimate:
    """The estimate for DiTs ``dits`` (one, or an A14B pair) trained as configured."""
    est = MemoryEstimate(trainable_params=trainable_params, tokens=tokens)
    on_gpu = [d.stored_bytes(weight_dtype, cuda, skip_blocks=stream_blocks) for d in dits]
    pair = len(dits) > 1
    est.resident_pair = pair and not offload_idle
    if cuda:
        est.gpu_parts["DiT weights"] = sum(on_gpu) if not (pair and offload_idle) else max(on_gpu)
    est.gpu_parts["adapters + AdamW"] = 16 * trainable_params
    info = dits[0]
    est.gpu_parts["activations"] = activation_bytes(tokens, info.dim, info.ffn_dim, info.num_layers - first_adapted,
                                                    checkpointing, compute_bytes, batch_size)
    if cuda:
        est.gpu_parts["CUDA context"] = CUDA_OVERHEAD
    full = [d.stored_bytes(weight_dtype, cuda) for d in dits]
    est.host_parts["baseline"] = HOST_BASELINE
    if not cuda:  # a CPU run: everything is host memory
        est.host_parts["DiT weights"] = sum(full)
        est.host_parts["adapters + AdamW + activations"] = (est.gpu_parts.pop("adapters + AdamW")
                                                            + est.gpu_parts.pop("activations"))
        est.gpu_parts = {}
        return est
    private = max(full)  # a DiT is loaded into host memory, then moved to the GPU or kept as the idle one
    if pair and offload_idle:  # loaded in turn; each kept private but for its file-backed part
        backed = [d.file_backed_bytes(weight_dtype, cuda) for d in dits]
        est.shared_host = sum(backed)
        private = max(size + sum(f - b for f, b in zip(full[:i], backed[:i])) for i, size in enumerate(full))
        private = max(private, sum(full) - sum(backed))
    # models in host memory: the DiT(s) above, or the VAE and text encoder while caching (which comes first)
    est.host_parts["models"] = max(private, encoder_bytes)
    if stream_blocks:
        est.host_parts["streamed blocks (pinned)"] = sum(f - g for f, g in zip(full, on_gpu))
    return est


def fits(est: MemoryEstimate, total_gpu: int, margin: float = 0.8) -> bool:
    """Whether the estimate fits the GPU with room to spare (allocator fragmentation, kernels' workspaces and the
    estimate's own error): ``model.offload_idle_dit = "auto"`` keeps both DiTs resident only then."""
    return est.gpu <= margin * total_gpu


__all__ = ["DiTFileInfo", "MemoryEstimate", "activation_bytes", "estimate_memory", "fits", "read_dit_header"]
