"""One dataclass per concern: the model, the data pipeline, the training loop.

These are the recipe's fields: name, type, library default and, for a field a command-line flag
writes over (`--epochs`, `--lr`, `--depth`, ...), its help (`setting`). The presets in
`vitbirds.presets` are overrides of these defaults, and a run's default recipe is the default
preset's (`vitbirds.presets.DEFAULT_PRESET`); `vitbirds.settings` builds the flags from here and
never repeats a default or a help text.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self

from vitbirds.devices import DEVICE_CHOICES
from vitbirds.errors import ConfigError

DATA_MODES = ("auto", "cache", "stream")


def setting(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose metadata carries its command-line help (and `choices`, `metavar`,
    or `default_text` for a default decided later, e.g. None meaning "the synthetic birds")."""
    return field(default=default, metadata={"help": help, **extra})


class _DictMixin:
    """Round-trips a dataclass through plain JSON-able dicts, refusing unknown keys."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class ModelConfig(_DictMixin):
    """Shape of the Vision Transformer (Dosovitskiy et al. 2020) and its small-data options."""

    image_size: int = 64
    patch_size: int = setting(8, "patch side (must divide the image size)")
    in_chans: int = 3
    num_classes: int = 6
    dim: int = setting(192, "embedding width")
    depth: int = setting(6, "transformer blocks")
    heads: int = setting(3, "attention heads (must divide --dim)")
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # on embeddings and MLP/projection outputs
    attn_dropout: float = 0.0
    drop_path: float = 0.1  # stochastic depth, linearly increasing to this rate in the last block
    # Lee et al. 2021, "Vision Transformer for Small-Size Datasets":
    shifted_patches: bool = False  # shifted patch tokenization (SPT)
    locality_attention: bool = False  # learnable temperature + masked self-tokens (LSA)
    # Touvron et al. 2021 (DeiT): a second prefix token with its own head, trained to match a
    # teacher's predictions; inference averages the two heads.
    distill_token: bool = False
    # Xiao et al. 2021, "Early Convolutions Help Transformers See Better": 3x3 stride-2 convs
    # (BatchNorm, ReLU) down to the patch grid replace the one big patchify conv.
    conv_stem: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError naming the values that cannot build a model."""
        positive = ("image_size", "patch_size", "in_chans", "num_classes", "dim", "depth", "heads")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.dim % self.heads:
            raise ConfigError(f"dim {self.dim} is not divisible by heads {self.heads}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.conv_stem and self.shifted_patches:
            raise ConfigError("choose one of conv_stem and shifted_patches, not both")
        if self.conv_stem and self.patch_size & (self.patch_size - 1):
            raise ConfigError(
                f"conv_stem needs a power-of-two patch_size (stride-2 convs), got {self.patch_size}"
            )
        if self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class DataConfig(_DictMixin):
    """Which images, how many, and how they are augmented."""

    data_dir: str | None = None  # None: the generated synthetic dataset
    image_size: int = 64
    num_classes: int | None = None  # a seeded, stratified subset of classes
    images_per_class: int | None = None
    seed: int = 0
    valid_fraction: float = 0.2  # only for datasets that ship without a valid split
    decode_scale: float = 1.15  # decode once at image_size * decode_scale (short side)
    color_jitter: float = 0.2
    randaugment: bool = False
    trivialaugment: bool = False
    random_erasing: float = 0.0  # probability
    mixup: float = 0.0  # Beta(alpha, alpha); 0 disables
    cutmix: float = 0.0
    # cache: decode every image once into each worker's memory (fastest; memory grows with the
    # dataset); stream: each worker decodes its own shard every epoch (memory bounded; see
    # vitbirds.data.streaming); auto: cache when it fits cache_budget_gib per node, else stream.
    data_mode: str = setting(
        "auto",
        "cache: decode once into memory; stream: decode each worker's shard every epoch "
        "(memory flat in the dataset size); auto: cache when it fits the memory budget",
        choices=DATA_MODES,
    )
    cache_budget_gib: float = 4.0
    # Decoding processes per training worker in stream mode; None: the worker's CPUs but one.
    stream_workers: int | None = None

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ConfigError(f"image_size must be positive, got {self.image_size}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}")
        for name in ("num_classes", "images_per_class"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.randaugment and self.trivialaugment:
            raise ConfigError("choose one of randaugment and trivialaugment, not both")
        if self.data_mode not in DATA_MODES:
            raise ConfigError(
                f"data_mode must be one of {', '.join(DATA_MODES)}, got {self.data_mode!r}"
            )
        if self.cache_budget_gib < 0:
            raise ConfigError(f"cache_budget_gib must not be negative, got {self.cache_budget_gib}")
        if self.stream_workers is not None and self.stream_workers < 0:
            raise ConfigError(f"stream_workers must not be negative, got {self.stream_workers}")


@dataclass
class TrainConfig(_DictMixin):
    """The one training loop: AdamW, warmup + cosine, clipping, label smoothing."""

    epochs: int = setting(10, "epochs to train")
    batch_size: int = setting(64, "global batch, split across the workers")
    lr: float = setting(1e-3, "peak learning rate (warmup, then cosine decay)")
    weight_decay: float = setting(0.05, "AdamW weight decay")
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float | None = None  # exponential moving average of weights, evaluated if set
    # With a teacher (DeiT): "hard" trains the distillation head on the teacher's argmax, "soft"
    # on its whole distribution softened by distill_temperature (Hinton et al. 2015), which also
    # carries which species the teacher finds alike.
    distillation: str = "hard"
    distill_temperature: float = 3.0
    compile: bool = False  # torch.compile the model
    seed: int = setting(0, "seed of the data split, the init and the augmentation")
    device: str = "auto"  # auto | cpu | cuda | mps
    loader_workers: int = 0  # decoded images are cached in memory, so 0 is usually fastest

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.distillation not in ("hard", "soft"):
            raise ConfigError(f"distillation must be hard or soft, got {self.distillation!r}")
        if self.distill_temperature <= 0:
            raise ConfigError(
                f"distill_temperature must be positive, got {self.distill_temperature}"
            )
        if self.device not in DEVICE_CHOICES:
            raise ConfigError(
                f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}"
            )
