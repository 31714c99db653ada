"""The pack's ComfyUI nodes, in process: registration, schemas, each node's execute/validate, errors, the
gate-schedule math (Python against ComfyUI's scheduler and a real sampling run, JS against Python).

The nodes are imported from the pack package (``pack_fixtures.import_pack``), exactly as ComfyUI imports a
custom node folder; they read LoRA-MoE files from a temporary ``lora_moe`` model folder registered with
ComfyUI's ``folder_paths`` for this module.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import folder_paths
import pack_fixtures
import wan_fixtures
from safetensors.torch import save_file

from moe_core.checkpoint import to_state_dict
from moe_core.lora_formats import save_lora
from moe_core.patch import model_fingerprint

REPO = pack_fixtures.REPO_ROOT
NODE_IDS = {"WanLoRAMoE_LoadLoRAMoE": "Load LoRA-MoE", "WanLoRAMoE_PromptRouter": "Prompt→Instrument Router",
            "WanLoRAMoE_GateOverride": "Gate Override", "WanLoRAMoE_TimestepBand": "Timestep Band"}
PROMPT = "电凝钩切割组织。吸引吸血。"


@pytest.fixture(scope="module")
def pack():
    return pack_fixtures.import_pack()


@pytest.fixture(scope="module")
def N(pack):
    return pack.nodes


@pytest.fixture(scope="module")
def tiny_pair(tiny_wan_state_dict):
    """State dicts of the two tiny 'A14B' DiTs (high: seed 0, low: seed 1)."""
    return tiny_wan_state_dict(0), tiny_wan_state_dict(1)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_pair, pack):
    """A temporary lora_moe + loras folder (registered with ComfyUI) and ComfyUI temp directory."""
    root = tmp_path_factory.mktemp("models")
    moe_dir, lora_dir, temp_dir = root / "lora_moe", root / "loras", root / "temp"
    for d in (moe_dir, lora_dir, temp_dir):
        d.mkdir()
    fps = {name: model_fingerprint(wan_fixtures.load_tiny_wan(sd)) for name, sd in zip(("high_noise", "low_noise"),
                                                                                          tiny_pair)}
    pack_fixtures.write_moe(pack_fixtures.tiny_a14b_moe(fps), moe_dir / "a14b.safetensors")
    pack_fixtures.write_moe(pack_fixtures.tiny_a14b_moe(None, router=False), moe_dir / "a14b_no_fp.safetensors")
    pack_fixtures.write_moe(pack_fixtures.tiny_single_moe(), moe_dir / "single.safetensors")
    (moe_dir / "sub").mkdir()
    pack_fixtures.write_moe(pack_fixtures.tiny_single_moe(), moe_dir / "sub" / "nested.safetensors")
    (moe_dir / "garbage.safetensors").write_bytes(b"\xff" * 64)
    good = (moe_dir / "a14b.safetensors").read_bytes()
    (moe_dir / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    plain = {m: p.base for m, p in pack_fixtures.tiny_single_moe().sets["default"].modules.items()}
    save_lora(plain, lora_dir / "plain_lora.safetensors")
    save_lora(plain, moe_dir / "plain_in_moe_dir.safetensors")  # listed (lora_moe folder), refused on validation
    pack_fixtures.write_moe(pack_fixtures.tiny_single_moe(), lora_dir / "moe_in_loras.safetensors")
    nan = pack_fixtures.tiny_single_moe()
    next(iter(nan.sets["default"].modules.values())).experts[0].up[0, 0] = float("nan")
    tensors, header = to_state_dict(nan)  # save_lora_moe would refuse it: a NaN is found when loaded
    save_file(tensors, str(moe_dir / "sub" / "nan.safetensors"), metadata=header)
    old_temp = folder_paths.get_temp_directory()
    folder_paths.add_model_folder_path("lora_moe", str(moe_dir))
    folder_paths.add_model_folder_path("loras", str(lora_dir))
    folder_paths.set_temp_directory(str(temp_dir))
    yield root
    folder_paths.folder_names_and_paths["lora_moe"][0].remove(str(moe_dir))
    folder_paths.folder_names_and_paths["loras"][0].remove(str(lora_dir))
    folder_paths.set_temp_directory(old_temp)
    pack.nodes.common.LORA_MOE_CACHE.clear()


def comfy_validate(N, prompt: dict, node_id: str) -> list[dict]:
    """The errors ComfyUI's own validation (``execution.validate_inputs``) gives node `node_id` of `prompt`,
    after the pack's on_prompt hook, as ``POST /prompt`` runs them. Upstream nodes count as valid."""
    import asyncio

    import execution
    import nodes

    class AnyOutput:  # stands in for whatever node feeds a linked input
        RETURN_TYPES = ("*",)

        @classmethod
        def INPUT_TYPES(cls):
            return {}

    prompt = dict(prompt)
    for node in list(prompt.values()):
        for value in node["inputs"].values():
            if isinstance(value, list) and value[0] not in prompt:
                prompt[value[0]] = {"class_type": "WLMTestAnyOutput", "inputs": {}}
    added = {c.GET_SCHEMA().node_id: c for c in N.NODES if c.GET_SCHEMA().node_id not in nodes.NODE_CLASS_MAPPINGS}
    added["WLMTestAnyOutput"] = AnyOutput
    nodes.NODE_CLASS_MAPPINGS.update(added)

    async def run():
        N.validation.remember_prompt({"prompt": prompt})
        validated = {nid: (True, [], nid) for nid in prompt if nid != node_id}
        return await execution.validate_inputs("test", prompt, node_id, validated)

    try:
        return asyncio.run(run())[1]
    finally:
        for key in added:
            del nodes.NODE_CLASS_MAPPINGS[key]


def assert_one_error(errors: list[dict], input_name: str, fragment: str) -> None:
    """Exactly one error, on `input_name`, whose text contains `fragment`."""
    assert len(errors) == 1, errors
    e = errors[0]
    assert e["extra_info"]["input_name"] == input_name and fragment in f"{e['message']}: {e['details']}", e


def _patched(N, tiny_pair):
    hi = wan_fixtures.load_tiny_wan(tiny_pair[0])
    return N.LoadLoRAMoE.execute(model=hi, lora_moe="a14b.safetensors", adapter_set="auto", alpha_base=0.7,
                                 alpha_expert=1.0).args[0]


# ----------------------------------------------------------------------------------- registration

def test_pack_loads_like_comfyui_loads_a_custom_node(tmp_path):
    """ComfyUI's loader: spec from <folder>/__init__.py under a path-like module name, then comfy_entrypoint()."""
    import asyncio
    import importlib.util

    from comfy_api.latest import ComfyExtension

    name = str(tmp_path / "custom_nodes" / pack_fixtures.PACK_DIR_NAME).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        extension = asyncio.run(module.comfy_entrypoint())
        assert isinstance(extension, ComfyExtension)
        nodes = asyncio.run(extension.get_node_list())
        assert {n.GET_SCHEMA().node_id for n in nodes} == set(NODE_IDS)
        web = REPO / module.WEB_DIRECTORY
        assert web.is_dir() and sorted(p.name for p in web.glob("*.js")) == ["schedule.js", "wan_lora_moe.js"]
        assert not hasattr(module, "NODE_CLASS_MAPPINGS"), "V1 mappings would win over comfy_entrypoint"
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_pack_survives_pytest_importing_the_repo_root(tmp_path):
    """A bare `pytest` in a checkout makes pytest import the root __init__.py (_pytest.pathlib.import_path,
    prepend mode): as a package named after the folder when that name is an identifier, else (the usual
    `ComfyUI-WanLoRAMoE`) as a plain module. Neither may fail, and as a package ComfyUI's top-level `nodes`
    must stay ComfyUI's. Run in a subprocess on symlinked checkouts, so this process stays clean."""
    package, plain = tmp_path / "wan_lora_moe_checkout", tmp_path / pack_fixtures.PACK_DIR_NAME
    for link in (package, plain):
        link.symlink_to(REPO, target_is_directory=True)
    script = f"""
import sys, asyncio
sys.path.insert(0, {str(REPO)!r})
from moe_core.comfy_runtime import ensure_comfy
ensure_comfy(cpu=True)
from _pytest.pathlib import ImportMode, import_path

def load(folder):
    return import_path(folder + "/__init__.py", mode=ImportMode.prepend, root={str(tmp_path)!r},
                       consider_namespace_packages=False)

mod = load({str(package)!r})
ext = asyncio.run(mod.comfy_entrypoint())
names = sorted(n.GET_SCHEMA().node_id for n in asyncio.run(ext.get_node_list()))
import nodes
assert hasattr(nodes, "NODE_CLASS_MAPPINGS"), nodes.__file__
print(mod.__name__, mod.WEB_DIRECTORY, ",".join(names))
# As a plain module pytest puts the checkout itself first on sys.path, where `nodes` would be this pack's
# folder: one reason tests/pytest.ini makes tests/ the rootdir.
mod = load({str(plain)!r})
print(mod.__name__, mod.WEB_DIRECTORY, hasattr(mod, "comfy_entrypoint"))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    as_package, as_module = res.stdout.strip().splitlines()[-2:]
    name, web, node_ids = as_package.split(" ")
    assert name == package.name and web == "./web" and set(node_ids.split(",")) == set(NODE_IDS)
    assert as_module.split(" ") == ["__init__", "./web", "False"]


def test_schemas(N):
    from comfy_api.latest import io

    seen = {}
    for cls in N.NODES:
        schema = cls.GET_SCHEMA()
        seen[schema.node_id] = schema.display_name
        assert schema.category == "WAN LoRA-MoE"
        assert schema.description
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{schema.node_id} output {out.display_name} has no tooltip"
        assert issubclass(cls, io.ComfyNode)
    assert seen == NODE_IDS
    load = N.LoadLoRAMoE.GET_NODE_INFO_V1()
    assert load["input_order"] == {"required": ["model", "lora_moe", "adapter_set", "alpha_base", "alpha_expert"],
                                   "optional": ["routing", "uncond"], "hidden": ["unique_id"]}
    assert load["input"]["required"]["alpha_base"][1]["default"] == 0.7
    assert load["input"]["required"]["alpha_expert"][1]["default"] == 1.0
    assert load["input"]["optional"]["routing"][0] == "LORA_MOE_ROUTING"
    router = N.PromptInstrumentRouter.GET_NODE_INFO_V1()
    assert router["output"] == ["LORA_MOE_ROUTING", "STRING"]
    assert router["input"]["required"]["prompt"][1]["multiline"] is True


# ------------------------------------------------------------------------------------------- router

def test_router_detects_instruments(N):
    out = N.PromptInstrumentRouter.execute(prompt=PROMPT, mode="rule-based", top_k=2, temperature=1.0)
    value, line = out.args
    assert value.routing.detected == ("Hook/Electrocautery", "Suction")
    assert value.routing.weights == {"Scissors": 0.0, "Hook/Electrocautery": 0.5, "Suction": 0.5, "Other": 0.0}
    assert "Hook/Electrocautery 0.50" in line and "Suction 0.50" in line
    ui = out.ui["wlm_routing"][0]
    assert ui["detected"] == ["Hook/Electrocautery", "Suction"] and ui["line"] == line
    assert out.ui["text"] == [line]


def test_router_modes_and_fallbacks(N):
    learned = N.PromptInstrumentRouter.execute(prompt="剪刀剪开", mode="learned-from-file", top_k=1, temperature=0.5)
    assert learned.args[0].routing.mode == "learned" and learned.args[0].routing.top_k == 1
    none = N.PromptInstrumentRouter.execute(prompt="腹腔镜视野", mode="rule-based", top_k=2, temperature=1.0)
    assert none.args[0].routing.weights["Other"] == 1.0 and "fallback" in none.args[1]
    off = N.PromptInstrumentRouter.execute(prompt="腹腔镜视野", mode="rule-based", top_k=2, temperature=1.0,
                                           no_instrument="off")
    assert sum(off.args[0].routing.weights.values()) == 0 and "all off" in off.args[1]
    with pytest.raises(ValueError, match="no instrument keyword"):
        N.PromptInstrumentRouter.execute(prompt="腹腔镜视野", mode="rule-based", top_k=2, temperature=1.0,
                                         no_instrument="error")
    with pytest.raises(ValueError, match="prompt is empty"):
        N.PromptInstrumentRouter.execute(prompt="  ", mode="rule-based", top_k=2, temperature=1.0)


def test_route_preview_matches_the_router(N, pack):
    body, status = pack.nodes.routes.route_preview({"prompt": PROMPT, "top_k": "2", "temperature": "1"})
    node = N.PromptInstrumentRouter.execute(prompt=PROMPT, mode="rule-based", top_k=2, temperature=1.0)
    assert status == 200 and body["line"] == node.args[1] and body["detected"] == list(node.args[0].routing.detected)
    assert pack.nodes.routes.route_preview({"prompt": PROMPT, "top_k": "zero"})[1] == 400
    assert pack.nodes.routes.route_preview({"prompt": PROMPT, "temperature": "nan"})[1] == 400
    assert pack.nodes.routes.route_preview({"prompt": "x" * 30000})[1] == 400
    assert pack.nodes.routes.route_preview({"prompt": PROMPT, "no_instrument": "../etc"})[1] == 400
    body, status = pack.nodes.routes.route_preview({"prompt": ""})
    assert status == 200 and "prompt is empty" in body["routing_error"]


# ------------------------------------------------------------------------------------- gate override

def test_gate_override(N):
    one = N.GateOverride.execute(instrument="Suction", scissors=1.0, hook_electrocautery=1.0, suction=1.0, other=1.0)
    assert one.args[0].routing.weights == {"Scissors": 0.0, "Hook/Electrocautery": 0.0, "Suction": 1.0, "Other": 0.0}
    assert one.args[0].routing.mode == "manual"
    w = N.GateOverride.execute(instrument="by weights", scissors=0.6, hook_electrocautery=0.0, suction=0.2, other=0.2)
    assert w.args[0].routing.weights == pytest.approx({"Scissors": 0.6, "Hook/Electrocautery": 0.0, "Suction": 0.2,
                                                       "Other": 0.2})
    routed = N.PromptInstrumentRouter.execute(prompt=PROMPT, mode="rule-based", top_k=2, temperature=1.0).args[0]
    over = N.GateOverride.execute(instrument="Scissors", scissors=0, hook_electrocautery=0, suction=0, other=0,
                                  routing=routed)
    assert over.args[0].routing.prompt == PROMPT and over.args[0].routing.weights["Scissors"] == 1.0
    assert "overridden" in over.args[1]


def test_gate_override_refuses_zero_and_negative(N):
    def errors(**weights):
        inputs = dict({"instrument": "by weights", "scissors": 0.0, "hook_electrocautery": 0.0, "suction": 0.0,
                       "other": 0.0}, **weights)
        return comfy_validate(N, {"1": {"class_type": "WanLoRAMoE_GateOverride", "inputs": inputs}}, "1")

    assert_one_error(errors(), "instrument", "instrument is 'by weights' but all four weights are 0")
    assert_one_error(errors(scissors=-0.5, suction=1.0), "scissors", "smaller than min of 0.0")  # ComfyUI's
    assert_one_error(errors(instrument="Scissors", scissors=-0.5), "scissors", "smaller than min of 0.0")
    assert_one_error(errors(scissors=2.0), "scissors", "bigger than max of 1.0")
    assert_one_error(errors(instrument="Forceps"), "instrument", "instrument: 'Forceps' is not one of")
    assert errors(instrument="Scissors") == [] and errors(suction=0.3) == []
    assert errors(scissors=["9", 0]) == [], "a linked weight is checked when the node runs"
    with pytest.raises(ValueError, match="all four weights are 0"):
        N.GateOverride.execute(instrument="by weights", scissors=0.0, hook_electrocautery=0.0, suction=0.0, other=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        N.GateOverride.execute(instrument="by weights", scissors=-1.0, hook_electrocautery=1.0, suction=0.0,
                               other=0.0)


# -------------------------------------------------------------------------------------- load lora-moe

def test_file_listing_and_traversal(N, pack, model_dirs):
    common = pack.nodes.common
    names = common.list_lora_moe_files()
    assert {"a14b.safetensors", "single.safetensors", "sub/nested.safetensors", "garbage.safetensors",
            "moe_in_loras.safetensors"} <= set(names)
    assert "plain_lora.safetensors" not in names  # a plain LoRA in loras/ is not offered
    assert "mode: 'psychic'" in N.PromptInstrumentRouter.validate_inputs(mode="psychic")
    assert N.PromptInstrumentRouter.validate_inputs(mode="rule-based") is True
    assert N.LoadLoRAMoE.GET_NODE_INFO_V1()["input"]["required"]["lora_moe"][1]["options"] == names
    for evil in ("../a14b.safetensors", "/etc/passwd", "sub/../../lora_moe/a14b.safetensors", "", "a14b"):
        with pytest.raises(ValueError):
            common.resolve_lora_moe_file(evil)
        assert N.LoadLoRAMoE.validate_inputs(lora_moe=evil) is not True
    assert N.LoadLoRAMoE.validate_inputs(lora_moe="a14b.safetensors") is True
    assert N.LoadLoRAMoE.validate_inputs(lora_moe="garbage.safetensors").startswith("garbage.safetensors: not a")
    assert N.LoadLoRAMoE.validate_inputs(lora_moe="sub/nested.safetensors") is True
    assert N.LoadLoRAMoE.validate_inputs(lora_moe="moe_in_loras.safetensors") is True
    assert "so this is not a LoRA-MoE file" in N.LoadLoRAMoE.validate_inputs(lora_moe="plain_in_moe_dir.safetensors")


def _load_prompt(routing_mode: str | None = "rule-based", **inputs) -> dict:
    """An API prompt: UNETLoader -> Load LoRA-MoE (node "3"), with a Router (node "2") when routing_mode."""
    load = dict({"model": ["1", 0], "lora_moe": "a14b.safetensors", "adapter_set": "auto", "alpha_base": 0.7,
                 "alpha_expert": 1.0}, **inputs)
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "x.safetensors", "weight_dtype": "default"}},
              "3": {"class_type": "WanLoRAMoE_LoadLoRAMoE", "inputs": load}}
    if routing_mode:
        prompt["2"] = {"class_type": "WanLoRAMoE_PromptRouter",
                       "inputs": {"prompt": PROMPT, "mode": routing_mode, "top_k": 2, "temperature": 1.0}}
        load["routing"] = ["2", 0]
    return prompt


def test_load_validation_reports_each_problem_once_on_lora_moe(N, model_dirs):
    """Through ComfyUI's own validation: one error per problem, on lora_moe, naming the file as chosen, in the
    widgets' words; what only the model can tell is left to the run."""
    def errors(routing_mode="rule-based", **inputs):
        return comfy_validate(N, _load_prompt(routing_mode, **inputs), "3")

    root = str(model_dirs)
    refused = {
        "garbage.safetensors": ("auto", "rule-based", "garbage.safetensors: not a readable safetensors file"),
        "truncated.safetensors": ("auto", "rule-based", "truncated.safetensors: not a readable safetensors file"),
        "plain_in_moe_dir.safetensors": ("auto", "rule-based", "so this is not a LoRA-MoE file"),
        "../a14b.safetensors": ("auto", "rule-based", "not in ComfyUI's 'lora_moe' or 'loras' model folders"),
        "a14b_no_fp.safetensors": ("auto", None, "so adapter_set 'auto' cannot choose: set adapter_set to high-noise"),
        "single.safetensors": ("low-noise", None, "single.safetensors has no low-noise adapter set"),
        "sub/nested.safetensors": ("auto", "learned-from-file", "the Router's mode is learned-from-file, but "
                                   "sub/nested.safetensors holds no learned router: set the Router's mode to "
                                   "rule-based"),
    }
    for name, (adapter_set, mode, message) in refused.items():
        found = errors(mode, lora_moe=name, adapter_set=adapter_set)
        assert_one_error(found, "lora_moe", message)
        assert root not in json.dumps(found), found
    assert_one_error(errors("learned-from-file", lora_moe="a14b_no_fp.safetensors", adapter_set="high-noise"),
                     "lora_moe", "holds no learned router for its high-noise set")
    assert_one_error(errors(alpha_base=-1.0), "alpha_base", "smaller than min of 0.0")  # ComfyUI's own check
    for ok in ({}, {"lora_moe": "a14b_no_fp.safetensors", "adapter_set": "high-noise"},
               {"lora_moe": "sub/nested.safetensors"}, {"lora_moe": "moe_in_loras.safetensors"},
               {"lora_moe": ["9", 0]}, {"lora_moe": "a14b_no_fp.safetensors", "adapter_set": ["9", 0]}):
        assert errors(**ok) == [], ok
    assert errors("learned-from-file") == []
    # An invalid adapter_set value (API prompts only) is not blamed on lora_moe: the node refuses it when it runs.
    assert errors(adapter_set="medium-noise") == []


def test_file_cache_is_bounded_and_a_replaced_file_is_run_again(N, pack, model_dirs):
    cache = pack.nodes.common.LORA_MOE_CACHE
    cache.clear()
    folder = model_dirs / "lora_moe"
    for name in ("a14b.safetensors", "single.safetensors", "sub/nested.safetensors", "a14b_no_fp.safetensors"):
        cache.get(str(folder / name))
        assert len(cache) <= cache.size == 2
    path = folder / "sub" / "replaced.safetensors"
    pack_fixtures.write_moe(pack_fixtures.tiny_single_moe(), path)
    before = N.LoadLoRAMoE.fingerprint_inputs(lora_moe="sub/replaced.safetensors", model=None)
    assert N.LoadLoRAMoE.fingerprint_inputs(lora_moe="sub/replaced.safetensors") == before
    pack_fixtures.write_moe(pack_fixtures.tiny_single_moe(router=True), path)  # same size, new file
    assert N.LoadLoRAMoE.fingerprint_inputs(lora_moe="sub/replaced.safetensors") != before
    assert cache.get(str(path)).sets["default"].router is not None
    path.unlink()
    assert "unavailable" in N.LoadLoRAMoE.fingerprint_inputs(lora_moe="sub/replaced.safetensors")


def _run(model, ctx=(1, 2), seed=3, **kw):
    return wan_fixtures.sample(model, wan_fixtures.make_context(ctx[0]), wan_fixtures.make_context(ctx[1]), seed,
                               **kw)


def test_load_matches_the_engine_and_leaves_the_input_alone(N, pack, model_dirs, tiny_pair):
    hi = wan_fixtures.load_tiny_wan(tiny_pair[0])
    before = _run(hi)
    routed = N.PromptInstrumentRouter.execute(prompt=PROMPT, mode="rule-based", top_k=2, temperature=1.0).args[0]
    out = N.LoadLoRAMoE.execute(model=hi, lora_moe="a14b.safetensors", adapter_set="auto", alpha_base=0.7,
                                alpha_expert=1.0, routing=routed)
    patched = out.args[0]
    info = pack.moe_core.patch.moe_info(patched)
    assert info.set_name == "high_noise"  # auto: picked by the model's fingerprint
    assert "[high-noise]" in out.ui["text"][0] and "Hook/Electrocautery 0.50" in out.ui["text"][0]
    moe = pack.moe_core.checkpoint.load_lora_moe(model_dirs / "lora_moe" / "a14b.safetensors")
    direct = pack.moe_core.patch.apply_lora_moe(hi, moe, adapter_set="high_noise", alpha_base=0.7, alpha_expert=1.0,
                                                routing=routed.routing)
    a, b = _run(patched), _run(direct)
    assert torch.equal(a, b)
    assert (a - before).abs().max() > 1e-3
    assert torch.equal(_run(hi), before), "the input model must stay unpatched"
    assert hi.get_attachment(pack.moe_core.patch.KEY) is None
    lo = wan_fixtures.load_tiny_wan(tiny_pair[1])
    low = N.LoadLoRAMoE.execute(model=lo, lora_moe="a14b.safetensors", adapter_set="auto", alpha_base=0.7,
                                alpha_expert=1.0, routing=routed)
    assert pack.moe_core.patch.moe_info(low.args[0]).set_name == "low_noise"


def test_load_without_routing_is_base_only_and_uncond(N, pack, model_dirs, tiny_pair):
    hi = wan_fixtures.load_tiny_wan(tiny_pair[0])
    base_only = N.LoadLoRAMoE.execute(model=hi, lora_moe="a14b.safetensors", adapter_set="high-noise",
                                      alpha_base=0.7, alpha_expert=1.0)
    assert "experts off" in base_only.ui["text"][0]
    forced = N.GateOverride.execute(instrument="Scissors", scissors=0, hook_electrocautery=0, suction=0,
                                    other=0).args[0]
    same = N.LoadLoRAMoE.execute(model=hi, lora_moe="a14b.safetensors", adapter_set="high-noise", alpha_base=0.7,
                                 alpha_expert=1.0, routing=forced, uncond="same").args[0]
    off = N.LoadLoRAMoE.execute(model=hi, lora_moe="a14b.safetensors", adapter_set="high-noise", alpha_base=0.7,
                                alpha_expert=1.0, routing=forced, uncond="off").args[0]
    assert pack.moe_core.patch.moe_info(off).config.uncond == "off"
    assert not torch.equal(_run(same), _run(off))
    assert not torch.equal(_run(base_only.args[0]), _run(same))


def test_load_learned_router_and_errors(N, pack, model_dirs, tiny_pair):
    hi = wan_fixtures.load_tiny_wan(tiny_pair[0])
    learned = N.PromptInstrumentRouter.execute(prompt=PROMPT, mode="learned-from-file", top_k=2,
                                               temperature=1.0).args[0]
    ok = N.LoadLoRAMoE.execute(model=hi, lora_moe="a14b.safetensors", adapter_set="auto", alpha_base=0.7,
                               alpha_expert=1.0, routing=learned).args[0]
    assert pack.moe_core.patch.moe_info(ok).config.routing.mode == "learned"
    load = N.LoadLoRAMoE.execute
    root = str(model_dirs)
    cases = [  # (file, adapter_set, routing, message): each names the file as chosen, in the widgets' words
        ("a14b_no_fp.safetensors", "high-noise", learned,
         "the Router's mode is learned-from-file, but a14b_no_fp.safetensors holds no learned router for its "
         "high-noise set: set the Router's mode to rule-based"),
        ("a14b_no_fp.safetensors", "auto", None,
         "a14b_no_fp.safetensors holds high-noise and low-noise adapter sets but does not record which DiT each "
         "belongs to, so adapter_set 'auto' cannot choose: set adapter_set to high-noise for the high-noise DiT"),
        ("single.safetensors", "high-noise", None,
         "single.safetensors has no high-noise adapter set: it holds one set for a single DiT; set adapter_set to "
         "auto"),
        ("truncated.safetensors", "auto", None, "truncated.safetensors: not a readable safetensors file"),
        ("../../etc/passwd", "auto", None, "not in ComfyUI's"),
        ("a14b.safetensors", "medium-noise", None, "adapter_set: 'medium-noise' is not one of ['auto', 'high-noise'"),
        ("sub/nan.safetensors", "auto", None, "sub/nan.safetensors: set 'default', module 'blocks.6.self_attn.q', "
         "expert0.lora_up: contains NaN or Inf values"),
    ]
    for name, adapter_set, routing, message in cases:
        with pytest.raises(ValueError) as e:
            load(model=hi, lora_moe=name, adapter_set=adapter_set, alpha_base=0.7, alpha_expert=1.0, routing=routing)
        assert message in str(e.value) and root not in str(e.value), str(e.value)
    small = wan_fixtures.load_tiny_wan(wan_fixtures.tiny_wan_state_dict(0, num_layers=4))
    with pytest.raises(ValueError, match="does not have"):  # the LoRA-MoE adapts blocks 6-9, records no depth
        load(model=small, lora_moe="single.safetensors", adapter_set="auto", alpha_base=0.7, alpha_expert=1.0)
    assert hi.get_attachment(pack.moe_core.patch.KEY) is None and not hi.object_patches


def test_file_cache_reloads_a_changed_file(pack, model_dirs):
    cache = pack.nodes.common.LORA_MOE_CACHE
    path = model_dirs / "lora_moe" / "single.safetensors"
    a = cache.get(str(path))
    assert cache.get(str(path)) is a
    pack_fixtures.write_moe(pack_fixtures.tiny_single_moe(router=True), path)
    b = cache.get(str(path))
    assert b is not a and b.sets["default"].router is not None
    pack_fixtures.write_moe(pack_fixtures.tiny_single_moe(), path)


# -------------------------------------------------------------------------------------- timestep band

def test_band_node(N, pack, model_dirs, tiny_pair):
    hi = wan_fixtures.load_tiny_wan(tiny_pair[0])
    routed = N.PromptInstrumentRouter.execute(prompt=PROMPT, mode="rule-based", top_k=2, temperature=1.0).args[0]
    patched = N.LoadLoRAMoE.execute(model=hi, lora_moe="a14b.safetensors", adapter_set="auto", alpha_base=0.7,
                                    alpha_expert=1.0, routing=routed).args[0]
    out = N.TimestepBandNode.execute(model=patched, preset="three-level", start=0.3, mid=0.5, mid_factor=0.25,
                                     end=0.95, preview_steps=8, preview_shift=5.0)
    banded = out.args[0]
    band = pack.moe_core.patch.moe_info(banded).config.band
    assert band.to_json() == [[0.3, 0.25], [0.5, 1.0], [0.95, 0.0]]
    assert pack.moe_core.patch.moe_info(patched).config.band.to_json() != band.to_json(), "input left alone"
    image = out.ui["wlm_schedule_image"][0]
    assert image["type"] == "temp" and (Path(folder_paths.get_temp_directory()) / image["filename"]).is_file()
    data = out.ui["wlm_schedule"][0]
    assert data["experts"] == ["Scissors", "Hook/Electrocautery", "Suction", "Other"]
    assert len(data["raw_vs_t"]) == 101 and len(data["step_gates"]) == 8 and data["boundary"] == 0.875
    json.dumps(out.ui)  # the UI payload must be JSON for the front end
    assert not torch.equal(_run(banded), _run(patched))
    for preset, expected in (("seeds default", [[0.2, 0.5], [0.6, 1.0]]), ("always on", [[0.0, 1.0]]),
                             ("file default", [[0.2, 0.5], [0.6, 1.0]])):
        m = N.TimestepBandNode.execute(model=patched, preset=preset, start=0.9, mid=0.1, mid_factor=0.5, end=0.0,
                                       preview_steps=4, preview_shift=8.0).args[0]
        assert pack.moe_core.patch.moe_info(m).config.band.to_json() == expected


def test_band_errors(N, model_dirs, tiny_pair):
    def errors(**values):
        inputs = dict({"model": ["1", 0], "preset": "three-level", "start": 0.2, "mid": 0.6, "mid_factor": 0.5,
                       "end": 1.0, "preview_steps": 4, "preview_shift": 8.0}, **values)
        prompt = {"1": {"class_type": "UNETLoader", "inputs": {}},
                  "2": {"class_type": "WanLoRAMoE_TimestepBand", "inputs": inputs}}
        return comfy_validate(N, prompt, "2")

    assert_one_error(errors(start=0.7, mid=0.5), "mid", "need 0 <= start <= mid <= end <= 1")
    assert_one_error(errors(mid=0.8, end=0.7), "mid", "need 0 <= start <= mid <= end <= 1")
    assert_one_error(errors(start=-0.1), "start", "smaller than min of 0.0")  # ComfyUI's own check
    assert_one_error(errors(mid=1.5), "mid", "mid must be between 0 and 1")
    assert_one_error(errors(start=1.0, mid=1.0), "mid", "empty")
    assert errors(preset="seeds default", start=0.7, mid=0.5) == [] and errors() == []
    assert errors(start=0.7, mid=0.5, end=["9", 0]) == [], "a linked value is checked when the node runs"
    with pytest.raises(ValueError, match="preset must be one of"):  # API prompts only: refused when it runs
        N.TimestepBandNode.execute(model=_patched(N, tiny_pair), preset="sometimes", start=0.2, mid=0.6,
                                   mid_factor=0.5, end=1.0)
    with pytest.raises(ValueError, match="need 0 <= start <= mid"):
        N.TimestepBandNode.execute(model=_patched(N, tiny_pair), preset="three-level", start=0.7, mid=0.5,
                                   mid_factor=0.5, end=1.0)
    plain = wan_fixtures.load_tiny_wan(tiny_pair[0])
    with pytest.raises(ValueError, match="carries no LoRA-MoE"):
        N.TimestepBandNode.execute(model=plain, preset="seeds default", start=0.2, mid=0.6, mid_factor=0.5, end=1.0)


# --------------------------------------------------------------------------------------- schedule math

@pytest.mark.parametrize("steps,shift", [(20, 8.0), (4, 8.0), (7, 5.0), (30, 12.0), (10, 1.0)])
def test_flow_sigmas_match_comfyui(steps, shift):
    import comfy.model_sampling
    import comfy.samplers

    from moe_core.schedule import flow_sigmas

    ms = comfy.model_sampling.ModelSamplingDiscreteFlow()
    ms.set_parameters(shift=shift, multiplier=1000)
    expected = comfy.samplers.simple_scheduler(ms, steps).tolist()
    assert flow_sigmas(steps, shift) == pytest.approx(expected, abs=0, rel=0)


@pytest.mark.parametrize("mode", ["rule", "learned"])
def test_schedule_predicts_a_real_sampling_run(mode, tiny_pair):
    """gates_vs_steps (what the Band node draws) equals the gates GateController applied during sampling."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from moe_core.band import three_level_band
    from moe_core.checkpoint import load_lora_moe
    from moe_core.patch import apply_lora_moe, gate_trace
    from moe_core.routing import LearnedRouter, rule_route
    from moe_core.schedule import flow_sigmas, gates_vs_steps

    moe = pack_fixtures.tiny_a14b_moe()
    routing = rule_route(PROMPT, top_k=2, mode=mode)
    band = three_level_band(0.3, 0.8, 0.5, 1.0)
    model = ModelSamplingSD3().patch(wan_fixtures.load_tiny_wan(tiny_pair[0]), shift=5.0)[0]
    m = apply_lora_moe(model, moe, adapter_set="high_noise", routing=routing, band=band, ema_beta=0.7)
    _run(m, steps=6)
    trace = gate_trace(m)
    router = LearnedRouter.from_state_dict(moe.sets["high_noise"].router)
    predicted = gates_vs_steps(routing, moe.expert_names, band, flow_sigmas(6, 5.0), 0.7, router)
    assert [t["step"] for t in trace] == [p.step for p in predicted]
    for t, p in zip(trace, predicted):
        assert t["sigma"] == pytest.approx(p.sigma, rel=1e-6)
        assert t["gates"] == pytest.approx(p.gates, abs=1e-6)
    del load_lora_moe


def test_schedule_picture(tmp_path):
    from moe_core.band import DEFAULT_BAND
    from moe_core.routing import rule_route
    from moe_core.schedule import ScheduleError, render_schedule

    img = render_schedule(rule_route(PROMPT), ["Scissors", "Hook/Electrocautery", "Suction", "Other"], DEFAULT_BAND)
    assert img.size == (960, 400) and img.mode == "RGB"
    assert len(img.getcolors(maxcolors=1 << 20)) > 8  # curves, shading and text were drawn
    with pytest.raises(ScheduleError):
        render_schedule(None, ["A"], DEFAULT_BAND, steps=0)


@pytest.fixture(scope="module")
def node_js():
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is needed to test web/schedule.js against moe_core.schedule (apt-get install nodejs)")
    return node


def test_web_schedule_matches_python(node_js, tmp_path):
    """web/schedule.js (the live preview) computes the same band, sigmas and per-step gates as Python."""
    from moe_core.band import three_level_band
    from moe_core.routing import rule_route
    from moe_core.schedule import flow_sigmas, gates_vs_steps, gates_vs_t
    from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

    cases = [(20, 8.0), (4, 8.0), (13, 3.0), (10, 1.0)]
    band = three_level_band(0.25, 0.55, 0.4, 0.9)
    routing = rule_route(PROMPT)
    ts = [i / 100 for i in range(101)]
    raw, _ = gates_vs_t(routing, DEFAULT_EXPERT_NAMES, three_level_band(0.0, 0.0, 1.0, 1.0), ts)
    script = tmp_path / "check.mjs"
    script.write_text(f"""
import * as S from {json.dumps((REPO / "web" / "schedule.js").as_uri())};
const band = S.threeLevelBand(0.25, 0.55, 0.4, 0.9);
const raw = {json.dumps(raw)};
const out = {{band, factors: [0, 0.2, 0.25, 0.5, 0.55, 0.8, 0.9, 1.0].map((t) => S.bandFactor(band, t)),
  sigmas: {json.dumps(cases)}.map(([n, s]) => S.flowSigmas(n, s)),
  steps: S.gatesVsSteps(band, S.flowSigmas(20, 8.0), raw, 0.9).map((s) => s.gates),
  errors: [() => S.threeLevelBand(0.7, 0.5, 0.5, 1), () => S.threeLevelBand(1.0, 1.0, 0.5, 1.0)].map((f) => {{
    try {{ f(); return null; }} catch (e) {{ return e.message; }} }}),
  presets: ["seeds default", "always on"].map((p) => S.presetBand(p, {{}}))}};
console.log(JSON.stringify(out));
""")
    res = subprocess.run([node_js, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    js = json.loads(res.stdout)
    assert js["band"] == band.to_json()
    assert js["factors"] == [band.factor(t) for t in [0, 0.2, 0.25, 0.5, 0.55, 0.8, 0.9, 1.0]]
    for (n, s), sig in zip(cases, js["sigmas"]):
        assert sig == pytest.approx(flow_sigmas(n, s), abs=1e-7)
    py = gates_vs_steps(routing, DEFAULT_EXPERT_NAMES, band, flow_sigmas(20, 8.0), 0.9)
    for a, b in zip(js["steps"], py):
        assert a == pytest.approx(b.gates, abs=1e-6)
    assert "start <= mid" in js["errors"][0] and "empty" in js["errors"][1]
    assert js["presets"] == [[[0.2, 0.5], [0.6, 1.0]], [[0.0, 1.0]]]
    assert not math.isnan(sum(sum(r) for r in js["steps"]))
