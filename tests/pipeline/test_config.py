import re

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.config import ConfigError, PipelineConfig, load_config


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = PipelineConfig()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert cfg.train.time_budget_minutes is None  # no wall-clock budget unless asked
    assert cfg.model.base_channels is None and cfg.train.batch_size is None  # planned for the device


def test_yaml_values_override_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  optimizer: sgd\nmodel:\n  base_channels: 8\n")
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.optimizer, cfg.model.base_channels) == (3, "sgd", 8)
    assert cfg.train.lr == PipelineConfig().train.lr


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": {"lrr": 0.1}}, ["unknown key 'train.lrr'", "valid keys in train:", "lr,", "weight_decay"]),
        ({"trainer": {}}, ["unknown key 'trainer'", "data, preprocess, model, train, infer, tracking"]),
        ({"preprocess": {"patchsize": 64}}, ["unknown key 'preprocess.patchsize'", "patch_size"]),
    ],
)
def test_unknown_keys_list_the_valid_options(data, expected):
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_dict(data)
    for text in expected:
        assert text in str(err.value)


@pytest.mark.parametrize(
    ("data", "field", "value"),
    [
        ({"train": {"device": "tpu"}}, "train.device", "'tpu'"),
        ({"train": {"precision": "fp8"}}, "train.precision", "'fp8'"),
        ({"train": {"lr": -1}}, "train.lr", "-1"),
        ({"train": {"epochs": 0}}, "train.epochs", "0"),
        ({"preprocess": {"patch_size": 100}}, "preprocess.patch_size", "100"),
        ({"model": {"norm": "group"}}, "model.norm", "'group'"),
        ({"train": {"optimizer": "adam"}}, "train.optimizer", "'adam'"),
        ({"infer": {"mirror_axes": ["H", "Z"]}}, "infer.mirror_axes", "'Z'"),
        ({"infer": {"mirror_axes": ["W", "W"]}}, "infer.mirror_axes", "['W', 'W']"),
    ],
)
def test_bad_values_name_the_field_and_value(data, field, value):
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_dict(data)
    message = str(err.value)
    assert field in message and value in message


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="slices_per_volume"):
        PipelineConfig.from_dict({"train": {"batch_size": 10, "slices_per_volume": 4}})
    with pytest.raises(ConfigError, match=r"data\.fold"):
        PipelineConfig.from_dict({"data": {"folds": 3, "fold": 3}})


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_replace_rejects_unknown_sections():
    cfg = PipelineConfig().replace(train={"epochs": 2})
    assert cfg.train.epochs == 2
    with pytest.raises(ConfigError, match="valid sections"):
        PipelineConfig().replace(trian={"epochs": 2})


def test_cli_config_show_prints_the_defaults_as_yaml():
    from pipeline.cli import app

    result = CliRunner().invoke(app, ["config", "--show"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == PipelineConfig().to_dict()


@pytest.mark.parametrize("k", [None, 1, 3, 5, 15])
def test_context_slices_accepts_planned_off_and_odd_counts(k):
    assert PipelineConfig.from_dict({"preprocess": {"context_slices": k}}).preprocess.context_slices == k
    assert PipelineConfig().preprocess.context_slices is None  # planned by default


@pytest.mark.parametrize(
    ("k", "message"),
    [
        (2, "preprocess.context_slices must be odd"),
        (4, "1 (off), 3, 5, ... or null (planned); got 4"),
        (0, "preprocess.context_slices: Input should be greater than or equal to 1"),
        (17, "preprocess.context_slices: Input should be less than or equal to 15"),
        ("three", "preprocess.context_slices"),
    ],
)
def test_context_slices_refuses_even_and_out_of_range_counts(k, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        PipelineConfig.from_dict({"preprocess": {"context_slices": k}})
