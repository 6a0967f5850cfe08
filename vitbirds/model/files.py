"""The model directory: `model.safetensors` + `metadata.json`.

Training exports it; evaluate, Serve and monitor load it. Weights are safetensors because loading a
pickle (`torch.load` of a module) runs whatever code the file carries; a pickle is refused.
"""

import json
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vitbirds import __version__
from vitbirds.config import ModelConfig
from vitbirds.errors import ModelFileError, UnsafeModelFileError
from vitbirds.model.baselines import build_classifier

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
MODEL_CARD_FILE = "MODEL_CARD.md"
# Written beside the weights by training: the monitoring job's reference profile, the model card.
OPTIONAL_FILES = ("reference.safetensors", "reference.json", MODEL_CARD_FILE)
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"}


@dataclass
class ModelMetadata:
    """What a consumer needs besides the weights, all JSON."""

    model: dict[str, Any]  # ModelConfig.to_dict()
    class_names: list[str]  # index order of the head
    mean: list[float]
    std: list[float]
    image_size: int
    architecture: str = "vit"  # or "resnet18", a baseline/teacher (vitbirds.model.baselines)
    name: str = "vitbirds"
    version: str = ""  # defaults to the creation timestamp
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics
    data: dict[str, Any] = field(default_factory=dict)  # source, root, fingerprint, synthetic
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a reference profile's summary
    code_version: str = field(default_factory=lambda: code_version())
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.version:
            self.version = self.created_at

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    @property
    def synthetic(self) -> bool:
        return bool(self.data.get("synthetic", False))

    @property
    def attention_maps(self) -> bool:
        """Whether the architecture has attention to draw: known from the metadata alone, so the
        Serve ingress can answer without loading weights (a CNN baseline has none)."""
        return self.architecture == "vit"


@dataclass
class LoadedModel:
    model: nn.Module
    metadata: ModelMetadata


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def save_model(model_dir: str | Path, model: nn.Module, metadata: ModelMetadata) -> Path:
    """Writes weights and metadata; the metadata goes last so a half-written dir fails to load."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu").contiguous() for k, v in unwrap_model(model).state_dict().items()
    }
    save_file(state, model_dir / WEIGHTS_FILE, metadata={"format": "vitbirds"})
    text = json.dumps(asdict(metadata), indent=2, sort_keys=True)
    (model_dir / METADATA_FILE).write_text(text + "\n")
    return model_dir


def read_metadata(model_dir: str | Path) -> ModelMetadata:
    model_dir = _check_model_dir(Path(model_dir))
    try:
        values = json.loads((model_dir / METADATA_FILE).read_text())
        metadata = ModelMetadata(**values)
    except (json.JSONDecodeError, TypeError) as error:
        raise ModelFileError(
            f"{model_dir / METADATA_FILE} is not valid model metadata: {error}"
        ) from error
    if metadata.format_version > FORMAT_VERSION:
        raise ModelFileError(
            f"{model_dir} has format version {metadata.format_version}; "
            f"this vitbirds reads up to {FORMAT_VERSION}"
        )
    if len(metadata.class_names) != metadata.model_config.num_classes:
        raise ModelFileError(
            f"{model_dir}: {len(metadata.class_names)} class names but the model has "
            f"{metadata.model_config.num_classes} outputs"
        )
    return metadata


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model in eval mode on `device`, checked against its metadata."""
    metadata = read_metadata(model_dir)
    model = build_classifier(metadata.architecture, metadata.model_config)
    state = load_file(Path(model_dir) / WEIGHTS_FILE)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ModelFileError(
            f"{model_dir}: weights do not match the metadata's model config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]})"
        )
    model.load_state_dict(state)
    return LoadedModel(model.to(device).eval(), metadata)


def refuse_pickle(path: Path) -> None:
    """Raises UnsafeModelFileError if `path` is a pickle or a `torch.save` zip archive."""
    with path.open("rb") as handle:
        head = handle.read(4)
    is_pickle = head[:1] == b"\x80" or head[:2] == b"PK"  # protocol 2+ pickle or torch zip
    if is_pickle or path.suffix in _PICKLE_SUFFIXES:
        raise UnsafeModelFileError(
            f"{path} is a pickle/torch.save file; loading it would run arbitrary code, so vitbirds "
            "refuses it. Export weights with safetensors (vitbirds.model.files.save_model)."
        )


def _check_model_dir(model_dir: Path) -> Path:
    if model_dir.is_file():
        refuse_pickle(model_dir)
        raise ModelFileError(f"{model_dir} is a file; expected a model directory")
    if not model_dir.is_dir():
        raise ModelFileError(f"model directory {model_dir} does not exist")
    if not (model_dir / WEIGHTS_FILE).is_file():
        for candidate in sorted(model_dir.iterdir()):
            if candidate.suffix in _PICKLE_SUFFIXES:
                refuse_pickle(candidate)
        raise ModelFileError(f"{model_dir} has no {WEIGHTS_FILE}")
    if not (model_dir / METADATA_FILE).is_file():
        raise ModelFileError(f"{model_dir} has no {METADATA_FILE}")
    return model_dir


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers, so saved names carry no prefixes."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
