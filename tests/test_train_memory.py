"""Memory: the start-up estimate counts what ComfyUI actually loads and what the trainer trains; offloaded DiTs
wait in host memory as their file's memory-mapped pages, and deactivating one copies nothing back."""
from __future__ import annotations

import pytest
import torch

import train_fixtures as tf
import wan_fixtures as wf
from training.memory import activation_bytes, estimate_memory, fits, read_dit_header
from training.models import DiTSet, load_dit
from training.stage1 import memory_plan, setup_stage1

QUIET = lambda *_: None  # noqa: E731
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tf.Workspace:
    return tf.make_workspace(tmp_path_factory.mktemp("mem_ws"))


def _param_bytes(mp) -> int:
    return sum(p.numel() * p.element_size() for p in mp.model.diffusion_model.parameters())


def test_estimate_counts_the_loaded_weights_and_the_trained_parameters(ws, tmp_path):
    info = read_dit_header(ws.dit)
    assert (info.dim, info.ffn_dim, info.num_layers) == (128, 256, tf.LAYERS)
    assert info.stored_bytes("default", cuda=False) == _param_bytes(load_dit(ws.dit))
    assert info.stored_bytes("fp8_e4m3fn", cuda=False) == _param_bytes(load_dit(ws.dit, "fp8_e4m3fn"))
    scaled = tmp_path / "scaled.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in wf.scaled_fp8_state_dict(
        wf.tiny_wan_state_dict(0, num_layers=tf.LAYERS)).items()}, str(scaled))
    # (ComfyUI adds float32 scale parameters the file lacks: a few bytes per layer)
    assert read_dit_header(scaled).stored_bytes("default", cuda=False) == pytest.approx(_param_bytes(load_dit(scaled)),
                                                                                         rel=0.02)

    lines = []
    cfg = tf.stage1_config(ws, tmp_path / "run", pair=True)
    setup = setup_stage1(cfg, log_fn=lines.append)
    assert any(x.startswith("memory needed (estimate): GPU") for x in lines), lines
    est, offload = memory_plan(cfg, CPU, QUIET)
    assert not offload  # nothing to offload to on a CPU run
    assert est.trainable_params == sum(p.numel() for p in setup.trainer.params)
    largest = max(setup.trainer.dataset[i]["latent"][0].numel() // 4 for i in range(len(setup.trainer.dataset)))
    assert largest <= est.tokens <= 1.3 * largest  # tokens from data.max_frames and data.target_area


def test_a14b_estimates_and_the_auto_offload_decision():
    """At A14B size (dims as ComfyUI's detection reads them; an estimate, not a measurement): "auto" keeps a bf16
    pair resident on a 141 GB card but offloads one on an 80 GB card, where an fp8 pair stays resident."""
    from training.memory import DiTFileInfo

    def a14b(dtype: str, weight_dtype: str = "BF16") -> DiTFileInfo:
        tensors = {}
        for b in range(40):
            for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                      "cross_attn.v", "cross_attn.o"):
                tensors[f"blocks.{b}.{m}.weight"] = (dtype, (5120, 5120))
            tensors[f"blocks.{b}.ffn.0.weight"] = (dtype, (13824, 5120))
            tensors[f"blocks.{b}.ffn.2.weight"] = (dtype, (5120, 13824))
        tensors["head.modulation"] = (weight_dtype, (1, 2, 5120))
        return DiTFileInfo(None, 0, tensors, 5120, 13824, 40)

    tokens = 21 * 30 * 52  # 81 frames at 480x832
    common = dict(cuda=True, stream_blocks=0, trainable_params=9_000_000, tokens=tokens, first_adapted=32,
                  checkpointing=True, compute_bytes=2, batch_size=1)
    bf16 = [a14b("BF16"), a14b("BF16")]
    fp8 = [a14b("F8_E4M3"), a14b("F8_E4M3")]
    gib = 2 ** 30
    resident = estimate_memory(bf16, weight_dtype="default", offload_idle=False, **common)
    offloaded = estimate_memory(bf16, weight_dtype="default", offload_idle=True, **common)
    assert resident.gpu_parts["DiT weights"] == 2 * offloaded.gpu_parts["DiT weights"] > 50 * gib
    assert not fits(resident, 80 * gib) and fits(offloaded, 80 * gib) and fits(resident, 141 * gib)
    fp8_resident = estimate_memory(fp8, weight_dtype="default", offload_idle=False, **common)
    assert fits(fp8_resident, 80 * gib) and fp8_resident.gpu_parts["DiT weights"] < 30 * gib
    # activations: each checkpointed block keeps its float32 input, one block is recomputed at a time
    assert resident.gpu_parts["activations"] == activation_bytes(tokens, 5120, 13824, 8, True, 2)
    assert activation_bytes(tokens, 5120, 13824, 8, False, 2) > 3 * resident.gpu_parts["activations"]


def test_offloaded_dits_are_file_backed_and_deactivation_copies_nothing(ws):
    """On the CPU nothing really moves, but a placement on ``cpu:0`` runs the offloading bookkeeping: host copies
    are kept on activation and put back on deactivation (the same tensors: no copy)."""
    from moe_core.targets import default_targets
    from training.adapters import AdapterBank
    from training.models import Placement, TrainableDiT

    mp = load_dit(ws.dit)
    dm = mp.model.diffusion_model
    before = {n: p.detach().clone() for n, p in dm.named_parameters()}
    tg = default_targets(tf.LAYERS)
    bank = AdapterBank.fresh_base({n: dm.get_submodule(n) for n in tg}, tg, 1.0, seed=0, num_experts=4)
    dit = TrainableDiT("high_noise", mp, bank, (0.875, 1.0), Placement(torch.device("cpu", 0), CPU))
    backed = dit.back_with_file(ws.dit)
    assert backed == sum(p.numel() * p.element_size() for p in dm.parameters())  # every weight: same dtype as file
    assert all(torch.equal(p, before[n]) for n, p in dm.named_parameters())
    host = {n: p.data.data_ptr() for n, p in dm.named_parameters()}
    pair = DiTSet([dit])
    pair.activate(dit)
    assert pair.moves == 1 and len(dit._host) == len(host)
    dit.deactivate()
    assert {n: p.data.data_ptr() for n, p in dm.named_parameters()} == host and not dit._host
    dit.release()
