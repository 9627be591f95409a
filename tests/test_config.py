import dataclasses

import pytest
import yaml

from contrastive.config import Config, ConfigError, load_config, merge, parse_overrides, save_config


def test_defaults_have_the_documented_keys():
    cfg = Config()
    for dotted in ("data.train", "data.val", "model.name", "train.steps", "train.batch_size",
                   "train.checkpoint_every", "train.resume", "train.seed"):
        section, key = dotted.split(".")
        assert hasattr(getattr(cfg, section), key), dotted


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 50\n  batch_size: 64\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["train.steps=7", "optim.lr=1e-4", "data.train=a/{0..3}.tar", "model.aug={scale: [0.5, 1]}"])
    assert cfg.train.steps == 7
    assert cfg.train.batch_size == 64
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.train == "a/{0..3}.tar"
    assert cfg.model.aug == {"scale": [0.5, 1]}
    assert cfg.train.seed == Config().train.seed


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.stepz=3"])
    msg = str(e.value)
    assert "train.stepz" in msg and "steps" in msg and "batch_size" in msg
    path = tmp_path / "bad.yaml"
    path.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*data, model"):
        load_config(path)


@pytest.mark.parametrize("override,message", [
    ("train.steps=ten", "integer"),
    ("train.steps=0", "> 0"),
    ("optim.lr=true", "number"),
    ("data.resampled=maybe", "true or false"),
    ("loss.name=focal", "infonce"),
    ("loss.positives=labels", "pair, caption or class"),
    ("train", "dotted.key=value"),
    ("train=3", "mapping"),
])
def test_bad_values_raise_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_int_is_accepted_for_float_and_types_are_checked():
    cfg = merge(Config(), {"optim": {"lr": 1}})
    assert isinstance(cfg.optim.lr, float)


def test_list_of_evaluators_from_yaml(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("eval:\n  every: 5\n  evaluators:\n    - {name: zeroshot, data: x.tar, label_field: shape}\n")
    cfg = load_config(path)
    assert cfg.eval.evaluators[0].label_field == "shape"
    with pytest.raises(ConfigError, match="eval.evaluators\\[0\\].labelfield"):
        load_config(None, ["eval.evaluators=[{labelfield: x}]"])


def test_override_values_are_parsed_as_yaml():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e="]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2], "e": ""}


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=11", "model.name=tiny-vit-32"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 11


def test_every_shipped_config_loads():
    from tests.conftest import REPO

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_positives_other_than_pair_need_infonce():
    with pytest.raises(ConfigError, match="loss.positives=class works with loss.name=infonce, not siglip"):
        load_config(None, ["loss.name=siglip", "model.init_logit_bias=-10", "loss.positives=class"])
