"""Inputs the pipeline was not tuned on, through the real stages.

Kind 1, files recognised by content rather than by name: GIFs (palette, animated), JPEGs named ``.jfif``,
files without extension, text files named like images, in training (resize + folds) and in prediction.
Kind 3, a competition of small images (28x28 grayscale): the too-small rule is relative to the data set,
every step survives zero images, and a data set with nothing usable left is a clear DataError.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from folds import DataError, make_folds, small_side_limit
from lib.config import Config
from lib.duplicates import (
    THUMB,
    candidate_pairs,
    components,
    find_duplicates,
    group_ids,
    hash_images,
    near_pairs,
    thumb_correlation,
)
from lib.layout import RESIZE_BAD, RESIZE_INDEX, read_csv_strings
from resize import resize_folder


def smooth(seed: int, size: int = 64, colour: bool = True) -> np.ndarray:
    """A distinct picture (RGB, or gray): random 8x8 values upscaled, so its perceptual hash is stable."""
    coarse = np.random.default_rng(seed).integers(0, 256, (8, 8, 3) if colour else (8, 8), dtype=np.uint8)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def encoded(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def palette_gif(seed: int) -> bytes:
    """A palette GIF whose colour 0 is transparent."""
    im = Image.fromarray(smooth(seed)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    buffer = io.BytesIO()
    im.save(buffer, "GIF", transparency=0)
    return buffer.getvalue()


def animated_gif(seed: int) -> bytes:
    frames = [Image.fromarray(smooth(seed + k)).convert("P") for k in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def write_training(root: Path, files: dict[str, tuple[str, bytes]], **overrides) -> Config:
    """train_images/ with the given files (name -> (label, bytes)) and train.csv listing them all."""
    images = root / "train_images"
    for name, (_, data) in files.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    rows = [{"image": name, "label": label} for name, (label, _) in files.items()]
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    settings = {"train_csv": str(root / "train.csv"), "train_images": str(images),
                "folds_csv": str(root / "out" / "folds.csv"), "workers": 1, "n_folds": 3}  # fmt: skip
    return Config(**(settings | overrides))


def resize_and_fold(cfg: Config) -> pd.DataFrame:
    resize_folder(Path(cfg.train_images), cfg.resized_images, cfg)
    return make_folds(cfg)


def report_of(cfg: Config) -> pd.DataFrame:
    return read_csv_strings(Path(cfg.folds_csv).parent / "clean_report.csv").set_index("image")


# ---------------------------------------------------------------------------------------------------------
# Kind 1: files recognised by content.

ODD_FILES = {
    "palette.gif": lambda: palette_gif(100),
    "animated.gif": lambda: animated_gif(200),
    "photo.jfif": lambda: encoded(smooth(300), "JPEG", quality=90),
    "noext": lambda: encoded(smooth(400), "PNG"),
    "x.jpg": lambda: b"image,label\nnot,an image\n",  # a text file named like a JPEG
}


def test_training_set_with_gifs_jfif_no_extension_and_a_fake_jpeg(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = {f"{c}/{k}.png": (c, encoded(smooth(10 * ord(c) + k), "PNG")) for c in "ab" for k in range(4)}
    files |= {name: ("ab"[k % 2], make()) for k, (name, make) in enumerate(ODD_FILES.items())}
    cfg = write_training(tmp_path, files)
    with caplog.at_level(logging.INFO):
        out = resize_and_fold(cfg)

    index = read_csv_strings(cfg.resized_images / RESIZE_INDEX).set_index("image")
    assert index.loc[["palette.gif", "animated.gif", "photo.jfif", "noext"], "file"].tolist() == [
        "palette.gif.jpg", "animated.gif.jpg", "photo.jfif.jpg", "noext.jpg",
    ]  # fmt: skip
    for name in ("palette.gif", "animated.gif", "photo.jfif", "noext"):
        copy = cv2.imread(str(cfg.resized_images / index.loc[name, "file"]), cv2.IMREAD_UNCHANGED)
        assert copy.shape == (64, 64, 3) and index.loc[name, ["width", "height"]].tolist() == ["64", "64"]
    bad = read_csv_strings(cfg.resized_images / RESIZE_BAD)
    assert bad.values.tolist() == [["x.jpg", "not an image"]]

    assert sorted(out["image"]) == sorted(set(files) - {"x.jpg"})
    report = report_of(cfg)
    assert report.loc["x.jpg", ["action", "reason", "detail"]].tolist() == [
        "dropped",
        "unreadable",
        "not an image",
    ]
    assert "resize.py first" not in caplog.text


def test_animated_gif_is_its_first_frame(tmp_path: Path) -> None:
    frames = [
        Image.new("RGB", (40, 30), c).convert("P", palette=Image.Palette.ADAPTIVE)
        for c in ((200, 30, 30), (30, 200, 30))
    ]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    cfg = write_training(tmp_path, {"animated.gif": ("a", buffer.getvalue())})
    resize_folder(Path(cfg.train_images), cfg.resized_images, cfg)
    copy = cv2.cvtColor(cv2.imread(str(cfg.resized_images / "animated.gif.jpg")), cv2.COLOR_BGR2RGB)
    first = np.asarray(frames[0].convert("RGB"))
    assert copy.shape == (30, 40, 3) and np.abs(copy.astype(int) - first).max() <= 4  # through JPEG


def test_a_hidden_file_listed_in_train_csv_is_named_not_sent_back_to_resize(tmp_path: Path) -> None:
    files = {f"{k}.png": ("ab"[k % 2], encoded(smooth(k), "PNG")) for k in range(6)}
    files[".hidden.png"] = ("a", encoded(smooth(99), "PNG"))
    cfg = write_training(tmp_path, files)
    resize_folder(Path(cfg.train_images), cfg.resized_images, cfg)
    with pytest.raises(DataError) as err:
        make_folds(cfg)
    assert "hidden" in str(err.value) and "'.hidden.png'" in str(err.value)
    assert "resize.py first" not in str(err.value)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny two-member bundle test_predict.py predicts with (test_package's experiments, packaged)."""
    from test_package import packaged_bundle

    return packaged_bundle(tmp_path_factory, "inputs")


def test_prediction_gives_every_file_one_row_whatever_its_name(
    bundle_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import predict

    test = tmp_path / "test"
    test.mkdir()
    for name, make in ODD_FILES.items():
        (test / name).write_bytes(make())
    (test / "cut.gif").write_bytes(palette_gif(500)[:60])  # truncated inside its pixel data
    out = tmp_path / "submission.csv"
    with caplog.at_level(logging.WARNING):
        assert predict.main([str(test), "--bundle", str(bundle_dir), "--out", str(out)]) == 0
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert rows["image"].tolist() == sorted([*ODD_FILES, "cut.gif"])
    warned = " ".join(m for m in caplog.messages)
    assert "x.jpg" in warned and "cut.gif" in warned
    for name in ("palette.gif", "animated.gif", "photo.jfif", "noext"):
        assert name not in warned


# ---------------------------------------------------------------------------------------------------------
# Kind 3: small images.


def digits(n_classes: int = 10, per_class: int = 6) -> dict[str, tuple[str, bytes]]:
    """28x28 grayscale PNGs, distinct, ``per_class`` of each of ``n_classes`` classes."""
    return {
        f"{c}/{k}.png": (str(c), encoded(smooth(100 * c + k, 28, colour=False), "PNG"))
        for c in range(n_classes)
        for k in range(per_class)
    }


def test_a_data_set_of_28px_images_folds_under_the_default_min_side(tmp_path: Path) -> None:
    files = digits()
    files["strip.png"] = ("0", encoded(smooth(7, 28, colour=False)[:5], "PNG"))  # 28x5: an outlier here
    cfg = write_training(tmp_path, files, n_folds=5)
    assert cfg.min_side == 48 and cfg.min_side_fraction == 0.25  # the defaults: the limit is 0.25 x 28 = 7
    out = resize_and_fold(cfg)
    assert sorted(out["image"]) == sorted(set(files) - {"strip.png"})
    assert set(out["fold"]) == set(range(5))
    assert report_of(cfg).loc["strip.png", ["action", "reason", "detail"]].tolist() == [
        "dropped", "too small", "28x5",
    ]  # fmt: skip


def test_nothing_usable_left_is_a_clear_error_per_reason(tmp_path: Path) -> None:
    files = digits(n_classes=2, per_class=4)
    files |= {f"text{k}.png": ("1", b"not an image") for k in range(3)}
    cfg = write_training(tmp_path, files, min_side_fraction=2.0)  # the limit: min(48, 2 x 28) = 48
    with pytest.raises(DataError) as err:
        resize_and_fold(cfg)
    message = str(err.value)
    assert "dropped all 11 row(s)" in message
    assert "too small: 8 (" in message and "--min-side-fraction" in message
    assert "unreadable: 3 (" in message and "'text0.png'" in message and "_bad.csv" in message
    assert not Path(cfg.folds_csv).exists()


def test_a_data_set_of_unreadable_files_is_a_clear_error(tmp_path: Path) -> None:
    cfg = write_training(tmp_path, {f"{k}.jpg": ("a", b"") for k in range(4)})
    with pytest.raises(DataError, match=r"(?s)dropped all 4 row\(s\).*unreadable: 4 \('0.jpg'"):
        resize_and_fold(cfg)


@pytest.mark.parametrize(
    ("sides", "limit"),
    [([300.0] * 5, 48.0), ([28.0] * 5, 7.0), ([28.0, 28.0, 5.0], 7.0), ([], 48.0), ([np.nan, 100.0], 25.0)],
)
def test_small_side_limit_is_relative_to_the_data_set(sides: list[float], limit: float) -> None:
    assert small_side_limit(np.array(sides), min_side=48, min_side_fraction=0.25) == limit


def test_duplicate_search_survives_zero_images() -> None:
    none = np.empty(0, np.int64)
    thumbs = np.empty((0, THUMB, THUMB, 3), np.uint8)
    assert thumb_correlation(thumbs, none, none).shape == (0,)
    for array in (*candidate_pairs(np.empty(0, np.uint64), 2), *near_pairs(np.empty(0, np.uint64), 2)):
        assert array.shape == (0,) and array.dtype == np.int64
    assert hash_images([]) == [] and hash_images([], workers=2) == []
    found = find_duplicates([], phash_distance=2, conflict_distance=2, duplicate_correlation=0.8)
    assert found.copies.shape == found.lookalikes.shape == (0,) and found.rejected == 0
    assert components(none) == [] and group_ids([]).shape == (0,)
