"""The sweep's Ray-free parts: search space from flags and YAML, the reproduce command, the
concurrency rule, the results table, the plot and the tracker record. No Ray cluster needed."""

import csv
import math

import pytest

from jobs import tune as tune_cli
from vitbirds.errors import ConfigError
from vitbirds.presets import get_recipe
from vitbirds.training import sweep as sweeps


def _sweep(*argv: str) -> sweeps.SweepConfig:
    return tune_cli.build_sweep(tune_cli.parse_args(["--name", "s", *argv]))


def _epochs(*top1: float) -> list[dict[str, float]]:
    return [
        {"epoch": i, "val_top1": value, "val_top5": 1.0, "val_loss": 1.0 - value}
        for i, value in enumerate(top1, start=1)
    ]


def _row(trial_id: str, top1: tuple[float, ...], max_epochs: int, **params) -> sweeps.TrialRow:
    return sweeps.trial_row(
        trial_id=trial_id, params=params, history=_epochs(*top1), max_epochs=max_epochs,
        train_run=f"s-{trial_id}",
    )  # fmt: skip


def test_lr_with_two_values_is_a_log_uniform_range_and_depth_a_list() -> None:
    sweep = _sweep("--depth", "4", "6", "8", "12", "--lr", "1e-4", "3e-3")
    assert sweep.space == {
        "depth": sweeps.Choice((4, 6, 8, 12)),
        "lr": sweeps.LogUniform(1e-4, 3e-3),
    }


def test_lr_choices_is_a_list_and_grid_search_accepts_it() -> None:
    sweep = _sweep("--search", "grid", "--depth", "4", "8", "--lr-choices", "3e-4", "1e-3")
    assert sweep.space["lr"] == sweeps.Choice((3e-4, 1e-3))
    assert sweep.samples == 1 and sweep.swept == ["depth", "lr"]


def test_grid_search_enumerates_lists_and_samples_ranges() -> None:
    from vitbirds.ray_adapter.tune import tune_space

    sweep = _sweep("--search", "grid", "--depth", "4", "8", "--lr", "1e-4", "3e-3")
    space = tune_space(sweep.space, sweep.search)
    assert space["depth"] == {"grid_search": [4, 8]}
    assert (space["lr"].lower, space["lr"].upper) == (1e-4, 3e-3)


def test_bad_value_is_a_usage_error_in_one_line(capsys) -> None:
    assert tune_cli.main(["--depth", "4", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: depth: values must be positive, got [4, 0]"


def test_three_values_for_a_range_flag_is_a_usage_error(capsys) -> None:
    assert tune_cli.main(["--lr", "1e-4", "3e-4", "1e-3"]) == 2
    assert "--lr-choices" in capsys.readouterr().err


def test_yaml_config_is_read_and_flags_override_it(tmp_path) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "name: from-yaml\nepochs: 7\nsearch: optuna\nnum_samples: 5\n"
        "space:\n  depth: [2, 3]\n  lr: {loguniform: [3e-4, 3.0e-3]}\n"
        "  weight_decay: {choice: [0.01, 0.1]}\n"
    )
    sweep = tune_cli.build_sweep(tune_cli.parse_args(["--config", str(config), "--epochs", "3"]))
    assert (sweep.name, sweep.epochs, sweep.search, sweep.samples) == ("from-yaml", 3, "optuna", 5)
    assert sweep.space == {
        "depth": sweeps.Choice((2, 3)),
        "lr": sweeps.LogUniform(3e-4, 3e-3),
        "weight_decay": sweeps.Choice((0.01, 0.1)),
    }


def test_unknown_yaml_setting_is_a_usage_error(tmp_path, capsys) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text("name: x\nepoch: 3\n")
    assert tune_cli.main(["--config", str(config)]) == 2
    assert "unknown sweep settings ['epoch']" in capsys.readouterr().err


def test_sweep_settings_round_trip_through_their_saved_form() -> None:
    sweep = _sweep("--depth", "4", "8", "--lr", "1e-4", "3e-3", "--epochs", "5")
    assert sweeps.SweepConfig.from_dict(sweep.to_dict()) == sweep


def test_impossible_model_in_the_space_is_refused_before_any_trial() -> None:
    sweep = _sweep("--dim", "48", "50")  # vit-test has 3 heads: 50 does not divide
    with pytest.raises(ConfigError, match="impossible model"):
        sweeps.check_space(get_recipe("vit-test"), sweep.space)


def test_reproduce_command_trains_exactly_the_trial_recipe() -> None:
    sweep = _sweep("--preset", "vit-test", "--epochs", "4", "--lr", "1e-4", "3e-3")
    base = tune_cli.recipe_of(tune_cli.train_argv(sweep))
    params = {"depth": 3, "lr": 0.0012345678901234567}
    tune_cli.check_reproducible(sweep, base, params)
    command = tune_cli.reproduce_command(sweep, params, run_name="best")
    assert command.startswith("python jobs/train.py --preset vit-test")
    assert "--depth 3" in command and "--lr 0.0012345678901234567" in command
    assert sweeps.apply_params(base, params).train.lr == 0.0012345678901234567


def test_a_flag_jobs_train_does_not_have_cannot_be_reproduced() -> None:
    with pytest.raises(ConfigError, match=r"jobs/train\.py cannot reproduce"):
        tune_cli.recipe_of(["--no-such-flag", "1"])


def test_concurrency_is_set_by_the_scarcest_resource() -> None:
    assert sweeps.max_concurrent_trials({"CPU": 2.0}, {"CPU": 1.0}) == 2
    assert sweeps.max_concurrent_trials({"CPU": 16.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 2.0}) == 1
    assert (
        sweeps.max_concurrent_trials({"CPU": 1.0}, {"CPU": 4.0}) == 1
    )  # still runs, one at a time


def test_trial_row_tells_completed_from_stopped_and_keeps_the_best_epoch() -> None:
    done = _row("a", (0.2, 0.5, 0.4, 0.45), 4)
    stopped = _row("b", (0.1,), 4)
    assert (done.status, done.epochs, done.val_top1, done.best_epoch) == ("completed", 4, 0.5, 2)
    assert done.last_val_top1 == 0.45
    assert (stopped.status, stopped.epochs) == ("stopped", 1)


def test_an_epoch_reported_again_after_a_resume_counts_once() -> None:
    history = _epochs(0.2, 0.3) + _epochs(0.2, 0.35, 0.4)
    row = sweeps.trial_row(trial_id="a", params={}, history=history, max_epochs=3, train_run="s-a")
    assert row.epochs == 3 and row.val_top1 == 0.4


def test_best_trial_is_a_completed_one_and_asha_savings_count_trial_epochs() -> None:
    error = sweeps.trial_row(
        trial_id="err", params={}, history=[], max_epochs=4, train_run="x", error="E"
    )
    rows = [_row("early", (0.9,), 4), _row("full", (0.1, 0.2, 0.3, 0.6), 4), error]
    assert sweeps.best_trial(rows).trial_id == "full"
    saved = sweeps.compute_saved(rows)
    assert saved["trial_epochs_used"] == 5 and saved["trial_epochs_full"] == 12
    assert saved["stopped_early"] == 1


def test_results_table_is_sorted_by_valid_top1(tmp_path) -> None:
    rows = [
        _row(name, (top1,), 1, depth=depth, lr=1e-3)
        for name, depth, top1 in (("low", 2, 0.2), ("high", 4, 0.7), ("mid", 3, 0.5))
    ]
    csv_path, md_path = sweeps.write_table(rows, ["depth", "lr"], tmp_path)
    records = list(csv.DictReader(csv_path.open()))
    assert [r["trial"] for r in records] == ["high", "mid", "low"]
    assert [r["rank"] for r in records] == ["1", "2", "3"]
    assert math.isclose(float(records[0]["val_top1"]), 0.7)
    assert "| 1 | high | completed | 1/1 | 70.0% |" in md_path.read_text()


def test_plot_is_a_png() -> None:
    rows = [_row("a", (0.2, 0.3), 2, depth=2, lr=1e-4), _row("b", (0.4,), 2, depth=4, lr=1e-3)]
    for row in rows:
        row.parameters, row.flops = 1_000_000 * row.params["depth"], 10**8
    assert sweeps.plot_png(rows, rows[0]).startswith(b"\x89PNG")


class _Recorder:
    """A Tracker that remembers what it was told, and its children."""

    def __init__(self, name: str = "parent") -> None:
        self.name, self.params, self.metrics, self.tags = name, {}, [], {}
        self.children: list[_Recorder] = []
        self.status = None

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path, folder=None):
        pass

    def set_tags(self, tags):
        self.tags.update(tags)

    def child(self, name):
        self.children.append(_Recorder(name))
        return self.children[-1]

    def close(self, status="FINISHED"):
        self.status = status


def test_sweep_is_one_parent_run_with_a_child_run_per_trial() -> None:
    sweep = _sweep("--depth", "2", "4")
    rows = [_row("t1", (0.2, 0.4), 2, depth=2), _row("t2", (0.1,), 2, depth=4)]
    parent = _Recorder()
    sweeps.log_sweep(parent, sweep, rows, best=rows[0], summary={"best_val_top1": 0.4})
    assert [child.name for child in parent.children] == ["s/t1", "s/t2"]
    first, second = parent.children
    assert [step for step, _ in first.metrics[:2]] == [1, 2]
    assert first.tags["status"] == "completed" and second.tags["status"] == "stopped"
    assert all(child.status == "FINISHED" for child in parent.children)
    assert parent.tags["best_trial"] == "t1" and parent.params["sweep"]["name"] == "s"
