"""serve/config.yaml and the application builder, without starting Ray."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.app import app
from serve.schemas import MODEL_DIR_ENV, ServeSettings
from vitbirds.errors import ConfigError
from vitbirds.paths import repo_root

CONFIG = repo_root() / "serve" / "config.yaml"


@pytest.fixture()
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_config_is_a_valid_serve_deploy_schema(config):
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "serve.app:app"
    assert {d.name for d in application.deployments} == {
        "Ingress",
        "Classifier",
        "AttentionExplainer",
    }


def test_config_args_are_application_settings(config, monkeypatch):
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    settings = ServeSettings.from_args(config["applications"][0]["args"])
    assert settings.max_body_bytes == 10 * 1024 * 1024


def test_config_queues_are_bounded_and_fit_a_full_batch(config):
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    for deployment in deployments.values():
        assert deployment["max_queued_requests"] > 0  # overload gets a 503, not a queue
    classifier = deployments["Classifier"]
    assert classifier["max_ongoing_requests"] >= classifier["user_config"]["max_batch_size"]


def test_environment_overrides_the_model_dir(monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, "gs://bucket/models/v7")
    assert ServeSettings.from_args({"model_dir": "models/latest"}).model_dir == (
        "gs://bucket/models/v7"
    )


def test_unknown_args_and_missing_model_are_config_errors(monkeypatch):
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    with pytest.raises(ConfigError, match="max_body_byte"):
        ServeSettings.from_args({"model_dir": "m", "max_body_byte": 1})
    with pytest.raises(ConfigError, match=MODEL_DIR_ENV):
        ServeSettings.from_args({})
    with pytest.raises(ConfigError, match="max_body_bytes"):
        ServeSettings(model_dir="m", max_body_bytes=0)


def test_builder_composes_the_three_deployments(monkeypatch, tmp_path: Path):
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    application = app({"model_dir": str(tmp_path)})
    ingress = application._bound_deployment
    assert ingress.name == "Ingress"
    bound = [arg._bound_deployment.name for arg in ingress.init_args[:2]]
    assert bound == ["Classifier", "AttentionExplainer"]
