"""The "cycle" routing mode (LoRA Switch, a training-free baseline of the ablation runner): at sampler step k of
a sampling run, expert k mod N alone has gate 1 (times the band), switched hard, no EMA.

Oracles: the gates are computed by hand (sigmas of the "simple" flow schedule by formula, the band's three
levels by comparison); one step's model output is compared with ComfyUI's own LoRA loader applying the base
and that step's expert; the Gate Override node and Load LoRA-MoE are run in process as ComfyUI runs them.
"""
from __future__ import annotations

import pytest
import torch

import pack_fixtures
import wan_fixtures as wf
from comfy_extras.nodes_model_advanced import ModelSamplingSD3
from moe_core.band import ALWAYS_ON, DEFAULT_BAND
from moe_core.patch import apply_lora_moe, gate_trace
from moe_core.routing import cycle_route, rule_route
from moe_core.schedule import flow_sigmas, gates_vs_steps
from moe_fixtures import comfy_lora_reference, random_moe, set_parts

NAMES = ["Scissors", "Hook/Electrocautery", "Suction", "Other"]


def hand_sigma(i: int, steps: int, shift: float) -> float:
    u = 1.0 - i / steps
    return shift * u / (1.0 + (shift - 1.0) * u)


def hand_band(t: float) -> float:
    """The seeds' default band: off below 0.2, half up to 0.6, full from 0.6."""
    return 0.0 if t < 0.2 else 0.5 if t < 0.6 else 1.0


def hand_cycle(step: int, t: float, n: int = 4) -> list[float]:
    return [hand_band(t) if e == step % n else 0.0 for e in range(n)]


def test_cycle_gates_per_step_match_a_hand_computation():
    steps, shift = 10, 3.0
    sigmas = flow_sigmas(steps, shift)
    for i in range(steps):
        assert sigmas[i] == pytest.approx(hand_sigma(i, steps, shift), abs=1e-6)
    trace = gates_vs_steps(cycle_route(), NAMES, DEFAULT_BAND, sigmas, ema_beta=0.9)
    got = [s.gates for s in trace]
    want = [hand_cycle(i, hand_sigma(i, steps, shift)) for i in range(steps)]
    assert got == [pytest.approx(w, abs=1e-6) for w in want]
    # by hand: t = 1, .964, .923, .875, .818, .75, .667, .563, .429, .25 -> band 1 x7, 0.5 x3
    assert [max(g) for g in got] == [1.0] * 7 + [0.5] * 3
    assert [g.index(max(g)) for g in got] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert all(s.raw == s.ema for s in trace), "no EMA: the switch is hard"
    # a second sampler call (the low-noise KSamplerAdvanced of an A14B split) starts its own cycle
    split = gates_vs_steps(cycle_route(), NAMES, ALWAYS_ON, sigmas, restart_at=[6])
    assert [s.gates.index(1.0) for s in split] == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3]


def test_cycle_describes_itself_and_averages_against_t():
    from moe_core.routing import raw_gates

    routing = cycle_route(base=rule_route("剪刀剪开组织"))
    assert routing.mode == "cycle" and routing.weights == {} and routing.detected == ("Scissors",)
    assert "one expert per sampler step" in routing.describe()
    assert raw_gates(routing, NAMES, 0.7, None).tolist() == [0.25] * 4, "against t: the mean over a cycle"


def test_cycle_in_comfyui_sampler_and_one_step_against_comfy_lora_loader(tiny_wan, wan_contexts, tmp_path):
    moe = random_moe(seed=4)
    shift1 = ModelSamplingSD3().patch(tiny_wan, shift=1.0)[0]
    patched = apply_lora_moe(shift1, moe, routing=cycle_route(), band=DEFAULT_BAND, ema_beta=0.9)
    steps = 8  # 1000 / 8 sigmas apart: t = 1 - i/8 exactly on ComfyUI's table
    wf.sample(patched, *wan_contexts, seed=2, steps=steps, scheduler="simple")
    trace = gate_trace(patched)
    assert [e["step"] for e in trace] == list(range(steps))
    for e in trace:  # shift 1: t = 1 - i/steps
        t = 1.0 - e["step"] / steps
        assert e["sigma"] == pytest.approx(t, abs=1e-4)
        assert e["gates"] == pytest.approx(hand_cycle(e["step"], t), abs=1e-6)
        for rows in e["rows"]:
            assert all(row == pytest.approx(hand_cycle(e["step"], t), abs=1e-6) for row in rows["gates"])
    assert [max(e["gates"]) for e in trace] == [1.0] * 4 + [0.5] * 3 + [0.0], "t = .125 is below the band"

    # One model call at step 5 of a 6-step schedule: expert 5 mod 4 = 1 (Hook/Electrocautery) alone, band 1,
    # equal to ComfyUI's loader with the base at 0.8 and that expert at 1.0.
    on = apply_lora_moe(tiny_wan, moe, routing=cycle_route(), band=ALWAYS_ON, alpha_base=0.8)
    parts = set_parts(moe)
    ref = comfy_lora_reference(tiny_wan, [(parts["base"], 0.8), (parts["Hook/Electrocautery"], 1.0)], tmp_path)
    pos, _ = wan_contexts
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    schedule = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0])
    sigma = schedule[5:6]

    def apply(model):
        import comfy.model_management as mm

        mm.load_models_gpu([model])
        opts = {**model.model_options["transformer_options"], "cond_or_uncond": [0], "sigmas": sigma,
                "sample_sigmas": schedule, "wrappers": model.wrappers}
        with torch.no_grad():
            return model.model.apply_model(x, sigma, c_crossattn=pos, transformer_options=opts)

    ours = apply(on)
    assert gate_trace(on)[-1]["step"] == 5 and gate_trace(on)[-1]["gates"] == [0.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(ours, apply(ref), atol=2e-5, rtol=0)


def test_gate_override_node_cycles_the_files_experts(tmp_path):
    pack = pack_fixtures.import_pack()
    N = pack.nodes
    from wlm_pack.nodes.gate_override import CYCLE

    routed = N.PromptInstrumentRouter.execute(prompt="电凝钩切割组织", mode="rule-based", top_k=2,
                                              temperature=1.0).args[0]
    out = N.GateOverride.execute(instrument=CYCLE, scissors=0.0, hook_electrocautery=0.0, suction=0.0, other=0.0,
                                 routing=routed)
    value = out.args[0]
    assert value.routing.mode == "cycle" and "one expert per sampler step" in out.args[1]
    # all-zero weights are fine: they are not used when cycling
    assert N.GateOverride.validate_inputs(instrument=CYCLE) is True
    # Load LoRA-MoE keeps the cycle for a file with other expert names (no prompt routing by its vocabulary)
    moe = pack_fixtures.tiny_a14b_moe(expert_names=["A", "B", "C"])
    from wlm_pack.moe_core.checkpoint import load_lora_moe

    path = pack_fixtures.write_moe(moe, tmp_path / "three.safetensors")
    resolved = value.resolve(load_lora_moe(path))
    assert resolved.mode == "cycle" and resolved.weights == {}
