"""One source for run settings: the library's defaults are the CLIs' defaults, and `--help`
describes every flag with its default (the preset's values included), never "None"."""

import argparse

import pytest

from jobs import evaluate as evaluate_cli
from jobs import monitor as monitor_cli
from jobs import train as train_cli
from jobs import tune as tune_cli
from vitbirds.devices import DEVICES
from vitbirds.errors import ConfigError
from vitbirds.presets import get_recipe
from vitbirds.settings import DEFAULT_PRESET, RunSettings, TrainSettings
from vitbirds.training.sweep import SweepConfig

CLIS = {"train": train_cli, "tune": tune_cli, "evaluate": evaluate_cli, "monitor": monitor_cli}


@pytest.fixture(params=sorted(CLIS))
def help_text(request, capsys) -> str:
    with pytest.raises(SystemExit):
        CLIS[request.param].parse_args(["--help"])
    return capsys.readouterr().out


def test_help_never_shows_a_default_of_none(help_text) -> None:
    assert "(default: None)" not in help_text


def test_help_ends_with_examples(help_text) -> None:
    assert "examples:" in help_text and "python jobs/" in help_text.split("examples:")[1]


@pytest.mark.parametrize("name", sorted(CLIS))
def test_every_flag_is_described(name, monkeypatch) -> None:
    captured = {}
    real_parse = argparse.ArgumentParser.parse_args

    def keep(parser, *args, **kwargs):
        captured["parser"] = parser
        return real_parse(parser, ["--help"])

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep)
    with pytest.raises(SystemExit):
        CLIS[name].parse_args([])
    undescribed = [
        action.option_strings
        for action in captured["parser"]._actions
        if action.option_strings and not action.help
    ]
    assert undescribed == []


def test_train_help_shows_the_default_presets_values(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal's width
    epochs = get_recipe(DEFAULT_PRESET).train.epochs
    text = train_cli.build_parser().format_help()
    assert f"from the preset ({DEFAULT_PRESET}: {epochs})" in text


def test_train_and_tune_default_to_the_same_preset() -> None:
    assert train_cli.parse_args([]).preset == DEFAULT_PRESET
    assert SweepConfig(name="s").preset == DEFAULT_PRESET
    assert tune_cli.build_sweep(tune_cli.parse_args(["--name", "s"])).preset == DEFAULT_PRESET


def test_cli_defaults_are_the_settings_defaults() -> None:
    train = train_cli.parse_args([])
    defaults = TrainSettings()
    for name in ("num_workers", "device", "storage_path", "tracker", "max_failures",
                 "keep_checkpoints", "evaluate"):  # fmt: skip
        assert getattr(train, name) == getattr(defaults, name), name
    sweep = tune_cli.build_sweep(tune_cli.parse_args(["--name", "s"]))
    for name in ("num_workers", "device", "cpus_per_worker", "storage_path", "tracker"):
        assert getattr(sweep, name) == getattr(RunSettings(), name), name


def test_the_device_choices_are_the_settings_devices() -> None:
    assert train_cli.parse_args(["--device", "mps"]).device == "mps"
    with pytest.raises(ConfigError, match="device must be one of cpu, cuda, mps"):
        RunSettings(device="tpu")
    assert DEVICES == ("cpu", "cuda", "mps")
