"""Rule-based routing from Chinese/English prompts, manual gates, top-k, the learned router, bands."""
from __future__ import annotations

import pytest
import torch

from moe_core.band import DEFAULT_BAND, BandError, TimestepBand, three_level_band
from moe_core.gating import GateSettings, cap_gates, route, topk_gates
from moe_core.routing import LearnedRouter, RoutingError, manual_route, raw_gates, rule_logits, rule_route
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

S, H, SU, O = DEFAULT_EXPERT_NAMES


@pytest.mark.parametrize("prompt, expected", [
    ("剪刀剪开腹膜。", [S]),
    ("使用剪切分离组织", [S]),
    ("电凝钩切割组织并止血", [H]),
    ("双极电凝处理血管", [H]),
    ("吸引器吸除积血", [SU]),
    ("抓钳抓取胆囊", [O]),
    ("分离钳与戳卡", [O]),
    ("Electrocautery hook dissects the plane", [H]),
    ("suction of blood", [SU]),
    ("电凝钩切割组织。吸引吸血。", [H, SU]),
])
def test_rule_router_detects_instruments(prompt, expected):
    r = rule_route(prompt)
    assert list(r.detected) == expected
    assert r.weights == {n: (1 / len(expected) if n in expected else 0.0) for n in DEFAULT_EXPERT_NAMES}
    assert r.describe().startswith("[rule] instruments: " + ", ".join(expected))


def test_grasper_is_not_a_hook():
    # 抓钳 has no 钩, but "钩" must not be found inside other instrument words either
    assert rule_route("抓钳牵拉组织").detected == (O,)


def test_no_instrument_fallbacks():
    assert rule_route("腹腔镜手术视野").weights[O] == 1.0
    assert "fallback to Other" in rule_route("腹腔镜手术视野").describe()
    assert sum(rule_route("腹腔镜手术视野", fallback="off").weights.values()) == 0
    with pytest.raises(RoutingError, match="no instrument keyword.*Scissors: 剪刀"):
        rule_route("腹腔镜手术视野", fallback="error")


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_an_error(prompt):
    with pytest.raises(RoutingError, match="prompt is empty"):
        rule_route(prompt)


def test_bad_topk_and_temperature():
    with pytest.raises(RoutingError, match="top_k must be between 1 and the number of experts"):
        rule_route("剪刀", top_k=5)
    with pytest.raises(RoutingError, match="temperature must be > 0"):
        rule_route("剪刀", temperature=0)


def test_manual_route_normalises_and_refuses_bad_weights():
    r = manual_route({S: 3.0, O: 1.0})
    assert r.weights == {S: 0.75, O: 0.25} and r.mode == "manual"
    with pytest.raises(RoutingError, match="all gate weights are zero"):
        manual_route({S: 0.0, O: 0.0})
    with pytest.raises(RoutingError, match=">= 0"):
        manual_route({S: -1.0, O: 2.0})


def test_rule_gates_are_the_teacher_at_the_temperature_with_exact_zeros():
    # one instrument: that expert alone, every other gate exactly 0 (no floored logit wins a top-2 slot)
    g = raw_gates(rule_route("电凝钩切割组织", top_k=2), DEFAULT_EXPERT_NAMES, 0.7, None)
    assert g.tolist() == [0.0, 1.0, 0.0, 0.0]
    # two instruments: w^(1/T) renormalised over the named experts, by hand
    r = rule_route("电凝钩切割组织。吸引吸血。", temperature=2.0, top_k=2)
    g = raw_gates(r, DEFAULT_EXPERT_NAMES, 0.7, None)
    assert torch.allclose(g, torch.tensor([0.0, 0.5, 0.5, 0.0]), atol=1e-7)
    assert g[0] == 0.0 and g[3] == 0.0


def test_rule_gates_ties_are_kept_not_broken():
    # three named instruments under top-2: all three tie, so all three are kept at 1/3
    r = rule_route("剪刀、电凝钩和吸引器", top_k=2)
    g = raw_gates(r, DEFAULT_EXPERT_NAMES, 0.5, None)
    assert torch.allclose(g, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]), atol=1e-7) and g[3] == 0.0


def test_topk_keeps_k_largest_and_renormalises():
    p = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.0, 0.0, 0.0, 0.0], [0.2, 0.4, 0.2, 0.2]])
    out = topk_gates(p, 2)
    assert torch.allclose(out[0], torch.tensor([0, 0.625, 0.375, 0]))
    assert torch.equal(out[1], torch.zeros(4))
    assert torch.allclose(out[2], torch.tensor([0.2, 0.4, 0.2, 0.2]))  # a 3-way tie at the 2nd value: kept


def test_max_gate_cap_hands_the_excess_to_the_other_kept_expert():
    g = torch.tensor([[0.95, 0.05, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    out = cap_gates(g, 0.9)
    assert torch.allclose(out[0], torch.tensor([0.9, 0.1, 0.0, 0.0]))
    assert torch.allclose(out[1], torch.tensor([0.9, 0.0, 0.0, 0.0]))  # nobody to share with: sums to 0.9


def test_route_is_differentiable_through_the_learned_router():
    torch.manual_seed(0)
    router = LearnedRouter(4)
    w = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
    out = route(w, torch.tensor([0.9, 0.3]), "learned", router, GateSettings(top_k=2))
    out.gates[:, 1].sum().backward()
    assert router.fc1.weight.grad is not None and router.fc1.weight.grad.abs().sum() > 0
    assert (out.gates > 0).sum(-1).tolist() == [2, 2]


def test_learned_router_runs_the_mlp_over_rule_logits_and_t():
    torch.manual_seed(0)
    router = LearnedRouter(4).eval()
    r = rule_route("剪刀剪开", mode="learned", top_k=4, temperature=1.5)
    g = raw_gates(r, DEFAULT_EXPERT_NAMES, 0.8, router)
    w = torch.tensor([r.weights[n] for n in DEFAULT_EXPERT_NAMES])
    x = torch.cat([rule_logits(w), torch.tensor([0.8])])
    h = torch.nn.functional.silu(x @ router.fc1.weight.T + router.fc1.bias)
    expected = torch.softmax((h @ router.fc2.weight.T + router.fc2.bias) / 1.5, 0)
    assert torch.allclose(g, expected, atol=1e-6)
    assert not torch.allclose(g, raw_gates(r, DEFAULT_EXPERT_NAMES, 0.3, router)), "t is an input"
    with pytest.raises(RoutingError, match="no learned router"):
        raw_gates(r, DEFAULT_EXPERT_NAMES, 0.8, None)


def test_default_band_is_the_seeds_three_levels():
    for t, f in [(0.0, 0.0), (0.19, 0.0), (0.2, 0.5), (0.59, 0.5), (0.6, 1.0), (1.0, 1.0)]:
        assert DEFAULT_BAND.factor(t) == f, t
    assert torch.equal(DEFAULT_BAND.factors(torch.tensor([0.1, 0.3, 0.9])), torch.tensor([0.0, 0.5, 1.0]))


def test_band_with_an_end_and_json_round_trip():
    band = three_level_band(start=0.3, mid=0.5, mid_factor=0.25, end=0.9)
    assert [band.factor(t) for t in (0.2, 0.4, 0.7, 0.95)] == [0.0, 0.25, 1.0, 0.0]
    assert TimestepBand.from_json(band.to_json()) == band


@pytest.mark.parametrize("levels, msg", [
    ([], "at least one"),
    ([(0.5, 1.0), (0.2, 0.5)], "must be greater than the previous"),
    ([(1.5, 1.0)], r"t_start must be in \[0, 1\]"),
    ([(0.2, -0.1)], r"factor must be in \[0, 1\]"),
    ([(0.2, float("nan"))], "factor must be"),
])
def test_invalid_bands(levels, msg):
    with pytest.raises(BandError, match=msg):
        TimestepBand(tuple(levels))


def test_invalid_three_level_band():
    with pytest.raises(BandError, match="start <= mid <= end"):
        three_level_band(start=0.7, mid=0.5)


def test_pictures_draw_chinese_prompts_with_a_cjk_font():
    """Titles carry the (Chinese) prompt: Pillow's own font draws every CJK character as the same box, the
    font the pictures pick draws distinct glyphs (scripts/install_browser.sh installs fonts-wqy-zenhei)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from moe_core.schedule import default_font, font_for

    def ink(ch: str, font) -> np.ndarray:
        im = Image.new("L", (40, 30), 0)
        ImageDraw.Draw(im).text((2, 2), ch, fill=255, font=font)
        return np.asarray(im)

    assert np.array_equal(ink("剪", default_font(20)), ink("刀", default_font(20))), "the default font has no CJK"
    assert not np.array_equal(ink("剪", font_for("剪", 20)), ink("刀", font_for("刀", 20)))
    assert font_for("Scissors", 20).getname() == default_font(20).getname()  # Latin text keeps the default
