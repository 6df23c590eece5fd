"""Transforms, datasets, the class-balanced sampler and loaders, on tiny generated images."""

from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from lib.config import Config
from lib.data import ImageDataset, class_sampler, eval_transform, make_loader, train_transform
from lib.images import BadImage
from lib.preprocess import Preprocessing, apply_view

# mean = std = 0.5 maps 0 to -1 and 255 to 1 (the efficientnet-lite statistics).
DATA_CFG = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "img_size": 48, "crop_pct": 0.9}
NO_AUG = {"hflip": 0.0, "vflip": 0.0, "rotate": 0.0, "color_jitter": 0.0, "noise_p": 0.0, "blur_p": 0.0,
          "dropout_p": 0.0}
# Every piece on, as probability (or strength) and the albumentations class it adds.
PIECES = [
    ("hflip", 0.5, "HorizontalFlip"),
    ("vflip", 0.3, "VerticalFlip"),
    ("rotate", 15.0, "Rotate"),
    ("color_jitter", 0.2, "ColorJitter"),
    ("noise_p", 0.1, "GaussNoise"),
    ("blur_p", 0.2, "GaussianBlur"),
    ("dropout_p", 0.3, "CoarseDropout"),
]
DETERMINISTIC = {"SmallestMaxSize", "CenterCrop", "LongestMaxSize", "PadIfNeeded", "Normalize", "ToTensorV2"}


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write(path: Path, img: np.ndarray) -> Path:
    """Save an RGB (or gray HxW) array with cv2, which wants BGR."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


def names(transform: A.Compose) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def model_stats(data_cfg: dict) -> dict:
    return {"mean": data_cfg["mean"], "std": data_cfg["std"], "interpolation": data_cfg["interpolation"]}


def tt(cfg: Config, data_cfg: dict, size: int) -> A.Compose:
    """The training transform as train.py builds it from a config."""
    return train_transform(size=size, in_chans=cfg.in_chans, **model_stats(data_cfg), **cfg.options("augment"))


def et(cfg: Config, data_cfg: dict, size: int) -> A.Compose:
    """The evaluation transform of a model trained with ``cfg``."""
    return eval_transform(size=size, in_chans=cfg.in_chans, crop=cfg.crop, **model_stats(data_cfg))


def cfg_loader(dataset, cfg: Config, **kwargs):
    return make_loader(dataset, workers=cfg.workers, seed=cfg.seed, **kwargs)


def test_image_size_falls_back_to_the_model() -> None:
    assert Preprocessing.of_checkpoint({"img_size": 0}, DATA_CFG).size == 48
    assert Preprocessing.of_checkpoint({"img_size": 32}, DATA_CFG).size == 32


@pytest.mark.parametrize("crop", ["rrc", "letterbox"])
def test_train_transform_output(crop: str) -> None:
    out = tt(Config(crop=crop), DATA_CFG, 32)(image=noise_image(40, 56))["image"]
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6


def test_augmentation_pieces_follow_the_config() -> None:
    assert names(tt(Config(**NO_AUG), DATA_CFG, 32)) == [
        "RandomResizedCrop", "Normalize", "ToTensorV2"
    ]
    for key, value, name in PIECES:
        transform = tt(Config(**{**NO_AUG, key: value}), DATA_CFG, 32)
        assert names(transform) == ["RandomResizedCrop", name, "Normalize", "ToTensorV2"], key
        if key.endswith("_p") or key.endswith("flip"):
            assert transform.transforms[1].p == value
    everything = tt(Config(**{key: value for key, value, _ in PIECES}), DATA_CFG, 32)
    assert names(everything)[1:-2] == [name for _, _, name in PIECES]


def test_rrc_uses_config_scale_and_model_interpolation() -> None:
    crop = tt(Config(rrc_scale=[0.5, 0.9]), {**DATA_CFG, "interpolation": "bilinear"}, 32)
    rrc = crop.transforms[0]
    assert tuple(rrc.scale) == (0.5, 0.9)
    assert rrc.interpolation == cv2.INTER_LINEAR
    with pytest.raises(ValueError, match="interpolation"):
        tt(Config(), {**DATA_CFG, "interpolation": "fancy"}, 32)


def test_letterbox_pads_instead_of_stretching() -> None:
    wide = np.full((20, 60, 3), 255, np.uint8)  # 1:3, white
    for transform in (
        tt(Config(crop="letterbox", **NO_AUG), DATA_CFG, 32),
        et(Config(crop="letterbox"), DATA_CFG, 32),
    ):
        column = transform(image=wide)["image"][0, :, 16]
        white = int((column > 0.9).sum())
        assert 9 <= white <= 14  # about a third of the side (37 or 32 px), not all 32 rows
        assert column[0] == -1.0 and column[-1] == -1.0  # black bands above and below


def test_eval_transform_is_deterministic() -> None:
    img = noise_image(40, 60)
    for crop in ("rrc", "letterbox"):
        transform = et(Config(crop=crop), DATA_CFG, 32)
        assert set(names(transform)) <= DETERMINISTIC
        assert all(t.p == 1.0 for t in transform.transforms)
        first, second = (transform(image=img)["image"] for _ in range(2))
        assert first.shape == (3, 32, 32)
        assert torch.equal(first, second)


def test_rrc_eval_keeps_a_square_image_whole() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    img[:8, :8] = 255  # a white corner survives only if nothing is cropped away
    out = et(Config(), DATA_CFG, 32)(image=img)["image"]
    assert out[:, :3, :3].min() > 0.9


def test_hflip_view_is_the_plain_view_of_the_mirrored_image() -> None:
    img = noise_image(40, 60)
    plain = et(Config(), DATA_CFG, 32)(image=img)["image"]
    of_mirrored = et(Config(), DATA_CFG, 32)(image=np.ascontiguousarray(img[:, ::-1]))["image"]
    assert torch.equal(apply_view(plain[None], "hflip")[0], of_mirrored)


def test_normalisation_uses_the_model_statistics() -> None:
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 255
    out = et(Config(), DATA_CFG, 32)(image=img)["image"]
    assert torch.allclose(out[:, :, :8], torch.tensor(-1.0))
    assert torch.allclose(out[:, :, 24:], torch.tensor(1.0))
    imagenet = {**DATA_CFG, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    out = et(Config(), imagenet, 32)(image=img)["image"]
    expected = (1 - torch.tensor(imagenet["mean"])) / torch.tensor(imagenet["std"])
    assert torch.allclose(out[:, 0, 31], expected)


def test_dataset_targets(tmp_path: Path) -> None:
    files = [write(tmp_path / f"{i}.png", noise_image(40, 50, i)) for i in range(3)]
    transform = et(Config(), DATA_CFG, 32)

    image, target = ImageDataset(files, np.array([2, 0, 1]), transform)[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert target.dtype == torch.int64 and target.shape == () and int(target) == 2

    soft = np.array([[0.1, 0.9], [0.5, 0.5], [1.0, 0.0]])
    _, target = ImageDataset(files, soft, transform)[1]
    assert target.dtype == torch.float32 and torch.allclose(target, torch.tensor([0.5, 0.5]))

    predict = ImageDataset([str(f) for f in files], None, transform)
    assert len(predict) == 3
    assert predict[2][1].dtype == torch.int64 and int(predict[2][1]) == 2

    with pytest.raises(ValueError, match="targets"):
        ImageDataset(files, np.array([0.5, 0.5, 0.5]), transform)
    with pytest.raises(ValueError, match="2 targets for 3 files"):
        ImageDataset(files, np.array([0, 1]), transform)


def test_gray_sources_follow_in_chans(tmp_path: Path) -> None:
    gray = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    files = [write(tmp_path / "gray.png", gray)]
    rgb = ImageDataset(files, None, et(Config(), DATA_CFG, 32))[0][0]
    assert rgb.shape == (3, 32, 32)
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])

    cfg = Config(in_chans=1)
    one = ImageDataset(files, None, et(cfg, DATA_CFG, 32), in_chans=1)[0][0]
    assert one.shape == (1, 32, 32)
    assert torch.equal(one[0], rgb[0])  # same statistics on every channel: the same values
    augmented = ImageDataset(files, np.array([0]), tt(cfg, DATA_CFG, 32), in_chans=1)[0][0]
    assert augmented.shape == (1, 32, 32)


def test_unreadable_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = write(tmp_path / "good.png", noise_image(40, 40))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    transform = et(Config(), DATA_CFG, 32)

    with pytest.raises(BadImage, match=r"bad\.jpg"):
        ImageDataset([good, bad], np.array([0, 1]), transform)[1]
    with pytest.raises(ValueError, match="prediction only"):
        ImageDataset([good, bad], np.array([0, 1]), transform, on_error="blank")

    dataset = ImageDataset([good, bad, tmp_path / "missing.png"], None, transform, on_error="blank")
    with caplog.at_level(logging.WARNING, logger="data"):
        image, index = dataset[1]
    assert "bad.jpg" in caplog.text
    assert image.shape == (3, 32, 32) and torch.allclose(image, torch.tensor(-1.0))  # black
    assert int(index) == 1
    dataset[0]
    dataset[2]
    assert dataset.failed == [1, 2]


def test_class_balanced_sampler() -> None:
    labels = np.array([0] * 900 + [1] * 100)
    sampler = class_sampler(labels, power=0.0, num_samples=4000, generator=torch.Generator().manual_seed(0))
    drawn = labels[list(sampler)]
    assert len(drawn) == 4000
    assert 0.45 < drawn.mean() < 0.55
    assert len(class_sampler(np.array(["a", "b", "b"]), power=0.0)) == 3


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return [write(tmp_path / f"{i}.png", noise_image(40, 48, i)) for i in range(16)]


def first_batch(files: list[Path], cfg: Config, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """First batch of a fresh training loader (augmentation on) and how many workers it used."""
    dataset = ImageDataset(files, np.arange(len(files)), tt(cfg, DATA_CFG, 32))
    loader = cfg_loader(dataset, cfg, train=True, batch_size=batch_size)
    images, targets = next(iter(loader))
    return images, targets, loader.num_workers


def test_in_process_loader_is_reproducible(files: list[Path]) -> None:
    cfg = Config(seed=3)
    a_images, a_targets, workers = first_batch(files[:8], cfg, 8)
    assert workers == 0  # one batch: not worth starting processes
    b_images, b_targets, _ = first_batch(files[:8], cfg, 8)
    assert torch.equal(a_targets, b_targets) and torch.equal(a_images, b_images)
    c_images, c_targets, _ = first_batch(files[:8], Config(seed=4), 8)
    assert not torch.equal(a_images[a_targets.argsort()], c_images[c_targets.argsort()])


def test_worker_loader_is_reproducible(files: list[Path]) -> None:
    # One image everywhere: a batch then depends on its worker's augmentation stream alone.
    same = [files[0]] * 16
    cfg = Config(seed=3, workers=2)
    dataset = ImageDataset(same, np.arange(16), tt(cfg, DATA_CFG, 32))
    loader = cfg_loader(dataset, cfg, train=True, batch_size=4)
    assert loader.num_workers == 2
    batches = [images for images, _ in loader]
    assert not torch.equal(batches[0], batches[1])  # workers 0 and 1 augment differently
    again = cfg_loader(dataset, cfg, train=True, batch_size=4)
    assert all(torch.equal(a, b) for a, (b, _) in zip(batches, again, strict=True))


def test_loader_order_and_last_batch(files: list[Path]) -> None:
    dataset = ImageDataset(files[:10], np.zeros(10, np.int64), et(Config(), DATA_CFG, 32))
    cfg = Config(workers=1)
    train = cfg_loader(dataset, cfg, train=True, batch_size=4)
    assert train.drop_last and len(train) == 2 and isinstance(train.sampler, RandomSampler)
    evaluation = cfg_loader(dataset, cfg, train=False, batch_size=4)
    assert not evaluation.drop_last and len(evaluation) == 3
    assert isinstance(evaluation.sampler, SequentialSampler)
    assert not evaluation.pin_memory or torch.cuda.is_available()
    balanced = class_sampler(np.zeros(10, np.int64), power=0.0)
    assert cfg_loader(dataset, cfg, train=True, sampler=balanced, batch_size=4).sampler is balanced
    assert len(cfg_loader(dataset, cfg, train=True, batch_size=16)) == 1  # never zero batches


def test_prediction_loader_keeps_order_and_reports_failures(files: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths = [*files[:5], bad, *files[5:8]]
    dataset = ImageDataset(paths, None, et(Config(), DATA_CFG, 32), on_error="blank")
    loader = cfg_loader(dataset, Config(workers=2), train=False, batch_size=3)
    assert loader.num_workers == 2
    indices = torch.cat([index for _, index in loader])
    assert indices.tolist() == list(range(len(paths)))
    assert dataset.failed == [5]  # flagged in a worker process, seen here
