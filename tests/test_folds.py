"""Tests of src/folds.py on tiny datasets built to resize.py's output contract (see the stage's docstring)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import folds
from folds import DataError, make_folds
from lib.config import Config, load_config
from lib.layout import read_csv_strings, read_folds, resolve_ids
from lib.splits import sklearn_folds, stratified_group_folds

ROOT = Path(__file__).resolve().parents[1]


def smooth(seed: int, size: int = 64) -> np.ndarray:
    """A distinct grayscale image: random 8x8 values upscaled, so its perceptual hash is stable."""
    coarse = np.random.default_rng(seed).integers(0, 256, (8, 8)).astype(np.uint8)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def reencoded(img: np.ndarray, shift: int = 12, quality: int = 80) -> np.ndarray:
    """A near duplicate: brighter and through lossy JPEG, as a re-saved copy of the same photo would be."""
    ok, buf = cv2.imencode(".jpg", cv2.add(img, shift), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


@dataclass
class Item:
    image: str
    label: str
    pixels: np.ndarray | None = None  # None: a corrupt source that resize listed in _bad.csv
    group: str = ""
    size: tuple[int, int] = (300, 200)  # original width, height as _index.csv reports them


def write_dataset(root: Path, items: list[Item], with_groups: bool = False, **overrides) -> Config:
    """train.csv, source images and the resized folder with _index.csv and _bad.csv, like resize.py."""
    cfg = Config(
        train_csv=str(root / "train.csv"),
        train_images=str(root / "train_images"),
        folds_csv=str(root / "out" / "folds.csv"),
        workers=1,
        **overrides,
    )
    index, bad = [], []
    for it in items:
        source = Path(cfg.train_images) / it.image
        source.parent.mkdir(parents=True, exist_ok=True)
        if it.pixels is None:
            source.write_bytes(b"not an image")
            bad.append({"image": it.image, "reason": "cannot identify image file"})
            continue
        cv2.imwrite(str(source), it.pixels)
        copy = cfg.resized_images / Path(it.image).with_suffix(".png")
        copy.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(copy), it.pixels)
        index.append({"image": it.image, "file": copy.relative_to(cfg.resized_images).as_posix()})
        index[-1].update(width=it.size[0], height=it.size[1])
    rows = [
        {"image": it.image, "label": it.label} | ({"group": it.group} if with_groups else {}) for it in items
    ]
    pd.DataFrame(rows).to_csv(cfg.train_csv, index=False)
    pd.DataFrame(index, columns=["image", "file", "width", "height"]).to_csv(
        cfg.resized_images / "_index.csv", index=False
    )
    pd.DataFrame(bad, columns=["image", "reason"]).to_csv(cfg.resized_images / "_bad.csv", index=False)
    return cfg


def basic_items(per_class: dict[str, int] | None = None) -> list[Item]:
    """Distinct images: by default 3 classes x 10."""
    per_class = per_class or {"cat": 10, "dog": 10, "bird": 10}
    items, seed = [], 0
    for label, n in per_class.items():
        for k in range(n):
            items.append(Item(f"{label}/{k:02d}.png", label, smooth(seed)))
            seed += 1
    return items


def report_of(cfg: Config) -> pd.DataFrame:
    return read_csv_strings(folds.clean_report_path(cfg)).set_index("image")


def test_writes_folds_and_report_to_contract(tmp_path: Path) -> None:
    items = basic_items()
    cfg = write_dataset(tmp_path, items)
    extra = pd.read_csv(cfg.train_csv, dtype=str).assign(note=[f"n{i}" for i in range(len(items))])
    extra.to_csv(cfg.train_csv, index=False)

    out = make_folds(cfg)
    written = read_folds(Path(cfg.folds_csv))
    assert list(written.columns) == ["image", "label", "group", "fold", "note"]
    assert written["image"].tolist() == [it.image for it in items]  # train.csv order
    assert written["note"].tolist() == extra["note"].tolist()
    assert set(written["fold"]) == set(range(cfg.n_folds))
    assert written["group"].nunique() == len(items)  # distinct images are not merged
    pd.testing.assert_frame_equal(written, out, check_dtype=False)

    report = read_csv_strings(folds.clean_report_path(cfg))
    assert list(report.columns) == ["image", "label", "action", "reason", "group", "detail"]
    assert (report["action"] == "kept").all() and len(report) == len(items)
    assert load_config(Path(cfg.folds_csv).with_suffix(".config.yaml")) == cfg  # what produced it


def _missing_csv(cfg: Config) -> None:
    Path(cfg.train_csv).unlink()


def _unreadable_csv(cfg: Config) -> None:
    Path(cfg.train_csv).write_bytes(b"\xff\xfe\x00garbage\x00\xff")


def _missing_columns(cfg: Config) -> None:
    Path(cfg.train_csv).write_text("file,class\ncat/00.png,cat\n")


def _edit_rows(cfg: Config, edit) -> None:
    df = read_csv_strings(Path(cfg.train_csv))
    edit(df)
    df.to_csv(cfg.train_csv, index=False)


def _empty_label(cfg: Config) -> None:
    _edit_rows(cfg, lambda df: df.loc.__setitem__((3, "label"), ""))


def _duplicate_id(cfg: Config) -> None:
    _edit_rows(cfg, lambda df: df.loc.__setitem__((5, "image"), df.loc[4, "image"]))


def _escaping_paths(cfg: Config) -> None:
    _edit_rows(cfg, lambda df: df.loc.__setitem__(([2, 6], "image"), ["/etc/passwd", "../secret.png"]))


def _missing_source(cfg: Config) -> None:
    (Path(cfg.train_images) / "dog/03.png").unlink()


def _not_resized(cfg: Config) -> None:
    cv2.imwrite(str(Path(cfg.train_images) / "new.png"), smooth(99))
    _edit_rows(cfg, lambda df: df.loc.__setitem__(len(df), ["new.png", "cat"]))


def _resized_missing(cfg: Config) -> None:
    shutil.rmtree(cfg.resized_images)


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (_missing_csv, ["train.csv not found", "--train-csv"]),
        (_unreadable_csv, ["not a readable CSV", "UTF-8"]),
        (_missing_columns, ["lacks column(s) image, label", "file, class"]),
        (_empty_label, ["1 row(s) with an empty label", "line 5 'cat/03.png'"]),
        (_duplicate_id, ["1 image id(s) listed more than once", "line 6 'cat/04.png', line 7 'cat/04.png'"]),
        (_escaping_paths, ["2 image path(s) absolute or outside", "'/etc/passwd'", "'../secret.png'"]),
        (_missing_source, ["1 image(s) missing from", "'dog/03.png'"]),
        (_not_resized, ["1 image(s) not resized yet", "'new.png'", "run python src/resize.py first"]),
        (_resized_missing, ["train_images_600 not found", "run python src/resize.py"]),
    ],
    ids=lambda x: getattr(x, "__name__", "")[1:] or None,
)
def test_each_validation_problem_is_reported(tmp_path: Path, break_it, expected: list[str]) -> None:
    cfg = write_dataset(tmp_path, basic_items())
    break_it(cfg)
    with pytest.raises(DataError) as err:
        make_folds(cfg)
    for text in expected:
        assert text in str(err.value)
    assert not Path(cfg.folds_csv).exists()


def test_all_problems_reported_in_one_error(tmp_path: Path) -> None:
    cfg = write_dataset(tmp_path, basic_items())
    for break_it in (_empty_label, _duplicate_id, _escaping_paths, _missing_source, _not_resized):
        break_it(cfg)
    with pytest.raises(DataError) as err:
        make_folds(cfg)
    message = str(err.value)
    assert "5 problem(s)" in message
    for text in ("empty label", "more than once", "absolute or outside", "missing from", "not resized yet"):
        assert text in message


def test_unreadable_images_are_dropped_and_reported(tmp_path: Path) -> None:
    items = [*basic_items(), Item("broken.png", "cat", None), Item("bad_copy.png", "dog", smooth(500))]
    cfg = write_dataset(tmp_path, items)
    (cfg.resized_images / "bad_copy.png").write_bytes(b"\x89PNG truncated")

    out = make_folds(cfg)
    report = report_of(cfg)
    assert report.loc["broken.png", ["action", "reason", "detail"]].tolist() == [
        "dropped",
        "unreadable",
        "cannot identify image file",
    ]
    assert report.loc["bad_copy.png", ["action", "reason"]].tolist() == ["dropped", "unreadable"]
    assert "bad_copy.png" in report.loc["bad_copy.png", "detail"]
    assert not {"broken.png", "bad_copy.png"} & set(out["image"])


def test_tiny_images_are_dropped(tmp_path: Path) -> None:
    items = [*basic_items(), Item("thin.png", "cat", smooth(600), size=(40, 300))]
    cfg = write_dataset(tmp_path, items, min_side=48)
    out = make_folds(cfg)
    assert report_of(cfg).loc["thin.png", ["action", "reason", "detail"]].tolist() == [
        "dropped",
        "too small",
        "40x300",
    ]
    assert "thin.png" not in set(out["image"])


def test_exact_duplicates_share_group_and_fold(tmp_path: Path) -> None:
    items = basic_items()
    items.append(Item("copy_of_cat_00.png", "cat", items[0].pixels.copy()))
    cfg = write_dataset(tmp_path, items)
    out = make_folds(cfg).set_index("image")
    pair = out.loc[["cat/00.png", "copy_of_cat_00.png"]]
    assert pair["group"].nunique() == 1 and pair["fold"].nunique() == 1
    assert report_of(cfg).loc["copy_of_cat_00.png", "reason"] == "exact duplicate"
    assert out["group"].nunique() == len(items) - 1


def test_near_duplicates_share_group(tmp_path: Path) -> None:
    items = basic_items()
    # Brightened + JPEG copies: of cat/02 its phash is 2 bits away, of dog/02 equal (seen when writing this).
    items += [
        Item("resaved_cat_02.jpg", "cat", reencoded(items[2].pixels)),
        Item("resaved_dog_02.jpg", "dog", reencoded(items[12].pixels)),
    ]
    cfg = write_dataset(tmp_path, items)
    out = make_folds(cfg).set_index("image")
    report = report_of(cfg)
    for original, copy in (("cat/02.png", "resaved_cat_02.jpg"), ("dog/02.png", "resaved_dog_02.jpg")):
        pair = out.loc[[original, copy]]
        assert pair["group"].nunique() == 1 and pair["fold"].nunique() == 1
        assert report.loc[copy, "reason"] == "near duplicate"
        assert original in report.loc[copy, "detail"]
    assert out["group"].nunique() == len(items) - 2  # nothing else merged

    cfg = dataclasses.replace(cfg, phash_distance=0, conflict_distance=0)
    out = make_folds(cfg).set_index("image")
    assert out.loc["cat/02.png", "group"] != out.loc["resaved_cat_02.jpg", "group"]


def test_duplicates_with_conflicting_labels_are_dropped(tmp_path: Path) -> None:
    items = basic_items()
    items += [
        Item("cat_00_as_dog.png", "dog", items[0].pixels.copy()),
        Item("cat_00_resaved.jpg", "cat", reencoded(items[0].pixels)),
    ]
    cfg = write_dataset(tmp_path, items)
    out = make_folds(cfg)
    report = report_of(cfg)
    group = ["cat/00.png", "cat_00_as_dog.png", "cat_00_resaved.jpg"]
    assert (report.loc[group, "action"] == "dropped").all()
    assert (report.loc[group, "reason"] == "conflicting labels").all()
    assert "'cat': 2, 'dog': 1" in report.loc["cat/00.png", "detail"]
    assert not set(group) & set(out["image"])
    assert len(out) == len(items) - 3


def test_lookalikes_with_other_labels_are_kept_together_beyond_conflict_distance(tmp_path: Path) -> None:
    items = basic_items()
    items.append(Item("resaved_cat_02_as_dog.jpg", "dog", reencoded(items[2].pixels)))  # 2 bits away
    cfg = write_dataset(tmp_path, items, phash_distance=2, conflict_distance=0)
    out = make_folds(cfg).set_index("image")
    pair = out.loc[["cat/02.png", "resaved_cat_02_as_dog.jpg"]]
    assert pair["group"].nunique() == 1 and pair["fold"].nunique() == 1
    assert report_of(cfg).loc["resaved_cat_02_as_dog.jpg", "reason"] == "near duplicate"

    cfg = dataclasses.replace(cfg, conflict_distance=2)
    out = make_folds(cfg)
    report = report_of(cfg)
    assert (report.loc[["cat/02.png", "resaved_cat_02_as_dog.jpg"], "reason"] == "conflicting labels").all()
    assert not {"cat/02.png", "resaved_cat_02_as_dog.jpg"} & set(out["image"])


def test_user_groups_kept_whole_and_merged_by_duplicates(tmp_path: Path) -> None:
    items = basic_items()
    for k, it in enumerate(items):
        it.group = f"patient{k % 8}"  # each group mixes labels: that is no conflict
    items.append(Item("dup.png", "dog", items[11].pixels.copy(), group="patient1"))  # items[11] is patient3
    cfg = write_dataset(tmp_path, items, with_groups=True)
    out = make_folds(cfg)
    assert len(out) == len(items)
    user = pd.Series([it.group for it in items], index=[it.image for it in items])
    out["user"] = out["image"].map(user)
    assert (out.groupby("user")["fold"].nunique() == 1).all()
    assert (out.groupby("user")["group"].nunique() == 1).all()
    merged = out.set_index("user").loc[["patient1", "patient3"], "group"]
    assert merged.nunique() == 1
    assert out["group"].nunique() == 7


@pytest.mark.parametrize("dense_split_limit", [20_000, 0])  # scikit-learn's splitter, the sparse one
def test_folds_are_stratified(tmp_path: Path, dense_split_limit: int) -> None:
    cfg = write_dataset(tmp_path, basic_items({"a": 20, "b": 10, "c": 5}), dense_split_limit=dense_split_limit)
    out = make_folds(cfg)
    table = pd.crosstab(out["label"], out["fold"])
    assert table.loc["a"].tolist() == [4] * 5
    assert table.loc["b"].tolist() == [2] * 5
    assert table.loc["c"].tolist() == [1] * 5


@pytest.mark.parametrize("dense_split_limit", [0, 20_000])
def test_dense_split_limit_chooses_the_splitter(tmp_path: Path, dense_split_limit: int) -> None:
    """scikit-learn's splitter up to dense_split_limit groups x classes (here 4 x 33), the sparse one above."""
    items = basic_items({"a": 12, "b": 9, "c": 6, "d": 6})
    for k, it in enumerate(items):
        it.group = f"site{k % 11}"
    cfg = write_dataset(tmp_path, items, with_groups=True, dense_split_limit=dense_split_limit)
    out = make_folds(cfg)
    splitter = stratified_group_folds if dense_split_limit == 0 else sklearn_folds
    want = splitter(labels=out["label"].to_numpy(), groups=out["group"].to_numpy(), n_folds=5, seed=cfg.seed)
    assert out["fold"].tolist() == want.tolist()
    assert (out.groupby("group")["fold"].nunique() == 1).all()
    other = sklearn_folds if dense_split_limit == 0 else stratified_group_folds
    assert other(labels=out["label"].to_numpy(), groups=out["group"].to_numpy(), n_folds=5, seed=cfg.seed).tolist() != want.tolist()


def test_folds_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    cfg = write_dataset(tmp_path, basic_items())
    first = make_folds(cfg)["fold"].tolist()
    written = Path(cfg.folds_csv).read_bytes()
    cfg.workers = 2  # parallel hashing gives the same answer
    make_folds(cfg)
    assert Path(cfg.folds_csv).read_bytes() == written
    cfg.seed = 7
    assert make_folds(cfg)["fold"].tolist() != first


def test_rare_class_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = write_dataset(tmp_path, basic_items({"common": 15, "rare one": 2}))
    with caplog.at_level(logging.WARNING, logger="folds"):
        make_folds(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("fewer images than the 5 folds" in w and "'rare one' (2)" in w for w in warnings)
    assert not any("'common'" in w for w in warnings)


def test_too_few_groups_is_an_error(tmp_path: Path) -> None:
    items = basic_items({"a": 6, "b": 6})
    for k, it in enumerate(items):
        it.group = f"site{k % 3}"
    cfg = write_dataset(tmp_path, items, with_groups=True, n_folds=4)
    with pytest.raises(DataError, match=r"only 3 independent group\(s\).*n_folds=4"):
        make_folds(cfg)
    assert not Path(cfg.folds_csv).exists()


def test_labels_stay_strings(tmp_path: Path) -> None:
    labels = ["1", "NA", "None", "a/b c", "001", "nan", "TRUE"]
    items = basic_items(dict.fromkeys(labels, 2))
    cfg = write_dataset(tmp_path, items, n_folds=2)
    out = make_folds(cfg)
    assert out["label"].tolist() == [it.label for it in items]
    assert read_folds(Path(cfg.folds_csv))["label"].tolist() == [it.label for it in items]
    assert read_csv_strings(folds.clean_report_path(cfg))["label"].tolist() == [it.label for it in items]


def test_cli_exit_codes(tmp_path: Path) -> None:
    cfg = write_dataset(tmp_path, basic_items())
    flags = ["--train-csv", cfg.train_csv, "--train-images", cfg.train_images, "--folds-csv", cfg.folds_csv]
    assert folds.main([*flags, "--workers", "1"]) == 0
    assert Path(cfg.folds_csv).is_file()

    Path(cfg.train_csv).write_text("image,label\ncat/00.png,\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "src" / "folds.py"), *flags],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == 2
    assert "empty label" in run.stderr and "Traceback" not in run.stderr


def test_a_kaggle_shaped_list_with_its_own_columns_and_ids_without_extension(tmp_path: Path) -> None:
    items = basic_items()
    cfg = write_dataset(
        tmp_path, items, image_column="image_id", label_column="species", group_column="patient"
    )
    ids = [it.image.removesuffix(".png") for it in items]
    patients = [f"p{k % 6}" for k in range(len(items))]
    pd.DataFrame(
        {"image_id": ids, "species": [it.label for it in items], "patient": patients, "image": "x"}
    ).to_csv(cfg.train_csv, index=False)
    out = make_folds(cfg)
    assert sorted(out["image"]) == sorted(it.image for it in items)  # resolved to the files
    assert (out["image_original"] == "x").all()  # a clashing column is carried through, renamed
    assert out.set_index("image").loc["cat/00.png", "label"] == "cat"
    patient_of = dict(zip([it.image for it in items], patients, strict=True))
    assert (out.groupby(out["image"].map(patient_of))["fold"].nunique() == 1).all()  # groups kept whole


def test_ids_without_extension_or_folder_match_one_file_only() -> None:
    files = ["a/x.jpg", "a/y.jpg", "a/y.png", "z.tar.gz.png", "plain"]
    ids = pd.Series(["a/x", "a/y", "a/x.jpg", "z.tar.gz", "plain", "b/none", "x", "y"])
    resolved, n = resolve_ids(ids, files)
    assert resolved.tolist() == ["a/x.jpg", "a/y", "a/x.jpg", "z.tar.gz.png", "plain", "b/none", "a/x.jpg", "y"]
    assert n == 3  # a/x and x (a unique name without its folder) resolved; a/y and y are ambiguous


def test_a_missing_custom_column_names_the_setting(tmp_path: Path) -> None:
    cfg = write_dataset(tmp_path, basic_items(), label_column="species")
    with pytest.raises(DataError, match=r"lacks column.*species.*label_column"):
        make_folds(cfg)
    misspelt = write_dataset(tmp_path / "g", basic_items(), group_column="patient_id")
    with pytest.raises(DataError, match=r"lacks column\(s\) patient_id"):
        make_folds(misspelt)


def test_pictures_differing_only_in_colour_are_not_duplicates(tmp_path: Path) -> None:
    """Their grayscale perceptual hashes are identical; the colour thumbnails tell them apart."""

    def square(bgr: tuple[int, int, int]) -> np.ndarray:
        img = np.full((64, 64, 3), 128, np.uint8)
        img[16:48, 10:40] = bgr
        return img

    red, green = square((0, 0, 255)), square((0, 130, 0))  # equal luma: 0.299 x 255 = 0.587 x 130 = 76
    assert np.array_equal(cv2.cvtColor(red, cv2.COLOR_BGR2GRAY), cv2.cvtColor(green, cv2.COLOR_BGR2GRAY))
    items = [*basic_items(), Item("red.png", "cat", red), Item("green.png", "dog", green)]
    items.append(Item("red_copy.png", "bird", reencoded(red, shift=6, quality=90)))  # a real copy
    cfg = write_dataset(tmp_path, items)
    make_folds(cfg)
    report = report_of(cfg)
    assert report.loc["green.png", "action"] == "kept"
    assert report.loc[["red.png", "red_copy.png"], "reason"].tolist() == ["conflicting labels"] * 2
    assert "green.png" not in report.loc["red.png", "detail"]
    trusting = write_dataset(tmp_path / "trust", items, duplicate_correlation=-1.0)
    make_folds(trusting)
    assert report_of(trusting).loc["green.png", "action"] == "dropped"  # the hash alone would drop it
