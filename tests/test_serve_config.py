"""serve/config.yaml and the application builder, without starting Ray."""

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.app import app
from serve.schemas import MODEL_DIR_ENV, ServeSettings
from vitbirds.errors import ConfigError
from vitbirds.inference.stand_in import make_model_dir
from vitbirds.lifecycle.store import content_digest
from vitbirds.paths import CACHE_ENV, repo_root

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


def test_builder_resolves_one_model_version_for_the_three_deployments(monkeypatch, tmp_path):
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model_dir = make_model_dir(tmp_path / "latest", ["a", "b"])
    application = app({"model_dir": str(model_dir)})
    ingress = application._bound_deployment
    assert ingress.name == "Ingress"
    classifier, explainer = (arg._bound_deployment for arg in ingress.init_args[:2])
    assert [classifier.name, explainer.name] == ["Classifier", "AttentionExplainer"]
    versions = {ingress.init_args[-1], classifier.init_args[-1], explainer.init_args[-1]}
    assert versions == {ingress.init_args[-1]}
    assert ingress.init_args[-1].sha256 == content_digest(model_dir)


def test_config_gives_the_model_the_most_cpus_and_threads_to_match(config):
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    cpus = {
        name: d["ray_actor_options"]["num_cpus"]
        * d.get("autoscaling_config", {}).get("min_replicas", d.get("num_replicas", 1))
        for name, d in deployments.items()
    }
    assert cpus["Classifier"] > cpus["Ingress"] + cpus["AttentionExplainer"]
    assert sum(cpus.values()) <= 2, "the smallest set of replicas fits a 2-core laptop"
    assert ServeSettings.from_args(config["applications"][0]["args"]).torch_threads is None


def test_config_bounds_requests_and_slow_bodies(config):
    assert 0 < config["http_options"]["request_timeout_s"] <= 120
    settings = ServeSettings.from_args(config["applications"][0]["args"])
    assert settings.body_idle_timeout_s < settings.body_timeout_s <= 60
    ingress = {d["name"]: d for d in config["applications"][0]["deployments"]}["Ingress"]
    assert ingress["max_ongoing_requests"] >= 140 + 64, "140 slow senders leave room for others"
