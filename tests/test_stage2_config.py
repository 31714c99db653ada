"""Stage 2's config: the shipped file spells out the defaults (the seeds' stage-2 settings), the docs list
every key of stage 2's own sections, and bad values name their key."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, config_to_dict, load_config, to_toml, valid_keys
from training.stage2 import main
from training.stage2_config import Stage2Config

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_is_the_defaults_and_the_defaults_are_the_seeds():
    cfg = load_config(Stage2Config, REPO / "training" / "configs" / "stage2.toml")
    assert config_to_dict(cfg) == config_to_dict(Stage2Config())
    t = cfg.train
    assert (t.epochs, t.learning_rate, t.batch_size, t.grad_accum) == (20.0, 5e-5, 1, 8)
    assert (cfg.objective.t_min, cfg.objective.t_max) == (0.2, 1.0)
    lw = cfg.loss
    assert (lw.roi, lw.teacher_kl, lw.entropy, lw.load_balance) == (3.0, 1.0, 0.02, 0.1)
    assert (cfg.router.hidden, cfg.moe.top_k) == (64, 2)


def test_docs_list_every_key_of_stage2s_own_sections():
    text = (REPO / "docs" / "stage2.md").read_text(encoding="utf-8")
    own = [k for k in valid_keys(Stage2Config) if k.split(".")[0] in ("moe", "router", "loss", "validation",
                                                                          "monitor")]
    missing = [k for k in own if f"`{k}`" not in text]
    assert own and not missing, missing


def test_printed_config_round_trips_and_custom_keywords_parse(tmp_path):
    cfg = load_config(Stage2Config, overrides=['moe.expert_names=["Cut", "Burn"]', 'moe.top_k=1',
                                               'moe.expert_keywords=["Cut: 剪刀，scissors", "Burn: 电凝"]',
                                               'moe.no_instrument="Cut"'])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    assert config_to_dict(load_config(Stage2Config, path)) == config_to_dict(cfg)
    assert cfg.keywords() == {"Cut": ["剪刀", "scissors"], "Burn": ["电凝"]}


@pytest.mark.parametrize("override, key", [
    ('moe.expert_names=["Only"]', "moe.expert_names"),
    ('moe.expert_keywords=["Nobody: x"]', "moe.expert_keywords"),
    ('moe.no_instrument="Forceps"', "moe.no_instrument"),
    ("moe.top_k=5", "moe.top_k"),
    ("router.max_gate=1.5", "router.max_gate"),
    ("validation.holdout_fraction=1.0", "validation.holdout_fraction"),
    ("loss.temporal=-1", "loss.temporal"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Stage2Config, overrides=[override])


def test_cli_without_a_base_or_config_says_what_to_give(tmp_path, capsys):
    assert main([]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["--print-config"]) == 0
    assert "[router]" in capsys.readouterr().out
