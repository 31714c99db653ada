"""Stage 2's routing behaviour: the regularisers prevent a collapse that appears without them, the EMA check,
custom expert sets (the 2/3/5-expert ablations), hard-label routing, router-only training, and the
class-balanced sampler."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_fixtures as tf
from moe_core.checkpoint import MoEDefaults, load_lora_moe
from moe_core.routing import LearnedRouter
from training.config import config_from_dict
from training.stage1 import run_stage1
from training.stage2 import run_stage2
from training.stage2_config import Stage2Config
from training.stage2_report import ema_check
from training.stage2_sampling import BalancedOrder

QUIET = lambda *_: None  # noqa: E731


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """3 scissors clips, one of each other instrument, one DiT, and its stage-1 LoRA."""
    root = tmp_path_factory.mktemp("skewed")
    ws = tf.make_workspace(root, clips_per_class=3)
    lines = ws.manifest.read_text(encoding="utf-8").splitlines()
    keep = [x for x in lines if x.strip() and ("scissors" in json.loads(x)["video_path"]
                                               or json.loads(x)["video_path"].endswith("_00.mp4"))]
    manifest = ws.manifest.with_name("skewed.jsonl")
    manifest.write_text("\n".join(keep) + "\n", encoding="utf-8")
    ws = tf.Workspace(root, manifest, root / "cache", ws.dit, ws.dit_low)
    s1 = run_stage1(tf.stage1_config(ws, root / "s1", train={"max_steps": 6, "learning_rate": 2e-2}), log_fn=QUIET)
    return ws, s1.loras["default"]


def _cfg(ws, out: Path, **sections) -> Stage2Config:
    d = tf.config_dict(ws, out, train={"max_steps": 8, "learning_rate": 2e-2})
    d["router"] = {"warm_start_steps": 30}
    d["validation"] = {"holdout_fraction": 0.0}
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return config_from_dict(Stage2Config, d, "test")


def _last_epoch_usage(result) -> float:
    lines = [json.loads(x) for x in result.metrics.read_text().splitlines()]
    return [x for x in lines if "epoch_max_usage" in x][-1]["epoch_max_usage"]


def test_load_balance_and_entropy_prevent_the_collapse_that_appears_without_them(skewed, tmp_path):
    """A router started untaught (no warm start, no teacher KL) from seed 4 favours one expert, and the
    diffusion loss alone drives it to send everything there (here Hook, a class of 1 clip in 6). With the
    load balance and entropy hinge on (same seed, same data) routing stays near the teacher's label
    frequencies (3:1:1:1) and no expert keeps over 70%. Without teacher KL the regularisers are the only
    guard, so they get stronger weights here than the defaults (which sit beside KL at 1.0)."""
    ws, base = skewed
    common = dict(train={"max_steps": 24, "seed": 4, "learning_rate": 2e-2},
                  router={"warm_start_steps": 0, "learning_rate": 1e-2})
    off = run_stage2(_cfg(ws, tmp_path / "off", loss={"teacher_kl": 0.0, "load_balance": 0.0, "entropy": 0.0},
                          **common), base_loras={"default": base}, log_fn=QUIET)
    on = run_stage2(_cfg(ws, tmp_path / "on", loss={"teacher_kl": 0.0, "load_balance": 1.0, "entropy": 0.2,
                                                  "entropy_target": 1.0}, **common),
                    base_loras={"default": base}, log_fn=QUIET)
    u_off, u_on = _last_epoch_usage(off), _last_epoch_usage(on)
    print(f"largest expert share in the last epoch: {u_off:.2f} without, {u_on:.2f} with load balance + entropy")
    assert u_off > 0.7 and any("takes" in w for w in off.trainer.mon.warned)
    assert u_on < 0.7
    tail = lambda r: [json.loads(x) for x in r.metrics.read_text().splitlines()][-4:]  # noqa: E731
    # the balance term itself (1 = usage follows the label frequencies): far off without, near 1 with
    assert min(x["load_balance"] for x in tail(off)) > 3.0
    assert sum(x["load_balance"] for x in tail(on)) / 4 < 1.5


def test_ema_check_turns_ema_off_for_a_router_that_varies_with_t():
    names = ["Scissors", "Hook/Electrocautery", "Suction", "Other"]
    torch.manual_seed(0)
    steep = LearnedRouter(4)
    with torch.no_grad():
        steep.fc1.weight[:, -1] = torch.linspace(-40, 40, 64)  # t dominates the hidden layer
    flat = LearnedRouter(4)
    with torch.no_grad():
        flat.fc1.weight[:, -1] = 0.0  # ignores t: EMA changes nothing
    cfg = SimpleNamespace(router=SimpleNamespace(ema_tolerance=0.05))
    for router, expect_off in ((steep, True), (flat, False)):
        trainer = SimpleNamespace(defaults=MoEDefaults(ema_beta=0.9), routers={"default": router},
                                  expert_names=names, expert_keywords=None, dits=SimpleNamespace(boundary=None))
        check = ema_check(trainer, cfg)
        assert check["checked"] and len(check["instruments"]) == 4
        assert (check["ema_beta_written"] == 0.0) == expect_off, check["max_gap"]
        assert (check["max_gap"] > 0.05) == expect_off
        if not expect_off:
            assert check["max_gap"] < 1e-6


def test_three_custom_experts_hard_labels_then_router_only(skewed, tmp_path):
    ws, base = skewed
    experts = {"expert_names": ["Cutting", "Energy", "Rest"],
               "expert_keywords": ["Cutting: 剪刀, scissors", "Energy: 电凝钩, 电凝, hook", "Rest: 吸引, 抓钳, grasper"],
               "no_instrument": "Rest"}
    first = run_stage2(_cfg(ws, tmp_path / "hard", moe=experts, router={"routing": "hard_label"}),
                       base_loras={"default": base}, log_fn=QUIET)
    moe = load_lora_moe(first.lora_moe)
    assert moe.expert_names == experts["expert_names"]
    assert moe.expert_keywords == {"Cutting": ["剪刀", "scissors"], "Energy": ["电凝钩", "电凝", "hook"],
                                   "Rest": ["吸引", "抓钳", "grasper"]}
    assert moe.sets["default"].router["fc2.weight"].shape == (3, 64)
    lines = [json.loads(x) for x in first.metrics.read_text().splitlines()]
    # hard labels: each row's gate is its label, so usage equals the label share of the step exactly
    for x in lines:
        for n in experts["expert_names"]:
            assert x[f"usage/{n}"] == pytest.approx(x[f"samples/{n}"] / 2)

    second = run_stage2(_cfg(ws, tmp_path / "router_only", moe=experts, router={"train": "router_only"}),
                        init_moe=first.lora_moe, log_fn=QUIET)
    after = load_lora_moe(second.lora_moe)
    for module, pa in moe.sets["default"].modules.items():
        qa = after.sets["default"].modules[module]
        for a, b in zip([pa.base, *pa.experts], [qa.base, *qa.experts]):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up)
    r0, r1 = moe.sets["default"].router, after.sets["default"].router
    assert any(not torch.equal(r0[k], r1[k]) for k in r0), "router_only must train the router"
    assert sum(p.numel() for p in second.trainer.params) == sum(v.numel() for v in r1.values())


def test_balanced_sampler_is_deterministic_and_balanced():
    classes = [0] * 8 + [1] * 2 + [2] * 2 + [3] * 4
    order = BalancedOrder(classes, seed=3)
    again = BalancedOrder(classes, seed=3)
    seq = [order.index(p) for p in range(16 * 50)]
    assert seq == [again.index(p) for p in range(16 * 50)]
    counts = torch.bincount(torch.tensor([classes[i] for i in seq]), minlength=4).float() / len(seq)
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.03), counts
    assert BalancedOrder(classes, seed=4).permutation(0) != order.permutation(0)


def test_optional_identity_and_temporal_terms_train_and_are_logged(skewed, tmp_path):
    ws, base = skewed

    class Classifier(torch.nn.Module):  # latent [B, C, F, H, W] -> logits [B, 4]
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean(dim=(2, 3, 4)))

    torch.manual_seed(0)
    path = tmp_path / "classifier.pt"
    torch.jit.script(Classifier()).save(str(path))
    result = run_stage2(_cfg(ws, tmp_path / "run", train={"max_steps": 3},
                             loss={"identity": 0.5, "identity_classifier": str(path), "temporal": 0.5}),
                        base_loras={"default": base}, log_fn=QUIET)
    lines = [json.loads(x) for x in result.metrics.read_text().splitlines()]
    assert all(x["identity"] > 0 and x["temporal"] > 0 for x in lines)
    missing = _cfg(ws, tmp_path / "bad", loss={"identity": 0.5, "identity_classifier": str(tmp_path / "no.pt")})
    with pytest.raises(FileNotFoundError, match="loss.identity_classifier: .*no.pt not found"):
        run_stage2(missing, base_loras={"default": base}, log_fn=QUIET)
