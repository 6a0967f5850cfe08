"""Where a job's outputs go: the current directory here, $VITBIRDS_HOME inside a Ray job that
runs from Ray's copy of the working directory (`vitbirds.paths.output_path`)."""

import json
from pathlib import Path

import pytest

from vitbirds.paths import in_ray_job_working_dir, output_note, output_path

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@pytest.fixture
def local(monkeypatch, tmp_path) -> Path:
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def ray_job(monkeypatch, tmp_path) -> Path:
    """A driver as `ray job submit --working-dir .` starts it: in the unpacked copy."""
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    runtime_env = {"working_dir": "gcs://_ray_pkg_abc.zip"}
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"runtime_env": runtime_env, "metadata": {}}))
    home = tmp_path / "home"
    monkeypatch.setenv("VITBIRDS_HOME", str(home))
    return home


def test_a_relative_output_is_relative_to_the_current_directory_here(local) -> None:
    assert not in_ray_job_working_dir()
    assert output_path("models/js") == str(local / "models" / "js")
    assert output_note() is None


def test_a_relative_output_of_a_ray_job_lands_under_vitbirds_home(ray_job) -> None:
    assert in_ray_job_working_dir()
    assert output_path("models/js") == str(ray_job / "models" / "js")
    assert str(ray_job) in output_note()


def test_the_unpacked_working_directory_alone_is_recognised(ray_job, monkeypatch) -> None:
    monkeypatch.delenv(RAY_JOB_ENV)
    assert output_path("runs") == str(ray_job / "runs")


def test_vitbirds_home_defaults_to_a_folder_in_the_home_directory(ray_job, monkeypatch) -> None:
    monkeypatch.delenv("VITBIRDS_HOME")
    assert output_path("runs") == str(Path.home() / "vitbirds" / "runs")


@pytest.mark.parametrize("path", ["gs://bucket/runs", "/abs/models/latest"])
def test_uris_and_absolute_paths_pass_unchanged(ray_job, path) -> None:
    assert output_path(path) == path


def test_no_path_stays_no_path(ray_job) -> None:
    assert output_path(None) is None
