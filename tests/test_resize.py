"""The resize stage: outputs and their contract, bad files, idempotence, parameter changes, exit codes."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import ExifTags, Image

from lib.config import Config, load_config
from resize import main, resize_folder

META = {"_index.csv", "_bad.csv", "_resize.json"}


def jpeg(h: int, w: int, seed: int = 0, **pil_kwargs) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **pil_kwargs)
    return buffer.getvalue()


def png(h: int, w: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (w, h), 120).save(buffer, "PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def cfg(**overrides) -> Config:
    return Config(**{"resize": 32, "workers": 1, **overrides})


def outputs(dst: Path) -> set[str]:
    """Every file under dst but the stage's own CSV/JSON files, as relative posix paths."""
    return {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()} - META


def mtimes(dst: Path) -> dict[str, int]:
    return {p.relative_to(dst).as_posix(): p.stat().st_mtime_ns for p in dst.rglob("*")}


def future(path: Path, seconds: int = 10) -> None:
    """Make a source look modified after its copy was written."""
    t = path.stat().st_mtime_ns + seconds * 10**9
    os.utime(path, ns=(t, t))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A small tree: colour JPEG, rotated JPEG, grayscale PNG in a sub-folder, files to skip (hidden, macOS
    resource forks) and files that are not images (reported as bad)."""
    root = tmp_path / "images"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    write(root / "a.jpg", jpeg(60, 80))
    write(root / "c.JPG", jpeg(60, 80, seed=1, exif=exif.tobytes()))
    write(root / "sub" / "b.png", png(100, 40, "L"))
    write(root / "notes.txt", b"not an image")
    write(root / ".hidden.jpg", jpeg(20, 20))
    write(root / "__MACOSX" / "._a.jpg", b"\x00\x05\x16\x07 AppleDouble")
    write(root / "empty.jpg", b"")
    return root


def test_outputs_index_and_bad_list(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    summary = resize_folder(src, dst, cfg())
    bad = [("empty.jpg", "empty file"), ("notes.txt", "not an image")]
    assert (summary.done, summary.skipped, summary.bad) == (3, 0, bad)
    assert outputs(dst) == {"a.jpg", "c.JPG", "sub/b.png.jpg"}
    assert (dst / "_index.csv").read_text() == (
        "image,file,width,height\n"
        "a.jpg,a.jpg,80,60\n"
        "c.JPG,c.JPG,60,80\n"
        "sub/b.png,sub/b.png.jpg,40,100\n"
    )
    assert (dst / "_bad.csv").read_text() == "image,reason\nempty.jpg,empty file\nnotes.txt,not an image\n"
    assert cv2.imread(str(dst / "a.jpg")).shape == (24, 32, 3)
    assert cv2.imread(str(dst / "c.JPG")).shape == (32, 24, 3)  # EXIF orientation 6 applied
    assert cv2.imread(str(dst / "sub/b.png.jpg"), cv2.IMREAD_UNCHANGED).shape == (32, 13)  # still gray


def test_bad_list_has_a_header_when_empty(tmp_path: Path) -> None:
    write(tmp_path / "images" / "a.jpg", jpeg(60, 80))
    resize_folder(tmp_path / "images", tmp_path / "out", cfg())
    assert (tmp_path / "out" / "_bad.csv").read_text() == "image,reason\n"


BAD_FILES: dict[str, tuple[str, Callable[[], bytes], str]] = {
    "zero-byte": ("x.jpg", lambda: b"", "empty file"),
    "truncated-jpeg": ("x.jpg", lambda: jpeg(20, 30)[:-300], "truncated JPEG (no end-of-image marker)"),
    "truncated-png": ("x.png", lambda: png(20, 30)[:-20], "truncated PNG (no IEND chunk)"),
    "text-named-jpg": ("x.jpg", lambda: b"image,label\n", "not an image"),
    "bomb": ("x.jpg", lambda: jpeg(60, 80), "decompression bomb: 80x60 pixels > max_pixels 1000"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_is_reported_and_skipped(kind: str, tmp_path: Path) -> None:
    name, make, reason = BAD_FILES[kind]
    write(tmp_path / "images" / "good.jpg", jpeg(20, 30))
    write(tmp_path / "images" / name, make())
    summary = resize_folder(tmp_path / "images", tmp_path / "out", cfg(max_pixels=1000))
    assert summary.bad == [(name, reason)]
    assert summary.done == 1
    assert outputs(tmp_path / "out") == {"good.jpg"}
    assert (tmp_path / "out" / "_bad.csv").read_text() == f"image,reason\n{name},{reason}\n"


def test_symlink_escaping_the_source_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    outside = write(tmp_path / "elsewhere" / "secret.jpg", jpeg(20, 30))
    inside = write(root / "real.jpg", jpeg(20, 30))
    (root / "link.jpg").symlink_to(outside)
    (root / "alias.jpg").symlink_to(inside)
    summary = resize_folder(root, tmp_path / "out", cfg())
    assert summary.bad == [("link.jpg", "path escapes the source folder")]
    assert outputs(tmp_path / "out") == {"real.jpg", "alias.jpg"}


def test_second_run_skips_everything_and_touches_nothing(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    resize_folder(src, dst, cfg())
    before = mtimes(dst)
    summary = resize_folder(src, dst, cfg())
    assert (summary.done, summary.skipped) == (0, 3)
    assert mtimes(dst) == before


def test_modified_source_is_redone(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    resize_folder(src, dst, cfg())
    future(src / "a.jpg")
    summary = resize_folder(src, dst, cfg())
    assert (summary.done, summary.skipped) == (1, 2)


def test_lost_index_is_rebuilt_from_headers_without_redoing(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    resize_folder(src, dst, cfg())
    index = (dst / "_index.csv").read_text()
    (dst / "_index.csv").unlink()
    before = {k: v for k, v in mtimes(dst).items() if k not in META}
    summary = resize_folder(src, dst, cfg())
    assert (summary.done, summary.skipped) == (0, 3)
    assert (dst / "_index.csv").read_text() == index
    assert {k: v for k, v in mtimes(dst).items() if k not in META} == before


def test_parameter_change_redoes_everything(
    src: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dst = tmp_path / "out"
    resize_folder(src, dst, cfg())
    caplog.set_level(logging.INFO)
    summary = resize_folder(src, dst, cfg(resize=24))
    assert summary.done == 3
    assert cv2.imread(str(dst / "a.jpg")).shape == (18, 24, 3)
    assert "resize parameters changed (long_side 32 -> 24)" in caplog.text


def test_format_change_replaces_the_copies(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    resize_folder(src, dst, cfg())
    summary = resize_folder(src, dst, cfg(image_format="png"))
    assert summary.done == 3
    assert outputs(dst) == {"a.jpg.png", "c.JPG.png", "sub/b.png"}
    assert "sub/b.png,sub/b.png,40,100\n" in (dst / "_index.csv").read_text()


def test_vanished_source_loses_its_copy(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    resize_folder(src, dst, cfg())
    (src / "sub" / "b.png").unlink()
    summary = resize_folder(src, dst, cfg())
    assert summary.removed == 1
    assert outputs(dst) == {"a.jpg", "c.JPG"}
    assert not (dst / "sub").exists()
    assert "sub/b.png" not in (dst / "_index.csv").read_text()


def test_source_turned_bad_loses_its_copy(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    resize_folder(src, dst, cfg())
    (src / "a.jpg").write_bytes(b"garbage")
    future(src / "a.jpg")
    summary = resize_folder(src, dst, cfg())
    assert ("a.jpg", "not an image") in summary.bad
    assert outputs(dst) == {"c.JPG", "sub/b.png.jpg"}


def test_colliding_output_names_are_reported(tmp_path: Path) -> None:
    """The file that keeps its own name keeps it; the one whose name would get the format appended is
    reported, whichever sorts first."""
    write(tmp_path / "images" / "a.png", png(20, 30))
    write(tmp_path / "images" / "a.png.jpg", jpeg(20, 30))
    write(tmp_path / "images" / "b", jpeg(20, 30, seed=1))  # no extension: its copy would be b.jpg
    write(tmp_path / "images" / "b.jpg", jpeg(20, 30, seed=2))
    summary = resize_folder(tmp_path / "images", tmp_path / "out", cfg())
    assert summary.done == 2
    assert summary.bad == [
        ("a.png", "its resized name a.png.jpg collides with a.png.jpg's"),
        ("b", "its resized name b.jpg collides with b.jpg's"),
    ]
    assert outputs(tmp_path / "out") == {"a.png.jpg", "b.jpg"}


def test_letterbox_makes_squares(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    resize_folder(src, dst, cfg(letterbox=True))
    assert cv2.imread(str(dst / "a.jpg")).shape == (32, 32, 3)
    assert cv2.imread(str(dst / "sub/b.png.jpg"), cv2.IMREAD_UNCHANGED).shape == (32, 32)


def test_two_workers_give_the_same_outputs_as_one(src: Path, tmp_path: Path) -> None:
    for i in range(6):
        write(src / "more" / f"{i}.jpg", jpeg(50 + i, 70, seed=i))
    one, two = tmp_path / "one", tmp_path / "two"
    resize_folder(src, one, cfg(workers=1))
    resize_folder(src, two, cfg(workers=2))
    files = sorted(outputs(one) | {"_index.csv", "_bad.csv"})
    assert outputs(one) == outputs(two)
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def test_main_defaults_to_the_configured_folders(tmp_path: Path) -> None:
    write(tmp_path / "images" / "a.jpg", jpeg(60, 80))
    assert main(["--train-images", str(tmp_path / "images"), "--resize", "40", "--workers", "1"]) == 0
    assert cv2.imread(str(tmp_path / "images_40" / "a.jpg")).shape == (30, 40, 3)
    assert load_config(tmp_path / "images_40" / "_config.yaml").resize == 40  # the resolved config


def test_exit_1_when_every_image_is_bad(tmp_path: Path) -> None:
    write(tmp_path / "images" / "a.jpg", b"")
    assert main(["--src", str(tmp_path / "images"), "--dst", str(tmp_path / "out")]) == 1


def test_exit_1_when_there_is_no_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "images" / "notes.txt", b"x")
    assert main(["--src", str(tmp_path / "images"), "--dst", str(tmp_path / "out")]) == 1
    assert "none of the 1 files" in caplog.text and "_bad.csv" in caplog.text
    (tmp_path / "images" / "notes.txt").rename(tmp_path / "images" / ".notes.txt")
    assert main(["--src", str(tmp_path / "images"), "--dst", str(tmp_path / "out")]) == 1
    assert "no files under" in caplog.text and "hidden" in caplog.text


def test_exit_2_for_a_missing_source_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "out")]) == 2
    assert "missing not found" in caplog.text
    assert not (tmp_path / "out").exists()


def test_exit_2_when_destination_is_inside_the_source(src: Path) -> None:
    assert main(["--src", str(src), "--dst", str(src / "small")]) == 2


@pytest.mark.timeout(60)
def test_workers_start_after_opencv_threads_ran_in_the_parent(src: Path, tmp_path: Path) -> None:
    """A forked child of a process whose OpenCV thread pool has run used to hang (OpenCV 5)."""
    cv2.GaussianBlur(np.zeros((1500, 2000, 3), np.float32), (0, 0), 3)
    for i in range(4):
        write(src / "more" / f"{i}.jpg", jpeg(50, 70, seed=i))
    summary = resize_folder(src, tmp_path / "out", cfg(workers=2))
    assert summary.done == 7
