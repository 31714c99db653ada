"""Training config: seeds' defaults, unknown keys rejected with the valid ones listed, CLI overrides."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from training.config import (DEMO_TOML, ConfigError, Stage1Config, apply_overrides, config_to_dict, load_config,
                             split_dotted_flags, to_toml, valid_keys)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "training" / "configs"


def test_defaults_are_the_seeds_stage1_hyperparameters():
    cfg = load_config(Stage1Config)
    assert (cfg.lora.rank_q, cfg.lora.rank_k, cfg.lora.rank_v, cfg.lora.rank_o, cfg.lora.rank_ffn) == (8, 4, 4, 4, 4)
    assert cfg.lora.alpha == 1.0 and cfg.lora.target_blocks == "last_8" and cfg.lora.ffn_blocks == "last_3"
    assert (cfg.train.epochs, cfg.train.learning_rate, cfg.train.batch_size, cfg.train.grad_accum) == (10, 1e-4, 1, 8)
    assert cfg.objective.roi_weight == 3.0 and cfg.model.boundary == "auto"  # the family's: 0.875 for T2V
    assert (cfg.objective.t_min, cfg.objective.t_max) == (0.0, 1.0)


def test_default_targets_match_moe_core_for_a14b_and_small_models():
    from moe_core.targets import default_targets
    from training.adapters import TargetSpec, resolve_blocks

    lo = load_config(Stage1Config).lora
    for layers in (40, 10, 3):
        spec = TargetSpec(resolve_blocks(lo.target_blocks, layers, "t"), resolve_blocks(lo.ffn_blocks, layers, "f"),
                          tuple(lo.projections), lo.ranks(), lo.alpha)
        assert spec.modules() == default_targets(layers)
        assert list(spec.modules()) == list(default_targets(layers))  # same order too


def test_shipped_configs_load_and_demo_matches_the_embedded_one():
    stage1 = load_config(Stage1Config, CONFIGS / "stage1.toml")
    assert config_to_dict(stage1) == config_to_dict(Stage1Config())  # the file spells out the defaults
    demo_file = load_config(Stage1Config, CONFIGS / "demo.toml")
    assert config_to_dict(demo_file) == config_to_dict(load_config(Stage1Config, text=DEMO_TOML))
    assert demo_file.demo.enabled and demo_file.train.mixed_precision == "no"


def test_unknown_keys_and_sections_list_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rat = 1e-4\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(Stage1Config, bad)
    msg = str(e.value)
    assert "bad.toml" in msg and "train.learning_rat" in msg and "learning_rate" in msg and "grad_accum" in msg
    bad.write_text("[optimizer]\nlr = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \[optimizer\].*\[train\]"):
        load_config(Stage1Config, bad)


@pytest.mark.parametrize("text, needle", [
    ("[train]\nbatch_size = 1.5\n", "train.batch_size must be an integer"),
    ("[train]\nlr_scheduler = \"linear\"\n", "must be one of \"constant\", \"cosine\""),
    ("[objective]\nt_min = 0.5\nt_max = 0.2\n", "t_min < t_max"),
    ("[model]\ndit = \"a\"\ndit_high = \"b\"\ndit_low = \"c\"\n", "either model.dit"),
    ("[model]\ndit_high = \"b\"\n", "needs both"),
    ("[data]\nmax_frames = 80\n", "4n+1"),
    ("[lora]\nprojections = [\"self_attn.x\"]\n", "unknown ['self_attn.x']"),
    ("[train\n", "invalid TOML"),
])
def test_bad_values_are_explained(tmp_path, text, needle):
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(Stage1Config, path)
    assert needle in str(e.value)


def test_overrides_set_and_dotted_flags():
    rest, dotted = split_dotted_flags(["--config", "x.toml", "--train.learning_rate", "5e-5",
                                       "--lora.target_blocks=[30, 31]", "--resume"], Stage1Config)
    assert rest == ["--config", "x.toml", "--resume"]
    cfg = load_config(Stage1Config, overrides=dotted + ["model.dit=/models/wan 2.1/dit.safetensors",
                                                         "train.mixed_precision=no", "output.plot=false"])
    assert cfg.train.learning_rate == 5e-5 and cfg.lora.target_blocks == [30, 31]
    assert cfg.model.dit == "/models/wan 2.1/dit.safetensors" and cfg.train.mixed_precision == "no"
    assert cfg.output.plot is False
    with pytest.raises(ConfigError, match="did you mean train.learning_rate"):
        apply_overrides({}, ["learning_rate=1"], Stage1Config)
    with pytest.raises(ConfigError, match="no section"):
        split_dotted_flags(["--trian.learning_rate", "1"], Stage1Config)


@pytest.mark.parametrize("override, meant", [
    ("train.learning_rat=1", "train.learning_rate"),  # a letter missing
    ("trian.learning_rate=1", "train.learning_rate"),  # the section misspelled
    ("learning_rate=1", "train.learning_rate"),  # no section
    ("data.manifets=m.jsonl", "data.manifest"), ("objective.roi_wieght=2", "objective.roi_weight"),
    ("model.dit_hihg=x", "model.dit_high"), ("output.save_evry=5", "output.save_every"),
])
def test_a_misspelled_override_suggests_the_close_key_not_the_whole_schema(override, meant):
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, [override], Stage1Config)
    msg = str(e.value)
    assert f"did you mean {meant}?" in msg and override in msg
    others = [k for k in valid_keys(Stage1Config) if k != meant and k in msg.replace(meant, "")]
    assert len(others) <= 2, f"the message lists {others}"  # not ~70 keys


def test_unknown_keys_without_a_close_match_list_their_section_only():
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, ["train.lr=1"], Stage1Config)
    msg = str(e.value)
    assert "valid keys in [train]:" in msg and "learning_rate" in msg and "model.dit" not in msg
    assert "data." not in msg and "--print-config" in msg
    with pytest.raises(ConfigError, match=r"with sections model, data, lora"):
        apply_overrides({}, ["xyz=1"], Stage1Config)
    with pytest.raises(ConfigError, match=r"did you mean --train.learning_rate\?"):
        split_dotted_flags(["--trian.learning_rate", "1"], Stage1Config)
    with pytest.raises(ConfigError, match=r"did you mean \[train\]\?"):
        load_config(Stage1Config, text="[trian]\nseed = 1\n")
    with pytest.raises(ConfigError, match=r"did you mean train.grad_accum\? valid keys in \[train\]"):
        load_config(Stage1Config, text="[train]\ngrad_acum = 1\n")


def test_printed_config_round_trips(tmp_path):
    cfg = load_config(Stage1Config, overrides=["train.max_steps=7", "lora.target_blocks=4", "model.dit=x"])
    path = tmp_path / "out.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    again = load_config(Stage1Config, path)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert len(valid_keys(Stage1Config)) == sum(len(dataclasses.fields(getattr(cfg, s)))
                                                for s in config_to_dict(cfg))


def test_docs_list_every_key():
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    missing = [k for k in valid_keys(Stage1Config) if f"`{k}`" not in text]
    assert not missing, f"docs/training.md lacks {missing}; regenerate its table with training.config.reference_table"
