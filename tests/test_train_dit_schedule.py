"""A14B options of the training loop on a pair of tiny DiTs: per-DiT learning rates (AdamW parameter groups),
per-DiT step limits, and DiT schedules (one DiT per optimizer step, chosen from (seed, step), exact resume),
with the switch count the benchmark simulates for A14B sizes checked against a real run."""
from __future__ import annotations

import json

import pytest
import torch

import train_fixtures as tf
from training.dit_schedule import DiTSchedule, simulate_switches
from training.objective import TimestepSampler
from training.stage1 import run_stage1, setup_stage1

QUIET = lambda *_: None  # noqa: E731
A14B = [(0.875, 1.0), (0.0, 0.875)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tf.Workspace:
    return tf.make_workspace(tmp_path_factory.mktemp("sched_ws"))


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _ups(trainer, name):
    return {n: p.detach().clone() for n, p in trainer.dits.by_name(name).bank.named_trainable() if n.endswith(".up")}


def test_per_dit_learning_rates_are_adamw_groups(ws, tmp_path):
    """AdamW's first update of a parameter is lr * g / (|g| + eps): with a negligible eps, the fresh LoRA's `up`
    (zero, with a non-zero gradient) moves by exactly its group's learning rate, so each DiT's steps show its rate."""
    cfg = tf.stage1_config(ws, tmp_path / "lr", pair=True,
                           train={"max_steps": 1, "grad_accum": 8, "learning_rate": 1e-2, "learning_rate_high": 1e-3,
                                  "weight_decay": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0, "adam_eps": 1e-20,
                                  "lr_scheduler": "constant"})
    trainer = setup_stage1(cfg, log_fn=QUIET).trainer
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups == {"high_noise": 1e-3, "low_noise": 1e-2}  # learning_rate_low = 0: learning_rate
    before = {n: _ups(trainer, n) for n in ("high_noise", "low_noise")}
    metrics = trainer.train_step()
    assert metrics["samples_high_noise"] > 0 and metrics["samples_low_noise"] > 0
    assert (metrics["lr_high_noise"], metrics["lr_low_noise"], metrics["lr"]) == (1e-3, 1e-2, 1e-2)
    for name, lr in (("high_noise", 1e-3), ("low_noise", 1e-2)):
        steps = torch.cat([(p - before[name][n]).abs().flatten() for n, p in _ups(trainer, name).items()])
        moved = steps[steps > 0]
        assert moved.numel() > 0.9 * steps.numel()
        torch.testing.assert_close(moved, torch.full_like(moved, lr), rtol=1e-5, atol=0)

    # the schedule scales every group; stage 2's extra parameters (router) get the base learning rate
    from training.loop import LoopSettings, Trainer

    warm = LoopSettings(total_steps=4, learning_rate=1e-2, warmup_steps=4, dit_learning_rates={"high_noise": 1e-3})
    router = torch.nn.Parameter(torch.zeros(3))
    t2 = Trainer(trainer.dits, trainer.dataset, trainer.sampler, warm, tmp_path / "t2", {}, extra_parameters=[router])
    assert [(g["name"], g["lr"]) for g in t2.optimizer.param_groups] == [
        ("high_noise", 1e-3 / 4), ("low_noise", 1e-2 / 4), ("extra", 1e-2 / 4)]
    assert t2.optimizer.param_groups[2]["params"] == [router]


def test_max_steps_per_dit_freezes_that_lora(ws, tmp_path):
    cfg = tf.stage1_config(ws, tmp_path / "cap", pair=True, train={"max_steps": 4, "grad_accum": 4,
                                                                   "max_steps_high": 2},
                           output={"save_every": 2})
    result = run_stage1(cfg, log_fn=QUIET)
    lines = _lines(result.metrics)
    assert [x["samples_high_noise"] for x in lines[2:]] == [0, 0]
    assert [x["samples_low_noise"] for x in lines[2:]] == [4, 4]
    assert all(float(x["t_mean"]) < 0.875 for x in lines[2:])  # its side of the range is no longer drawn
    assert sum(x["samples_high_noise"] for x in lines[:2]) > 0
    step2 = tf.lora_tensors(result.out_dir / "checkpoints" / "step_000002.safetensors")
    final = tf.lora_tensors(result.out_dir / "checkpoints" / "final.safetensors")
    high = [k for k in final if k.startswith("high_noise.")]
    low = [k for k in final if k.startswith("low_noise.") and k.endswith("lora_up")]
    assert high and all(torch.equal(final[k], step2[k]) for k in high)  # frozen after step 2
    assert any(not torch.equal(final[k], step2[k]) for k in low)  # the other one kept training
    with pytest.raises(Exception, match="no DiT trains after step 2"):
        setup_stage1(tf.stage1_config(ws, tmp_path / "none", pair=True,
                                      train={"max_steps": 4, "max_steps_high": 2, "max_steps_low": 2}), log_fn=QUIET)


def test_schedules_choose_one_dit_per_step_from_seed_and_step():
    sampler = TimestepSampler("shift", 3.0)
    share = sampler.fraction_above(0.875)
    alt = DiTSchedule("alternate", sampler, A14B, seed=0)
    assert [alt.step_dit(k) for k in range(6)] == [0, 1, 0, 1, 0, 1]
    prop = DiTSchedule("proportional", sampler, A14B, seed=0)
    picks = [prop.step_dit(k) for k in range(4000)]
    assert abs(picks.count(0) / 4000 - share) < 0.025  # the high-noise DiT's share of the t distribution
    assert picks == [DiTSchedule("proportional", sampler, A14B, seed=0).step_dit(k) for k in range(4000)]
    assert picks != [DiTSchedule("proportional", sampler, A14B, seed=1).step_dit(k) for k in range(4000)]
    g = torch.Generator().manual_seed(0)
    high = prop.sampler_for(picks.index(0)).sample(g, 2000)
    low = prop.sampler_for(picks.index(1)).sample(g, 2000)
    assert high.min() >= 0.875 and low.max() < 0.875
    # within its range, a DiT's t has the run's (truncated) density: same quantiles as rejection sampling
    full = sampler.sample(torch.Generator().manual_seed(1), 20000)
    ref = full[full >= 0.875]
    for q in (0.25, 0.5, 0.75):
        assert abs(torch.quantile(high, q) - torch.quantile(ref, q)) < 0.01
    per_sample = DiTSchedule("per_sample", sampler, A14B, seed=0)
    assert per_sample.step_dit(3) is None and per_sample.sampler_for(3) is sampler
    blocks = DiTSchedule("alternate", sampler, A14B, seed=0, switch_every=3)
    assert [blocks.step_dit(k) for k in range(8)] == [0, 0, 0, 1, 1, 1, 0, 0]
    prop3 = DiTSchedule("proportional", sampler, A14B, seed=0, switch_every=3)
    assert all(prop3.step_dit(k) == prop3.step_dit(3 * (k // 3)) for k in range(60))
    # switches per step with 8 samples per step (the DiT on the device goes first: at most 1 per step)
    sw = {(p, n): sum(simulate_switches(DiTSchedule(p, sampler, A14B, seed=0, switch_every=n), 8, 600)) / 600
          for p, n in (("per_sample", 1), ("alternate", 1), ("alternate", 4), ("proportional", 1),
                       ("proportional", 4))}
    assert sw["per_sample", 1] > 0.85  # nearly every step: what the issue measured
    assert sw["alternate", 1] == pytest.approx(1.0, abs=0.01) and sw["alternate", 4] == pytest.approx(0.25, abs=0.01)
    expected = 2 * share * (1 - share)  # proportional: the next step's DiT differs from this one's
    assert sw["proportional", 1] == pytest.approx(expected, abs=0.06)
    assert sw["proportional", 4] == pytest.approx(expected / 4, abs=0.03)


def test_one_dit_per_step_trains_resumes_exactly_and_matches_the_simulated_switches(ws, tmp_path):
    train = {"max_steps": 6, "grad_accum": 4, "lr_scheduler": "constant", "warmup_steps": 0}
    model = {"dit_schedule": "proportional"}
    ref = run_stage1(tf.stage1_config(ws, tmp_path / "ref", pair=True, model=model, train=train,
                                      output={"save_every": 3}), log_fn=QUIET)
    lines = _lines(ref.metrics)
    per_step = [(x["samples_high_noise"], x["samples_low_noise"]) for x in lines]
    assert all(s in ((4, 0), (0, 4)) for s in per_step) and len(set(per_step)) == 2, per_step
    schedule = ref.trainer.schedule
    assert [0 if h else 1 for h, _ in per_step] == [schedule.step_dit(k) for k in range(6)]

    def crash(step, metrics):
        if step == 4:
            raise RuntimeError("simulated crash")

    cfg = tf.stage1_config(ws, tmp_path / "run", pair=True, model=model, train=train, output={"save_every": 3})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage1(cfg, callbacks=[crash], log_fn=QUIET)
    resumed = run_stage1(cfg, resume="auto", log_fn=QUIET)
    for name in ref.loras:
        a, b = tf.lora_tensors(ref.loras[name]), tf.lora_tensors(resumed.loras[name])
        assert all(torch.equal(a[k], b[k]) for k in a), name
    keep = lambda x: {k: v for k, v in x.items() if k not in ("step_time_s", "samples_per_s", "dit_load_s",  # noqa
                                                              "dit_loads")}
    assert [keep(x) for x in lines] == [keep(x) for x in _lines(resumed.metrics)]

    # the switches the benchmark simulates are the ones a real run makes (per-sample scheduling here)
    setup = setup_stage1(tf.stage1_config(ws, tmp_path / "sw", pair=True, train=train), log_fn=QUIET)
    counted = []
    original = setup.trainer.dits.activate

    def counting(dit):
        if setup.trainer.dits._active is not None and setup.trainer.dits._active is not dit:
            counted[-1] += 1
        return original(dit)

    setup.trainer.dits.activate = counting
    for _ in range(6):
        counted.append(0)
        setup.trainer.train_step()
    assert counted == simulate_switches(setup.trainer.schedule, 4, 6)
    assert sum(counted) > 0
