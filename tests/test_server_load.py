"""Serving under load and faults, on a real ComfyUI server (loopback, the session's shared server, tiny models):

- a queue of 30 prompts alternating LoRA-MoE files (one assembled by ``moe_core.assemble --dit``), gates,
  bands and plain runs: every output written, each latent bit-equal to the same prompt run alone (in reverse
  order, so that each run follows another prompt than in the queue), the server's resident memory flat;
- ``POST /interrupt`` in the middle of a patched sampling run: the next plain run is bit-identical to a run on
  a copy of the DiT the pack never touched, and the next patched run equals the one before the interrupt;
- two LoRA-MoE files on clones of one loaded DiT in one graph, and one file twice with different gates: each
  branch equals that branch run alone, and all differ;
- a LoRA-MoE file replaced on disk while the server runs: the same prompt then uses the new file; a
  half-copied file is refused at validation, naming it as listed, and the completed copy runs as a whole.

Outputs are latents (``SaveLatent``), compared bit for bit: ComfyUI's CPU sampling is deterministic here
(see test_server_e2e.test_no_model_is_left_patched). Figures go to test-artifacts/server_load.json.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch

import server_harness as H
from moe_core import assemble
from moe_core.targets import default_targets
from moe_fixtures import random_adapters
from moe_core.lora_formats import save_lora

SUB = "load_test"  # this module's files, in a subfolder of models/lora_moe (removed at the end)
PROMPT = "电凝钩切割组织。吸引吸血。"
STEPS = 2
FIGURES: dict[str, object] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = H.shared_server()
    folder = s.base / "models" / "lora_moe" / SUB
    folder.mkdir(exist_ok=True)
    dits = s.base / "models" / "diffusion_models"
    shutil.copyfile(dits / H.TINY_HIGH, dits / f"{SUB}_pristine.safetensors")  # never given to the pack
    # Two LoRA-MoE files built with the documented CLI from plain LoRAs (random, blocks 2-9 of the tiny DiT):
    # with the DiT files (so 'auto' works) and without them.
    parts = tmp_path_factory.mktemp("loras")
    args = []
    for i, set_name in enumerate(("high_noise", "low_noise")):
        for j, part in enumerate(("base", "Scissors", "Suction")):
            path = save_lora(random_adapters(default_targets(10), 50 + 10 * i + j, scale=0.08),
                             parts / f"{set_name}_{part}.safetensors")
            args += ["--base", f"{set_name}:{path}"] if part == "base" else ["--expert", f"{set_name}:{part}={path}"]
    dit_args = ["--dit", f"high_noise:{dits / H.TINY_HIGH}", "--dit", f"low_noise:{dits / H.TINY_LOW}"]
    assert assemble.main(args + dit_args + ["--out", str(folder / "assembled.safetensors")]) == 0
    assert assemble.main(args + ["--out", str(folder / "assembled_bare.safetensors")]) == 0
    yield s
    shutil.rmtree(folder, ignore_errors=True)
    (dits / f"{SUB}_pristine.safetensors").unlink(missing_ok=True)
    H.ARTIFACTS.mkdir(exist_ok=True)
    (H.ARTIFACTS / "server_load.json").write_text(json.dumps(FIGURES, indent=1))
    H.release_shared_server()


# --------------------------------------------------------------------------------------------- prompts

def graph(prefix: str, seed: int, *, lora_moe: str | None = None, adapter_set: str = "auto", router: str | None = None,
          gate: str | None = None, band: tuple | None = None, uncond: str = "same", unet: str = H.TINY_HIGH,
          steps: int = STEPS, branch: str = "") -> dict:
    """An API prompt: UNETLoader -> [Load LoRA-MoE (+ Router / Gate Override) -> [Timestep Band]] -> KSampler
    -> SaveLatent, on a 32x32, 5-frame latent. `branch` prefixes the node ids (to merge several into one graph)."""
    b = branch
    p = {f"{b}unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
         f"{b}pos": {"class_type": H.FIXTURE_ENCODER, "inputs": {"text": PROMPT}},
         f"{b}neg": {"class_type": H.FIXTURE_ENCODER, "inputs": {"text": "blurry"}},
         f"{b}latent": {"class_type": "EmptyHunyuanLatentVideo",
                        "inputs": {"width": 32, "height": 32, "length": 5, "batch_size": 1}}}
    model = [f"{b}unet", 0]
    if lora_moe is not None:
        load = {"model": model, "lora_moe": lora_moe, "adapter_set": adapter_set, "alpha_base": 0.7,
                "alpha_expert": 1.0, "uncond": uncond}
        if router is not None:
            p[f"{b}router"] = {"class_type": "WanLoRAMoE_PromptRouter",
                               "inputs": {"prompt": PROMPT, "mode": router, "top_k": 2, "temperature": 1.0}}
            load["routing"] = [f"{b}router", 0]
        if gate is not None:
            weights = {k: 0.0 for k in ("scissors", "hook_electrocautery", "suction", "other")}
            p[f"{b}gate"] = {"class_type": "WanLoRAMoE_GateOverride", "inputs": dict(weights, instrument=gate)}
            load["routing"] = [f"{b}gate", 0]
        p[f"{b}load"] = {"class_type": "WanLoRAMoE_LoadLoRAMoE", "inputs": load}
        model = [f"{b}load", 0]
        if band is not None:
            preset, *values = band
            start, mid, mid_factor, end = values or (0.2, 0.6, 0.5, 1.0)
            p[f"{b}band"] = {"class_type": "WanLoRAMoE_TimestepBand",
                             "inputs": {"model": model, "preset": preset, "start": start, "mid": mid,
                                        "mid_factor": mid_factor, "end": end, "preview_steps": min(steps, 200),
                                        "preview_shift": 8.0}}
            model = [f"{b}band", 0]
    p[f"{b}ks"] = {"class_type": "KSampler",
                   "inputs": {"model": model, "seed": seed, "steps": steps, "cfg": 3.0, "sampler_name": "euler",
                              "scheduler": "simple", "positive": [f"{b}pos", 0], "negative": [f"{b}neg", 0],
                              "latent_image": [f"{b}latent", 0], "denoise": 1.0}}
    p[f"{b}save"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{b}ks", 0],
                                                            "filename_prefix": f"{SUB}/{prefix}"}}
    return p


def latent(server, entry: dict, save: str = "save") -> torch.Tensor:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], ensure_ascii=False)[:2000]
    item = entry["outputs"][save]["latents"][0]
    path = server.base / "output" / item.get("subfolder", "") / item["filename"]
    assert path.is_file(), path
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def with_prefix(prompt: dict, prefix: str) -> dict:
    p = json.loads(json.dumps(prompt))
    for node in p.values():
        if node["class_type"] == "SaveLatent":
            node["inputs"]["filename_prefix"] = f"{SUB}/{prefix}{node['inputs']['filename_prefix'][len(SUB) + 1:]}"
    return p


def rss_mib(server) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def cached_nodes(entry: dict) -> list[str]:
    return next((m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"), [])


# ------------------------------------------------------------------------------------------- the queue

CONFIGS = [  # what alternates in the queue (seeds differ per prompt, so that nothing comes from the cache)
    dict(),  # plain: no LoRA-MoE
    dict(lora_moe=H.TINY_MOE, router="rule-based"),
    dict(lora_moe=f"{SUB}/assembled.safetensors", gate="Scissors"),
    dict(lora_moe=H.TINY_SINGLE, router="rule-based", band=("three-level", 0.3, 0.5, 0.25, 0.95)),
    dict(lora_moe=H.TINY_MOE, router="learned-from-file"),
    dict(lora_moe=f"{SUB}/assembled.safetensors", router="rule-based", uncond="off"),
    dict(),
    dict(lora_moe=H.TINY_MOE, gate="Suction", adapter_set="high-noise", band=("seeds default",)),
]


def test_a_long_queue_matches_each_prompt_run_alone_in_flat_memory(server):
    prompts = [graph(f"q{i:02d}", 1000 + i, **CONFIGS[i % len(CONFIGS)]) for i in range(30)]
    rss = [rss_mib(server)]
    t0 = time.monotonic()
    ids = []
    for p in prompts:  # all queued at once
        status, body = server.post_prompt(p)
        assert status == 200, body
        ids.append(body["prompt_id"])
    queued = []
    for pid in ids:
        queued.append(latent(server, server.wait(pid)))
        rss.append(rss_mib(server))
    FIGURES["queue_prompts"] = len(prompts)
    FIGURES["queue_s"] = round(time.monotonic() - t0, 2)
    # rss[8]: after the first 8 prompts, which loaded every model and file once.
    FIGURES["queue_rss_mib"] = {"before": round(rss[0], 1), "after_8": round(rss[8], 1),
                                "peak": round(max(rss), 1), "end": round(rss[-1], 1)}
    print(f"\nserver RSS over the queue: before {rss[0]:.1f} MiB, after 8 prompts {rss[8]:.1f}, "
          f"peak {max(rss):.1f}, end {rss[-1]:.1f}")
    latent(server, server.run(graph("flush", 999)))  # nothing of the last queued prompt stays cached
    for i in reversed(range(len(prompts))):  # each alone, after another prompt than in the queue
        entry = server.run(with_prefix(prompts[i], "alone_"))
        assert "ks" not in cached_nodes(entry), f"prompt {i} was served from the cache"
        alone = latent(server, entry)
        assert torch.equal(alone, queued[i]), f"prompt {i} ({CONFIGS[i % len(CONFIGS)]}) differs in the queue"
    # The LoRA-MoE runs differ from the plain ones, and the configurations from each other.
    distinct = {tuple(q.flatten()[:64].tolist()) for q in queued[:len(CONFIGS)]}
    assert len(distinct) == len(CONFIGS)
    rss.append(rss_mib(server))
    FIGURES["queue_rss_mib"]["after_alone_runs"] = round(rss[-1], 1)
    # Flat: after the first 8 queued prompts, 22 more and 31 other runs add less than 32 MiB (a patched clone
    # or a file leaked per prompt would add at least its adapters, about 1.5 MB, each time).
    assert rss[-1] - rss[8] < 32, FIGURES["queue_rss_mib"]


# --------------------------------------------------------------------------------------------- interrupt

async def _run_and_interrupt(server, prompt: dict, after_steps: int) -> tuple[str, int]:
    """Queue `prompt`, POST /interrupt once its KSampler reported `after_steps` steps (websocket progress)."""
    import aiohttp

    client = f"wlm-load-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client}) as r:
                body = await r.json()
                assert r.status == 200, body
            pid = body["prompt_id"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=60)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                d = data.get("data", {})
                if data["type"] == "progress" and d.get("prompt_id") == pid and d.get("node") == "ks" \
                        and d["value"] >= after_steps:
                    async with session.post(f"{server.url}/interrupt", json={}) as r:
                        assert r.status == 200
                    return pid, int(d["value"])
    raise AssertionError("the sampler never reported progress")


def test_interrupt_in_a_patched_run_leaves_the_model_clean(server):
    patched = graph("int_patched", 7, lora_moe=H.TINY_MOE, router="learned-from-file", band=("always on",))
    before = latent(server, server.run(patched))
    long = graph("int_long", 8, lora_moe=H.TINY_MOE, router="learned-from-file", band=("always on",), steps=2000)
    pid, at_step = asyncio.run(_run_and_interrupt(server, long, after_steps=5))
    entry = server.wait(pid)
    assert entry["status"]["status_str"] == "error"
    interrupted = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_id"] == "ks", entry["status"]
    assert 5 <= at_step < 2000
    FIGURES["interrupted_at_step"] = at_step
    plain = latent(server, server.run(graph("int_plain", 9)))
    pristine = latent(server, server.run(graph("int_pristine", 9, unet=f"{SUB}_pristine.safetensors")))
    assert torch.equal(plain, pristine), "the DiT kept something of the interrupted LoRA-MoE run"
    again = server.run(with_prefix(patched, "again_"))
    assert "ks" not in cached_nodes(again)
    assert torch.equal(latent(server, again), before), "the patched run after the interrupt differs"
    assert not torch.equal(before, plain)


# ---------------------------------------------------------------------------------- clones in one graph

def test_clones_of_one_dit_in_one_graph_keep_their_own_adapters_and_gates(server):
    branches = {  # branch: (file, gate or router)
        "a_": dict(lora_moe=H.TINY_MOE, router="rule-based"),
        "b_": dict(lora_moe=f"{SUB}/assembled.safetensors", router="rule-based"),
        "c_": dict(lora_moe=H.TINY_MOE, gate="Scissors"),
        "d_": dict(lora_moe=H.TINY_MOE, gate="Suction"),
    }
    together = {}
    for b, cfg in branches.items():
        together.update(graph("together", 21, branch=b, **cfg))
    for b in branches:  # one DiT for all: every branch patches a clone of the same loaded model
        together[f"{b}load"]["inputs"]["model"] = ["a_unet", 0]
    for b in list(branches)[1:]:
        del together[f"{b}unet"]
    entry = server.run(together)
    outs = {b: latent(server, entry, f"{b}save") for b in branches}
    latent(server, server.run(graph("flush", 998)))  # so that no branch alone comes from the cache
    for b, cfg in branches.items():
        alone_entry = server.run(graph("alone_branch", 21, branch=b, **cfg))
        assert f"{b}ks" not in cached_nodes(alone_entry)
        alone = latent(server, alone_entry, f"{b}save")
        assert torch.equal(outs[b], alone), f"branch {b} ({cfg}) differs from the same branch alone"
    texts = {b: entry["outputs"][f"{b}load"]["text"][0] for b in branches}
    assert "Hook/Electrocautery 0.50" in texts["a_"] and "Scissors 1.00" in texts["c_"], texts
    for x, y in itertools.combinations(branches, 2):
        assert not torch.equal(outs[x], outs[y]), f"branches {x} and {y} gave the same latent"


def test_auto_picks_each_dit_set_of_an_assembled_file(server):
    """`moe_core.assemble --dit`: 'auto' picks the high-noise set on the high-noise DiT and the low-noise set on
    the low-noise DiT, in one graph; without --dit, validation says what to do, once, on lora_moe."""
    name = f"{SUB}/assembled.safetensors"
    both = dict(graph("auto_pair", 3, lora_moe=name, gate="Scissors", branch="h_"),
                **graph("auto_pair", 3, lora_moe=name, gate="Scissors", branch="l_", unet=H.TINY_LOW))
    entry = server.run(both)
    assert f"{name} [high-noise]" in entry["outputs"]["h_load"]["text"][0]
    assert f"{name} [low-noise]" in entry["outputs"]["l_load"]["text"][0]
    status, body = server.post_prompt(graph("bare", 3, lora_moe=f"{SUB}/assembled_bare.safetensors", gate="Scissors"))
    assert status == 400
    errors = body["node_errors"]["load"]["errors"]
    assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == "lora_moe", errors
    assert f"{SUB}/assembled_bare.safetensors holds high-noise and low-noise adapter sets but does not record which " \
           "DiT each belongs to, so adapter_set 'auto' cannot choose" in errors[0]["details"]
    assert server.run(graph("bare_by_hand", 3, lora_moe=f"{SUB}/assembled_bare.safetensors", gate="Scissors",
                            adapter_set="high-noise"))["status"]["status_str"] == "success"


# ------------------------------------------------------------------------------------- files on disk

def test_a_file_replaced_while_the_server_runs(server):
    folder = server.base / "models" / "lora_moe" / SUB
    swap, name = folder / "swap.safetensors", f"{SUB}/swap.safetensors"
    first = (server.base / "models" / "lora_moe" / H.TINY_MOE).read_bytes()
    second = (folder / "assembled.safetensors").read_bytes()

    def put(data: bytes, atomic: bool = True) -> None:
        if atomic:  # as the trainer and moe_core write: a temporary file renamed over the old one
            tmp = folder / ".swap.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, swap)
        else:  # a copy in progress
            swap.write_bytes(data)

    def run(prefix: str, lora_moe: str = name) -> dict:
        return server.run(graph(prefix, 31, lora_moe=lora_moe, gate="Hook/Electrocautery"))

    put(first)
    expected_first = latent(server, run("swap_ref1", H.TINY_MOE))
    expected_second = latent(server, run("swap_ref2", f"{SUB}/assembled.safetensors"))
    assert torch.equal(latent(server, run("swap_1")), expected_first)
    put(second)  # the same prompt again: the node must not be served from ComfyUI's cache nor the pack's
    assert torch.equal(latent(server, run("swap_2")), expected_second)
    put(first[: len(first) * 2 // 3], atomic=False)  # half copied
    status, body = server.post_prompt(graph("swap_3", 31, lora_moe=name, gate="Hook/Electrocautery"))
    assert status == 400, body
    errors = body["node_errors"]["load"]["errors"]
    assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == "lora_moe", errors
    assert f"{name}: not a readable safetensors file (truncated, corrupt or another format)" in errors[0]["details"]
    assert str(server.base) not in json.dumps(body)
    put(first, atomic=False)  # the copy completes
    assert torch.equal(latent(server, run("swap_4")), expected_first)
    swap.unlink()
