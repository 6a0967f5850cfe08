"""One source for run settings: the library's defaults are the CLIs' defaults, and `--help`
describes every flag with its default (the preset's values included), never "None"."""

import argparse
import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest

from jobs import evaluate as evaluate_cli
from jobs import monitor as monitor_cli
from jobs import train as train_cli
from jobs import tune as tune_cli
from vitbirds.data.sources import DatasetSplits
from vitbirds.devices import DEVICES
from vitbirds.errors import ConfigError
from vitbirds.presets import get_recipe
from vitbirds.settings import (
    DEFAULT_PRESET,
    RECIPE_FLAGS,
    RecipeSettings,
    RunSettings,
    TrainSettings,
)
from vitbirds.training.runner import build_metadata
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


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


PRESET_DEFAULT = re.compile(r"\(default: from the preset \((?P<preset>[^:]+): (?P<value>[^)]+)\)\)")


def test_every_recipe_default_in_train_help_is_what_a_run_records_in_its_model() -> None:
    """The default `jobs/train.py --help` names for --epochs, --lr, ... is the value a run given
    no flags writes into its model's metadata."""
    args = train_cli.parse_args([])
    recipe = train_cli.build_recipe(args)
    classes = [f"bird{i}" for i in range(3)]
    splits = DatasetSplits(classes, [], [], [], source="imagefolder", root=Path("/data"))
    metadata = build_metadata(recipe, splits, name="defaults")
    recorded = {
        "model": metadata.model,
        "data": metadata.extra["data_config"],
        "train": metadata.extra["train_config"],
    }
    actions = _flag_actions(train_cli.build_parser())
    for name, sections in RECIPE_FLAGS.items():
        shown = PRESET_DEFAULT.search(actions["--" + name.replace("_", "-")].help)
        assert shown is not None, name
        assert shown["preset"] == metadata.extra["preset"] == DEFAULT_PRESET
        for section in sections:
            assert shown["value"] == str(recorded[section][name]), (name, section)


def test_every_run_setting_default_in_train_help_is_what_the_job_runs_with() -> None:
    actions = _flag_actions(train_cli.build_parser())
    defaults = TrainSettings()
    for spec in fields(TrainSettings):
        help_text = actions["--" + spec.name.replace("_", "-")].help
        value = getattr(defaults, spec.name)
        if value is None or spec.name == "cpus_per_worker":  # decided at run time, said so
            assert "default:" in help_text, spec.name
        else:
            assert f"(default: {value})" in help_text, spec.name


# Flags of other programs that README shows: ray job submit, ray start, mlflow ui, ruff, pytest.
OTHER_PROGRAMS_FLAGS = {"--working-dir", "--head", "--backend-store-uri", "--check", "--help"}


def _flags_in_the_code() -> set[str]:
    """Every flag a command of this repository accepts: literals in jobs/, cluster/, serve/ and
    .ci/, and the flags built from settings and recipe fields."""
    root = Path(__file__).resolve().parent.parent
    found = set()
    for folder in ("jobs", "cluster", "serve", ".ci"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.update(re.findall(r"^--[a-z][a-z0-9-]*$", node.value))
    for settings_type in (TrainSettings, RecipeSettings, SweepConfig):
        found.update("--" + spec.name.replace("_", "-") for spec in fields(settings_type))
    found.update("--" + name.replace("_", "-") for name in RECIPE_FLAGS)
    return found


def test_every_flag_the_readme_names_exists() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", readme))
    assert named - _flags_in_the_code() - OTHER_PROGRAMS_FLAGS == set()
