"""The model registry: every export is a numbered version of one MLflow registered model, and
aliases say which version does what.

- `challenger` is set when training registers a version: the newest candidate.
- `champion` is moved only by `jobs/promote.py`, after the challenger was shown not to be worse
  on the same labelled photos; Serve and the monitor load `models:/vitbirds@champion`.
- A `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI resolves to one immutable version number
  when it is read, so a deployment pins what it resolved: a later promotion changes nothing under
  a running replica until it is redeployed.

The registry is the MLflow tracking store (`vitbirds.lifecycle.tracking`): the SQLite store under
the storage path, or MLFLOW_TRACKING_URI for a shared server. A version's source is its training
run's `model/` artifact folder (model.safetensors, metadata.json and the monitoring reference
profile): plain files, no pickle or pyfunc flavour, loaded with `vitbirds.model.files.load_model`.
Entry points fetch a version through the model store (`vitbirds.lifecycle.store.fetch_model`).
"""

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from vitbirds.errors import ConfigError, ModelFileError
from vitbirds.lifecycle.tracking import default_mlflow_uri
from vitbirds.model.files import METADATA_FILE, ModelMetadata
from vitbirds.paths import cache_root

DEFAULT_MODEL_NAME = "vitbirds"
CHALLENGER = "challenger"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # the run's artifact folder training logs the export to
SCHEME = "models:/"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelUri:
    """`models:/NAME@ALIAS` (alias set) or `models:/NAME/VERSION` (version set)."""

    name: str
    alias: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        return f"{SCHEME}{self.name}" + (f"@{self.alias}" if self.alias else f"/{self.version}")


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered version, as the registry knows it."""

    name: str
    version: int
    source: str  # artifact URI of the model directory
    run_id: str
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        """The pinned URI: the same files whatever happens to the aliases later."""
        return f"{SCHEME}{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "uri": self.uri,
            "source": self.source,
            "run_id": self.run_id,
            "aliases": list(self.aliases),
        }


def is_model_uri(text: str | Path) -> bool:
    return str(text).startswith(SCHEME)


def parse_model_uri(text: str) -> ModelUri:
    match = _URI.match(text)
    if match is None:
        raise ConfigError(
            f"{text!r} is not a registry URI; expected models:/NAME@ALIAS or models:/NAME/VERSION "
            f"(e.g. models:/{DEFAULT_MODEL_NAME}@{CHAMPION})"
        )
    version = match["version"]
    return ModelUri(match["name"], match["alias"], int(version) if version else None)


def registry_uri(storage_path: str | Path = "runs", tracking_uri: str | None = None) -> str:
    """Where the registry lives: an explicit URI, MLFLOW_TRACKING_URI, else the SQLite store
    under `storage_path` (the one `jobs/train.py --storage-path` writes)."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(storage_path)


def version_tags(metadata: ModelMetadata) -> dict[str, str]:
    """What a reader of the registry wants to see without downloading the model."""
    tags = {
        "vitbirds.version": metadata.version,
        "vitbirds.architecture": metadata.architecture,
        "vitbirds.synthetic": str(metadata.synthetic).lower(),
        "vitbirds.classes": str(len(metadata.class_names)),
        "vitbirds.code_version": metadata.code_version,
    }
    if metadata.data.get("fingerprint"):
        tags["vitbirds.data_fingerprint"] = str(metadata.data["fingerprint"])
    for key, value in metadata.metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            tags[f"metric.{key}"] = f"{value:.6g}"
    return tags


class Registry:
    """One registered model (`name`) in the MLflow store at `tracking_uri`."""

    def __init__(self, tracking_uri: str, name: str = DEFAULT_MODEL_NAME) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.name = name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def register(
        self,
        run_id: str,
        *,
        artifact_path: str = MODEL_ARTIFACT,
        tags: Mapping[str, str] | None = None,
        alias: str | None = CHALLENGER,
    ) -> RegisteredVersion:
        """A new version from the run's logged model folder, with `alias` moved onto it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.name, description="vitbirds bird classifier (safetensors + metadata.json)"
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        created = self.client.create_model_version(
            self.name, source, run_id=run_id, tags=dict(tags or {})
        )
        if alias:
            self.set_alias(alias, int(created.version))
        return self.get(int(created.version))

    def get(self, version: int) -> RegisteredVersion:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version(self.name, str(version))
        except MlflowException as error:
            raise ModelFileError(
                f"{SCHEME}{self.name}/{version}: no such version in {self.tracking_uri}"
            ) from error
        return _version(found)

    def by_alias(self, alias: str) -> RegisteredVersion | None:
        """The version `alias` points to; None when the alias (or the model) does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return _version(self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException as error:
            if error.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                return None
            raise

    def resolve(self, uri: ModelUri) -> RegisteredVersion:
        if uri.version is not None:
            return self.get(uri.version)
        found = self.by_alias(uri.alias or "")
        if found is None:
            raise ModelFileError(
                f"{uri}: registered model {self.name!r} has no alias {uri.alias!r} in "
                f"{self.tracking_uri} (train a model to register a {CHALLENGER}; "
                f"jobs/promote.py makes the {CHAMPION})"
            )
        return found

    def set_alias(self, alias: str, version: int) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(version))

    def tag(self, version: int, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, str(value))

    def download(self, version: RegisteredVersion, cache_dir: str | Path | None = None) -> Path:
        """A local copy of the version's model directory, kept per version (versions never
        change), written beside the cache entry and renamed in so readers never see half."""
        import mlflow.artifacts

        store = sha256(self.tracking_uri.encode()).hexdigest()[:12]
        root = Path(cache_dir or cache_root() / "registry")
        target = root / store / version.name / str(version.version)
        if (target / METADATA_FILE).is_file():
            return target
        staging = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            fetched = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source,
                    dst_path=str(staging),
                    tracking_uri=self.tracking_uri,
                )
            )
            if not (fetched / METADATA_FILE).is_file():
                raise ModelFileError(f"{version.uri} ({version.source}) holds no {METADATA_FILE}")
            try:
                fetched.rename(target)
            except OSError:  # another process renamed its copy in first: same files
                if not (target / METADATA_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def _version(found: Any) -> RegisteredVersion:
    return RegisteredVersion(
        name=found.name,
        version=int(found.version),
        source=found.source,
        run_id=found.run_id or "",
        aliases=tuple(found.aliases or ()),
        tags=dict(found.tags or {}),
    )


def register_export(
    tracking_uri: str,
    run_id: str,
    metadata: ModelMetadata,
    *,
    name: str = DEFAULT_MODEL_NAME,
) -> RegisteredVersion:
    """Registers the model folder a training run logged as the new `challenger`."""
    return Registry(tracking_uri, name).register(run_id, tags=version_tags(metadata))
