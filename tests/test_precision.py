"""Compute precision: what `auto` picks on which hardware, where bf16 autocast applies and where
fp32 stays, and that a bf16 model answers as its fp32 self does (on any CPU: where bf16 is not
native the same path runs emulated, only slower)."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from jobs import evaluate as evaluate_cli
from jobs import train as train_cli
from jobs import tune as tune_cli
from serve.schemas import ServeSettings
from vitbirds.config import DataConfig, ModelConfig, TrainConfig
from vitbirds.data import ImageDataset, discover_dataset, eval_transform, make_synthetic_dataset
from vitbirds.data.sources import DatasetSplits
from vitbirds.errors import ConfigError
from vitbirds.evaluation.agreement import precision_agreement
from vitbirds.evaluation.evaluate import EvaluationConfig, evaluate_model
from vitbirds.inference.scoring import BatchPredictor, ImagePreprocessor
from vitbirds.model import vit as vit_module
from vitbirds.model.files import LoadedModel, load_model, save_model
from vitbirds.model.vit import Attention, build_model
from vitbirds.precision import FP32, resolve_precision
from vitbirds.presets import Recipe
from vitbirds.settings import RunSettings
from vitbirds.training.loop import TrainingRun, seed_everything
from vitbirds.training.runner import build_metadata

BF16 = resolve_precision("bf16", "cpu")
XEON = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}
EPYC_WITHOUT_BF16 = {"architecture": "x86_64", "avx2": True, "avx512_f": True}
GRAVITON = {"architecture": "aarch64", "bf16": True}
MODEL = ModelConfig(image_size=32, patch_size=8, dim=48, depth=2, heads=3, drop_path=0.0)
TRAIN = TrainConfig(epochs=6, batch_size=16, lr=2e-3, warmup_epochs=0.5)


def _cpu_with(monkeypatch, capabilities: dict) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)


def test_auto_picks_bf16_on_a_cpu_with_amx_and_says_why(monkeypatch):
    _cpu_with(monkeypatch, XEON)
    precision = resolve_precision("auto", "cpu")
    assert precision.name == "bf16"
    assert "amx_bf16" in precision.reason and "avx512_bf16" in precision.reason
    assert precision.describe().startswith("precision bf16 (auto: ")


@pytest.mark.parametrize("capabilities", [EPYC_WITHOUT_BF16, GRAVITON], ids=["epyc", "arm64"])
def test_auto_keeps_fp32_on_a_cpu_without_native_bf16(monkeypatch, capabilities):
    _cpu_with(monkeypatch, capabilities)
    precision = resolve_precision("auto", "cpu")
    assert precision.name == "fp32"
    assert precision.reason


def test_an_explicit_precision_is_honoured_and_emulated_bf16_is_named(monkeypatch):
    _cpu_with(monkeypatch, EPYC_WITHOUT_BF16)
    assert resolve_precision("fp32", "cpu").name == "fp32"
    bf16 = resolve_precision("bf16", "cpu")
    assert bf16.name == "bf16" and "emulated" in bf16.reason


def test_auto_keeps_fp32_on_apple_gpus():
    assert resolve_precision("auto", "mps").name == "fp32"


@pytest.mark.parametrize("make", [RunSettings, lambda **kw: ServeSettings(model_dir="m", **kw)])
def test_an_unknown_precision_is_a_config_error_naming_it(make):
    with pytest.raises(ConfigError, match="'fp16'"):
        make(precision="fp16")


def test_train_tune_and_evaluate_take_the_precision_flag_with_the_settings_default():
    assert train_cli.parse_args([]).precision == RunSettings.precision
    assert train_cli.parse_args(["--precision", "bf16"]).precision == "bf16"
    sweep = tune_cli.build_sweep(tune_cli.parse_args(["--name", "s", "--precision", "fp32"]))
    assert sweep.precision == "fp32"
    assert "--precision" in tune_cli.train_argv(sweep)
    assert evaluate_cli.parse_args(["--model", "m"]).precision == RunSettings.precision


def test_a_bad_precision_flag_exits_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate_cli.parse_args(["--model", "m", "--precision", "fp16"])
    assert stopped.value.code == 2
    assert "fp16" in capsys.readouterr().err


@pytest.fixture(scope="module")
def birds(tmp_path_factory) -> DatasetSplits:
    root = tmp_path_factory.mktemp("birds")
    make_synthetic_dataset(root, num_classes=5, images_per_class=40, image_size=37)
    return discover_dataset(root)


def _loader(splits: DatasetSplits, samples, *, shuffle: bool) -> DataLoader:
    size = MODEL.image_size
    images = ImageDataset(samples, eval_transform(size), decode_size=round(size * 1.15))
    return DataLoader(images, batch_size=TRAIN.batch_size, shuffle=shuffle)


@pytest.fixture(scope="module")
def trained_in_bf16(birds, tmp_path_factory) -> tuple[LoadedModel, Path]:
    """A small ViT trained with bf16 autocast, as `--precision auto` trains on an AMX CPU, and
    exported: the model directory is plain fp32 safetensors."""
    seed_everything(0)
    config = ModelConfig(**{**MODEL.to_dict(), "num_classes": len(birds.classes)})
    model = build_model(config)
    train = _loader(birds, birds.train, shuffle=True)
    run = TrainingRun(
        model, TRAIN, steps_per_epoch=len(train), device=torch.device("cpu"), precision=BF16
    )
    for _ in range(TRAIN.epochs):
        run.train_epoch(train)
    recipe = Recipe(config, DataConfig(image_size=config.image_size), TRAIN)
    metadata = build_metadata(recipe, birds, name="bf16-trained", precision=BF16)
    model_dir = save_model(tmp_path_factory.mktemp("model"), model, metadata)
    return load_model(model_dir), model_dir


def test_bf16_autocasts_the_forward_while_weights_grads_and_adam_state_stay_fp32(birds):
    seed_everything(0)
    config = ModelConfig(**{**MODEL.to_dict(), "num_classes": len(birds.classes)})
    model = build_model(config)
    seen: list[torch.dtype] = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    loader = _loader(birds, birds.train[:32], shuffle=False)
    run = TrainingRun(
        model, TRAIN, steps_per_epoch=len(loader), device=torch.device("cpu"), precision=BF16
    )
    metrics = run.train_epoch(loader)

    assert seen and set(seen) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    moments = [s["exp_avg"].dtype for s in run.optimizer.state.values()]
    assert moments and set(moments) == {torch.float32}
    assert isinstance(metrics["train_loss"], float)


def test_fp32_runs_no_autocast(birds):
    seed_everything(0)
    model = build_model(ModelConfig(**{**MODEL.to_dict(), "num_classes": len(birds.classes)}))
    seen: list[torch.dtype] = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    loader = _loader(birds, birds.train[:16], shuffle=False)
    TrainingRun(model, TRAIN, steps_per_epoch=1, device=torch.device("cpu")).train_epoch(loader)
    assert set(seen) == {torch.float32}


def test_a_model_trained_in_bf16_exports_fp32_weights_and_records_its_precision(trained_in_bf16):
    loaded, _ = trained_in_bf16
    assert {t.dtype for t in loaded.model.state_dict().values() if t.is_floating_point()} == {
        torch.float32
    }
    assert loaded.metadata.extra["precision"] == {
        "compute": "bf16",
        "requested": "bf16",
        "reason": BF16.reason,
        "weights": "fp32",
    }


def test_a_bf16_model_answers_as_its_fp32_self_photo_by_photo(birds, trained_in_bf16):
    """Top-5 probabilities within 0.02, top-1 flips only on near-ties, rollout maps correlated
    >= 0.98, on every held-out photo."""
    loaded, _ = trained_in_bf16
    photos = [images for images, _ in _loader(birds, birds.valid + birds.test, shuffle=False)]

    agreement = precision_agreement(loaded, photos, reference=FP32, candidate=BF16)

    print(agreement.to_dict())
    assert agreement.photos == len(birds.valid) + len(birds.test)
    assert agreement.max_top5_probability_diff > 0  # bf16 did run: answers are not bit-equal
    assert agreement.within_tolerances, agreement.to_dict()


def test_a_bf16_serve_predictor_matches_the_fp32_one_within_tolerance(birds, trained_in_bf16):
    loaded, _ = trained_in_bf16
    preprocess = ImagePreprocessor(loaded.metadata)
    crops = [preprocess.model_input(sample.path.read_bytes()) for sample in birds.valid[:16]]

    fp32 = BatchPredictor(loaded)(crops)
    bf16 = BatchPredictor(loaded, "cpu", BF16)(crops)

    for want, got in zip(fp32, bf16, strict=True):
        difference = torch.tensor(want.probabilities) - torch.tensor(got.probabilities)
        assert float(difference.abs().max()) <= 0.02
        assert sum(got.probabilities) == pytest.approx(1.0, abs=1e-5)  # an fp32 softmax


def test_evaluation_records_the_precision_it_ran_at(birds, trained_in_bf16):
    loaded, _ = trained_in_bf16
    config = EvaluationConfig(overlays=2, overlay_size=48)
    result = evaluate_model(loaded, birds.test, birds.classes, config=config, precision=BF16)
    assert result.to_dict()["precision"] == "bf16"
    assert len(result.overlays) == 2
    assert result.probs.dtype.name == "float32"


def test_bf16_training_on_a_cpu_runs_the_explicit_attention_to_the_fused_result(monkeypatch):
    """PyTorch's fused bf16 attention backward is the slow one on a CPU; inference and fp32
    keep the fused kernel. Both paths compute the same attention."""
    torch.manual_seed(0)
    attention = Attention(dim=48, heads=3, attn_dropout=0.0, dropout=0.0)
    x = torch.randn(4, 17, 48)
    with torch.no_grad(), BF16.autocast():
        fused, _ = attention(x)
    fused_calls = []
    real_sdpa = vit_module.F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        fused_calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(vit_module.F, "scaled_dot_product_attention", counting_sdpa)
    with BF16.autocast():
        explicit, _ = attention(x)
    explicit.float().sum().backward()

    assert fused_calls == []
    torch.testing.assert_close(explicit.float(), fused.float(), atol=2e-2, rtol=2e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in attention.parameters())
    attention(x)[0].sum().backward()  # fp32 training: the fused kernel
    assert fused_calls == [1]
