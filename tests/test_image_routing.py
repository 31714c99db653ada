"""Routing from the start image: a user's TorchScript classifier, pinned by SHA-256, as the Router's teacher.

The classifier is built here (scores from the frame's mean colour: red -> scissors, green -> hook, blue ->
suction), scripted and saved to a temporary file; the expected gates are computed by hand from the colours.
The Router node runs through ComfyUI's own executor (`execution.PromptExecutor`) on core `EmptyImage` frames.
"""
from __future__ import annotations

import hashlib
import math
import shutil
import warnings
from pathlib import Path
from typing import List

import pytest
import torch

import pack_fixtures
import wan_fixtures
from moe_core.band import ALWAYS_ON
from moe_core.checkpoint import LoraMoE
from moe_core.image_routing import (ImageRoutingError, class_probabilities, image_distribution, image_route,
                                    load_classifier)
from moe_core.patch import apply_lora_moe, gate_trace
from moe_core.routing import rule_gates, rule_route
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
from moe_fixtures import random_moe

CLASSES = ["scissors", "Hook", "SUCTION", "grasper"]  # keywords of the four default experts, any case
SCALE = 6.0


class ColourClassifier(torch.nn.Module):
    """logits = SCALE * (mean R, mean G, mean B, 1/3): checks it gets [1, 3, h, w] in [0, 1] at input_size."""

    def __init__(self, class_names: List[str], input_size: List[int]):
        super().__init__()
        self.class_names = class_names
        self.input_size = input_size
        self.scale = SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3 or x.shape[2] != self.input_size[0] or x.shape[3] != self.input_size[1]:
            raise RuntimeError("wrong input shape")
        if bool(x.min() < 0.0) or bool(x.max() > 1.0):
            raise RuntimeError("input not in [0, 1]")
        m = x.mean(dim=(2, 3))
        return self.scale * torch.cat([m, torch.full_like(m[:, :1], 1.0 / 3.0)], dim=1)


class NoNames(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.input_size = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def save_scripted(module: torch.nn.Module, path) -> tuple[str, str]:
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript (still the format ComfyUI users have)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return save_scripted(ColourClassifier(CLASSES, [12, 10]), tmp_path_factory.mktemp("clf") / "colour.pt")


def frames(*colours: tuple[float, float, float], h: int = 32, w: int = 24) -> torch.Tensor:
    """A ComfyUI IMAGE [N, H, W, 3] of solid colours, one frame per colour."""
    return torch.stack([torch.tensor(c).expand(h, w, 3) for c in colours]).float()


def expected_probs(colour, temperature: float = 1.0) -> list[float]:
    logits = [SCALE * v for v in colour] + [SCALE / 3]
    z = [math.exp(v / temperature) for v in logits]
    return [v / sum(z) for v in z]


def approx(expected):
    return pytest.approx(expected, abs=1e-6)  # the classifier computes in float32


RED, GREEN = (0.9, 0.1, 0.2), (0.1, 0.8, 0.3)


def test_red_and_green_frames_route_to_different_experts(classifier):
    clf = load_classifier(*classifier)
    assert clf.class_names == tuple(CLASSES) and clf.input_size == (12, 10)
    assert load_classifier(*classifier) is clf, "cached by (path, sha256)"
    for colour, expert, t in ((RED, "Scissors", 1.0), (GREEN, "Hook/Electrocautery", 0.5)):
        probs = class_probabilities(clf, frames(colour, (0.0, 0.0, 1.0)), temperature=t)  # the first frame counts
        assert list(probs.values()) == approx(expected_probs(colour, t))
        routing = image_route(probs, DEFAULT_EXPERT_NAMES, route_from="image", top_k=2, classifier=clf.name)
        assert routing.weights == approx(dict(zip(DEFAULT_EXPERT_NAMES, expected_probs(colour, t))))
        assert routing.detected == (expert,) and routing.source == "image"
        gates = rule_gates(routing, DEFAULT_EXPERT_NAMES)
        p = dict(zip(DEFAULT_EXPERT_NAMES, expected_probs(colour, t)))
        top2 = sorted(p, key=p.get)[-2:]
        assert gates == approx({n: (p[n] / sum(p[k] for k in top2) if n in top2 else 0.0) for n in p})
        assert max(gates, key=gates.get) == expert
        assert "from the start image" in routing.describe(gates) and "colour.pt" in routing.describe(gates)


def test_prompt_plus_image_is_the_mean_then_top_k(classifier):
    clf = load_classifier(*classifier)
    probs = class_probabilities(clf, frames(RED))
    prompt = rule_route("吸引器吸除积血", top_k=2)
    both = image_route(probs, DEFAULT_EXPERT_NAMES, route_from="prompt+image", prompt_routing=prompt, top_k=2,
                       classifier=clf.name)
    image = dict(zip(DEFAULT_EXPERT_NAMES, expected_probs(RED)))
    want = {n: 0.5 * ((1.0 if n == "Suction" else 0.0) + image[n]) for n in DEFAULT_EXPERT_NAMES}
    assert both.weights == approx(want) and both.detected == ("Scissors", "Suction")
    gates = rule_gates(both, DEFAULT_EXPERT_NAMES)
    assert gates == approx({"Scissors": want["Scissors"] / (want["Scissors"] + want["Suction"]),
                                   "Hook/Electrocautery": 0.0, "Other": 0.0,
                                   "Suction": want["Suction"] / (want["Scissors"] + want["Suction"])})
    # a prompt that names no instrument carries no evidence: the image alone, whatever the fallback
    for fallback in ("off", "Other"):
        alone = image_route(probs, DEFAULT_EXPERT_NAMES, route_from="prompt+image", top_k=2,
                            prompt_routing=rule_route("腹腔镜视野", fallback=fallback))
        assert alone.weights == approx(image) and "image alone" in alone.note, fallback


def test_refused_classifiers(classifier, tmp_path):
    path, sha = classifier
    with pytest.raises(ImageRoutingError, match=r"classifier file .*missing.pt not found"):
        load_classifier(tmp_path / "missing.pt", sha)
    with pytest.raises(ImageRoutingError, match=f"classifier_sha256 is empty; .*this file's is {sha}"):
        load_classifier(path, "")
    with pytest.raises(ImageRoutingError, match=f"its SHA-256 is {sha}, not the given {'0' * 64}"):
        load_classifier(path, "0" * 64)
    with pytest.raises(ImageRoutingError, match="is not 64 hexadecimal digits"):
        load_classifier(path, "abc")
    with pytest.raises(ImageRoutingError, match="no classifier file given"):
        load_classifier("", sha)
    no_names = save_scripted(NoNames(), tmp_path / "no_names.pt")
    with pytest.raises(ImageRoutingError, match=r"no_names.pt: needs an attribute 'class_names'"):
        load_classifier(*no_names)
    no_size = NoNames()
    no_size.class_names = CLASSES
    del no_size.input_size
    with pytest.raises(ImageRoutingError, match=r"no_size.pt: needs an attribute 'input_size'"):
        load_classifier(*save_scripted(no_size, tmp_path / "no_size.pt"))
    with pytest.raises(ImageRoutingError, match=r"bad_size.pt: needs an attribute 'input_size', .* got \[0, 10\]"):
        load_classifier(*save_scripted(ColourClassifier(CLASSES, [0, 10]), tmp_path / "bad_size.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    with pytest.raises(ImageRoutingError, match="junk.pt: not a TorchScript module"):
        load_classifier(junk, hashlib.sha256(b"not torchscript").hexdigest())
    unknown = save_scripted(ColourClassifier(["scissors", "laser", "suction", "grasper"], [8, 8]), tmp_path / "u.pt")
    probs = class_probabilities(load_classifier(*unknown), frames(RED))
    with pytest.raises(ImageRoutingError, match=r"class name\(s\) \['laser'\] match no expert name or instrument "
                                                r"keyword .*the experts are: Scissors \(.*Other \("):
        image_distribution(probs, DEFAULT_EXPERT_NAMES, source="classifier u.pt")
    with pytest.raises(ImageRoutingError, match=r"IMAGE \[frames, height, width, 3\]"):
        class_probabilities(load_classifier(*classifier), torch.zeros(8, 8, 3))


# --------------------------------------------------------------------------------- through ComfyUI

@pytest.fixture(scope="module")
def N():
    return pack_fixtures.import_pack().nodes


def run_prompt(N, prompt: dict, node: str) -> tuple[dict | None, list]:
    """Validate (as `POST /prompt` does) and run an API prompt with ComfyUI's own executor; (ui output of
    `node`, status messages)."""
    import asyncio

    import execution
    import nodes

    class Server:  # what PromptExecutor talks to; messages only matter to a client, and there is none
        client_id = None
        last_node_id = None

        def send_sync(self, *args, **kwargs):
            pass

    added = {c.GET_SCHEMA().node_id: c for c in N.NODES if c.GET_SCHEMA().node_id not in nodes.NODE_CLASS_MAPPINGS}
    nodes.NODE_CLASS_MAPPINGS.update(added)
    try:
        valid, errors, _ = asyncio.run(execution.validate_inputs("test", prompt, node, {}))
        assert valid, errors
        executor = execution.PromptExecutor(Server())
        executor.execute(prompt, "test", {}, [node])
    finally:
        for key in added:
            del nodes.NODE_CLASS_MAPPINGS[key]
    return executor.history_result["outputs"].get(node), executor.status_messages


def router_prompt(colour: int | None, **inputs) -> dict:
    router = {"prompt": "", "mode": "rule-based", "top_k": 1, "temperature": 1.0, **inputs}
    prompt = {"2": {"class_type": "WanLoRAMoE_PromptRouter", "inputs": router}}
    if colour is not None:
        prompt["1"] = {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 1,
                                                                "color": colour}}
        router["image"] = ["1", 0]
    return prompt


def test_router_node_routes_from_the_image_in_comfyui(N, classifier):
    path, sha = classifier
    seen = {}
    for name, colour in (("red", 0xE61A33), ("green", 0x1ACC4D)):
        ui, messages = run_prompt(N, router_prompt(colour, route_from="image", classifier=path,
                                                   classifier_sha256=sha), "2")
        assert ui is not None, messages
        seen[name] = ui["wlm_routing"][0]
        assert seen[name]["source"] == "image" and "from the start image" in ui["text"][0]
    assert seen["red"]["detected"] == ["Scissors"] and seen["red"]["gates"]["Scissors"] == 1.0
    assert seen["green"]["detected"] == ["Hook/Electrocautery"] and seen["green"]["gates"]["Hook/Electrocautery"] == 1.0
    # a wrong hash is a node error naming the file and its actual hash
    ui, messages = run_prompt(N, router_prompt(0xE61A33, route_from="image", classifier=path,
                                               classifier_sha256="f" * 64), "2")
    error = next(m[1] for m in messages if m[0] == "execution_error")
    assert ui is None and sha in error["exception_message"] and "colour.pt" in error["exception_message"]
    # a file under ComfyUI's models folder is named as the user typed it, never by the server's folders
    import folder_paths
    rel = "wlm_test_classifiers/colour.pt"
    target = Path(folder_paths.models_dir) / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    try:
        ui, messages = run_prompt(N, router_prompt(0x1ACC4D, route_from="image", classifier=rel,
                                                   classifier_sha256=sha), "2")
        assert ui["wlm_routing"][0]["detected"] == ["Hook/Electrocautery"], messages
        _, messages = run_prompt(N, router_prompt(0x1ACC4D, route_from="image", classifier=rel,
                                                  classifier_sha256="f" * 64), "2")
        error = next(m[1] for m in messages if m[0] == "execution_error")["exception_message"]
        assert f"classifier {rel}:" in error and folder_paths.models_dir not in error
    finally:
        shutil.rmtree(target.parent)
    # no image connected
    _, messages = run_prompt(N, router_prompt(None, prompt="剪刀", route_from="image", classifier=path,
                                              classifier_sha256=sha), "2")
    assert "no image is connected" in next(m[1] for m in messages if m[0] == "execution_error")["exception_message"]
    # a workflow saved before the new inputs existed: the prompt routes, as it always did
    ui, messages = run_prompt(N, router_prompt(None, prompt="电凝钩切割组织"), "2")
    assert ui["wlm_routing"][0]["detected"] == ["Hook/Electrocautery"] and ui["wlm_routing"][0]["source"] == "prompt"
    info = N.PromptInstrumentRouter.GET_NODE_INFO_V1()
    assert info["input_order"]["optional"] == ["no_instrument", "image", "route_from", "classifier",
                                               "classifier_sha256"]


def test_load_lora_moe_maps_the_image_onto_the_files_experts(N, classifier, tiny_wan, wan_contexts, wan_sample):
    """The routing reaches the sampler as the gates computed by hand, also for a file with its own experts."""
    path, sha = classifier
    image = frames(GREEN)
    value = N.PromptInstrumentRouter.execute(prompt="剪刀", mode="rule-based", top_k=2, temperature=1.0,
                                             image=image, route_from="prompt+image", classifier=path,
                                             classifier_sha256=sha).args[0]
    moe = random_moe(seed=9, expert_names=("Cutting", "Coagulation", "Suction", "Other"))
    moe = LoraMoE(moe.expert_names, moe.sets, expert_keywords={"Cutting": ["剪刀", "scissors"],
                                                               "Coagulation": ["电凝钩", "hook"]})
    resolved = value.resolve(moe)
    p = expected_probs(GREEN)
    want = {"Cutting": 0.5 * (1 + p[0]), "Coagulation": 0.5 * p[1], "Suction": 0.5 * p[2], "Other": 0.5 * p[3]}
    assert resolved.weights == approx(want)
    patched = apply_lora_moe(tiny_wan, moe, routing=resolved, band=ALWAYS_ON, ema_beta=0.0)
    wan_sample(patched, *wan_contexts, seed=1, steps=2)
    top = sum(want[n] for n in ("Cutting", "Coagulation"))
    assert gate_trace(patched)[0]["gates"] == approx([want["Cutting"] / top, want["Coagulation"] / top, 0, 0])


def test_a_router_saved_before_the_image_inputs_converts_with_their_defaults(N):
    """The UI->API converter the demo and the ablations use treats an old Router (five widget values) as the
    front end does: the optional widgets it has no value for keep the node's defaults."""
    from moe_core.workflow_api import ConversionError, convert

    info = {"WanLoRAMoE_PromptRouter": N.PromptInstrumentRouter.GET_NODE_INFO_V1()}

    def router(values):
        return {"nodes": [{"id": 2, "type": "WanLoRAMoE_PromptRouter", "widgets_values": values, "inputs": []}],
                "links": []}

    old = convert(router(["剪刀", "rule-based", 2, 1.0, "Other"]), info)["2"]["inputs"]
    assert old == {"prompt": "剪刀", "mode": "rule-based", "top_k": 2, "temperature": 1.0, "no_instrument": "Other"}
    new = convert(router(["剪刀", "rule-based", 2, 1.0, "Other", "image", "c.pt", "ab"]), info)["2"]["inputs"]
    assert (new["route_from"], new["classifier"], new["classifier_sha256"]) == ("image", "c.pt", "ab")
    with pytest.raises(ConversionError, match="widgets_values has no value for 'temperature'"):
        convert(router(["剪刀", "rule-based", 2]), info)
