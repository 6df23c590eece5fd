"""predict.py: every image once in a stable order, whatever its format and size; unreadable images, sample
submissions, JSON and probabilities; a tampered bundle refused; missing folders; predictions equal to the mean
of the fold models' logits; a time limit forcing every step of the ladder, still writing a complete file in
time; the command line without training-only imports.

The bundle packs the two tiny experiments of test_package.py (2 members x 2 folds, views orig + hflip).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_package import EXPS, packaged_bundle
from tiny import CLASSES, ROOT

import predict
from lib import bundle
from lib.data import eval_transform
from lib.images import read_rgb, resize_array
from lib.models import model_from_checkpoint
from lib.stacker import Stacker
from lib.submission import Rows, Writer

IMAGES = [
    "a.png",
    "b.jpg",
    "broken.jpg",
    "c.webp",
    "gray.png",
    "link.png",
    "notes.txt",  # every non-hidden file gets a row: a text file is an unreadable image
    "rgba.png",
    "strip.png",
    "sub/d.bmp",
]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return packaged_bundle(tmp_path_factory, "predict")


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixed formats, modes and sizes, a sub-folder, an unreadable file, a link leaving the folder, a text file."""
    d = tmp_path_factory.mktemp("test_images")
    rng = np.random.default_rng(1)

    def img(h: int, w: int, c: int = 3) -> np.ndarray:
        return rng.integers(0, 255, (h, w, c), dtype=np.uint8)

    Image.fromarray(img(40, 48)).save(d / "a.png")
    Image.fromarray(img(300, 200)).save(d / "b.jpg", quality=90)
    Image.fromarray(img(64, 64)).save(d / "c.webp")
    Image.fromarray(img(50, 60)[..., 0]).save(d / "gray.png")
    Image.fromarray(img(50, 60, 4), "RGBA").save(d / "rgba.png")
    Image.fromarray(img(20, 1000)).save(d / "strip.png")  # a 1000 x 20 strip
    (d / "sub").mkdir()
    Image.fromarray(img(33, 33)).save(d / "sub" / "d.bmp")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    outside = d.parent / "outside.png"
    Image.fromarray(img(8, 8)).save(outside)
    (d / "link.png").symlink_to(outside)
    (d / "notes.txt").write_text("not an image")
    return d


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(*args: str | Path, start: float | None = None) -> int:
    return predict.main([str(a) for a in args], start=start)


def test_mixed_folder_gives_every_image_once_and_names_the_unreadable(
    bundle_dir: Path, test_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "sub.csv"
    with caplog.at_level(logging.INFO):
        assert run(test_dir, "--bundle", bundle_dir, "--out", out) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["image", "label"]
    assert [r["image"] for r in rows] == IMAGES  # every image once, sorted, sub-folders included
    assert {r["label"] for r in rows} <= set(CLASSES)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("unreadable" in w and "broken.jpg" in w and "notes.txt" in w for w in warnings)
    assert any("link.png" in w for w in warnings)
    fallback = bundle.verify_bundle(bundle_dir)["fallback"]["label"]
    by_name = {r["image"]: r["label"] for r in rows}
    assert by_name["broken.jpg"] == by_name["link.png"] == by_name["notes.txt"] == fallback
    summary = caplog.text[caplog.text.index("images per path:") :]
    assert "full        7" in summary and "unreadable  3" in summary and "wall time" in summary


def independent_features(bundle_dir: Path, files: list[Path]) -> list[np.ndarray]:
    """Each member's mean over folds and {orig, hflip} of the logits, computed without predict/bundle code."""
    feats = []
    for exp in EXPS:
        models = [model_from_checkpoint(bundle_dir / f"members/{exp}/fold{k}.pt") for k in (0, 1)]
        ckpt = models[0][1]
        data = ckpt["data_config"]
        transform = eval_transform(
            size=32, mean=data["mean"], std=data["std"], interpolation=data["interpolation"],
            crop=ckpt["config"]["crop"],
        )  # fmt: skip
        x = torch.stack([transform(image=resize_array(read_rgb(f), 40))["image"] for f in files])
        with torch.no_grad():
            logits = [m(v) for m, _ in models for v in (x, torch.flip(x, [3]))]
        feats.append(torch.stack(logits).mean(0).numpy())
    return feats


def test_full_path_is_the_stacker_over_the_mean_of_fold_logits(
    bundle_dir: Path, test_dir: Path, tmp_path: Path
) -> None:
    files = [test_dir / "a.png", test_dir / "strip.png"]
    expected = independent_features(bundle_dir, files)

    manifest = bundle.verify_bundle(bundle_dir)
    predictor = bundle.Predictor(bundle_dir, manifest, torch.device("cpu"), None)
    predictor.load(float("inf"), 0.0)
    full = predictor.levels[0]
    assert full.name == "full" and [m["views"] for m in full.members] == [["orig", "hflip"]] * 2
    dataset = bundle.PredictDataset(files, full.preps)
    inputs = dict(
        zip(
            full.preps,
            [torch.stack(t) for t in zip(*(dataset[i][0] for i in range(2)), strict=True)],
            strict=True,
        )
    )
    got = predictor.member_features(full, inputs)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)

    out = tmp_path / "p.csv"
    assert run(test_dir, "--bundle", bundle_dir, "--out", out, "--probs") == 0
    rows = {r["image"]: r for r in read_csv(out)}
    probs = Stacker.load(bundle_dir / "stacker").predict_proba(expected)
    for f, p in zip(files, probs, strict=True):
        row = rows[f.name]
        np.testing.assert_allclose([float(row[c]) for c in CLASSES], p, atol=2e-6)
        assert row["label"] == CLASSES[int(np.argmax(p))]


def test_sample_submission_fixes_rows_and_columns(
    bundle_dir: Path, test_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sample = tmp_path / "sample.csv"
    ids = ["strip", "ghost", "sub/d", "a.png", "c"]  # without extensions, shuffled, one not on disk
    sample.write_text("id,category\n" + "".join(f"{i},x\n" for i in ids))
    out = tmp_path / "s.csv"
    with caplog.at_level(logging.WARNING):
        assert run(test_dir, "--bundle", bundle_dir, "--out", out, "--sample-submission", sample) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["id", "category"] and [r["id"] for r in rows] == ids
    assert {r["category"] for r in rows} <= set(CLASSES)
    assert rows[1]["category"] == bundle.verify_bundle(bundle_dir)["fallback"]["label"]
    assert "ghost" in caplog.text

    wide = tmp_path / "wide.csv"  # a probability submission: the class names are its columns
    wide.write_text(
        "image_id," + ",".join(reversed(CLASSES)) + "\n" + "".join(f"{i},0,0,0\n" for i in ids[:3])
    )
    assert run(test_dir, "--bundle", bundle_dir, "--out", out, "--sample-submission", wide) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["image_id", *reversed(CLASSES)] and [r["image_id"] for r in rows] == ids[:3]
    for r in rows:
        assert sum(float(r[c]) for c in CLASSES) == pytest.approx(1.0, abs=1e-5)


def test_probability_sample_with_a_class_the_model_never_saw_end_to_end(
    bundle_dir: Path, test_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model's three classes and a fourth it never saw: the model's probabilities, 0, one warning."""
    plain = tmp_path / "plain.csv"
    assert run(test_dir, "--bundle", bundle_dir, "--out", plain, "--probs") == 0
    model = {r["image"]: r for r in read_csv(plain)}
    sample = tmp_path / "sample.csv"
    sample.write_text("id," + ",".join(CLASSES) + ",purple\n" + "".join(f"{i},0,0,0,0\n" for i in IMAGES))
    out = tmp_path / "s.csv"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run(test_dir, "--bundle", bundle_dir, "--out", out, "--sample-submission", sample) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["id", *CLASSES, "purple"] and [r["id"] for r in rows] == IMAGES
    for r in rows:
        assert [float(r[c]) for c in CLASSES] == [float(model[r["id"]][c]) for c in CLASSES]
        assert sum(float(r[c]) for c in CLASSES) == pytest.approx(1.0, abs=1e-5)
        assert r["purple"] == "0"
    named = [m for m in caplog.messages if "purple" in m]
    assert len(named) == 1, named  # once when the columns are planned, not at each of the two writes


FOUR = np.array([[0.7, 0.2, 0.1], [0.05, 0.15, 0.8], [0.3, 0.3, 0.4]])  # 3 rows x classes blue, green, red


def render(header: list[str] | None, classes: list[str], with_probs: bool = False) -> list[dict[str, str]]:
    """The CSV a Writer makes of FOUR's first two rows and one row without an image (FOUR[2], the fallback)."""
    rows = Rows(
        ids=["x", "y", "z"], source=[0, 1, None], files=["x.png", "y.png"], escaping=set(), header=header
    )
    writer = Writer(out=Path("unused.csv"), fmt="csv", with_probs=with_probs, rows=rows, classes=classes)
    return list(csv.DictReader(io.StringIO(writer.render(FOUR[:2], FOUR[2]))))


def test_probability_sample_gets_0_in_a_column_of_no_known_class(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        rows = render(["id", "blue", "green", "red", "purple"], ["blue", "green", "red"])
    assert list(rows[0]) == ["id", "blue", "green", "red", "purple"]
    for r, p in zip(rows, FOUR, strict=True):
        assert [float(r[c]) for c in ("blue", "green", "red")] == pytest.approx(p)
        assert sum(float(r[c]) for c in ("blue", "green", "red")) == pytest.approx(p.sum())
        assert r["purple"] == "0"
    assert [m for m in caplog.messages if "'purple'" in m and "no class of the model" in m]


def test_probability_sample_missing_a_class_leaves_it_out_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        rows = render(["id", "green", "blue"], ["blue", "green", "red"])
    assert list(rows[0]) == ["id", "green", "blue"]
    assert [float(rows[1]["green"]), float(rows[1]["blue"])] == pytest.approx([0.15, 0.05])
    assert [m for m in caplog.messages if "'red'" in m and "--probs" in m]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rows = render(["id", "green", "blue"], ["blue", "green", "red"], with_probs=True)
    assert list(rows[0]) == ["id", "green", "blue", "red"] and float(rows[1]["red"]) == pytest.approx(0.8)
    assert not caplog.messages


@pytest.mark.parametrize(
    ("header", "classes"),
    [
        (["id", "label"], ["blue", "label", "red"]),  # one column, even named like a class, is the label
        (["id", "species"], ["blue", "green", "red"]),
        (["id", "red"], ["blue", "green", "red"]),
        (["id", "species", "red"], ["blue", "green", "red"]),  # one class-name column of two: still labels
        (None, ["blue", "green", "red"]),  # no sample: image,label
    ],
)
def test_label_sample_gets_the_label_in_every_column(
    header: list[str] | None, classes: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        rows = render(header, classes)
    names = header or ["image", "label"]
    assert list(rows[0]) == names
    for r, want in zip(rows, ["blue", "red", "red"], strict=True):
        assert [r[c] for c in names[1:]] == [want] * (len(names) - 1)
    assert not caplog.messages


def test_json_and_probabilities(bundle_dir: Path, test_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    assert run(test_dir, "--bundle", bundle_dir, "--out", out, "--format", "json") == 0
    labels = json.loads(out.read_text())
    assert list(labels) == IMAGES and set(labels.values()) <= set(CLASSES)

    assert run(test_dir, "--bundle", bundle_dir, "--out", out, "--format", "json", "--probs") == 0
    detail = json.loads(out.read_text())
    assert list(detail) == IMAGES
    for name, entry in detail.items():
        assert entry["label"] == labels[name] and list(entry["probs"]) == CLASSES
        assert sum(entry["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert entry["label"] == max(entry["probs"], key=entry["probs"].get)

    csv_out = tmp_path / "p.csv"
    assert run(test_dir, "--bundle", bundle_dir, "--out", csv_out, "--probs") == 0
    rows = read_csv(csv_out)
    assert list(rows[0]) == ["image", "label", *CLASSES]
    assert {r["image"]: r["label"] for r in rows} == labels


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("change", "members/t/fold0.pt"),
        ("delete", "stacker/stacker.json"),
        ("extra", "members/t/fold7.pt"),
        ("manifest", "manifest.json"),
        ("no_manifest", "manifest.json"),
    ],
)
def test_tampered_or_incomplete_bundle_is_refused(
    bundle_dir: Path,
    test_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
    named: str,
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    if damage == "change":
        data = bytearray((copy / named).read_bytes())
        data[len(data) // 2] ^= 1
        (copy / named).write_bytes(bytes(data))
    elif damage == "delete":
        (copy / named).unlink()
    elif damage == "extra":
        shutil.copy(copy / "members/t/fold0.pt", copy / named)
    elif damage == "manifest":
        manifest = json.loads((copy / named).read_text())
        manifest["fallback"]["label"] = (
            CLASSES[-1] if manifest["fallback"]["label"] != CLASSES[-1] else CLASSES[0]
        )
        (copy / named).write_text(json.dumps(manifest))
    else:
        (copy / named).unlink()
    out = tmp_path / "s.csv"
    with caplog.at_level(logging.ERROR):
        assert run(test_dir, "--bundle", copy, "--out", out) == 2
    assert named in caplog.text and "package.py" in caplog.text
    assert not out.exists()  # refused before writing anything


def test_missing_empty_or_only_hidden_files_folder_is_an_error(
    bundle_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    hidden = tmp_path / "hidden"
    (hidden / "__MACOSX").mkdir(parents=True)
    (hidden / ".DS_Store").write_text("hi")
    (hidden / "__MACOSX" / "a.png").write_bytes(b"a zip's resource fork")
    for folder, words in (
        (tmp_path / "absent", "does not exist"),
        (empty, "is empty"),
        (hidden, "no files to predict"),
    ):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert run(folder, "--bundle", bundle_dir, "--out", tmp_path / "s.csv") == 2
        assert words in caplog.text and str(folder) in caplog.text
    assert not (tmp_path / "s.csv").exists()


def test_time_limit_forces_every_step_and_still_writes_a_complete_file_in_time(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every model call sleeps 0.1 s per fold and view: full costs 0.8 s per batch of 4, orig 0.4, fastest
    0.2, one fold 0.1; 600 images in 10 s cannot all be predicted, even on the cheapest model path."""
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(600):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    real = bundle.member_logits

    def slow(models, pre, views, inputs, device, dtype):
        time.sleep(0.1 * len(models) * len(views))
        return real(models, pre, views, inputs, device, dtype)

    monkeypatch.setattr(bundle, "member_logits", slow)
    out = tmp_path / "s.csv"
    limit = 10.0
    start = time.time()
    args = (folder, "--bundle", bundle_dir, "--out", out, "--time-limit", limit, "--batch-size", 4)
    with caplog.at_level(logging.INFO):
        assert run(*args, start=start) == 0
    finished = time.time()
    assert finished - start < limit and out.stat().st_mtime < start + limit
    rows = read_csv(out)
    assert [r["image"] for r in rows] == [f"{i:03d}.png" for i in range(600)]
    assert {r["label"] for r in rows} <= set(CLASSES)
    table = caplog.text[caplog.text.index("images per path:") :].splitlines()
    counts = {line.split()[0]: int(line.split()[1]) for line in table[1:] if line.startswith("  ")}
    assert set(counts) == {"full", "orig", "fastest", "one_fold", "fallback"}, counts
    assert sum(counts.values()) == 600 and all(v > 0 for v in counts.values())
    assert (
        "stepping down from full to orig" in caplog.text
        and "stepping down from fastest to one_fold" in caplog.text
    )


def test_past_deadline_still_leaves_a_complete_fallback_file(
    bundle_dir: Path, test_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s.csv"
    assert (
        run(test_dir, "--bundle", bundle_dir, "--out", out, "--time-limit", 5, start=time.time() - 100) == 0
    )
    rows = read_csv(out)
    fallback = bundle.verify_bundle(bundle_dir)["fallback"]["label"]
    assert [r["image"] for r in rows] == IMAGES and {r["label"] for r in rows} == {fallback}


def test_command_line_needs_no_training_code(bundle_dir: Path, test_dir: Path, tmp_path: Path) -> None:
    """One fresh interpreter: what importing predict loads, the CLI entry (time counted from process start),
    then that no training code was loaded."""
    out = tmp_path / "cli.csv"
    code = (
        "import sys; sys.path.insert(0, 'src'); import predict\n"
        "print('AT IMPORT', sorted(m for m in ('sklearn', 'pandas', 'xgboost', 'train', 'pytorch_optimizer')"
        " if m in sys.modules))\n"
        f"sys.argv = ['predict.py', {str(test_dir)!r}, '--bundle', {str(bundle_dir)!r}, '--out', {str(out)!r},"
        " '--time-limit', '600']\n"
        "rc = predict.cli()\n"
        "print('AFTER', sorted(m for m in ('train', 'package', 'pytorch_optimizer', 'finetune', 'distill')"
        " if m in sys.modules))\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AT IMPORT []" in proc.stdout  # the stacker's xgboost (which loads sklearn) comes with the bundle
    assert "AFTER []" in proc.stdout
    assert [r["image"] for r in read_csv(out)] == IMAGES
    assert "wall time" in proc.stderr
    assert predict.DEFAULT_BUNDLE == ROOT / "output" / "bundle"


def test_batchnorm_folding_keeps_the_function_and_leaves_other_norms() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # trained-looking statistics, so folding matters
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 40, 40)
    with torch.no_grad():
        expected = model(x)
    folded = bundle.fold_batchnorm(model, 32, 3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)
    group_norm = timm.create_model("test_efficientnet_gn", num_classes=3).eval()
    assert bundle.fold_batchnorm(group_norm, 32, 3) is group_norm
